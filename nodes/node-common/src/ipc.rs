//! The message of a tensor that stays on the GPU (CUDA IPC between processes on one machine),
//! laid out as dora's Python tensor helpers lay it out: the payload is the 64-byte CUDA memory
//! handle as an Int8 array, with metadata `shape`, `strides` (bytes), `dtype` (numpy typestr,
//! `bfloat16` for bf16), `size` (bytes) and `offset` (bytes into the allocation). turbo-pi
//! adds `transport: cuda-ipc`, the producer's interprocess event handle (`ipc_event`, 64
//! ints) that the consumer's stream waits on, and the ring `slot` to hand back on the
//! producer's `release` input once the consumer has copied the tensor.

use dora_node_api::{DoraArray, IntoArrow, MetadataParameters, Parameter};
use eyre::{bail, eyre, Result};

use crate::{dims_match, int_param, list_param, shape_of, str_param, Dim, FrameMeta};

pub const TRANSPORT: &str = "transport";
pub const CUDA_IPC: &str = "cuda-ipc";

/// A device tensor handed over by handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcTensor {
    pub mem_handle: [u8; 64],
    pub event_handle: [u8; 64],
    pub slot: u64,
    pub shape: Vec<usize>,
    /// numpy typestr (`<f4`) or `bfloat16`.
    pub dtype: String,
    pub offset: usize,
}

/// Bytes per element of a typestr this crate exchanges.
pub fn typestr_size(dtype: &str) -> Option<usize> {
    match dtype {
        "<f4" => Some(4),
        "bfloat16" | "<f2" => Some(2),
        _ => None,
    }
}

fn to_i8(b: &[u8; 64]) -> Vec<i8> {
    b.iter().map(|&v| v as i8).collect()
}

fn handle_from_ints(input: &str, key: &str, v: &[i64]) -> Result<[u8; 64]> {
    if v.len() != 64 {
        bail!(
            "input `{input}`: `{key}` must hold the 64 bytes of a CUDA IPC handle, found {}",
            v.len()
        );
    }
    let mut h = [0u8; 64];
    for (d, &s) in h.iter_mut().zip(v) {
        *d = match s {
            -128..=-1 => (s + 256) as u8,
            0..=255 => s as u8,
            _ => bail!("input `{input}`: `{key}` holds {s}, not a byte"),
        };
    }
    Ok(h)
}

impl IpcTensor {
    /// Elements times bytes per element.
    pub fn size(&self) -> usize {
        self.shape.iter().product::<usize>() * typestr_size(&self.dtype).unwrap_or(0)
    }

    /// Row-major strides in bytes.
    pub fn strides(&self) -> Vec<usize> {
        let elem = typestr_size(&self.dtype).unwrap_or(0);
        let mut s = vec![0; self.shape.len()];
        let mut acc = elem;
        for (i, d) in self.shape.iter().enumerate().rev() {
            s[i] = acc;
            acc *= d;
        }
        s
    }

    /// The metadata of this tensor's message for frame `meta`.
    pub fn params(&self, meta: FrameMeta) -> MetadataParameters {
        let ints = |v: &[usize]| Parameter::ListInt(v.iter().map(|&d| d as i64).collect());
        let mut p = meta.params();
        p.insert("shape".into(), ints(&self.shape));
        p.insert("strides".into(), ints(&self.strides()));
        p.insert("dtype".into(), Parameter::String(self.dtype.clone()));
        p.insert("size".into(), Parameter::Integer(self.size() as i64));
        p.insert("offset".into(), Parameter::Integer(self.offset as i64));
        p.insert(TRANSPORT.into(), Parameter::String(CUDA_IPC.into()));
        p.insert(
            "ipc_event".into(),
            Parameter::ListInt(
                self.event_handle
                    .iter()
                    .map(|&b| i64::from(b as i8))
                    .collect(),
            ),
        );
        p.insert("slot".into(), Parameter::Integer(self.slot as i64));
        p
    }

    /// The payload: the memory handle as 64 Int8 values.
    pub fn data(&self) -> DoraArray {
        to_i8(&self.mem_handle).into_arrow()
    }

    /// Whether a message is a CUDA IPC tensor (else a host tensor).
    pub fn is_ipc(md: &MetadataParameters) -> bool {
        str_param(md, TRANSPORT) == Some(CUDA_IPC)
    }

    /// Reads and checks an IPC tensor message on `input`: dtype `dtype`, shape `expected`,
    /// contiguous strides, `size` consistent with them, 64-byte handles.
    pub fn from_input(
        input: &str,
        md: &MetadataParameters,
        data: &DoraArray,
        dtype: &str,
        expected: &[Dim],
    ) -> Result<IpcTensor> {
        let found = str_param(md, "dtype").unwrap_or("(none)");
        if found != dtype {
            bail!("input `{input}`: expected a CUDA IPC tensor of dtype {dtype}, found {found}");
        }
        let shape = shape_of(
            input,
            list_param(md, "shape")
                .ok_or_else(|| eyre!("input `{input}`: metadata `shape` is missing"))?,
        )?;
        if !dims_match(&shape, expected) {
            bail!(
                "input `{input}`: expected shape [{}], found {shape:?}",
                expected
                    .iter()
                    .map(Dim::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let handle: &[i8] = data.try_into().map_err(|_| {
            eyre!("input `{input}`: a CUDA IPC message carries its memory handle as Int8 [64]")
        })?;
        let mem: Vec<i64> = handle.iter().map(|&b| i64::from(b)).collect();
        let event = list_param(md, "ipc_event")
            .ok_or_else(|| eyre!("input `{input}`: metadata `ipc_event` is missing"))?;
        let slot = int_param(md, "slot")
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| eyre!("input `{input}`: metadata `slot` is missing"))?;
        let offset = int_param(md, "offset")
            .map_or(Ok(0), usize::try_from)
            .map_err(|_| eyre!("input `{input}`: negative `offset`"))?;
        let t = IpcTensor {
            mem_handle: handle_from_ints(input, "the payload", &mem)?,
            event_handle: handle_from_ints(input, "ipc_event", &event)?,
            slot,
            shape,
            dtype: dtype.to_string(),
            offset,
        };
        let size = int_param(md, "size")
            .ok_or_else(|| eyre!("input `{input}`: metadata `size` is missing"))?;
        if usize::try_from(size).ok() != Some(t.size()) {
            bail!(
                "input `{input}`: `size` {size} does not match shape {:?} of {dtype} ({} bytes)",
                t.shape,
                t.size()
            );
        }
        if let Some(strides) = list_param(md, "strides") {
            let want: Vec<i64> = t.strides().iter().map(|&s| s as i64).collect();
            if strides != want {
                bail!("input `{input}`: strides {strides:?} are not row-major {want:?} (bytes)");
            }
        }
        Ok(t)
    }
}

/// How a GPU stage sends its output tensor: env `TRANSPORT`, `host` (the default: an Arrow
/// buffer any node can read) or `cuda-ipc` (by handle, for a CUDA consumer on the same
/// machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Host,
    CudaIpc,
}

pub fn transport_from_env() -> Result<Transport> {
    match crate::env_opt::<String>("TRANSPORT")?.as_deref() {
        None | Some("host") => Ok(Transport::Host),
        Some("cuda-ipc") => Ok(Transport::CudaIpc),
        Some(other) => bail!("env TRANSPORT={other:?}: expected `host` or `cuda-ipc`"),
    }
}

/// Ring slots of a producer with `TRANSPORT: cuda-ipc`: env `RING_SLOTS` (default 4).
pub fn ring_slots_from_env() -> Result<usize> {
    let n: usize = crate::env_or("RING_SLOTS", 4)?;
    if !(1..=64).contains(&n) {
        bail!("env RING_SLOTS={n} must be between 1 and 64");
    }
    Ok(n)
}

/// A clear error for a CUDA IPC tensor arriving at a node that reads host tensors.
pub fn refuse_ipc(input: &str, md: &MetadataParameters) -> Result<()> {
    if IpcTensor::is_ipc(md) {
        bail!(
            "input `{input}`: a CUDA IPC tensor (its producer has TRANSPORT: cuda-ipc), but this node reads host tensors: set BACKEND: cuda here, or TRANSPORT: host on the producer"
        );
    }
    Ok(())
}

/// The `release` message that hands ring slot `slot` (holding frame `meta.seq`) back.
pub fn release_params(meta: FrameMeta, slot: u64) -> MetadataParameters {
    let mut p = meta.params();
    p.insert("slot".into(), Parameter::Integer(slot as i64));
    p
}

/// (slot, seq) of a `release` message.
pub fn release_from(md: &MetadataParameters) -> Result<(u64, u64)> {
    let meta = FrameMeta::from_metadata("release", md)?;
    let slot = int_param(md, "slot")
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| eyre!("input `release`: metadata `slot` is missing"))?;
    Ok((slot, meta.seq))
}

/// Hands back the ring slot held by `part` when it is a CUDA IPC tensor (a frame dropped
/// before its tensor was read); host tensors hold nothing.
pub fn release_part(node: &mut dora_node_api::DoraNode, part: &crate::join::Part) {
    if !IpcTensor::is_ipc(&part.metadata) {
        return;
    }
    let Some(slot) = int_param(&part.metadata, "slot").and_then(|v| u64::try_from(v).ok()) else {
        return;
    };
    if let Err(e) = node.send_output(
        "release".to_string().into(),
        release_params(part.meta, slot),
        (),
    ) {
        eprintln!("sending release of slot {slot}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IpcTensor {
        let mut mem = [0u8; 64];
        let mut ev = [0u8; 64];
        for i in 0..64 {
            mem[i] = (i * 7 + 200) as u8;
            ev[i] = (255 - i) as u8;
        }
        IpcTensor {
            mem_handle: mem,
            event_handle: ev,
            slot: 2,
            shape: vec![512, 2048],
            dtype: "<f4".into(),
            offset: 0,
        }
    }

    #[test]
    fn round_trips_in_dora_tensor_pool_layout() {
        let t = sample();
        let meta = FrameMeta {
            seq: 9,
            t_capture_ns: 5,
            trace: None,
        };
        let md = t.params(meta);
        assert!(IpcTensor::is_ipc(&md));
        assert_eq!(
            md.get("strides"),
            Some(&Parameter::ListInt(vec![2048 * 4, 4]))
        );
        assert_eq!(md.get("size"), Some(&Parameter::Integer(512 * 2048 * 4)));
        assert_eq!(md.get("offset"), Some(&Parameter::Integer(0)));
        let data = t.data();
        let bytes: &[i8] = (&data).try_into().unwrap();
        assert_eq!(bytes.len(), 64);
        assert_eq!(
            bytes[0], 200u8 as i8,
            "handle bytes are signed as dora's helpers sign them"
        );
        let back =
            IpcTensor::from_input("x", &md, &data, "<f4", &[Dim::Any, Dim::Is(2048)]).unwrap();
        assert_eq!(back, t);
        assert_eq!(FrameMeta::from_metadata("x", &md).unwrap(), meta);
    }

    #[test]
    fn rejects_wrong_dtype_shape_size_and_handles() {
        let t = sample();
        let meta = FrameMeta {
            seq: 1,
            t_capture_ns: 1,
            trace: None,
        };
        let md = t.params(meta);
        let data = t.data();
        let e = IpcTensor::from_input("x", &md, &data, "bfloat16", &[Dim::Any, Dim::Any]);
        assert!(e.unwrap_err().to_string().contains("dtype bfloat16"));
        let e = IpcTensor::from_input("x", &md, &data, "<f4", &[Dim::Any, Dim::Is(7)]);
        assert!(e.unwrap_err().to_string().contains("expected shape [_, 7]"));
        let mut bad = md.clone();
        bad.insert("size".into(), Parameter::Integer(3));
        let e = IpcTensor::from_input("x", &bad, &data, "<f4", &[Dim::Any, Dim::Any]);
        assert!(e.unwrap_err().to_string().contains("`size` 3"));
        let mut bad = md.clone();
        bad.insert("ipc_event".into(), Parameter::ListInt(vec![1; 10]));
        let e = IpcTensor::from_input("x", &bad, &data, "<f4", &[Dim::Any, Dim::Any]);
        assert!(e.unwrap_err().to_string().contains("64 bytes"));
        let short: DoraArray = vec![1i8; 10].into_arrow();
        let e = IpcTensor::from_input("x", &md, &short, "<f4", &[Dim::Any, Dim::Any]);
        assert!(e.unwrap_err().to_string().contains("64 bytes"));
        let floats: DoraArray = vec![1.0f32; 64].into_arrow();
        let e = IpcTensor::from_input("x", &md, &floats, "<f4", &[Dim::Any, Dim::Any]);
        assert!(e.unwrap_err().to_string().contains("Int8 [64]"));
    }

    #[test]
    fn host_readers_refuse_ipc_tensors_with_the_fix_named() {
        let meta = FrameMeta {
            seq: 3,
            t_capture_ns: 1,
            trace: None,
        };
        let ipc = sample().params(meta);
        let e = refuse_ipc("kv_cache", &ipc).unwrap_err().to_string();
        assert!(e.contains("input `kv_cache`: a CUDA IPC tensor"), "{e}");
        assert!(
            e.contains("BACKEND: cuda") && e.contains("TRANSPORT: host"),
            "{e}"
        );
        assert!(refuse_ipc("kv_cache", &meta.tensor_params(&[2, 2], "float32")).is_ok());
    }

    #[test]
    fn release_messages_name_slot_and_frame() {
        let md = release_params(
            FrameMeta {
                seq: 41,
                t_capture_ns: 3,
                trace: None,
            },
            1,
        );
        assert_eq!(release_from(&md).unwrap(), (1, 41));
        let mut bad = md.clone();
        bad.remove("slot");
        assert!(release_from(&bad).unwrap_err().to_string().contains("slot"));
    }
}

//! The CUDA backend (feature `cuda`): cudarc loads libcuda, NVRTC and cuBLASLt at run time,
//! so it builds without a CUDA toolkit. Kernels are CUDA C compiled by NVRTC for the device's
//! own architecture; GEMMs go through cuBLASLt. Precision::F32 is strict parity with the CPU
//! reference (f32 everywhere, no TF32); Precision::Bf16 keeps weights and GEMM activations in
//! bf16 with f32 accumulation, an f32 residual stream and f32 norm statistics and softmax.
//!
//! The kernels live in [`kernels`]: one CUDA file per family next to its launchers and a
//! pointer to its CPU twin in [`crate::cpu`], all listed once in its registry. [`stages`] holds
//! the three model stages (one file each: weights, buffers, forward pass, graphs),
//! [`pipeline`] runs them as one policy with frames overlapped, [`split`] runs one alone for a
//! split graph's node; [`runtime`] has what they run on (graphs, shared GEMM picks).

pub mod compile;
pub mod gemm;
pub mod kernels;
pub mod pipeline;
pub mod runtime;
pub use runtime::{device, ipc};
pub mod split;
pub mod stages;
pub mod weights;

pub use device::{DType, Device, DeviceBuffer, Lane, View};
pub use gemm::{Fp8, Gemm, Mat, Op};
pub use kernels::Kernels;
// The kernel families at their former paths (cuda::rms_norm, ...).
pub use kernels::{
    activation, attention, embed, euler, fp8, layer_norm, mlp, patch, residual, rms_norm, rope,
    skinny,
};
pub use pipeline::CudaPolicy;
pub use split::{CudaDenoise, CudaPrefix, CudaVision};

use crate::{Error, Result};

/// A device, the kernels of one precision, cuBLASLt and one stream: what the kernel tests
/// (and any caller composing kernels by hand) need.
pub struct Gpu {
    pub lane: Lane,
    pub gemm: Gemm,
    pub kernels: Kernels,
    pub dev: Device,
}

impl Gpu {
    /// Opens device 0 (or `TURBOPI_CUDA_DEVICE`) with kernels whose activation type is `act`
    /// (F32 or Bf16).
    pub fn new(act: DType) -> Result<Gpu> {
        device::guard("opening the GPU", || {
            let ordinal = match std::env::var("TURBOPI_CUDA_DEVICE") {
                Ok(v) => v.trim().parse().map_err(|_| {
                    Error::Input(format!(
                        "TURBOPI_CUDA_DEVICE must be a device index, found `{v}`"
                    ))
                })?,
                Err(_) => 0,
            };
            let dev = Device::open(ordinal)?;
            let kernels = Kernels::load(&dev, act)?;
            let gemm = Gemm::new(&dev)?;
            let lane = Lane::new(&dev)?;
            Ok(Gpu {
                lane,
                gemm,
                kernels,
                dev,
            })
        })
    }

    /// A new buffer holding `data` as `dtype` (F32, Bf16 rounded to nearest even, or I32 of
    /// integral values).
    pub fn upload(&self, dtype: DType, data: &[f32]) -> Result<DeviceBuffer> {
        let buf = self.dev.alloc(dtype, data.len())?;
        match dtype {
            DType::F32 => self.lane.upload(data, buf.view())?,
            DType::Bf16 => {
                let bits: Vec<u16> = data
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                upload_bits(&self.lane, &bits, buf.view())?;
            }
            DType::I32 => {
                let ints: Vec<i32> = data.iter().map(|&v| v as i32).collect();
                self.lane.upload(&ints, buf.view())?;
            }
            DType::U8 => {
                let bytes: Vec<u8> = data.iter().map(|&v| v as u8).collect();
                self.lane.upload(&bytes, buf.view())?;
            }
        }
        // The host vectors above must outlive the copies.
        self.lane.synchronize()?;
        Ok(buf)
    }

    /// A new buffer of `len` elements filled with NaN (0xFF bytes) to expose unwritten output.
    pub fn poisoned(&self, dtype: DType, len: usize) -> Result<DeviceBuffer> {
        let buf = self.dev.alloc(dtype, len)?;
        self.lane.poison(buf.view())?;
        Ok(buf)
    }

    /// The contents of `v` as f32 (waits for the stream).
    pub fn download(&self, v: View) -> Result<Vec<f32>> {
        self.lane.synchronize()?;
        match v.dtype {
            DType::F32 => {
                let mut out = vec![0.0f32; v.len];
                download_sync(v, &mut out)?;
                Ok(out)
            }
            DType::Bf16 => {
                let mut out = vec![0u16; v.len];
                download_sync(v, &mut out)?;
                Ok(out
                    .into_iter()
                    .map(|b| half::bf16::from_bits(b).to_f32())
                    .collect())
            }
            DType::I32 => {
                let mut out = vec![0i32; v.len];
                download_sync(v, &mut out)?;
                Ok(out.into_iter().map(|i| i as f32).collect())
            }
            DType::U8 => Err(Error::Cuda("download of u8 data is not supported".into())),
        }
    }

    /// The bytes of a u8 buffer `v` (waits for the stream): FP8 codes, camera bytes.
    pub fn download_bytes(&self, v: View) -> Result<Vec<u8>> {
        self.lane.synchronize()?;
        if v.dtype != DType::U8 {
            return Err(Error::Cuda(format!(
                "internal: download_bytes of a {:?} buffer",
                v.dtype
            )));
        }
        let mut out = vec![0u8; v.len];
        download_sync(v, &mut out)?;
        Ok(out)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.lane.synchronize()
    }
}

fn upload_bits(lane: &Lane, bits: &[u16], dst: View) -> Result<()> {
    if std::mem::size_of_val(bits) > dst.bytes() {
        return Err(Error::Cuda(
            "internal: upload larger than its buffer".into(),
        ));
    }
    // SAFETY: `dst` holds the bytes (checked); the caller synchronises the lane before
    // dropping `bits`.
    unsafe { cudarc::driver::result::memcpy_htod_async(dst.ptr, bits, lane.stream.cu_stream()) }
        .map_err(|e| Error::Cuda(format!("uploading to the device: {e}")))
}

fn download_sync<T>(src: View, out: &mut [T]) -> Result<()> {
    if std::mem::size_of_val(out) > src.bytes() {
        return Err(Error::Cuda(
            "internal: download larger than its buffer".into(),
        ));
    }
    // SAFETY: `src` holds the bytes (checked); the copy is synchronous and the stream that
    // wrote `src` was synchronised by the caller.
    unsafe { cudarc::driver::result::memcpy_dtoh_sync(out, src.ptr) }
        .map_err(|e| Error::Cuda(format!("downloading from the device: {e}")))
}

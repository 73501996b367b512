//! What every turbo-pi dora node shares: env variables with clear errors, the message
//! metadata contract (`seq`, `t_capture_ns`, `shape`, `dtype`), tensor checks on inputs, and
//! sequence-gap counting (dora drops messages silently when a queue is full; we never do).

use std::fmt::Display;
use std::path::PathBuf;
use std::str::FromStr;

pub use dora_node_api;

pub mod events;
pub mod ipc;
pub mod join;
pub mod prompt;
pub mod reject;
pub mod ring;
pub mod stage;
pub mod trace;
use dora_node_api::{DoraArray, MetadataParameters, Parameter};
use eyre::{bail, eyre, Result, WrapErr};
use operators::backend::{BackendKind, Precision};
use operators::checkpoint::Checkpoint;
use operators::gemma::KvCache;

/// `name` parsed from the environment, or `default` when unset or empty.
pub fn env_or<T>(name: &str, default: T) -> Result<T>
where
    T: FromStr,
    T::Err: Display,
{
    Ok(env_opt(name)?.unwrap_or(default))
}

/// `name` parsed from the environment; `None` when unset or empty.
pub fn env_opt<T>(name: &str) -> Result<Option<T>>
where
    T: FromStr,
    T::Err: Display,
{
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| eyre!("env {name}={v:?} is invalid: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("env {name}: {e}"),
    }
}

/// Boolean `name` from the environment, or `default` when unset or empty. Parsed as every
/// boolean setting is ([`operators::settings::parse_bool`]: `1|0|true|false|on|off|yes|no`,
/// any case); anything else is an error naming the variable.
pub fn env_flag(name: &str, default: bool) -> Result<bool> {
    match env_opt::<String>(name)? {
        Some(v) => Ok(operators::settings::parse_bool(name, &v)?),
        None => Ok(default),
    }
}

/// A batch size setting (`MAX_BATCH`): 1 to [`operators::MAX_BATCH`].
pub fn parse_max_batch(value: &str) -> std::result::Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(b) if (1..=operators::MAX_BATCH).contains(&b) => Ok(b),
        _ => Err(format!(
            "env MAX_BATCH={value:?} must be a whole number from 1 to {}",
            operators::MAX_BATCH
        )),
    }
}

/// A batching window (`BATCH_WINDOW_MS`): milliseconds from 0 to 10000.
pub fn parse_batch_window_ms(value: &str) -> std::result::Result<std::time::Duration, String> {
    match value.trim().parse::<f64>() {
        Ok(ms) if ms.is_finite() && (0.0..=10_000.0).contains(&ms) => {
            Ok(std::time::Duration::from_secs_f64(ms / 1e3))
        }
        _ => Err(format!(
            "env BATCH_WINDOW_MS={value:?} must be a number of milliseconds from 0 to 10000"
        )),
    }
}

/// The most `SPIN_US` takes: 100 ms.
pub const MAX_SPIN_US: u64 = 100_000;

/// `SPIN_US` (the in-process policy's look for the next request before its thread sleeps):
/// whole microseconds from 0 to [`MAX_SPIN_US`].
pub fn parse_spin_us(value: &str) -> std::result::Result<std::time::Duration, String> {
    match value.trim().parse::<u64>() {
        Ok(us) if us <= MAX_SPIN_US => Ok(std::time::Duration::from_micros(us)),
        _ => Err(format!(
            "env SPIN_US={value:?} must be a whole number of microseconds from 0 to {MAX_SPIN_US}"
        )),
    }
}

/// `MAX_BATCH` (default [`operators::MAX_BATCH`]) and `BATCH_WINDOW_MS` (default 0) from the
/// environment.
pub fn batching_from_env() -> Result<(usize, std::time::Duration)> {
    let max = match env_opt::<String>("MAX_BATCH")? {
        Some(v) => parse_max_batch(&v).map_err(|e| eyre!(e))?,
        None => operators::MAX_BATCH,
    };
    let window = match env_opt::<String>("BATCH_WINDOW_MS")? {
        Some(v) => parse_batch_window_ms(&v).map_err(|e| eyre!(e))?,
        None => std::time::Duration::ZERO,
    };
    Ok((max, window))
}

/// A required path from the environment that must exist.
pub fn env_path(name: &str) -> Result<PathBuf> {
    let p: PathBuf = env_opt(name)?.ok_or_else(|| eyre!("env {name} is required"))?;
    if !p.exists() {
        bail!("env {name}={} does not exist", p.display());
    }
    Ok(p)
}

/// Opens the checkpoint named by env `CHECKPOINT`, warning about unknown config fields.
pub fn checkpoint_from_env() -> Result<Checkpoint> {
    let dir = env_path("CHECKPOINT")?;
    let ckpt =
        Checkpoint::open(&dir).wrap_err_with(|| format!("env CHECKPOINT={}", dir.display()))?;
    for f in &ckpt.unknown_config_fields {
        eprintln!(
            "warning: {}/config.json: unknown field `{f}` ignored",
            dir.display()
        );
    }
    Ok(ckpt)
}

/// The node's tracer (see [`trace`]): spans named after the stage, attributed to this node
/// and `backend`; off unless the environment asks for traces.
pub fn tracer(node: &dora_node_api::DoraNode, backend: &str) -> Result<trace::Tracer> {
    let id = node.id().to_string();
    trace::Tracer::from_env(&id, backend).wrap_err_with(|| format!("node `{id}`: tracing"))
}

/// Frame identity carried by every message: the camera's frame number and capture time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    pub seq: u64,
    pub t_capture_ns: u64,
    /// The span of the stage that sent the message (dora's `open_telemetry_context`), which
    /// parents the next stage's span; None when the sender does not trace.
    pub trace: Option<trace::TraceParent>,
}

/// An `Integer` metadata entry.
pub fn int_param(md: &MetadataParameters, key: &str) -> Option<i64> {
    match md.get(key) {
        Some(Parameter::Integer(v)) => Some(*v),
        _ => None,
    }
}

/// A `ListInt` metadata entry.
pub fn list_param(md: &MetadataParameters, key: &str) -> Option<Vec<i64>> {
    match md.get(key) {
        Some(Parameter::ListInt(v)) => Some(v.clone()),
        _ => None,
    }
}

/// A `String` metadata entry.
pub fn str_param<'a>(md: &'a MetadataParameters, key: &str) -> Option<&'a str> {
    match md.get(key) {
        Some(Parameter::String(v)) => Some(v.as_str()),
        _ => None,
    }
}

impl FrameMeta {
    pub fn from_metadata(input: &str, md: &MetadataParameters) -> Result<Self> {
        let get = |key: &str| {
            int_param(md, key)
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(|| {
                    eyre!("input `{input}`: metadata `{key}` (a non-negative integer) is missing")
                })
        };
        Ok(FrameMeta {
            seq: get("seq")?,
            t_capture_ns: get("t_capture_ns")?,
            trace: str_param(md, dora_node_api::OPEN_TELEMETRY_CONTEXT)
                .and_then(trace::TraceParent::from_metadata),
        })
    }

    /// Metadata of a message about this frame (no tensor fields).
    pub fn params(&self) -> MetadataParameters {
        let mut p = MetadataParameters::new();
        p.insert("seq".into(), Parameter::Integer(self.seq as i64));
        p.insert(
            "t_capture_ns".into(),
            Parameter::Integer(self.t_capture_ns as i64),
        );
        if let Some(t) = &self.trace {
            p.insert(
                dora_node_api::OPEN_TELEMETRY_CONTEXT.into(),
                Parameter::String(t.to_metadata()),
            );
        }
        p
    }

    /// The same frame, as sent by the stage whose span is `span` (unchanged when tracing is
    /// off, so the context passes through untraced stages).
    pub fn traced(self, span: Option<trace::TraceParent>) -> Self {
        FrameMeta {
            trace: span.or(self.trace),
            ..self
        }
    }

    /// Metadata of a tensor message about this frame.
    pub fn tensor_params(&self, shape: &[usize], dtype: &str) -> MetadataParameters {
        let mut p = self.params();
        p.insert(
            "shape".into(),
            Parameter::ListInt(shape.iter().map(|&d| d as i64).collect()),
        );
        p.insert("dtype".into(), Parameter::String(dtype.into()));
        p
    }
}

/// An expected dimension of an input tensor.
#[derive(Debug, Clone, Copy)]
pub enum Dim {
    Is(usize),
    Any,
}

impl Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Is(n) => write!(f, "{n}"),
            Dim::Any => write!(f, "_"),
        }
    }
}

fn fmt_dims(dims: &[Dim]) -> String {
    format!(
        "[{}]",
        dims.iter()
            .map(Dim::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A `shape` metadata list as dimensions (none negative).
pub(crate) fn shape_of(input: &str, dims: Vec<i64>) -> Result<Vec<usize>> {
    dims.into_iter()
        .map(|d| {
            usize::try_from(d)
                .map_err(|_| eyre!("input `{input}`: negative dimension {d} in `shape`"))
        })
        .collect()
}

/// Whether `shape` has the expected dimensions.
pub(crate) fn dims_match(shape: &[usize], expected: &[Dim]) -> bool {
    shape.len() == expected.len()
        && shape.iter().zip(expected).all(|(s, e)| match e {
            Dim::Is(n) => s == n,
            Dim::Any => true,
        })
}

/// Checks an input tensor against the expected dtype and shape (metadata and payload) and
/// borrows its values. Errors name the input, what was expected and what arrived.
pub fn expect_tensor<'a, T>(
    input: &str,
    md: &MetadataParameters,
    data: &'a DoraArray,
    dtype: &str,
    expected: &[Dim],
) -> Result<(Vec<usize>, &'a [T])>
where
    &'a [T]: TryFrom<&'a DoraArray>,
{
    let want = || format!("{dtype} {}", fmt_dims(expected));
    let found_dtype = str_param(md, "dtype").unwrap_or("(none)");
    if found_dtype != dtype {
        bail!(
            "input `{input}`: expected {}, found dtype {found_dtype}",
            want()
        );
    }
    let shape = shape_of(
        input,
        list_param(md, "shape").ok_or_else(|| {
            eyre!(
                "input `{input}`: metadata `shape` is missing (expected {})",
                want()
            )
        })?,
    )?;
    if !dims_match(&shape, expected) {
        bail!(
            "input `{input}`: expected {}, found shape {shape:?}",
            want()
        );
    }
    let values: &[T] = data.try_into().map_err(|_| {
        eyre!(
            "input `{input}`: expected {} values, found an array of {}",
            want(),
            data.type_name()
        )
    })?;
    let n: usize = shape.iter().product();
    if values.len() != n {
        bail!(
            "input `{input}`: shape {shape:?} needs {n} values, the array holds {}",
            values.len()
        );
    }
    Ok((shape, values))
}

/// Counts frames and gaps in the `seq` numbers arriving on one input.
#[derive(Debug, Default, Clone)]
pub struct SeqGaps {
    last: Option<u64>,
    /// Messages received.
    pub frames: u64,
    /// Frames missing between received ones (dropped upstream).
    pub gaps: u64,
}

impl SeqGaps {
    /// Records `seq`; returns how many frames were skipped before it (0 when in order).
    pub fn observe(&mut self, seq: u64) -> u64 {
        self.frames += 1;
        let skipped = match self.last {
            Some(last) if seq > last + 1 => seq - last - 1,
            _ => 0,
        };
        self.gaps += skipped;
        self.last = Some(self.last.map_or(seq, |l| l.max(seq)));
        skipped
    }
}

/// A `state` message: f32 [`dims`].
pub fn parse_state(md: &MetadataParameters, data: &DoraArray, dims: usize) -> Result<Vec<f32>> {
    let (_, s) = expect_tensor::<f32>("state", md, data, "float32", &[Dim::Is(dims)])?;
    Ok(s.to_vec())
}

/// The state of a joined frame: its `state` part when that input is wired. pi0 needs one
/// (`required`); pi0.5 runs without.
pub fn frame_state(frame: &join::Joined, dims: usize, required: bool) -> Result<Option<Vec<f32>>> {
    match frame.part("state") {
        Some(p) => parse_state(&p.metadata, &p.data, dims).map(Some),
        None if required => bail!(
            "frame {}: pi0 needs the robot state: wire the node's `state` input",
            frame.seq
        ),
        None => Ok(None),
    }
}

/// Wall-clock nanoseconds since the Unix epoch (the `t_capture_ns` clock).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Logs a rejected message and keeps the node alive: bad input never kills a dataflow.
pub fn report_rejected(node: &str, err: &eyre::Report) {
    eprintln!("{node}: rejected message: {err:#}");
}

/// The K/V cache as one tensor [layers, 2, len, kv_width] (K then V per layer).
pub fn kv_to_tensor(cache: &KvCache) -> (Vec<usize>, Vec<f32>) {
    let layers = cache.k.len();
    let mut data = Vec::with_capacity(layers * 2 * cache.len * cache.kv_width);
    for (k, v) in cache.k.iter().zip(&cache.v) {
        data.extend_from_slice(k);
        data.extend_from_slice(v);
    }
    (vec![layers, 2, cache.len, cache.kv_width], data)
}

/// Inverse of [`kv_to_tensor`].
pub fn kv_from_tensor(shape: &[usize], data: &[f32]) -> Result<KvCache> {
    let [layers, two, len, kv_width] = shape else {
        bail!("kv cache: expected shape [layers, 2, len, kv_width], found {shape:?}");
    };
    if *two != 2 || data.len() != layers * 2 * len * kv_width {
        bail!(
            "kv cache: shape {shape:?} does not match {} values",
            data.len()
        );
    }
    let per = len * kv_width;
    let mut cache = KvCache {
        len: *len,
        kv_width: *kv_width,
        k: Vec::with_capacity(*layers),
        v: Vec::with_capacity(*layers),
    };
    for layer in data.chunks_exact(2 * per) {
        cache.k.push(layer[..per].to_vec());
        cache.v.push(layer[per..].to_vec());
    }
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dora_node_api::IntoArrow;

    #[test]
    fn spin_us_takes_whole_microseconds_up_to_its_limit() {
        assert_eq!(parse_spin_us("0"), Ok(std::time::Duration::ZERO));
        assert_eq!(
            parse_spin_us(" 3000 "),
            Ok(std::time::Duration::from_micros(3000))
        );
        assert!(parse_spin_us("100000").is_ok());
        for bad in ["100001", "-1", "1.5", "", "fast"] {
            let e = parse_spin_us(bad).unwrap_err();
            assert!(
                e.contains("SPIN_US") && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
    }

    #[test]
    fn seq_gaps_count_missing_frames() {
        let mut g = SeqGaps::default();
        assert_eq!(g.observe(0), 0);
        assert_eq!(g.observe(1), 0);
        assert_eq!(g.observe(4), 2);
        assert_eq!(g.observe(5), 0);
        assert_eq!((g.frames, g.gaps), (4, 2));
    }

    #[test]
    fn tensor_checks_name_input_and_shapes() {
        let meta = FrameMeta {
            seq: 3,
            t_capture_ns: 9,
            trace: None,
        };
        let md = meta.tensor_params(&[2, 3], "float32");
        let arr = vec![0.0f32; 6].into_arrow();
        let (shape, v) =
            expect_tensor::<f32>("x", &md, &arr, "float32", &[Dim::Is(2), Dim::Any]).unwrap();
        assert_eq!((shape, v.len()), (vec![2, 3], 6));
        let err =
            expect_tensor::<f32>("x", &md, &arr, "float32", &[Dim::Is(4), Dim::Is(3)]).unwrap_err();
        assert!(
            err.to_string()
                .contains("input `x`: expected float32 [4, 3], found shape [2, 3]"),
            "{err}"
        );
        let err = expect_tensor::<u8>("x", &md, &arr, "uint8", &[Dim::Any, Dim::Any]).unwrap_err();
        assert!(err.to_string().contains("found dtype float32"), "{err}");
        let short = vec![0.0f32; 5].into_arrow();
        let err =
            expect_tensor::<f32>("x", &md, &short, "float32", &[Dim::Any, Dim::Any]).unwrap_err();
        assert!(err.to_string().contains("needs 6 values"), "{err}");
        assert_eq!(FrameMeta::from_metadata("x", &md).unwrap(), meta);
        let err = FrameMeta::from_metadata("x", &MetadataParameters::new()).unwrap_err();
        assert!(err.to_string().contains("`seq`"), "{err}");
    }

    #[test]
    fn kv_round_trip() {
        let cache = KvCache {
            len: 2,
            kv_width: 3,
            k: vec![vec![1.0; 6], vec![2.0; 6]],
            v: vec![vec![3.0; 6], vec![4.0; 6]],
        };
        let (shape, data) = kv_to_tensor(&cache);
        assert_eq!(shape, vec![2, 2, 2, 3]);
        let back = kv_from_tensor(&shape, &data).unwrap();
        assert_eq!((back.k, back.v), (cache.k, cache.v));
        assert!(kv_from_tensor(&[2, 3, 2, 3], &data).is_err());
    }
}

/// The backend of a model node from env `BACKEND` (`cpu`, the default, or `cuda`) and
/// `DTYPE` (`f32` on cpu, `bf16` by default on cuda).
pub fn backend_from_env() -> Result<(BackendKind, Precision)> {
    let kind: BackendKind = env_or("BACKEND", "cpu".to_string())?
        .parse()
        .wrap_err("env BACKEND")?;
    let precision: Precision = match env_opt::<String>("DTYPE")? {
        Some(d) => d.parse().wrap_err("env DTYPE")?,
        None if kind == BackendKind::Cuda => Precision::Bf16,
        None => Precision::F32,
    };
    Ok((kind, precision))
}

/// Image masks from a message's `image_masks` metadata (one 0/1 per camera).
pub fn image_masks(input: &str, md: &MetadataParameters, n: usize) -> Result<Vec<bool>> {
    let m = list_param(md, "image_masks")
        .ok_or_else(|| eyre!("input `{input}`: metadata `image_masks` is missing"))?;
    if m.len() != n {
        bail!(
            "input `{input}`: `image_masks` has {} entries, expected {n}",
            m.len()
        );
    }
    Ok(m.into_iter().map(|v| v != 0).collect())
}

/// The model inputs of an `images` message (u8 [num_images, image_size, image_size, 3] with
/// `image_masks`): the cameras' bytes (the backend maps them to [-1, 1]: on the GPU for
/// the CUDA backend) and the masks.
pub fn model_images(
    md: &MetadataParameters,
    data: &DoraArray,
    cfg: &operators::Config,
) -> Result<(operators::Pixels, Vec<bool>)> {
    let (n, s) = (cfg.num_images, cfg.image_size);
    let (_, px) = expect_tensor::<u8>(
        "images",
        md,
        data,
        "uint8",
        &[Dim::Is(n), Dim::Is(s), Dim::Is(s), Dim::Is(3)],
    )?;
    let masks = image_masks("images", md, n)?;
    // `expect_tensor` checked the shape: every camera is the model's size.
    Ok((operators::Pixels::Bytes(px.to_vec()), masks))
}

/// "batches: 40 of 1, 3 of 2" from the count of batches run of each size (index = size),
/// for a node's summary line; None when none ran.
pub fn batches_summary(sizes: &[u64]) -> Option<String> {
    let sizes: Vec<String> = sizes
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(size, n)| format!("{n} of {size}"))
        .collect();
    (!sizes.is_empty()).then(|| format!("batches: {}", sizes.join(", ")))
}

/// `image_masks` metadata for a message.
pub fn masks_param(masks: &[bool]) -> Parameter {
    Parameter::ListInt(masks.iter().map(|&m| m as i64).collect())
}

/// Helpers for the nodes' integration tests through dora's testing API (inputs in, outputs
/// captured, no daemon).
pub mod testing {
    use dora_node_api::integration_testing::integration_testing_format::{
        IncomingEvent, InputData, TimedIncomingEvent,
    };
    use dora_node_api::integration_testing::{
        self, IntegrationTestInput, TestingInput, TestingOptions, TestingOutput,
    };
    use dora_node_api::serde_json::{self, Map, Value};
    use dora_node_api::{DoraNode, EventStream, MetadataParameters, Parameter};

    use super::FrameMeta;

    /// A tensor message for an input.
    pub struct TensorInput<'a> {
        pub id: &'a str,
        pub seq: u64,
        pub shape: &'a [usize],
        /// The `dtype` metadata, e.g. "float32".
        pub dtype: &'a str,
        /// The Arrow type of the payload, e.g. "Float32", "UInt8".
        pub arrow_type: &'a str,
        pub values: Value,
        pub extra: Vec<(&'a str, Parameter)>,
    }

    /// The input event at `t` seconds.
    pub fn event(t: f64, input: TensorInput) -> TimedIncomingEvent {
        let mut md: MetadataParameters = FrameMeta {
            seq: input.seq,
            t_capture_ns: 1,
            trace: None,
        }
        .tensor_params(input.shape, input.dtype);
        for (k, v) in input.extra {
            md.insert(k.to_string(), v);
        }
        TimedIncomingEvent {
            time_offset_secs: t,
            event: IncomingEvent::Input {
                id: input.id.to_string().into(),
                metadata: Some(md),
                data: Some(Box::new(InputData::JsonObject {
                    data: input.values,
                    data_type: Some(Value::String(input.arrow_type.to_string())),
                })),
            },
        }
    }

    /// Runs `body` as node `name` on `events`; returns the outputs it sent (`id`, `data`).
    pub fn run_node(
        name: &str,
        events: Vec<TimedIncomingEvent>,
        body: impl FnOnce(DoraNode, EventStream) -> eyre::Result<()>,
    ) -> eyre::Result<Vec<Map<String, Value>>> {
        let (tx, mut rx) = integration_testing::output_channel();
        let input = TestingInput::Input(IntegrationTestInput::new(name.parse()?, events));
        let (node, stream) = DoraNode::init_testing(
            input,
            TestingOutput::ToChannel(tx),
            TestingOptions {
                skip_output_time_offsets: true,
            },
        )?;
        body(node, stream)?;
        Ok(integration_testing::drain_outputs(&mut rx))
    }

    /// An output's `data` as f64 values.
    pub fn values(out: &Map<String, Value>) -> Vec<f64> {
        out.get("data")
            .and_then(|d| d.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
            .unwrap_or_default()
    }

    /// `values` as JSON.
    pub fn json<T: serde::Serialize>(values: &[T]) -> Value {
        serde_json::to_value(values).unwrap_or(Value::Null)
    }

    /// A committed golden case directory (tests/golden/CASE).
    pub fn golden(case: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/golden")
            .join(case)
    }
}

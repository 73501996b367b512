//! Per-stage tracing: one OpenTelemetry span per stage per frame, parented across nodes
//! through dora's `open_telemetry_context` metadata (W3C traceparent), exported over OTLP
//! (gRPC) or to a JSON-lines file, or off at no cost.
//!
//! Every span carries the attributes `turbopi.seq`, `turbopi.node`, `turbopi.backend`,
//! `turbopi.cpu_ms` and, for GPU stages, `turbopi.gpu_ms` (CUDA events). A frame a stage
//! rejected has a span of that stage with status error and `turbopi.rejected` (the reason).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use operators::StageTimes;
use serde::{Deserialize, Serialize};

/// Attribute keys of a stage span.
pub const ATTR_SEQ: &str = "turbopi.seq";
pub const ATTR_NODE: &str = "turbopi.node";
pub const ATTR_BACKEND: &str = "turbopi.backend";
pub const ATTR_CPU_MS: &str = "turbopi.cpu_ms";
pub const ATTR_GPU_MS: &str = "turbopi.gpu_ms";
pub const ATTR_REJECTED: &str = "turbopi.rejected";

/// The pipeline's stages in order, as span names (a report lists them in this order).
pub const STAGES: [&str; 7] = [
    "camera",
    "decode",
    "vision",
    "prefix",
    "denoise",
    "postprocess",
    "sink",
];

/// Where spans go, from the standard variables or the CLI's switches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// OTLP/gRPC endpoint, e.g. `http://localhost:4317`.
    pub otlp: Option<String>,
    /// JSON-lines file (appended to; several processes may share it).
    pub file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(
        "{var}={value}: only OTLP over gRPC is supported (set it to `grpc` or leave it unset)"
    )]
    Protocol { var: &'static str, value: String },
    #[error("trace file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("OTLP exporter for {endpoint}: {message}")]
    Otlp { endpoint: String, message: String },
}

fn non_empty_env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

impl TraceConfig {
    /// `DORA_OTLP_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`: OTLP; otherwise
    /// `TRACE_FILE`: a JSON-lines file; otherwise off.
    pub fn from_env() -> Result<Self, TraceError> {
        let otlp = non_empty_env("DORA_OTLP_ENDPOINT")
            .or_else(|| non_empty_env("OTEL_EXPORTER_OTLP_ENDPOINT"));
        if otlp.is_some() {
            for var in [
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ] {
                if let Some(value) = non_empty_env(var) {
                    if value.trim() != "grpc" {
                        return Err(TraceError::Protocol { var, value });
                    }
                }
            }
        }
        Ok(TraceConfig {
            otlp,
            file: non_empty_env("TRACE_FILE").map(PathBuf::from),
        })
    }

    pub fn is_off(&self) -> bool {
        self.otlp.is_none() && self.file.is_none()
    }
}

/// A span's identity as carried in a message: enough to parent the next stage's span.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({})", self.traceparent())
    }
}

impl TraceParent {
    /// The W3C `traceparent` header value: `00-<trace id>-<span id>-<flags>`.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            u8::from(self.sampled)
        )
    }

    /// The value of dora's `open_telemetry_context` metadata entry (dora's own format:
    /// `key:value;` pairs, here only `traceparent`).
    pub fn to_metadata(&self) -> String {
        format!("traceparent:{};", self.traceparent())
    }

    /// Reads dora's `open_telemetry_context` (`traceparent:...;tracestate:...;`) or a bare
    /// traceparent. None when it holds no valid traceparent (an empty or foreign value is not
    /// an error: the span then starts a new trace).
    pub fn from_metadata(value: &str) -> Option<Self> {
        let tp = value
            .split(';')
            .filter_map(|entry| entry.split_once(':'))
            .find(|(k, _)| k.trim() == "traceparent")
            .map(|(_, v)| v.trim())
            .unwrap_or(value.trim());
        let mut parts = tp.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        Some(TraceParent {
            trace_id: trace_id.to_bytes(),
            span_id: span_id.to_bytes(),
            sampled: flags & 1 == 1,
        })
    }

    fn context(&self) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            if self.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        ))
    }

    fn of(sc: &SpanContext) -> Option<Self> {
        sc.is_valid().then(|| TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            sampled: sc.is_sampled(),
        })
    }
}

/// One span as the JSON-lines file holds it (one object per line); `turbopi trace` reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanRecord {
    /// The stage (see [`STAGES`]).
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// The previous stage's span, absent for the first stage of a frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// The dora node (or `turbopi` for the CLI) that ran the stage.
    pub node: String,
    pub seq: u64,
    pub backend: String,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// Host wall time of the stage.
    pub cpu_ms: f64,
    /// Device time of the stage (CUDA events), GPU stages only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_ms: Option<f64>,
    /// Why the stage rejected the frame (its span then carries no latency worth reporting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl SpanRecord {
    fn from_span(span: &SpanData) -> Self {
        let attr = |key: &str| span.attributes.iter().find(|kv| kv.key.as_str() == key);
        let text = |key: &str| attr(key).map(|kv| kv.value.as_str().into_owned());
        let float = |key: &str| {
            attr(key).and_then(|kv| match kv.value {
                Value::F64(v) => Some(v),
                Value::I64(v) => Some(v as f64),
                _ => None,
            })
        };
        let parent = span.parent_span_id;
        SpanRecord {
            name: span.name.to_string(),
            trace_id: span.span_context.trace_id().to_string(),
            span_id: span.span_context.span_id().to_string(),
            parent_span_id: (parent != SpanId::INVALID).then(|| parent.to_string()),
            node: text(ATTR_NODE).unwrap_or_default(),
            seq: attr(ATTR_SEQ)
                .and_then(|kv| match kv.value {
                    Value::I64(v) => u64::try_from(v).ok(),
                    _ => None,
                })
                .unwrap_or(0),
            backend: text(ATTR_BACKEND).unwrap_or_default(),
            start_unix_ns: unix_ns(span.start_time),
            end_unix_ns: unix_ns(span.end_time),
            cpu_ms: float(ATTR_CPU_MS).unwrap_or(0.0),
            gpu_ms: float(ATTR_GPU_MS),
            rejected: text(ATTR_REJECTED),
        }
    }

    pub fn duration_ms(&self) -> f64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns) as f64 / 1e6
    }
}

/// Reads a JSON-lines trace file; an error names the file and line.
pub fn read_records(path: &Path) -> Result<Vec<SpanRecord>, String> {
    let text = operators::fsio::read_string_limited(
        path,
        operators::fsio::limit::TRACE_JSONL,
        "trace file",
    )
    .map_err(|e| e.to_string())?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| format!("{}:{}: not a span record: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Appends one JSON line per span; each line is one `write` on an append-mode file, so the
/// nodes of a graph can share the file.
#[derive(Debug)]
struct JsonLines {
    file: Mutex<File>,
}

impl SpanExporter for JsonLines {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let mut text = String::new();
        for span in &batch {
            if let Ok(line) = serde_json::to_string(&SpanRecord::from_span(span)) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        let result = match self.file.lock() {
            Ok(mut f) => f
                .write_all(text.as_bytes())
                .map_err(|e| OTelSdkError::InternalFailure(format!("writing the trace file: {e}"))),
            Err(_) => Err(OTelSdkError::InternalFailure(
                "trace file lock poisoned".into(),
            )),
        };
        std::future::ready(result)
    }
}

/// Runs the OTLP exporter's calls on a runtime of its own (tonic needs one; nodes have none).
#[derive(Debug)]
struct OnRuntime<E> {
    rt: tokio::runtime::Runtime,
    inner: E,
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        std::future::ready(self.rt.block_on(self.inner.export(batch)))
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _guard = self.rt.enter();
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&self) -> OTelSdkResult {
        let _guard = self.rt.enter();
        self.inner.force_flush()
    }
    // The provider hands its resource (service.name) to its exporter through this call;
    // not passed on, the OTLP exporter sends every span with an empty resource.
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Spans leave the stage's thread through a queue and are written or sent by a thread of
/// their own every 250 ms (and at shutdown), so a stage pays for building its span only.
fn batched<E: SpanExporter + 'static>(exporter: E) -> BatchSpanProcessor {
    BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(250))
                .build(),
        )
        .build()
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    node: String,
    backend: String,
}

/// A node's (or the CLI's) source of stage spans. Off, every call is a no-op.
pub struct Tracer {
    inner: Option<Inner>,
}

impl Tracer {
    pub fn off() -> Self {
        Tracer { inner: None }
    }

    /// From the environment ([`TraceConfig::from_env`]); `node` names the service and the
    /// spans' `turbopi.node`, `backend` their `turbopi.backend`.
    pub fn from_env(node: &str, backend: &str) -> Result<Self, TraceError> {
        Self::new(node, backend, &TraceConfig::from_env()?)
    }

    pub fn new(node: &str, backend: &str, cfg: &TraceConfig) -> Result<Self, TraceError> {
        let resource = Resource::builder()
            .with_service_name(node.to_string())
            .build();
        let builder = SdkTracerProvider::builder().with_resource(resource);
        let provider = if let Some(endpoint) = &cfg.otlp {
            let otlp_err = |message: String| TraceError::Otlp {
                endpoint: endpoint.clone(),
                message,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-export")
                .enable_all()
                .build()
                .map_err(|e| otlp_err(format!("starting its runtime: {e}")))?;
            let inner = {
                let _guard = rt.enter();
                use opentelemetry_otlp::WithExportConfig;
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| otlp_err(e.to_string()))?
            };
            builder
                .with_span_processor(batched(OnRuntime { rt, inner }))
                .build()
        } else if let Some(path) = &cfg.file {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| TraceError::File {
                    path: path.clone(),
                    source,
                })?;
            builder
                .with_span_processor(batched(JsonLines {
                    file: Mutex::new(file),
                }))
                .build()
        } else {
            return Ok(Self::off());
        };
        let tracer = provider.tracer("turbopi");
        Ok(Tracer {
            inner: Some(Inner {
                provider,
                tracer,
                node: node.to_string(),
                backend: backend.to_string(),
            }),
        })
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The backend named in later spans (known only once the node has loaded its stage).
    pub fn set_backend(&mut self, backend: &str) {
        if let Some(inner) = &mut self.inner {
            inner.backend = backend.to_string();
        }
    }

    /// Starts the span of `stage` for frame `seq` now, child of `parent` (a new trace when
    /// None).
    pub fn start(&self, stage: &'static str, seq: u64, parent: Option<TraceParent>) -> StageSpan {
        let Some(inner) = &self.inner else {
            return StageSpan::inert();
        };
        let cx = parent.map(|p| p.context()).unwrap_or_default();
        let span = inner
            .tracer
            .span_builder(stage)
            .with_start_time(SystemTime::now())
            .with_attributes(inner.attributes(seq))
            .start_with_context(&inner.tracer, &cx);
        StageSpan {
            span: Some(span),
            started: Instant::now(),
            gpu: None,
        }
    }

    /// Records a stage that already ran from `start` for `cpu` (host wall time), e.g. a
    /// stage inside a fused node; returns its identity to parent the next stage.
    pub fn record(
        &self,
        stage: &'static str,
        seq: u64,
        parent: Option<TraceParent>,
        start: SystemTime,
        cpu: Duration,
        gpu: Option<Duration>,
    ) -> Option<TraceParent> {
        let inner = self.inner.as_ref()?;
        let cx = parent.map(|p| p.context()).unwrap_or_default();
        let mut attrs = inner.attributes(seq);
        attrs.push(KeyValue::new(ATTR_CPU_MS, cpu.as_secs_f64() * 1e3));
        if let Some(gpu) = gpu {
            attrs.push(KeyValue::new(ATTR_GPU_MS, gpu.as_secs_f64() * 1e3));
        }
        let mut span = inner
            .tracer
            .span_builder(stage)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(&inner.tracer, &cx);
        let id = TraceParent::of(span.span_context());
        span.end_with_timestamp(start + cpu);
        id
    }

    /// Records that `stage` rejected frame `seq` for `reason`: a span of that stage, now, of
    /// no duration, with status error and the reason as `turbopi.rejected`.
    pub fn record_rejected(
        &self,
        stage: &'static str,
        seq: u64,
        parent: Option<TraceParent>,
        reason: &str,
    ) {
        let Some(inner) = &self.inner else {
            return;
        };
        let cx = parent.map(|p| p.context()).unwrap_or_default();
        let mut attrs = inner.attributes(seq);
        attrs.push(KeyValue::new(ATTR_CPU_MS, 0.0));
        attrs.push(KeyValue::new(ATTR_REJECTED, reason.to_string()));
        let now = SystemTime::now();
        let mut span = inner
            .tracer
            .span_builder(stage)
            .with_start_time(now)
            .with_attributes(attrs)
            .start_with_context(&inner.tracer, &cx);
        span.set_status(opentelemetry::trace::Status::error(reason.to_string()));
        span.end_with_timestamp(now);
    }

    /// Records a whole inference's vision, prefix and denoise spans from the backend's stage
    /// times, back to back with the last ending at `done` (the backend measures durations:
    /// host wall times on the CPU, CUDA events on the GPU, which are then also `gpu_ms`).
    /// Returns the denoise span, to parent the next stage (or `parent` when off).
    pub fn record_stages(
        &self,
        seq: u64,
        parent: Option<TraceParent>,
        times: &StageTimes,
        done: SystemTime,
        gpu: bool,
    ) -> Option<TraceParent> {
        let mut parent = parent;
        let mut start = done
            .checked_sub(times.vision + times.prefix + times.denoise)
            .unwrap_or(done);
        for (stage, t) in [
            ("vision", times.vision),
            ("prefix", times.prefix),
            ("denoise", times.denoise),
        ] {
            parent = self
                .record(stage, seq, parent, start, t, gpu.then_some(t))
                .or(parent);
            start += t;
        }
        parent
    }

    /// Sends every finished span on (also done when the tracer is dropped).
    pub fn flush(&self) {
        if let Some(inner) = &self.inner {
            if let Err(e) = inner.provider.force_flush() {
                eprintln!("warning: flushing trace spans: {e}");
            }
        }
    }
}

impl Inner {
    fn attributes(&self, seq: u64) -> Vec<KeyValue> {
        vec![
            KeyValue::new(ATTR_SEQ, i64::try_from(seq).unwrap_or(i64::MAX)),
            KeyValue::new(ATTR_NODE, self.node.clone()),
            KeyValue::new(ATTR_BACKEND, self.backend.clone()),
        ]
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(inner) = &self.inner {
            if let Err(e) = inner.provider.shutdown() {
                eprintln!("warning: exporting the last trace spans: {e}");
            }
        }
    }
}

/// The span of one stage of one frame, ended by [`StageSpan::end`] (or when dropped).
pub struct StageSpan {
    span: Option<opentelemetry_sdk::trace::Span>,
    started: Instant,
    gpu: Option<Duration>,
}

impl StageSpan {
    fn inert() -> Self {
        StageSpan {
            span: None,
            started: Instant::now(),
            gpu: None,
        }
    }

    /// Identity of this span, for the metadata of the messages this stage sends (None when
    /// tracing is off).
    pub fn id(&self) -> Option<TraceParent> {
        self.span
            .as_ref()
            .and_then(|s| TraceParent::of(s.span_context()))
    }

    /// The stage's device time (CUDA events).
    pub fn set_gpu(&mut self, gpu: Duration) {
        self.gpu = Some(gpu);
    }

    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(mut span) = self.span.take() {
            span.set_attribute(KeyValue::new(
                ATTR_CPU_MS,
                self.started.elapsed().as_secs_f64() * 1e3,
            ));
            if let Some(gpu) = self.gpu {
                span.set_attribute(KeyValue::new(ATTR_GPU_MS, gpu.as_secs_f64() * 1e3));
            }
            span.end();
        }
    }
}

impl Drop for StageSpan {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_through_dora_metadata() {
        let tp = TraceParent {
            trace_id: [0x4b; 16],
            span_id: [0x0f; 8],
            sampled: true,
        };
        let md = tp.to_metadata();
        assert_eq!(
            md,
            "traceparent:00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0f0f0f0f0f0f0f0f-01;"
        );
        assert_eq!(TraceParent::from_metadata(&md), Some(tp));
        // A bare header value and dora's map with a tracestate entry read the same.
        assert_eq!(TraceParent::from_metadata(&tp.traceparent()), Some(tp));
        let with_state = format!("tracestate:k=v:1;{md}");
        assert_eq!(TraceParent::from_metadata(&with_state), Some(tp));
    }

    #[test]
    fn invalid_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "traceparent:;",
            "00-00000000000000000000000000000000-0f0f0f0f0f0f0f0f-01",
            "00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0000000000000000-01",
            "00-4b4b-0f0f0f0f0f0f0f0f-01",
            "00-zz4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0f0f0f0f0f0f0f0f-01",
        ] {
            assert_eq!(TraceParent::from_metadata(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_file_tracer_writes_parented_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        let cfg = TraceConfig {
            otlp: None,
            file: Some(path.clone()),
        };
        {
            let tracer = Tracer::new("vision", "cpu f32", &cfg).unwrap();
            let first = tracer.start("camera", 7, None);
            let camera = first.id().unwrap();
            first.end();
            let mut span = tracer.start("vision", 7, Some(camera));
            span.set_gpu(Duration::from_micros(1500));
            let vision = span.id().unwrap();
            span.end();
            let start = SystemTime::now();
            let prefix = tracer
                .record(
                    "prefix",
                    7,
                    Some(vision),
                    start,
                    Duration::from_millis(3),
                    None,
                )
                .unwrap();
            assert_eq!(prefix.trace_id, camera.trace_id);
        }
        let recs = read_records(&path).unwrap();
        assert_eq!(recs.len(), 3);
        let (cam, vis, pre) = (&recs[0], &recs[1], &recs[2]);
        assert_eq!(cam.name, "camera");
        assert_eq!(cam.parent_span_id, None);
        assert_eq!(vis.parent_span_id.as_deref(), Some(cam.span_id.as_str()));
        assert_eq!(pre.parent_span_id.as_deref(), Some(vis.span_id.as_str()));
        assert!(recs
            .iter()
            .all(|r| r.trace_id == cam.trace_id && r.seq == 7));
        assert_eq!(vis.node, "vision");
        assert_eq!(vis.backend, "cpu f32");
        assert_eq!(vis.gpu_ms, Some(1.5));
        assert_eq!(cam.gpu_ms, None);
        assert!(
            (pre.duration_ms() - 3.0).abs() < 1e-3,
            "{}",
            pre.duration_ms()
        );
        assert!((pre.cpu_ms - 3.0).abs() < 1e-9);
    }

    #[test]
    fn off_costs_nothing_and_gives_no_ids() {
        let tracer = Tracer::off();
        let span = tracer.start("camera", 0, None);
        assert!(span.id().is_none());
        assert!(tracer
            .record("vision", 0, None, SystemTime::now(), Duration::ZERO, None)
            .is_none());
    }

    #[test]
    fn a_bad_trace_file_names_the_path() {
        let cfg = TraceConfig {
            otlp: None,
            file: Some(PathBuf::from("/nonexistent-dir/trace.jsonl")),
        };
        let err = Tracer::new("camera", "cpu", &cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent-dir/trace.jsonl"), "{err}");
    }

    #[test]
    fn a_corrupt_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, "{\"name\": 1}\n").unwrap();
        let err = read_records(&path).unwrap_err();
        assert!(err.contains("t.jsonl:1"), "{err}");
    }
}

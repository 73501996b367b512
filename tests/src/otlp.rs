//! An OTLP/gRPC receiver on loopback that keeps every span sent to it, so a test can check
//! what a process or a whole dataflow traced. It answers the metrics service too (and drops
//! what it gets), so an exporter of metrics pointed at it sees no errors.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as ProtoValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// An attribute's value as received.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    String(String),
    Bool(bool),
    Int(i64),
    Double(f64),
    /// Arrays, maps and bytes, in their debug form (no test here reads them).
    Other(String),
}

impl AttrValue {
    fn of(value: Option<&AnyValue>) -> Self {
        match value.and_then(|v| v.value.as_ref()) {
            Some(ProtoValue::StringValue(s)) => AttrValue::String(s.clone()),
            Some(ProtoValue::BoolValue(b)) => AttrValue::Bool(*b),
            Some(ProtoValue::IntValue(i)) => AttrValue::Int(*i),
            Some(ProtoValue::DoubleValue(d)) => AttrValue::Double(*d),
            other => AttrValue::Other(format!("{other:?}")),
        }
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::String(s) => write!(f, "{s:?}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Double(d) => write!(f, "{d}"),
            AttrValue::Other(o) => write!(f, "{o}"),
        }
    }
}

/// One received span, flattened out of its resource and scope.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; None for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: BTreeMap<String, AttrValue>,
    /// The resource's `service.name`.
    pub service_name: Option<String>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.get(key)
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn double(&self, key: &str) -> Option<f64> {
        match self.attr(key)? {
            AttrValue::Double(d) => Some(*d),
            _ => None,
        }
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.attr(key)? {
            AttrValue::String(s) => Some(s),
            _ => None,
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} trace {} span {} parent {} service {} [{} .. {}]",
            self.name,
            self.trace_id,
            self.span_id,
            self.parent_span_id.as_deref().unwrap_or("-"),
            self.service_name.as_deref().unwrap_or("-"),
            self.start_unix_ns,
            self.end_unix_ns,
        )?;
        for (k, v) in &self.attributes {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// The spans one per line, for failure messages.
pub fn listing(spans: &[Span]) -> String {
    if spans.is_empty() {
        return "(no spans)".into();
    }
    spans.iter().map(|s| format!("  {s}\n")).collect::<String>()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<Span> {
    let mut spans = Vec::new();
    for rs in request.resource_spans {
        let service_name = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match AttrValue::of(kv.value.as_ref()) {
                AttrValue::String(s) => Some(s),
                _ => None,
            });
        for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
            spans.push(Span {
                trace_id: hex(&s.trace_id),
                span_id: hex(&s.span_id),
                // OTLP leaves a root's parent empty; some exporters send eight zero bytes.
                parent_span_id: (!s.parent_span_id.iter().all(|b| *b == 0))
                    .then(|| hex(&s.parent_span_id)),
                name: s.name,
                start_unix_ns: s.start_time_unix_nano,
                end_unix_ns: s.end_time_unix_nano,
                attributes: attributes(&s.attributes),
                service_name: service_name.clone(),
            });
        }
    }
    spans
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, AttrValue> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), AttrValue::of(kv.value.as_ref())))
        .collect()
}

type Store = Arc<Mutex<Vec<Span>>>;

fn lock(store: &Store) -> MutexGuard<'_, Vec<Span>> {
    // A panic while holding the lock leaves only whole spans behind: keep reading them.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

struct Traces(Store);

#[tonic::async_trait]
impl TraceService for Traces {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = flatten(request.into_inner());
        lock(&self.0).extend(spans);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

struct Metrics;

#[tonic::async_trait]
impl MetricsService for Metrics {
    async fn export(
        &self,
        _request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; stops (and closes its port) when dropped.
pub struct Receiver {
    addr: SocketAddr,
    spans: Store,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// How long a stopping receiver waits for its clients to hang up.
const GRACE: Duration = Duration::from_secs(2);

impl Receiver {
    /// Binds 127.0.0.1 on a free port and serves on a runtime thread of its own.
    pub fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let spans = Store::default();
        let (stop, mut stopped) = watch::channel(false);
        let traces = TraceServiceServer::new(Traces(spans.clone()));
        let thread = std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| format!("listening on {addr}: {e}"))?;
                    let mut grace = stopped.clone();
                    let serve = tonic::transport::Server::builder()
                        .add_service(traces)
                        .add_service(MetricsServiceServer::new(Metrics))
                        .serve_with_incoming_shutdown(
                            tonic::transport::server::TcpIncoming::from(listener),
                            async move {
                                let _ = stopped.wait_for(|s| *s).await;
                            },
                        );
                    // A client that never hangs up must not hold a stopping test forever.
                    let deadline = async move {
                        let _ = grace.wait_for(|s| *s).await;
                        tokio::time::sleep(GRACE).await;
                    };
                    tokio::select! {
                        served = serve => served.map_err(|e| format!("serving on {addr}: {e}")),
                        () = deadline => Ok(()),
                    }
                })
            })?;
        Ok(Receiver {
            addr,
            spans,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT` or an exporter's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<Span> {
        lock(&self.spans).clone()
    }

    /// The spans once at least `n` have arrived, or all there are after `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Span> {
        let until = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n || Instant::now() >= until {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("OTLP receiver: {e}"),
                Err(_) => eprintln!("OTLP receiver: its thread panicked"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as ProtoSpan};

    fn kv(key: &str, value: ProtoValue) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    /// The wire side with tonic's own client, independently of any SDK exporter.
    #[test]
    fn flattens_what_a_client_exports() {
        let receiver = Receiver::start().unwrap();
        let endpoint = receiver.endpoint();
        let span = |id: u8, parent: Vec<u8>, name: &str| ProtoSpan {
            trace_id: vec![0xab; 16],
            span_id: vec![id; 8],
            parent_span_id: parent,
            name: name.into(),
            start_time_unix_nano: 10 * u64::from(id),
            end_time_unix_nano: 10 * u64::from(id) + 5,
            attributes: vec![
                kv("turbopi.seq", ProtoValue::IntValue(3)),
                kv("turbopi.cpu_ms", ProtoValue::DoubleValue(1.25)),
                kv("turbopi.node", ProtoValue::StringValue(name.into())),
            ],
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", ProtoValue::StringValue("cam".into()))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        span(1, vec![], "camera"),
                        span(2, vec![1; 8], "decode"),
                        span(3, vec![0; 8], "zero-parent"),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut client = TraceServiceClient::connect(endpoint).await.unwrap();
            client.export(request).await.unwrap();
        });
        let spans = receiver.spans();
        assert_eq!(spans.len(), 3, "{}", listing(&spans));
        let (camera, decode, zero) = (&spans[0], &spans[1], &spans[2]);
        assert_eq!(camera.trace_id, "ab".repeat(16));
        assert_eq!(camera.span_id, "0101010101010101");
        assert_eq!(camera.parent_span_id, None);
        assert_eq!(decode.parent_span_id.as_deref(), Some("0101010101010101"));
        assert_eq!(zero.parent_span_id, None);
        assert_eq!((decode.start_unix_ns, decode.end_unix_ns), (20, 25));
        assert_eq!(decode.int("turbopi.seq"), Some(3));
        assert_eq!(decode.double("turbopi.cpu_ms"), Some(1.25));
        assert_eq!(decode.str("turbopi.node"), Some("decode"));
        assert_eq!(decode.str("turbopi.seq"), None, "an int is not a string");
        assert_eq!(decode.service_name.as_deref(), Some("cam"));
    }

    #[test]
    fn stops_and_frees_its_port_on_drop() {
        let receiver = Receiver::start().unwrap();
        let addr = receiver.addr;
        assert!(std::net::TcpStream::connect(addr).is_ok());
        let t = Instant::now();
        drop(receiver);
        assert!(
            t.elapsed() < GRACE + Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{addr} still accepts connections"
        );
    }
}

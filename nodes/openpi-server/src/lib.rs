//! openpi's websocket policy server as a dora node. Clients of openpi's `serve_policy.py`
//! (openpi-client's `WebsocketClientPolicy`: the LIBERO, DROID and ALOHA runtimes) connect
//! unchanged: on connect they get the metadata message, then send one msgpack observation at
//! a time and get one action dict back. Each observation goes through openpi's input
//! transforms ([`operators::openpi`]) into the dataflow as a frame with a fresh `seq`
//! (`images`, `state`, `tokens`); when the dataflow's `actions` for that `seq` come back they
//! go through the output transforms to the client. Any number of clients share the dataflow.
//!
//! A request that fails (malformed msgpack, a bad observation, an oversized message, a frame
//! the dataflow never answers) gets a text frame naming the problem and the connection is
//! closed with code 1011, as openpi's server does; other connections are not affected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, Event, EventStream, Parameter};
use eyre::{bail, eyre, Result, WrapErr};
use futures_util::{Sink, SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use node_common::prompt::tokens_params;
use node_common::reject::{parse_rejection, REJECTED};
use node_common::{env_flag, env_opt, env_or, expect_tensor, masks_param, now_ns, Dim, FrameMeta};
use operators::openpi::assets::{locate, openpi_cache_dir_from_env, AssetSearch};
use operators::openpi::msgpack::{decode, Limits, Out};
use operators::openpi::{parse_delta_mask, FrameContext, Robot, Settings, Transforms};
use operators::Config;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

mod in_process;
pub use in_process::{InProcess, PolicyPlace};

/// Close code of a failed request (openpi's server: `CloseCode.INTERNAL_ERROR`).
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;

/// Frames in the dataflow at once; further requests wait for one to finish. Below the
/// frames a node holds while their parts are joined ([`node_common::join::FrameJoin::CAPACITY`]),
/// so no frame is given up on for want of room.
pub const MAX_IN_FLIGHT: usize = 32;

/// What the server needs besides the transforms.
pub struct ServerSettings {
    pub addr: SocketAddr,
    /// The message sent on connect (openpi's `policy_metadata`).
    pub metadata: Out,
    /// Largest observation message accepted, in bytes.
    pub max_message_bytes: usize,
    /// How long a request waits for its actions.
    pub request_timeout: Duration,
    pub limits: Limits,
}

/// Env (see README.md): `CHECKPOINT`, `ROBOT`, `ASSETS`, `ASSET_ID`, `NORM_STATS`,
/// `TOKENIZER`, `DISCRETE_STATE`, `DELTA_ACTIONS`, `ADAPT_TO_PI`, `DEFAULT_PROMPT`,
/// `METADATA`, `HOST`, `PORT`, `MAX_MESSAGE_MB`, `REQUEST_TIMEOUT_S`.
pub fn settings_from_env() -> Result<(Transforms, ServerSettings, Config)> {
    let ckpt: PathBuf = node_common::env_path("CHECKPOINT")?;
    let (cfg, _) = Config::from_json_file(&ckpt.join("config.json"))
        .wrap_err_with(|| format!("env CHECKPOINT={}", ckpt.display()))?;
    let robot: Robot = env_opt::<String>("ROBOT")?
        .ok_or_else(|| eyre!("env ROBOT is required: libero, droid or aloha"))?
        .parse()
        .map_err(|e| eyre!("env ROBOT: {e}"))?;
    let mut s = Settings::new(robot, &cfg);
    let tokenizer: Option<String> = env_opt("TOKENIZER")?;
    let norm_stats: Option<String> = env_opt("NORM_STATS")?;
    let assets: Option<PathBuf> = env_opt("ASSETS")?;
    let asset_id: Option<String> = env_opt("ASSET_ID")?;
    let found = locate(&AssetSearch {
        checkpoint: &ckpt,
        robot,
        tokenizer: tokenizer.as_deref(),
        norm_stats: norm_stats.as_deref(),
        assets: assets.as_deref(),
        asset_id: asset_id.as_deref(),
        cache_dir: openpi_cache_dir_from_env(),
    })?;
    s.norm_stats = found.norm_stats;
    s.tokenizer = found.tokenizer;
    if s.tokenizer.is_none() {
        eprintln!("openpi-server: TOKENIZER=none: only pre-tokenized prompts are accepted");
    }
    s.discrete_state = env_flag("DISCRETE_STATE", s.discrete_state)?;
    if let Some(m) = env_opt::<String>("DELTA_ACTIONS")? {
        s.delta_mask = parse_delta_mask(&m).map_err(|e| eyre!("env DELTA_ACTIONS: {e}"))?;
    }
    s.adapt_to_pi = env_flag("ADAPT_TO_PI", true)?;
    s.default_prompt = env_opt("DEFAULT_PROMPT")?;
    let metadata = match env_opt::<String>("METADATA")? {
        Some(j) => {
            let v: serde_json::Value =
                serde_json::from_str(&j).map_err(|e| eyre!("env METADATA is not JSON: {e}"))?;
            if !v.is_object() {
                bail!("env METADATA must be a JSON object, e.g. {{\"reset_pose\": [0, 0]}}");
            }
            v
        }
        None => robot.default_metadata(),
    };
    let host: String = env_or("HOST", "0.0.0.0".to_string())?;
    let port: u16 = env_or("PORT", 8000)?;
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| eyre!("env HOST={host:?} / PORT={port}: not an address: {e}"))?;
    let mb: usize = env_or("MAX_MESSAGE_MB", 16)?;
    if mb == 0 {
        bail!("env MAX_MESSAGE_MB must be at least 1");
    }
    let timeout: f64 = env_or("REQUEST_TIMEOUT_S", 60.0)?;
    if !(timeout.is_finite() && timeout > 0.0) {
        bail!("env REQUEST_TIMEOUT_S must be a positive number of seconds");
    }
    let transforms = Transforms::new(s, &cfg).wrap_err("openpi transforms")?;
    Ok((
        transforms,
        ServerSettings {
            addr,
            metadata: Out::from_json(&metadata),
            max_message_bytes: mb << 20,
            request_timeout: Duration::from_secs_f64(timeout),
            limits: Limits::default(),
        },
        cfg,
    ))
}

/// One observation on its way into the dataflow.
#[derive(Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    pub input: operators::openpi::ModelInput,
}

/// The dataflow's answer to a frame.
#[derive(Debug, Clone)]
pub struct Reply {
    /// [action_horizon, action_dim], normalised.
    pub actions: Vec<f32>,
    /// The policy's own time for the frame, when it reports one (`infer_ms` metadata): the
    /// sum of its stage times (device time on the GPU).
    pub policy_ms: Option<f64>,
    /// The host's wall time of the policy's call that ran the frame (its whole batch's),
    /// when it reports one (`wall_ms` metadata).
    pub wall_ms: Option<f64>,
    /// How many frames the policy ran together with this one, itself included
    /// (`batch_size` metadata); None when the policy does not say (one at a time).
    pub batch_size: Option<i64>,
}

/// How a request's frame ended, as its task learns it.
enum Outcome {
    /// The actions, for the task to answer with.
    Reply(Reply),
    /// The answer, written by the thread that completed the frame, with the rest waiting in
    /// the websocket's buffer for the task to flush.
    Unflushed,
    /// Answered by the thread that completed the frame.
    Done(Answered),
}

/// A request's answer, written to its socket.
enum Answered {
    /// On its way to the client; the server's time for the request, ms.
    Sent { total_ms: f64 },
    /// Sending it failed: the connection is gone.
    Lost(String),
}

impl Answered {
    /// The answer to the request read at `start`, by how writing it ended.
    fn by(written: Result<(), WsError>, start: Instant) -> Answered {
        match written {
            Ok(()) => Answered::Sent {
                total_ms: ms(start.elapsed()),
            },
            Err(e) => Answered::Lost(e.to_string()),
        }
    }
}

/// A request waiting for its frame: its task, and what the thread that completes the frame
/// needs to answer the client itself.
struct Waiter {
    tx: oneshot::Sender<Result<Outcome, String>>,
    answer: Answer,
}

/// What answering a request takes: its socket (the runtime's, to write on), its transforms'
/// context and its times.
struct Answer {
    ws: Arc<tokio::sync::Mutex<Socket>>,
    rt: tokio::runtime::Handle,
    ctx: FrameContext,
    seq: u64,
    /// When the request was read.
    start: Instant,
    /// When its frame went to the policy.
    sent: Instant,
    prev_total_ms: Option<f64>,
}

/// The state the connections share: the transforms, the way into the dataflow and the
/// requests waiting for their actions.
pub struct Hub {
    transforms: Transforms,
    settings: ServerSettings,
    metadata: Vec<u8>,
    /// None once the dataflow stops (closing the channel ends the sending thread).
    to_dataflow: Mutex<Option<mpsc::Sender<Frame>>>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_seq: AtomicU64,
    in_flight: tokio::sync::Semaphore,
    warned_truncation: std::sync::atomic::AtomicBool,
    served: AtomicU64,
    failed: AtomicU64,
}

impl Hub {
    pub fn new(
        transforms: Transforms,
        settings: ServerSettings,
        to_dataflow: mpsc::Sender<Frame>,
    ) -> Arc<Self> {
        Arc::new(Hub {
            metadata: settings.metadata.encode(),
            transforms,
            settings,
            to_dataflow: Mutex::new(Some(to_dataflow)),
            pending: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(0),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            warned_truncation: Default::default(),
            served: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// Answers the request waiting for frame `seq` with the dataflow's actions or error;
    /// false when none waits (it timed out, or the frame was not ours).
    ///
    /// Called from a thread outside the server's runtime (the policy's, the dataflow's
    /// events'), it answers the client itself: the output transforms, the reply's encoding
    /// and the socket write run right here, so the actions go out without waiting for the
    /// request's task to be woken; the task then only learns that they went. It never waits
    /// for a client: where the socket is busy or backed up, or the write does not finish at
    /// once, the task takes over. Inside the runtime it leaves the answer to the task.
    pub fn complete(&self, seq: u64, reply: Result<Reply, String>) -> bool {
        let waiter = self.pending.lock().ok().and_then(|mut p| p.remove(&seq));
        let Some(Waiter { tx, answer }) = waiter else {
            return false;
        };
        let outcome = match reply {
            Err(e) => Err(e),
            Ok(r) if tokio::runtime::Handle::try_current().is_err() => self.answer(answer, r),
            Ok(r) => Ok(Outcome::Reply(r)),
        };
        tx.send(outcome).is_ok()
    }

    /// Writes the answer of `a` to its socket, as far as that goes without waiting (see
    /// [`Hub::complete`]).
    fn answer(&self, a: Answer, reply: Reply) -> Result<Outcome, String> {
        let Ok(mut ws) = a.ws.try_lock() else {
            return Ok(Outcome::Reply(reply));
        };
        // Polled once, in the runtime's context, with a waker that nobody wakes: Pending
        // leaves the rest to the task, whose own polls register its waker.
        let _in_runtime = a.rt.enter();
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match Pin::new(&mut *ws).poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Ok(Outcome::Done(Answered::Lost(e.to_string()))),
            Poll::Pending => return Ok(Outcome::Reply(reply)),
        }
        let dataflow_ms = ms(a.sent.elapsed());
        let bytes = self.response(&reply, &a.ctx, a.seq, a.start, dataflow_ms, a.prev_total_ms)?;
        if let Err(e) = Pin::new(&mut *ws).start_send(Message::Binary(bytes.into())) {
            return Ok(Outcome::Done(Answered::Lost(e.to_string())));
        }
        Ok(match Pin::new(&mut *ws).poll_flush(&mut cx) {
            Poll::Ready(flushed) => Outcome::Done(Answered::by(flushed, a.start)),
            Poll::Pending => Outcome::Unflushed,
        })
    }

    /// The reply to a request: its actions through the output transforms, with openpi's
    /// timing maps.
    fn response(
        &self,
        reply: &Reply,
        ctx: &FrameContext,
        seq: u64,
        start: Instant,
        dataflow_ms: f64,
        prev_total_ms: Option<f64>,
    ) -> Result<Vec<u8>, String> {
        let actions = self
            .transforms
            .outputs(&reply.actions, ctx)
            .map_err(|e| format!("frame {seq}: {e}"))?;
        let mut server = vec![("infer_ms".to_string(), Out::Float(ms(start.elapsed())))];
        if let Some(p) = prev_total_ms {
            server.push(("prev_total_ms".to_string(), Out::Float(p)));
        }
        server.push(("dataflow_ms".to_string(), Out::Float(dataflow_ms)));
        // The frame's seq: its noise seed is the policy's SEED + seq.
        server.push(("frame".to_string(), Out::Int(seq as i64)));
        let mut policy = vec![
            (
                "infer_ms".to_string(),
                Out::Float(reply.policy_ms.unwrap_or(dataflow_ms)),
            ),
            (
                "batch_size".to_string(),
                Out::Int(reply.batch_size.unwrap_or(1)),
            ),
        ];
        if let Some(w) = reply.wall_ms {
            policy.push(("wall_ms".to_string(), Out::Float(w)));
        }
        Ok(self
            .transforms
            .response(
                &actions,
                vec![
                    ("policy_timing".to_string(), Out::Map(policy)),
                    ("server_timing".to_string(), Out::Map(server)),
                ],
            )
            .encode())
    }

    /// Stops taking requests: fails every waiting one and closes the way into the dataflow.
    pub fn stop(&self, why: &str) {
        if let Ok(mut tx) = self.to_dataflow.lock() {
            tx.take();
        }
        self.fail_all(why);
    }

    /// Fails every waiting request.
    fn fail_all(&self, why: &str) {
        let waiters: Vec<_> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => return,
        };
        for (_, w) in waiters {
            let _ = w.tx.send(Err(why.to_string()));
        }
    }

    /// (served, failed) requests so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.served.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// One request, read at `start` from the socket `ws`: answered (by whoever completes its
    /// frame, see [`Hub::complete`]), or the message of the error text frame. Decoding, the
    /// transforms and the reply's encoding run where the request's task stands, with this
    /// worker's other tasks handed to another thread ([`on_worker`]).
    async fn serve(
        self: &Arc<Self>,
        bytes: Bytes,
        start: Instant,
        prev_total_ms: Option<f64>,
        ws: &Arc<tokio::sync::Mutex<Socket>>,
    ) -> Result<Answered, String> {
        let hub = Arc::clone(self);
        let (input, ctx) = on_worker(move || {
            let obs = decode(&bytes, hub.settings.limits).map_err(|e| e.to_string())?;
            hub.transforms
                .inputs(&obs)
                .map_err(|e| format!("bad observation: {e}"))
        })
        .await?;
        if input.truncated_prompt && !self.warned_truncation.swap(true, Ordering::Relaxed) {
            eprintln!(
                "openpi-server: prompts longer than the model's max_token_len are truncated (as openpi does); this is reported once"
            );
        }
        let _slot = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| "the dataflow has stopped".to_string())?;
        let (tx, rx) = oneshot::channel();
        let sent = Instant::now();
        let seq = {
            // Frames enter the dataflow in the order of their seq (the nodes match a frame's
            // state and prompt to its images by seq and drop older ones).
            let to_dataflow = self
                .to_dataflow
                .lock()
                .map_err(|_| "internal: dataflow channel poisoned".to_string())?;
            let Some(to_dataflow) = to_dataflow.as_ref() else {
                return Err("the dataflow has stopped".into());
            };
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let answer = Answer {
                ws: Arc::clone(ws),
                rt: tokio::runtime::Handle::current(),
                ctx: ctx.clone(),
                seq,
                start,
                sent,
                prev_total_ms,
            };
            self.pending
                .lock()
                .map_err(|_| "internal: request table poisoned".to_string())?
                .insert(seq, Waiter { tx, answer });
            if to_dataflow.send(Frame { seq, input }).is_err() {
                self.complete(seq, Err(String::new()));
                return Err("the dataflow has stopped".into());
            }
            seq
        };
        let reply = match tokio::time::timeout(self.settings.request_timeout, rx).await {
            Ok(Ok(Ok(Outcome::Reply(r)))) => r,
            Ok(Ok(Ok(Outcome::Unflushed))) => {
                let flushed = ws.lock().await.flush().await;
                return Ok(Answered::by(flushed, start));
            }
            Ok(Ok(Ok(Outcome::Done(answered)))) => return Ok(answered),
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => return Err("the dataflow has stopped".into()),
            Err(_) => {
                self.complete(seq, Err(String::new()));
                return Err(format!(
                    "no actions for this observation (frame {seq}) within {:.0} s: the policy rejected or dropped it (see the dataflow's logs)",
                    self.settings.request_timeout.as_secs_f64()
                ));
            }
        };
        // Completed from inside the runtime: this task answers.
        let dataflow_ms = ms(sent.elapsed());
        let hub = Arc::clone(self);
        let bytes =
            on_worker(move || hub.response(&reply, &ctx, seq, start, dataflow_ms, prev_total_ms))
                .await?;
        let sent = ws.lock().await.send(Message::Binary(bytes.into())).await;
        Ok(Answered::by(sent, start))
    }
}

/// Runs `work` off the async threads' turn: a big message (two 40 MB float16 images take
/// about 0.3 s to decode) must hold up neither `/healthz` nor other connections. On the
/// server's multi-threaded runtime it runs right here, on the request task's thread, after
/// tokio has handed this worker's other tasks to another thread (`block_in_place`): a usual
/// request (a few hundred KB, tens of microseconds of work) then pays no trip to the blocking
/// pool and back, which is two thread wake-ups on the round trip's path each time. On a
/// single-threaded runtime it goes to the blocking pool. A panic in `work` fails the request,
/// not the server.
async fn on_worker<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    const PANICKED: &str =
        "internal error: the request's transforms panicked (a bug: please report it)";
    let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
    if let Ok(tokio::runtime::RuntimeFlavor::MultiThread) = flavor {
        return tokio::task::block_in_place(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .unwrap_or_else(|_| Err(PANICKED.into()))
        });
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| -> String {
            if e.is_panic() {
                PANICKED.into()
            } else {
                "the server is stopping".into()
            }
        })?
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `listener` with Nagle's algorithm off on every connection: a reply goes out when it is
/// written, not when the client's acknowledgement of the previous bytes comes back.
pub fn with_nodelay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    fn nodelay(tcp: &mut tokio::net::TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            eprintln!("openpi-server: cannot turn Nagle's algorithm off on a connection: {e}");
        }
    }
    listener.tap_io(nodelay as fn(&mut tokio::net::TcpStream))
}

/// The HTTP side: `GET /healthz` answers `OK`, every other path upgrades to openpi's
/// websocket protocol.
pub fn app(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "OK\n" }))
        .fallback(upgrade)
        .with_state(hub)
}

fn header_has(req: &Request, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The websocket handshake (RFC 6455), done here rather than by a framework so that the
/// connection keeps its raw stream (see [`fail`]).
async fn upgrade(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let valid = req.method() == Method::GET
        && header_has(&req, header::CONNECTION, "upgrade")
        && header_has(&req, header::UPGRADE, "websocket")
        && req
            .headers()
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let Some(key) = key.filter(|_| valid) else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, "websocket")],
            "openpi policy server: connect with a websocket client (GET /healthz for health)\n",
        )
            .into_response();
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let max = hub.settings.max_message_bytes;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .max_message_size(Some(max))
                    .max_frame_size(Some(max));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                connection(ws, peer, hub).await;
            }
            Err(e) => eprintln!("openpi-server: {peer}: websocket upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    match HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        Ok(v) => {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    }
    resp
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// One client: the metadata, then request after request until it leaves or one fails. The
/// socket is shared with the thread that completes a request's frame, which writes the
/// answer (one request is in flight per client, so they never wait for each other).
async fn connection(ws: Socket, peer: SocketAddr, hub: Arc<Hub>) {
    eprintln!("openpi-server: connection from {peer} opened");
    let ws = Arc::new(tokio::sync::Mutex::new(ws));
    if ws
        .lock()
        .await
        .send(Message::Binary(hub.metadata.clone().into()))
        .await
        .is_err()
    {
        return;
    }
    let mut prev_total_ms = None;
    loop {
        let next = ws.lock().await.next().await;
        let msg = match next {
            None | Some(Ok(Message::Close(_))) => break,
            Some(Ok(m)) => m,
            Some(Err(WsError::Capacity(e))) => {
                let why = format!(
                    "message too large: {e} (the limit is {} bytes, env MAX_MESSAGE_MB)",
                    hub.settings.max_message_bytes
                );
                fail(&mut *ws.lock().await, peer, &hub, why, true).await;
                return;
            }
            // The connection broke (e.g. the client left without a closing handshake):
            // nobody to answer.
            Some(Err(e)) => {
                eprintln!("openpi-server: connection from {peer} ended: {e}");
                return;
            }
        };
        let start = Instant::now();
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Text(_) => {
                let why = "expected a binary msgpack observation, got a text frame".to_string();
                fail(&mut *ws.lock().await, peer, &hub, why, false).await;
                return;
            }
            // Pings are answered by the websocket layer.
            _ => continue,
        };
        match hub.serve(bytes, start, prev_total_ms, &ws).await {
            Ok(Answered::Sent { total_ms }) => {
                hub.served.fetch_add(1, Ordering::Relaxed);
                prev_total_ms = Some(total_ms);
            }
            Ok(Answered::Lost(e)) => {
                eprintln!("openpi-server: connection from {peer} ended: {e}");
                return;
            }
            Err(why) => {
                fail(&mut *ws.lock().await, peer, &hub, why, false).await;
                return;
            }
        }
    }
    eprintln!("openpi-server: connection from {peer} closed");
}

/// openpi's failure answer: the error as a text frame, then close code 1011. Then reads what
/// the client still sends (its close reply; after an oversized message, the unread rest of
/// it, straight off the socket) until it closes or for 2 s: closing with unread bytes would
/// reset the connection, and the client could lose the error text and close code.
async fn fail(ws: &mut Socket, peer: SocketAddr, hub: &Hub, why: String, raw_drain: bool) {
    hub.failed.fetch_add(1, Ordering::Relaxed);
    eprintln!("openpi-server: {peer}: {why}; closing with {CLOSE_INTERNAL_ERROR}");
    let _ = ws
        .send(Message::Text(format!("turbo-pi: {why}").into()))
        .await;
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(CLOSE_INTERNAL_ERROR),
            reason: "Internal server error. Error text included in previous frame.".into(),
        })))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if raw_drain {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = ws.get_mut().read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        } else {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        }
    })
    .await;
}

/// Sends every frame of `rx` into the dataflow: its state, tokens and images, each on its own
/// output in order of `seq` (the nodes join them by `seq`: dora keeps the order of each
/// output, not across outputs); a frame that cannot be sent fails its request.
fn forward_frames(mut node: DoraNode, rx: mpsc::Receiver<Frame>, hub: Arc<Hub>, cfg: Config) {
    let (images, state, tokens): (DataId, DataId, DataId) = (
        "images".to_string().into(),
        "state".to_string().into(),
        node_common::prompt::TOKENS.to_string().into(),
    );
    let s = cfg.image_size;
    for frame in rx {
        let meta = FrameMeta {
            seq: frame.seq,
            t_capture_ns: now_ns(),
            trace: None,
        };
        let inp = frame.input;
        let result = (|| -> Result<()> {
            node.send_output(
                state.clone(),
                meta.tensor_params(&[inp.state.len()], "float32"),
                inp.state,
            )
            .map_err(|e| eyre!("sending state: {e}"))?;
            node.send_output(
                tokens.clone(),
                tokens_params(&meta, &inp.token_mask),
                inp.tokens,
            )
            .map_err(|e| eyre!("sending tokens: {e}"))?;
            let mut md = meta.tensor_params(&[inp.image_masks.len(), s, s, 3], "uint8");
            md.insert("image_masks".into(), masks_param(&inp.image_masks));
            node.send_output(images.clone(), md, inp.images)
                .map_err(|e| eyre!("sending images: {e}"))
        })();
        if let Err(e) = result {
            hub.complete(frame.seq, Err(format!("{e:#}")));
        }
    }
}

/// The dataflow's `actions` message to the waiting request.
fn on_actions(
    hub: &Hub,
    cfg: &Config,
    md: &dora_node_api::MetadataParameters,
    data: &dora_node_api::DoraArray,
) -> Result<()> {
    let meta = FrameMeta::from_metadata("actions", md)?;
    let (_, a) = expect_tensor::<f32>(
        "actions",
        md,
        data,
        "float32",
        &[Dim::Is(cfg.action_horizon), Dim::Is(cfg.action_dim)],
    )?;
    let policy_ms = match md.get("infer_ms") {
        Some(Parameter::Float(v)) => Some(*v),
        _ => None,
    };
    let wall_ms = match md.get("wall_ms") {
        Some(Parameter::Float(v)) => Some(*v),
        _ => None,
    };
    let batch_size = match md.get("batch_size") {
        Some(Parameter::Integer(b)) if *b >= 1 => Some(*b),
        _ => None,
    };
    if !hub.complete(
        meta.seq,
        Ok(Reply {
            actions: a.to_vec(),
            policy_ms,
            wall_ms,
            batch_size,
        }),
    ) {
        eprintln!(
            "openpi-server: actions of frame {} arrived with no request waiting (timed out)",
            meta.seq
        );
    }
    Ok(())
}

/// A stage's `rejected` message: the frame's client gets the reason now. Several stages may
/// refuse one frame (a later one sees the frame's other parts left over): the first answer
/// wins, the others find no request waiting.
fn on_rejected(
    hub: &Hub,
    input: &str,
    md: &dora_node_api::MetadataParameters,
    data: &dora_node_api::DoraArray,
) -> Result<()> {
    let (seq, by, reason) = parse_rejection(input, md, data)?;
    hub.complete(
        seq,
        Err(format!(
            "the policy rejected this observation (frame {seq}, node `{by}`): {reason}"
        )),
    );
    Ok(())
}

pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let (transforms, settings, cfg) = settings_from_env()?;
    let policy = match PolicyPlace::from_env()? {
        PolicyPlace::Dataflow => None,
        PolicyPlace::InProcess => Some(InProcess::from_env()?),
    };
    run_with(transforms, settings, cfg, policy, node, events)
}

/// Serves until the dataflow stops: through the dataflow, or with `policy` in this process.
pub fn run_with(
    transforms: Transforms,
    settings: ServerSettings,
    cfg: Config,
    policy: Option<InProcess>,
    node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .wrap_err("starting the server's runtime")?;
    let addr = settings.addr;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .wrap_err_with(|| format!("cannot listen on {addr}"))?;
    let robot = transforms.settings().robot.name();
    let (tx, rx) = mpsc::channel();
    let hub = Hub::new(transforms, settings, tx);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = axum::serve(
        with_nodelay(listener),
        app(hub.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = stop_rx.await;
    });
    let server = rt.spawn(async move { server.await });
    let place = match &policy {
        Some(p) => format!("the policy in this process ({})", p.describe()),
        None => "the policy in the dataflow".to_string(),
    };
    eprintln!(
        "openpi-server: serving {robot} observations on ws://{addr} (GET /healthz), {} model, {place}",
        if cfg.pi05 { "pi0.5" } else { "pi0" }
    );
    let forwarder = {
        let (hub, cfg) = (hub.clone(), cfg.clone());
        std::thread::spawn(move || match policy {
            Some(p) => p.serve(rx, hub),
            None => {
                forward_frames(node, rx, hub, cfg);
                String::new()
            }
        })
    };
    while let Some(event) = events.recv() {
        match event {
            Event::Input { id, metadata, data } if id.as_str() == "actions" => {
                if let Err(e) = on_actions(&hub, &cfg, &metadata.parameters, &data) {
                    node_common::report_rejected("openpi-server", &e);
                }
            }
            // A stage refused one of our frames: its client gets the reason now.
            Event::Input { id, metadata, data } if id.as_str().starts_with(REJECTED) => {
                if let Err(e) = on_rejected(&hub, id.as_str(), &metadata.parameters, &data) {
                    node_common::report_rejected("openpi-server", &e);
                }
            }
            Event::Stop(_) => break,
            _ => {}
        }
    }
    hub.stop("the dataflow is stopping");
    let _ = stop_tx.send(());
    let (served, failed) = hub.counts();
    drop(hub);
    // Open websocket connections end with the runtime.
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    let batches = forwarder.join().unwrap_or_else(|_| {
        eprintln!("openpi-server: the thread answering frames panicked");
        String::new()
    });
    eprintln!("openpi-server: {served} requests served, {failed} failed{batches}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use operators::openpi::msgpack::Value;
    use operators::openpi::tokenizer::tiny_tokenizer_json;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    const STATS: &str = r#"{"norm_stats": {
        "state": {"mean": [0, 0, 0, 0, 0, 0, 0, 0], "std": [1, 1, 1, 1, 1, 1, 1, 1],
                  "q01": [-1, -1, -1, -1, -1, -1, -1, -1], "q99": [1, 1, 1, 1, 1, 1, 1, 1]},
        "actions": {"mean": [0, 0, 0, 0, 0, 0, 0, 0], "std": [1, 1, 1, 1, 1, 1, 1, 1],
                    "q01": [-2, -2, -2, -2, -2, -2, -2, -2], "q99": [2, 2, 2, 2, 2, 2, 2, 2]}}}"#;

    fn image(h: usize, w: usize) -> Out {
        Out::NdArray {
            dtype: "|u1",
            shape: vec![h, w, 3],
            data: (0..h * w * 3).map(|i| (i % 251) as u8).collect(),
        }
    }

    fn observation(prompt: Option<&str>) -> Vec<u8> {
        let mut m = vec![
            ("observation/image".to_string(), image(224, 224)),
            ("observation/wrist_image".to_string(), image(224, 224)),
            (
                "observation/state".to_string(),
                Out::f64_array(vec![8], &[0.1; 8]),
            ),
        ];
        if let Some(p) = prompt {
            m.push(("prompt".to_string(), Out::Str(p.into())));
        }
        Out::Map(m).encode()
    }

    /// A server on a free local port whose "dataflow" answers frame `seq` with model actions
    /// all equal to `seq / 100`; returns the port, the transforms' twin and the temp dir.
    async fn server() -> (u16, Transforms, tempfile::TempDir) {
        server_with(1 << 20).await
    }

    /// [`server`] taking messages up to `max_message_bytes`.
    async fn server_with(max_message_bytes: usize) -> (u16, Transforms, tempfile::TempDir) {
        server_rejecting(max_message_bytes, false, false).await
    }

    /// [`server_with`] whose dataflow, with `reject_odd`, refuses every odd frame on a
    /// `rejected` message (as a stage node sends it) instead of answering it. Its frames are
    /// completed from a thread outside the server's runtime (which then writes the answers
    /// itself), or with `in_runtime` from one inside it (which leaves that to the requests'
    /// tasks).
    async fn server_rejecting(
        max_message_bytes: usize,
        reject_odd: bool,
        in_runtime: bool,
    ) -> (u16, Transforms, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let stats = dir.path().join("norm_stats.json");
        std::fs::write(&stats, STATS).unwrap();
        let tok = dir.path().join("tokenizer.json");
        std::fs::write(&tok, tiny_tokenizer_json()).unwrap();
        let cfg = Config::pi05_small();
        let transforms = || {
            let mut s = Settings::new(Robot::Libero, &cfg);
            s.norm_stats = Some(stats.clone());
            s.tokenizer = Some(tok.clone());
            Transforms::new(s, &cfg).unwrap()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel::<Frame>();
        let hub = Hub::new(
            transforms(),
            ServerSettings {
                addr: listener.local_addr().unwrap(),
                metadata: Out::Map(vec![("robot".into(), Out::Str("libero".into()))]),
                max_message_bytes,
                request_timeout: Duration::from_secs(20),
                limits: Limits::default(),
            },
            tx,
        );
        let h = hub.clone();
        let n = cfg.action_horizon * cfg.action_dim;
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let _inside = in_runtime.then(|| rt.enter());
            for f in rx {
                assert_eq!(f.input.images.len(), 3 * 32 * 32 * 3);
                if reject_odd && f.seq % 2 == 1 {
                    use dora_node_api::IntoArrow;
                    let meta = FrameMeta {
                        seq: f.seq,
                        t_capture_ns: 1,
                        trace: None,
                    };
                    let mut md = meta.params();
                    md.insert(
                        node_common::reject::REJECTED_BY.into(),
                        Parameter::String("policy".into()),
                    );
                    let why = "the observation shows the model nothing".into_arrow();
                    on_rejected(&h, "rejected", &md, &why).unwrap();
                    continue;
                }
                let reply = Reply {
                    actions: vec![f.seq as f32 / 100.0; n],
                    policy_ms: Some(1.5),
                    wall_ms: Some(1.75),
                    batch_size: Some(2),
                };
                h.complete(f.seq, Ok(reply));
            }
        });
        tokio::spawn(async move {
            axum::serve(
                with_nodelay(listener),
                app(hub).into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        (port, transforms(), dir)
    }

    type Client = WebSocketStream<tokio::net::TcpStream>;

    async fn connect(port: u16) -> Client {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let req = format!("ws://127.0.0.1:{port}/")
            .into_client_request()
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        let Some(Ok(Message::Binary(meta))) = ws.next().await else {
            panic!("no metadata message")
        };
        let meta = decode(&meta, Limits::default()).unwrap();
        assert_eq!(meta.get("robot"), Some(&Value::Str("libero")));
        ws
    }

    /// A client that sends and never reads its answers fills its socket: the thread that
    /// completes the frames must not wait for it (its write is left to the request's task),
    /// or every other client would wait too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_does_not_read_stalls_no_one_else() {
        let (port, _, _dir) = server().await;
        let small = {
            let m = vec![
                ("observation/image".to_string(), image(32, 32)),
                ("observation/wrist_image".to_string(), image(32, 32)),
                (
                    "observation/state".to_string(),
                    Out::f64_array(vec![8], &[0.1; 8]),
                ),
                ("prompt".to_string(), Out::Str("go".into())),
            ];
            Out::Map(m).encode()
        };
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let req = format!("ws://127.0.0.1:{port}/")
            .into_client_request()
            .unwrap();
        let (mut deaf, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        // Requests until one cannot be sent within a second: the server stopped reading this
        // client, its answers backed up.
        let t = Instant::now();
        let mut sent = 0;
        while tokio::time::timeout(
            Duration::from_secs(1),
            deaf.send(Message::Binary(small.clone().into())),
        )
        .await
        .is_ok()
        {
            sent += 1;
            assert!(
                sent < 200_000,
                "the server kept reading a client that never reads"
            );
        }
        eprintln!(
            "a client that never reads backed up after {sent} requests, {:?}",
            t.elapsed()
        );
        let mut other = connect(port).await;
        let t = Instant::now();
        other
            .send(Message::Binary(observation(Some("go")).into()))
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), other.next()).await;
        assert!(
            matches!(answer, Ok(Some(Ok(Message::Binary(_))))),
            "another client got {answer:?} after {:?}",
            t.elapsed()
        );
    }

    /// The error text, then close code 1011.
    async fn expect_failure(ws: &mut Client, want: &str) {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => assert!(t.contains(want), "{t}"),
            other => panic!("expected an error text containing {want:?}, got {other:?}"),
        }
        match ws.next().await {
            Some(Ok(Message::Close(Some(c)))) => assert_eq!(u16::from(c.code), 1011),
            other => panic!("expected close 1011, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_actions_and_answers_bad_requests_with_1011() {
        serves_and_refuses(false).await;
    }

    /// The same, with the frames completed inside the server's runtime: the requests' tasks
    /// write the answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_answer_frames_completed_inside_the_runtime() {
        serves_and_refuses(true).await;
    }

    async fn serves_and_refuses(in_runtime: bool) {
        let (port, twin, _dir) = server_rejecting(1 << 20, false, in_runtime).await;
        let mut ws = connect(port).await;
        for seq in 0..2u64 {
            let obs = observation(Some("pick up the cup"));
            ws.send(Message::Binary(obs.clone().into())).await.unwrap();
            let Some(Ok(Message::Binary(resp))) = ws.next().await else {
                panic!("no response")
            };
            let v = decode(&resp, Limits::default()).unwrap();
            let a = operators::openpi::ndarray::NdArray::from_value(v.get("actions").unwrap(), "a")
                .unwrap()
                .unwrap();
            assert_eq!((a.dtype_str, a.shape.clone()), ("<f8", vec![10, 7]));
            // The same frame through the transforms directly.
            let (_, ctx) = twin
                .inputs(&decode(&obs, Limits::default()).unwrap())
                .unwrap();
            let want = twin.outputs(&vec![seq as f32 / 100.0; 80], &ctx).unwrap();
            assert_eq!(a.to_f64("a").unwrap(), want);
            let policy = v.get("policy_timing").and_then(|t| t.get("infer_ms"));
            assert_eq!(policy, Some(&Value::Float(1.5)));
            let wall = v.get("policy_timing").and_then(|t| t.get("wall_ms"));
            assert_eq!(wall, Some(&Value::Float(1.75)));
            let batch = v.get("policy_timing").and_then(|t| t.get("batch_size"));
            assert_eq!(batch, Some(&Value::Int(2)));
            let server = v.get("server_timing").unwrap();
            assert_eq!(server.get("frame"), Some(&Value::Int(seq as i64)));
            assert!(matches!(server.get("infer_ms"), Some(Value::Float(ms)) if *ms >= 0.0));
            assert_eq!(server.get("prev_total_ms").is_some(), seq > 0);
        }
        // A concurrent client is served while this one fails.
        let mut other = connect(port).await;
        ws.send(Message::Binary(observation(None).into()))
            .await
            .unwrap();
        expect_failure(&mut ws, "missing key `prompt`").await;
        other
            .send(Message::Binary(observation(Some("go")).into()))
            .await
            .unwrap();
        assert!(matches!(other.next().await, Some(Ok(Message::Binary(_)))));

        let mut ws = connect(port).await;
        ws.send(Message::Binary(vec![0xc1, 0x00].into()))
            .await
            .unwrap();
        expect_failure(&mut ws, "malformed msgpack at byte 0").await;

        let mut ws = connect(port).await;
        ws.send(Message::Text("hello".into())).await.unwrap();
        expect_failure(&mut ws, "expected a binary msgpack observation").await;

        let mut ws = connect(port).await;
        ws.send(Message::Binary(vec![7u8; 3 << 20].into()))
            .await
            .unwrap();
        expect_failure(&mut ws, "message too large").await;

        // Still serving.
        let mut ws = connect(port).await;
        ws.send(Message::Binary(observation(Some("go")).into()))
            .await
            .unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Message::Binary(_)))));
    }

    /// A frame a stage refuses is answered at once with the stage's reason and close 1011,
    /// long before the request timeout; the other clients go on being served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejected_frame_is_answered_at_once() {
        let (port, _, _dir) = server_rejecting(1 << 20, true, false).await;
        let mut ws = connect(port).await;
        ws.send(Message::Binary(observation(Some("go")).into()))
            .await
            .unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Message::Binary(_)))));
        let start = Instant::now();
        ws.send(Message::Binary(observation(Some("go")).into()))
            .await
            .unwrap();
        expect_failure(
            &mut ws,
            "the policy rejected this observation (frame 1, node `policy`): the observation shows the model nothing",
        )
        .await;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "answered after {:?} (the request timeout is 20 s)",
            start.elapsed()
        );
        let mut other = connect(port).await;
        other
            .send(Message::Binary(observation(Some("go")).into()))
            .await
            .unwrap();
        assert!(matches!(other.next().await, Some(Ok(Message::Binary(_)))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_and_plain_http() {
        let (port, _, _dir) = server().await;
        let get = |path: &'static str| async move {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            tcp.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            tcp.read_to_string(&mut out).await.unwrap();
            out
        };
        let health = get("/healthz").await;
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("OK\n"),
            "{health}"
        );
        let plain = get("/").await;
        assert!(plain.starts_with("HTTP/1.1 426"), "{plain}");
    }

    /// `GET path` on a fresh connection: the whole response.
    async fn http_get(port: u16, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    }

    /// A LIBERO observation with two float16 camera images of [3, h, w]: slow to transform
    /// (every pixel converted from f16, then resized), the kind of request that must not hold
    /// up the server.
    fn slow_observation(h: usize, w: usize) -> Vec<u8> {
        // f16 bit patterns of values in [0.125, 0.5).
        let f16_image = || Out::NdArray {
            dtype: "<f2",
            shape: vec![3, h, w],
            data: (0..3 * h * w)
                .flat_map(|i| (0x3000u16 + (i % 0x800) as u16).to_le_bytes())
                .collect(),
        };
        Out::Map(vec![
            ("observation/image".to_string(), f16_image()),
            ("observation/wrist_image".to_string(), f16_image()),
            (
                "observation/state".to_string(),
                Out::f64_array(vec![8], &[0.1; 8]),
            ),
            ("prompt".to_string(), Out::Str("pick up the cup".into())),
        ])
        .encode()
    }

    /// Slow requests (big float16 images) and a huge prompt in flight on a server whose
    /// runtime has a single async thread, multi-threaded (as the server's own, where the work
    /// runs on the request's thread after its other tasks have moved) or not (where it goes
    /// to the blocking pool): /healthz and another client are still answered promptly, and
    /// the huge prompt is refused without being tokenized.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_requests_do_not_stall_healthz_or_other_clients() {
        slow_requests_on(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_requests_do_not_stall_a_single_threaded_server() {
        slow_requests_on(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .await;
    }

    async fn slow_requests_on(
        runtime: impl FnOnce() -> std::io::Result<tokio::runtime::Runtime> + Send + 'static,
    ) {
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::spawn(move || {
            let rt = runtime().unwrap();
            rt.block_on(async {
                let (port, twin, dir) = server_with(96 << 20).await;
                let _ = ready_tx.send((port, twin));
                let _dir = dir;
                std::future::pending::<()>().await
            });
        });
        let (port, twin) = ready_rx.await.unwrap();
        let twin = Arc::new(twin);
        let slow = Arc::new(slow_observation(2560, 2560));
        // How long one slow request's transforms take here, on one thread.
        let one = {
            let (twin, slow) = (twin.clone(), slow.clone());
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                twin.inputs(&decode(&slow, Limits::default()).unwrap())
                    .unwrap();
                t.elapsed()
            })
            .await
            .unwrap()
        };
        assert!(
            one > Duration::from_millis(100),
            "a slow request takes {one:?}: too fast to show a stall"
        );
        let prompt = "pick up the cup ".repeat((12 << 20) / 16);
        let huge_prompt = observation(Some(&prompt));
        let mut normal = connect(port).await;
        let mut slow_clients = Vec::new();
        let mut sent = Vec::new();
        for _ in 0..2 {
            let mut ws = connect(port).await;
            let slow = slow.clone();
            let (sent_tx, sent_rx) = oneshot::channel();
            sent.push(sent_rx);
            slow_clients.push(tokio::spawn(async move {
                ws.send(Message::Binary(slow.to_vec().into()))
                    .await
                    .unwrap();
                let _ = sent_tx.send(());
                let answer = ws.next().await;
                assert!(matches!(answer, Some(Ok(Message::Binary(_)))), "{answer:?}");
            }));
        }
        let mut prompt_client = connect(port).await;
        prompt_client
            .send(Message::Binary(huge_prompt.into()))
            .await
            .unwrap();
        // Once the messages are sent (the server has read all but what the socket buffers
        // hold), while the slow ones are transformed: /healthz every 10 ms, and a normal
        // request.
        for s in sent {
            s.await.unwrap();
        }
        let mut health = Vec::new();
        let mut normal_took = None;
        while slow_clients.iter().any(|c| !c.is_finished()) {
            let t = Instant::now();
            let r = http_get(port, "/healthz").await;
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            health.push(t.elapsed());
            if normal_took.is_none() {
                let t = Instant::now();
                normal
                    .send(Message::Binary(observation(Some("go")).into()))
                    .await
                    .unwrap();
                assert!(matches!(normal.next().await, Some(Ok(Message::Binary(_)))));
                normal_took = Some(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for c in slow_clients {
            c.await.unwrap();
        }
        expect_failure(&mut prompt_client, "`prompt`").await;
        let worst = health.iter().max().copied().unwrap_or_default();
        let normal_took = normal_took.unwrap_or_default();
        eprintln!(
            "one slow request: {one:?}; {} health checks while two were in flight, the slowest {worst:?}; a normal request {normal_took:?}",
            health.len()
        );
        assert!(
            health.len() >= 3,
            "only {} health checks while the slow requests were in flight",
            health.len()
        );
        // On the executor, a check arriving during a slow request's transforms waits for them
        // to finish (up to `one`, and the checks come every 10 ms).
        assert!(
            worst < one * 2 / 3,
            "/healthz took {worst:?} while requests of {one:?} were in flight"
        );
        assert!(
            normal_took < one * 2 / 3,
            "a normal request took {normal_took:?} while requests of {one:?} were in flight"
        );
    }
}

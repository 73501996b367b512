//! Camera source: replays recorded frames (a folder of PNG/JPEG files or an `.npy` stack) or
//! renders a built-in synthetic scene, at a fixed rate, for a bounded number of frames or
//! forever. Each message holds every camera of one frame.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, Event, EventStream, MetadataParameters, Parameter};
use eyre::{bail, eyre, Result, WrapErr};
use node_common::events::{recv_within, Waited};
use node_common::{env_opt, env_or, now_ns, FrameMeta};
use operators::npy;

/// One frame of every camera, ready to send.
#[derive(Debug, Clone)]
pub enum Frame {
    /// Raw RGB u8 [cameras, height, width, 3].
    Raw { data: Vec<u8>, shape: [usize; 4] },
    /// Encoded files (PNG/JPEG bytes), one per camera, concatenated.
    Encoded { data: Vec<u8>, offsets: Vec<usize> },
}

/// Where frames come from.
pub enum Source {
    Frames(Vec<Frame>),
    Synthetic { cameras: usize, size: usize },
}

pub struct Settings {
    pub source: Source,
    /// Robot state per frame, f32 [frames, dims] (replayed alongside the frames).
    pub state: Option<(usize, Vec<f32>)>,
    pub rate_hz: f64,
    /// None = forever (synthetic) or once through the recording (files).
    pub max_frames: Option<u64>,
    /// Wait before the first frame (lets slow-loading model nodes come up first).
    pub start_delay: Duration,
}

impl Settings {
    /// Env: `FRAMES` (folder or .npy; unset = synthetic), `CAMERAS` (files per frame in a
    /// folder, default 1), `SYNTHETIC_CAMERAS` (2), `SYNTHETIC_SIZE` (224), `STATE` (.npy
    /// [frames, dims]), `RATE_HZ` (10), `MAX_FRAMES` (0 = forever), `START_DELAY_S` (0).
    pub fn from_env() -> Result<Self> {
        let delay: f64 = env_or("START_DELAY_S", 0.0)?;
        if !(delay.is_finite() && (0.0..=3600.0).contains(&delay)) {
            bail!("env START_DELAY_S={delay} must be between 0 and 3600 seconds");
        }
        let rate_hz: f64 = env_or("RATE_HZ", 10.0)?;
        if !(rate_hz.is_finite() && rate_hz > 0.0) {
            bail!("env RATE_HZ={rate_hz} must be a positive number");
        }
        let max_frames: Option<u64> = env_opt("MAX_FRAMES")?.filter(|&n: &u64| n > 0);
        let source = match env_opt::<PathBuf>("FRAMES")? {
            Some(path) => {
                let cameras: usize = env_or("CAMERAS", 1)?;
                if cameras == 0 {
                    bail!("env CAMERAS must be at least 1");
                }
                Source::Frames(
                    load_frames(&path, cameras)
                        .wrap_err_with(|| format!("env FRAMES={}", path.display()))?,
                )
            }
            None => {
                let cameras = env_or("SYNTHETIC_CAMERAS", 2)?;
                let size = env_or("SYNTHETIC_SIZE", 224)?;
                if cameras == 0 || size < 8 {
                    bail!("env SYNTHETIC_CAMERAS must be >= 1 and SYNTHETIC_SIZE >= 8");
                }
                Source::Synthetic { cameras, size }
            }
        };
        let state = match env_opt::<PathBuf>("STATE")? {
            Some(p) => {
                let a = npy::read_f32(&p).wrap_err("env STATE")?;
                if a.shape.len() != 2 || a.shape[0] == 0 {
                    bail!(
                        "env STATE={}: expected float32 [frames, dims], found shape {:?}",
                        p.display(),
                        a.shape
                    );
                }
                Some((a.shape[1], a.data))
            }
            None => None,
        };
        Ok(Settings {
            source,
            state,
            rate_hz,
            max_frames,
            start_delay: Duration::from_secs_f64(delay),
        })
    }
}

/// Reads recorded frames: an `.npy` u8 [frames, cameras, H, W, 3] or [frames, H, W, 3], or a
/// folder whose PNG/JPEG files, sorted by name, hold `cameras` consecutive files per frame.
pub fn load_frames(path: &Path, cameras: usize) -> Result<Vec<Frame>> {
    if path.extension().is_some_and(|e| e == "npy") {
        let a = npy::read_u8(path)?;
        let (frames, shape) = match a.shape.as_slice() {
            [f, n, h, w, 3] => (*f, [*n, *h, *w, 3]),
            [f, h, w, 3] => (*f, [1, *h, *w, 3]),
            s => bail!(
                "{}: expected uint8 [frames, cameras, H, W, 3], found shape {s:?}",
                path.display()
            ),
        };
        let per: usize = shape.iter().product();
        if frames == 0 || per == 0 {
            bail!("{}: no frames", path.display());
        }
        return Ok(a
            .data
            .chunks_exact(per)
            .map(|c| Frame::Raw {
                data: c.to_vec(),
                shape,
            })
            .collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .wrap_err_with(|| format!("cannot read {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() || !files.len().is_multiple_of(cameras) {
        bail!(
            "{}: found {} PNG/JPEG files, expected a positive multiple of CAMERAS={cameras}",
            path.display(),
            files.len()
        );
    }
    files
        .chunks(cameras)
        .map(|group| {
            let mut data = Vec::new();
            let mut offsets = vec![0];
            for f in group {
                data.extend(
                    operators::fsio::read_limited(f, operators::fsio::limit::IMAGE, "camera image")
                        .wrap_err_with(|| format!("cannot read {}", f.display()))?,
                );
                offsets.push(data.len());
            }
            Ok(Frame::Encoded { data, offsets })
        })
        .collect()
}

/// A moving synthetic scene: a gradient background and one bright square per camera that
/// moves with the frame number.
pub fn synthetic_frame(cameras: usize, size: usize, seq: u64) -> Frame {
    let mut data = Vec::with_capacity(cameras * size * size * 3);
    for cam in 0..cameras {
        let cx = (seq as usize * 3 + cam * size / 3) % size;
        let cy = size / 2;
        let r = size / 10;
        for y in 0..size {
            for x in 0..size {
                let inside = x.abs_diff(cx) < r && y.abs_diff(cy) < r;
                data.push(if inside { 250 } else { (x * 255 / size) as u8 });
                data.push(if inside { 40 } else { (y * 255 / size) as u8 });
                data.push((64 * cam % 256) as u8);
            }
        }
    }
    Frame::Raw {
        data,
        shape: [cameras, size, size, 3],
    }
}

fn frame_params(meta: FrameMeta, frame: &Frame) -> MetadataParameters {
    let mut p = meta.params();
    p.insert("dtype".into(), Parameter::String("uint8".into()));
    match frame {
        Frame::Raw { shape, .. } => {
            p.insert("encoding".into(), Parameter::String("raw".into()));
            p.insert(
                "shape".into(),
                Parameter::ListInt(shape.iter().map(|&d| d as i64).collect()),
            );
        }
        Frame::Encoded { offsets, .. } => {
            p.insert("encoding".into(), Parameter::String("encoded".into()));
            p.insert(
                "offsets".into(),
                Parameter::ListInt(offsets.iter().map(|&d| d as i64).collect()),
            );
        }
    }
    p
}

pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    run_with(Settings::from_env()?, node, events)
}

/// The frames to send: `MAX_FRAMES`, or once through a recording, or forever.
fn frame_limit(settings: &Settings) -> Option<u64> {
    match (&settings.source, settings.max_frames) {
        (_, Some(n)) => Some(n),
        (Source::Frames(f), None) => Some(f.len() as u64),
        (Source::Synthetic { .. }, None) => None,
    }
}

pub fn run_with(settings: Settings, mut node: DoraNode, mut events: EventStream) -> Result<()> {
    if node
        .node_config()
        .inputs
        .keys()
        .any(|k| k.as_str() == REQUEST)
    {
        return run_on_request(settings, node, events);
    }
    let period = Duration::from_secs_f64(1.0 / settings.rate_hz);
    let limit = frame_limit(&settings);
    let mut out = Sender::new(&node)?;
    let start = Instant::now() + settings.start_delay;
    let mut seq = 0u64;
    // Whether stop requests can still arrive: the stream of a node without inputs may end
    // (it does under dora's testing API); the camera then keeps time by sleeping.
    let mut listening = true;
    while limit.is_none_or(|n| seq < n) {
        // Sleep until this frame's slot, waking for a stop request.
        let due = start + period.mul_f64(seq as f64);
        while let Some(wait) = due
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            if !listening {
                std::thread::sleep(wait);
                continue;
            }
            match recv_within(&mut events, wait) {
                Waited::Event(Event::Stop(_)) => return Ok(()),
                Waited::Closed => listening = false,
                _ => {}
            }
        }
        out.send(&settings, &mut node, seq)?;
        seq += 1;
    }
    eprintln!("camera: sent {seq} frames");
    Ok(())
}

/// The input that, when wired, makes the camera capture one frame per message.
pub const REQUEST: &str = "request";

/// The frames' outputs and the trace.
struct Sender {
    frames: DataId,
    state: DataId,
    tracer: node_common::trace::Tracer,
}

impl Sender {
    fn new(node: &DoraNode) -> Result<Self> {
        Ok(Sender {
            frames: "frames".to_string().into(),
            state: "state".to_string().into(),
            tracer: node_common::tracer(node, "cpu")?,
        })
    }

    /// Captures frame `seq` now and sends it (with its state row when there is one).
    fn send(&mut self, settings: &Settings, node: &mut DoraNode, seq: u64) -> Result<()> {
        // The root span of the frame's trace: capture to hand-off.
        let span = self.tracer.start("camera", seq, None);
        let frame = match &settings.source {
            Source::Frames(f) => f[(seq % f.len() as u64) as usize].clone(),
            Source::Synthetic { cameras, size } => synthetic_frame(*cameras, *size, seq),
        };
        let meta = FrameMeta {
            seq,
            t_capture_ns: now_ns(),
            trace: span.id(),
        };
        if let Some((dims, states)) = &settings.state {
            let rows = states.len() / dims;
            let row = (seq % rows as u64) as usize;
            let s = states[row * dims..(row + 1) * dims].to_vec();
            node.send_output(
                self.state.clone(),
                meta.tensor_params(&[*dims], "float32"),
                s,
            )
            .map_err(|e| eyre!("sending state: {e}"))?;
        }
        let params = frame_params(meta, &frame);
        let data = match frame {
            Frame::Raw { data, .. } | Frame::Encoded { data, .. } => data,
        };
        node.send_output(self.frames.clone(), params, data)
            .map_err(|e| eyre!("sending frame {seq}: {e}"))?;
        span.end();
        Ok(())
    }
}

/// With `request` wired (an action queue asks for observations): one frame per request, at
/// once, whose `seq` is the request's, so that the answer can be matched to it; `RATE_HZ` is
/// not used. A request before `START_DELAY_S` is served once that time has passed. Stops
/// after `MAX_FRAMES` frames (or once through a recording), on a stop request, or when the
/// requests end.
pub fn run_on_request(
    settings: Settings,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    let limit = frame_limit(&settings);
    let mut out = Sender::new(&node)?;
    let start = Instant::now() + settings.start_delay;
    let mut sent = 0u64;
    let mut refused = 0u64;
    // Requests that came during START_DELAY_S, served first (the wait still hears a stop).
    let mut early = std::collections::VecDeque::new();
    while let Some(wait) = start
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        match recv_within(&mut events, wait) {
            Waited::Event(Event::Stop(_)) => return Ok(()),
            Waited::Event(Event::Input { id, metadata, .. }) if id.as_str() == REQUEST => {
                early.push_back(metadata)
            }
            Waited::Closed => break,
            _ => {}
        }
    }
    while limit.is_none_or(|n| sent < n) {
        let event = match early.pop_front() {
            Some(metadata) => metadata,
            None => match events.recv() {
                None => break,
                Some(Event::Stop(_)) => break,
                Some(Event::Input { id, metadata, .. }) if id.as_str() == REQUEST => metadata,
                Some(_) => continue,
            },
        };
        let Some(seq) =
            node_common::int_param(&event.parameters, "seq").and_then(|s| u64::try_from(s).ok())
        else {
            refused += 1;
            node_common::report_rejected(
                "camera",
                &eyre!("input `request`: metadata `seq` (a non-negative integer) is missing"),
            );
            continue;
        };
        out.send(&settings, &mut node, seq)?;
        sent += 1;
    }
    eprintln!("camera: sent {sent} frames on request, {refused} requests refused");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dora_node_api::integration_testing::{
        self, IntegrationTestInput, TestingInput, TestingOptions, TestingOutput,
    };

    #[test]
    fn emits_bounded_frames_with_seq_then_stops() {
        let (tx, mut rx) = integration_testing::output_channel();
        let input =
            TestingInput::Input(IntegrationTestInput::new("camera".parse().unwrap(), vec![]));
        let (node, events) = DoraNode::init_testing(
            input,
            TestingOutput::ToChannel(tx),
            TestingOptions {
                skip_output_time_offsets: true,
            },
        )
        .unwrap();
        let settings = Settings {
            source: Source::Synthetic {
                cameras: 2,
                size: 16,
            },
            state: Some((2, vec![1.0, 2.0, 3.0, 4.0])),
            rate_hz: 1000.0,
            max_frames: Some(3),
            start_delay: Duration::ZERO,
        };
        run_with(settings, node, events).unwrap();
        let out = integration_testing::drain_outputs(&mut rx);
        let frames: Vec<_> = out.iter().filter(|o| o["id"] == "frames").collect();
        let states: Vec<_> = out.iter().filter(|o| o["id"] == "state").collect();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0]["data"].as_array().unwrap().len(), 2 * 16 * 16 * 3);
        assert_ne!(frames[0]["data"], frames[1]["data"], "the scene moves");
        assert_eq!(states[1]["data"], serde_json::json!([3.0, 4.0]));
        assert_eq!(
            states[2]["data"],
            serde_json::json!([1.0, 2.0]),
            "state rows loop"
        );
    }

    /// With `request` wired: one frame per request, carrying the request's seq, a request
    /// without seq refused, and no more than MAX_FRAMES frames; the same whether a request
    /// comes during START_DELAY_S or after.
    #[test]
    fn captures_one_frame_per_request_with_its_seq() {
        use node_common::testing::{event, json, run_node, TensorInput};
        let request = |seq| TensorInput {
            id: "request",
            seq,
            shape: &[0],
            dtype: "uint8",
            arrow_type: "UInt8",
            values: json::<u8>(&[]),
            extra: vec![],
        };
        let mut bad = event(0.01, request(0));
        if let integration_testing::integration_testing_format::IncomingEvent::Input {
            metadata: Some(md),
            ..
        } = &mut bad.event
        {
            md.remove("seq");
        }
        let events = vec![
            event(0.0, request(7)),
            bad,
            event(0.02, request(9)),
            event(0.03, request(12)),
            event(0.04, request(13)),
        ];
        let settings = Settings {
            source: Source::Synthetic {
                cameras: 1,
                size: 8,
            },
            state: None,
            rate_hz: 0.001,
            max_frames: Some(3),
            // Requests that come during the delay are kept and served in order after it.
            start_delay: Duration::from_millis(25),
        };
        let out = run_node("camera", events, |node, ev| {
            run_on_request(settings, node, ev)
        })
        .unwrap();
        // The synthetic scene moves with the seq: each frame shows its request's seq.
        let frames: Vec<&serde_json::Value> = out.iter().map(|o| &o["data"]).collect();
        let want: Vec<serde_json::Value> = [7, 9, 12]
            .iter()
            .map(|&seq| match synthetic_frame(1, 8, seq) {
                Frame::Raw { data, .. } => serde_json::json!(data),
                Frame::Encoded { .. } => unreachable!("synthetic frames are raw"),
            })
            .collect();
        assert_eq!(frames, want.iter().collect::<Vec<_>>());
    }

    #[test]
    fn loads_npy_stacks_and_folders_and_rejects_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.npy");
        npy::write_u8(&p, &[2, 3, 4, 4, 3], &[7; 2 * 3 * 4 * 4 * 3]).unwrap();
        let frames = load_frames(&p, 1).unwrap();
        assert_eq!(frames.len(), 2);
        assert!(matches!(&frames[0], Frame::Raw { shape, .. } if *shape == [3, 4, 4, 3]));
        npy::write_u8(&p, &[2, 4, 4], &[7; 32]).unwrap();
        let err = load_frames(&p, 1).unwrap_err().to_string();
        assert!(
            err.contains("expected uint8 [frames, cameras, H, W, 3]"),
            "{err}"
        );
        let folder = dir.path().join("imgs");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("000_a.png"), b"x").unwrap();
        std::fs::write(folder.join("000_b.png"), b"yy").unwrap();
        std::fs::write(folder.join("001_a.png"), b"zzz").unwrap();
        let err = load_frames(&folder, 2).unwrap_err().to_string();
        assert!(err.contains("found 3 PNG/JPEG files"), "{err}");
        let frames = load_frames(&folder, 1).unwrap();
        assert!(matches!(&frames[1], Frame::Encoded { offsets, .. } if *offsets == vec![0, 2]));
    }
}

//! The `action-queue` node, on the robot's side of the policy: it executes the current chunk
//! one action per tick at `CONTROL_HZ`, asks for the next observation (`request`, which the
//! camera honours) when fewer than `REQUEST_THRESHOLD` actions remain, merges the chunk that
//! answers by `MERGE`, and counts starvation, the inference delay in ticks and the jumps at
//! chunk boundaries. The logic is [`queue`] (no dora, no clock); this file is the wall clock
//! and the messages.

pub mod queue;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, Event, EventStream, Parameter, StopCause};
use eyre::{bail, eyre, Result, WrapErr};
use node_common::events::{recv_within, Waited};
use node_common::{
    env_flag, env_opt, env_or, expect_tensor, now_ns, report_rejected, Dim, FrameMeta, SeqGaps,
};
use queue::{ActionQueue, Merge, QueueConfig, Stats};

/// The fastest control rate accepted.
pub const CONTROL_HZ_MAX: f64 = 10_000.0;

/// The delay estimate is the largest of this many last measured delays.
pub const DELAY_WINDOW: usize = 8;

#[derive(Debug, Clone)]
pub struct Settings {
    pub control_hz: f64,
    pub queue: QueueConfig,
    /// Where the summary JSON is written at the end (none: printed only).
    pub summary: Option<PathBuf>,
    /// Real-time chunking: with each request, the actions still planned and the delay go
    /// out on `guide` (seq = the request's), for the policy to guide that frame's chunk.
    pub rtc: bool,
}

impl Settings {
    /// Env: `CONTROL_HZ` (50), `REQUEST_THRESHOLD` (5), `MERGE` (`latest`), `MERGE_WEIGHTS`
    /// (with `weighted`), `DELAY_TICKS` (0: the delay sent before one is measured),
    /// `REQUEST_TIMEOUT_TICKS` (250), `SUMMARY` (unset), `RTC` (false).
    pub fn from_env() -> Result<Self> {
        let control_hz: f64 = env_or("CONTROL_HZ", 50.0)?;
        if !(control_hz.is_finite() && control_hz > 0.0 && control_hz <= CONTROL_HZ_MAX) {
            bail!("env CONTROL_HZ={control_hz} must be a positive number up to {CONTROL_HZ_MAX}");
        }
        let merge_name: String = env_or("MERGE", "latest".to_string())?;
        let weights: Option<String> = env_opt("MERGE_WEIGHTS")?;
        let merge = Merge::parse(&merge_name, weights.as_deref()).wrap_err("env MERGE")?;
        if merge == Merge::Latest && weights.is_some() {
            eprintln!("action-queue: MERGE=latest does not use MERGE_WEIGHTS");
        }
        let queue = QueueConfig {
            threshold: env_or("REQUEST_THRESHOLD", 5)?,
            merge,
            initial_delay: env_or("DELAY_TICKS", 0)?,
            delay_window: DELAY_WINDOW,
            request_timeout: env_or("REQUEST_TIMEOUT_TICKS", 250)?,
        };
        // The checks the queue makes, with the variables named.
        ActionQueue::new(queue.clone())
            .wrap_err("env REQUEST_THRESHOLD / REQUEST_TIMEOUT_TICKS")?;
        Ok(Settings {
            control_hz,
            queue,
            summary: env_opt("SUMMARY")?,
            rtc: env_flag("RTC", false)?,
        })
    }
}

/// What the node reports at the end: the queue's counts and the wall clock's.
#[derive(Debug, Clone)]
pub struct Summary {
    pub stats: Stats,
    pub merge: &'static str,
    pub control_hz: f64,
    /// Ticks that ran more than one period after their due time (the node was late).
    pub late_ticks: u64,
    /// Chunk messages refused (bad tensors or refused by the queue), with their reasons logged.
    pub rejected: u64,
    /// Requests never answered, by the `seq` of the chunks received.
    pub chunk_gaps: u64,
}

impl Summary {
    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let mut delays = s.delays.clone();
        delays.sort_unstable();
        serde_json::json!({
            "merge": self.merge, "control_hz": self.control_hz,
            "ticks": s.ticks, "executed": s.executed, "startup_ticks": s.startup_ticks,
            "starved": s.starved, "starved_episodes": s.starved_episodes,
            "longest_starvation": s.longest_starvation,
            "requests": s.requests, "request_timeouts": s.request_timeouts,
            "superseded_requests": s.superseded_requests,
            "chunks": s.chunks, "rejected": self.rejected, "chunk_gaps": self.chunk_gaps,
            "delay_ticks": s.delays, "delay_ticks_max": delays.last(),
            "delay_ticks_p50": delays.get(delays.len() / 2),
            "boundaries": s.boundaries, "boundary_jump_max": s.boundary_jump_max,
            "naive_jump_max": s.naive_jump_max, "within_jump_max": s.within_jump_max,
            "switch_gap_max": s.switch_gap_max,
            "late_ticks": self.late_ticks,
        })
    }
}

pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let settings = Settings::from_env()?;
    let summary = run_with(&settings, node, events)?;
    let s = &summary.stats;
    println!(
        "action-queue: {} ticks at {} Hz, {} actions, {} starved ({} episodes), {} startup, {} chunks, {} rejected, {} gaps, delay max {} ticks, max jump at boundaries {:.4} ({}; naive switch {:.4}), {} late ticks",
        s.ticks,
        summary.control_hz,
        s.executed,
        s.starved,
        s.starved_episodes,
        s.startup_ticks,
        s.chunks,
        summary.rejected,
        summary.chunk_gaps,
        s.delays.iter().max().copied().unwrap_or(0),
        s.boundary_jump_max,
        summary.merge,
        s.naive_jump_max,
        summary.late_ticks
    );
    if let Some(path) = &settings.summary {
        std::fs::write(path, format!("{}\n", summary.to_json()))
            .wrap_err_with(|| format!("env SUMMARY: cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The node's loop: waits for each tick's due time while taking chunks in, then ticks.
/// Stops on a stop request (`dora stop`, ctrl-c), or once the `actions` input has closed and
/// the plan is empty.
pub fn run_with(
    settings: &Settings,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<Summary> {
    let action_out: DataId = "action".to_string().into();
    let request_out: DataId = "request".to_string().into();
    let guide_out: DataId = "guide".to_string().into();
    let mut queue = ActionQueue::new(settings.queue.clone())?;
    let period = Duration::from_secs_f64(1.0 / settings.control_hz);
    let mut gaps = SeqGaps::default();
    let mut rejected = 0u64;
    let mut late_ticks = 0u64;
    // The frame of every chunk merged (capture time and trace for the actions sent).
    let mut chunk_meta: Option<(u64, FrameMeta)> = None;
    let mut pending_meta: std::collections::BTreeMap<u64, FrameMeta> = Default::default();
    let mut open = true;
    let mut listening = true;
    let start = Instant::now();
    'ticks: loop {
        let due = start + period.mul_f64(queue.next_tick() as f64);
        while let Some(wait) = due
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            if !listening {
                std::thread::sleep(wait);
                continue;
            }
            match recv_within(&mut events, wait) {
                Waited::TimedOut => {}
                Waited::Closed => {
                    listening = false;
                    open = false;
                    queue.close();
                }
                // A stop request ends the run at once; the stop dora sends when every input
                // has closed does not: the plan is executed to its end first.
                Waited::Event(Event::Stop(StopCause::Manual)) => break 'ticks,
                Waited::Event(Event::Stop(_)) => {
                    open = false;
                    queue.close();
                }
                Waited::Event(Event::InputClosed { id }) if id.as_str() == "actions" => {
                    open = false;
                    queue.close();
                }
                Waited::Event(Event::Input { id, metadata, data }) if id.as_str() == "actions" => {
                    let md = &metadata.parameters;
                    let result = (|| -> Result<()> {
                        let meta = FrameMeta::from_metadata("actions", md)?;
                        gaps.observe(meta.seq);
                        let (shape, a) = expect_tensor::<f32>(
                            "actions",
                            md,
                            &data,
                            "float32",
                            &[Dim::Any, Dim::Any],
                        )?;
                        queue.on_chunk(meta.seq, a, shape[1])?;
                        pending_meta.insert(meta.seq, meta);
                        Ok(())
                    })();
                    if let Err(e) = result {
                        rejected += 1;
                        report_rejected("action-queue", &e);
                    }
                }
                Waited::Event(_) => {}
            }
        }
        if Instant::now().saturating_duration_since(due) > period {
            late_ticks += 1;
        }
        let tick = queue.tick();
        if let Some(seq) = tick.chunk {
            if chunk_meta.is_none_or(|(s, _)| s != seq) {
                if let Some(m) = pending_meta.remove(&seq) {
                    chunk_meta = Some((seq, m));
                }
                pending_meta.retain(|&s, _| s > seq);
            }
        }
        if let (Some(a), Some((chunk, meta))) = (tick.action, chunk_meta) {
            let frame = FrameMeta {
                seq: tick.tick,
                ..meta
            };
            let mut md = frame.tensor_params(&[1, a.len()], "float32");
            md.insert("chunk".into(), Parameter::Integer(chunk as i64));
            node.send_output(action_out.clone(), md, a)
                .map_err(|e| eyre!("sending the action of tick {}: {e}", tick.tick))?;
        }
        if let Some(r) = tick.request {
            let mut md = FrameMeta {
                seq: r.seq,
                t_capture_ns: now_ns(),
                trace: None,
            }
            .params();
            md.insert(
                "delay_ticks".into(),
                Parameter::Integer(r.delay_ticks as i64),
            );
            md.insert("tick".into(), Parameter::Integer(r.tick as i64));
            // The guide first: the policy joins it with the frame the request makes.
            if settings.rtc {
                let rows = r.leftover.len().checked_div(r.dims).unwrap_or(0);
                let mut g = FrameMeta {
                    seq: r.seq,
                    t_capture_ns: now_ns(),
                    trace: None,
                }
                .tensor_params(&[rows, r.dims], "float32");
                g.insert(
                    "delay_ticks".into(),
                    Parameter::Integer(r.delay_ticks as i64),
                );
                node.send_output(guide_out.clone(), g, r.leftover.clone())
                    .map_err(|e| eyre!("sending the guide of request {}: {e}", r.seq))?;
            }
            node.send_output(request_out.clone(), md, Vec::<u8>::new())
                .map_err(|e| eyre!("sending request {}: {e}", r.seq))?;
        }
        if !open && queue.remaining() == 0 {
            break;
        }
    }
    Ok(Summary {
        stats: queue.stats().clone(),
        merge: queue.merge_name(),
        control_hz: settings.control_hz,
        late_ticks,
        rejected,
        chunk_gaps: gaps.gaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_common::testing::{event, json, run_node, values, TensorInput};

    /// A chunk for request 0 (horizon 8, 2 dims: row i = [i, -i]) and a malformed one: the
    /// node sends request 0 at its first tick, then one action per tick, the first chunk
    /// from its first row, and ends once the input has closed and the chunk is spent.
    #[test]
    fn executes_a_chunk_tick_by_tick_and_refuses_a_bad_one() {
        let rows: Vec<f32> = (0..8).flat_map(|i| [i as f32, -(i as f32)]).collect();
        let msg = |seq, dtype: &'static str| TensorInput {
            id: "actions",
            seq,
            shape: &[8, 2],
            dtype,
            arrow_type: "Float32",
            values: json(&rows),
            extra: vec![],
        };
        let events = vec![event(0.02, msg(0, "float32")), event(0.03, msg(1, "uint8"))];
        let settings = Settings {
            control_hz: 50.0,
            queue: QueueConfig {
                threshold: 2,
                merge: Merge::Latest,
                initial_delay: 0,
                delay_window: DELAY_WINDOW,
                request_timeout: 1000,
            },
            summary: None,
            rtc: false,
        };
        let mut summary = None;
        let out = run_node("action-queue", events, |node, ev| {
            summary = Some(run_with(&settings, node, ev)?);
            Ok(())
        })
        .unwrap();
        let summary = summary.unwrap();
        assert_eq!(out[0]["id"], "request", "the first tick asks for a frame");
        let actions: Vec<Vec<f64>> = out
            .iter()
            .filter(|o| o["id"] == "action")
            .map(values)
            .collect();
        assert!(!actions.is_empty());
        // The first chunk runs whole, row by row, whatever tick it landed on.
        let want: Vec<Vec<f64>> = (0..8).map(|i| vec![i as f64, -(i as f64)]).collect();
        assert_eq!(actions, want);
        assert_eq!(summary.rejected, 1);
        assert_eq!(summary.stats.chunks, 1);
        assert_eq!(summary.stats.starved, 0);
        assert_eq!(summary.stats.executed, actions.len() as u64);
        assert_eq!(summary.stats.delays.len(), 1);
    }

    #[test]
    fn bad_settings_name_the_variable() {
        std::env::set_var("CONTROL_HZ", "0");
        let err = format!("{:#}", Settings::from_env().unwrap_err());
        assert!(err.contains("CONTROL_HZ=0"), "{err}");
        std::env::set_var("CONTROL_HZ", "50");
        std::env::set_var("MERGE", "weighted");
        let err = format!("{:#}", Settings::from_env().unwrap_err());
        assert!(err.contains("needs MERGE_WEIGHTS"), "{err}");
        std::env::set_var("MERGE_WEIGHTS", "0.7,0.3");
        std::env::set_var("REQUEST_THRESHOLD", "0");
        let err = format!("{:#}", Settings::from_env().unwrap_err());
        assert!(err.contains("REQUEST_THRESHOLD"), "{err}");
        std::env::set_var("REQUEST_THRESHOLD", "4");
        let s = Settings::from_env().unwrap();
        assert_eq!(s.queue.merge, Merge::Weighted(vec![0.7, 0.3]));
        assert_eq!(s.queue.threshold, 4);
        for k in ["CONTROL_HZ", "MERGE", "MERGE_WEIGHTS", "REQUEST_THRESHOLD"] {
            std::env::remove_var(k);
        }
    }
}

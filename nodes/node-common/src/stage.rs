//! The event loop of a stage node, written once (in the spirit of dora's
//! `DoraOperator::on_event` and copper's `CuTask`): a stage node is its [`Spec`] plus a
//! [`Stage`] whose `on_frame` runs one frame. The loop joins each frame's parts by `seq`
//! ([`Frames`]), counts gaps, rejects what fails (logged, counted, traced, sent on
//! `rejected`), hands `release` messages to the stage's ring, stops once the frames' inputs
//! have closed, waits up to 2 s for ring slots consumers still hold, and prints the node's
//! summary line: `NAME: N frames, G gaps, R frames rejected, M messages refused` and the
//! stage's own fields.

use std::time::{Duration, Instant};

use dora_node_api::{DoraNode, Event, EventStream, IntoArrow, MetadataParameters, TryRecvError};
use eyre::{eyre, Result};

use crate::events::{recv_for, recv_within, Waited};
use crate::ipc::release_from;
use crate::join::{Frames, Joined, Part};
use crate::reject::declares_rejected;
use crate::ring::HOLD_LIMIT;
use crate::trace::{StageSpan, Tracer};
use crate::FrameMeta;

/// The input on which consumers hand ring slots back.
pub const RELEASE: &str = "release";

/// Parts whose producer waits on this node's own output (an action queue's `guide`, sent
/// ahead of the requests that this node's actions answer): they do not keep the node running
/// once the other parts have closed.
const FEEDBACK_PARTS: &[&str] = &["guide"];

/// What the loop needs to know of a stage node.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The stage's name: the prefix of the node's log and summary lines.
    pub name: &'static str,
    /// The stage whose span a frame runs under, and a rejected frame is traced as (the
    /// first stage the node runs: `vision` for the fused policy).
    pub traced_as: &'static str,
    /// The inputs that are parts of every frame, joined by `seq`; the main one first.
    pub parts: Vec<&'static str>,
    /// Rejected frames are sent on the `rejected` output.
    pub send_rejections: bool,
    /// The backend named on every span.
    pub backend: String,
}

impl Spec {
    /// Stage `name` of `node`, on `backend`, whose frames are made of `parts` (main input
    /// first); it sends rejections when the dataflow declares its `rejected` output.
    pub fn new(
        node: &DoraNode,
        name: &'static str,
        parts: &[&'static str],
        backend: impl Into<String>,
    ) -> Self {
        Spec {
            name,
            traced_as: name,
            parts: parts.to_vec(),
            send_rejections: declares_rejected(node),
            backend: backend.into(),
        }
    }
}

/// A stage node's work. Only `on_frame` is required; the hooks serve the stages that keep
/// state across frames (a ring of slots lent to a consumer, frames in flight on a GPU).
pub trait Stage {
    /// Runs one frame whose parts have all arrived: its span, its outputs. An error rejects
    /// the frame and the node goes on.
    fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()>;

    /// A consumer handed back ring slot `slot`, which held frame `seq` (the `release`
    /// input).
    fn on_release(&mut self, slot: usize, seq: u64) {
        let _ = (slot, seq);
    }

    /// Ring slots consumers still hold. At the end the loop waits for their release (up to
    /// 2 s: a consumer that is gone never answers) before the stage, and its ring, drop.
    fn held_slots(&self) -> usize {
        0
    }

    /// A part of a frame that will never run (its other parts were lost, or the stream
    /// ended): hand back what it holds, e.g. the producer's ring slot of a CUDA IPC tensor.
    fn on_dropped_part(&mut self, node: &mut DoraNode, part: &Part) {
        let _ = (node, part);
    }

    /// How long to wait for the next event before calling [`Stage::poll`] anyway; None
    /// waits as long as it takes (nothing in flight); zero does not wait: takes an event
    /// already queued, or polls at once with [`Cx::idle`] true.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }

    /// Called after every event, and after every [`Stage::poll_interval`] without one: sends
    /// the work that finished meanwhile.
    fn poll(&mut self, cx: &mut Cx) {
        let _ = cx;
    }

    /// The inputs have closed: finishes the work still in flight (before the frames still
    /// waiting for parts are rejected).
    fn finish(&mut self, cx: &mut Cx) {
        let _ = cx;
    }

    /// The stage's own fields, appended to the summary line after the counts (starting with
    /// their separator, e.g. `; cuda-ipc: ...`).
    fn summary(&self) -> String {
        String::new()
    }
}

/// What a hook may use: the node, its tracer and its frames' record.
pub struct Cx<'a> {
    pub node: &'a mut DoraNode,
    pub tracer: &'a Tracer,
    frames: &'a mut Frames,
    traced_as: &'static str,
    fatal: &'a mut Option<eyre::Report>,
    /// In [`Stage::poll`]: no event was waiting when it was called.
    idle: bool,
}

impl Cx<'_> {
    /// Starts the stage's span of frame `meta`; gives the span and the frame as this stage
    /// sends it on (its messages parent the next stage's span).
    pub fn start_span(&self, meta: FrameMeta) -> (StageSpan, FrameMeta) {
        let span = self.tracer.start(self.traced_as, meta.seq, meta.trace);
        let meta = meta.traced(span.id());
        (span, meta)
    }

    /// Sends `data` with `params` on `output`; an error names the output.
    pub fn send(
        &mut self,
        output: &str,
        params: MetadataParameters,
        data: impl IntoArrow,
    ) -> Result<()> {
        self.node
            .send_output(output.to_string().into(), params, data)
            .map_err(|e| eyre!("sending {output}: {e}"))
    }

    /// In [`Stage::poll`]: true when no event was waiting (the loop found its queue empty,
    /// or waited [`Stage::poll_interval`] for nothing); false after an event. A stage that
    /// batches the frames already waiting runs its batch when this is true.
    pub fn idle(&self) -> bool {
        self.idle
    }

    /// Frame `meta` failed with `err` (outside `on_frame`, whose errors the loop rejects).
    pub fn reject(&mut self, meta: FrameMeta, err: &eyre::Report) {
        self.frames.reject(self.node, self.tracer, meta, err);
    }

    /// A message that belongs to no frame is refused.
    pub fn refuse(&mut self, err: &eyre::Report) {
        self.frames.rejections.message(err);
    }

    /// Stops the node with `err` once this hook returns: a setting that cannot work, not the
    /// fault of one frame.
    pub fn stop(&mut self, err: eyre::Report) {
        self.fatal.get_or_insert(err);
    }
}

/// Runs `stage` as node `node` on `events` until its frames' inputs close (or the dataflow
/// stops), then prints its summary line.
pub fn run<S: Stage>(
    spec: &Spec,
    stage: &mut S,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    let tracer = crate::tracer(&node, &spec.backend)?;
    let mut frames = Frames::new(
        node.id().as_ref(),
        spec.traced_as,
        &spec.parts,
        spec.send_rejections,
    );
    let mut fatal = None;
    macro_rules! cx {
        () => {
            Cx {
                node: &mut node,
                tracer: &tracer,
                frames: &mut frames,
                traced_as: spec.traced_as,
                fatal: &mut fatal,
                idle: false,
            }
        };
    }
    // The parts' inputs still open: once none is, no frame can complete. (Other inputs,
    // such as `release` looping back from a consumer, would keep the stream open forever.)
    let mut open = spec.parts.clone();
    loop {
        // `idle`: no event was waiting (the wait timed out, or none was queued when the stage
        // asked not to wait at all).
        let waited = match stage.poll_interval() {
            Some(wait) if wait.is_zero() => match events.try_recv() {
                Ok(event) => Waited::Event(event),
                Err(TryRecvError::Empty) => Waited::TimedOut,
                Err(TryRecvError::Closed) => Waited::Closed,
            },
            wait => recv_for(&mut events, wait),
        };
        let idle = matches!(waited, Waited::TimedOut);
        match waited {
            Waited::Closed | Waited::Event(Event::Stop(_)) => break,
            Waited::Event(Event::InputClosed { id }) => {
                open.retain(|p| *p != id.as_str());
                if open.is_empty() {
                    break;
                }
            }
            Waited::Event(Event::Input { id, metadata, .. })
                if id.as_str() == RELEASE && !frames.join.has(RELEASE) =>
            {
                match release_from(&metadata.parameters) {
                    Ok((slot, seq)) => stage.on_release(slot as usize, seq),
                    Err(e) => frames.rejections.message(&e),
                }
            }
            Waited::Event(Event::Input { id, metadata, data }) => {
                let frame = frames.take(
                    &mut node,
                    &tracer,
                    id.as_str(),
                    metadata.parameters,
                    data,
                    |node, part| stage.on_dropped_part(node, part),
                );
                if let Some(frame) = frame {
                    let meta = frame.meta();
                    if let Err(e) = stage.on_frame(&mut cx!(), frame) {
                        frames.reject(&mut node, &tracer, meta, &e);
                    }
                }
            }
            Waited::Event(_) | Waited::TimedOut => {}
        }
        if let Some(e) = fatal.take() {
            return Err(e);
        }
        // Once every part that does not loop back has closed, only frames already holding
        // those parts can still complete: a feedback part alone (an action queue's guides,
        // which keep coming while this node's actions do) must not keep the node, and
        // through it the loop, running forever.
        if open.iter().all(|p| FEEDBACK_PARTS.contains(p)) {
            let closed: Vec<&str> = spec
                .parts
                .iter()
                .copied()
                .filter(|p| !FEEDBACK_PARTS.contains(p))
                .collect();
            if !frames.join.may_complete_without(&closed) {
                break;
            }
        }
        let mut cx = cx!();
        cx.idle = idle;
        stage.poll(&mut cx);
        if let Some(e) = fatal.take() {
            return Err(e);
        }
    }
    stage.finish(&mut cx!());
    if let Some(e) = fatal.take() {
        return Err(e);
    }
    frames.close(&mut node, &tracer, |node, part| {
        stage.on_dropped_part(node, part)
    });
    wait_for_releases(stage, &mut events);
    eprintln!("{}: {}{}", spec.name, frames.summary(), stage.summary());
    Ok(())
}

/// Slots still held by consumers may be mid-copy: waits for their release (at most
/// [`HOLD_LIMIT`], a consumer that is gone never answers) before the ring's memory is freed.
fn wait_for_releases<S: Stage>(stage: &mut S, events: &mut EventStream) {
    let deadline = Instant::now() + HOLD_LIMIT;
    while stage.held_slots() > 0 {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match recv_within(events, left) {
            Waited::Event(Event::Input { id, metadata, .. }) if id.as_str() == RELEASE => {
                if let Ok((slot, seq)) = release_from(&metadata.parameters) {
                    stage.on_release(slot as usize, seq);
                }
            }
            Waited::Event(Event::InputClosed { id }) if id.as_str() == RELEASE => break,
            Waited::Closed | Waited::Event(Event::Stop(_)) => break,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::release_params;
    use crate::ring::{RingOut, TestRing};
    use crate::testing::{event, json, run_node, TensorInput};
    use dora_node_api::integration_testing::integration_testing_format::{
        IncomingEvent, TimedIncomingEvent,
    };
    use dora_node_api::serde_json::{Map, Value};

    fn part(t: f64, id: &'static str, seq: u64) -> TimedIncomingEvent {
        event(
            t,
            TensorInput {
                id,
                seq,
                shape: &[1],
                dtype: "float32",
                arrow_type: "Float32",
                values: json(&[seq as f32]),
                extra: vec![],
            },
        )
    }

    fn release(t: f64, slot: u64, seq: u64) -> TimedIncomingEvent {
        let meta = FrameMeta {
            seq,
            t_capture_ns: 1,
            trace: None,
        };
        TimedIncomingEvent {
            time_offset_secs: t,
            event: IncomingEvent::Input {
                id: RELEASE.to_string().into(),
                metadata: Some(release_params(meta, slot)),
                data: None,
            },
        }
    }

    fn closed(t: f64, id: &str) -> TimedIncomingEvent {
        TimedIncomingEvent {
            time_offset_secs: t,
            event: IncomingEvent::InputClosed {
                id: id.to_string().into(),
            },
        }
    }

    fn spec(parts: &[&'static str]) -> Spec {
        Spec {
            name: "test",
            traced_as: "vision",
            parts: parts.to_vec(),
            send_rejections: true,
            backend: "test".into(),
        }
    }

    /// (output id, first value as text) of each output.
    fn sent(out: &[Map<String, Value>]) -> Vec<(String, String)> {
        out.iter()
            .map(|o| {
                let id = o["id"].as_str().unwrap_or_default().to_string();
                let v = &o["data"][0];
                (id, v.as_str().map_or_else(|| v.to_string(), str::to_string))
            })
            .collect()
    }

    /// A producer lending ring slots: each frame takes one and sends `out`.
    struct Lender {
        ring: RingOut<TestRing>,
    }

    impl Stage for Lender {
        fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
            let (span, meta) = cx.start_span(frame.meta());
            let slot = self.ring.acquire(meta.seq)?;
            cx.send("out", meta.params(), vec![slot as f32])?;
            span.end();
            Ok(())
        }
        fn on_release(&mut self, slot: usize, seq: u64) {
            self.ring.release(slot, seq);
        }
        fn held_slots(&self) -> usize {
            self.ring.busy()
        }
        fn summary(&self) -> String {
            format!("; {}", self.ring.summary())
        }
    }

    /// Frames find the ring full until a slot comes back on `release`; a bad release is
    /// refused; the main input's close stops the loop, which then waits for the slots still
    /// held before the ring goes.
    #[test]
    fn ring_slots_are_lent_and_waited_for() {
        let events = vec![
            part(0.0, "images", 0),
            part(0.01, "images", 1),
            part(0.02, "images", 2),
            release(0.03, 0, 0),
            TimedIncomingEvent {
                time_offset_secs: 0.04,
                event: IncomingEvent::Input {
                    id: RELEASE.to_string().into(),
                    metadata: None,
                    data: None,
                },
            },
            part(0.05, "images", 3),
            closed(0.06, "images"),
            release(0.07, 1, 1),
            release(0.08, 0, 3),
        ];
        let mut stage = Lender {
            ring: RingOut::new(TestRing::new(2), "test"),
        };
        let out = run_node("test", events, |node, ev| {
            run(&spec(&["images"]), &mut stage, node, ev)
        })
        .unwrap();
        let out = sent(&out);
        let ids: Vec<&str> = out.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["out", "out", "rejected", "out"], "{out:?}");
        assert!(
            out[2].1.contains("frame 2: dropped, every ring slot"),
            "{out:?}"
        );
        assert_eq!(out[3].1, "0.0", "frame 3 takes the released slot");
        assert_eq!(stage.ring.busy(), 0, "the slots held at the end came back");
        assert_eq!(
            stage.ring.summary(),
            "1 frames dropped with the ring full, 0 slots reclaimed, 0 stale releases"
        );
    }

    /// A consumer of two parts: a frame whose partner part was lost is rejected and its part
    /// handed to `on_dropped_part`; the loop runs until every part's input has closed.
    struct Joiner {
        dropped: Vec<(String, u64)>,
    }

    impl Stage for Joiner {
        fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
            let meta = frame.meta();
            cx.send("out", meta.params(), vec![frame.seq as f32])
        }
        fn on_dropped_part(&mut self, _: &mut DoraNode, part: &Part) {
            self.dropped.push((part_value(part), part.meta.seq));
        }
    }

    fn part_value(part: &Part) -> String {
        let v: &[f32] = (&part.data).try_into().unwrap_or(&[]);
        format!("value {}", v.first().copied().unwrap_or(-1.0))
    }

    #[test]
    fn lost_parts_are_handed_back_and_the_loop_waits_for_every_part() {
        let events = vec![
            part(0.0, "b", 5),
            part(0.01, "b", 6),
            part(0.02, "a", 6),
            closed(0.03, "a"),
            // `a` has closed, `b` has not: its messages are still taken in.
            part(0.04, "b", 7),
            closed(0.05, "b"),
        ];
        let mut stage = Joiner { dropped: vec![] };
        let out = run_node("test", events, |node, ev| {
            run(&spec(&["a", "b"]), &mut stage, node, ev)
        })
        .unwrap();
        let out = sent(&out);
        let ids: Vec<&str> = out.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["rejected", "out", "rejected"], "{out:?}");
        assert!(out[0].1.contains("frame 5") && out[0].1.contains("`a` never arrived"));
        assert!(out[2].1.contains("frame 7") && out[2].1.contains("the input stream ended"));
        assert_eq!(
            stage.dropped,
            [("value 5".to_string(), 5), ("value 7".to_string(), 7)]
        );
    }

    /// Work in flight: `poll` runs between events (and while none arrives), `finish` at the
    /// end sends what is left, and `stop` ends the node with an error.
    struct InFlight {
        queue: std::collections::VecDeque<FrameMeta>,
        polls: u64,
        finished: bool,
    }

    impl Stage for InFlight {
        fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
            if frame.seq == 99 {
                cx.stop(eyre!("frame 99 cannot work"));
            }
            self.queue.push_back(frame.meta());
            Ok(())
        }
        fn poll_interval(&self) -> Option<Duration> {
            (!self.queue.is_empty()).then_some(Duration::from_micros(500))
        }
        fn poll(&mut self, cx: &mut Cx) {
            self.polls += 1;
            // The oldest frame is done after a few polls.
            if self.polls.is_multiple_of(3) {
                if let Some(meta) = self.queue.pop_front() {
                    if let Err(e) = cx.send("out", meta.params(), vec![meta.seq as f32]) {
                        cx.reject(meta, &e);
                    }
                }
            }
        }
        fn finish(&mut self, cx: &mut Cx) {
            self.finished = true;
            while let Some(meta) = self.queue.pop_front() {
                let _ = cx.send("out", meta.params(), vec![meta.seq as f32]);
            }
        }
    }

    #[test]
    fn in_flight_work_is_polled_and_finished() {
        let events = vec![
            part(0.0, "images", 1),
            part(0.0, "images", 2),
            part(0.05, "images", 3),
        ];
        let mut stage = InFlight {
            queue: Default::default(),
            polls: 0,
            finished: false,
        };
        let out = run_node("test", events, |node, ev| {
            run(&spec(&["images"]), &mut stage, node, ev)
        })
        .unwrap();
        let values: Vec<String> = sent(&out).into_iter().map(|(_, v)| v).collect();
        assert_eq!(values, ["1.0", "2.0", "3.0"]);
        assert!(stage.finished && stage.polls >= 3, "{}", stage.polls);

        let mut stage = InFlight {
            queue: Default::default(),
            polls: 0,
            finished: false,
        };
        let err = run_node("test", vec![part(0.0, "images", 99)], |node, ev| {
            run(&spec(&["images"]), &mut stage, node, ev)
        })
        .unwrap_err();
        assert!(err.to_string().contains("frame 99 cannot work"), "{err}");
        assert!(!stage.finished);
    }
}

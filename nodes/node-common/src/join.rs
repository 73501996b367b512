//! A frame's parts joined by `seq`. A node that takes several inputs per frame (the policy:
//! images, state, prompt tokens; prefix: image embeddings and tokens; denoise: the K/V cache
//! and state) must not depend on the order in which they arrive: dora 1.1 hands out queued
//! inputs least recently used input first, in an order that differs from process to process,
//! so when a frame's messages reach a busy node together its images can come before its
//! state. [`FrameJoin`] holds each frame's parts until every wired part is there.
//!
//! What it may assume is that one input delivers its messages in the order they were sent.
//! So a frame still waiting for input `x` can never be completed once `x` has delivered a
//! later frame, or once a later frame has completed: its part was lost upstream (a dropped
//! message). Such frames are given back as [`Dropped`], with the parts they hold (a CUDA IPC
//! part's ring slot must still be handed back), and so are the oldest when more than
//! `capacity` frames wait, and every waiting frame when the stream ends.

use std::collections::BTreeMap;

use dora_node_api::{DoraArray, DoraNode, MetadataParameters};
use eyre::{bail, eyre, Result};

use crate::reject::Rejections;
use crate::trace::Tracer;
use crate::{FrameMeta, SeqGaps};

/// One message of a frame.
pub struct Part {
    pub meta: FrameMeta,
    pub metadata: MetadataParameters,
    pub data: DoraArray,
}

/// A frame whose wired parts have all arrived.
pub struct Joined {
    pub seq: u64,
    inputs: Vec<&'static str>,
    parts: Vec<Option<Part>>,
}

impl Joined {
    /// The part of `input` (None when that input is not wired).
    pub fn part(&self, input: &str) -> Option<&Part> {
        let i = self.inputs.iter().position(|&x| x == input)?;
        self.parts[i].as_ref()
    }

    /// The part of `input`, taken out of the frame.
    pub fn take(&mut self, input: &str) -> Option<Part> {
        let i = self.inputs.iter().position(|&x| x == input)?;
        self.parts[i].take()
    }

    /// The frame's identity: that of its first part (the main input's), whose trace context
    /// parents the stage's span.
    pub fn meta(&self) -> FrameMeta {
        self.parts
            .iter()
            .flatten()
            .next()
            .map(|p| p.meta)
            .unwrap_or(FrameMeta {
                seq: self.seq,
                t_capture_ns: 0,
                trace: None,
            })
    }
}

/// A frame that will not be completed, with the parts it got.
pub struct Dropped {
    pub seq: u64,
    /// Why, naming the parts that are missing.
    pub reason: String,
    pub parts: Vec<Part>,
}

impl Dropped {
    /// The frame's identity, from the first part it got.
    pub fn meta(&self) -> FrameMeta {
        self.parts.first().map(|p| p.meta).unwrap_or(FrameMeta {
            seq: self.seq,
            t_capture_ns: 0,
            trace: None,
        })
    }
}

/// What one message did: at most one frame completed, and the frames it showed to be lost.
#[derive(Default)]
pub struct Inserted {
    pub ready: Option<Joined>,
    pub dropped: Vec<Dropped>,
}

/// Counts over the node's life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JoinStats {
    /// Frames whose parts all arrived.
    pub joined: u64,
    /// Frames given up on (a part lost upstream, too many waiting, or the stream ended).
    pub incomplete: u64,
    /// Messages refused: no `seq`, or a second part of one input for the same frame.
    pub refused: u64,
}

/// Parts waiting for their frame, keyed by `seq`.
pub struct FrameJoin {
    inputs: Vec<&'static str>,
    pending: BTreeMap<u64, Vec<Option<Part>>>,
    capacity: usize,
    stats: JoinStats,
}

impl FrameJoin {
    /// Frames that may wait at once; the openpi server keeps at most 32 in flight.
    pub const CAPACITY: usize = 64;

    /// A join over `inputs` (each a part of every frame), at most `capacity` frames waiting.
    pub fn new(inputs: &[&'static str], capacity: usize) -> Self {
        FrameJoin {
            inputs: inputs.to_vec(),
            pending: BTreeMap::new(),
            capacity: capacity.max(1),
            stats: JoinStats::default(),
        }
    }

    /// Those of `optional` that the node's dataflow wires as inputs.
    pub fn wired(node: &dora_node_api::DoraNode, optional: &[&'static str]) -> Vec<&'static str> {
        let inputs = &node.node_config().inputs;
        optional
            .iter()
            .copied()
            .filter(|o| inputs.keys().any(|k| k.as_str() == *o))
            .collect()
    }

    /// Whether `input` is a part of every frame.
    pub fn has(&self, input: &str) -> bool {
        self.inputs.contains(&input)
    }

    pub fn stats(&self) -> JoinStats {
        self.stats
    }

    /// Frames waiting for parts.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// Whether a frame that could still complete once `closed` inputs send nothing more is
    /// waiting: one that already holds a part of each of them.
    pub fn may_complete_without(&self, closed: &[&str]) -> bool {
        let slots: Vec<usize> = closed
            .iter()
            .filter_map(|c| self.inputs.iter().position(|x| x == c))
            .collect();
        self.pending.values().any(|parts| {
            slots
                .iter()
                .all(|&i| parts.get(i).is_some_and(Option::is_some))
        })
    }

    /// Takes in a message of part `input`. An error (no `seq`, or a second message of
    /// `input` for a frame that already has one) refuses the message and leaves every
    /// waiting frame as it was.
    pub fn insert(
        &mut self,
        input: &str,
        metadata: MetadataParameters,
        data: DoraArray,
    ) -> Result<Inserted> {
        let Some(slot) = self.inputs.iter().position(|&x| x == input) else {
            bail!("internal: `{input}` is not a part of this node's frames");
        };
        let meta = match FrameMeta::from_metadata(input, &metadata) {
            Ok(m) => m,
            Err(e) => {
                self.stats.refused += 1;
                return Err(e);
            }
        };
        let seq = meta.seq;
        let n = self.inputs.len();
        let entry = self
            .pending
            .entry(seq)
            .or_insert_with(|| (0..n).map(|_| None).collect());
        if entry[slot].is_some() {
            self.stats.refused += 1;
            bail!("input `{input}`: a second message for frame {seq} (the first is kept)");
        }
        entry[slot] = Some(Part {
            meta,
            metadata,
            data,
        });
        let mut out = Inserted::default();
        if entry.iter().all(Option::is_some) {
            if let Some(parts) = self.pending.remove(&seq) {
                self.stats.joined += 1;
                out.ready = Some(Joined {
                    seq,
                    inputs: self.inputs.clone(),
                    parts,
                });
            }
        }
        // Frames before this one that still wait for `input` (it has moved past them), and,
        // when this frame completed, every frame before it: their missing parts were lost.
        let completed = out.ready.is_some();
        let lost: Vec<u64> = self
            .pending
            .range(..seq)
            .filter(|(_, parts)| completed || parts[slot].is_none())
            .map(|(&s, _)| s)
            .collect();
        for s in lost {
            let why = if completed {
                format!("frame {seq} completed first")
            } else {
                format!("`{input}` has moved on to frame {seq}")
            };
            out.dropped.push(self.drop_frame(s, &why));
        }
        while self.pending.len() > self.capacity {
            let Some(&oldest) = self.pending.keys().next() else {
                break;
            };
            let why = format!("more than {} frames waiting", self.capacity);
            out.dropped.push(self.drop_frame(oldest, &why));
        }
        Ok(out)
    }

    /// Gives up on every waiting frame (the stream ended).
    pub fn close(&mut self) -> Vec<Dropped> {
        let seqs: Vec<u64> = self.pending.keys().copied().collect();
        seqs.into_iter()
            .map(|s| self.drop_frame(s, "the input stream ended"))
            .collect()
    }

    fn drop_frame(&mut self, seq: u64, why: &str) -> Dropped {
        let parts = self.pending.remove(&seq).unwrap_or_default();
        let missing: Vec<String> = self
            .inputs
            .iter()
            .zip(&parts)
            .filter(|(_, p)| p.is_none())
            .map(|(i, _)| format!("`{i}`"))
            .collect();
        self.stats.incomplete += 1;
        Dropped {
            seq,
            reason: format!(
                "frame {seq}: dropped incomplete, its {} never arrived ({why}: lost upstream)",
                missing.join(" and ")
            ),
            parts: parts.into_iter().flatten().collect(),
        }
    }
}

/// What a stage node's loop keeps about its frames: the join of their parts, the `seq` gaps
/// and what it rejected. A stage feeds every message of a part input to [`Frames::take`],
/// runs the frames it gives back, and hands each failure to [`Frames::reject`].
pub struct Frames {
    pub join: FrameJoin,
    pub gaps: SeqGaps,
    pub rejections: Rejections,
    /// The stage a rejected frame is traced under.
    stage: &'static str,
}

impl Frames {
    /// Frames of `parts` (the main input first) for node `node`, traced as `stage`; rejections
    /// are sent on `rejected` when `send_rejections`.
    pub fn new(
        node: &str,
        stage: &'static str,
        parts: &[&'static str],
        send_rejections: bool,
    ) -> Self {
        Frames {
            join: FrameJoin::new(parts, FrameJoin::CAPACITY),
            gaps: SeqGaps::default(),
            rejections: Rejections::new(node, send_rejections),
            stage,
        }
    }

    /// Takes in a message of input `id`: the frame it completes, if any (None too for an
    /// input that is no part of a frame). Frames it shows to be lost are rejected, after
    /// `dropped` has seen each of their parts (to hand back a CUDA IPC ring slot).
    pub fn take(
        &mut self,
        node: &mut DoraNode,
        tracer: &Tracer,
        id: &str,
        metadata: MetadataParameters,
        data: DoraArray,
        mut dropped: impl FnMut(&mut DoraNode, &Part),
    ) -> Option<Joined> {
        if !self.join.has(id) {
            return None;
        }
        let inserted = match self.join.insert(id, metadata, data) {
            Ok(i) => i,
            Err(e) => {
                self.rejections.message(&e);
                return None;
            }
        };
        for d in inserted.dropped {
            self.gaps.observe(d.seq);
            for p in &d.parts {
                dropped(node, p);
            }
            let e = eyre!("{}", d.reason);
            self.rejections
                .frame(node, tracer, self.stage, d.meta(), &e);
        }
        let frame = inserted.ready?;
        self.gaps.observe(frame.seq);
        Some(frame)
    }

    /// Frame `meta` failed with `err`.
    pub fn reject(
        &mut self,
        node: &mut DoraNode,
        tracer: &Tracer,
        meta: FrameMeta,
        err: &eyre::Report,
    ) {
        self.rejections.frame(node, tracer, self.stage, meta, err);
    }

    /// Rejects the frames still waiting for parts (the stream ended).
    pub fn close(
        &mut self,
        node: &mut DoraNode,
        tracer: &Tracer,
        mut dropped: impl FnMut(&mut DoraNode, &Part),
    ) {
        for d in self.join.close() {
            for p in &d.parts {
                dropped(node, p);
            }
            let e = eyre!("{}", d.reason);
            self.rejections
                .frame(node, tracer, self.stage, d.meta(), &e);
        }
    }

    /// `N frames, G gaps, R frames rejected, M messages refused`.
    pub fn summary(&self) -> String {
        format!(
            "{} frames, {} gaps, {}",
            self.gaps.frames,
            self.gaps.gaps,
            self.rejections.summary()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dora_node_api::IntoArrow;

    fn msg(seq: u64) -> (MetadataParameters, DoraArray) {
        let meta = FrameMeta {
            seq,
            t_capture_ns: 7,
            trace: None,
        };
        (meta.params(), vec![seq as f32].into_arrow())
    }

    fn put(j: &mut FrameJoin, input: &str, seq: u64) -> Inserted {
        let (md, data) = msg(seq);
        j.insert(input, md, data).unwrap()
    }

    fn value(p: &Part) -> f32 {
        let v: &[f32] = (&p.data).try_into().unwrap();
        v[0]
    }

    /// Every order in which three parts of two frames can arrive (each input in order)
    /// yields both frames, each with its own parts.
    /// Once an input has closed, only a frame already holding its part can complete.
    #[test]
    fn frames_that_may_complete_once_an_input_closes() {
        let mut j = FrameJoin::new(&["images", "guide"], 8);
        assert!(!j.may_complete_without(&["images"]), "nothing waits");
        put(&mut j, "guide", 3);
        assert!(
            !j.may_complete_without(&["images"]),
            "frame 3 lacks its images"
        );
        assert!(
            j.may_complete_without(&["guide"]),
            "frame 3 holds its guide"
        );
        put(&mut j, "images", 4);
        assert!(
            j.may_complete_without(&["images"]),
            "frame 4 holds its images"
        );
        assert!(!j.may_complete_without(&["images", "guide"]));
    }

    #[test]
    fn any_arrival_order_yields_the_same_frames() {
        let inputs = ["images", "state", "tokens"];
        // Each input sends frame 0 then frame 1; interleave the three streams every way.
        let mut orders = vec![vec![]];
        for _ in 0..6 {
            let mut next = vec![];
            for o in &orders {
                for i in 0..3 {
                    let sent = o.iter().filter(|&&x| x == i).count();
                    if sent < 2 {
                        let mut o2 = o.clone();
                        o2.push(i);
                        next.push(o2);
                    }
                }
            }
            orders = next;
        }
        assert_eq!(orders.len(), 90);
        for order in orders {
            let mut j = FrameJoin::new(&inputs, 8);
            let mut sent = [0u64; 3];
            let mut ready = vec![];
            for i in order {
                let out = put(&mut j, inputs[i], sent[i]);
                sent[i] += 1;
                assert!(out.dropped.is_empty());
                if let Some(f) = out.ready {
                    for input in inputs {
                        assert_eq!(value(f.part(input).unwrap()), f.seq as f32);
                    }
                    ready.push(f.seq);
                }
            }
            ready.sort();
            assert_eq!(ready, vec![0, 1]);
            assert_eq!(j.waiting(), 0);
            assert_eq!(j.stats().joined, 2);
        }
    }

    #[test]
    fn lost_parts_drop_their_frame_with_its_parts() {
        let mut j = FrameJoin::new(&["images", "tokens"], 8);
        assert!(put(&mut j, "tokens", 0).ready.is_none());
        assert!(put(&mut j, "tokens", 1).ready.is_none());
        // images 0 was lost: images 1 shows it.
        let out = put(&mut j, "images", 1);
        assert_eq!(out.ready.as_ref().map(|f| f.seq), Some(1));
        assert_eq!(out.dropped.len(), 1);
        let d = &out.dropped[0];
        assert_eq!((d.seq, d.parts.len()), (0, 1));
        assert!(
            d.reason.contains("frame 0") && d.reason.contains("`images` never arrived"),
            "{}",
            d.reason
        );
        // Frames waiting for `tokens` stay while `tokens` has not moved past them...
        assert!(put(&mut j, "images", 2).dropped.is_empty());
        assert!(put(&mut j, "images", 3).dropped.is_empty());
        assert!(put(&mut j, "images", 5).dropped.is_empty());
        // ...and are dropped at once when it does.
        let out = put(&mut j, "tokens", 4);
        let lost: Vec<u64> = out.dropped.iter().map(|d| d.seq).collect();
        assert_eq!(lost, vec![2, 3]);
        assert!(out.dropped[0].reason.contains("`tokens` never arrived"));
        assert!(out.dropped[0]
            .reason
            .contains("`tokens` has moved on to frame 4"));
        assert_eq!(j.waiting(), 2);
        let rest = j.close();
        let left: Vec<u64> = rest.iter().map(|d| d.seq).collect();
        assert_eq!(left, vec![4, 5]);
        assert_eq!(
            j.stats(),
            JoinStats {
                joined: 1,
                incomplete: 5,
                refused: 0
            }
        );
    }

    #[test]
    fn waiting_frames_are_bounded_and_duplicates_refused() {
        let mut j = FrameJoin::new(&["images", "state"], 4);
        // A restarted sender counting from 0 again: nothing is dropped for it.
        for s in (10..14).rev() {
            assert!(put(&mut j, "state", s).dropped.is_empty());
        }
        let out = put(&mut j, "state", 20);
        assert_eq!(j.waiting(), 4);
        assert_eq!(out.dropped.len(), 1, "the oldest frame makes room");
        assert!(out.dropped[0].reason.contains("more than 4 frames waiting"));
        let (md, data) = msg(20);
        let e = j
            .insert("state", md, data)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("a second message for frame 20"), "{e}");
        let e = j
            .insert("state", MetadataParameters::new(), vec![1f32].into_arrow())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("`seq`"), "{e}");
        assert_eq!(j.stats().refused, 2);
        // The first state of frame 20 is the one joined.
        let f = put(&mut j, "images", 20).ready.unwrap();
        assert_eq!(value(f.part("state").unwrap()), 20.0);
    }

    #[test]
    fn a_single_input_passes_every_frame_through() {
        let mut j = FrameJoin::new(&["images"], 2);
        for s in [3, 1, 7] {
            let out = put(&mut j, "images", s);
            assert_eq!(out.ready.map(|f| f.seq), Some(s));
            assert!(out.dropped.is_empty());
        }
    }
}

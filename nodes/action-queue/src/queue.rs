//! The action queue's logic, with no dora and no clock in it: time is the index of the
//! control tick, so the node (wall-clock ticks at `CONTROL_HZ`) and the tests (a fake robot
//! clock, [`simulate`]) drive the same code.
//!
//! Timeline. Tick `k` executes at most one action. A request made at tick `k_r` (right after
//! that tick's action) asks for an observation taken then; action `i` of the chunk that
//! answers it is meant for tick `k_r + 1 + i`. When that chunk is merged before tick `k_a`,
//! its first `d = k_a - (k_r + 1)` actions are already in the past and are skipped: `d` is
//! the inference delay in ticks, measured for every chunk. The first chunk is the exception:
//! the robot has stood still waiting for it (the model loading), so it runs from its first
//! action.

use std::collections::{BTreeMap, VecDeque};

use thiserror::Error;

/// How a new chunk is merged with what is left of the current one.
#[derive(Debug, Clone, PartialEq)]
pub enum Merge {
    /// The new chunk replaces the rest of the old one from the first tick it reaches (the
    /// naive switch).
    Latest,
    /// Over the overlap, the action executed at the `j`-th tick after the merge is
    /// `w[j] * old + (1 - w[j]) * new`, `w[j]` being the old chunk's weight; past the end of
    /// the list, or of the old chunk, the new chunk alone.
    Weighted(Vec<f32>),
}

impl Merge {
    /// `MERGE` (`latest` or `weighted`) with `MERGE_WEIGHTS` (a comma-separated list of the
    /// old chunk's weights, each in [0, 1]; required with `weighted`, not used by `latest`,
    /// so that a graph can switch policies with one variable).
    pub fn parse(merge: &str, weights: Option<&str>) -> Result<Merge, QueueError> {
        match (merge.trim(), weights) {
            ("latest", _) => Ok(Merge::Latest),
            ("weighted", None) => Err(QueueError::Setting(
                "MERGE=weighted needs MERGE_WEIGHTS: the old chunk's weight at each tick of the overlap, e.g. 0.8,0.6,0.4,0.2".into(),
            )),
            ("weighted", Some(list)) => {
                let mut w = Vec::new();
                for item in list.split(',') {
                    let v: f32 = item.trim().parse().map_err(|_| {
                        QueueError::Setting(format!(
                            "MERGE_WEIGHTS={list:?}: {item:?} is not a number"
                        ))
                    })?;
                    if !(0.0..=1.0).contains(&v) {
                        return Err(QueueError::Setting(format!(
                            "MERGE_WEIGHTS={list:?}: {v} is outside [0, 1]"
                        )));
                    }
                    w.push(v);
                }
                Ok(Merge::Weighted(w))
            }
            (other, _) => Err(QueueError::Setting(format!(
                "MERGE={other:?} must be `latest` or `weighted`"
            ))),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Merge::Latest => "latest",
            Merge::Weighted(_) => "weighted",
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum QueueError {
    #[error("{0}")]
    Setting(String),
    #[error("chunk {seq}: {values} values are not a positive whole number of rows of {dims} dims")]
    Shape {
        seq: u64,
        values: usize,
        dims: usize,
    },
    #[error("chunk {seq}: {dims} action dims, the queue holds actions of {expected}")]
    Dims {
        seq: u64,
        dims: usize,
        expected: usize,
    },
    #[error("chunk {seq}: non-finite value at index {index}")]
    NonFinite { seq: u64, index: usize },
    #[error("chunk {seq}: no request had this seq")]
    NotRequested { seq: u64 },
    #[error("chunk {seq}: arrived after chunk {last} was merged (too late, dropped)")]
    Stale { seq: u64, last: u64 },
    #[error("chunk {seq}: its {horizon} actions were all in the past when it arrived (delay {delay} ticks)")]
    Expired {
        seq: u64,
        delay: u64,
        horizon: usize,
    },
}

/// The queue's settings.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// A request is made after a tick that leaves fewer than this many actions planned.
    pub threshold: usize,
    pub merge: Merge,
    /// The delay sent with requests before any chunk has been measured.
    pub initial_delay: u64,
    /// The delay sent with a request is the largest of the last `delay_window` measured
    /// (a conservative estimate: a chunk guided for a longer delay still lines up).
    pub delay_window: usize,
    /// A request unanswered for this many ticks is given up and a new one made (counted in
    /// [`Stats::request_timeouts`]), before the first chunk too, so that a lost first frame
    /// does not leave the robot waiting forever (set it above the model's load time).
    pub request_timeout: u64,
}

/// A request for the next observation.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The seq of the frame to capture; the chunk that answers it carries the same seq.
    pub seq: u64,
    /// The tick it was made at (after that tick's action).
    pub tick: u64,
    /// The expected inference delay in ticks (see [`QueueConfig::delay_window`]).
    pub delay_ticks: u64,
    /// The actions still planned, for ticks `tick + 1, tick + 2, ...` (row-major, `dims` per
    /// row): the new chunk's first actions replace these.
    pub leftover: Vec<f32>,
    pub dims: usize,
}

/// What one tick did.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    pub tick: u64,
    /// The action executed, None when there was none (starvation, or before the first chunk).
    pub action: Option<Vec<f32>>,
    /// The seq of the last chunk merged into the plan.
    pub chunk: Option<u64>,
    pub request: Option<Request>,
}

/// A chunk taken into the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub seq: u64,
    /// Its inference delay in ticks (the actions skipped as past).
    pub delay: u64,
    /// Ticks of the overlap blended with the old chunk (0 with `latest`).
    pub blended: usize,
    /// Actions of the old chunk that were planned and are now replaced.
    pub replaced: usize,
}

/// What the queue counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub ticks: u64,
    pub executed: u64,
    /// Ticks before the first chunk (the model loading); not starvation.
    pub startup_ticks: u64,
    /// Ticks without an action once actions have started.
    pub starved: u64,
    pub starved_episodes: u64,
    pub longest_starvation: u64,
    pub requests: u64,
    pub request_timeouts: u64,
    /// Requests whose chunk never came before a later one was merged.
    pub superseded_requests: u64,
    pub chunks: u64,
    /// Chunks refused (bad shape, not requested, stale, expired), each with its error.
    pub rejected_chunks: u64,
    /// The measured delay of every chunk, in ticks, in arrival order.
    pub delays: Vec<u64>,
    /// Merges after the first chunk (chunk boundaries).
    pub boundaries: u64,
    /// Largest jump (max over dims of |a_k - a_{k-1}|) between consecutive executed actions
    /// at a boundary: the first tick of a new chunk, and with `weighted` every tick of the
    /// blend up to the first tick of the new chunk alone.
    pub boundary_jump_max: f32,
    /// The jump the naive switch (`latest`) would have made at the same boundaries: the new
    /// chunk's first due action against the last executed one.
    pub naive_jump_max: f32,
    /// Largest jump between consecutive executed actions away from boundaries.
    pub within_jump_max: f32,
    /// Largest disagreement (max over dims) between the old and the new chunk at the tick
    /// the new one takes over (the old chunk's planned action against the new chunk's first
    /// due one), over merges that found the old chunk not yet spent.
    pub switch_gap_max: f32,
}

/// The action queue (see the module's timeline).
pub struct ActionQueue {
    cfg: QueueConfig,
    dims: Option<usize>,
    /// Planned actions; the front is for tick `next_tick`.
    plan: VecDeque<Vec<f32>>,
    next_tick: u64,
    /// Requests not answered yet: seq -> tick made.
    requests: BTreeMap<u64, u64>,
    next_seq: u64,
    last_chunk: Option<u64>,
    last_action: Option<Vec<f32>>,
    /// The last tick of the current boundary window.
    window_until: Option<u64>,
    starving: Option<u64>,
    closed: bool,
    stats: Stats,
}

/// max over dims of |a - b|.
pub fn jump(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

impl ActionQueue {
    pub fn new(cfg: QueueConfig) -> Result<Self, QueueError> {
        if cfg.threshold == 0 {
            return Err(QueueError::Setting(
                "REQUEST_THRESHOLD must be at least 1 (a request is made when fewer actions than this remain)".into(),
            ));
        }
        if cfg.delay_window == 0 {
            return Err(QueueError::Setting(
                "the delay window must be at least 1".into(),
            ));
        }
        if cfg.request_timeout == 0 {
            return Err(QueueError::Setting(
                "REQUEST_TIMEOUT_TICKS must be at least 1".into(),
            ));
        }
        Ok(ActionQueue {
            cfg,
            dims: None,
            plan: VecDeque::new(),
            next_tick: 0,
            requests: BTreeMap::new(),
            next_seq: 0,
            last_chunk: None,
            last_action: None,
            window_until: None,
            starving: None,
            closed: false,
            stats: Stats::default(),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn merge_name(&self) -> &'static str {
        self.cfg.merge.name()
    }

    /// Actions planned from the next tick on.
    pub fn remaining(&self) -> usize {
        self.plan.len()
    }

    /// The index of the next tick.
    pub fn next_tick(&self) -> u64 {
        self.next_tick
    }

    /// Whether a chunk has been merged (actions have started).
    pub fn started(&self) -> bool {
        self.last_chunk.is_some()
    }

    /// No more chunks will come: make no more requests.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// The delay sent with the next request.
    pub fn delay_estimate(&self) -> u64 {
        let d = &self.stats.delays;
        d[d.len().saturating_sub(self.cfg.delay_window)..]
            .iter()
            .copied()
            .max()
            .unwrap_or(self.cfg.initial_delay)
    }

    /// Executes tick `next_tick`: pops its action, counts, and makes a request when fewer
    /// than the threshold remain and none is in flight.
    pub fn tick(&mut self) -> Tick {
        let k = self.next_tick;
        self.next_tick += 1;
        self.stats.ticks += 1;
        let action = self.plan.pop_front();
        match &action {
            Some(a) => {
                self.stats.executed += 1;
                self.starving = None;
                if let Some(prev) = &self.last_action {
                    let j = jump(a, prev);
                    let s = &mut self.stats;
                    if self.window_until.is_some_and(|until| k <= until) {
                        s.boundary_jump_max = s.boundary_jump_max.max(j);
                    } else {
                        s.within_jump_max = s.within_jump_max.max(j);
                    }
                }
                self.last_action = Some(a.clone());
            }
            None if self.started() => {
                let run = self.starving.map_or(1, |n| n + 1);
                if run == 1 {
                    self.stats.starved_episodes += 1;
                }
                self.starving = Some(run);
                self.stats.starved += 1;
                self.stats.longest_starvation = self.stats.longest_starvation.max(run);
            }
            None => self.stats.startup_ticks += 1,
        }
        let request =
            (self.plan.len() < self.cfg.threshold && self.may_request(k)).then(|| self.request(k));
        Tick {
            tick: k,
            action,
            chunk: self.last_chunk,
            request,
        }
    }

    /// No request in flight (or the one in flight has timed out) and chunks may still come.
    fn may_request(&mut self, k: u64) -> bool {
        if self.closed {
            return false;
        }
        let newest = self.requests.iter().next_back().map(|(&s, &t)| (s, t));
        match newest {
            None => true,
            Some((_, made)) => {
                if k - made >= self.cfg.request_timeout {
                    self.stats.request_timeouts += 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    fn request(&mut self, k: u64) -> Request {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.requests.insert(seq, k);
        self.stats.requests += 1;
        let dims = self.dims.unwrap_or(0);
        Request {
            seq,
            tick: k,
            delay_ticks: self.delay_estimate(),
            leftover: self.plan.iter().flatten().copied().collect(),
            dims,
        }
    }

    /// Merges chunk `seq` (row-major actions, `dims` per row) before the next tick. A refused
    /// chunk changes nothing but the counts, except an expired one, which still answers its
    /// request and gives a delay measurement.
    pub fn on_chunk(
        &mut self,
        seq: u64,
        actions: &[f32],
        dims: usize,
    ) -> Result<Merged, QueueError> {
        let r = self.merge_chunk(seq, actions, dims);
        if r.is_err() {
            self.stats.rejected_chunks += 1;
        }
        r
    }

    fn merge_chunk(
        &mut self,
        seq: u64,
        actions: &[f32],
        dims: usize,
    ) -> Result<Merged, QueueError> {
        if dims == 0 || actions.is_empty() || !actions.len().is_multiple_of(dims) {
            return Err(QueueError::Shape {
                seq,
                values: actions.len(),
                dims,
            });
        }
        if let Some(expected) = self.dims.filter(|&e| e != dims) {
            return Err(QueueError::Dims {
                seq,
                dims,
                expected,
            });
        }
        if let Some(index) = actions.iter().position(|v| !v.is_finite()) {
            return Err(QueueError::NonFinite { seq, index });
        }
        if let Some(last) = self.last_chunk.filter(|&l| seq <= l) {
            return Err(QueueError::Stale { seq, last });
        }
        let made = *self
            .requests
            .get(&seq)
            .ok_or(QueueError::NotRequested { seq })?;
        // This request and every older one are answered or superseded.
        let older: Vec<u64> = self.requests.range(..=seq).map(|(&s, _)| s).collect();
        for s in older {
            self.requests.remove(&s);
            if s < seq {
                self.stats.superseded_requests += 1;
            }
        }
        let k_a = self.next_tick;
        let delay = k_a.saturating_sub(made + 1);
        self.stats.delays.push(delay);
        let horizon = actions.len() / dims;
        // Before the first chunk the robot has not moved: nothing of it is past.
        let skip = if self.started() {
            usize::try_from(delay).unwrap_or(usize::MAX)
        } else {
            0
        };
        if skip >= horizon {
            return Err(QueueError::Expired {
                seq,
                delay,
                horizon,
            });
        }
        let new: Vec<&[f32]> = actions.chunks_exact(dims).skip(skip).collect();
        let replaced = self.plan.len();
        let old = std::mem::take(&mut self.plan);
        let weights: &[f32] = match &self.cfg.merge {
            Merge::Latest => &[],
            Merge::Weighted(w) => w,
        };
        let mut blended = 0;
        for (j, row) in new.iter().enumerate() {
            match (old.get(j), weights.get(j)) {
                (Some(o), Some(&w)) => {
                    blended += 1;
                    self.plan.push_back(
                        o.iter()
                            .zip(row.iter())
                            .map(|(a, b)| w * a + (1.0 - w) * b)
                            .collect(),
                    );
                }
                _ => self.plan.push_back(row.to_vec()),
            }
        }
        if let Some(o) = old.front() {
            self.stats.switch_gap_max = self.stats.switch_gap_max.max(jump(new[0], o));
        }
        if self.started() {
            self.stats.boundaries += 1;
            if let Some(prev) = &self.last_action {
                self.stats.naive_jump_max = self.stats.naive_jump_max.max(jump(new[0], prev));
            }
            // The blend's ticks, and the first tick of the new chunk alone.
            self.window_until = Some(k_a + blended as u64);
        }
        self.dims = Some(dims);
        self.last_chunk = Some(seq);
        self.stats.chunks += 1;
        Ok(Merged {
            seq,
            delay,
            blended,
            replaced,
        })
    }
}

/// A fake robot clock: runs `ticks` control ticks. Every request is answered at once by
/// `policy` (the chunk, row-major with `dims` per row), and that chunk is merged before tick
/// `request.tick + 1 + inference(&request)`, so its measured delay is `inference(&request)`.
/// Returns every tick (chunks the queue refuses are counted in its stats).
pub fn simulate(
    queue: &mut ActionQueue,
    ticks: u64,
    dims: usize,
    mut inference: impl FnMut(&Request) -> u64,
    mut policy: impl FnMut(&Request) -> Vec<f32>,
) -> Vec<Tick> {
    let mut due: BTreeMap<(u64, u64), Vec<f32>> = BTreeMap::new();
    let mut out = Vec::new();
    for _ in 0..ticks {
        let k = queue.next_tick();
        while let Some(entry) = due.first_entry() {
            if entry.key().0 > k {
                break;
            }
            let ((_, seq), chunk) = entry.remove_entry();
            // Refusals are counted in the queue's stats.
            let _ = queue.on_chunk(seq, &chunk, dims);
        }
        let t = queue.tick();
        if let Some(r) = &t.request {
            let at = r.tick + 1 + inference(r);
            due.insert((at, r.seq), policy(r));
        }
        out.push(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threshold: usize, merge: Merge) -> QueueConfig {
        QueueConfig {
            threshold,
            merge,
            initial_delay: 0,
            delay_window: 4,
            request_timeout: 1000,
        }
    }

    /// A smooth 2-dim trajectory the chunks follow, each chunk with its own offset (as two
    /// samples of a stochastic policy differ): +0.3 for even chunks, -0.3 for odd ones.
    fn trajectory(t: u64) -> [f32; 2] {
        let t = t as f32;
        [(0.05 * t).sin(), (0.03 * t).cos()]
    }

    fn offset_policy(horizon: usize) -> impl FnMut(&Request) -> Vec<f32> {
        move |r: &Request| {
            let off = if r.seq.is_multiple_of(2) { 0.3 } else { -0.3 };
            (0..horizon as u64)
                .flat_map(|i| trajectory(r.tick + 1 + i).map(|v| v + off))
                .collect()
        }
    }

    /// Largest step of the trajectory between two ticks (what a perfect policy would jump).
    fn trajectory_step() -> f32 {
        (0..2000)
            .map(|t| jump(&trajectory(t + 1), &trajectory(t)))
            .fold(0.0, f32::max)
    }

    #[test]
    fn no_starvation_when_the_threshold_covers_the_delay() {
        let mut q = ActionQueue::new(cfg(5, Merge::Latest)).unwrap();
        let ticks = simulate(&mut q, 500, 2, |_| 3, offset_policy(10));
        let s = q.stats();
        assert_eq!(s.starved, 0, "{s:?}");
        assert_eq!(s.startup_ticks, 4, "ticks 0..=3 wait for the first chunk");
        assert_eq!(s.executed, 496);
        assert!(s.delays.iter().all(|&d| d == 3), "{:?}", s.delays);
        assert_eq!(q.delay_estimate(), 3);
        assert!(ticks[4..].iter().all(|t| t.action.is_some()));
        // One request in flight at a time, each answered 4 ticks after it was made.
        assert!((s.chunks..=s.chunks + 1).contains(&s.requests), "{s:?}");
        assert!(s.chunks > 70, "{s:?}");
        assert_eq!(s.rejected_chunks, 0);
    }

    /// Threshold 3, delay 6, horizon 10: request 0 at tick 0 is merged before tick 7 and,
    /// being the first, runs whole (ticks 7..=16); after tick 14 two remain, so request 1
    /// (tick 14) is merged before tick 21 with ticks 21..=24 due (15..=20 are past): ticks
    /// 17..=20 starve, and so on every 8 ticks.
    #[test]
    fn starvation_is_counted_exactly() {
        let mut q = ActionQueue::new(cfg(3, Merge::Latest)).unwrap();
        let ticks = simulate(&mut q, 39, 2, |_| 6, offset_policy(10));
        let s = q.stats();
        let starved: Vec<u64> = ticks
            .iter()
            .filter(|t| t.action.is_none() && t.tick >= 7)
            .map(|t| t.tick)
            .collect();
        assert_eq!(
            starved,
            vec![17, 18, 19, 20, 25, 26, 27, 28, 33, 34, 35, 36]
        );
        assert_eq!(
            (s.starved, s.starved_episodes, s.longest_starvation),
            (12, 3, 4)
        );
        assert_eq!(s.startup_ticks, 7);
        let requested: Vec<u64> = ticks
            .iter()
            .filter_map(|t| t.request.as_ref().map(|r| r.tick))
            .collect();
        assert_eq!(requested, vec![0, 14, 22, 30, 38]);
        assert!(s.delays.iter().all(|&d| d == 6));
    }

    /// The first `d` actions of a chunk are past and skipped: the action executed at tick k
    /// is the chunk's action for tick k (the first chunk runs from its first action, `d`
    /// ticks late).
    #[test]
    fn a_chunk_is_aligned_to_the_ticks_it_was_meant_for() {
        let mut q = ActionQueue::new(cfg(5, Merge::Latest)).unwrap();
        let ticks = simulate(&mut q, 60, 2, |r| 2 + r.seq % 3, offset_policy(10));
        for t in ticks.iter().filter(|t| t.action.is_some()) {
            let seq = t.chunk.unwrap();
            let off = if seq % 2 == 0 { 0.3 } else { -0.3 };
            let meant_for = if seq == 0 { t.tick - 2 } else { t.tick };
            let want = trajectory(meant_for).map(|v| v + off);
            assert_eq!(t.action.as_deref(), Some(&want[..]), "tick {}", t.tick);
        }
        assert_eq!(q.stats().delays[..4], [2, 3, 4, 2]);
        assert_eq!(q.stats().starved, 0);
    }

    /// The same chunks, switched naively and blended: the naive switch jumps by the chunks'
    /// 0.6 disagreement; the blend over 4 ticks (old weights 0.8, 0.6, 0.4, 0.2) moves 0.12
    /// of it per tick, plus the trajectory's own step (at most 0.05).
    #[test]
    fn weighted_blending_is_continuous_where_the_naive_switch_jumps() {
        let run = |merge: Merge| {
            // Requested with 7 left, merged 3 ticks later: 4 ticks of overlap to blend.
            let mut q = ActionQueue::new(cfg(8, merge)).unwrap();
            let ticks = simulate(&mut q, 400, 2, |_| 3, offset_policy(12));
            assert_eq!(q.stats().starved, 0, "{:?}", q.stats());
            // The stream itself: largest jump between consecutive executed actions.
            let stream: Vec<&Vec<f32>> = ticks.iter().filter_map(|t| t.action.as_ref()).collect();
            let max = stream
                .windows(2)
                .map(|w| jump(w[1], w[0]))
                .fold(0.0, f32::max);
            (q.stats().clone(), max)
        };
        let (naive, naive_stream) = run(Merge::Latest);
        let (blend, blend_stream) = run(Merge::Weighted(vec![0.8, 0.6, 0.4, 0.2]));
        let step = trajectory_step();
        println!(
            "max jump at chunk boundaries: latest {:.4}, weighted {:.4} (naive switch at the same boundaries {:.4}); trajectory step {step:.4}",
            naive.boundary_jump_max, blend.boundary_jump_max, blend.naive_jump_max
        );
        assert!(naive.boundaries > 50);
        assert!(naive.boundary_jump_max > 0.6 - step, "{naive:?}");
        assert_eq!(naive.boundary_jump_max, naive.naive_jump_max);
        assert_eq!(
            naive_stream,
            naive.boundary_jump_max.max(naive.within_jump_max)
        );
        // Each blend tick moves a fifth of the 0.6 gap (plus the trajectory's own step).
        assert!(
            blend.boundary_jump_max <= 0.2 * 0.6 + step + 1e-5,
            "{blend:?}"
        );
        assert!(
            blend.boundary_jump_max < 0.5 * blend.naive_jump_max,
            "{blend:?}"
        );
        assert!(blend_stream <= blend.boundary_jump_max.max(blend.within_jump_max));
        assert!(blend.within_jump_max <= step + 1e-6);
    }

    #[test]
    fn weighted_blends_the_overlap_exactly() {
        let mut q = ActionQueue::new(cfg(10, Merge::Weighted(vec![0.75, 0.25]))).unwrap();
        let first = q.tick().request.unwrap();
        assert_eq!((first.seq, first.tick, first.dims), (0, 0, 0));
        q.on_chunk(0, &[0.0, 1.0, 2.0, 3.0, 4.0], 1).unwrap();
        assert_eq!(q.remaining(), 5);
        let t = q.tick();
        assert_eq!(t.action, Some(vec![0.0]));
        let r = t.request.unwrap();
        assert_eq!((r.seq, r.tick, r.dims), (1, 1, 1));
        assert_eq!(
            r.leftover,
            vec![1.0, 2.0, 3.0, 4.0],
            "planned for ticks 2..=5"
        );
        q.tick(); // executes 1.0
                  // Chunk 1 (for ticks 2.., merged before tick 3: delay 1).
        let m = q.on_chunk(1, &[10.0, 20.0, 30.0, 40.0, 50.0], 1).unwrap();
        assert_eq!(
            m,
            Merged {
                seq: 1,
                delay: 1,
                blended: 2,
                replaced: 3
            }
        );
        let got: Vec<f32> = (0..4).map(|_| q.tick().action.unwrap()[0]).collect();
        assert_eq!(
            got,
            vec![
                0.75 * 2.0 + 0.25 * 20.0,
                0.25 * 3.0 + 0.75 * 30.0,
                40.0,
                50.0
            ]
        );
    }

    #[test]
    fn bad_chunks_are_refused_with_their_reason_and_counted() {
        let mut q = ActionQueue::new(cfg(2, Merge::Latest)).unwrap();
        q.tick();
        assert_eq!(
            q.on_chunk(5, &[1.0, 2.0], 2),
            Err(QueueError::NotRequested { seq: 5 })
        );
        assert_eq!(
            q.on_chunk(0, &[1.0, 2.0, 3.0], 2),
            Err(QueueError::Shape {
                seq: 0,
                values: 3,
                dims: 2
            })
        );
        assert_eq!(
            q.on_chunk(0, &[1.0, f32::NAN], 2),
            Err(QueueError::NonFinite { seq: 0, index: 1 })
        );
        q.on_chunk(0, &[1.0, 2.0, 3.0, 4.0], 2).unwrap();
        assert_eq!(
            q.on_chunk(0, &[1.0, 2.0], 2),
            Err(QueueError::Stale { seq: 0, last: 0 })
        );
        let r = q.tick().request.unwrap();
        assert_eq!(
            q.on_chunk(r.seq, &[1.0, 2.0, 3.0], 3),
            Err(QueueError::Dims {
                seq: 1,
                dims: 3,
                expected: 2
            })
        );
        for _ in 0..5 {
            q.tick();
        }
        // Made at tick 1, merged before tick 7: 5 past actions of a 2-action chunk.
        assert_eq!(
            q.on_chunk(1, &[1.0, 2.0, 3.0, 4.0], 2),
            Err(QueueError::Expired {
                seq: 1,
                delay: 5,
                horizon: 2
            })
        );
        let s = q.stats();
        assert_eq!((s.rejected_chunks, s.chunks), (6, 1));
        assert_eq!(s.delays, vec![0, 5]);
        let msg = QueueError::Expired {
            seq: 1,
            delay: 5,
            horizon: 2,
        }
        .to_string();
        assert!(msg.contains("delay 5 ticks"), "{msg}");
    }

    #[test]
    fn a_lost_chunk_times_out_and_is_requested_again() {
        let mut c = cfg(3, Merge::Latest);
        c.request_timeout = 5;
        let mut q = ActionQueue::new(c).unwrap();
        // The first request (tick 0) is lost too: made again at tick 5.
        let first: Vec<(u64, u64)> = (0..6)
            .filter_map(|_| q.tick().request.map(|r| (r.seq, r.tick)))
            .collect();
        assert_eq!(first, vec![(0, 0), (1, 5)]);
        let mut q = ActionQueue::new(QueueConfig {
            request_timeout: 5,
            ..cfg(3, Merge::Latest)
        })
        .unwrap();
        q.tick();
        q.on_chunk(0, &[1.0; 4], 1).unwrap();
        let mut requests = Vec::new();
        for _ in 0..12 {
            if let Some(r) = q.tick().request {
                requests.push((r.seq, r.tick));
            }
        }
        // Request 1 when 2 remain (tick 2), lost; again at tick 7 and tick 12.
        assert_eq!(requests, vec![(1, 2), (2, 7), (3, 12)]);
        assert_eq!(q.stats().request_timeouts, 2);
        // The newest answer is merged; the older requests are superseded.
        q.on_chunk(3, &[2.0; 4], 1).unwrap();
        assert_eq!(q.stats().superseded_requests, 2);
        q.close();
        assert!((0..10).all(|_| q.tick().request.is_none()));
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(Merge::parse("latest", None), Ok(Merge::Latest));
        assert_eq!(
            Merge::parse("weighted", Some("0.8, 0.5,0")),
            Ok(Merge::Weighted(vec![0.8, 0.5, 0.0]))
        );
        let err = |m: &str, w: Option<&str>| Merge::parse(m, w).unwrap_err().to_string();
        assert!(err("weighted", None).contains("needs MERGE_WEIGHTS"));
        assert!(err("weighted", Some("0.5,1.5")).contains("1.5 is outside [0, 1]"));
        assert!(err("weighted", Some("0.5,x")).contains("\"x\" is not a number"));
        assert_eq!(Merge::parse("latest", Some("0.5")), Ok(Merge::Latest));
        assert!(err("newest", None).contains("must be `latest` or `weighted`"));
        let e = ActionQueue::new(cfg(0, Merge::Latest)).err().unwrap();
        assert!(e.to_string().contains("REQUEST_THRESHOLD"), "{e}");
    }

    /// RTC on the fake clock, with `operators::rtc`'s guidance over a test field (not the
    /// model: the action expert's VJP is not implemented yet, docs/rtc.md). Each request's
    /// leftover and delay become the guide of its chunk; the first `d` actions of a guided
    /// chunk land on the leftover, the guided chunk is closer to the old one where it takes
    /// over than the unguided one, and the boundary jumps are reported against the naive
    /// switch and the weighted blend of the same unguided chunks.
    #[test]
    fn rtc_guided_chunks_meet_the_leftover_at_boundaries() {
        use operators::rtc::{sample, testing::TanhField, Guide};
        let (horizon, dims, delay) = (10usize, 2usize, 3u64);
        let noise = |seq: u64| -> Vec<f64> {
            (0..horizon * dims)
                .map(|i| ((seq * 31 + i as u64) as f64 * 1.7).sin())
                .collect()
        };
        let run = |merge: Merge, rtc: bool| {
            let mut field = TanhField::new(horizon * dims, 3);
            let mut c = cfg(6, merge);
            c.initial_delay = delay;
            let mut q = ActionQueue::new(c).unwrap();
            let mut errs = Vec::new();
            simulate(
                &mut q,
                300,
                dims,
                |_| delay,
                |r: &Request| {
                    let free = sample(&mut field, &noise(r.seq), 10, None);
                    let out = if rtc && !r.leftover.is_empty() {
                        let guide = Guide {
                            prefix: r.leftover.clone(),
                            delay: r.delay_ticks as usize,
                            beta: 5.0,
                        }
                        .prepare(horizon, dims)
                        .unwrap();
                        let guided = sample(&mut field, &noise(r.seq), 10, Some(&guide));
                        let d = r.delay_ticks as usize * dims;
                        let err = |a: &[f64]| {
                            (0..d)
                                .map(|i| (a[i] - f64::from(r.leftover[i])).abs())
                                .fold(0.0, f64::max)
                        };
                        errs.push((err(&guided), err(&free)));
                        guided
                    } else {
                        free
                    };
                    out.iter().map(|&v| v as f32).collect()
                },
            );
            let s = q.stats().clone();
            assert_eq!(s.starved, 0, "{s:?}");
            assert!(s.delays.iter().all(|&d| d == delay));
            (s, errs)
        };
        let (naive, _) = run(Merge::Latest, false);
        let (blend, _) = run(Merge::Weighted(vec![0.75, 0.5]), false);
        let (rtc, prefix_err) = run(Merge::Latest, true);
        println!(
            "test field, d = {delay}: max jump at chunk boundaries: naive switch {:.4}, weighted {:.4}, RTC {:.4} (within chunks {:.4}); old vs new chunk at the switch: unguided {:.4}, RTC {:.4}",
            naive.boundary_jump_max,
            blend.boundary_jump_max,
            rtc.boundary_jump_max,
            naive.within_jump_max,
            naive.switch_gap_max,
            rtc.switch_gap_max
        );
        assert!(rtc.boundaries > 40);
        // The field's chunks are rough within themselves (random weights), so consecutive
        // actions jump as much inside a chunk as at a boundary; what RTC changes is how far
        // apart the two chunks are where one takes over from the other.
        assert!(
            rtc.switch_gap_max < naive.switch_gap_max,
            "{rtc:?} {naive:?}"
        );
        let worst_guided = prefix_err.iter().map(|e| e.0).fold(0.0, f64::max);
        let least_free = prefix_err.iter().map(|e| e.1).fold(f64::MAX, f64::min);
        println!("first d actions vs leftover: guided max {worst_guided:.5}, unguided min {least_free:.5}");
        assert!(worst_guided < 0.05, "{prefix_err:?}");
        assert!(worst_guided < least_free, "{prefix_err:?}");
    }
}

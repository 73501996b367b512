//! The producer's side of a CUDA IPC ring as a stage node keeps it (`TRANSPORT: cuda-ipc`):
//! a slot per frame sent by handle, handed back by the consumer on the `release` input, and
//! the counts the node's summary reports. The slot accounting is behind [`SlotRing`], so it
//! is tested here without a GPU; `operators::cuda::ipc::Ring` implements it (feature `cuda`).

use eyre::{bail, Result};

/// How long a consumer may hold a slot before the producer takes it back (its consumer is
/// presumed gone), and how long a stopping producer waits for slots still held.
pub const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A ring of slots, each held by one frame until the consumer releases it.
pub trait SlotRing {
    /// A free slot for frame `seq` (marked held), taking back slots held past the ring's
    /// limit; None when every slot is still held.
    fn acquire(&mut self, seq: u64) -> Option<usize>;
    /// Frees `slot` if it still holds frame `seq`; false for an unknown or stale release.
    fn release(&mut self, slot: usize, seq: u64) -> bool;
    /// Frees a slot whose frame was not sent after all.
    fn cancel(&mut self, slot: usize);
    /// Slots a consumer still holds.
    fn busy(&self) -> usize;
    /// Slots taken back so far because their consumer held them too long.
    fn reclaimed(&self) -> u64;
}

#[cfg(feature = "cuda")]
impl SlotRing for operators::cuda::ipc::Ring {
    fn acquire(&mut self, seq: u64) -> Option<usize> {
        operators::cuda::ipc::Ring::acquire(self, seq)
    }
    fn release(&mut self, slot: usize, seq: u64) -> bool {
        operators::cuda::ipc::Ring::release(self, slot, seq)
    }
    fn cancel(&mut self, slot: usize) {
        operators::cuda::ipc::Ring::cancel(self, slot)
    }
    fn busy(&self) -> usize {
        operators::cuda::ipc::Ring::busy(self)
    }
    fn reclaimed(&self) -> u64 {
        self.reclaimed
    }
}

/// A producer's ring with the counts of its summary.
pub struct RingOut<R> {
    pub ring: R,
    /// The node's name, for its log lines.
    stage: &'static str,
    /// Frames dropped because the consumer held every slot.
    pub full: u64,
    /// Releases of slots that no longer held their frame (late, or after a take-back).
    pub stale: u64,
}

impl<R: SlotRing> RingOut<R> {
    pub fn new(ring: R, stage: &'static str) -> Self {
        RingOut {
            ring,
            stage,
            full: 0,
            stale: 0,
        }
    }

    /// A slot for frame `seq`. Slots taken back from a consumer that held them too long are
    /// logged; when every slot is still held the frame is dropped (an error for its
    /// rejection, counted).
    pub fn acquire(&mut self, seq: u64) -> Result<usize> {
        let before = self.ring.reclaimed();
        let slot = self.ring.acquire(seq);
        let taken_back = self.ring.reclaimed() - before;
        if taken_back > 0 {
            eprintln!(
                "{}: {taken_back} ring slot(s) not handed back within 2 s taken back (consumer gone or restarting?)",
                self.stage
            );
        }
        let Some(slot) = slot else {
            self.full += 1;
            bail!("frame {seq}: dropped, every ring slot is still held by the consumer");
        };
        Ok(slot)
    }

    /// A `release` of `slot` holding frame `seq`; false (and counted) when stale.
    pub fn release(&mut self, slot: usize, seq: u64) -> bool {
        let held = self.ring.release(slot, seq);
        if !held {
            self.stale += 1;
        }
        held
    }

    /// Slots a consumer still holds.
    pub fn busy(&self) -> usize {
        self.ring.busy()
    }

    /// For the node's summary line: see [`summary`].
    pub fn summary(&self) -> String {
        summary(self.full, self.ring.reclaimed(), self.stale)
    }
}

/// `F frames dropped with the ring full, R slots reclaimed, S stale releases`.
pub fn summary(full: u64, reclaimed: u64, stale: u64) -> String {
    format!(
        "{full} frames dropped with the ring full, {reclaimed} slots reclaimed, {stale} stale releases"
    )
}

/// A ring of slots in host memory with the device ring's accounting, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct TestRing {
    /// The frame each slot holds.
    pub held: Vec<Option<u64>>,
    /// Whether the next `acquire` finds every held slot overdue (as after 2 s).
    pub overdue: bool,
    pub reclaimed: u64,
}

#[cfg(test)]
impl TestRing {
    pub fn new(slots: usize) -> Self {
        TestRing {
            held: vec![None; slots],
            ..TestRing::default()
        }
    }
}

#[cfg(test)]
impl SlotRing for TestRing {
    fn acquire(&mut self, seq: u64) -> Option<usize> {
        if std::mem::take(&mut self.overdue) {
            for h in &mut self.held {
                if h.take().is_some() {
                    self.reclaimed += 1;
                }
            }
        }
        let i = self.held.iter().position(Option::is_none)?;
        self.held[i] = Some(seq);
        Some(i)
    }
    fn release(&mut self, slot: usize, seq: u64) -> bool {
        match self.held.get_mut(slot) {
            Some(h) if *h == Some(seq) => {
                *h = None;
                true
            }
            _ => false,
        }
    }
    fn cancel(&mut self, slot: usize) {
        if let Some(h) = self.held.get_mut(slot) {
            *h = None;
        }
    }
    fn busy(&self) -> usize {
        self.held.iter().filter(|h| h.is_some()).count()
    }
    fn reclaimed(&self) -> u64 {
        self.reclaimed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_full_rings_stale_releases_and_take_backs() {
        let mut r = RingOut::new(TestRing::new(2), "vision");
        assert_eq!(r.acquire(10).unwrap(), 0);
        assert_eq!(r.acquire(11).unwrap(), 1);
        let e = r.acquire(12).unwrap_err().to_string();
        assert!(
            e.contains("frame 12: dropped, every ring slot is still held"),
            "{e}"
        );
        assert_eq!(r.busy(), 2);
        assert!(r.release(0, 10));
        assert!(!r.release(0, 10), "released twice");
        assert!(!r.release(1, 99), "another frame's release");
        assert!(!r.release(7, 11), "no such slot");
        assert_eq!(r.acquire(13).unwrap(), 0);
        // The consumer went away: both slots are taken back for the next frame.
        r.ring.overdue = true;
        assert_eq!(r.acquire(14).unwrap(), 0);
        assert!(!r.release(1, 11), "a release after the take-back is stale");
        assert_eq!(
            r.summary(),
            "1 frames dropped with the ring full, 2 slots reclaimed, 4 stale releases"
        );
        r.ring.cancel(0);
        assert_eq!(r.busy(), 0);
    }
}

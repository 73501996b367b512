//! The slot accounting of a producer's ring (CUDA IPC between stage processes, in
//! [`crate::cuda::ipc::Ring`]): which slot holds which frame, handed back by the consumer,
//! taken back when held too long. Plain data, so it is tested without a GPU.

use std::time::{Duration, Instant};

/// Which of `n` slots hold a frame, and since when.
#[derive(Debug, Clone)]
pub struct SlotBook {
    held: Vec<Option<(u64, Instant)>>,
    /// A slot not handed back after this long is taken back (its consumer is presumed gone).
    reclaim_after: Duration,
    /// Slots taken back so far.
    pub reclaimed: u64,
}

impl SlotBook {
    pub fn new(n: usize, reclaim_after: Duration) -> SlotBook {
        SlotBook {
            held: vec![None; n],
            reclaim_after,
            reclaimed: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Slots a consumer still holds.
    pub fn busy(&self) -> usize {
        self.held.iter().filter(|s| s.is_some()).count()
    }

    /// The frame slot `slot` holds.
    pub fn holder(&self, slot: usize) -> Option<u64> {
        self.held.get(slot).copied().flatten().map(|(seq, _)| seq)
    }

    /// A free slot for frame `seq` at time `now` (marked held), after taking back slots held
    /// longer than the limit; None when every slot is still held.
    pub fn acquire_at(&mut self, seq: u64, now: Instant) -> Option<usize> {
        for s in &mut self.held {
            if let Some((_, since)) = *s {
                if now.saturating_duration_since(since) > self.reclaim_after {
                    *s = None;
                    self.reclaimed += 1;
                }
            }
        }
        let i = self.held.iter().position(Option::is_none)?;
        self.held[i] = Some((seq, now));
        Some(i)
    }

    /// [`SlotBook::acquire_at`] now.
    pub fn acquire(&mut self, seq: u64) -> Option<usize> {
        self.acquire_at(seq, Instant::now())
    }

    /// Frees `slot` if it still holds frame `seq`; false for an unknown or stale release.
    pub fn release(&mut self, slot: usize, seq: u64) -> bool {
        match self.held.get_mut(slot) {
            Some(s) if s.is_some_and(|(q, _)| q == seq) => {
                *s = None;
                true
            }
            _ => false,
        }
    }

    /// Frees a slot whose frame was not sent after all.
    pub fn cancel(&mut self, slot: usize) {
        if let Some(s) = self.held.get_mut(slot) {
            *s = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cycle_through_acquire_and_release() {
        let t0 = Instant::now();
        let mut b = SlotBook::new(2, Duration::from_secs(2));
        assert_eq!(b.acquire_at(10, t0), Some(0));
        assert_eq!(b.acquire_at(11, t0), Some(1));
        assert_eq!(b.acquire_at(12, t0), None, "every slot is held");
        assert_eq!(b.busy(), 2);
        assert!(!b.release(0, 11), "slot 0 holds frame 10, not 11");
        assert!(!b.release(5, 10), "no slot 5");
        assert!(b.release(0, 10));
        assert!(!b.release(0, 10), "a second release is stale");
        assert_eq!(b.acquire_at(12, t0), Some(0));
        assert_eq!(b.holder(0), Some(12));
        b.cancel(1);
        assert_eq!((b.busy(), b.holder(1)), (1, None));
        assert_eq!(b.reclaimed, 0);
    }

    #[test]
    fn slots_held_too_long_are_taken_back() {
        let t0 = Instant::now();
        let mut b = SlotBook::new(2, Duration::from_secs(2));
        b.acquire_at(1, t0);
        b.acquire_at(2, t0 + Duration::from_secs(1));
        // At 2.5 s only the first slot is past the limit.
        assert_eq!(b.acquire_at(3, t0 + Duration::from_millis(2500)), Some(0));
        assert_eq!(b.reclaimed, 1);
        assert_eq!(b.holder(1), Some(2));
        // A late release of the reclaimed frame does not free the slot's new frame.
        assert!(!b.release(0, 1));
        assert_eq!(b.holder(0), Some(3));
        // At exactly the limit a slot is still held.
        assert_eq!(b.acquire_at(4, t0 + Duration::from_secs(3)), None);
        assert_eq!(b.acquire_at(4, t0 + Duration::from_millis(3001)), Some(1));
        assert_eq!(b.reclaimed, 2);
    }
}

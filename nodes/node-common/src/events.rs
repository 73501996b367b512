//! Waiting for the next dora event with a deadline.
//!
//! dora-node-api 1.1's `EventStream::recv_timeout` reports a timeout as an error event built
//! with `eyre!`, which captures a backtrace whenever `RUST_BACKTRACE` (or
//! `RUST_LIB_BACKTRACE`) is set, as it often is on a robot's or developer's machine. With
//! debug info that capture costs milliseconds, and the first one in a process hundreds
//! (measured: a 150 ms wait that returned after 426 ms). A camera that keeps its frame rate
//! with timed waits, or a watchdog that must speak up on time, cannot afford that; this wait
//! builds nothing when the time is up.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use dora_node_api::{Event, EventStream};

/// What a timed wait got.
#[derive(Debug)]
pub enum Waited {
    Event(Event),
    /// The time was up first.
    TimedOut,
    /// The stream ended: no event will come.
    Closed,
}

/// Wakes the thread that waits (unpark): the deadline is kept by that thread's own
/// `park_timeout`, so it depends on no timer thread elsewhere in the process.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// The next event, or [`Waited::TimedOut`] once `wait` has passed without one. Nothing is
/// lost on a timeout: the event not yet received stays queued for the next call (the same
/// cancellation dora's own `recv_timeout` relies on).
pub fn recv_within(events: &mut EventStream, wait: Duration) -> Waited {
    let deadline = Instant::now() + wait;
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut next = pin!(events.recv_async());
    loop {
        if let Poll::Ready(event) = next.as_mut().poll(&mut cx) {
            return event.map_or(Waited::Closed, Waited::Event);
        }
        let now = Instant::now();
        if now >= deadline {
            return Waited::TimedOut;
        }
        // Returns early when the stream wakes us (or spuriously): poll again either way.
        thread::park_timeout(deadline - now);
    }
}

/// [`recv_within`] `wait`, or with no deadline (`None`) the next event whenever it comes.
pub fn recv_for(events: &mut EventStream, wait: Option<Duration>) -> Waited {
    match wait {
        Some(wait) => recv_within(events, wait),
        None => events.recv().map_or(Waited::Closed, Waited::Event),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{event, json, run_node, TensorInput};
    use std::time::Instant;

    /// A wait with nothing to receive times out (not before its deadline), even with
    /// backtraces on (the case dora's own timeout pays for), ahead of the event due at 5 s
    /// (counted from the node's start, so a slow start on a loaded machine cannot deliver it
    /// first), and that event is not lost. How long the timeout takes is measured by
    /// nothing here: that is what the camera's pacing shows, not a timed test.
    #[test]
    fn times_out_on_time_and_loses_nothing() {
        std::env::set_var("RUST_LIB_BACKTRACE", "1");
        let input = TensorInput {
            id: "x",
            seq: 7,
            shape: &[1],
            dtype: "float32",
            arrow_type: "Float32",
            values: json(&[1.0f32]),
            extra: vec![],
        };
        run_node("waiter", vec![event(5.0, input)], |_node, mut events| {
            let t = Instant::now();
            let first = recv_within(&mut events, Duration::from_millis(100));
            let took = t.elapsed();
            assert!(matches!(first, Waited::TimedOut), "{first:?}");
            assert!(took >= Duration::from_millis(100), "{took:?}");
            let next = recv_for(&mut events, Some(Duration::from_secs(20)));
            let Waited::Event(dora_node_api::Event::Input { id, metadata, .. }) = next else {
                panic!("expected the input, got {next:?}");
            };
            assert_eq!(id.as_str(), "x");
            assert_eq!(crate::int_param(&metadata.parameters, "seq"), Some(7));
            loop {
                match recv_for(&mut events, None) {
                    Waited::Closed => break,
                    Waited::Event(_) => {}
                    Waited::TimedOut => panic!("no deadline was given"),
                }
            }
            Ok(())
        })
        .unwrap();
    }
}

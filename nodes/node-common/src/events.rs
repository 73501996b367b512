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
use std::pin::{pin, Pin};
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
    match ready_within(pin!(events.recv_async()), wait) {
        Some(event) => event.map_or(Waited::Closed, Waited::Event),
        None => Waited::TimedOut,
    }
}

/// Polls `next` on this thread until it is ready (`Some`) or `wait` has passed (`None`).
fn ready_within<T>(mut next: Pin<&mut impl Future<Output = T>>, wait: Duration) -> Option<T> {
    let deadline = Instant::now() + wait;
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(value) = next.as_mut().poll(&mut cx) {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        // Returns early when the future wakes us (or spuriously): poll again either way.
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
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A future that is ready once `ready` is set, waking the waker it last saw when set.
    #[derive(Default)]
    struct Gate {
        ready: AtomicBool,
        polls: AtomicUsize,
        waker: Mutex<Option<Waker>>,
    }

    impl Gate {
        fn open(&self) {
            self.ready.store(true, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
                w.wake();
            }
        }
        fn wait(self: &Arc<Self>) -> impl Future<Output = u32> {
            let gate = Arc::clone(self);
            std::future::poll_fn(move |cx| {
                gate.polls.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut w) = gate.waker.lock() {
                    *w = Some(cx.waker().clone());
                }
                if gate.ready.load(Ordering::SeqCst) {
                    Poll::Ready(7)
                } else {
                    Poll::Pending
                }
            })
        }
    }

    /// A future that never becomes ready times out, not before its deadline, and is polled
    /// a handful of times, not spun on.
    #[test]
    fn a_wait_with_nothing_to_receive_times_out_not_early() {
        let gate = Arc::new(Gate::default());
        let t = Instant::now();
        let got = ready_within(pin!(gate.wait()), Duration::from_millis(80));
        let took = t.elapsed();
        assert_eq!(got, None);
        assert!(took >= Duration::from_millis(80), "{took:?}");
        let polls = gate.polls.load(Ordering::SeqCst);
        assert!(polls < 50, "polled {polls} times in one wait: spinning");
    }

    /// A wake from another thread ends the wait with the value, long before the deadline
    /// (60 s: a wait that ignored the wake would hang the test, not pass it); a wake that
    /// comes before the value (spurious) only makes it poll again.
    #[test]
    fn a_wake_from_another_thread_ends_the_wait_with_the_value() {
        let gate = Arc::new(Gate::default());
        let other = Arc::clone(&gate);
        let opener = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            if let Some(w) = other.waker.lock().ok().and_then(|w| w.clone()) {
                w.wake(); // spurious: not ready yet
            }
            thread::sleep(Duration::from_millis(30));
            other.open();
        });
        let got = ready_within(pin!(gate.wait()), Duration::from_secs(60));
        assert_eq!(got, Some(7));
        assert!(gate.polls.load(Ordering::SeqCst) >= 2);
        assert!(opener.join().is_ok());
    }

    fn input(seq: u64) -> TensorInput<'static> {
        TensorInput {
            id: "x",
            seq,
            shape: &[1],
            dtype: "float32",
            arrow_type: "Float32",
            values: json(&[seq as f32]),
            extra: vec![],
        }
    }

    fn seq_of(waited: &Waited) -> Option<i64> {
        match waited {
            Waited::Event(dora_node_api::Event::Input { metadata, .. }) => {
                crate::int_param(&metadata.parameters, "seq")
            }
            _ => None,
        }
    }

    /// On a real dora event stream (testing mode), with backtraces on (the case dora's own
    /// timeout pays for): a wait between two inputs times out, and the input it gave up on
    /// is delivered by the next wait, once, in order.
    ///
    /// dora's testing daemon is one thread that sleeps until an input is due while it
    /// answers the stream's request for it; requests made meanwhile (the control channel's
    /// registration inside `init_testing`) wait behind that sleep. So the timed wait is
    /// made after the first input (1 s) has arrived, when nothing is due before 4 s, and
    /// not counted from the node's start.
    #[test]
    fn times_out_between_inputs_and_loses_nothing() {
        std::env::set_var("RUST_LIB_BACKTRACE", "1");
        let events = vec![event(1.0, input(6)), event(4.0, input(7))];
        run_node("waiter", events, |_node, mut events| {
            let first = recv_for(&mut events, Some(Duration::from_secs(30)));
            assert_eq!(seq_of(&first), Some(6), "{first:?}");
            let t = Instant::now();
            let between = recv_within(&mut events, Duration::from_millis(100));
            let took = t.elapsed();
            assert!(matches!(between, Waited::TimedOut), "{between:?}");
            assert!(took >= Duration::from_millis(100), "{took:?}");
            let next = recv_for(&mut events, Some(Duration::from_secs(30)));
            assert_eq!(seq_of(&next), Some(7), "{next:?}");
            loop {
                match recv_for(&mut events, None) {
                    Waited::Closed => break,
                    Waited::Event(e) => {
                        assert!(
                            !matches!(e, dora_node_api::Event::Input { .. }),
                            "an input came twice: {e:?}"
                        );
                    }
                    Waited::TimedOut => panic!("no deadline was given"),
                }
            }
            Ok(())
        })
        .unwrap();
    }
}

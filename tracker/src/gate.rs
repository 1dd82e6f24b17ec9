//! The write gate: lets mutating requests in without a lock; a generation
//! switch (checkpoint, compaction, a merge into the current generation)
//! closes it and waits for the requests in flight, so the switch falls
//! between requests. Both sides are RAII guards: a request holds a
//! `GateGuard` while it runs, an operation holds a `ClosedGate` while the
//! generation changes, and the gate reopens when that guard drops, on
//! every return path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Default)]
pub(crate) struct Gate {
    inflight: AtomicU64,
    closed: AtomicBool,
    lock: Mutex<()>,
    cond: Condvar,
}

impl Gate {
    /// Waits while the gate is closed, then counts one request in flight.
    pub(crate) fn enter(&self) -> GateGuard<'_> {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                let mut guard = self.lock.lock().expect("gate lock");
                while self.closed.load(Ordering::SeqCst) {
                    guard = self.cond.wait(guard).expect("gate lock");
                }
            }
            self.inflight.fetch_add(1, Ordering::SeqCst);
            if !self.closed.load(Ordering::SeqCst) {
                return GateGuard(self);
            }
            self.leave();
        }
    }

    fn leave(&self) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && self.closed.load(Ordering::SeqCst) {
            let _guard = self.lock.lock().expect("gate lock");
            self.cond.notify_all();
        }
    }

    /// Closes the gate and returns once no request is in flight. Callers
    /// serialize closes (the tracker's operations lock): a gate is closed
    /// by one operation at a time.
    pub(crate) fn close(&self) -> ClosedGate<'_> {
        let was_closed = self.closed.swap(true, Ordering::SeqCst);
        assert!(!was_closed, "the gate is closed by one operation at a time");
        let mut guard = self.lock.lock().expect("gate lock");
        while self.inflight.load(Ordering::SeqCst) > 0 {
            guard = self
                .cond
                .wait_timeout(guard, Duration::from_millis(10))
                .expect("gate lock")
                .0;
        }
        ClosedGate(self)
    }

    /// Closes the gate for good (the tracker stops): requests that come
    /// later wait forever, which only happens when the server is gone.
    /// Under the operations lock a closed gate can only be an earlier stop,
    /// so a second call does nothing.
    pub(crate) fn close_forever(&self) {
        if !self.closed.load(Ordering::SeqCst) {
            std::mem::forget(self.close());
        }
    }

    /// `close`, unless the gate is closed for good already (the tracker
    /// stopped): then None. For work that may come after a stop, such as
    /// a journal rewrite started before it; under the operations lock.
    pub(crate) fn close_unless_stopped(&self) -> Option<ClosedGate<'_>> {
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        Some(self.close())
    }

    fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        let _guard = self.lock.lock().expect("gate lock");
        self.cond.notify_all();
    }

    /// For assertions: the gate is closed and nothing is in flight.
    pub(crate) fn is_closed_and_idle(&self) -> bool {
        self.closed.load(Ordering::SeqCst) && self.inflight.load(Ordering::SeqCst) == 0
    }
}

/// Holds the gate for one mutating request.
#[derive(Debug)]
pub struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The gate closed with nothing in flight; reopens it when dropped.
#[derive(Debug)]
pub(crate) struct ClosedGate<'a>(&'a Gate);

impl Drop for ClosedGate<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn a_closed_gate_waits_for_requests_in_flight_and_holds_new_ones() {
        let gate = Arc::new(Gate::default());
        let entered = Arc::new(AtomicUsize::new(0));
        let request = gate.enter();
        let closer = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                let closed = gate.close();
                assert!(gate.is_closed_and_idle());
                std::thread::sleep(Duration::from_millis(50));
                drop(closed);
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        // The closer waits for `request`; the gate is marked closed already.
        assert!(gate.closed.load(Ordering::SeqCst));
        let late = {
            let (gate, entered) = (Arc::clone(&gate), Arc::clone(&entered));
            std::thread::spawn(move || {
                let _guard = gate.enter();
                entered.fetch_add(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(entered.load(Ordering::SeqCst), 0, "a late request waits");
        drop(request);
        closer.join().unwrap();
        late.join().unwrap();
        assert_eq!(
            entered.load(Ordering::SeqCst),
            1,
            "it goes on after the reopen"
        );
        assert!(!gate.closed.load(Ordering::SeqCst));
    }

    #[test]
    fn the_gate_reopens_when_the_operation_fails_early() {
        fn failing_switch(gate: &Gate) -> Result<(), &'static str> {
            let _closed = gate.close();
            Err("the switch failed")
        }
        let gate = Gate::default();
        assert!(failing_switch(&gate).is_err());
        drop(gate.enter());
        assert!(!gate.closed.load(Ordering::SeqCst));
    }
}

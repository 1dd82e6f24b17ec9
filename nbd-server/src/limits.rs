//! What one server lets its clients hold: connections, time in the
//! handshake, requests (and their bytes) in flight per connection, and how
//! long a connection's thread may spin for its next request.
//!
//! Together they bound what a client that misbehaves can pin: each
//! connection holds one thread of its own and at most one blocking-pool
//! thread waiting on its socket (`transmission.rs`), and about
//! `bytes_in_flight_max` plus one request (`PAYLOAD_MAX`) of buffers, so
//! the server as a whole holds at most `connections_max` times that.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The bounds a server enforces; `Limits::default()` is what
/// `blockwatch serve` uses without flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once, in the handshake or transmitting; one more
    /// is closed as soon as it is accepted.
    pub connections_max: usize,
    /// A client that has not finished its handshake (up to GO or
    /// EXPORT_NAME) in this long is dropped.
    pub handshake_timeout: Duration,
    /// Requests of one connection running on the blocking pool or
    /// waiting for their replies to be sent; reading stops at this bound.
    pub requests_in_flight_max: usize,
    /// READ and WRITE bytes those requests hold; reading stops once this
    /// many are held (one request may go past it).
    pub bytes_in_flight_max: usize,
    /// How long a connection's thread spins for the next request before
    /// it sleeps, while each request comes within about this of the
    /// connection running dry (a client at queue depth 1). Waking a thread
    /// that sleeps on another CPU costs tens of microseconds on a VM, more
    /// than a 4 KiB read; an idle connection, or one whose requests come
    /// further apart, does not spin. Zero: never spin.
    pub busy_poll: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections_max: 128,
            handshake_timeout: Duration::from_secs(30),
            requests_in_flight_max: 64,
            bytes_in_flight_max: 64 * 1024 * 1024,
            busy_poll: Duration::from_micros(50),
        }
    }
}

/// Counts open connections against `Limits::connections_max`.
#[derive(Debug, Default)]
pub(crate) struct ConnectionCount {
    open: Arc<AtomicUsize>,
    refused: AtomicUsize,
}

/// One connection's place in the count, given back when dropped.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    open: Arc<AtomicUsize>,
}

impl ConnectionCount {
    /// A slot if fewer than `max` connections are open.
    pub(crate) fn take(&self, max: usize) -> Option<ConnectionSlot> {
        let taken = self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < max).then_some(open + 1)
            });
        match taken {
            Ok(_) => Some(ConnectionSlot {
                open: Arc::clone(&self.open),
            }),
            Err(_) => None,
        }
    }

    /// Counts a refused connection; true for the ones worth a log line
    /// (the first, then every 100th), so a flood does not flood the log.
    pub(crate) fn refused(&self) -> (usize, bool) {
        let count = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        (count, count == 1 || count % 100 == 0)
    }

    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_bound_and_come_back_when_dropped() {
        let count = ConnectionCount::default();
        let first = count.take(2).unwrap();
        let second = count.take(2).unwrap();
        assert!(count.take(2).is_none());
        assert_eq!(count.open(), 2);
        drop(first);
        let third = count.take(2).unwrap();
        drop((second, third));
        assert_eq!(count.open(), 0);
    }

    #[test]
    fn refusals_are_logged_sparingly() {
        let count = ConnectionCount::default();
        let logged: Vec<usize> = (0..250)
            .map(|_| count.refused())
            .filter(|(_, log)| *log)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(logged, [1, 100, 200]);
    }
}

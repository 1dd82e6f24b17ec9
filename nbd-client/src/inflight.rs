//! The table of requests in flight, shared by the threads that submit and
//! the reader thread that answers them.
//!
//! A submitter waits for one of `in_flight_max` slots, registers its
//! request under a fresh cookie *before* sending it (so a fast reply always
//! finds it), and gets a `Pending` that receives the outcome over a channel
//! of its own. The reader moves a request out of the table when its first
//! reply frame arrives and completes it on the last, freeing the slot. When
//! the connection dies, every registered request fails with the same
//! `ConnectionError` and later submissions fail at once.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{Command, CommandError, CommandFailure, ConnectionError};
use crate::status::BlockStatus;

/// What the reader needs to take a reply in.
#[derive(Debug)]
pub(crate) enum Expect {
    /// READ: the buffer the data lands in, exactly the request's length.
    Read(Vec<u8>),
    Status,
    Plain,
}

#[derive(Debug)]
pub(crate) enum Reply {
    Read(Vec<u8>),
    Status(BlockStatus),
    Done,
}

pub(crate) type Outcome = Result<Reply, CommandFailure>;

#[derive(Debug)]
pub(crate) struct Request {
    pub command: Command,
    pub offset: u64,
    pub length: u64,
    pub expect: Expect,
    pub done: SyncSender<Outcome>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled whenever `in_flight` drops or the connection fails.
    changed: Condvar,
    in_flight_max: usize,
}

#[derive(Debug)]
struct State {
    next_cookie: u64,
    /// Registered requests no reply frame has arrived for yet.
    submitted: HashMap<u64, Request>,
    /// Registered and not yet completed, wherever they are.
    in_flight: usize,
    failed: Option<Arc<ConnectionError>>,
    /// The server answered ESHUTDOWN: it wants no new requests.
    shutting_down: bool,
    closing: bool,
}

impl Shared {
    pub fn new(in_flight_max: usize) -> Shared {
        assert!(in_flight_max > 0, "at least one request must fit in flight");
        Shared {
            state: Mutex::new(State {
                // Cookie 0 is left for DISC, which has no reply.
                next_cookie: 1,
                submitted: HashMap::with_capacity(in_flight_max),
                in_flight: 0,
                failed: None,
                shutting_down: false,
                closing: false,
            }),
            changed: Condvar::new(),
            in_flight_max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned lock is a bug.
        self.state.lock().expect("in-flight table lock poisoned")
    }

    /// Waits for a free slot, then registers `request`; returns its cookie.
    pub fn register(&self, request: Request) -> Result<u64, CommandFailure> {
        let mut state = self.lock();
        loop {
            if let Some(error) = &state.failed {
                return Err(CommandFailure::Connection(Arc::clone(error)));
            }
            if state.closing {
                return Err(CommandFailure::Connection(Arc::new(
                    ConnectionError::Closed,
                )));
            }
            if state.shutting_down {
                return Err(CommandFailure::ServerShuttingDown);
            }
            if state.in_flight < self.in_flight_max {
                break;
            }
            state = self
                .changed
                .wait(state)
                .expect("in-flight table lock poisoned");
        }
        let cookie = state.next_cookie;
        state.next_cookie += 1;
        state.in_flight += 1;
        let previous = state.submitted.insert(cookie, request);
        assert!(previous.is_none(), "cookie {cookie} registered twice");
        Ok(cookie)
    }

    /// The reader claims a request on its first reply frame.
    pub fn take_submitted(&self, cookie: u64) -> Option<Request> {
        self.lock().submitted.remove(&cookie)
    }

    /// Delivers the outcome of a request the reader claimed.
    pub fn complete(&self, done: SyncSender<Outcome>, outcome: Outcome) {
        // The caller may have dropped its `Pending`; the slot frees anyway.
        let _ = done.send(outcome);
        let mut state = self.lock();
        assert!(
            state.in_flight > 0,
            "completed more requests than were in flight"
        );
        state.in_flight -= 1;
        drop(state);
        self.changed.notify_all();
    }

    /// Ends the connection: fails every registered request (those still
    /// in the table and the reader's `claimed` ones) with the first error
    /// recorded. Returns that error.
    pub fn fail(&self, error: ConnectionError, claimed: Vec<Request>) -> Arc<ConnectionError> {
        let mut state = self.lock();
        let error = Arc::clone(state.failed.get_or_insert_with(|| Arc::new(error)));
        let requests: Vec<Request> = state
            .submitted
            .drain()
            .map(|(_, request)| request)
            .chain(claimed)
            .collect();
        assert!(
            requests.len() <= state.in_flight,
            "failed more requests than were in flight"
        );
        state.in_flight -= requests.len();
        drop(state);
        self.changed.notify_all();
        for request in requests {
            let _ = request
                .done
                .send(Err(CommandFailure::Connection(Arc::clone(&error))));
        }
        error
    }

    pub fn failure(&self) -> Option<Arc<ConnectionError>> {
        self.lock().failed.clone()
    }

    pub fn mark_shutting_down(&self) {
        self.lock().shutting_down = true;
    }

    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// Refuses new requests and waits until none is in flight (the spec
    /// asks a client to let them finish before DISC). Returns the
    /// connection's failure, if it failed first.
    pub fn begin_close(&self) -> Option<Arc<ConnectionError>> {
        let mut state = self.lock();
        state.closing = true;
        while state.in_flight > 0 && state.failed.is_none() {
            state = self
                .changed
                .wait(state)
                .expect("in-flight table lock poisoned");
        }
        state.failed.clone()
    }
}

/// A request on its way; `wait` blocks until its reply has arrived.
/// Dropping it is allowed: the reply is then read and thrown away.
#[must_use = "the request's result only arrives through wait()"]
#[derive(Debug)]
pub struct Pending<T> {
    receiver: Receiver<Outcome>,
    command: Command,
    offset_bytes: u64,
    length_bytes: u64,
    convert: fn(Reply) -> T,
}

impl<T> Pending<T> {
    pub(crate) fn new(
        receiver: Receiver<Outcome>,
        command: Command,
        offset_bytes: u64,
        length_bytes: u64,
        convert: fn(Reply) -> T,
    ) -> Pending<T> {
        Pending {
            receiver,
            command,
            offset_bytes,
            length_bytes,
            convert,
        }
    }

    pub fn wait(self) -> Result<T, CommandError> {
        // A sender dropped without an answer means the reader thread died.
        let outcome = self.receiver.recv().unwrap_or_else(|_| {
            Err(CommandFailure::Connection(Arc::new(
                ConnectionError::ReaderLost,
            )))
        });
        outcome.map(self.convert).map_err(|failure| CommandError {
            command: self.command,
            offset_bytes: self.offset_bytes,
            length_bytes: self.length_bytes,
            failure,
        })
    }

    pub fn command(&self) -> Command {
        self.command
    }

    pub fn offset_bytes(&self) -> u64 {
        self.offset_bytes
    }

    pub fn length_bytes(&self) -> u64 {
        self.length_bytes
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn request() -> (Request, Receiver<Outcome>) {
        let (done, receiver) = mpsc::sync_channel(1);
        let request = Request {
            command: Command::Flush,
            offset: 0,
            length: 0,
            expect: Expect::Plain,
            done,
        };
        (request, receiver)
    }

    #[test]
    fn a_full_table_blocks_until_a_slot_frees() {
        let shared = Arc::new(Shared::new(2));
        let first = shared.register(request().0).unwrap();
        shared.register(request().0).unwrap();
        let (started, waiting) = mpsc::channel();
        let blocked = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                started.send(()).unwrap();
                shared.register(request().0)
            })
        };
        waiting.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!blocked.is_finished(), "a third request got a slot of two");
        let claimed = shared.take_submitted(first).unwrap();
        shared.complete(claimed.done, Ok(Reply::Done));
        assert_eq!(blocked.join().unwrap().unwrap(), 3);
    }

    #[test]
    fn failing_the_connection_fails_every_request_and_later_ones() {
        let shared = Shared::new(4);
        let (request_a, receiver_a) = request();
        let (request_b, receiver_b) = request();
        shared.register(request_a).unwrap();
        let claimed_cookie = shared.register(request_b).unwrap();
        let claimed = shared.take_submitted(claimed_cookie).unwrap();
        shared.fail(
            ConnectionError::ServerClosed { mid_reply: true },
            vec![claimed],
        );
        for receiver in [receiver_a, receiver_b] {
            assert!(matches!(
                receiver.recv().unwrap(),
                Err(CommandFailure::Connection(error))
                    if matches!(*error, ConnectionError::ServerClosed { mid_reply: true })
            ));
        }
        assert!(matches!(
            shared.register(request().0),
            Err(CommandFailure::Connection(_))
        ));
        // The first error stays the one reported.
        shared.fail(ConnectionError::Closed, Vec::new());
        assert!(matches!(
            *shared.failure().unwrap(),
            ConnectionError::ServerClosed { .. }
        ));
        assert!(shared.begin_close().is_some());
    }
}

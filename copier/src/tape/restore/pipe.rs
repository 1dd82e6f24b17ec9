//! Reading and writing a restore at once: the thread that reads and
//! checks the tapes sends each extent to a thread that writes the target,
//! and gets the extent's buffer back for a later one.

use std::sync::mpsc::{Receiver, SyncSender};

use super::RestoreError;
use crate::tape::TapeReader;

/// Steps of a one-pass restore, from the thread that reads and checks the
/// tapes to the one that writes the image.
pub(super) enum Step {
    /// A session begins; a full one (of a disk of this size) starts the
    /// image over.
    Session {
        full_size_bytes: Option<u64>,
    },
    Data {
        offset_bytes: u64,
        data: Vec<u8>,
    },
    Zero {
        offset_bytes: u64,
        length_bytes: u64,
    },
}

/// Steps queued between reading and writing (extents are at most 4 MiB).
const STEPS_QUEUED: usize = 4;

/// The reading side of `with_writer`.
pub(super) struct Pipe<'a> {
    steps: &'a SyncSender<Step>,
    /// Extent buffers the writer is done with.
    returned: &'a Receiver<Vec<u8>>,
}

impl Pipe<'_> {
    /// Queues `step` for the writer, with the buffers it has handed back
    /// given to `reader` for the next payloads.
    pub(super) fn send(&self, reader: &mut TapeReader, step: Step) -> Result<(), WriterStopped> {
        while let Ok(buffer) = self.returned.try_recv() {
            reader.recycle(buffer);
        }
        self.steps.send(step).map_err(|_| WriterStopped)
    }
}

/// Runs `read` on this thread while the steps it sends are applied to
/// `target` by a thread of its own, at most `STEPS_QUEUED` behind: reading
/// and checking the tape overlaps writing the target. What `read`
/// returned, and the writer's error if it stopped on one (`read`'s sends
/// fail from then on).
pub(super) fn with_writer<T: Send, R>(
    target: &mut T,
    apply: fn(&mut T, &Step) -> Result<(), RestoreError>,
    read: impl FnOnce(&Pipe) -> R,
) -> (R, Result<(), RestoreError>) {
    std::thread::scope(|scope| {
        let (steps, receiver) = std::sync::mpsc::sync_channel::<Step>(STEPS_QUEUED);
        let (give_back, returned) = std::sync::mpsc::channel::<Vec<u8>>();
        let writer = scope.spawn(move || -> Result<(), RestoreError> {
            for step in receiver {
                apply(target, &step)?;
                if let Step::Data { data, .. } = step {
                    // The reader may be done: then the buffer just goes.
                    let _ = give_back.send(data);
                }
            }
            Ok(())
        });
        let read = read(&Pipe {
            steps: &steps,
            returned: &returned,
        });
        drop(steps);
        let written = writer.join().expect("the restore's writer does not panic");
        (read, written)
    })
}

/// The writing thread stopped (its error says why).
pub(super) struct WriterStopped;

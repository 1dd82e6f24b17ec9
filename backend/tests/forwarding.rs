//! Layers forward by default: a layer that implements nothing but `next()`
//! must hand every call to the backend it wraps, with the same arguments,
//! and hand back that backend's answer. And a storage backend (no `next()`)
//! keeps the conservative defaults it had before layers forwarded.
//!
//! Written from outside the crate, as any layer (the tracker's) is.

use std::io;
use std::sync::{Arc, Mutex};

use backend::{BlockBackend, Extent, STATE_HOLE, ZeroError, ZeroRequest};

/// One call that reached the recording backend, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    SizeBytes,
    IsReadOnly,
    IsRotational,
    CanMultiConn,
    CanTrim,
    CanFastZero,
    CanCache,
    CanExtents,
    ExtentsAreSlow,
    ReadAt {
        length: usize,
        offset: u64,
    },
    ReadAtNowait {
        length: usize,
        offset: u64,
    },
    WriteIsCheap {
        offset: u64,
        length: u64,
    },
    WriteAt {
        data: Vec<u8>,
        offset: u64,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        request: ZeroRequest,
    },
    Cache {
        offset: u64,
        length: u64,
    },
    Extents {
        offset: u64,
        length: u64,
        max_extents: usize,
    },
    MetaContexts,
    ContextExtents {
        context: String,
        offset: u64,
        length: u64,
        max_extents: usize,
    },
}

const RECORDER_SIZE_BYTES: u64 = 12_345_678;
const RECORDER_READ_BYTE: u8 = 0x5a;
const RECORDER_NOWAIT_BYTE: u8 = 0xa5;
const RECORDER_CONTEXT: &str = "test:recorder";
const RECORDER_EXTENT: Extent = Extent {
    length_bytes: 7,
    flags: STATE_HOLE,
};
const RECORDER_CONTEXT_EXTENT: Extent = Extent {
    length_bytes: 9,
    flags: 42,
};

/// A storage backend that records every call and answers each with
/// something no default answers, so that a default standing in for it is
/// seen as well as a call that never arrives.
#[derive(Debug, Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
}

impl Recorder {
    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl BlockBackend for Recorder {
    fn size_bytes(&self) -> u64 {
        self.record(Call::SizeBytes);
        RECORDER_SIZE_BYTES
    }
    fn is_read_only(&self) -> bool {
        self.record(Call::IsReadOnly);
        true
    }
    fn is_rotational(&self) -> bool {
        self.record(Call::IsRotational);
        true
    }
    fn can_multi_conn(&self) -> bool {
        self.record(Call::CanMultiConn);
        true
    }
    fn can_trim(&self) -> bool {
        self.record(Call::CanTrim);
        true
    }
    fn can_fast_zero(&self) -> bool {
        self.record(Call::CanFastZero);
        true
    }
    fn can_cache(&self) -> bool {
        self.record(Call::CanCache);
        true
    }
    fn can_extents(&self) -> bool {
        self.record(Call::CanExtents);
        true
    }
    fn extents_are_slow(&self) -> bool {
        self.record(Call::ExtentsAreSlow);
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.record(Call::ReadAt {
            length: buf.len(),
            offset,
        });
        buf.fill(RECORDER_READ_BYTE);
        Ok(())
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.record(Call::ReadAtNowait {
            length: buf.len(),
            offset,
        });
        buf.fill(RECORDER_NOWAIT_BYTE);
        Ok(true)
    }
    fn write_is_cheap(&self, offset: u64, length: u64) -> bool {
        self.record(Call::WriteIsCheap { offset, length });
        false
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.record(Call::WriteAt {
            data: buf.to_vec(),
            offset,
            fua,
        });
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.record(Call::Flush);
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.record(Call::Trim {
            offset,
            length,
            fua,
        });
        Ok(())
    }
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        request: ZeroRequest,
    ) -> Result<(), ZeroError> {
        self.record(Call::WriteZeroes {
            offset,
            length,
            request,
        });
        Ok(())
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.record(Call::Cache { offset, length });
        Ok(())
    }
    fn extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        self.record(Call::Extents {
            offset,
            length,
            max_extents,
        });
        out.push(RECORDER_EXTENT);
        Ok(())
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.record(Call::MetaContexts);
        vec![RECORDER_CONTEXT.to_string()]
    }
    fn context_extents(
        &self,
        context: &str,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        self.record(Call::ContextExtents {
            context: context.to_string(),
            offset,
            length,
            max_extents,
        });
        out.push(RECORDER_CONTEXT_EXTENT);
        Ok(())
    }
}

/// A layer that changes nothing: all it says is what it wraps.
struct Passthrough(Arc<dyn BlockBackend>);

impl BlockBackend for Passthrough {
    fn next(&self) -> Option<&dyn BlockBackend> {
        Some(&*self.0)
    }
}

const ZERO_REQUEST: ZeroRequest = ZeroRequest {
    may_trim: true,
    fast_only: true,
    fua: true,
};

/// One call through the layer, which checks the recorder's answer came
/// back, and the call the recorder must then have seen.
type Row = (fn(&dyn BlockBackend), Call);

/// A method added to the trait gets a row here.
fn every_method() -> Vec<Row> {
    vec![
        (
            |b| assert_eq!(b.size_bytes(), RECORDER_SIZE_BYTES),
            Call::SizeBytes,
        ),
        (|b| assert!(b.is_read_only()), Call::IsReadOnly),
        (|b| assert!(b.is_rotational()), Call::IsRotational),
        (|b| assert!(b.can_multi_conn()), Call::CanMultiConn),
        (|b| assert!(b.can_trim()), Call::CanTrim),
        (|b| assert!(b.can_fast_zero()), Call::CanFastZero),
        (|b| assert!(b.can_cache()), Call::CanCache),
        (|b| assert!(b.can_extents()), Call::CanExtents),
        (|b| assert!(b.extents_are_slow()), Call::ExtentsAreSlow),
        (
            |b| {
                let mut buf = [0u8; 3];
                b.read_at(&mut buf, 4096).unwrap();
                assert_eq!(buf, [RECORDER_READ_BYTE; 3]);
            },
            Call::ReadAt {
                length: 3,
                offset: 4096,
            },
        ),
        (
            |b| {
                let mut buf = [0u8; 5];
                assert!(b.read_at_nowait(&mut buf, 8192).unwrap());
                assert_eq!(buf, [RECORDER_NOWAIT_BYTE; 5]);
            },
            Call::ReadAtNowait {
                length: 5,
                offset: 8192,
            },
        ),
        (
            |b| assert!(!b.write_is_cheap(11, 22)),
            Call::WriteIsCheap {
                offset: 11,
                length: 22,
            },
        ),
        (
            |b| b.write_at(&[1, 2, 3], 33, true).unwrap(),
            Call::WriteAt {
                data: vec![1, 2, 3],
                offset: 33,
                fua: true,
            },
        ),
        (|b| b.flush().unwrap(), Call::Flush),
        (
            |b| b.trim(44, 55, true).unwrap(),
            Call::Trim {
                offset: 44,
                length: 55,
                fua: true,
            },
        ),
        (
            |b| b.write_zeroes(66, 77, ZERO_REQUEST).unwrap(),
            Call::WriteZeroes {
                offset: 66,
                length: 77,
                request: ZERO_REQUEST,
            },
        ),
        (
            |b| b.cache(88, 99).unwrap(),
            Call::Cache {
                offset: 88,
                length: 99,
            },
        ),
        (
            |b| {
                let mut out = Vec::new();
                b.extents(111, 222, 3, &mut out).unwrap();
                assert_eq!(out, [RECORDER_EXTENT]);
            },
            Call::Extents {
                offset: 111,
                length: 222,
                max_extents: 3,
            },
        ),
        (
            |b| assert_eq!(b.meta_contexts(), [RECORDER_CONTEXT]),
            Call::MetaContexts,
        ),
        (
            |b| {
                let mut out = Vec::new();
                b.context_extents(RECORDER_CONTEXT, 333, 444, 5, &mut out)
                    .unwrap();
                assert_eq!(out, [RECORDER_CONTEXT_EXTENT]);
            },
            Call::ContextExtents {
                context: RECORDER_CONTEXT.to_string(),
                offset: 333,
                length: 444,
                max_extents: 5,
            },
        ),
    ]
}

fn check_every_method_reaches(recorder: &Recorder, front: &dyn BlockBackend) {
    for (run, expected) in every_method() {
        run(front);
        // Both sides print on failure, so the row names itself.
        assert_eq!(recorder.take(), [expected]);
    }
}

#[test]
fn a_layer_that_overrides_nothing_forwards_every_method_unchanged() {
    let recorder = Arc::new(Recorder::default());
    let layer = Passthrough(recorder.clone());
    check_every_method_reaches(&recorder, &layer);
}

#[test]
fn two_layers_forward_every_method_to_the_storage() {
    let recorder = Arc::new(Recorder::default());
    let layers = Passthrough(Arc::new(Passthrough(recorder.clone())));
    check_every_method_reaches(&recorder, &layers);
}

/// A layer that handles writes itself and forwards the rest.
#[derive(Debug)]
struct WriteCounter {
    inner: Arc<Recorder>,
    writes: Mutex<u32>,
}

impl BlockBackend for WriteCounter {
    fn next(&self) -> Option<&dyn BlockBackend> {
        Some(&*self.inner)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        *self.writes.lock().unwrap() += 1;
        Ok(())
    }
}

#[test]
fn an_override_wins_and_write_zeroes_still_goes_to_the_next_backend() {
    let layer = WriteCounter {
        inner: Arc::new(Recorder::default()),
        writes: Mutex::new(0),
    };
    layer.write_at(&[9; 4], 0, false).unwrap();
    assert_eq!(*layer.writes.lock().unwrap(), 1);
    assert_eq!(layer.inner.take(), []);
    // The next backend's WRITE_ZEROES, not zero buffers through the
    // layer's own write_at: which is why a layer that changes writes
    // overrides write_zeroes too.
    let request = ZeroRequest::default();
    layer.write_zeroes(4096, 512, request).unwrap();
    assert_eq!(*layer.writes.lock().unwrap(), 1);
    assert_eq!(
        layer.inner.take(),
        [Call::WriteZeroes {
            offset: 4096,
            length: 512,
            request
        }]
    );
}

/// What reached `Minimal`'s device.
#[derive(Debug, PartialEq, Eq)]
enum Device {
    Zeroes {
        length: usize,
        offset: u64,
        fua: bool,
    },
    Flush,
}

/// A storage backend with only the four methods it must have, which keeps
/// its writes to show what the WRITE_ZEROES fallback does.
#[derive(Debug, Default)]
struct Minimal {
    device: Mutex<Vec<Device>>,
}

impl BlockBackend for Minimal {
    fn size_bytes(&self) -> u64 {
        4 << 20
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        assert!(buf.iter().all(|&byte| byte == 0), "only zeroes are written");
        self.device.lock().unwrap().push(Device::Zeroes {
            length: buf.len(),
            offset,
            fua,
        });
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.device.lock().unwrap().push(Device::Flush);
        Ok(())
    }
}

fn os_error(result: io::Result<()>) -> Option<i32> {
    result.unwrap_err().raw_os_error()
}

#[test]
fn a_storage_backend_keeps_the_conservative_defaults() {
    let storage = Minimal::default();
    let capabilities = [
        storage.is_read_only(),
        storage.is_rotational(),
        storage.can_multi_conn(),
        storage.can_trim(),
        storage.can_fast_zero(),
        storage.can_cache(),
        storage.can_extents(),
        storage.extents_are_slow(),
    ];
    assert_eq!(capabilities, [false; 8]);
    assert!(!storage.read_at_nowait(&mut [0; 8], 0).unwrap());
    assert!(storage.write_is_cheap(0, 4096));
    assert_eq!(
        os_error(storage.trim(0, 4096, false)),
        Some(libc::EOPNOTSUPP)
    );
    assert_eq!(os_error(storage.cache(0, 4096)), Some(libc::EOPNOTSUPP));
    let mut out = Vec::new();
    storage.extents(4096, 8192, 10, &mut out).unwrap();
    let whole_range_as_data = Extent {
        length_bytes: 8192,
        flags: 0,
    };
    assert_eq!(out, [whole_range_as_data]);
    assert!(storage.meta_contexts().is_empty());
    let error = storage
        .context_extents("qemu:dirty-bitmap:x", 0, 4096, 10, &mut out)
        .unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::NotFound);
}

#[test]
fn a_storage_backend_writes_zeroes_as_buffers_and_refuses_fast_zero() {
    let storage = Minimal::default();
    let fast = ZeroRequest {
        fast_only: true,
        ..ZeroRequest::default()
    };
    assert!(matches!(
        storage.write_zeroes(0, 4096, fast),
        Err(ZeroError::NotFast)
    ));
    assert_eq!(*storage.device.lock().unwrap(), []);
    let durable = ZeroRequest {
        fua: true,
        ..ZeroRequest::default()
    };
    // Pieces of at most 1 MiB, then one flush for FUA.
    storage.write_zeroes(512, (2 << 20) + 100, durable).unwrap();
    let piece = |length: usize, offset: u64| Device::Zeroes {
        length,
        offset,
        fua: false,
    };
    assert_eq!(
        *storage.device.lock().unwrap(),
        [
            piece(1 << 20, 512),
            piece(1 << 20, 512 + (1 << 20)),
            piece(100, 512 + (2 << 20)),
            Device::Flush,
        ]
    );
}

/// A backend that is neither a layer nor storage: it implements nothing.
#[derive(Debug)]
struct Forgetful;

impl BlockBackend for Forgetful {}

#[test]
fn a_storage_backend_without_a_required_method_panics_naming_it() {
    type Required = (&'static str, fn(&Forgetful));
    let calls: [Required; 4] = [
        ("size_bytes", |b| {
            b.size_bytes();
        }),
        ("read_at", |b| {
            let _ = b.read_at(&mut [0; 1], 0);
        }),
        ("write_at", |b| {
            let _ = b.write_at(&[0; 1], 0, false);
        }),
        ("flush", |b| {
            let _ = b.flush();
        }),
    ];
    for (method, call) in calls {
        let panic = std::panic::catch_unwind(|| call(&Forgetful)).unwrap_err();
        let message = panic.downcast_ref::<String>().expect("a formatted message");
        assert!(
            message.contains("Forgetful") && message.contains(&format!("BlockBackend::{method}")),
            "{method}: {message}"
        );
    }
}

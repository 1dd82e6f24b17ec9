//! The harness `tests/corrupt_images.rs` and `tests/corrupt_maps.rs` run
//! their damaged cases in: a counting allocator, panics caught and kept for
//! the report, a clock, the verdict on one case and the report of all the
//! failures, and the seed of each case. Each of those files includes
//! this one by path and installs the allocator itself:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: harness::CountingAllocator = harness::CountingAllocator;
//! ```
//!
//! Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Failures listed in full in the assertion message.
pub const FAILURES_SHOWN_MAX: usize = 20;

// ---------------------------------------------------------------------------
// Memory accounting: a global allocator that counts each thread's live bytes.

pub struct CountingAllocator;

thread_local! {
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    static PEAK_BYTES: Cell<isize> = const { Cell::new(0) };
    static CAPTURING_PANICS: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

fn count_bytes(delta: isize) {
    // try_with: the allocator also runs while thread-locals are torn down.
    let _ = LIVE_BYTES.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK_BYTES.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counting only touches const-initialised thread-locals without
// destructors, which never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_bytes(layout.size() as isize);
        // SAFETY: the caller's guarantees about `layout` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_bytes(layout.size() as isize);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        count_bytes(-(layout.size() as isize));
        // SAFETY: `pointer` came from `System` with this `layout`.
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_bytes(new_size as isize - layout.size() as isize);
        // SAFETY: `pointer` came from `System` with this `layout`.
        unsafe { System.realloc(pointer, layout, new_size) }
    }
}

/// Panics inside a case are recorded for the report instead of printed.
pub fn install_panic_capture() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CAPTURING_PANICS.with(Cell::get) {
                LAST_PANIC.with(|last| *last.borrow_mut() = info.to_string());
            } else {
                default(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------
// One case.

/// What one case did: what it returned, or the message it panicked with;
/// the most memory it held at once beyond what it started with; how long
/// it took.
pub struct Outcome<T> {
    pub result: Result<T, String>,
    pub peak_bytes: isize,
    pub duration: Duration,
}

impl<T> Outcome<T> {
    /// Why the case failed: it panicked, held more than `peak_bytes_max`
    /// at once or took longer than `duration_max`; `None` if it did not.
    pub fn failure(&self, peak_bytes_max: isize, duration_max: Duration) -> Option<String> {
        match &self.result {
            Err(panic) => Some(format!("panicked: {panic}")),
            Ok(_) if self.peak_bytes > peak_bytes_max => {
                Some(format!("held {} MiB at once", self.peak_bytes >> 20))
            }
            Ok(_) if self.duration > duration_max => Some(format!("took {:?}", self.duration)),
            Ok(_) => None,
        }
    }
}

/// Runs `case` under `catch_unwind`, counting its memory and timing it.
/// Call `install_panic_capture` first, or panics are printed as well.
pub fn run_case<T>(case: impl FnOnce() -> T) -> Outcome<T> {
    let start_bytes = LIVE_BYTES.with(Cell::get);
    PEAK_BYTES.with(|peak| peak.set(start_bytes));
    CAPTURING_PANICS.with(|capturing| capturing.set(true));
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(case));
    let duration = started.elapsed();
    CAPTURING_PANICS.with(|capturing| capturing.set(false));
    let peak_bytes = PEAK_BYTES.with(Cell::get) - start_bytes;
    Outcome {
        result: result.map_err(|_| LAST_PANIC.with(|last| last.take())),
        peak_bytes,
        duration,
    }
}

/// Fails with `heading`, a newline and the first `FAILURES_SHOWN_MAX` of
/// `failures`, one a line, unless there are none.
pub fn assert_no_failures(failures: &[String], heading: impl FnOnce() -> String) {
    assert!(
        failures.is_empty(),
        "{}:\n{}",
        heading(),
        failures
            .iter()
            .take(FAILURES_SHOWN_MAX)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------
// Seeds.

/// Seed of case `index` of the input named `label`, for `testkit::Xorshift`:
/// FNV-1a of the label, mixed. Its low bit is set, as the generator these
/// tests used before `testkit` set it, so that the cases stay exactly the
/// ones the readers were hardened against.
pub fn case_seed(label: &str, index: usize) -> u64 {
    let mut hash = 0xCBF2_9CE4_8422_2325u64;
    for byte in label.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01B3);
    }
    (hash ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
}

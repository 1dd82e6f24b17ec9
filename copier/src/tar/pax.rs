//! pax extended header records, `LEN key=value\n`, and the decimal
//! spelling of times.

/// The records of one extended header, bounded by `bytes_max` (so a
/// header a reader would refuse is never built, nor its memory taken).
#[derive(Debug)]
pub(super) struct Records {
    bytes: Vec<u8>,
    bytes_max: usize,
}

/// A record that would take the header past its bound; `bytes` is how
/// long the header would have grown.
#[derive(Debug)]
pub(super) struct Full {
    pub(super) bytes: usize,
}

impl Records {
    pub(super) fn new(bytes_max: usize) -> Records {
        Records {
            bytes: Vec::new(),
            bytes_max,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Appends `LEN key=value\n`. The value may hold any bytes, newlines
    /// and NULs included: readers take LEN bytes, not a line.
    pub(super) fn push(&mut self, key: &[u8], value: &[u8]) -> Result<(), Full> {
        let length = record_bytes(key.len() + value.len());
        let total = self.bytes.len() + length;
        if total > self.bytes_max {
            return Err(Full { bytes: total });
        }
        self.bytes.reserve(length);
        self.bytes.extend_from_slice(length.to_string().as_bytes());
        self.bytes.push(b' ');
        self.bytes.extend_from_slice(key);
        self.bytes.push(b'=');
        self.bytes.extend_from_slice(value);
        self.bytes.push(b'\n');
        debug_assert!(self.bytes.len() == total);
        Ok(())
    }
}

/// The length of a record whose key and value take `payload_bytes`,
/// counting its own decimal digits: the space, `=` and newline add 3, and
/// the digits are of the total, which one more digit can push past a
/// power of ten (a payload of 95 makes 98 + 2 = 100, three digits: 101).
pub(super) fn record_bytes(payload_bytes: usize) -> usize {
    let rest = payload_bytes + 3;
    let mut digits = decimal_digits(rest);
    while decimal_digits(rest + digits) > digits {
        digits += 1;
    }
    rest + digits
}

fn decimal_digits(mut value: usize) -> usize {
    let mut digits = 1;
    while value >= 10 {
        value /= 10;
        digits += 1;
    }
    digits
}

/// `seconds.nanoseconds` as a pax time: the decimal value of seconds plus
/// the fraction, so that a time before 1970 reads as its real value
/// (`(-2, 500_000_000)` is -1.5 s, written `-1.500000000`). Nine fraction
/// digits when there is a fraction, none otherwise.
pub(super) fn time_text(seconds: i64, nanoseconds: u32) -> String {
    assert!(
        nanoseconds < 1_000_000_000,
        "nanoseconds checked by the caller"
    );
    if nanoseconds == 0 {
        return seconds.to_string();
    }
    if seconds >= 0 {
        return format!("{seconds}.{nanoseconds:09}");
    }
    // -2 s + 0.5 s is -(1 + 0.5): the whole part shrinks by one and the
    // fraction is what the nanoseconds lack of a second.
    let whole = -(i128::from(seconds) + 1);
    format!("-{whole}.{:09}", 1_000_000_000 - nanoseconds)
}

//! The 512-byte ustar header: its fields, octal numbers, the checksum,
//! and the split of a path into the `prefix` and `name` fields.

pub(super) const BLOCK_BYTES: usize = 512;

/// The largest number each octal field holds: its width less one digit
/// for the terminating NUL.
pub(super) const OCTAL_7_MAX: u64 = 0o7777777;
pub(super) const OCTAL_11_MAX: u64 = 0o77777777777;

pub(super) const NAME_BYTES_MAX: usize = 100;
pub(super) const PREFIX_BYTES_MAX: usize = 155;
pub(super) const LINKNAME_BYTES_MAX: usize = 100;

pub(super) const TYPE_FILE: u8 = b'0';
pub(super) const TYPE_HARD_LINK: u8 = b'1';
pub(super) const TYPE_SYMLINK: u8 = b'2';
pub(super) const TYPE_CHAR_DEVICE: u8 = b'3';
pub(super) const TYPE_BLOCK_DEVICE: u8 = b'4';
pub(super) const TYPE_DIRECTORY: u8 = b'5';
pub(super) const TYPE_FIFO: u8 = b'6';
pub(super) const TYPE_PAX: u8 = b'x';

/// Byte ranges of the fields (POSIX pax, "ustar Interchange Format").
pub(super) const NAME: std::ops::Range<usize> = 0..100;
pub(super) const MODE: std::ops::Range<usize> = 100..108;
pub(super) const UID: std::ops::Range<usize> = 108..116;
pub(super) const GID: std::ops::Range<usize> = 116..124;
pub(super) const SIZE: std::ops::Range<usize> = 124..136;
pub(super) const MTIME: std::ops::Range<usize> = 136..148;
pub(super) const CHECKSUM: std::ops::Range<usize> = 148..156;
pub(super) const TYPEFLAG: usize = 156;
pub(super) const LINKNAME: std::ops::Range<usize> = 157..257;
pub(super) const MAGIC: std::ops::Range<usize> = 257..263;
pub(super) const VERSION: std::ops::Range<usize> = 263..265;
pub(super) const DEVMAJOR: std::ops::Range<usize> = 329..337;
pub(super) const DEVMINOR: std::ops::Range<usize> = 337..345;
pub(super) const PREFIX: std::ops::Range<usize> = 345..500;

/// One header block. Built field by field, then sealed with its checksum.
#[derive(Debug, Clone)]
pub(super) struct Header {
    block: [u8; BLOCK_BYTES],
}

impl Header {
    pub(super) fn new(typeflag: u8) -> Header {
        let mut block = [0u8; BLOCK_BYTES];
        block[TYPEFLAG] = typeflag;
        block[MAGIC].copy_from_slice(b"ustar\0");
        block[VERSION].copy_from_slice(b"00");
        Header { block }
    }

    /// Writes `value` as zero-padded octal digits filling all but the
    /// field's last byte, which stays NUL. The caller has checked that it
    /// fits (the pax header carries what does not); writing a value that
    /// does not fit would be a wrong header, so it is a bug.
    pub(super) fn set_octal(&mut self, field: std::ops::Range<usize>, value: u64) {
        let digits = field.len() - 1;
        assert!(
            value < 1u64 << (3 * digits),
            "{value} does not fit {digits} octal digits"
        );
        let text = format!("{value:0digits$o}");
        self.block[field.start..field.start + digits].copy_from_slice(text.as_bytes());
    }

    /// Copies `bytes` into a text field, NUL-padded; a full field has no
    /// NUL, as ustar allows for `name`, `linkname` and `prefix`.
    pub(super) fn set_text(&mut self, field: std::ops::Range<usize>, bytes: &[u8]) {
        assert!(bytes.len() <= field.len(), "text longer than its field");
        self.block[field.start..field.start + bytes.len()].copy_from_slice(bytes);
    }

    /// Sets `prefix` and `name` from a path that `split_path` accepted.
    pub(super) fn set_path(&mut self, split: (&[u8], &[u8])) {
        self.set_text(PREFIX, split.0);
        self.set_text(NAME, split.1);
    }

    /// Fills in the checksum and returns the finished block. The checksum
    /// is the sum of all bytes with the checksum field counted as spaces,
    /// written as six octal digits, a NUL and a space (what every tar
    /// writes, though readers accept other spellings).
    pub(super) fn seal(mut self) -> [u8; BLOCK_BYTES] {
        self.block[CHECKSUM].fill(b' ');
        let sum = checksum(&self.block);
        let text = format!("{sum:06o}\0 ");
        self.block[CHECKSUM].copy_from_slice(text.as_bytes());
        self.block
    }
}

/// The unsigned sum of the block's bytes, its checksum field read as it
/// stands (spaces while sealing).
pub(super) fn checksum(block: &[u8; BLOCK_BYTES]) -> u32 {
    block.iter().map(|&b| u32::from(b)).sum()
}

/// Whether ustar's text fields can carry `bytes` as they are: printable
/// ASCII only, so that a reader that ignores pax headers and one that
/// converts character sets both read the same name. Anything else goes
/// into the pax header.
pub(super) fn is_portable(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| (0x20..0x7f).contains(&b))
}

/// Splits `path` into ustar's `prefix` and `name` fields: the whole path
/// in `name` when it fits, or else at the last slash that leaves at most
/// 155 bytes before it and a non-empty name of at most 100 after it.
/// `None` when no such slash exists or the path is not portable.
pub(super) fn split_path(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if !is_portable(path) {
        return None;
    }
    if path.len() <= NAME_BYTES_MAX {
        return Some((&[], path));
    }
    // A directory's trailing slash belongs to the name, never a split.
    let searchable = &path[..path.len() - 1];
    searchable
        .iter()
        .enumerate()
        .rev()
        .filter(|&(_, &b)| b == b'/')
        .map(|(slash, _)| (&path[..slash], &path[slash + 1..]))
        .take_while(|(_, name)| name.len() <= NAME_BYTES_MAX)
        .find(|(prefix, name)| prefix.len() <= PREFIX_BYTES_MAX && !name.is_empty())
}

/// A portable stand-in for a name that goes into the pax header, for
/// readers that ignore pax: every byte outside printable ASCII becomes
/// `_`, and the last `bytes_max` bytes of the last component are kept.
pub(super) fn stand_in(path: &[u8], bytes_max: usize) -> Vec<u8> {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    let last = trimmed.rsplit(|&b| b == b'/').next().unwrap_or(trimmed);
    let start = last.len().saturating_sub(bytes_max);
    last[start..]
        .iter()
        .map(|&b| if (0x20..0x7f).contains(&b) { b } else { b'_' })
        .collect()
}

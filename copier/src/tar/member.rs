//! One entry checked and turned into the header bytes of its member: a
//! pax extended header when anything does not fit ustar, then the ustar
//! header. Every check on the entry happens here, before a byte is
//! written, so a refused entry leaves the archive as it was.

use super::error::{TarError, display_path};
use super::header::{self, BLOCK_BYTES, Header, OCTAL_7_MAX, OCTAL_11_MAX};
use super::pax::{self, Records};
use super::sparse::{self, Layout, Stored};
use super::{
    Entry, EntryKind, PATH_BYTES_MAX, PAX_HEADER_BYTES_MAX, XATTR_NAME_BYTES_MAX,
    XATTR_VALUE_BYTES_MAX,
};

/// The ustar name of a sparse file's member, for readers that know no
/// sparse format: they extract the map and data under it, apart from the
/// real name (GNU tar writes `DIR/GNUSparseFile.PID/NAME`).
const SPARSE_STAND_IN_DIRECTORY: &[u8] = b"GNUSparseFile.0/";
/// The ustar name of an extended header's own member.
const PAX_STAND_IN_DIRECTORY: &[u8] = b"PaxHeaders/";

/// A checked entry: its headers, ready to write, and how its data is
/// stored (for files).
#[derive(Debug)]
pub(super) struct Member {
    pub(super) headers: Vec<u8>,
    pub(super) stored: Option<Stored>,
}

/// What goes into the ustar header besides the path, gathered while the
/// pax records are decided.
struct Fields {
    typeflag: u8,
    size_bytes: u64,
    linkname: Vec<u8>,
    device: Option<(u32, u32)>,
}

pub(super) fn build(entry: &Entry) -> Result<Member, TarError> {
    let is_directory = matches!(entry.kind, EntryKind::Directory);
    let path = checked_path(&entry.path, is_directory, "path")?;
    check_mode_and_times(entry)?;
    let full = |error| too_large(&entry.path, error);
    let (fields, stored) = kind_fields(entry)?;
    let mut records = Records::new(PAX_HEADER_BYTES_MAX);
    // hdrcharset names the encoding of the path and linkpath records of
    // this header, so it comes before them (docs/tar.md: what GNU tar and
    // bsdtar make of it).
    if std::str::from_utf8(&path).is_err() || std::str::from_utf8(&fields.linkname).is_err() {
        records.push(b"hdrcharset", b"BINARY").map_err(full)?;
    }
    let sparse = stored.is_some_and(|s| matches!(s.layout, Layout::Sparse { .. }));
    let mut ustar = Header::new(fields.typeflag);
    if sparse {
        let mut stand_in = SPARSE_STAND_IN_DIRECTORY.to_vec();
        stand_in.extend(header::stand_in(
            &path,
            header::NAME_BYTES_MAX - stand_in.len(),
        ));
        ustar.set_path((&[], &stand_in));
    } else if let Some(split) = header::split_path(&path) {
        ustar.set_path(split);
    } else {
        records.push(b"path", &path).map_err(full)?;
        ustar.set_text(
            header::NAME,
            &header::stand_in(&path, header::NAME_BYTES_MAX),
        );
    }
    set_linkname(&mut ustar, &mut records, &fields.linkname).map_err(full)?;
    set_numbers(&mut ustar, &mut records, entry, &fields).map_err(full)?;
    if let (true, EntryKind::File { size_bytes, .. }) = (sparse, &entry.kind) {
        records.push(b"GNU.sparse.major", b"1").map_err(full)?;
        records.push(b"GNU.sparse.minor", b"0").map_err(full)?;
        records.push(b"GNU.sparse.name", &path).map_err(full)?;
        let real = size_bytes.to_string();
        records
            .push(b"GNU.sparse.realsize", real.as_bytes())
            .map_err(full)?;
    }
    push_xattrs(&mut records, entry)?;
    let mut headers = Vec::new();
    if !records.is_empty() {
        headers.extend_from_slice(&pax_header(&path, entry, records.as_bytes().len()));
        headers.extend_from_slice(records.as_bytes());
        headers.resize(sparse::padded(headers.len() as u64) as usize, 0);
    }
    headers.extend_from_slice(&ustar.seal());
    Ok(Member { headers, stored })
}

/// The typeflag and the ustar fields each kind of entry sets, with each
/// kind's own checks.
fn kind_fields(entry: &Entry) -> Result<(Fields, Option<Stored>), TarError> {
    let plain = |typeflag| Fields {
        typeflag,
        size_bytes: 0,
        linkname: Vec::new(),
        device: None,
    };
    let fields = match &entry.kind {
        EntryKind::File { size_bytes, data } => {
            let stored = sparse::stored(&entry.path, *size_bytes, data)?;
            let fields = Fields {
                size_bytes: stored.member_bytes,
                ..plain(header::TYPE_FILE)
            };
            return Ok((fields, Some(stored)));
        }
        EntryKind::Directory => plain(header::TYPE_DIRECTORY),
        EntryKind::Fifo => plain(header::TYPE_FIFO),
        EntryKind::Symlink { target } => Fields {
            linkname: checked_symlink_target(&entry.path, target)?,
            ..plain(header::TYPE_SYMLINK)
        },
        EntryKind::HardLink { target } => Fields {
            linkname: checked_path(target, false, "hard link target")
                .map_err(|e| as_link_error(&entry.path, e))?,
            ..plain(header::TYPE_HARD_LINK)
        },
        EntryKind::CharDevice { major, minor } => Fields {
            device: Some(checked_device(&entry.path, *major, *minor)?),
            ..plain(header::TYPE_CHAR_DEVICE)
        },
        EntryKind::BlockDevice { major, minor } => Fields {
            device: Some(checked_device(&entry.path, *major, *minor)?),
            ..plain(header::TYPE_BLOCK_DEVICE)
        },
    };
    Ok((fields, None))
}

/// A hard link target's path error, told as the entry's link error.
fn as_link_error(path: &[u8], error: TarError) -> TarError {
    match error {
        TarError::InvalidPath { reason, .. } => TarError::InvalidLinkTarget {
            path: display_path(path),
            reason,
        },
        TarError::TooLong {
            length_bytes,
            max_bytes,
            ..
        } => TarError::TooLong {
            path: display_path(path),
            what: "hard link target",
            length_bytes,
            max_bytes,
        },
        other => other,
    }
}

/// `path` as the archive holds it: relative, no empty, `..` or NUL
/// parts, and a directory's ending in one `/` (as GNU tar and bsdtar
/// write them, which some readers go by).
fn checked_path(path: &[u8], is_directory: bool, what: &'static str) -> Result<Vec<u8>, TarError> {
    let invalid = |reason| TarError::InvalidPath {
        path: display_path(path),
        reason,
    };
    if path.len() > PATH_BYTES_MAX {
        return Err(TarError::TooLong {
            path: format!("{}...", display_path(&path[..256])),
            what,
            length_bytes: path.len(),
            max_bytes: PATH_BYTES_MAX,
        });
    }
    if path.is_empty() {
        return Err(invalid("it is empty"));
    }
    if path.contains(&0) {
        return Err(invalid("it holds a NUL byte"));
    }
    if path[0] == b'/' {
        return Err(invalid("it is absolute; archive paths are relative"));
    }
    let trimmed = match path.strip_suffix(b"/") {
        Some(trimmed) if is_directory => trimmed,
        Some(_) => return Err(invalid("only a directory's path may end in /")),
        None => path,
    };
    for component in trimmed.split(|&b| b == b'/') {
        if component.is_empty() {
            return Err(invalid("it has an empty component (//)"));
        }
        if component == b".." {
            return Err(invalid("it has a .. component, which extractors refuse"));
        }
    }
    let mut checked = trimmed.to_vec();
    if is_directory {
        checked.push(b'/');
    }
    Ok(checked)
}

fn checked_symlink_target(path: &[u8], target: &[u8]) -> Result<Vec<u8>, TarError> {
    let invalid = |reason| TarError::InvalidLinkTarget {
        path: display_path(path),
        reason,
    };
    if target.len() > PATH_BYTES_MAX {
        return Err(TarError::TooLong {
            path: display_path(path),
            what: "symlink target",
            length_bytes: target.len(),
            max_bytes: PATH_BYTES_MAX,
        });
    }
    if target.is_empty() {
        return Err(invalid("it is empty"));
    }
    if target.contains(&0) {
        return Err(invalid("it holds a NUL byte"));
    }
    Ok(target.to_vec())
}

/// Linux device numbers (12-bit major, 20-bit minor) always fit ustar's
/// seven octal digits; pax has no standard record for larger ones.
fn checked_device(path: &[u8], major: u32, minor: u32) -> Result<(u32, u32), TarError> {
    if u64::from(major) > OCTAL_7_MAX || u64::from(minor) > OCTAL_7_MAX {
        return Err(TarError::DeviceNumberTooLarge {
            path: display_path(path),
            major,
            minor,
            max: OCTAL_7_MAX,
        });
    }
    Ok((major, minor))
}

fn check_mode_and_times(entry: &Entry) -> Result<(), TarError> {
    if entry.mode & !0o7777 != 0 {
        return Err(TarError::InvalidMode {
            path: display_path(&entry.path),
            mode: entry.mode,
        });
    }
    let times = [
        ("mtime", Some(entry.mtime)),
        ("atime", entry.atime),
        ("ctime", entry.ctime),
    ];
    for (field, time) in times {
        if let Some((_, nanoseconds)) = time
            && nanoseconds >= 1_000_000_000
        {
            return Err(TarError::InvalidTime {
                path: display_path(&entry.path),
                field,
                nanoseconds,
            });
        }
    }
    Ok(())
}

fn set_linkname(
    ustar: &mut Header,
    records: &mut Records,
    linkname: &[u8],
) -> Result<(), pax::Full> {
    if linkname.len() <= header::LINKNAME_BYTES_MAX && header::is_portable(linkname) {
        ustar.set_text(header::LINKNAME, linkname);
        return Ok(());
    }
    records.push(b"linkpath", linkname)?;
    ustar.set_text(
        header::LINKNAME,
        &header::stand_in(linkname, header::LINKNAME_BYTES_MAX),
    );
    Ok(())
}

/// Mode, ids, size, times and device numbers: in octal where they fit,
/// in pax records where they do not (the octal field then holds 0, or
/// the nearest time it can), and atime and ctime, which ustar lacks.
fn set_numbers(
    ustar: &mut Header,
    records: &mut Records,
    entry: &Entry,
    fields: &Fields,
) -> Result<(), pax::Full> {
    ustar.set_octal(header::MODE, u64::from(entry.mode));
    let numbers = [
        (
            header::UID,
            b"uid".as_slice(),
            u64::from(entry.uid),
            OCTAL_7_MAX,
        ),
        (header::GID, b"gid", u64::from(entry.gid), OCTAL_7_MAX),
        (header::SIZE, b"size", fields.size_bytes, OCTAL_11_MAX),
    ];
    for (field, key, value, max) in numbers {
        if value <= max {
            ustar.set_octal(field, value);
        } else {
            records.push(key, value.to_string().as_bytes())?;
            ustar.set_octal(field, 0);
        }
    }
    let (seconds, nanoseconds) = entry.mtime;
    ustar.set_octal(header::MTIME, ustar_seconds(seconds));
    if nanoseconds != 0 || ustar_seconds(seconds) as i128 != i128::from(seconds) {
        records.push(b"mtime", pax::time_text(seconds, nanoseconds).as_bytes())?;
    }
    for (key, time) in [(b"atime", entry.atime), (b"ctime", entry.ctime)] {
        if let Some((seconds, nanoseconds)) = time {
            records.push(key, pax::time_text(seconds, nanoseconds).as_bytes())?;
        }
    }
    if let Some((major, minor)) = fields.device {
        ustar.set_octal(header::DEVMAJOR, u64::from(major));
        ustar.set_octal(header::DEVMINOR, u64::from(minor));
    }
    Ok(())
}

/// The nearest time ustar's eleven octal digits hold.
fn ustar_seconds(seconds: i64) -> u64 {
    u64::try_from(seconds).unwrap_or(0).min(OCTAL_11_MAX)
}

/// `SCHILY.xattr.NAME=VALUE`, the spelling both GNU tar and libarchive
/// read, values as raw bytes.
fn push_xattrs(records: &mut Records, entry: &Entry) -> Result<(), TarError> {
    for (name, value) in &entry.xattrs {
        check_xattr(entry, name, value)?;
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name.as_bytes());
        records
            .push(&key, value)
            .map_err(|full| too_large(&entry.path, full))?;
    }
    Ok(())
}

/// A name neither reader could take back as written is refused: `=` ends
/// the keyword, and GNU tar decodes `%3D` and `%25` in names (its own
/// escapes for `=` and `%`) where libarchive does not, so a `%` would
/// come back differently from the two.
fn check_xattr(entry: &Entry, name: &str, value: &[u8]) -> Result<(), TarError> {
    let invalid = |reason| TarError::InvalidXattr {
        path: display_path(&entry.path),
        name: name.to_string(),
        reason,
    };
    if name.len() > XATTR_NAME_BYTES_MAX {
        return Err(TarError::TooLong {
            path: display_path(&entry.path),
            what: "xattr name",
            length_bytes: name.len(),
            max_bytes: XATTR_NAME_BYTES_MAX,
        });
    }
    if value.len() > XATTR_VALUE_BYTES_MAX {
        return Err(TarError::TooLong {
            path: display_path(&entry.path),
            what: "xattr value",
            length_bytes: value.len(),
            max_bytes: XATTR_VALUE_BYTES_MAX,
        });
    }
    if name.is_empty() {
        return Err(invalid("the name is empty"));
    }
    if name.contains(['=', '%', '\0']) {
        return Err(invalid(
            "the name holds =, % or NUL, which tar readers do not all take back as written",
        ));
    }
    Ok(())
}

fn too_large(path: &[u8], full: pax::Full) -> TarError {
    TarError::PaxHeaderTooLarge {
        path: display_path(path),
        length_bytes: full.bytes,
        max_bytes: PAX_HEADER_BYTES_MAX,
    }
}

/// The ustar header of the extended header's member: a stand-in name,
/// the entry's time as ustar holds it, and the records' length.
fn pax_header(path: &[u8], entry: &Entry, records_bytes: usize) -> [u8; BLOCK_BYTES] {
    let mut name = PAX_STAND_IN_DIRECTORY.to_vec();
    name.extend(header::stand_in(path, header::NAME_BYTES_MAX - name.len()));
    let mut pax = Header::new(header::TYPE_PAX);
    pax.set_path((&[], &name));
    pax.set_octal(header::MODE, 0o644);
    pax.set_octal(header::UID, 0);
    pax.set_octal(header::GID, 0);
    pax.set_octal(header::SIZE, records_bytes as u64);
    pax.set_octal(header::MTIME, ustar_seconds(entry.mtime.0));
    pax.seal()
}

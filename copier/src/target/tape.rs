//! A tape stream as a copy target (`tape:PATH`, a file or a drive): each
//! copy appends one session (docs/tape.md); the tape's last complete
//! session says which disk and checkpoint it holds, and a next incremental
//! names that session as its parent. Pieces arrive in plan order (a tape
//! only appends). A session that does not finish (a kill, ENOSPC) is not
//! counted, and the next append on a file cuts it off; a copy to a tape
//! never resumes in the middle of a session.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Held, SourceInfo, Target};
use crate::copy::CopyError;
use crate::tape::{NewSession, SessionHeader, SessionWriter, TapeOptions, TapeWriter};

pub struct TapeTarget {
    path: PathBuf,
    compress: bool,
    /// Until `open` begins the session.
    writer: Option<TapeWriter>,
    last: Option<SessionHeader>,
    session: Mutex<Option<SessionWriter>>,
}

impl std::fmt::Debug for TapeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapeTarget")
            .field("path", &self.path)
            .field("compress", &self.compress)
            .finish_non_exhaustive()
    }
}

/// The pin holder of a tape: stable per path.
pub fn tape_holder(path: &Path) -> String {
    format!(
        "tape-{:08x}",
        crc32c::crc32c(path.as_os_str().as_encoded_bytes())
    )
}

impl TapeTarget {
    /// Opens the tape at `path` for appending (a new one gets a label of
    /// `block_size_bytes` blocks); `compress`: zstd on extent data.
    pub fn open(
        path: &Path,
        block_size_bytes: u32,
        compress: bool,
    ) -> Result<TapeTarget, CopyError> {
        let path = std::path::absolute(path).map_err(|source| CopyError::TargetIo {
            target: format!("tape:{}", path.display()),
            source,
        })?;
        let options = TapeOptions {
            block_size_bytes,
            ..TapeOptions::default()
        };
        let writer = TapeWriter::open_append(&path, &options)?;
        let last = writer.last_session().cloned();
        Ok(TapeTarget {
            path,
            compress,
            writer: Some(writer),
            last,
            session: Mutex::new(None),
        })
    }

    fn with_session<T>(
        &self,
        f: impl FnOnce(&mut SessionWriter) -> Result<T, crate::tape::TapeError>,
    ) -> Result<T, CopyError> {
        let mut session = self.session.lock().expect("tape session lock");
        let session = session
            .as_mut()
            .expect("a tape target is opened before it is written");
        Ok(f(session)?)
    }
}

impl Target for TapeTarget {
    fn describe(&self) -> String {
        format!("tape:{}", self.path.display())
    }

    fn holder(&self) -> String {
        tape_holder(&self.path)
    }

    fn held(&mut self, source_id: &str) -> Result<Option<Held>, CopyError> {
        match &self.last {
            None => Ok(None),
            Some(last) if last.source_id != source_id => Err(CopyError::TargetRefused {
                target: self.describe(),
                reason: format!(
                    "its sessions are of another disk (image id {}, this one is {source_id}); copy with --full to start a chain of this disk on it, or use another tape",
                    last.source_id
                ),
            }),
            Some(last) => Ok(Some(last.target.clone())),
        }
    }

    fn open(
        &mut self,
        source: &SourceInfo,
        checkpoint: &Held,
        base: Option<&Held>,
    ) -> Result<(), CopyError> {
        let writer = self.writer.take().expect("a tape target is opened once");
        // An incremental applies on top of the tape's last session, which
        // holds its base; a full session starts a new chain.
        let parent = match (base, &self.last) {
            (Some(base), Some(last)) if last.target == *base => Some(last.session_id),
            (Some(_), _) => {
                return Err(CopyError::TargetRefused {
                    target: self.describe(),
                    reason: "its last session does not hold the copy's base".into(),
                });
            }
            (None, _) => None,
        };
        if let (Some(_), Some(last)) = (parent, &self.last)
            && last.source_size_bytes != source.size_bytes
        {
            return Err(CopyError::TargetRefused {
                target: self.describe(),
                reason: format!(
                    "its chain is of a {}-byte disk and this one is {} bytes: copy with --full",
                    last.source_size_bytes, source.size_bytes
                ),
            });
        }
        let session = writer.begin_session(NewSession {
            source_id: source.id.clone(),
            source_size_bytes: source.size_bytes,
            granularity_bytes: source.granularity_bytes,
            base: base.cloned(),
            target: checkpoint.clone(),
            parent,
            compress: self.compress,
        })?;
        *self.session.lock().expect("tape session lock") = Some(session);
        Ok(())
    }

    fn write_data(&self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        self.with_session(|session| session.write_data(offset, data))
    }

    fn write_zero(&self, offset: u64, length: u64) -> Result<(), CopyError> {
        self.with_session(|session| session.write_zero(offset, length))
    }

    fn in_order(&self) -> bool {
        true
    }

    fn wants_files(&self) -> bool {
        true
    }

    fn set_files(&mut self, files: Vec<String>) {
        if let Some(session) = self.session.lock().expect("tape session lock").as_mut() {
            session.set_files(files);
        }
    }

    fn commit(&mut self) -> Result<(), CopyError> {
        let session = self
            .session
            .lock()
            .expect("tape session lock")
            .take()
            .expect("opened before committed");
        let (writer, _totals) = session.finish()?;
        self.last = writer.last_session().cloned();
        Ok(())
    }
}

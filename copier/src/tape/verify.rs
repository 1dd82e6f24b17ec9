//! A chain of tapes checked end to end: every block, record and trailer
//! checksum, the tapes' order (one chain id, tape sequence 0, 1, 2, ...),
//! and the sessions' order (a full session first, then each incremental on
//! top of the one before it, of the same disk and size). Restore runs this
//! as its first pass; `blockwatch verify tape:...` prints its report.

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use super::error::TapeError;
use super::format::{Label, SessionHeader, SessionTotals};
use super::reader::{Record, SessionStart, TapeReader};

/// One checked session and where to find it again.
#[derive(Debug, Clone)]
pub struct SessionReport {
    /// Index into `ChainReport::tapes`.
    pub tape_index: usize,
    pub start: SessionStart,
    pub header: SessionHeader,
    pub totals: SessionTotals,
}

#[derive(Debug, Clone)]
pub struct ChainReport {
    pub tapes: Vec<(PathBuf, Label)>,
    pub sessions: Vec<SessionReport>,
}

impl ChainReport {
    pub fn extent_count(&self) -> u64 {
        self.sessions.iter().map(|s| s.totals.extent_count).sum()
    }
    pub fn data_bytes(&self) -> u64 {
        self.sessions.iter().map(|s| s.totals.data_bytes).sum()
    }
    pub fn zero_bytes(&self) -> u64 {
        self.sessions.iter().map(|s| s.totals.zero_bytes).sum()
    }
    /// The checkpoint of the last session checked.
    pub fn last_checkpoint(&self) -> Option<&str> {
        self.sessions
            .last()
            .map(|s| s.header.target.checkpoint.as_str())
    }
    pub fn stored_bytes(&self) -> u64 {
        self.sessions.iter().map(|s| s.totals.stored_bytes).sum()
    }
    /// The sessions a restore applies: from the last full one on.
    pub fn restore_sessions(&self) -> &[SessionReport] {
        let from = self
            .sessions
            .iter()
            .rposition(|s| s.header.is_full())
            .unwrap_or(0);
        &self.sessions[from..]
    }
}

/// Checks the chain `tapes` (in order) up to the session whose target
/// checkpoint is `until` (all of it when None); the first damage or break
/// in the chain is the error.
pub fn verify_chain(tapes: &[PathBuf], until: Option<&str>) -> Result<ChainReport, TapeError> {
    match verify_chain_until_damage(tapes, until) {
        (report, None) => Ok(report),
        (_, Some(error)) => Err(error),
    }
}

/// `verify_chain`, which also returns the sessions found good before the
/// first damage or break.
pub fn verify_chain_until_damage(
    tapes: &[PathBuf],
    until: Option<&str>,
) -> (ChainReport, Option<TapeError>) {
    verify_chain_visiting(tapes, until, &mut |_, _| {})
}

/// `verify_chain_until_damage`, handing `visit` each checked record with
/// the reader that read it (its `last_payload_position`), so that one
/// pass both checks a chain and indexes its extents.
pub fn verify_chain_visiting(
    tapes: &[PathBuf],
    until: Option<&str>,
    visit: &mut dyn FnMut(&TapeReader, &Record),
) -> (ChainReport, Option<TapeError>) {
    let mut visit = |reader: &mut TapeReader, record: Record| -> Result<(), Infallible> {
        visit(reader, &record);
        Ok(())
    };
    match walk_chain(tapes, until, &mut visit) {
        (report, None) => (report, None),
        (report, Some(Stop::Tape(error))) => (report, Some(error)),
        (_, Some(Stop::Visitor(never))) => match never {},
    }
}

/// What ended a walk over a chain before its end.
#[derive(Debug)]
pub(crate) enum Stop<E> {
    /// Damage, or a break in the chain.
    Tape(TapeError),
    /// The visitor's own error.
    Visitor(E),
}

/// Checks the chain `tapes` up to `until` (all of it when None), handing
/// `visit` each checked record (its session is the reader's `header`) as
/// it is read: a visitor acts on records before the rest of the chain is
/// checked, and its error ends the walk. Records are handed over whole,
/// so extent data moves on without a copy. The sessions checked whole, and
/// what ended the walk early, if anything.
pub(crate) fn walk_chain<E>(
    tapes: &[PathBuf],
    until: Option<&str>,
    visit: &mut dyn FnMut(&mut TapeReader, Record) -> Result<(), E>,
) -> (ChainReport, Option<Stop<E>>) {
    let mut report = ChainReport {
        tapes: Vec::with_capacity(tapes.len()),
        sessions: Vec::new(),
    };
    let stop = match walk(tapes, until, &mut report, visit) {
        Ok(true) => None,
        Ok(false) => Some(Stop::Tape(chain_end_error(tapes, until, &report))),
        Err(stop) => Some(stop),
    };
    (report, stop)
}

/// Checks sessions into `report`; whether `until` was reached (or, with
/// no `until`, whether there was a session at all).
fn walk<E>(
    tapes: &[PathBuf],
    until: Option<&str>,
    report: &mut ChainReport,
    visit: &mut dyn FnMut(&mut TapeReader, Record) -> Result<(), E>,
) -> Result<bool, Stop<E>> {
    for (tape_index, path) in tapes.iter().enumerate() {
        let mut reader = TapeReader::open(path).map_err(Stop::Tape)?;
        check_tape_order(report, path, reader.label()).map_err(Stop::Tape)?;
        report.tapes.push((path.clone(), reader.label().clone()));
        while let Some(header) = reader.next_session().map_err(Stop::Tape)?.cloned() {
            check_session_order(report, path, &header).map_err(Stop::Tape)?;
            let start = reader.session_start().expect("a session is being read");
            let totals = read_to_trailer_visiting(&mut reader, visit)?;
            let reached = until == Some(header.target.checkpoint.as_str());
            report.sessions.push(SessionReport {
                tape_index,
                start,
                header,
                totals,
            });
            if reached {
                return Ok(true);
            }
        }
    }
    Ok(until.is_none() && !report.sessions.is_empty())
}

pub(crate) fn chain_end_error(
    tapes: &[PathBuf],
    until: Option<&str>,
    report: &ChainReport,
) -> TapeError {
    let last = tapes.last().map_or(Path::new("-"), PathBuf::as_path);
    if report.sessions.is_empty() {
        return TapeError::refused(last, "the tapes hold no complete session");
    }
    let held: Vec<&str> = report
        .sessions
        .iter()
        .map(|s| s.header.target.checkpoint.as_str())
        .collect();
    TapeError::refused(
        last,
        format!(
            "no session of the chain brings the disk to checkpoint {:?}; the chain holds {}",
            until.unwrap_or_default(),
            held.join(", ")
        ),
    )
}

/// Reads the rest of a session, handing each record to `visit`; its
/// trailer's totals.
fn read_to_trailer_visiting<E>(
    reader: &mut TapeReader,
    visit: &mut dyn FnMut(&mut TapeReader, Record) -> Result<(), E>,
) -> Result<SessionTotals, Stop<E>> {
    while let Some(record) = reader.next_record().map_err(Stop::Tape)? {
        let trailer = match record {
            Record::Trailer(totals) => Some(totals),
            _ => None,
        };
        visit(reader, record).map_err(Stop::Visitor)?;
        if let Some(totals) = trailer {
            return Ok(totals);
        }
    }
    unreachable!("next_record returns a trailer before it returns None");
}

pub(crate) fn check_tape_order(
    report: &ChainReport,
    path: &Path,
    label: &Label,
) -> Result<(), TapeError> {
    let Some((first_path, first)) = report.tapes.first() else {
        return Ok(());
    };
    let (previous_path, previous) = report.tapes.last().expect("one tape at least");
    if label.chain_id != first.chain_id {
        return Err(TapeError::refused(
            path,
            format!(
                "this tape is of chain {}, not of chain {} as {} is",
                label.chain_id,
                first.chain_id,
                first_path.display()
            ),
        ));
    }
    if label.tape_sequence != previous.tape_sequence + 1 {
        return Err(TapeError::refused(
            path,
            format!(
                "this is tape {} of its chain but it follows tape {} ({}): a tape is missing or out of order",
                label.tape_sequence,
                previous.tape_sequence,
                previous_path.display()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_session_order(
    report: &ChainReport,
    path: &Path,
    header: &SessionHeader,
) -> Result<(), TapeError> {
    let refuse = |reason: String| {
        Err(TapeError::refused(
            path,
            format!(
                "session {} (checkpoint {}): {reason}",
                header.session_id, header.target.checkpoint
            ),
        ))
    };
    let Some(previous) = report.sessions.last().map(|s| &s.header) else {
        if let Some(parent) = header.parent {
            return refuse(format!(
                "it is an incremental on top of session {parent}, and the chain must start with a full session: give the tapes from the one with the full copy"
            ));
        }
        return Ok(());
    };
    // A full session starts the chain over (the copier falls back to one
    // when it cannot prove continuity); restore starts at the last one.
    let Some(parent) = header.parent else {
        return Ok(());
    };
    if header.source_id != previous.source_id {
        return refuse(format!(
            "it is of disk {}, the chain is of disk {}",
            header.source_id, previous.source_id
        ));
    }
    if header.source_size_bytes != previous.source_size_bytes {
        return refuse(format!(
            "its disk is {} bytes, the chain's is {} bytes (resized): start a new chain with a full copy",
            header.source_size_bytes, previous.source_size_bytes
        ));
    }
    if parent != previous.session_id {
        return refuse(format!(
            "it applies on top of session {parent}, but the session before it is {} (checkpoint {}): a session is missing or out of order",
            previous.session_id, previous.target.checkpoint
        ));
    }
    Ok(())
}

//! `Client`: one NBD connection, usable from many threads at once.
//!
//! Two layers. `submit_*` sends one request (checked against the export's
//! flags, size, alignment and maxima first, so the server never sees a
//! request the spec forbids) and returns a `Pending` to wait on; a copier
//! keeps many of them in flight. The synchronous calls (`read_at`,
//! `write_at`, `write_zeroes`, `trim`, `flush`, `block_status`) split a
//! range into requests the server accepts, pipeline them and wait.
//!
//! Sending happens on the caller's thread under the writer lock (a WRITE's
//! data goes from the caller's slice to the socket without a copy); the
//! reader thread takes the replies. Requests of length zero complete at
//! once without being sent: the spec leaves the server's answer to them
//! unspecified.

use std::collections::VecDeque;
use std::io::{self, BufReader, IoSlice, Write};
use std::ops::BitOr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nbd_server::proto::*;

use crate::error::{Command, CommandError, CommandFailure, ConnectError, ConnectionError};
use crate::handshake::{self, ConnectOptions, HandshakeError};
use crate::inflight::{Expect, Pending, Reply, Request, Shared};
use crate::info::{ExportInfo, Limits};
use crate::reply::{READ_BUFFER_BYTES, Reader};
use crate::status::{BlockStatus, Extent};
use crate::tls::ClientTls;
use crate::transport::Stream;
use crate::uri::Uri;
use crate::{IN_FLIGHT_MAX, READ_AT_WINDOW_BYTES};

/// Command flags a caller may ask for; the client adds the ones the
/// framing needs (PAYLOAD_LEN) itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestFlags(u16);

impl RequestFlags {
    pub const NONE: RequestFlags = RequestFlags(0);
    /// Reply only once the data is on stable storage (WRITE, WRITE_ZEROES, TRIM).
    pub const FUA: RequestFlags = RequestFlags(CMD_FLAG_FUA);
    /// WRITE_ZEROES: allocate, do not punch a hole.
    pub const NO_HOLE: RequestFlags = RequestFlags(CMD_FLAG_NO_HOLE);
    /// WRITE_ZEROES: fail with ENOTSUP at once unless zeroing is fast.
    pub const FAST_ZERO: RequestFlags = RequestFlags(CMD_FLAG_FAST_ZERO);

    pub fn bits(self) -> u16 {
        self.0
    }

    pub fn contains(self, other: RequestFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for RequestFlags {
    type Output = RequestFlags;
    fn bitor(self, other: RequestFlags) -> RequestFlags {
        RequestFlags(self.0 | other.0)
    }
}

/// One connection to one export. `Send + Sync`: share it by reference or
/// in an `Arc`; requests from all threads go out on the one socket.
pub struct Client {
    info: ExportInfo,
    limits: Limits,
    in_flight_max: usize,
    shared: Arc<Shared>,
    writer: Mutex<Stream>,
    /// A handle for shutting the socket down while others block on it.
    control: Stream,
    reader: Option<JoinHandle<()>>,
}

const _: () = {
    const fn shareable<T: Send + Sync>() {}
    const fn sendable<T: Send>() {}
    shareable::<Client>();
    // A copier hands requests in flight to other threads to wait on.
    sendable::<Pending<Vec<u8>>>();
};

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export_name", &self.info.export_name)
            .field("size_bytes", &self.info.size_bytes)
            .field("reply_mode", &self.info.reply_mode)
            .field("in_flight_max", &self.in_flight_max)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `uri` (`nbd://host[:port]/export` or
    /// `nbd+unix:///export?socket=PATH`) with the default options.
    pub fn connect(uri: &str) -> Result<Client, ConnectError> {
        Client::connect_with(uri, &ConnectOptions::default())
    }

    /// Connects with `options`; an nbds:// or nbds+unix:// URI connects
    /// over TLS or not at all.
    pub fn connect_with(uri: &str, options: &ConnectOptions) -> Result<Client, ConnectError> {
        check_options(options)?;
        let uri = Uri::parse(uri)?;
        let address = uri.address.to_string();
        let tls = match &uri.tls {
            Some(tls) => Some(
                ClientTls::new(tls, &uri.address)
                    .map_err(|error| ConnectError::Tls(Box::new(error)))?,
            ),
            None => None,
        };
        let stream = Stream::connect(&uri.address).map_err(|source| ConnectError::Connect {
            address: address.clone(),
            source,
        })?;
        Client::handshake(stream, &uri.export_name, options, tls.as_ref())
            .map_err(|source| ConnectError::Handshake { address, source })
    }

    /// Negotiates `export_name` over a stream already connected to a
    /// server (a socket handed over by a parent process, or a test's
    /// socketpair).
    pub fn from_stream(
        stream: Stream,
        export_name: &str,
        options: &ConnectOptions,
    ) -> Result<Client, ConnectError> {
        check_options(options)?;
        Client::handshake(stream, export_name, options, None).map_err(|source| {
            ConnectError::Handshake {
                address: "the given stream".to_string(),
                source,
            }
        })
    }

    fn handshake(
        stream: Stream,
        export_name: &str,
        options: &ConnectOptions,
        tls: Option<&ClientTls>,
    ) -> Result<Client, HandshakeError> {
        let mut output = stream.try_clone().map_err(HandshakeError::Io)?;
        let mut input = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
        let info = handshake::negotiate(&mut input, &mut output, export_name, options, tls)?;
        // Taken only now: after STARTTLS the streams are the relay's.
        let control = output.try_clone().map_err(HandshakeError::Io)?;
        let shared = Arc::new(Shared::new(options.in_flight_max));
        let reader = Reader::new(input, &info, Arc::clone(&shared));
        let reader = std::thread::Builder::new()
            .name("nbd-client-reader".to_string())
            .spawn(move || reader.run())
            .map_err(HandshakeError::Io)?;
        Ok(Client {
            limits: Limits::new(&info),
            info,
            in_flight_max: options.in_flight_max,
            shared,
            writer: Mutex::new(output),
            control,
            reader: Some(reader),
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    pub fn size_bytes(&self) -> u64 {
        self.info.size_bytes
    }

    pub fn in_flight_max(&self) -> usize {
        self.in_flight_max
    }

    /// Largest READ/WRITE payload one `submit_*` request may carry.
    pub fn payload_max_bytes(&self) -> u64 {
        self.limits.payload_max_bytes
    }

    /// Largest TRIM/WRITE_ZEROES length one `submit_*` request may cover.
    pub fn effect_max_bytes(&self) -> u64 {
        self.limits.effect_max_bytes
    }

    /// Why the connection ended, once it has.
    pub fn connection_error(&self) -> Option<Arc<ConnectionError>> {
        self.shared.failure()
    }

    // ---- one request each -------------------------------------------------

    /// Reads `buffer.len()` bytes at `offset_bytes` into `buffer`, which
    /// comes back from `wait` (holes are filled with zeroes, so a reused
    /// buffer needs no clearing).
    pub fn submit_read(
        &self,
        offset_bytes: u64,
        buffer: Vec<u8>,
    ) -> Result<Pending<Vec<u8>>, CommandError> {
        let length = buffer.len() as u64;
        let fail = failing(Command::Read, offset_bytes, length);
        self.check_range(offset_bytes, length).map_err(fail)?;
        self.check_size(length, self.limits.payload_max_bytes)
            .map_err(fail)?;
        let convert = |reply| match reply {
            Reply::Read(buffer) => buffer,
            _ => unreachable!("the reader answers a READ with data"),
        };
        if length == 0 {
            return Ok(ready(
                Command::Read,
                offset_bytes,
                Reply::Read(buffer),
                convert,
            ));
        }
        let request = (Command::Read, 0, offset_bytes, length);
        self.submit(request, Expect::Read(buffer), &[], convert)
    }

    /// Writes `data` at `offset_bytes`. The data is on the socket when
    /// this returns; `wait` says whether the server took it.
    pub fn submit_write(
        &self,
        data: &[u8],
        offset_bytes: u64,
        flags: RequestFlags,
    ) -> Result<Pending<()>, CommandError> {
        let length = data.len() as u64;
        let fail = failing(Command::Write, offset_bytes, length);
        self.check_writable().map_err(fail)?;
        self.check_flags(flags, RequestFlags::FUA).map_err(fail)?;
        self.check_range(offset_bytes, length).map_err(fail)?;
        self.check_size(length, self.limits.payload_max_bytes)
            .map_err(fail)?;
        if length == 0 {
            return Ok(ready(Command::Write, offset_bytes, Reply::Done, done));
        }
        let mut wire_flags = flags.bits();
        if self.info.reply_mode == ReplyMode::Extended {
            // Extended headers: WRITE says its length is a payload length.
            wire_flags |= CMD_FLAG_PAYLOAD_LEN;
        }
        let request = (Command::Write, wire_flags, offset_bytes, length);
        self.submit(request, Expect::Plain, data, done)
    }

    pub fn submit_write_zeroes(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        flags: RequestFlags,
    ) -> Result<Pending<()>, CommandError> {
        let fail = failing(Command::WriteZeroes, offset_bytes, length_bytes);
        self.check_writable().map_err(fail)?;
        if !self.info.can_write_zeroes() {
            return Err(fail(CommandFailure::Unsupported {
                what: "WRITE_ZEROES",
            }));
        }
        let allowed = RequestFlags::FUA | RequestFlags::NO_HOLE | RequestFlags::FAST_ZERO;
        self.check_flags(flags, allowed).map_err(fail)?;
        self.submit_effect(Command::WriteZeroes, offset_bytes, length_bytes, flags)
    }

    pub fn submit_trim(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        flags: RequestFlags,
    ) -> Result<Pending<()>, CommandError> {
        let fail = failing(Command::Trim, offset_bytes, length_bytes);
        self.check_writable().map_err(fail)?;
        if !self.info.can_trim() {
            return Err(fail(CommandFailure::Unsupported { what: "TRIM" }));
        }
        self.check_flags(flags, RequestFlags::FUA).map_err(fail)?;
        self.submit_effect(Command::Trim, offset_bytes, length_bytes, flags)
    }

    /// TRIM and WRITE_ZEROES: ranges without payload.
    fn submit_effect(
        &self,
        command: Command,
        offset_bytes: u64,
        length_bytes: u64,
        flags: RequestFlags,
    ) -> Result<Pending<()>, CommandError> {
        let fail = failing(command, offset_bytes, length_bytes);
        self.check_range(offset_bytes, length_bytes).map_err(fail)?;
        self.check_size(length_bytes, self.limits.effect_max_bytes)
            .map_err(fail)?;
        if length_bytes == 0 {
            return Ok(ready(command, offset_bytes, Reply::Done, done));
        }
        let request = (command, flags.bits(), offset_bytes, length_bytes);
        self.submit(request, Expect::Plain, &[], done)
    }

    /// Asks the server to make every write it has answered durable.
    pub fn submit_flush(&self) -> Result<Pending<()>, CommandError> {
        if !self.info.can_flush() {
            return Err(failing(Command::Flush, 0, 0)(CommandFailure::Unsupported {
                what: "FLUSH",
            }));
        }
        self.submit((Command::Flush, 0, 0, 0), Expect::Plain, &[], done)
    }

    /// Status of `[offset, offset + length)` in every selected context.
    /// The server may describe less than asked (a long request is also cut
    /// to what one request may say): ask again from the end of the extents.
    pub fn submit_block_status(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<Pending<BlockStatus>, CommandError> {
        let fail = failing(Command::BlockStatus, offset_bytes, length_bytes);
        if self.info.meta_contexts.is_empty() {
            return Err(fail(CommandFailure::NoContext {
                context: "any".to_string(),
            }));
        }
        self.check_range(offset_bytes, length_bytes).map_err(fail)?;
        let convert = |reply| match reply {
            Reply::Status(status) => status,
            _ => unreachable!("the reader answers BLOCK_STATUS with status"),
        };
        if length_bytes == 0 {
            let empty = Reply::Status(BlockStatus::default());
            return Ok(ready(Command::BlockStatus, offset_bytes, empty, convert));
        }
        let length = length_bytes.min(self.limits.status_max_bytes);
        let request = (Command::BlockStatus, 0, offset_bytes, length);
        self.submit(request, Expect::Status, &[], convert)
    }

    /// Registers, sends, and hands back the `Pending` for one request
    /// given as (command, wire flags, offset, length).
    fn submit<T>(
        &self,
        (command, flags, offset, length): (Command, u16, u64, u64),
        expect: Expect,
        payload: &[u8],
        convert: fn(Reply) -> T,
    ) -> Result<Pending<T>, CommandError> {
        let fail = failing(command, offset, length);
        let (done, receiver) = mpsc::sync_channel(1);
        let request = Request {
            command,
            offset,
            length,
            expect,
            done,
        };
        let cookie = self.shared.register(request).map_err(fail)?;
        let header = RequestHeader {
            flags,
            command: command.wire(),
            cookie,
            offset,
            length,
        };
        if let Err(error) = self.send(&header, payload) {
            // A half-sent request leaves the stream out of step for good.
            let error = self.shared.fail(ConnectionError::Io(error), Vec::new());
            self.control.shutdown();
            return Err(fail(CommandFailure::Connection(error)));
        }
        Ok(Pending::new(receiver, command, offset, length, convert))
    }

    fn send(&self, header: &RequestHeader, payload: &[u8]) -> io::Result<()> {
        let mut head = Vec::with_capacity(EXTENDED_REQUEST_LEN);
        header.encode(self.info.reply_mode == ReplyMode::Extended, &mut head);
        let mut writer = self.writer.lock().expect("writer lock poisoned");
        write_all(&mut writer, &head, payload)
    }

    // ---- whole ranges -----------------------------------------------------

    /// Fills `buf` from `offset_bytes`, in requests of at most the
    /// maximum payload with several in flight.
    pub fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), CommandError> {
        let fail = failing(Command::Read, offset_bytes, buf.len() as u64);
        self.check_range(offset_bytes, buf.len() as u64)
            .map_err(fail)?;
        let piece_bytes = self.limits.payload_max_bytes as usize;
        let window = (READ_AT_WINDOW_BYTES / piece_bytes).clamp(1, self.in_flight_max);
        let mut queue: VecDeque<(usize, Pending<Vec<u8>>)> = VecDeque::with_capacity(window);
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut position = 0;
        while position < buf.len() || !queue.is_empty() {
            while position < buf.len() && queue.len() < window {
                let length = piece_bytes.min(buf.len() - position);
                let mut buffer = spare.pop().unwrap_or_default();
                buffer.resize(length, 0);
                let pending = self.submit_read(offset_bytes + position as u64, buffer)?;
                queue.push_back((position, pending));
                position += length;
            }
            if let Some((at, pending)) = queue.pop_front() {
                let data = pending.wait()?;
                buf[at..at + data.len()].copy_from_slice(&data);
                spare.push(data);
            }
        }
        Ok(())
    }

    /// Writes `buf` at `offset_bytes`, in requests of at most the maximum
    /// payload with several in flight; returns once the server took all.
    pub fn write_at(
        &self,
        buf: &[u8],
        offset_bytes: u64,
        flags: RequestFlags,
    ) -> Result<(), CommandError> {
        let fail = failing(Command::Write, offset_bytes, buf.len() as u64);
        self.check_range(offset_bytes, buf.len() as u64)
            .map_err(fail)?;
        let piece = self.limits.payload_max_bytes;
        self.pipeline(offset_bytes, buf.len() as u64, piece, |offset, length| {
            let start = (offset - offset_bytes) as usize;
            self.submit_write(&buf[start..start + length as usize], offset, flags)
        })
    }

    pub fn write_zeroes(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        flags: RequestFlags,
    ) -> Result<(), CommandError> {
        let fail = failing(Command::WriteZeroes, offset_bytes, length_bytes);
        self.check_range(offset_bytes, length_bytes).map_err(fail)?;
        let piece = self.limits.effect_max_bytes;
        self.pipeline(offset_bytes, length_bytes, piece, |offset, length| {
            self.submit_write_zeroes(offset, length, flags)
        })
    }

    pub fn trim(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        flags: RequestFlags,
    ) -> Result<(), CommandError> {
        let fail = failing(Command::Trim, offset_bytes, length_bytes);
        self.check_range(offset_bytes, length_bytes).map_err(fail)?;
        let piece = self.limits.effect_max_bytes;
        self.pipeline(offset_bytes, length_bytes, piece, |offset, length| {
            self.submit_trim(offset, length, flags)
        })
    }

    pub fn flush(&self) -> Result<(), CommandError> {
        self.submit_flush()?.wait()
    }

    /// One BLOCK_STATUS request: the extents of `context` from
    /// `offset_bytes`, covering at most `length_bytes` and at least one
    /// byte (when `length_bytes` is not zero). Loop from the last extent's
    /// end for the rest.
    pub fn block_status(
        &self,
        context: &str,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<Vec<Extent>, CommandError> {
        if !self.info.has_meta_context(context) {
            let fail = failing(Command::BlockStatus, offset_bytes, length_bytes);
            return Err(fail(CommandFailure::NoContext {
                context: context.to_string(),
            }));
        }
        let status = self
            .submit_block_status(offset_bytes, length_bytes)?
            .wait()?;
        Ok(status.into_extents(context).unwrap_or_default())
    }

    /// Sends `[offset, offset + length)` as pieces of at most `piece_bytes`
    /// through `submit`, keeping up to `in_flight_max` of them in flight.
    fn pipeline(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        piece_bytes: u64,
        mut submit: impl FnMut(u64, u64) -> Result<Pending<()>, CommandError>,
    ) -> Result<(), CommandError> {
        let end = offset_bytes + length_bytes;
        let mut queue = VecDeque::with_capacity(self.in_flight_max);
        let mut position = offset_bytes;
        while position < end {
            if queue.len() >= self.in_flight_max {
                queue.pop_front().map_or(Ok(()), Pending::wait)?;
            }
            let length = piece_bytes.min(end - position);
            queue.push_back(submit(position, length)?);
            position += length;
        }
        queue.into_iter().try_for_each(Pending::wait)
    }

    // ---- checks -----------------------------------------------------------

    fn check_range(&self, offset: u64, length: u64) -> Result<(), CommandFailure> {
        let size_bytes = self.info.size_bytes;
        if offset
            .checked_add(length)
            .is_none_or(|end| end > size_bytes)
        {
            return Err(CommandFailure::OutOfRange { size_bytes });
        }
        let alignment = self.limits.alignment_bytes;
        if offset % alignment != 0 || length % alignment != 0 {
            return Err(CommandFailure::Misaligned {
                minimum_bytes: alignment,
            });
        }
        Ok(())
    }

    fn check_size(&self, length: u64, maximum_bytes: u64) -> Result<(), CommandFailure> {
        if length > maximum_bytes {
            return Err(CommandFailure::TooLarge { maximum_bytes });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), CommandFailure> {
        if self.info.is_read_only() {
            return Err(CommandFailure::ReadOnly);
        }
        Ok(())
    }

    fn check_flags(
        &self,
        flags: RequestFlags,
        allowed: RequestFlags,
    ) -> Result<(), CommandFailure> {
        if !allowed.contains(flags) {
            return Err(CommandFailure::FlagNotValid {
                flags: flags.bits(),
            });
        }
        if flags.contains(RequestFlags::FUA) && !self.info.can_fua() {
            return Err(CommandFailure::Unsupported { what: "FUA" });
        }
        if flags.contains(RequestFlags::FAST_ZERO) && !self.info.can_fast_zero() {
            return Err(CommandFailure::Unsupported { what: "FAST_ZERO" });
        }
        Ok(())
    }

    // ---- the end ----------------------------------------------------------

    /// Waits for the requests in flight, sends DISC and hangs up. Returns
    /// the connection's error if it had already failed. Dropping a
    /// `Client` does the same, without the result.
    pub fn close(mut self) -> Result<(), CommandError> {
        self.disconnect()
    }

    fn disconnect(&mut self) -> Result<(), CommandError> {
        let Some(reader) = self.reader.take() else {
            return Ok(());
        };
        let fail = failing(Command::Disconnect, 0, 0);
        let result = match self.shared.begin_close() {
            Some(error) => Err(fail(CommandFailure::Connection(error))),
            None => {
                let header = RequestHeader {
                    flags: 0,
                    command: CMD_DISC,
                    cookie: 0,
                    offset: 0,
                    length: 0,
                };
                self.send(&header, &[]).map_err(|error| {
                    fail(CommandFailure::Connection(Arc::new(ConnectionError::Io(
                        error,
                    ))))
                })
            }
        };
        // DISC has no reply, so the reader may stop now.
        self.control.shutdown();
        if reader.join().is_err() && result.is_ok() {
            return Err(fail(CommandFailure::Connection(Arc::new(
                ConnectionError::ReaderLost,
            ))));
        }
        result
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.disconnect();
    }
}

fn check_options(options: &ConnectOptions) -> Result<(), ConnectError> {
    if !(1..=IN_FLIGHT_MAX).contains(&options.in_flight_max) {
        return Err(ConnectError::Options(format!(
            "in_flight_max is {}; it must be from 1 to {IN_FLIGHT_MAX}",
            options.in_flight_max
        )));
    }
    if let Some(name) = &options.dirty_bitmap {
        let length = name.len() + DIRTY_BITMAP_CONTEXT_PREFIX.len();
        if name.is_empty() || length > STRING_MAX {
            return Err(ConnectError::Options(format!(
                "dirty_bitmap {name:?}: the context name must be 1 to {STRING_MAX} bytes"
            )));
        }
    }
    Ok(())
}

/// Makes a `CommandError` for `command` from a failure.
fn failing(
    command: Command,
    offset_bytes: u64,
    length_bytes: u64,
) -> impl Fn(CommandFailure) -> CommandError + Copy {
    move |failure| CommandError {
        command,
        offset_bytes,
        length_bytes,
        failure,
    }
}

fn done(_: Reply) {}

/// A `Pending` that is already answered (requests of length zero).
fn ready<T>(command: Command, offset: u64, reply: Reply, convert: fn(Reply) -> T) -> Pending<T> {
    let (sender, receiver) = mpsc::sync_channel(1);
    sender.send(Ok(reply)).expect("the receiver is right here");
    Pending::new(receiver, command, offset, 0, convert)
}

/// Writes the header and payload with as few system calls as the socket
/// allows (one, usually).
fn write_all(stream: &mut Stream, head: &[u8], payload: &[u8]) -> io::Result<()> {
    let mut storage = [IoSlice::new(head), IoSlice::new(payload)];
    let count = if payload.is_empty() { 1 } else { 2 };
    let mut slices = &mut storage[..count];
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut slices, written),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

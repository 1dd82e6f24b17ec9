#!/usr/bin/python3
"""Protocol checks against a running blockwatch server, driven by libnbd.

Run by tests/libnbd.rs as: /usr/bin/python3 libnbd_checks.py CHECK ARG...
Each CHECK prints one "ok: ..." line per passed step and exits 0; the first
failed step prints "FAIL: ..." and exits 1. Needs python3-libnbd
(`import nbd`), which only the system python3 has.
"""

import errno
import socket
import struct
import sys
import time

import nbd

MIB = 1024 * 1024
# What the server advertises as its maximum payload (NBD_INFO_BLOCK_SIZE).
PAYLOAD_MAX = 32 * MIB
# Bounds on waiting for replies: a hang becomes a failure, not a stuck test.
REPLY_WAIT_SECONDS = 10


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def ok(message):
    print("ok: " + message, flush=True)


def connect(uri, contexts=(), strict=True):
    handle = nbd.NBD()
    for context in contexts:
        handle.add_meta_context(context)
    if not strict:
        # Let invalid requests through to the server instead of refusing
        # them in the client.
        handle.set_strict_mode(0)
    handle.connect_uri(uri)
    return handle


def expect_errno(handle, what, wanted, operation):
    """Runs `operation`, which must fail with errno `wanted`, then checks
    that the connection still serves a normal read."""
    try:
        operation()
    except nbd.Error as error:
        # nbd.Error carries the number as .errnum and its name as .errno.
        check(
            error.errnum == wanted and error.errno == errno.errorcode[wanted],
            "%s: wanted %s, got errno %s (%s)"
            % (what, errno.errorcode[wanted], error.errnum, error),
        )
        # libnbd says "command failed" only for an error the server sent;
        # anything else would mean the client refused the request itself.
        check("command failed" in str(error),
              "%s: the error did not come from the server: %s" % (what, error))
    else:
        raise CheckFailed("%s: succeeded, wanted %s" % (what, errno.errorcode[wanted]))
    assert_connection_usable(handle, what)
    ok("%s -> %s, and the connection still reads" % (what, errno.errorcode[wanted]))


def assert_connection_usable(handle, after):
    try:
        data = handle.pread(4096, 0)
    except nbd.Error as error:
        raise CheckFailed("a normal read after %r failed: %s" % (after, error))
    check(len(data) == 4096, "short read after %r" % after)


def collect_extents(handle, offset, length, flags=0):
    """base:allocation extents from one BLOCK_STATUS: [(offset, length, flags)]."""
    found = []

    def callback(context, start, entries, error):
        check(context == "base:allocation", "unexpected context %r" % context)
        position = start
        for index in range(0, len(entries), 2):
            found.append((position, entries[index], entries[index + 1]))
            position += entries[index]
        return 0

    handle.block_status(length, offset, callback, flags)
    return found


def read_chunks(handle, count, offset, flags=0):
    """A structured read: returns (data, sorted [(offset, length, status)])."""
    chunks = []

    def chunk(subbuf, chunk_offset, status, error):
        chunks.append((chunk_offset, len(subbuf), status))
        return 0

    data = handle.pread_structured(count, offset, chunk, flags)
    return bytes(data), sorted(chunks)


def tiles(chunks, offset, length):
    """Whether sorted (offset, length, ...) pieces cover exactly [offset, offset+length)."""
    position = offset
    for start, piece, _ in chunks:
        if start != position or piece <= 0:
            return False
        position += piece
    return position == offset + length


def extents_of_whole_disk(handle):
    """Calls BLOCK_STATUS until the whole export is covered, merging runs."""
    size = handle.get_size()
    runs = []
    offset = 0
    while offset < size:
        extents = collect_extents(handle, offset, size - offset)
        check(extents, "BLOCK_STATUS at %d returned no extents" % offset)
        for start, length, flags in extents:
            check(length > 0, "zero-length extent at %d" % start)
            length = min(length, size - start)
            if runs and runs[-1][2] == flags and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + length, flags)
            else:
                runs.append((start, length, flags))
            offset = start + length
            if offset >= size:
                break
    return runs


def check_opt_mode(uri, first_size, second_size):
    """Option haggling: LIST, INFO, LIST_META_CONTEXT, then GO."""
    handle = nbd.NBD()
    handle.set_opt_mode(True)
    handle.set_full_info(True)
    handle.connect_uri(uri)
    check(handle.aio_is_negotiating(), "not negotiating after connect in opt mode")

    exports = []
    handle.opt_list(lambda name, description: exports.append(name) or 0)
    check(exports == ["a", "b"], "opt_list returned %r, wanted ['a', 'b']" % exports)
    ok("opt_list names both exports: %r" % exports)

    for name, size in (("a", first_size), ("b", second_size)):
        handle.set_export_name(name)
        handle.opt_info()
        check(handle.get_size() == size, "opt_info(%s) size %d" % (name, handle.get_size()))
        check(not handle.is_read_only(), "opt_info(%s) says read-only" % name)
        for capability in ("can_flush", "can_fua", "can_trim", "can_zero",
                           "can_multi_conn", "can_cache", "can_fast_zero"):
            check(getattr(handle, capability)(), "opt_info(%s): %s is false" % (name, capability))
        check(handle.get_block_size(nbd.SIZE_MINIMUM) == 1, "minimum block size")
        check(handle.get_block_size(nbd.SIZE_PREFERRED) == 4096, "preferred block size")
        check(handle.get_block_size(nbd.SIZE_MAXIMUM) == PAYLOAD_MAX, "maximum block size")
        description = handle.get_export_description()
        check(description.startswith("blockwatch: ") and description.endswith(name + ".img"),
              "opt_info(%s) description %r" % (name, description))
        ok("opt_info(%s): size %d, flags, block sizes, description" % (name, size))

        contexts = []
        count = handle.opt_list_meta_context(lambda context: contexts.append(context) or 0)
        check("base:allocation" in contexts,
              "opt_list_meta_context(%s) returned %r" % (name, contexts))
        check(count == len(contexts), "opt_list_meta_context count %d != %r" % (count, contexts))
        ok("opt_list_meta_context(%s): %r" % (name, contexts))

    handle.set_export_name("missing")
    try:
        handle.opt_info()
    except nbd.Error as error:
        ok("opt_info of an unknown export fails: %s" % error)
    else:
        raise CheckFailed("opt_info of an unknown export succeeded")
    check(handle.aio_is_negotiating(), "handle left negotiation after a failed opt_info")

    handle.set_export_name("b")
    handle.add_meta_context("base:allocation")
    handle.opt_go()
    check(handle.aio_is_ready(), "not ready after opt_go")
    check(handle.get_size() == second_size, "opt_go(b) size %d" % handle.get_size())
    check(handle.can_meta_context("base:allocation"), "base:allocation not negotiated")
    handle.pwrite(b"\x42" * 4096, 8192)
    check(handle.pread(4096, 8192) == b"\x42" * 4096, "read back on export b")
    handle.shutdown()
    ok("opt_go(b) enters transmission with base:allocation; read/write work")


def check_block_status(uri):
    handle = connect(uri, contexts=["base:allocation"])
    size = handle.get_size()
    check(handle.can_meta_context("base:allocation"), "base:allocation not negotiated")
    check(extents_of_whole_disk(handle) == [(0, size, 3)],
          "fresh image: %r" % extents_of_whole_disk(handle))
    ok("a fresh sparse image is one hole,zero extent")

    handle.pwrite(b"\x01" * (64 * 1024), 1 * MIB)
    handle.pwrite(b"\x02" * MIB, 10 * MIB)
    handle.pwrite(b"\x03" * 4096, size - 4096)
    wanted = [
        (0, MIB, 3),
        (MIB, 64 * 1024, 0),
        (MIB + 64 * 1024, 9 * MIB - 64 * 1024, 3),
        (10 * MIB, MIB, 0),
        (11 * MIB, size - 4096 - 11 * MIB, 3),
        (size - 4096, 4096, 0),
    ]
    got = extents_of_whole_disk(handle)
    check(got == wanted, "after writes: got %r, wanted %r" % (got, wanted))
    ok("extents after three writes: %r" % got)

    # Reads across holes: the reply may use hole chunks, but the bytes are
    # the same; with DF (don't fragment) it must be one data chunk.
    wanted_bytes = bytes(MIB) + b"\x01" * (64 * 1024) + bytes(MIB - 64 * 1024)
    data, chunks = read_chunks(handle, 2 * MIB, 0)
    check(data == wanted_bytes, "a 2 MiB read across holes returned the wrong bytes")
    check(tiles(chunks, 0, 2 * MIB), "read chunks do not tile the request: %r" % chunks)
    check(any(status == nbd.READ_HOLE for _, _, status in chunks),
          "a read of mostly holes sent no hole chunk: %r" % chunks)
    ok("a 2 MiB read across holes: right bytes in chunks %r" % chunks)
    check(handle.can_df(), "DF not advertised")
    data, chunks = read_chunks(handle, 2 * MIB, 0, nbd.CMD_FLAG_DF)
    check(data == wanted_bytes, "a DF read across holes returned the wrong bytes")
    check(chunks == [(0, 2 * MIB, nbd.READ_DATA)], "DF read was fragmented: %r" % chunks)
    ok("the same read with DF comes as one data chunk")

    one = collect_extents(handle, 0, size, nbd.CMD_FLAG_REQ_ONE)
    check(one == [(0, MIB, 3)], "REQ_ONE from 0: %r" % one)
    inside = collect_extents(handle, 10 * MIB + 4096, 4096, nbd.CMD_FLAG_REQ_ONE)
    check(inside == [(10 * MIB + 4096, 4096, 0)], "REQ_ONE inside data: %r" % inside)
    ok("REQ_ONE returns one extent clipped to the request")

    handle.trim(MIB, 10 * MIB)
    handle.flush()
    got = collect_extents(handle, 10 * MIB, MIB)
    check(got and got[0][0] == 10 * MIB and got[0][2] == 3 and got[0][1] >= MIB,
          "after TRIM: %r" % got)
    check(handle.pread(4096, 10 * MIB) == bytes(4096), "trimmed range does not read as zero")
    ok("a trimmed range becomes hole,zero")

    handle.pwrite(b"\x04" * 4096, 20 * MIB)
    handle.zero(size - 4096 - MIB, MIB, nbd.CMD_FLAG_NO_HOLE)
    check(handle.pread(4096, 20 * MIB) == bytes(4096), "WRITE_ZEROES left data behind")
    check(handle.pread(4096, size - 4096) == b"\x03" * 4096, "data after zeroed range")
    handle.shutdown()
    ok("WRITE_ZEROES with NO_HOLE keeps the data around it")


def check_errors(uri):
    handle = connect(uri, contexts=["base:allocation"], strict=False)
    size = handle.get_size()
    EINVAL, ENOSPC = errno.EINVAL, errno.ENOSPC

    expect_errno(handle, "READ past the end", EINVAL, lambda: handle.pread(4096, size - 512))
    expect_errno(handle, "READ with offset+length overflowing 64 bits", EINVAL,
                 lambda: handle.pread(4096, 2**64 - 512))
    expect_errno(handle, "TRIM past the end", EINVAL, lambda: handle.trim(4096, size - 512))
    expect_errno(handle, "CACHE past the end", EINVAL, lambda: handle.cache(4096, size - 512))
    expect_errno(handle, "BLOCK_STATUS past the end", EINVAL,
                 lambda: collect_extents(handle, size, 4096))
    expect_errno(handle, "WRITE past the end", ENOSPC,
                 lambda: handle.pwrite(b"x" * 4096, size - 512))
    expect_errno(handle, "WRITE_ZEROES past the end", ENOSPC,
                 lambda: handle.zero(4096, size - 512))

    expect_errno(handle, "READ with an unknown flag bit 15", EINVAL,
                 lambda: handle.pread(512, 0, 1 << 15))
    expect_errno(handle, "READ with NO_HOLE", EINVAL,
                 lambda: handle.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
    expect_errno(handle, "READ with REQ_ONE", EINVAL,
                 lambda: handle.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
    expect_errno(handle, "WRITE with FAST_ZERO", EINVAL,
                 lambda: handle.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FAST_ZERO))
    expect_errno(handle, "FLUSH with REQ_ONE", EINVAL,
                 lambda: handle.flush(nbd.CMD_FLAG_REQ_ONE))
    expect_errno(handle, "TRIM with NO_HOLE", EINVAL,
                 lambda: handle.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE))

    expect_errno(handle, "zero-length READ", EINVAL, lambda: handle.pread(0, 0))
    expect_errno(handle, "zero-length WRITE", EINVAL, lambda: handle.pwrite(b"", 0))
    expect_errno(handle, "zero-length TRIM", EINVAL, lambda: handle.trim(0, 0))
    expect_errno(handle, "zero-length WRITE_ZEROES", EINVAL, lambda: handle.zero(0, 0))
    expect_errno(handle, "zero-length CACHE", EINVAL, lambda: handle.cache(0, 0))
    expect_errno(handle, "zero-length BLOCK_STATUS", EINVAL,
                 lambda: collect_extents(handle, 0, 0))

    # The spec makes the server accept FUA on any command once SEND_FUA is
    # advertised (it may ignore it).
    handle.pread(512, 0, nbd.CMD_FLAG_FUA)
    handle.cache(4096, 0)
    check(len(handle.pread(PAYLOAD_MAX, 0)) == PAYLOAD_MAX, "a 32 MiB read is short")
    ok("READ with FUA, CACHE and a 32 MiB READ succeed")
    handle.shutdown()

    # A connection that selected no metadata context may not ask for status.
    bare = connect(uri, strict=False)
    expect_errno(bare, "BLOCK_STATUS without a selected context", EINVAL,
                 lambda: collect_extents(bare, 0, 4096))
    bare.shutdown()


def check_large_requests(uri):
    """Requests up to 64 MiB from a client that never asked for block
    sizes are served (libnbd itself sends nothing larger; the server's
    answer to larger ones is in nbd-server/tests/wire.rs)."""
    handle = nbd.NBD()
    handle.set_strict_mode(0)
    handle.set_request_block_size(False)
    handle.connect_uri(uri)
    check(handle.get_block_size(nbd.SIZE_MAXIMUM) == PAYLOAD_MAX,
          "the advertised maximum stays 32 MiB")
    data = bytes(i % 251 for i in range(256)) * (2 * PAYLOAD_MAX // 256)
    handle.pwrite(data, 0)
    check(handle.pread(2 * PAYLOAD_MAX, 0) == data, "a 64 MiB READ returns the 64 MiB WRITE")
    handle.pwrite(b"\x09" * 4096, 0, nbd.CMD_FLAG_FUA)
    check(handle.pread(4096, 0) == b"\x09" * 4096, "the connection goes on")
    handle.shutdown()
    ok("a 64 MiB WRITE and READ are served without block-size negotiation")


def check_read_only(uri):
    handle = connect(uri, strict=False)
    check(handle.is_read_only(), "the export is not read-only")
    EPERM = errno.EPERM
    expect_errno(handle, "WRITE on a read-only export", EPERM,
                 lambda: handle.pwrite(b"x" * 4096, 0))
    expect_errno(handle, "TRIM on a read-only export", EPERM, lambda: handle.trim(4096, 0))
    expect_errno(handle, "WRITE_ZEROES on a read-only export", EPERM,
                 lambda: handle.zero(4096, 0))
    check(handle.pread(4096, 0) == b"\x5a" * 4096, "read-only export reads wrong data")
    handle.shutdown()
    ok("reads on the read-only export return the image's data")


def check_multi_conn(uri):
    writer = connect(uri)
    reader = connect(uri)
    check(writer.can_multi_conn() and reader.can_multi_conn(), "CAN_MULTI_CONN not advertised")

    data = bytes(range(256)) * 256
    writer.pwrite(data, 5 * MIB)
    reader.flush()
    check(reader.pread(len(data), 5 * MIB) == data,
          "a write on one connection is not seen after FLUSH on the other")
    ok("write on A, flush on B, read on B sees it")

    writer.pwrite(b"\xee" * 8192, 7 * MIB, nbd.CMD_FLAG_FUA)
    check(reader.pread(8192, 7 * MIB) == b"\xee" * 8192, "FUA write not seen on B")
    ok("FUA write on A is seen on B")

    writer.trim(64 * 1024, 5 * MIB)
    reader.flush()
    check(reader.pread(64 * 1024, 5 * MIB) == bytes(64 * 1024), "trim on A not seen on B")
    writer.shutdown()
    reader.shutdown()
    ok("trim on A, flush on B, read on B sees zeroes")


def check_queued_reads(uri, count, length):
    """Many large reads sent before any reply is read must all be answered."""
    handle = connect(uri)
    size = handle.get_size()
    check(count * length <= size, "the export is too small for this check")
    for index in range(count):
        handle.pwrite(bytes([index % 251 + 1]) * length, index * length)
    handle.flush()

    buffers = [nbd.Buffer(length) for _ in range(count)]
    for index, buffer in enumerate(buffers):
        handle.aio_pread(buffer, index * length)
    deadline = time.monotonic() + REPLY_WAIT_SECONDS
    while handle.aio_in_flight() > 0 and time.monotonic() < deadline:
        handle.poll(100)
    left = handle.aio_in_flight()
    check(left == 0, "%d of %d queued %d-byte reads were never answered within %d s"
          % (left, count, length, REPLY_WAIT_SECONDS))
    for index, buffer in enumerate(buffers):
        check(buffer.to_bytearray() == bytes([index % 251 + 1]) * length,
              "queued read %d returned the wrong data" % index)
    handle.shutdown()
    ok("%d queued reads of %d bytes all completed with the right data" % (count, length))


def check_hold_open(uri):
    """Writes, says "ready" and keeps the connection open until stdin ends
    (the test stops the server meanwhile); then the connection must be gone."""
    handle = connect(uri)
    for index in range(8):
        handle.pwrite(bytes([0xa0 + index]) * MIB, index * MIB)
    print("ready", flush=True)
    sys.stdin.read()
    try:
        handle.pread(4096, 0)
    except nbd.Error as error:
        ok("after the server stopped, the connection is closed: %s" % error)
    else:
        raise CheckFailed("the connection still answers after the server stopped")


# Raw protocol, for what libnbd cannot send: unknown commands, and requests
# under extended headers (libnbd 1.14 does not negotiate them).

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
OPT_GO = 7
OPT_EXTENDED_HEADERS = 11
REP_ACK = 1
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
EXTENDED_REPLY_MAGIC = 0x6E8A278C
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
REPLY_FLAG_DONE = 1
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = 32769
UNKNOWN_COMMAND = 0x55


def receive(sock, length):
    data = b""
    while len(data) < length:
        piece = sock.recv(length - len(data))
        check(piece, "the server closed the connection after %d of %d bytes"
              % (len(data), length))
        data += piece
    return data


def send_option(sock, option, data):
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
    while True:
        magic, replied, reply_type, length = struct.unpack(">QIII", receive(sock, 20))
        check(magic == OPTION_REPLY_MAGIC and replied == option,
              "bad option reply header for option %d" % option)
        receive(sock, length)
        check(reply_type < 2**31, "option %d refused with reply type %#x" % (option, reply_type))
        if reply_type == REP_ACK:
            return


def raw_connect(socket_path, extended):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REPLY_WAIT_SECONDS)
    sock.connect(socket_path)
    magic, option_magic, _flags = struct.unpack(">QQH", receive(sock, 18))
    check(magic == NBDMAGIC and option_magic == IHAVEOPT, "bad greeting")
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    if extended:
        send_option(sock, OPT_EXTENDED_HEADERS, b"")
    send_option(sock, OPT_GO, struct.pack(">IH", 0, 0))  # export "", no info requests
    return sock


def raw_request(sock, extended, command, cookie, offset, length, payload=b""):
    if extended:
        header = struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, 0, command, cookie, offset, length)
    else:
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, offset, length)
    sock.sendall(header + payload)


def raw_reply_error(sock, extended, cookie, read_length=0):
    """Reads one complete reply; returns its error (0 on success)."""
    if not extended:
        magic, error, replied = struct.unpack(">IIQ", receive(sock, 16))
        check(magic == SIMPLE_REPLY_MAGIC, "bad simple reply magic %#x" % magic)
        check(replied == cookie, "reply for cookie %d, wanted %d" % (replied, cookie))
        if error == 0 and read_length:
            receive(sock, read_length)
        return error
    error = 0
    while True:
        magic, flags, chunk_type, replied, _offset, length = struct.unpack(
            ">IHHQQQ", receive(sock, 32))
        check(magic == EXTENDED_REPLY_MAGIC, "bad extended reply magic %#x" % magic)
        check(replied == cookie, "reply for cookie %d, wanted %d" % (replied, cookie))
        payload = receive(sock, length)
        if chunk_type == REPLY_TYPE_ERROR:
            error = struct.unpack(">I", payload[:4])[0]
        if flags & REPLY_FLAG_DONE:
            return error


def check_raw(socket_path, size):
    for extended in (False, True):
        mode = "extended headers" if extended else "simple replies"
        sock = raw_connect(socket_path, extended)
        raw_request(sock, extended, UNKNOWN_COMMAND, 1, 0, 512)
        error = raw_reply_error(sock, extended, 1)
        check(error == errno.EINVAL, "%s: unknown command got error %d, wanted EINVAL"
              % (mode, error))
        raw_request(sock, extended, CMD_READ, 2, 0, 512)
        check(raw_reply_error(sock, extended, 2, 512) == 0,
              "%s: READ after the unknown command failed" % mode)
        ok("%s: unknown command -> EINVAL, then a READ works" % mode)

        raw_request(sock, extended, CMD_WRITE, 3, size - 256, 512, b"w" * 512)
        error = raw_reply_error(sock, extended, 3)
        check(error == errno.ENOSPC, "%s: WRITE past the end got %d, wanted ENOSPC"
              % (mode, error))
        raw_request(sock, extended, CMD_READ, 4, size - 256, 512)
        error = raw_reply_error(sock, extended, 4)
        check(error == errno.EINVAL, "%s: READ past the end got %d, wanted EINVAL"
              % (mode, error))
        raw_request(sock, extended, CMD_READ, 5, 4096, 512)
        check(raw_reply_error(sock, extended, 5, 512) == 0,
              "%s: READ after the range errors failed" % mode)
        ok("%s: WRITE past the end -> ENOSPC, READ past the end -> EINVAL" % mode)
        raw_request(sock, extended, CMD_DISC, 6, 0, 0)
        sock.close()


CHECKS = {
    "opt-mode": lambda args: check_opt_mode(args[0], int(args[1]), int(args[2])),
    "block-status": lambda args: check_block_status(args[0]),
    "errors": lambda args: check_errors(args[0]),
    "large-requests": lambda args: check_large_requests(args[0]),
    "read-only": lambda args: check_read_only(args[0]),
    "multi-conn": lambda args: check_multi_conn(args[0]),
    "queued-reads": lambda args: check_queued_reads(args[0], int(args[1]), int(args[2])),
    "hold-open": lambda args: check_hold_open(args[0]),
    "raw": lambda args: check_raw(args[0], int(args[1])),
}


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in CHECKS:
        sys.stderr.write("usage: libnbd_checks.py {%s} ARG...\n" % ",".join(CHECKS))
        return 2
    try:
        CHECKS[sys.argv[1]](sys.argv[2:])
    except CheckFailed as failure:
        print("FAIL: %s" % failure, flush=True)
        return 1
    except nbd.Error as error:
        print("FAIL: unexpected libnbd error: %s" % error, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

//! What the workspace's tests share, written once: every test tree
//! (`tests/`, `fsmap/tests/`, `tracker/tests/`, `nbd-server/tests/`,
//! `nbd-client/tests/`, and the unit tests through `fsmap/src/testing.rs`)
//! takes it as a dev-dependency. It is never published and nothing but
//! tests uses it, apart from `s3s-fs-serve`, its one binary, which the
//! benchmark scripts run.
//!
//! Files and what each owns:
//! - `files.rs`: `TempDir`, a directory removed on drop, and the file
//!   helpers around it (sparse files, positioned writes, byte-exact
//!   comparisons naming the first differing offset).
//! - `clients.rs`: the NBD clients driven from more than one test file
//!   (qemu-io, `nbdinfo --json --map`), failing with what the client printed.
//! - `process.rs`: running a client to completion with a bound on how long
//!   it may take, failing with its command line, status and output;
//!   feeding it standard input; parsing the JSON it prints; signals.
//! - `server.rs`: `ServerProcess`, a server (nbdkit, qemu-nbd, ...) on a
//!   unix socket, waited for until it accepts and stopped on drop.
//! - `tools.rs`: finding an installed tool or failing with the package
//!   that provides it; whether the tests run as root.
//! - `random.rs`: the one seeded generator (xorshift64) and the bytes it
//!   makes, so that every failure reproduces from its seed.
//! - `mount.rs`: an export exposed as a file by nbdfuse and a filesystem
//!   mounted through a loop device, both undone on drop, and the
//!   kernel's extent map of mounted files (FIEMAP through filefrag).
//! - `certificates.rs`: `Certificates`, a certificate authority with
//!   server and client certificates (openssl) in the directories nbdkit,
//!   libnbd, qemu and blockwatch read, for the TLS tests.
//! - `s3.rs`: `S3Server`, an S3 server on 127.0.0.1 (s3s-fs in process,
//!   its objects plain files a test can corrupt, or moto_server as a child
//!   process) reached with fixed credentials, stopped on drop.
//! - `bin/s3s-fs-serve.rs`: the same s3s-fs server as a program, printing
//!   its endpoint and serving until killed.
//!
//! Every helper panics with a readable message rather than returning an
//! error: a failed helper is a failed test.

mod certificates;
mod clients;
mod files;
mod mount;
mod process;
mod random;
mod s3;
mod server;
mod tools;

pub use certificates::Certificates;
pub use clients::{nbdinfo_map, qemu_io, qemu_io_command};
pub use files::{
    MIB, TempDir, assert_file_range, assert_files_equal, create_file, create_sparse_file, write_at,
    write_random_file,
};
pub use mount::{FuseExport, LoopMount, physical_blocks};
pub use process::{
    COMMAND_LIMIT, command, describe, output, output_within, parse_json, run, run_program,
    run_with_input, run_within, signal, status_text, wait_bounded, wait_until,
};
pub use random::{Xorshift, random_bytes};
pub use s3::{S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY, S3Server};
pub use server::ServerProcess;
pub use tools::{find_in_path, is_root, require_tool, skipped_unless_root, tool};

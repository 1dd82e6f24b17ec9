//! Whole-disk copies with `nbdcopy` (libnbd-bin), which uses several
//! connections at once (the server advertises CAN_MULTI_CONN), large
//! requests and block status.

mod common;

use common::Server;
use testkit::{
    MIB, TempDir, assert_file_range, assert_files_equal, create_sparse_file, random_bytes,
    require_tool, run_program, write_at, write_random_file,
};

const SIZE_BYTES: u64 = 64 * MIB;

#[test]
fn copy_from_server_to_file_is_byte_identical() {
    require_tool("nbdcopy", "libnbd-bin");
    let dir = TempDir::new("nbdcopy-out");
    let image = dir.join("disk.img");
    write_random_file(&image, 1, SIZE_BYTES as usize);
    let server = Server::start(dir.path(), &[&image], &[]);

    let copy = dir.join("copy.img");
    run_program("nbdcopy", [server.uri().as_str(), path_str(&copy)]);
    server.stop();
    assert_files_equal(&image, &copy);
}

#[test]
fn copy_from_file_into_server_lands_in_the_image() {
    require_tool("nbdcopy", "libnbd-bin");
    let dir = TempDir::new("nbdcopy-in");
    let source = dir.join("source.img");
    write_random_file(&source, 2, SIZE_BYTES as usize);
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");

    run_program("nbdcopy", [path_str(&source), server.uri().as_str()]);
    // Read it back through the server while it still runs...
    let back = dir.join("back.img");
    run_program("nbdcopy", [server.uri().as_str(), path_str(&back)]);
    assert_files_equal(&source, &back);
    // ...and check the image itself once the server has flushed and exited.
    server.stop();
    assert_files_equal(&source, &image);
}

#[test]
fn destination_is_zero_allocated_copies_only_the_data() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("nbdcopy-zero");
    // A sparse source with three islands of data, the last one at the end.
    let source = dir.join("source.img");
    create_sparse_file(&source, SIZE_BYTES);
    let islands = [(5 * MIB, MIB), (40 * MIB, 2 * MIB), (SIZE_BYTES - MIB, MIB)];
    for (index, &(offset, length)) in islands.iter().enumerate() {
        write_at(
            &source,
            offset,
            &random_bytes(10 + index as u64, length as usize),
        );
    }
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    let uri = server.uri();

    // Into the server: the fresh image really is zero, so only the
    // islands are written and everything else stays a hole.
    run_program(
        "nbdcopy",
        [
            "--destination-is-zero",
            "--allocated",
            path_str(&source),
            uri.as_str(),
        ],
    );
    let map = run_program("nbdinfo", ["--map", &uri]);
    let data_extents: Vec<(u64, u64)> = map
        .lines()
        .filter(|line| line.split_whitespace().nth(2) == Some("0"))
        .map(|line| {
            let mut fields = line.split_whitespace();
            let offset = fields.next().expect("offset").parse().expect("offset");
            let length = fields.next().expect("length").parse().expect("length");
            (offset, length)
        })
        .collect();
    assert_eq!(
        data_extents, islands,
        "data extents in nbdinfo --map:\n{map}"
    );

    // Out of the server into a new file.
    let copy = dir.join("copy.img");
    run_program(
        "nbdcopy",
        [
            "--destination-is-zero",
            "--allocated",
            uri.as_str(),
            path_str(&copy),
        ],
    );
    assert_files_equal(&source, &copy);
    server.stop();
    assert_files_equal(&source, &image);
    assert_file_range(&image, 0, &vec![0u8; (5 * MIB) as usize]);
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

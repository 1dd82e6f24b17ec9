//! Seeds for `tape_reader`: small tapes written by the copier's own
//! writer (4 KiB blocks; full and incremental sessions, compressed and
//! not, a file list, a zero extent, a torn tail), each prefixed with the
//! mode byte 1 (checksums recomputed). Usage: make_seeds DIR.

use std::path::PathBuf;

use copier::tape::{NewSession, TapeOptions, TapeWriter};
use copier::target::Held;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: make_seeds DIR"));
    std::fs::create_dir_all(&dir).expect("seed directory");
    let scratch = dir.join("scratch.tape");
    for (index, sessions) in [1usize, 2, 3].into_iter().enumerate() {
        for compress in [false, true] {
            let _ = std::fs::remove_file(&scratch);
            write_tape(&scratch, sessions, compress);
            let mut seed = vec![1u8];
            seed.extend(std::fs::read(&scratch).expect("the tape"));
            let name = format!("tape-{index}-{}", if compress { "zstd" } else { "raw" });
            std::fs::write(dir.join(&name), &seed).expect("a seed");
            // The same tape with its last block cut in half: a torn tail.
            seed.truncate(seed.len() - 2048);
            std::fs::write(dir.join(format!("{name}-torn")), &seed).expect("a seed");
        }
    }
    let _ = std::fs::remove_file(&scratch);
}

fn write_tape(path: &std::path::Path, sessions: usize, compress: bool) {
    let options = TapeOptions {
        block_size_bytes: 4096,
        ..TapeOptions::default()
    };
    let mut tape = TapeWriter::open_append(path, &options).expect("a new tape");
    for round in 0..sessions {
        let last = tape.last_session().cloned();
        let new = NewSession {
            source_id: "0123456789abcdef".into(),
            source_size_bytes: 1 << 20,
            granularity_bytes: 65536,
            base: last.as_ref().map(|h| h.target.clone()),
            target: Held {
                checkpoint: format!("c{round}"),
                generation: round as u64 + 1,
            },
            parent: last.as_ref().map(|h| h.session_id),
            compress,
        };
        let mut session = tape.begin_session(new).expect("a session");
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 + round as u32) as u8).collect();
        session
            .write_data(round as u64 * 8192, &data)
            .expect("data");
        session.write_zero(100_000, 20_000).expect("zeroes");
        session.set_files(vec![format!("/f{round}"), "/etc/passwd".into()]);
        tape = session.finish().expect("finish").0;
    }
}

//! Times the file map on an image (scripts/bench-files drives it):
//! full build (and resident memory), attribution of N changed regions
//! (median of five),
//! and an incremental update after a small change made with debugfs.
//!
//! usage: mapbench IMAGE [REGIONS] [REGION_BYTES]

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use fsmap::disk::DiskMap;

fn resident_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let image = args
        .get(1)
        .expect("usage: mapbench IMAGE [REGIONS] [REGION_BYTES]");
    let region_count: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let region_bytes: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(65536);
    let file = Arc::new(std::fs::File::open(image).expect("open the image"));
    let size_bytes = file.metadata().expect("image size").len();

    let before_kib = resident_kib("VmRSS:");
    let started = Instant::now();
    let mut disk = DiskMap::build(Arc::clone(&file), size_bytes);
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;
    let map_kib = resident_kib("VmRSS:").saturating_sub(before_kib);
    let inodes: usize = disk.filesystems.iter().map(|f| f.map.inodes.len()).sum();
    println!("build_ms {build_ms:.1}");
    println!("inodes {inodes}");
    println!("map_resident_mib {:.1}", map_kib as f64 / 1024.0);
    println!(
        "peak_resident_mib {:.1}",
        resident_kib("VmHWM:") as f64 / 1024.0
    );
    for note in &disk.notes {
        println!("note {note}");
    }

    // Changed regions spread over the disk, deterministically.
    let total_regions = size_bytes / region_bytes;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut regions: Vec<u64> = (0..region_count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % total_regions
        })
        .collect();
    regions.sort_unstable();
    regions.dedup();
    let changed: Vec<(u64, u64)> = regions
        .iter()
        .map(|r| (r * region_bytes, region_bytes))
        .collect();
    // Medians of five runs each.
    let median_ms = |mut samples: Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        samples[samples.len() / 2]
    };
    let mut owners = Vec::new();
    let owners_ms = median_ms(
        (0..5)
            .map(|_| {
                let started = Instant::now();
                owners = disk.owners(&changed, usize::MAX).0;
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect(),
    );
    let mut report = Vec::new();
    let files_ms = median_ms(
        (0..5)
            .map(|_| {
                let started = Instant::now();
                report = disk.diff(Some(&disk), &changed);
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect(),
    );
    let files: usize = report.iter().map(|(_, c)| c.files.len()).sum();
    println!("attribute_regions {}", changed.len());
    println!(
        "attribute_owners_ms_median {owners_ms:.2} ({} inodes)",
        owners.len()
    );
    println!("attribute_files_ms_median {files_ms:.2} ({files} files listed)");

    // Peer: e2fsprogs answering the same question for the same blocks
    // (debugfs icheck, first block of each region).
    let block_size = disk.filesystems.first().map_or(4096, |f| f.map.block_size);
    let blocks: Vec<String> = regions
        .iter()
        .map(|r| (r * region_bytes / block_size).to_string())
        .collect();
    let started = Instant::now();
    let peer = Command::new("debugfs")
        .args(["-R", &format!("icheck {}", blocks.join(" ")), image])
        .output();
    let peer_ms = started.elapsed().as_secs_f64() * 1000.0;
    if peer.is_ok_and(|o| o.status.success()) {
        println!("debugfs_icheck_ms {peer_ms:.1} ({} blocks)", blocks.len());
    }

    // Incremental: a small change (one new file) made while we wait.
    let before = std::fs::read(image).expect("read the image");
    let new_file = std::env::temp_dir().join(format!("mapbench-{}", std::process::id()));
    std::fs::write(&new_file, vec![7u8; 10_000]).expect("write a file");
    let name = format!("mapbench-new-{}", std::process::id());
    let changed = Command::new("debugfs")
        .args([
            "-w",
            "-R",
            &format!("write {} {name}", new_file.display()),
            image,
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    let _ = std::fs::remove_file(&new_file);
    if !changed {
        println!("note debugfs -w failed: no incremental figure");
        return;
    }
    let after = std::fs::read(image).expect("read the image");
    let runs: Vec<(u64, u64)> = before
        .chunks(4096)
        .zip(after.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| (index as u64 * 4096, 4096))
        .collect();
    let started = Instant::now();
    let reread = disk.update(Arc::clone(&file), &runs).expect("update");
    let update_us = started.elapsed().as_secs_f64() * 1e6;
    println!("update_changed_ranges {}", runs.len());
    println!("update_us {update_us:.0} ({reread} inodes re-read)");
    // Undo, so the image can be measured again.
    let _ = Command::new("debugfs")
        .args(["-w", "-R", &format!("rm {name}"), image])
        .output();
}

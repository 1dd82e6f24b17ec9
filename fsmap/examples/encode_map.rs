//! Saves the maps of a disk image, as the tracker saves them beside a
//! checkpoint: the whole disk's map (`DiskMap::encode`) and, if the disk
//! holds a filesystem, the first one's map (`persist::encode`). The
//! saved_map fuzz target's seeds come from here (fuzz/make-corpus).
//!
//! usage: encode_map IMAGE DISK_MAP_OUT [FS_MAP_OUT]

use std::process::ExitCode;

use fsmap::disk::DiskMap;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(image), Some(disk_out)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: encode_map IMAGE DISK_MAP_OUT [FS_MAP_OUT]");
        return ExitCode::from(2);
    };
    match run(image, disk_out, args.get(3)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("encode_map: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(image: &str, disk_out: &str, fs_out: Option<&String>) -> Result<(), String> {
    let file = std::fs::File::open(image).map_err(|e| format!("opening {image}: {e}"))?;
    let size_bytes = file
        .metadata()
        .map_err(|e| format!("reading the size of {image}: {e}"))?
        .len();
    let disk = DiskMap::build(&file, size_bytes);
    for note in &disk.notes {
        eprintln!("encode_map: {image}: {note}");
    }
    std::fs::write(disk_out, disk.encode()).map_err(|e| format!("writing {disk_out}: {e}"))?;
    if let Some(fs_out) = fs_out {
        let mapped = disk.filesystems.first().ok_or_else(|| {
            format!("{image} holds no ext2/3/4 filesystem: no map to write to {fs_out}")
        })?;
        std::fs::write(fs_out, fsmap::persist::encode(&mapped.map))
            .map_err(|e| format!("writing {fs_out}: {e}"))?;
    }
    Ok(())
}

//! Which external tools are installed, and who the tests run as.

use std::path::{Path, PathBuf};

/// Panics, naming the Debian package, unless `tool` is installed.
pub fn require_tool(tool: &str, package: &str) {
    self::tool(tool, package);
}

/// The path of `tool` (searched in PATH and the sbin directories, which a
/// non-root PATH often lacks); panics, naming the Debian package that
/// provides it, when it is not installed.
pub fn tool(tool: &str, package: &str) -> PathBuf {
    find_in_path(tool).unwrap_or_else(|| {
        panic!(
            "{tool} is not installed; these tests need it: apt-get install -y {package} \
             (scripts/test, run as root, installs every tool the tests use)"
        )
    })
}

/// The path of the executable `tool` in PATH, /usr/sbin or /sbin.
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether the tests run with effective user id 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// For a test that can only run as root: as another user it prints that
/// it was skipped and why (`needs`, e.g. "mount -o loop and FUSE") and
/// returns true, and the test returns at once.
pub fn skipped_unless_root(needs: &str) -> bool {
    if is_root() {
        return false;
    }
    println!("skipped: needs root ({needs})");
    true
}

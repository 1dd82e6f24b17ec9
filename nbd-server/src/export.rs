//! What a server serves: `Export` (a name and the backend behind it) and
//! `Exports`, the set the handshake looks names up in, with the
//! `base:allocation` context every export has. Both phases of a connection
//! and the server use them, so they live below all three.

use std::sync::{Arc, RwLock};

use backend::BlockBackend;

/// The metadata context every export serves, from the backend's `extents`.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// One export: a name clients ask for and the backend behind it.
pub struct Export {
    pub name: String,
    pub description: String,
    pub backend: Arc<dyn BlockBackend>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size_bytes", &self.backend.size_bytes())
            .finish()
    }
}

impl Export {
    /// Every metadata context a client may select on this export.
    pub fn meta_contexts(&self) -> Vec<String> {
        let mut contexts = vec![BASE_ALLOCATION.to_string()];
        contexts.extend(self.backend.meta_contexts());
        contexts
    }
}

/// The exports of one server; the first is also the default export ("").
/// Exports may be added and removed while the server runs (a snapshot
/// served as `NAME@CHECKPOINT`); a connection that found an export keeps
/// it until it ends.
#[derive(Debug, Clone)]
pub struct Exports(Arc<RwLock<Vec<Arc<Export>>>>);

/// Exports one server may have at once (checked when one is added).
pub const EXPORTS_MAX: usize = 4096;

impl Exports {
    pub fn new(exports: Vec<Export>) -> Exports {
        assert!(!exports.is_empty(), "a server needs at least one export");
        Exports(Arc::new(RwLock::new(
            exports.into_iter().map(Arc::new).collect(),
        )))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Export>>> {
        self.0.read().expect("exports lock")
    }

    /// The export called `name`; the empty name is the default export.
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.read();
        if name.is_empty() {
            return exports.first().cloned();
        }
        exports.iter().find(|export| export.name == name).cloned()
    }

    /// The exports as they are now.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.read().clone()
    }

    /// Adds an export while serving; refused when the name is taken (or
    /// empty: that is the first export's) or the limit is reached.
    pub fn add(&self, export: Export) -> Result<(), String> {
        let mut exports = self.0.write().expect("exports lock");
        if export.name.is_empty() || exports.iter().any(|e| e.name == export.name) {
            return Err(format!("an export named {:?} exists already", export.name));
        }
        if exports.len() >= EXPORTS_MAX {
            return Err(format!("this server has {EXPORTS_MAX} exports, its limit"));
        }
        exports.push(Arc::new(export));
        Ok(())
    }

    /// Removes an added export; connections using it keep it until they
    /// end. The first export cannot be removed.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut exports = self.0.write().expect("exports lock");
        let index = exports.iter().skip(1).position(|e| e.name == name)? + 1;
        Some(exports.remove(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Empty;

    impl BlockBackend for Empty {
        fn size_bytes(&self) -> u64 {
            0
        }
        fn read_at(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn export(name: &str) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            backend: Arc::new(Empty),
        }
    }

    #[test]
    fn exports_come_and_go_but_the_first_stays() {
        let exports = Exports::new(vec![export("disk")]);
        exports.add(export("disk@monday")).unwrap();
        assert!(exports.add(export("disk@monday")).is_err(), "a taken name");
        assert!(exports.add(export("")).is_err(), "the default's name");
        assert_eq!(exports.find("disk@monday").unwrap().name, "disk@monday");
        let held = exports.find("disk@monday").unwrap();
        assert!(exports.remove("disk@monday").is_some());
        assert!(exports.find("disk@monday").is_none());
        assert_eq!(held.name, "disk@monday", "a connection keeps what it found");
        assert!(exports.remove("disk").is_none(), "the first export stays");
        assert_eq!(exports.find("").unwrap().name, "disk");
        assert_eq!(exports.list().len(), 1);
    }
}

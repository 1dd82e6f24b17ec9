//! What a server serves: `Export` (a name and the backend behind it) and
//! `Exports`, the set the handshake looks names up in, with the
//! `base:allocation` context every export has. Both phases of a connection
//! and the server use them, so they live below all three.

use std::sync::Arc;

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
#[derive(Debug, Clone)]
pub struct Exports(Arc<[Arc<Export>]>);

impl Exports {
    pub fn new(exports: Vec<Export>) -> Exports {
        assert!(!exports.is_empty(), "a server needs at least one export");
        Exports(exports.into_iter().map(Arc::new).collect())
    }

    /// The export called `name`; the empty name is the default export.
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self.0.first().cloned();
        }
        self.0.iter().find(|export| export.name == name).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.0.iter()
    }
}

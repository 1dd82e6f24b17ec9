//! Changed-block tracking (marks, journal, checkpoints, catalog, ext4
//! extent map). The tracker will be a `BlockBackend` layer that wraps the
//! storage backend; see ARCHITECTURE.md. Nothing is implemented yet: the
//! crate exists so the workspace layout is fixed from the start.

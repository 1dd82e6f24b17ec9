//! Point-in-time copies of changed blocks to replicas, tape streams and
//! other NBD servers, with restore and verify. Nothing is implemented yet:
//! the crate exists so the workspace layout is fixed from the start.

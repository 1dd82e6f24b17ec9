//! Helpers the crate's unit tests share: the workspace's one seeded
//! generator, under the name the tests know it by. `Random(state)` starts
//! from a raw state, so every unit test keeps the cases its seed gave.

pub use testkit::Xorshift as Random;

//! See `tests/api/isolation.rs`.

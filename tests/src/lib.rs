//! End-to-end checks that span crates. See `tests/tests/`.

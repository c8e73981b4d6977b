//! End-to-end tests. (Being written.)

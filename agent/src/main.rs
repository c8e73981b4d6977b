//! The `imds-agent` binary. (Being written.)
fn main() {}

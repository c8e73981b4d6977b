//! The IMDSv2 client. (Being written.)

/// Placeholder until the client lands.
#[derive(Debug)]
pub struct ImdsClient;

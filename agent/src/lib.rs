//! imds-agent: keeps instance-role credentials current in files and on a Unix socket.

pub mod format;
pub mod sink;

//! imds-agent: keeps instance-role credentials current in files and on a Unix socket.
//!
//! The binary's subcommands live here as library functions so that tests can
//! drive them; `main.rs` only parses the command line, sets up logging and
//! maps errors to exit codes.

mod audit_limit;
pub mod broker;
pub mod cli;
pub mod container;
pub mod credential_process;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod format;
mod http_listener;
pub mod long_poll;
pub mod metrics;
pub mod metrics_listener;
pub mod mock_imds;
pub mod notify;
pub mod on_change;
pub mod outputs;
pub mod peer_groups;
pub mod refresh;
pub mod run;
pub mod server;
pub mod shutdown;
pub mod signals;
pub mod sink;
mod socket_client;
pub mod socket_file;
pub mod token_file;
pub mod trust;

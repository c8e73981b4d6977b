//! End-to-end tests: the real `imds-agent` binary, run as a user would.
//!
//! One test binary (as ripgrep does), one module per area. Each test starts
//! its own processes on loopback ports or in a fresh temp dir.

#![allow(missing_docs)]

mod agent_run;
mod consumers;
mod container;
mod container_activation;
mod container_netns;
mod demo;
mod disk_faults;
mod doctor;
mod fault_matrix;
mod hostile;
mod hostile_files;
mod hostile_flood;
mod hostile_sockets;
mod long_poll;
mod macros;
mod metrics_listener;
mod mock_imds;
mod notify;
mod on_change;
mod refresh;
mod rotation;
mod sdk_conventions;
mod signals;
mod soak;
mod socket_activation;
mod stall;
mod util;

//! The command line: subcommands and their flags.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

/// Keeps EC2 instance-role credentials available to applications that cannot
/// speak IMDSv2.
#[derive(Debug, Parser)]
#[command(name = "imds-agent", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bundled IMDSv2 emulator standalone, until SIGTERM or Ctrl-C.
    #[command(after_help = MOCK_IMDS_EXAMPLES)]
    MockImds(MockImdsArgs),
}

const MOCK_IMDS_EXAMPLES: &str = "\
Examples:
  imds-agent mock-imds --listen 127.0.0.1:8080 --role app-role
  curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://127.0.0.1:8080/latest/api/token
  curl -s -X PUT --data other-role http://127.0.0.1:8080/_mock/role     # replace the role
  curl -s -X DELETE http://127.0.0.1:8080/_mock/role                     # detach it

The control surface under /_mock/ is described in imds-client/MOCK.md.";

/// Flags of `imds-agent mock-imds`.
#[derive(Debug, clap::Args)]
pub struct MockImdsArgs {
    /// Address to listen on. Loopback only is recommended; port 0 picks a free
    /// port (the address is printed on the first line of standard output).
    #[arg(long, default_value = "127.0.0.1:0", env = "IMDS_AGENT_MOCK_LISTEN")]
    pub listen: SocketAddr,
    /// Attach this IAM role from the start (default: no role attached).
    #[arg(long, env = "IMDS_AGENT_MOCK_ROLE")]
    pub role: Option<String>,
    /// Lifetime of issued credentials, in seconds.
    #[arg(long, default_value_t = 6 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub credential_lifetime: u64,
    /// How often new credentials are issued, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub rotation_interval: u64,
    /// Allow requests without a session token (IMDSv1).
    #[arg(long)]
    pub tokens_optional: bool,
}

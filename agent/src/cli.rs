//! The command line: subcommands and their flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::on_change::Hook;

/// Keeps EC2 instance-role credentials current in files, on a Unix socket and
/// on a container-credentials endpoint, for applications that cannot speak
/// IMDSv2. `imds-agent SUBCOMMAND --help` explains each; the README has the
/// whole story (`/usr/share/doc/imds-agent/README.md` when packaged).
#[derive(Debug, Parser)]
#[command(name = "imds-agent", version, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Keep instance-role credentials current in files, on a Unix socket and
    /// on a container endpoint (with --config: a session per local consumer).
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Print credentials in the `credential_process` JSON format, read from a
    /// running agent's socket.
    #[command(after_help = CREDENTIAL_PROCESS_EXAMPLES)]
    CredentialProcess(CredentialProcessArgs),
    /// Ask a running agent to fetch credentials from IMDS now, and print
    /// what it got (POST /refresh on its socket).
    #[command(long_about = REFRESH_ABOUT, after_help = REFRESH_EXAMPLES)]
    Refresh(RefreshArgs),
    /// Run the bundled IMDS emulator and the agent together, with outputs in
    /// a fresh directory: the whole thing working, on any machine.
    #[command(after_help = DEMO_EXAMPLES)]
    Demo(DemoArgs),
    /// Check this host: IMDS reachable, a role attached, tokens required,
    /// IMDS locked down to the agent (local users and the forward path from
    /// containers), outputs closed to other users. Each finding with its fix.
    #[command(
        after_help = "Example (as root, for the packaged unit):\n  imds-agent doctor --agent-uid \"$(id -u imds-agent)\" --credentials-file /var/lib/imds-agent/credentials --socket /run/imds-agent/agent.sock\n\nExit status 1 when a check fails. See README, \"Locking IMDS down to the agent\"."
    )]
    Doctor(DoctorArgs),
    /// Internal (used by doctor): exit 0 if a TCP connection to HOST:PORT opens.
    #[command(hide = true)]
    ProbeConnect {
        /// HOST:PORT
        authority: String,
    },
    /// Run the bundled IMDSv2 emulator standalone, with an STS emulator
    /// beside it, until SIGTERM or Ctrl-C.
    #[command(after_help = MOCK_IMDS_EXAMPLES)]
    MockImds(MockImdsArgs),
}

const MOCK_IMDS_EXAMPLES: &str = "\
Examples:
  imds-agent mock-imds --listen 127.0.0.1:8080 --role app-role
  curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://127.0.0.1:8080/latest/api/token
  curl -s -X PUT --data other-role http://127.0.0.1:8080/_mock/role     # replace the role
  curl -s -X DELETE http://127.0.0.1:8080/_mock/role                     # detach it

It prints the IMDS address, the role attached (if any), and AWS_ENDPOINT_URL_STS=... for the STS
emulator beside it (AssumeRole, SigV4 checked against the credentials it issued),
for `imds-agent run --config` without AWS (README, \"Least privilege per consumer\").
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

const RUN_EXAMPLES: &str = "\
Examples:
  imds-agent run --credentials-file /var/lib/imds-agent/credentials --socket /run/imds-agent/agent.sock
  imds-agent run --json-file /var/lib/imds-agent/credentials.json --file-mode 0640 --file-group 1001
  IMDS_AGENT_SOCKET=/run/imds-agent/agent.sock imds-agent run

Every flag can also be set with an environment variable IMDS_AGENT_<FLAG> (for systemd's
EnvironmentFile=); the standard AWS_EC2_METADATA_* variables apply to the IMDS settings.
Signals: SIGTERM/SIGINT stop cleanly, SIGHUP refreshes now (so does POST /refresh on the
socket, see `imds-agent refresh --help`).
Metrics and health apart from credentials:
  imds-agent run --socket /run/imds-agent/agent.sock --metrics-socket /run/imds-agent/metrics.sock --metrics-socket-group 998
  curl --unix-socket /run/imds-agent/metrics.sock http://localhost/metrics

Containers, per-consumer sessions, telling applications of a rotation, the packaged unit
and the IMDS lock-down: README (/usr/share/doc/imds-agent/README.md when packaged).";

const CREDENTIAL_PROCESS_EXAMPLES: &str = "\
Use it from ~/.aws/config, so every AWS SDK and the CLI re-run it before expiry:

  [default]
  credential_process = imds-agent credential-process --socket /run/imds-agent/agent.sock

Exit status 0 with the JSON on stdout; 1 with one line on stderr when the agent is not
running, refused this user, no role is attached, or no valid credentials are available.
With a config file (run --config), the JSON is this user's consumer's session.";

const REFRESH_ABOUT: &str = "\
Ask a running agent to fetch credentials from IMDS now, and print what it got
(POST /refresh on its socket).

Use it when an application's AWS call failed with ExpiredToken (or
InvalidClientTokenId right after a role change): the credentials it holds
were revoked or rotated before the agent's next scheduled refresh. After this
command, re-read the credentials (the socket, the files, or credential_process)
and retry. The agent does this on its own before expiry and within one
--poll-interval of a role change; this is for the exceptions.

Only the users the socket serves /credentials to may ask. The agent runs one
refresh at a time (concurrent requests share it) and at most one every 5 s;
asked within 5 s of the last one, this command waits until the 5 s are over
and asks once more.";

const REFRESH_EXAMPLES: &str = "\
Example:
  imds-agent refresh --socket /run/imds-agent/agent.sock

Exit status 0 with one line on stdout (the new access key id and expiry, never
a secret); 1 with the reason on stderr when the agent is not running, refused
this user, no role is attached, or IMDS did not answer.";

const DEMO_EXAMPLES: &str = "\
Examples:
  imds-agent demo                 # runs until Ctrl-C, prints commands to try
  imds-agent demo --duration 5    # stops by itself after 5 seconds";

/// Parses an octal file mode such as `0600` or `640`.
fn parse_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{text:?} is not an octal mode such as 0600"))?;
    if mode > 0o777 {
        return Err(format!("{text:?} is not a file mode (at most 0777)"));
    }
    if mode & 0o007 != 0 {
        return Err(format!(
            "{text:?} would let every user read the credentials; use 0600 or 0640 for a file, \
             0600 or 0660 for a socket (a peer needs write permission to connect)"
        ));
    }
    Ok(mode)
}

/// Parses `--file-mode`: as [`parse_mode`], and never group-writable (a
/// member of the group could plant credentials of its own).
fn parse_file_mode(text: &str) -> Result<u32, String> {
    let mode = parse_mode(text)?;
    if mode & 0o020 != 0 {
        return Err(format!(
            "{text:?} would let the file's group write the credentials (and plant its own); use 0600 or 0640"
        ));
    }
    Ok(mode)
}

/// Parses `--metrics-listen`: a socket address on loopback only.
fn parse_metrics_listen(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an address such as 127.0.0.1:9464"))?;
    crate::metrics_listener::check_loopback(&addr)?;
    Ok(addr)
}

/// Flags of `imds-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Keep this AWS shared-credentials file current (only our profile's section is written).
    #[arg(long, env = "IMDS_AGENT_CREDENTIALS_FILE", value_name = "PATH")]
    pub credentials_file: Option<PathBuf>,
    /// The profile (section) written in the credentials file.
    #[arg(
        long,
        env = "IMDS_AGENT_PROFILE",
        default_value = "default",
        value_name = "NAME"
    )]
    pub profile: String,
    /// Keep this file current with the credential_process JSON document.
    #[arg(long, env = "IMDS_AGENT_JSON_FILE", value_name = "PATH")]
    pub json_file: Option<PathBuf>,
    /// Serve credentials over HTTP on this Unix socket: GET /credentials (long-poll
    /// with ?wait=SECONDS&since=ETAG), POST /refresh, GET /healthz. Under
    /// systemd socket activation (imds-agent.socket) the passed socket is
    /// served instead, with that unit's owner, group and mode.
    #[arg(long, env = "IMDS_AGENT_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Serve the container-credentials protocol on this address, for
    /// AWS_CONTAINER_CREDENTIALS_FULL_URI: loopback (e.g. 127.0.0.1:8901), or
    /// the container link's 169.254.170.23:PORT or `[fd00:ec2::23]:PORT`, which
    /// containers on local bridges reach (see README, "Containers"). Under
    /// systemd, imds-agent-container.socket binds the link's port 80 and
    /// passes it instead (no capability needed).
    #[arg(long, env = "IMDS_AGENT_CONTAINER_ENDPOINT", value_name = "ADDR")]
    pub container_endpoint: Option<SocketAddr>,
    /// The container endpoint's token: read from this file, or generated
    /// (32 random bytes, hex, mode 0640, no trailing newline) when it does not exist.
    /// An existing file must be root's or the agent's, closed to other users,
    /// and hold 32 to 4096 visible ASCII characters with no trailing newline.
    #[arg(
        long,
        env = "IMDS_AGENT_CONTAINER_TOKEN_FILE",
        default_value = "/run/imds-agent/container-token",
        value_name = "PATH"
    )]
    pub container_token_file: PathBuf,
    /// Mode of the output files (octal): 0600, or 0640 with --file-group; never
    /// readable by others, never writable by the group or others.
    #[arg(long, env = "IMDS_AGENT_FILE_MODE", default_value = "0600", value_parser = parse_file_mode)]
    pub file_mode: u32,
    /// Owner (numeric uid) given to the output files; needs CAP_CHOWN.
    #[arg(long, env = "IMDS_AGENT_FILE_OWNER", value_name = "UID")]
    pub file_owner: Option<u32>,
    /// Group (numeric gid) given to the output files, e.g. with --file-mode 0640.
    #[arg(long, env = "IMDS_AGENT_FILE_GROUP", value_name = "GID")]
    pub file_group: Option<u32>,
    /// Write output files in place instead of replacing them: only for a
    /// target that is itself a bind-mounted file (rename cannot replace it).
    /// Risk: a reader may see a partial file while it is written.
    #[arg(long, env = "IMDS_AGENT_IN_PLACE")]
    pub in_place: bool,
    /// Mode of the socket file (octal): 0600, or 0660 with --socket-group to let
    /// that group connect; not applied to a socket systemd passes.
    #[arg(long, env = "IMDS_AGENT_SOCKET_MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Group (numeric gid) of the socket file; not applied to a socket systemd passes.
    #[arg(long, env = "IMDS_AGENT_SOCKET_GROUP", value_name = "GID")]
    pub socket_group: Option<u32>,
    /// Only these peer uids may use the socket (repeat or comma-separate): the
    /// peer's effective uid when it connected (SO_PEERCRED). Others get 403 and
    /// are closed at once. Default: anyone the socket's mode lets in.
    #[arg(
        long,
        env = "IMDS_AGENT_ALLOW_UID",
        value_delimiter = ',',
        value_name = "UID"
    )]
    pub allow_uid: Vec<u32>,
    /// Only peers in one of these groups may use the socket (repeat or
    /// comma-separate; with --allow-uid, a peer matching either list is
    /// allowed). Matches the primary group and supplementary groups, as the
    /// kernel recorded them when the peer connected (SO_PEERCRED and
    /// SO_PEERGROUPS; on Linux before 4.13 the primary group only).
    #[arg(
        long,
        env = "IMDS_AGENT_ALLOW_GID",
        value_delimiter = ',',
        value_name = "GID"
    )]
    pub allow_gid: Vec<u32>,
    /// Serve GET /metrics (Prometheus text) and GET /healthz on this Unix
    /// socket, apart from credentials: its users get counters and health,
    /// never keys. The credential socket no longer serves /metrics.
    #[arg(long, env = "IMDS_AGENT_METRICS_SOCKET", value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,
    /// Mode of the metrics socket (octal). Default: 0600 (root and the
    /// agent's user), or 0660 when --metrics-socket-group is given.
    #[arg(long, env = "IMDS_AGENT_METRICS_SOCKET_MODE", value_parser = parse_mode, value_name = "MODE")]
    pub metrics_socket_mode: Option<u32>,
    /// Group (numeric gid) of the metrics socket, e.g. your monitoring
    /// agent's group: its members may connect (mode 0660 unless given).
    #[arg(long, env = "IMDS_AGENT_METRICS_SOCKET_GROUP", value_name = "GID")]
    pub metrics_socket_group: Option<u32>,
    /// Also serve GET /metrics and GET /healthz over HTTP on this loopback
    /// address (127.0.0.1:PORT, or `[::1]:PORT`; anything else is refused), for
    /// scrapers that cannot read a Unix socket. Every local user can read it.
    #[arg(long, env = "IMDS_AGENT_METRICS_LISTEN", value_parser = parse_metrics_listen, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// IMDS endpoint URL (default: from AWS_EC2_METADATA_SERVICE_ENDPOINT, else http://169.254.169.254).
    #[arg(long, env = "IMDS_AGENT_IMDS_ENDPOINT", value_name = "URL")]
    pub imds_endpoint: Option<String>,
    /// IMDS endpoint mode when no endpoint is given: ipv4 or ipv6.
    #[arg(long, env = "IMDS_AGENT_IMDS_ENDPOINT_MODE", value_name = "MODE")]
    pub imds_endpoint_mode: Option<String>,
    /// IMDS connect timeout, seconds.
    #[arg(long, env = "IMDS_AGENT_CONNECT_TIMEOUT", value_name = "SECONDS")]
    pub connect_timeout: Option<f64>,
    /// IMDS request timeout, seconds.
    #[arg(long, env = "IMDS_AGENT_READ_TIMEOUT", value_name = "SECONDS")]
    pub read_timeout: Option<f64>,
    /// Attempts per IMDS request.
    #[arg(long, env = "IMDS_AGENT_ATTEMPTS", value_parser = clap::value_parser!(u32).range(1..=10))]
    pub attempts: Option<u32>,
    /// Refresh this many seconds before expiry (default: scaled to the
    /// credentials' lifetime, at most 30 minutes; at least 16 minutes for 6-hour credentials).
    #[arg(long, env = "IMDS_AGENT_REFRESH_WINDOW", value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub refresh_window: Option<u64>,
    /// How often to re-check the attached role, seconds (1 to 60).
    #[arg(long, env = "IMDS_AGENT_POLL_INTERVAL", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub poll_interval: u64,
    /// Log format: human or json.
    #[arg(long, env = "IMDS_AGENT_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,
    /// Run this command after every change in what the outputs hold (first
    /// credentials, rotation, role replacement, detach, recovery after an
    /// outage), once every output has been written. Repeatable; the
    /// environment variable holds one command. No shell: split into words as
    /// systemd splits ExecStart= (quotes, C escapes; no $VAR expansion). Its
    /// environment is PATH and IMDS_AGENT_EVENT, IMDS_AGENT_ROLE,
    /// IMDS_AGENT_ACCESS_KEY_ID, IMDS_AGENT_EXPIRATION, never a secret. A
    /// burst of changes gives one more run, with the latest event.
    #[arg(long, env = "IMDS_AGENT_ON_CHANGE", value_name = "CMD", value_parser = parse_on_change)]
    pub on_change: Vec<Hook>,
    /// After every change, run `systemctl try-reload-or-restart UNIT`, as
    /// --on-change does (repeat or comma-separate). Under the packaged unit
    /// this needs a polkit rule: see README, "Telling applications about a
    /// rotation" (or /etc/default/imds-agent, /etc/sysconfig/imds-agent).
    #[arg(long, env = "IMDS_AGENT_RELOAD_UNIT", value_delimiter = ',', value_name = "UNIT", value_parser = parse_unit)]
    pub reload_unit: Vec<String>,
    /// An --on-change or --reload-unit run still going after this many
    /// seconds is killed, with its process group.
    #[arg(long, env = "IMDS_AGENT_ON_CHANGE_TIMEOUT", default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub on_change_timeout: u64,
    /// The consumers' config file (TOML; see the README's "Least privilege per
    /// consumer"): each socket peer, and each container presenting a
    /// consumer's token, gets its own consumer's STS session; a peer matching
    /// no consumer gets 403 unless the file says unmatched = "instance-role".
    /// Validated completely before start; read at start only. Without it,
    /// every peer the socket admits gets the whole instance role.
    #[arg(long, env = "IMDS_AGENT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// Parses `--on-change`: the command split as systemd splits `ExecStart=`.
fn parse_on_change(text: &str) -> Result<Hook, String> {
    Hook::command(text)
}

/// Parses `--reload-unit`: a unit name, never an option.
fn parse_unit(text: &str) -> Result<String, String> {
    Hook::reload_unit(text).map(|_| text.to_owned())
}

/// Flags of `imds-agent credential-process`.
#[derive(Debug, clap::Args)]
pub struct CredentialProcessArgs {
    /// The agent's socket.
    #[arg(
        long,
        env = "IMDS_AGENT_SOCKET",
        default_value = "/run/imds-agent/agent.sock",
        value_name = "PATH"
    )]
    pub socket: PathBuf,
}

/// Flags of `imds-agent refresh`.
#[derive(Debug, clap::Args)]
pub struct RefreshArgs {
    /// The agent's socket.
    #[arg(
        long,
        env = "IMDS_AGENT_SOCKET",
        default_value = "/run/imds-agent/agent.sock",
        value_name = "PATH"
    )]
    pub socket: PathBuf,
}

impl RunArgs {
    /// The metrics socket's mode: as given, else 0660 with a group, else 0600.
    pub fn metrics_socket_mode(&self) -> u32 {
        match (self.metrics_socket_mode, self.metrics_socket_group) {
            (Some(mode), _) => mode,
            (None, Some(_)) => 0o660,
            (None, None) => 0o600,
        }
    }
}

/// Flags of `imds-agent demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<u64>,
    /// Directory for the outputs (default: a new one under the temp dir).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Flags of `imds-agent doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// IMDS endpoint URL (default: from the standard settings).
    #[arg(long, env = "IMDS_AGENT_IMDS_ENDPOINT", value_name = "URL")]
    pub imds_endpoint: Option<String>,
    /// The credentials file to check.
    #[arg(long, env = "IMDS_AGENT_CREDENTIALS_FILE", value_name = "PATH")]
    pub credentials_file: Option<PathBuf>,
    /// The JSON file to check.
    #[arg(long, env = "IMDS_AGENT_JSON_FILE", value_name = "PATH")]
    pub json_file: Option<PathBuf>,
    /// The socket to check.
    #[arg(long, env = "IMDS_AGENT_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The container endpoint's token file to check.
    #[arg(long, env = "IMDS_AGENT_CONTAINER_TOKEN_FILE", value_name = "PATH")]
    pub container_token_file: Option<PathBuf>,
    /// The uid the agent runs as, whose directories and files are trusted
    /// like root's (default: the uid running doctor). For the packaged unit:
    /// --agent-uid "$(id -u imds-agent)".
    #[arg(long, value_name = "UID")]
    pub agent_uid: Option<u32>,
    /// The uid that stands for "another user" when checking who can reach IMDS.
    #[arg(long, default_value_t = 65534, value_name = "UID")]
    pub probe_uid: u32,
    /// The consumers' config file to check: validated, then each consumer's
    /// role assumed once with the instance credentials (AWS_ENDPOINT_URL_STS
    /// applies), each failure with its fix.
    #[arg(long, env = "IMDS_AGENT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

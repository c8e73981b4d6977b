//! Helpers to run the real binary.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};

/// The `imds-agent` binary cargo built for these tests.
pub(crate) fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imds-agent"));
    cmd.env_remove("RUST_LOG").env("IMDS_AGENT_LOG", "warn");
    cmd
}

/// A running agent process, stopped with SIGKILL if a test forgets it.
pub(crate) struct Running {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Running {
    /// Starts `cmd` with stdout piped, and returns once the process runs
    /// its own code (it handles SIGTERM), or has exited.
    pub(crate) fn start(mut cmd: Command) -> Self {
        cmd.stderr(Stdio::inherit());
        Self::spawned(cmd)
    }

    /// Starts `cmd` with stdout piped and stderr (the logs) written to `log`,
    /// as [`Running::start`].
    pub(crate) fn start_logging_to(mut cmd: Command, log: &std::path::Path) -> Self {
        cmd.stderr(std::fs::File::create(log).expect("creating the log file"));
        Self::spawned(cmd)
    }

    /// While the program loader runs, no process can handle a signal: a
    /// test that signals a process it just spawned would kill it with the
    /// kernel's default action, whatever the agent does. So a test waits
    /// until the agent's handlers are in place (`main` installs them first).
    fn spawned(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting imds-agent");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let pid = child.id();
        wait_for("imds-agent to handle SIGTERM, or exit", || {
            handles_signal(pid, Signal::TERM) || child.try_wait().unwrap().is_some()
        });
        Self { child, stdout }
    }

    /// Sends `signal` without waiting.
    pub(crate) fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.child.id() as i32).unwrap();
        kill_process(pid, signal).expect("signalling imds-agent");
    }

    /// The exit status, if the process has exited.
    pub(crate) fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line of standard output.
    pub(crate) fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading stdout");
        line.trim_end().to_owned()
    }

    /// Sends `signal` and waits (bounded) for the process to exit.
    pub(crate) fn stop_with(mut self, signal: Signal) -> ExitStatus {
        let pid = Pid::from_raw(self.child.id() as i32).unwrap();
        kill_process(pid, signal).expect("signalling imds-agent");
        let step = Duration::from_millis(10);
        for _ in 0..PATIENCE.as_millis() / step.as_millis() {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(step);
        }
        let _ = self.child.kill();
        panic!(
            "expected imds-agent to exit after {signal:?} within {PATIENCE:?}; it was still running"
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True once process `pid` has a handler for `signal` (its bit in `SigCgt`
/// of `/proc/PID/status`).
pub(crate) fn handles_signal(pid: u32, signal: Signal) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal.as_raw() - 1)) != 0)
}

/// One HTTP/1.1 GET over a Unix socket: (status, body).
pub(crate) fn unix_get(socket: &std::path::Path, path: &str) -> std::io::Result<(u16, String)> {
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    http_exchange(stream, "GET", path, Duration::from_secs(5))
        .map(|answer| (answer.status, answer.body))
}

/// An HTTP answer: its status, head (status line and headers) and body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: String,
}

impl Answer {
    /// The value of header `name` (case-insensitive), if present.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// One HTTP/1.1 request without a body over a Unix socket (reads bounded by [`PATIENCE`]).
pub(crate) fn unix_request(
    socket: &std::path::Path,
    method: &str,
    path: &str,
) -> std::io::Result<Answer> {
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    http_exchange(stream, method, path, PATIENCE)
}

/// One HTTP/1.1 request without a body on `stream`; the answer is read to
/// the end, each read bounded by `timeout`.
pub(crate) fn http_exchange(
    mut stream: impl std::io::Read + std::io::Write + ReadTimeout,
    method: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<Answer> {
    stream.read_timeout(timeout)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// Streams whose reads can be bounded in time.
pub(crate) trait ReadTimeout {
    /// Bounds each read to `timeout`.
    fn read_timeout(&self, timeout: Duration) -> std::io::Result<()>;
}

impl ReadTimeout for std::os::unix::net::UnixStream {
    fn read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

impl ReadTimeout for std::net::TcpStream {
    fn read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// How long a test waits for observable state before it fails. Generous:
/// it bounds a failing test, and a loaded 2-core machine (a build beside
/// the suite) can be slow; a passing test never waits that long.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);

/// Waits (real time, bounded by [`PATIENCE`]) until `check` holds; panics
/// with `what` if it never does.
pub(crate) fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let step = Duration::from_millis(20);
    for _ in 0..PATIENCE.as_millis() / step.as_millis() {
        if check() {
            return;
        }
        std::thread::sleep(step);
    }
    panic!("expected {what} within {PATIENCE:?}; it never happened");
}

/// Where tests put the agent's metrics socket (`--metrics-socket`): beside
/// its credential socket `socket`, named `metrics.sock`.
pub(crate) fn metrics_socket_of(socket: &std::path::Path) -> std::path::PathBuf {
    socket.with_file_name("metrics.sock")
}

/// The value of an unlabelled metric from `GET /metrics` on the agent's
/// metrics socket `metrics` (see [`metrics_socket_of`]).
pub(crate) fn metric(metrics: &std::path::Path, name: &str) -> Option<u64> {
    let (_, body) = unix_get(metrics, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The sum of a labelled metric over all its labels, from the metrics socket `metrics`.
pub(crate) fn metric_sum(metrics: &std::path::Path, name: &str) -> u64 {
    let Ok((_, body)) = unix_get(metrics, "/metrics") else {
        return 0;
    };
    body.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `imds-agent run --imds-endpoint <the emulator>`, to which a test adds its outputs.
pub(crate) fn agent_against(imds: &imds_client::mock::MockImds) -> Command {
    let mut cmd = agent();
    cmd.arg("run").arg("--imds-endpoint").arg(imds.endpoint());
    cmd
}

/// Waits until the agent serves credentials on its socket.
pub(crate) fn wait_for_served_credentials(socket: &std::path::Path) {
    wait_for("credentials on the socket", || {
        unix_get(socket, "/credentials").is_ok_and(|(s, _)| s == 200)
    });
}

/// Panics unless the test runs as root. Tests that act as root against a
/// throwaway user are marked
/// `#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]`
/// (see `agent/build.rs`), so without root they show as *ignored*, never as
/// passed; this catches a suite built as root and then run as someone else.
pub(crate) fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it acts as a throwaway local user with setpriv); \
         it was built as root but runs as another user: rebuild as that user"
    );
}

/// A local user no account on this machine has: a uid and gid from a range
/// nothing uses, which root can act as with `setpriv`. It plays the attacker
/// on a shared host.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stranger {
    /// Its uid.
    pub(crate) uid: u32,
    /// Its primary gid (a group of its own, also unused).
    pub(crate) gid: u32,
}

impl Stranger {
    /// A fresh stranger, not in `/etc/passwd` or `/etc/group`. Needs root to be useful.
    pub(crate) fn new() -> Self {
        require_root();
        let taken = |file: &str| -> Vec<u32> {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(':').nth(2)?.parse().ok())
                .collect()
        };
        let (users, groups) = (taken("/etc/passwd"), taken("/etc/group"));
        loop {
            let id = 200_000 + rand::random::<u32>() % 800_000;
            if !users.contains(&id) && !groups.contains(&id) {
                return Self { uid: id, gid: id };
            }
        }
    }

    /// `program` to be run as this user (no supplementary groups, no capabilities).
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--inh-caps=-all")
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `script` with `sh -c` as this user; panics, with its output, if it fails.
    pub(crate) fn sh(&self, script: &str) {
        let out = self
            .command("sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("running setpriv");
        assert!(
            out.status.success(),
            "as uid {}: `{script}` failed: {}{}",
            self.uid,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Gives `path` to this user (as `chown` would).
    pub(crate) fn own(&self, path: &std::path::Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {} to {}: {e}", path.display(), self.uid));
    }

    /// A directory this user owns and may write, inside a root-owned temp
    /// dir that anyone may traverse (mode 0755), as `/home/USER` would be.
    pub(crate) fn home(&self, parent: &std::path::Path) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = parent.join(format!("home-{}", self.uid));
        std::fs::create_dir(&home).unwrap();
        self.own(&home);
        home
    }
}

/// The TCP ports process `pid` listens on (its sockets in `LISTEN` state,
/// found through `/proc/PID/fd` and `/proc/net/tcp{,6}`).
pub(crate) fn listening_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: Vec<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1 (ADDR:PORT in hex), st field 3 (0A: LISTEN), inode field 9.
            if fields.len() > 9
                && fields[3] == "0A"
                && inodes.iter().any(|i| i == fields[9])
                && let Some(port) = fields[1]
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports
}

impl Running {
    /// The port the agent's one TCP listener (the container endpoint, asked
    /// for as `127.0.0.1:0`) is bound to, once it is; panics if the agent
    /// exits first. Port 0 and this look-up replace picking a free port in
    /// the test, which another test could take before the agent binds it.
    pub(crate) fn tcp_port(&mut self) -> u16 {
        let pid = self.pid();
        let mut port = None;
        wait_for("the agent to listen on a TCP port, or exit", || {
            port = listening_ports(pid).first().copied();
            port.is_some() || self.try_status().is_some()
        });
        port.unwrap_or_else(|| {
            panic!(
                "expected the agent to listen on a TCP port; it exited: {:?}",
                self.try_status()
            )
        })
    }
}

/// One `GET path` over TCP to `addr` with `headers` (each ending in CRLF;
/// `Host` among them when wanted), the server closing the connection:
/// (status, body), the status 0 when the answer has no status line. Waits
/// at most 5 s to connect and [`PATIENCE`] for the answer.
pub(crate) fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(PATIENCE))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// The `Authorization` header line for `token`, or nothing.
pub(crate) fn authorization_header(token: Option<&str>) -> String {
    token
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default()
}

/// `GET /credentials` on the container endpoint at `127.0.0.1:port`, with
/// `headers` (each ending in CRLF): (status, body). Panics when the answer
/// has no status line.
pub(crate) fn container_request(port: u16, headers: &str) -> (u16, String) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body) = http_get(addr, "/credentials", headers)
        .unwrap_or_else(|e| panic!("GET /credentials on {addr}: {e}"));
    assert_ne!(status, 0, "no HTTP status line in the answer: {body:?}");
    (status, body)
}

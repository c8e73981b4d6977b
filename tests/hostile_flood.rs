//! Connections cannot crowd out good clients (issue 11, row 5), and what
//! `--allow-gid` matches (row 11c; supplementary groups too, issue 14).
//!
//! A throwaway local user (`util::Stranger`) floods the real agent: 1,200
//! connections held open, and more opened all the time, as a uid the
//! allow-list refuses on the Unix socket, or without a token on the
//! container endpoint. Meanwhile a good client (root, the test) asks 50
//! times in a row and must get 200 every time; the agent's log stays small
//! and the refusals are counted in `/metrics`.
//!
//! The flooding client is this test binary itself, run again as the
//! stranger with `setpriv` (the `flooder` entry below), so the tests need
//! nothing installed beyond `setpriv`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, Stranger, agent_against, unix_get, wait_for};

/// Connections the flooder holds open before the good client asks.
const FLOOD: usize = 1200;

/// The agent's default limits, as documented (`ServerLimits::default()`).
struct ServerLimitsDefaults;

impl ServerLimitsDefaults {
    /// Connections one uid may hold at once.
    const PER_PEER: usize = 64;
}

/// The most the agent may log (warnings and up, as by default) while it
/// refuses a flood of thousands of connections: the start-up lines, one line
/// for the first refusal and a summary per interval, nothing per connection.
const LOG_BOUND_BYTES: u64 = 16 * 1024;

/// Raises this process's soft limit on open files to its hard limit: the
/// flooder holds more than the usual soft limit of 1,024. Children (the
/// agent) inherit it.
fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).expect("raising RLIMIT_NOFILE to its hard limit");
}

/// Not a test: the flooding client, which the tests below run as a stranger
/// (`IMDS_FLOOD_TARGET` set). It opens `IMDS_FLOOD_COUNT` connections to
/// `unix:PATH` or `tcp:ADDR`, sending a request head without a token on
/// every other one and nothing on the rest, prints `ready N`, then keeps
/// replacing its oldest connection with a new one until it is killed.
/// With `IMDS_FLOOD_COUNT=0` it is a good client instead: it makes
/// `IMDS_FLOOD_REPEAT` requests in a row (with `IMDS_FLOOD_AUTH` as the
/// token) and prints `statuses N N ...`.
#[test]
#[ignore = "not a test: the flooding client the flood tests run as an unprivileged user"]
fn flooder() {
    let Ok(target) = std::env::var("IMDS_FLOOD_TARGET") else {
        return;
    };
    let count: usize = std::env::var("IMDS_FLOOD_COUNT")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(FLOOD);
    raise_file_limit();
    let (head, connect): (String, Connect) = if let Some(path) = target.strip_prefix("unix:") {
        let path = path.to_owned();
        (
            "GET /credentials HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned(),
            Box::new(move || Ok(Box::new(std::os::unix::net::UnixStream::connect(&path)?) as _)),
        )
    } else {
        let addr = target.strip_prefix("tcp:").expect("unix:PATH or tcp:ADDR");
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        (
            format!("GET /credentials HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
            Box::new(move || Ok(Box::new(std::net::TcpStream::connect(addr)?) as _)),
        )
    };
    if count == 0 {
        // A good client: IMDS_FLOOD_REPEAT requests in a row, one connection
        // each, with the token in IMDS_FLOOD_AUTH if any.
        let repeat: usize = std::env::var("IMDS_FLOOD_REPEAT")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(1);
        let auth = std::env::var("IMDS_FLOOD_AUTH")
            .map(|token| format!("Authorization: {token}\r\n"))
            .unwrap_or_default();
        let head = head.replace("\r\n\r\n", &format!("\r\n{auth}Connection: close\r\n\r\n"));
        let mut statuses = Vec::new();
        for _ in 0..repeat {
            let status = match connect() {
                Ok(mut stream) => {
                    // A refused peer may find the connection shut, its answer waiting.
                    let _ = stream.write_all(head.as_bytes());
                    let mut raw = Vec::new();
                    let _ = stream.read_to_end(&mut raw);
                    let raw = String::from_utf8_lossy(&raw);
                    raw.split_whitespace().nth(1).unwrap_or("0").to_owned()
                }
                Err(e) => format!("connect-error:{}", e.kind()),
            };
            statuses.push(status);
        }
        println!("statuses {}", statuses.join(" "));
        return;
    }
    let open = |i: usize| -> Option<Box<dyn ReadWrite>> {
        let mut stream = connect().ok()?;
        if i.is_multiple_of(2) {
            // Best effort: the agent may already have closed it.
            let _ = stream.write_all(head.as_bytes());
        }
        Some(stream)
    };
    let mut held = std::collections::VecDeque::new();
    let mut i = 0;
    while held.len() < count {
        if let Some(stream) = open(i) {
            held.push_back(stream);
        }
        i += 1;
        assert!(i < count * 10, "could not open {count} connections");
    }
    println!("ready {}", held.len());
    std::io::stdout().flush().unwrap();
    loop {
        if let Some(stream) = open(i) {
            held.pop_front();
            held.push_back(stream);
        }
        i += 1;
        // About a thousand new connections a second, so that the two cores
        // of a CI machine are not all the flood's.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Opens a connection to the flood's target.
type Connect = Box<dyn Fn() -> std::io::Result<Box<dyn ReadWrite>>>;

/// A connected stream of either kind.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A copy of this test binary in `dir` (which anyone may traverse), so that
/// a stranger can run it wherever the build directory is (under `/root`, say).
fn flooder_binary(dir: &Path) -> std::path::PathBuf {
    let (exe, bin) = (std::env::current_exe().unwrap(), dir.join("flooder"));
    // A hard link when it can (nothing is written, so nothing can make the
    // file "busy" for exec), else a copy.
    if std::fs::hard_link(&exe, &bin).is_err() {
        std::fs::copy(&exe, &bin).expect("copying the test binary");
    }
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// `setpriv` as `uid` with primary group `gid` and the supplementary
/// `groups`, running `bin` (this test binary's copy) as the `flooder` against `target`.
fn flooder_as(
    bin: &Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
    target: &str,
    count: usize,
) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", groups.join(",")));
    }
    cmd.arg("--inh-caps=-all")
        .arg("--")
        .arg(bin)
        .args([
            "--exact",
            "hostile_flood::flooder",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IMDS_FLOOD_TARGET", target)
        .env("IMDS_FLOOD_COUNT", count.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// A running flooder, killed when dropped.
struct Flood(Child);

impl Flood {
    /// Starts `cmd` and waits until it holds its connections.
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("starting the flooder with setpriv");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        loop {
            match lines.next() {
                // libtest prints "test NAME ... " before the test's own output.
                Some(Ok(line)) if line.contains("ready ") => {
                    eprintln!("flooder: {line}");
                    break;
                }
                Some(Ok(line)) => seen.push(line),
                _ => panic!("the flooder stopped before holding its connections: {seen:?}"),
            }
        }
        Self(child)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The statuses of the requests made by `cmd` (a flooder with count 0).
fn statuses_of(mut cmd: Command) -> Vec<String> {
    let out = cmd.output().expect("running setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| {
            let list = l.split("statuses ").nth(1)?;
            Some(list.split_whitespace().map(str::to_owned).collect())
        })
        .unwrap_or_else(|| {
            panic!(
                "no statuses from the client: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// The status of one request made by `cmd` (a flooder with count 0).
fn status_of(cmd: Command) -> u16 {
    let statuses = statuses_of(cmd);
    statuses[0]
        .parse()
        .unwrap_or_else(|_| panic!("expected an HTTP status, got {statuses:?}"))
}

/// Asserts that `cmd`, a good client asking 50 times in a row during a
/// flood, got 200 every time.
fn assert_served_50_times(mut cmd: Command) {
    cmd.env("IMDS_FLOOD_REPEAT", "50");
    let statuses = statuses_of(cmd);
    let refused: Vec<_> = statuses
        .iter()
        .enumerate()
        .filter(|(_, s)| *s != "200")
        .collect();
    assert!(
        statuses.len() == 50 && refused.is_empty(),
        "expected 50 times 200 during the flood, got {} answers, these not 200 (request, status): {refused:?}",
        statuses.len()
    );
}

/// A labelled metric's value from `/metrics`, e.g.
/// `imds_agent_refused_connections_total{endpoint="socket",reason="allow_list"}`.
fn labelled_metric(socket: &Path, series: &str) -> u64 {
    let (_, body) = unix_get(&crate::util::metrics_socket_of(socket), "/metrics").unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Asserts the agent's log stayed small and names the flooding uid.
fn assert_small_log(log: &Path, uid: u32) -> String {
    let size = std::fs::metadata(log).unwrap().len();
    let text = std::fs::read_to_string(log).unwrap();
    eprintln!(
        "agent log after the flood: {size} bytes, {} lines",
        text.lines().count()
    );
    assert!(
        size < LOG_BOUND_BYTES,
        "expected under {LOG_BOUND_BYTES} bytes of logs, got {size} bytes ({} lines); the first lines:\n{}",
        text.lines().count(),
        text.lines().take(10).collect::<Vec<_>>().join("\n")
    );
    assert!(
        text.contains(&format!("uid {uid}")) || text.contains(&format!("peer_uid={uid}")),
        "expected the refused uid {uid} in the log, got:\n{text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_refused_uid_holding_1200_connections_does_not_crowd_out_an_allowed_client() {
    raise_file_limit();
    let stranger = Stranger::new();
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = flooder_binary(dir.path());
    let socket = dir.path().join("agent.sock");
    let log = dir.path().join("agent.log");
    // The stranger may open the socket (its group), but only root is allowed.
    let mut cmd = agent_against(&imds);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--metrics-socket")
        .arg(crate::util::metrics_socket_of(&socket))
        .args(["--socket-mode", "0660", "--socket-group"])
        .arg(stranger.gid.to_string())
        .args(["--allow-uid", "0"]);
    let running = Running::start_logging_to(cmd, &log);
    crate::util::wait_for_served_credentials(&socket);

    let flood = Flood::start(flooder_as(
        &bin,
        stranger.uid,
        stranger.gid,
        &[],
        &format!("unix:{}", socket.display()),
        FLOOD,
    ));
    for i in 0..50 {
        let answer = unix_get(&socket, "/credentials");
        assert!(
            matches!(&answer, Ok((200, body)) if body.contains("AccessKeyId")),
            "request {i} of 50 during the flood: expected 200 with credentials, got {answer:?}"
        );
    }
    let denied = crate::util::metric(
        &crate::util::metrics_socket_of(&socket),
        "imds_agent_denied_connections_total",
    )
    .unwrap_or(0);
    let refused = labelled_metric(
        &socket,
        "imds_agent_refused_connections_total{endpoint=\"socket\",reason=\"allow_list\"}",
    );
    assert!(
        denied >= FLOOD as u64 && refused >= FLOOD as u64,
        "expected at least {FLOOD} refusals counted, got denied {denied}, refused {refused}"
    );
    drop(flood);
    assert!(running.stop_with(Signal::TERM).success());
    let text = assert_small_log(&log, stranger.uid);
    // The first refusal with who it was; the rest summarised with a count.
    assert!(
        text.lines().any(|l| l.contains("not on the allow-list")
            && l.contains(&format!("peer_uid={}", stranger.uid))
            && l.contains("peer_pid=")),
        "expected the first refusal with uid and pid, got:\n{text}"
    );
    assert!(
        text.contains(&format!("connections from uid {}", stranger.uid)),
        "expected a summary of the refusals, got:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_no_token_flood_on_the_container_endpoint_does_not_crowd_out_a_client_with_the_token() {
    raise_file_limit();
    let stranger = Stranger::new();
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = flooder_binary(dir.path());
    let token_file = dir.path().join("token");
    let log = dir.path().join("agent.log");
    let mut cmd = agent_against(&imds);
    cmd.args(["--container-endpoint", "127.0.0.1:0"])
        .arg("--container-token-file")
        .arg(&token_file);
    let mut running = Running::start_logging_to(cmd, &log);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], running.tcp_port()));
    wait_for("the token file", || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap();
    let get = || -> std::io::Result<(u16, String)> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET /credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        Ok((status.unwrap_or(0), body.to_owned()))
    };
    wait_for("credentials on the container endpoint", || {
        get().is_ok_and(|(s, _)| s == 200)
    });

    let flood = Flood::start(flooder_as(
        &bin,
        stranger.uid,
        stranger.gid,
        &[],
        &format!("tcp:{addr}"),
        FLOOD,
    ));
    for i in 0..50 {
        let answer = get();
        assert!(
            matches!(&answer, Ok((200, body)) if body.contains("AccessKeyId")),
            "request {i} of 50 during the flood: expected 200 with credentials, got {answer:?}"
        );
    }
    // Another ordinary user with the token, too: the flood's connections
    // count against the flooding uid, not against everyone on 127.0.0.1.
    let other = Stranger::new();
    let mut client = flooder_as(&bin, other.uid, other.gid, &[], &format!("tcp:{addr}"), 0);
    client.env("IMDS_FLOOD_AUTH", &token);
    assert_served_50_times(client);
    drop(flood);
    assert!(running.stop_with(Signal::TERM).success());
    let text = assert_small_log(&log, stranger.uid);
    assert!(
        !text.contains(token.as_str()),
        "the container token is in the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn one_user_holding_1200_connections_cannot_take_the_slots_of_another() {
    raise_file_limit();
    let (flooding, good) = (Stranger::new(), Stranger::new());
    let group = Stranger::new().gid;
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = flooder_binary(dir.path());
    let socket = dir.path().join("agent.sock");
    let log = dir.path().join("agent.log");
    // Both users may use the socket (its group); no allow-list.
    let mut cmd = agent_against(&imds);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--metrics-socket")
        .arg(crate::util::metrics_socket_of(&socket))
        .args(["--socket-mode", "0660", "--socket-group"])
        .arg(group.to_string());
    let running = Running::start_logging_to(cmd, &log);
    crate::util::wait_for_served_credentials(&socket);
    let target = format!("unix:{}", socket.display());

    let flood = Flood::start(flooder_as(
        &bin,
        flooding.uid,
        flooding.gid,
        &[group],
        &target,
        FLOOD,
    ));
    assert_served_50_times(flooder_as(&bin, good.uid, good.gid, &[group], &target, 0));
    let capped = labelled_metric(
        &socket,
        "imds_agent_refused_connections_total{endpoint=\"socket\",reason=\"peer_limit\"}",
    );
    let held = ServerLimitsDefaults::PER_PEER;
    assert!(
        capped >= (FLOOD - held) as u64,
        "expected at least {} connections of the flooding uid refused past its cap of {held}, got {capped}",
        FLOOD - held
    );
    drop(flood);
    assert!(running.stop_with(Signal::TERM).success());
    assert_small_log(&log, flooding.uid);
}

/// `--allow-gid` matches the peer's primary group and its supplementary
/// groups, as the kernel recorded them at connect (`SO_PEERCRED`,
/// `SO_PEERGROUPS`); a peer in neither is refused though the socket's
/// group lets it connect.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn allow_gid_matches_primary_and_supplementary_groups() {
    let help = crate::util::agent()
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).replace('\n', " ");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("Matches the primary group and supplementary groups"),
        "expected --allow-gid's help to say it matches supplementary groups too, got: {help}"
    );

    // Everyone may open the socket (its group); the allow-list names another group.
    let socket_group = Stranger::new().gid;
    let allowed = Stranger::new().gid;
    let (primary, supplementary, outsider) = (Stranger::new(), Stranger::new(), Stranger::new());
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = flooder_binary(dir.path());
    let socket = dir.path().join("agent.sock");
    let target = format!("unix:{}", socket.display());
    let mut cmd = agent_against(&imds);
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--socket-mode", "0660", "--socket-group"])
        .arg(socket_group.to_string())
        .args(["--allow-uid", "0", "--allow-gid"])
        .arg(allowed.to_string());
    let running = Running::start(cmd);
    crate::util::wait_for_served_credentials(&socket);

    eqnice!(
        200,
        status_of(flooder_as(
            &bin,
            primary.uid,
            allowed,
            &[socket_group],
            &target,
            0
        ))
    );
    eqnice!(
        200,
        status_of(flooder_as(
            &bin,
            supplementary.uid,
            supplementary.gid,
            &[socket_group, allowed],
            &target,
            0
        ))
    );
    // Its group lets it open the socket, but it is in no allowed group.
    eqnice!(
        403,
        status_of(flooder_as(
            &bin,
            outsider.uid,
            outsider.gid,
            &[socket_group],
            &target,
            0
        ))
    );
    assert!(running.stop_with(Signal::TERM).success());
}

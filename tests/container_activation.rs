//! Socket activation of the container endpoint: the agent serves TCP
//! listeners systemd passes (named `container` in `LISTEN_FDNAMES`, as
//! `imds-agent-container.socket` names them), beside the credential socket,
//! and refuses a socket of an unknown name, of the wrong kind or on an
//! address that would reach the network, naming it.
//!
//! The sockets are passed as systemd passes them: from fd 3 on, with
//! `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` set to the agent's own
//! pid (a shell sets it to `$$`, then `exec`s the agent in its place).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::process::Command;

use command_fds::{CommandFdExt, FdMapping};
use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, authorization_header, http_get, unix_get, wait_for};

/// A `sh -c` script that runs `"$0" "$@"` in its own place (`exec`) with
/// `LISTEN_PID` set to its pid, which `exec` keeps: the agent's pid, as
/// systemd sets it.
pub(crate) const AS_SYSTEMD: &str = "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"";

/// The agent, run with `args` and handed `fds` as systemd hands a service
/// its sockets: fd 3 on, `LISTEN_FDS`, `LISTEN_PID` (its own pid) and, when
/// given, `LISTEN_FDNAMES`.
pub(crate) fn activated_agent(fds: Vec<OwnedFd>, names: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", AS_SYSTEMD])
        .arg(env!("CARGO_BIN_EXE_imds-agent"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("IMDS_AGENT_LOG", "warn");
    pass_sockets(&mut cmd, fds, names);
    cmd
}

/// Passes `fds` to `cmd` from fd 3 on, with `LISTEN_FDS` and, when given,
/// `LISTEN_FDNAMES` (`cmd` runs the agent through [`AS_SYSTEMD`], which
/// sets `LISTEN_PID`).
pub(crate) fn pass_sockets(cmd: &mut Command, fds: Vec<OwnedFd>, names: Option<&str>) {
    cmd.env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env("LISTEN_FDS", fds.len().to_string());
    if let Some(names) = names {
        cmd.env("LISTEN_FDNAMES", names);
    }
    cmd.fd_mappings(
        fds.into_iter()
            .enumerate()
            .map(|(i, fd)| FdMapping {
                parent_fd: fd,
                child_fd: 3 + i as i32,
            })
            .collect(),
    )
    .unwrap();
}

/// `GET path` on `addr` with `Host` naming `addr` and `authorization`, if
/// any: (status, body).
fn get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
    get_as(addr, addr, path, authorization)
}

/// As [`get`], with `Host` naming `host`.
fn get_as(
    addr: SocketAddr,
    host: SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String) {
    let headers = format!("Host: {host}\r\n{}", authorization_header(authorization));
    http_get(addr, path, &headers).unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_container_endpoint_is_served_on_sockets_passed_by_systemd() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("container-token");
    let socket_path = dir.path().join("agent.sock");
    // Bound here, as systemd binds them: the agent binds nothing itself.
    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    let unix = UnixListener::bind(&socket_path).unwrap();
    let addrs = [v4.local_addr().unwrap(), v6.local_addr().unwrap()];
    // The credential socket under its unit's default name, between the
    // container's two: the names, not the order, tell them apart.
    let cmd = activated_agent(
        vec![v4.into(), unix.into(), v6.into()],
        Some("container:imds-agent.socket:container"),
        &[
            "run",
            "--imds-endpoint",
            &imds.endpoint(),
            "--container-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let log = dir.path().join("agent.log");
    let running = Running::start_logging_to(cmd, &log);
    wait_for("the token file", || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap();
    let issued = || imds.current_credentials().unwrap();
    for addr in addrs {
        let mut last = (0, String::new());
        wait_for("credentials on the passed TCP socket", || {
            last = get(addr, "/v1/credentials", Some(&token));
            last.0 == 200
        });
        assert!(
            last.1.contains(issued().access_key_id()),
            "expected the emulator's key from {addr}, got {}",
            last.0
        );
        let (status, body) = get(addr, "/v1/credentials", None);
        assert!(
            status == 400 && body.contains("NoIdInRequest"),
            "expected 400 NoIdInRequest without the token on {addr}, got {status} {body}"
        );
    }
    // Each connection's Host must name the address it came in on.
    let (status, body) = get_as(addrs[1], addrs[0], "/v1/credentials", Some(&token));
    assert!(
        status == 403 && body.contains("AccessDenied"),
        "expected 403 for Host {} on a connection to {}, got {status} {body}",
        addrs[0],
        addrs[1]
    );
    // The credential socket is served too.
    let (status, body) = unix_get(&socket_path, "/credentials").unwrap();
    eqnice!(200, status);
    assert!(body.contains(issued().access_key_id()));
    assert!(running.stop_with(Signal::TERM).success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains(&token), "the token reached the log");
}

/// The agent started with `fds` named `names`: it must exit 1 with an error
/// containing every one of `expected`.
fn refused(what: &str, fds: Vec<OwnedFd>, names: Option<&str>, expected: &[&str]) {
    let mut cmd = activated_agent(
        fds,
        names,
        &[
            "run",
            "--imds-endpoint",
            "http://127.0.0.1:9",
            "--container-token-file",
            "/nonexistent/token",
        ],
    );
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected the agent to refuse to start (exit 1), got {:?}: {stderr}",
        out.status
    );
    for want in expected {
        assert!(
            stderr.contains(want),
            "{what}: expected {want:?} in the error, got: {stderr}"
        );
    }
}

/// A TCP socket bound to `addr` with `FreeBind=yes`, as systemd binds
/// `imds-agent-container.socket` (`IP_FREEBIND`: the address need not
/// exist yet; until it does nothing reaches the socket), listening when
/// `listen` with systemd's default `Backlog=` (`SOMAXCONN`, 4096).
pub(crate) fn tcp_socket(addr: SocketAddr, listen: bool) -> OwnedFd {
    use rustix::net::{AddressFamily, SocketType, bind, ipproto, socket};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = socket(family, SocketType::STREAM, Some(ipproto::TCP)).unwrap();
    match addr {
        SocketAddr::V4(_) => rustix::net::sockopt::set_ip_freebind(&fd, true).unwrap(),
        SocketAddr::V6(_) => rustix::net::sockopt::set_ipv6_freebind(&fd, true).unwrap(),
    }
    bind(&fd, &addr).unwrap();
    if listen {
        rustix::net::listen(&fd, 4096).unwrap();
    }
    fd
}

#[test]
fn a_passed_socket_of_a_wrong_name_or_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let unix = |name: &str| OwnedFd::from(UnixListener::bind(dir.path().join(name)).unwrap());
    let loopback = || OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap());

    refused(
        "a socket of a name the agent does not take",
        vec![loopback()],
        Some("metrics"),
        &[
            "named \"metrics\" (fd 3",
            "\"credentials\"",
            "\"container\"",
            "FileDescriptorName=",
        ],
    );
    refused(
        "a Unix socket named container",
        vec![unix("a.sock")],
        Some("container"),
        &["\"container\" (fd 3) is not a TCP socket", "ListenStream="],
    );
    refused(
        "the two sockets swapped",
        vec![unix("b.sock"), loopback()],
        Some("container:credentials"),
        &["fd 3", "\"container\"", "is not a TCP socket"],
    );
    refused(
        "a TCP socket named credentials",
        vec![loopback()],
        Some("credentials"),
        &["credential socket (fd 3", "not a Unix stream socket"],
    );
    refused(
        "a TCP socket that is not listening",
        vec![tcp_socket("127.0.0.1:0".parse().unwrap(), false)],
        Some("container"),
        &["fd 3 (\"container\") is not listening"],
    );
    refused(
        "two unnamed sockets",
        vec![unix("c.sock"), unix("d.sock")],
        None,
        &["more than one credential socket", "fd 4"],
    );
    refused(
        "names that do not match the sockets",
        vec![loopback()],
        Some("container:credentials"),
        &["passed 1 sockets (LISTEN_FDS) but named 2"],
    );
}

/// A listening socket on `addr` made in a network namespace of its own (a
/// thread unshares one, binds with `IP_FREEBIND` and returns the socket; the
/// namespace goes with the socket): addresses this host must never listen on
/// are bound nowhere the host's network can see.
#[allow(
    unsafe_code,
    reason = "unshare(2) is unsafe in rustix only for CLONE_FILES, not used here"
)]
fn tcp_socket_in_a_private_namespace(addr: SocketAddr) -> OwnedFd {
    std::thread::spawn(move || {
        // SAFETY: only the network namespace is unshared, and only for this
        // thread, which ends after binding; no file descriptor table changes.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
            .expect("unshare(CLONE_NEWNET): run the suite as root");
        tcp_socket(addr, true)
    })
    .join()
    .unwrap()
}

/// Sockets on addresses the endpoint refuses: each is named in the error
/// with the accepted forms.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
fn a_passed_socket_on_a_refused_address_is_named_with_the_accepted_forms() {
    for addr in [
        "192.0.2.1:8901",
        "169.254.169.254:8901",
        "[2001:db8::1]:8901",
    ] {
        let addr: SocketAddr = addr.parse().unwrap();
        refused(
            &format!("a container socket on {addr}"),
            vec![tcp_socket_in_a_private_namespace(addr)],
            Some("container"),
            &[
                &format!("listens on {addr}, which is refused"),
                "169.254.170.23:PORT",
                "[fd00:ec2::23]:PORT",
                "loopback",
            ],
        );
    }
}

//! Containers on a host, with real traffic: the container endpoint on the
//! container link, and the IMDS lock-down rule, forward path included.
//!
//! Three network namespaces the test creates and removes (nothing leaves
//! them, and the root namespace's network is never touched):
//!
//! ```text
//!  "imds" ns                   "host" ns                          "container" ns
//!  eth0 169.254.169.254/16 --- eth0 169.254.0.1/16                eth0 10.200.0.2/24
//!       fd00:ec2::254/64            fd00:ec2::1/64                     fd00:200::2/64
//!  the emulator, [::]:80       lo: 169.254.170.23, fd00:ec2::23   default via the bridge
//!                              br0 10.200.0.1/24, fd00:200::1/64 --- (veth)
//!                              forwarding on, masquerade out of eth0, as Docker does
//!                              the agent (an unprivileged uid), the lock-down rule
//! ```
//!
//! The agent is started as the package starts it: the test, as root, binds
//! 169.254.170.23:80 and [fd00:ec2::23]:80 as `imds-agent-container.socket`
//! does (`FreeBind=yes`, before the link has the addresses) and passes both
//! to one agent, named `container`, as systemd does; the agent runs as a
//! throwaway uid with no capability at all (`setpriv`: empty permitted,
//! effective, inheritable, ambient and bounding sets), and the namespace
//! keeps the kernel's port 1024 floor, so it could not bind port 80 itself.
//! A second agent, started without systemd, binds the link itself with
//! `--container-endpoint` on a port above that floor.
//!
//! IMDS sits in a namespace of its own, as the real one sits off the host:
//! were it on the host's own link, a container's packets to it would be
//! delivered locally (the input hook) and the rule's forward chain would go
//! untested. The container link's addresses are put on `lo` by the packaged
//! `imds-container-link.sh` (this kernel has no `dummy` links; real hosts
//! get one, `imds-agent0`), and the rule is loaded by the packaged
//! `apply-imds-lockdown.sh`, with the test agent's uid in place of the
//! `imds-agent` user.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use imds_client::mock::MockImds;

use crate::util::{PATIENCE, Running, Stranger, authorization_header, http_get, wait_for};

/// The packaged host files.
fn host_file(name: &str) -> String {
    format!("{}/host/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `program args` and panics, with its output, unless it succeeds.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "expected `{program} {}` to succeed, it failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of the test's, removed when dropped (even on panic).
struct Netns(String);

impl Netns {
    fn new(role: &str) -> Self {
        let name = format!("imds-{role}-{}", std::process::id());
        run("ip", &["netns", "add", &name]);
        // Owned from here on: removed even if the next step panics.
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME args`.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `program args`, run in the namespace (`ip netns exec`).
    fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.0, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a thread of its own inside this namespace, as `user`
    /// when given (per-thread setresuid), so its sockets are the
    /// namespace's and, with a user, that user's.
    fn within<T: Send + 'static>(
        &self,
        user: Option<Stranger>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap_or_else(|e| panic!("entering {path}: {e}"));
            if let Some(user) = user {
                let (uid, gid) = (
                    rustix::process::Uid::from_raw(user.uid),
                    rustix::process::Gid::from_raw(user.gid),
                );
                rustix::thread::set_thread_groups(&[]).expect("dropping groups");
                rustix::thread::set_thread_res_gid(gid, gid, gid).expect("setresgid");
                rustix::thread::set_thread_res_uid(uid, uid, uid).expect("setresuid");
            }
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The emulator, served by a runtime on a thread inside the "imds"
/// namespace; stopped and joined when dropped.
struct Emulator {
    imds: Option<MockImds>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Emulator {
    fn start(ns: &Netns) -> Self {
        let path = format!("/run/netns/{}", ns.0);
        let (imds_tx, imds_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                // Dual-stack: 169.254.169.254:80 and [fd00:ec2::254]:80.
                let imds = MockImds::builder()
                    .role("r")
                    .listen("[::]:80".parse().unwrap())
                    .start()
                    .await;
                let _ = imds_tx.send(imds);
                let _ = stop_rx.await;
            });
        });
        let imds = imds_rx
            .recv_timeout(PATIENCE)
            .expect("the emulator to start within 60 s")
            .expect("starting the emulator on [::]:80 in the imds namespace");
        Self {
            imds: Some(imds),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn imds(&self) -> &MockImds {
        self.imds.as_ref().unwrap()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        drop(self.imds.take());
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

/// The three namespaces, wired as the module docs draw them.
struct Topology {
    imds: Netns,
    host: Netns,
    container: Netns,
}

impl Topology {
    fn build() -> Self {
        for tool in ["ip", "nft", "bridge", "setpriv"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "this test needs `{tool}` (apt-get install iproute2 nftables util-linux)"
            );
        }
        let t = Self {
            imds: Netns::new("i"),
            host: Netns::new("h"),
            container: Netns::new("c"),
        };
        let (imds, container) = (&t.imds.0, &t.container.0);
        // The instance's uplink, with IMDS at its far end.
        t.host.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", imds,
        ]);
        t.host.ip(&["addr", "add", "169.254.0.1/16", "dev", "eth0"]);
        t.host
            .ip(&["addr", "add", "fd00:ec2::1/64", "dev", "eth0", "nodad"]);
        t.host.ip(&["link", "set", "eth0", "up"]);
        t.imds
            .ip(&["addr", "add", "169.254.169.254/16", "dev", "eth0"]);
        t.imds
            .ip(&["addr", "add", "fd00:ec2::254/64", "dev", "eth0", "nodad"]);
        t.imds.ip(&["link", "set", "eth0", "up"]);
        // A bridge and a container on it, routed and NATed as Docker does.
        t.host.ip(&["link", "add", "br0", "type", "bridge"]);
        t.host.ip(&["addr", "add", "10.200.0.1/24", "dev", "br0"]);
        t.host
            .ip(&["addr", "add", "fd00:200::1/64", "dev", "br0", "nodad"]);
        t.host.ip(&["link", "set", "br0", "up"]);
        t.host.ip(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", container,
        ]);
        t.host.ip(&["link", "set", "veth0", "master", "br0", "up"]);
        t.container
            .ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"]);
        t.container
            .ip(&["addr", "add", "fd00:200::2/64", "dev", "eth0", "nodad"]);
        t.container.ip(&["link", "set", "eth0", "up"]);
        t.container
            .ip(&["route", "add", "default", "via", "10.200.0.1"]);
        t.container
            .ip(&["-6", "route", "add", "default", "via", "fd00:200::1"]);
        t.host.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        );
        let nat = "\
table ip docker_nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.200.0.0/24 oifname != \"br0\" masquerade
	}
}
table ip6 docker_nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip6 saddr fd00:200::/64 oifname != \"br0\" masquerade
	}
}
";
        let dir = tempfile::tempdir().unwrap();
        let nat_file = dir.path().join("nat.nft");
        std::fs::write(&nat_file, nat).unwrap();
        t.host.exec("nft", &["-f", nat_file.to_str().unwrap()]);
        // A neighbour on the uplink that routes the container link's
        // addresses to the host, as a machine on the instance's subnet could.
        t.imds
            .ip(&["route", "add", "169.254.170.23/32", "via", "169.254.0.1"]);
        t.imds.ip(&[
            "-6",
            "route",
            "add",
            "fd00:ec2::23/128",
            "via",
            "fd00:ec2::1",
        ]);
        t
    }

    /// The container link, by the packaged script, on lo.
    fn link_up(&self) {
        self.host
            .exec("sh", &[&host_file("imds-container-link.sh"), "up", "lo"]);
    }

    /// Loads the packaged rule with the packaged script, letting `agent` through.
    fn lock_down(&self, agent: Stranger) {
        let uid = agent.uid.to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.host.0, "sh"])
            .arg(host_file("apply-imds-lockdown.sh"))
            .arg(host_file("imds-lockdown.nft"))
            .env("IMDS_LOCKDOWN_USER", &uid)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "expected apply-imds-lockdown.sh to load the rule: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// How a TCP connection attempt ended, and how long it took.
#[derive(Debug)]
enum Reach {
    Connected,
    Refused(Duration),
    Other(#[allow(dead_code, reason = "shown through Debug in failure messages")] String),
}

/// Tries a TCP connection to `addr` (bounded: 5 s).
fn connect(addr: SocketAddr) -> Reach {
    // Outside any runtime: the real clock.
    let start = tokio::time::Instant::now();
    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(_) => Reach::Connected,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Reach::Refused(start.elapsed())
        }
        Err(e) => Reach::Other(format!("{e} after {:?}", start.elapsed())),
    }
}

/// A TCP connection to `to` from the local address `from`.
fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    connect_from_within(from, to, None)
}

/// [`connect_from`], given up after `timeout` (`SO_SNDTIMEO` bounds `connect`).
fn connect_from_within(
    from: std::net::IpAddr,
    to: SocketAddr,
    timeout: Option<Duration>,
) -> std::io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketType, bind, connect, ipproto, socket};
    let family = match to {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = socket(family, SocketType::STREAM, Some(ipproto::TCP))?;
    rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Send, timeout)?;
    bind(&fd, &SocketAddr::new(from, 0))?;
    connect(&fd, &to)?;
    Ok(TcpStream::from(fd))
}

fn imds_addrs() -> [SocketAddr; 2] {
    [
        "169.254.169.254:80".parse().unwrap(),
        "[fd00:ec2::254]:80".parse().unwrap(),
    ]
}

fn endpoints() -> [SocketAddr; 2] {
    [
        "169.254.170.23:80".parse().unwrap(),
        "[fd00:ec2::23]:80".parse().unwrap(),
    ]
}

/// `GET /v1/credentials` on `endpoint` with `authorization` (if any), as an
/// SDK sends it (`Host` without the default port, with any other): (status, body).
fn get_credentials(
    endpoint: SocketAddr,
    authorization: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let host = match endpoint {
        _ if endpoint.port() != 80 => endpoint.to_string(),
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    let headers = format!("Host: {host}\r\n{}", authorization_header(authorization));
    http_get(endpoint, "/v1/credentials", &headers)
}

/// A body fit for a failure message: an error document as it is, never a
/// credentials document (it holds a secret key).
fn shown(body: &str) -> String {
    if body.contains("SecretAccessKey") {
        "(a credentials document, not shown)".to_owned()
    } else {
        body.to_owned()
    }
}

/// The container endpoint's sockets, bound in `host` by root before the
/// link has its addresses, as systemd binds `imds-agent-container.socket`
/// (`FreeBind=yes`).
fn bind_as_systemd(host: &Netns) -> Vec<OwnedFd> {
    host.within(None, || {
        endpoints()
            .into_iter()
            .map(|addr| crate::container_activation::tcp_socket(addr, true))
            .collect()
    })
}

/// The real agent in the host namespace, as `user` with no capability,
/// serving the container endpoint on `sockets` (passed as systemd passes
/// them, named `container`) from IMDS at `imds`, its token in `token_file`.
fn start_agent(
    host: &Netns,
    user: Stranger,
    sockets: Vec<OwnedFd>,
    imds: &str,
    token_file: &Path,
    log: &Path,
) -> Running {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.0, "setpriv"])
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args([
            "--clear-groups",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--",
            "sh",
            "-c",
            crate::container_activation::AS_SYSTEMD,
        ])
        .arg(env!("CARGO_BIN_EXE_imds-agent"))
        .args(["run", "--imds-endpoint", imds, "--poll-interval", "1"])
        .arg("--container-token-file")
        .arg(token_file)
        .env_remove("RUST_LOG")
        .env("IMDS_AGENT_LOG", "info");
    let names = vec!["container"; sockets.len()].join(":");
    crate::container_activation::pass_sockets(&mut cmd, sockets, Some(&names));
    Running::start_logging_to(cmd, log)
}

/// The capability sets of process `pid` (`Cap*:` lines of its status).
fn capabilities(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"))
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .map(str::to_owned)
        .collect()
}

#[test]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
fn containers_reach_the_endpoint_and_not_imds_through_the_lock_down() {
    crate::util::require_root();
    let dir = tempfile::tempdir().unwrap();
    let topology = Topology::build();
    let emulator = Emulator::start(&topology.imds);
    let agent_user = Stranger::new();
    let stranger = Stranger::new();
    let home = agent_user.home(dir.path());
    // Bound before the link exists (FreeBind), as at boot.
    let sockets = bind_as_systemd(&topology.host);
    topology.link_up();
    // One agent serves both families, on the two sockets it is passed.
    let token_file = home.join("container-token");
    let log = dir.path().join("agent.log");
    let agent = start_agent(
        &topology.host,
        agent_user,
        sockets,
        "http://169.254.169.254",
        &token_file,
        &log,
    );
    wait_for("the agent's token file", || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap();
    let caps = capabilities(agent.pid());
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            caps.iter()
                .any(|l| l.starts_with(set) && l.ends_with("0000000000000000")),
            "expected the agent to hold no capability ({set} all zero), got {caps:?}"
        );
    }
    let tokens = [token.clone(), token.clone()];
    let token_files = [&token_file, &token_file];
    let issued = || {
        emulator
            .imds()
            .current_credentials()
            .expect("the emulator has a role")
    };

    // Before the rule: the container is served by the endpoint, and IMDS is
    // open to it through the host's forwarding and NAT (the hole the rule
    // closes), and to every user on the host.
    for (endpoint, token) in endpoints().into_iter().zip(&tokens) {
        let token = token.clone();
        let mut last = None;
        wait_for("the container to get credentials from the endpoint", || {
            let token = token.clone();
            let got = topology
                .container
                .within(None, move || get_credentials(endpoint, Some(&token)));
            let served = matches!(&got, Ok((200, _)));
            last = Some(got);
            served
        });
        let (_, body) = last.unwrap().unwrap();
        assert!(
            body.contains(issued().access_key_id()),
            "expected the emulator's key from {endpoint}, got {}",
            shown(&body)
        );
    }
    for addr in imds_addrs() {
        let from_container = topology.container.within(None, move || connect(addr));
        assert!(
            matches!(from_container, Reach::Connected),
            "without the rule a container should reach IMDS at {addr} (forwarding and NAT \
             as Docker sets them up), got {from_container:?}"
        );
        let from_stranger = topology.host.within(Some(stranger), move || connect(addr));
        assert!(
            matches!(from_stranger, Reach::Connected),
            "without the rule uid {} should reach IMDS at {addr}, got {from_stranger:?}",
            stranger.uid
        );
    }
    // A process on the host reaches the link too, with the token only.
    for (endpoint, token) in endpoints().into_iter().zip(&tokens) {
        let token = token.clone();
        let (with, without) = topology.host.within(Some(stranger), move || {
            (
                get_credentials(endpoint, Some(&token)).map(|(s, _)| s),
                get_credentials(endpoint, None).map(|(s, _)| s),
            )
        });
        assert!(
            matches!((&with, &without), (Ok(200), Ok(400))),
            "expected uid {} on the host to get 200 from {endpoint} with the token and 400 \
             without; got {with:?} and {without:?}",
            stranger.uid
        );
    }
    // A neighbour on the uplink is neither a local process nor behind a
    // bridge: the agent refuses it at accept, even without the rule.
    for (endpoint, token) in endpoints().into_iter().zip(&tokens) {
        let token = token.clone();
        let got = topology
            .imds
            .within(None, move || get_credentials(endpoint, Some(&token)));
        let got = got.map(|(status, body)| (status, shown(&body)));
        assert!(
            matches!(&got, Ok((403, body)) if !body.contains("credentials document")),
            "expected the agent to refuse a request from the uplink to {endpoint} with 403, got {got:?}"
        );
    }

    topology.lock_down(agent_user);

    // From the container: IMDS answers a reset at once, on both families.
    for addr in imds_addrs() {
        let got = topology.container.within(None, move || connect(addr));
        assert!(
            matches!(got, Reach::Refused(t) if t < Duration::from_millis(100)),
            "with the rule, a container's connection to IMDS at {addr} should be reset \
             within 100 ms; got {got:?}"
        );
    }
    // ... and the container endpoint still serves it, with the token only.
    for (endpoint, token) in endpoints().into_iter().zip(&tokens) {
        let token = token.clone();
        let (status, body) = topology
            .container
            .within(None, move || get_credentials(endpoint, Some(&token)))
            .unwrap_or_else(|e| panic!("the container endpoint {endpoint} with the rule: {e}"));
        assert_eq!(
            status,
            200,
            "expected credentials from {endpoint} with the rule loaded, got {status} {}",
            shown(&body)
        );
        assert!(
            body.contains(issued().access_key_id()),
            "expected the emulator's key from {endpoint}, got {}",
            shown(&body)
        );
        let (status, body) = topology
            .container
            .within(None, move || get_credentials(endpoint, None))
            .unwrap();
        assert!(
            status == 400 && body.contains("NoIdInRequest") && !body.contains("AccessKeyId"),
            "expected 400 NoIdInRequest without the token from {endpoint}, got {status} {}",
            shown(&body)
        );
        let (status, body) = topology
            .container
            .within(None, move || {
                get_credentials(endpoint, Some("not-the-token"))
            })
            .unwrap();
        assert!(
            status == 400 && body.contains("InvalidIdInRequest"),
            "expected 400 InvalidIdInRequest with a wrong token from {endpoint}, got {status} {}",
            shown(&body)
        );
    }
    // A container cannot pass for the host: sending from the host's own
    // addresses through the bridge (169.254.0.1 and fd00:ec2::1, on the
    // uplink), it never completes a handshake. IPv4 drops a local source
    // arriving from outside as a martian; for IPv6 the handshake's reply
    // goes to the host itself. Bounded at 2 s: nothing answers.
    for (spoofed, prefix, endpoint) in [
        ("169.254.0.1", "32", endpoints()[0]),
        ("fd00:ec2::1", "128", endpoints()[1]),
    ] {
        let spoofed: std::net::IpAddr = spoofed.parse().unwrap();
        let with_prefix = format!("{spoofed}/{prefix}");
        topology
            .container
            .ip(&["addr", "add", &with_prefix, "dev", "eth0", "nodad"]);
        let got = topology.container.within(None, move || {
            connect_from_within(spoofed, endpoint, Some(Duration::from_secs(2)))
                .map(|_| "connected")
        });
        topology
            .container
            .ip(&["addr", "del", &with_prefix, "dev", "eth0"]);
        // The connect itself gave up (EINPROGRESS at the timeout), not the bind.
        let in_progress = rustix::io::Errno::INPROGRESS.raw_os_error();
        assert!(
            matches!(&got, Err(e) if e.raw_os_error() == Some(in_progress)),
            "expected a container sending from the host's own {spoofed} to get no connection \
             to {endpoint} (its connect still in progress after 2 s), got {got:?}"
        );
    }
    // A container answering for many addresses on its bridge (here added
    // with `ip addr`; CAP_NET_RAW could claim them by ARP) gets a per-peer
    // share for each, but containers together hold at most half the slots
    // (512 of 1024): nine addresses of 64 connections each fill it, the
    // container is refused more, and a process on the host is still served.
    let extra: Vec<std::net::IpAddr> = (100..109)
        .map(|i| format!("10.200.0.{i}").parse().unwrap())
        .collect();
    for address in &extra {
        topology
            .container
            .ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
    }
    let endpoint = endpoints()[0];
    let held = topology.container.within(None, move || {
        let mut held = Vec::new();
        for address in extra {
            for _ in 0..64 {
                held.push(
                    connect_from(address, endpoint)
                        .unwrap_or_else(|e| panic!("connecting from {address} to {endpoint}: {e}")),
                );
            }
        }
        held
    });
    let token_for_container = token.clone();
    let got = topology.container.within(None, move || {
        get_credentials(endpoint, Some(&token_for_container))
    });
    let got = got.map(|(status, body)| (status, shown(&body)));
    assert!(
        matches!(&got, Ok((503, _))),
        "expected the container, whose other addresses hold 576 connections, to be refused \
         with 503 once containers hold their 512; got {got:?}"
    );
    let token_for_host = token.clone();
    let got = topology.host.within(Some(stranger), move || {
        get_credentials(endpoint, Some(&token_for_host))
    });
    assert!(
        matches!(&got, Ok((200, _))),
        "expected uid {} on the host to be served while containers hold their share, got \
         status {:?}",
        stranger.uid,
        got.map(|(status, _)| status)
    );
    drop(held);
    let token_again = token.clone();
    wait_for("the container to be served again once it lets go", || {
        let token = token_again.clone();
        let got = topology
            .container
            .within(None, move || get_credentials(endpoint, Some(&token)));
        matches!(got, Ok((200, _)))
    });
    // On the host: another uid gets a reset; the agent's uid gets through.
    for addr in imds_addrs() {
        let got = topology.host.within(Some(stranger), move || connect(addr));
        assert!(
            matches!(got, Reach::Refused(t) if t < Duration::from_millis(100)),
            "with the rule, uid {} on the host should be reset by IMDS at {addr} within \
             100 ms; got {got:?}",
            stranger.uid
        );
        let got = topology
            .host
            .within(Some(agent_user), move || connect(addr));
        assert!(
            matches!(got, Reach::Connected),
            "with the rule, the agent's uid {} should reach IMDS at {addr}; got {got:?}",
            agent_user.uid
        );
    }
    // The uplink cannot reach the container link at all.
    for endpoint in endpoints() {
        let got = topology.imds.within(None, move || connect(endpoint));
        assert!(
            matches!(got, Reach::Refused(_)),
            "with the rule, the container link {endpoint} should reset a connection from \
             the uplink; got {got:?}"
        );
    }
    // Without systemd: the agent binds the link itself with
    // --container-endpoint, on a port above the kernel's floor (no
    // capability either), and serves the container there too.
    let bound_token_file = home.join("bound-token");
    let bound = {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topology.host.0, "setpriv"])
            .arg(format!("--reuid={}", agent_user.uid))
            .arg(format!("--regid={}", agent_user.gid))
            .args([
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
            ])
            .arg(env!("CARGO_BIN_EXE_imds-agent"))
            .args(["run", "--imds-endpoint", "http://169.254.169.254"])
            .args(["--container-endpoint", "[fd00:ec2::23]:8901"])
            .arg("--container-token-file")
            .arg(&bound_token_file)
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_FDS")
            .env("IMDS_AGENT_LOG", "warn");
        Running::start(cmd)
    };
    wait_for("the second agent's token file", || {
        bound_token_file.exists()
    });
    let bound_token = std::fs::read_to_string(&bound_token_file).unwrap();
    let mut last = None;
    wait_for("the container to be served on [fd00:ec2::23]:8901", || {
        let token = bound_token.clone();
        let got = topology.container.within(None, move || {
            get_credentials("[fd00:ec2::23]:8901".parse().unwrap(), Some(&token))
        });
        let served = matches!(&got, Ok((200, _)));
        last = Some(got.map(|(status, body)| (status, shown(&body))));
        served
    });
    assert!(
        matches!(&last, Some(Ok((200, _)))),
        "expected 200 from [fd00:ec2::23]:8901, got {last:?}"
    );
    assert!(bound.stop_with(rustix::process::Signal::TERM).success());

    // An SDK in the container, configured the way README "Containers" says.
    for (uri, token_file) in [
        ("http://169.254.170.23/v1/credentials", &token_files[0]),
        ("http://[fd00:ec2::23]/v1/credentials", &token_files[1]),
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", &topology.container.0])
            .arg(std::env::current_exe().unwrap())
            .args([
                "container_netns::sdk_in_the_container",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri)
            .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file)
            .env(SDK_EXPECTS, issued().access_key_id())
            .env_remove("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
            .env_remove("AWS_CONTAINER_AUTHORIZATION_TOKEN")
            .output()
            .unwrap();
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && output.contains("1 passed"),
            "expected aws-config's container provider in the container to resolve the \
             emulator's credentials from {uri}:\n{output}"
        );
    }

    // The doctor, on the host, sees the forward path closed.
    let doctor = run_doctor(&topology.host);
    assert!(
        doctor.contains("[ok  ] the forward path to IMDS is closed"),
        "expected doctor to report the forward path closed with the rule:\n{doctor}"
    );
    assert!(
        doctor.contains("[ok  ] the IMDS lock-down rule is loaded"),
        "expected doctor to find the rule's output chain whole:\n{doctor}"
    );

    // Removing the rule opens IMDS again, to the container and to the stranger.
    topology
        .host
        .exec("nft", &["delete", "table", "inet", "imds_lockdown"]);
    for addr in imds_addrs() {
        let got = topology.container.within(None, move || connect(addr));
        assert!(
            matches!(got, Reach::Connected),
            "without the rule the container should reach IMDS at {addr} again; got {got:?}"
        );
        let got = topology.host.within(Some(stranger), move || connect(addr));
        assert!(
            matches!(got, Reach::Connected),
            "without the rule uid {} should reach IMDS at {addr} again; got {got:?}",
            stranger.uid
        );
    }
    let doctor = run_doctor(&topology.host);
    assert!(
        doctor.contains("[warn] IP forwarding is on and a bridge exists (br0)"),
        "expected doctor to warn that a bridged container can reach IMDS without the rule:\n{doctor}"
    );

    assert!(agent.stop_with(rustix::process::Signal::TERM).success());
    // Per-peer keys, as the refusal log names them: the host process by its
    // uid (sock_diag), the container by its address (it has no local uid).
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains(token.as_str()), "the token reached the log");
    for key in [
        format!("further refusals of uid {}", stranger.uid),
        "further refusals of address 10.200.0.2".to_owned(),
        "further refusals of address fd00:200::2".to_owned(),
    ] {
        assert!(
            log.contains(&key),
            "expected {key:?} in the agent's log:\n{log}"
        );
    }
    drop(emulator);
    drop(topology);
}

/// `apply-imds-lockdown.sh` refuses an `IMDS_LOCKDOWN_USER` that is not a
/// user name or uid before it touches the rule: no nft syntax or shell
/// reaches the rule file, and a name `id` would take as an option (`-u`
/// names root's uid) is not looked up. Run in a network namespace of its own
/// (`unshare --net`), so even a rule loaded by mistake would go with it.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
fn the_lock_down_script_refuses_a_user_that_is_not_one() {
    crate::util::require_root();
    for user in [
        "-u",
        "-G",
        "a;b",
        "x\" accept #",
        "0 accept",
        "$(id)",
        "no-such-user-imds",
    ] {
        let out = Command::new("unshare")
            .args(["--net", "sh", "-c"])
            .arg("sh \"$0\" \"$1\" && nft list ruleset")
            .arg(host_file("apply-imds-lockdown.sh"))
            .arg(host_file("imds-lockdown.nft"))
            .env("IMDS_LOCKDOWN_USER", user)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && (stderr.contains(&format!("IMDS_LOCKDOWN_USER='{user}' is not a user name"))
                    || stderr.contains(&format!("the {user} user does not exist"))),
            "expected IMDS_LOCKDOWN_USER={user:?} to be refused by name before nft runs; got \
             {:?}: {stderr}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// `imds-agent doctor` in `host`, as root: its report (it exits 1 when a
/// check fails, as IMDS does for root under the rule).
fn run_doctor(host: &Netns) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &host.0])
        .arg(env!("CARGO_BIN_EXE_imds-agent"))
        .args(["doctor", "--imds-endpoint", "http://169.254.169.254"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the SDK in the container must resolve: an access key id.
const SDK_EXPECTS: &str = "IMDS_NETNS_TEST_EXPECTED_KEY";

/// Run by the test above inside the container namespace (`ip netns exec`),
/// with `AWS_CONTAINER_*` in its environment: aws-config's container
/// provider resolves the credentials. A process of its own, so that the
/// variables are set for it alone.
#[test]
#[ignore = "a helper: containers_reach_the_endpoint_and_not_imds_through_the_lock_down runs it in the container namespace"]
fn sdk_in_the_container() {
    use aws_credential_types::provider::ProvideCredentials;

    let Ok(expected) = std::env::var(SDK_EXPECTS) else {
        eprintln!("skipped: started without {SDK_EXPECTS}, not by the namespace test");
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let credentials = runtime
        .block_on(
            aws_config::ecs::EcsCredentialsProvider::builder()
                .build()
                .provide_credentials(),
        )
        .unwrap_or_else(|e| panic!("the SDK resolved no credentials: {e:?}"));
    assert_eq!(credentials.access_key_id(), expected);
}

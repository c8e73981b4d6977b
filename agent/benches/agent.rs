//! The agent binary's costs, against the in-process emulator:
//!
//! - socket throughput and latency: concurrent keep-alive clients on
//!   `GET /credentials` over the Unix socket, a fixed number of requests;
//! - resident memory after 1,000 rotations (emulator rotates, SIGHUP, wait
//!   until the socket serves the new key);
//! - CPU time while idle, and the IMDS requests made meanwhile, over a window
//!   (60 s; `IMDS_BENCH_IDLE_SECS` changes it) at default settings.
//!
//! `cargo bench -p imds-agent --bench agent`; under `cargo test` (no
//! `--bench` argument) it runs small: 10 rotations, 1 s idle, 2,000 requests.
//! `IMDS_AGENT_BIN` points it at another binary (`scripts/bench` passes the
//! stripped release build).

#![allow(missing_docs)] // reason: a benchmark binary, not an API

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use imds_client::mock::MockImds;
use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[allow(clippy::disallowed_methods)] // reason: benchmarks time real work on the real clock
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

fn smoke() -> bool {
    std::env::var_os("IMDS_BENCH_SMOKE").is_some() || !std::env::args().any(|a| a == "--bench")
}

/// Appends a row (figure, ours, SDK, ratio, target, met) to the results.
fn report(figure: &str, ours: &str, target: &str, met: Option<bool>) {
    // Smoke runs are tiny (and, under `cargo test`, unoptimised): no verdicts.
    let met = if smoke() { None } else { met };
    let met = match met {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    let target = if target.is_empty() { "-" } else { target };
    let line = format!("{figure}\t{ours}\t-\t-\t{target}\t{met}");
    println!("RESULT\t{line}");
    if let Some(path) = std::env::var_os("IMDS_BENCH_RESULTS") {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("results file opens");
        writeln!(file, "{line}").expect("results file is writable");
    }
}

/// A keep-alive HTTP/1.1 connection to the agent's socket.
struct Conn {
    stream: BufReader<UnixStream>,
    line: String,
    body: Vec<u8>,
}

impl Conn {
    async fn open(socket: &Path) -> std::io::Result<Self> {
        Ok(Self {
            stream: BufReader::new(UnixStream::connect(socket).await?),
            line: String::new(),
            body: Vec::new(),
        })
    }

    /// GET `path`: the status; the body is left in `self.body`.
    async fn get(&mut self, path: &str) -> std::io::Result<u16> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut status = 0;
        let mut length = 0;
        let mut first = true;
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = self.line.trim_end();
            if first {
                status = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                first = false;
            } else if line.is_empty() {
                break;
            } else if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        self.body.resize(length, 0);
        self.stream.read_exact(&mut self.body).await?;
        Ok(status)
    }

    /// The access key id the agent serves now, if any.
    async fn access_key(&mut self) -> Option<String> {
        if self.get("/credentials").await.ok()? != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        json["AccessKeyId"].as_str().map(str::to_owned)
    }
}

struct Agent {
    child: Child,
    pid: Pid,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_binary() -> PathBuf {
    std::env::var_os("IMDS_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_imds-agent")))
}

/// Starts the agent at default settings, with a credentials file, a JSON
/// file and the socket in `dir`.
fn start_agent(dir: &Path, endpoint: &str) -> Agent {
    let child = Command::new(agent_binary())
        .arg("run")
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .arg("--credentials-file")
        .arg(dir.join("credentials"))
        .arg("--json-file")
        .arg(dir.join("credentials.json"))
        .args(["--imds-endpoint", endpoint])
        .env_remove("RUST_LOG")
        .env("IMDS_AGENT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting imds-agent");
    let pid = Pid::from_raw(child.id() as i32).expect("pid");
    Agent { child, pid }
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw_nonzero()))
        .expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// CPU time (user + system) of the whole process `pid`, exited threads
/// included, in nanoseconds; clock-tick resolution (`getconf CLK_TCK`, 100
/// on Linux: 10 ms).
fn cpu_ns(pid: Pid) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
        .expect("/proc stat");
    // After the command name (which may hold spaces) come the state (field
    // 3 of the line) and, at fields 14 and 15, utime and stime.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks * 1_000_000_000 / clock_ticks()
}

/// CPU time of each live thread of `pid`, in nanoseconds (schedstat).
fn cpu_by_thread(pid: Pid) -> std::collections::HashMap<String, u64> {
    let dir = format!("/proc/{}/task", pid.as_raw_nonzero());
    let mut times = std::collections::HashMap::new();
    for task in std::fs::read_dir(dir).expect("/proc task dir").flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat"))
            && let Some(ns) = text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        {
            times.insert(task.file_name().to_string_lossy().into_owned(), ns);
        }
    }
    times
}

/// CPU used between two `cpu_by_thread` readings by the threads alive at the
/// second (a thread that exited in between is not counted).
fn cpu_between(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// `total` requests over `clients` keep-alive connections; (rps, p50, p99).
async fn throughput(socket: &Path, clients: usize, total: usize) -> (f64, Duration, Duration) {
    let per = total / clients;
    let start = now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_owned();
            tokio::spawn(async move {
                let mut conn = Conn::open(&socket).await.expect("connect");
                let mut latencies = Vec::with_capacity(per);
                for _ in 0..per {
                    let t = now();
                    let status = match conn.get("/credentials").await {
                        Ok(s) => s,
                        Err(_) => {
                            // The server closes connections after a while;
                            // reconnect and retry once.
                            conn = Conn::open(&socket).await.expect("reconnect");
                            conn.get("/credentials").await.expect("request")
                        }
                    };
                    assert_eq!(status, 200);
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let elapsed = start.elapsed();
    all.sort();
    (
        all.len() as f64 / elapsed.as_secs_f64(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    )
}

async fn wait_for_key(conn: &mut Conn, socket: &Path, key: Option<&str>) {
    for _ in 0..10_000 {
        let served = conn.access_key().await;
        if served.is_some() && (key.is_none() || served.as_deref() == key) {
            return;
        }
        if served.is_none() {
            // A closed connection or not ready yet: reconnect.
            tokio::time::sleep(Duration::from_millis(1)).await;
            if let Ok(c) = Conn::open(socket).await {
                *conn = c;
            }
        }
    }
    panic!("the agent never served {key:?}");
}

async fn bench() {
    let smoke = smoke();
    let rotations = if smoke { 10 } else { 1_000 };
    let idle = std::env::var("IMDS_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 1 } else { 60 });
    let (clients, total) = if smoke { (4, 2_000) } else { (32, 200_000) };

    let imds = MockImds::builder()
        .role("bench-role")
        .start()
        .await
        .expect("emulator");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let started = now();
    let agent = start_agent(dir.path(), &imds.endpoint());
    let mut conn = loop {
        match Conn::open(&socket).await {
            Ok(c) => break c,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => panic!("the agent's socket never opened: {e}"),
        }
    };
    wait_for_key(&mut conn, &socket, None).await;
    let ready = started.elapsed();
    let rss_start = rss_kib(agent.pid);
    report(
        "agent: start to serving credentials on the socket",
        &format!("{:.1} ms", ready.as_secs_f64() * 1e3),
        "",
        None,
    );

    // Rotations: new credentials at IMDS, SIGHUP, until the socket serves them.
    let start = now();
    for _ in 0..rotations {
        imds.rotate();
        let key = imds
            .current_credentials()
            .expect("role attached")
            .access_key_id()
            .to_owned();
        kill_process(agent.pid, Signal::HUP).expect("SIGHUP");
        wait_for_key(&mut conn, &socket, Some(&key)).await;
    }
    let rotation_time = start.elapsed();
    let rss = rss_kib(agent.pid);
    report(
        &format!("agent: resident memory after {rotations} rotations"),
        &format!("{} (at start {})", mib(rss), mib(rss_start)),
        "< 10 MiB",
        Some(rss < 10 * 1024),
    );
    report(
        "agent: one rotation (SIGHUP to new key on the socket, files written)",
        &format!(
            "{:.2} ms",
            rotation_time.as_secs_f64() * 1e3 / f64::from(rotations)
        ),
        "",
        None,
    );
    drop(conn);

    // Idle: no clients; the agent only follows its schedule. First let the
    // rotations' blocking-pool threads retire (tokio keeps them 10 s), so the
    // per-thread reading below sees a stable set of threads.
    if !smoke {
        tokio::time::sleep(Duration::from_secs(12)).await;
    }
    imds.reset_request_counts();
    let (threads_before, ticks_before) = (cpu_by_thread(agent.pid), cpu_ns(agent.pid));
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let cpu = cpu_between(&threads_before, &cpu_by_thread(agent.pid));
    let ticks = cpu_ns(agent.pid).saturating_sub(ticks_before);
    let requests = imds.request_counts().total;
    report(
        &format!("agent: CPU time while idle for {idle} s"),
        &format!(
            "{:.2} ms (process ticks: {} ms)",
            cpu as f64 / 1e6,
            ticks / 1_000_000
        ),
        "near zero (< 10 ms/min)",
        (!smoke).then_some((cpu as f64 / 1e6) < 10.0 * idle as f64 / 60.0),
    );
    report(
        &format!(
            "agent: IMDS requests/hour at defaults ({requests} in {idle} s, x{})",
            3600 / idle
        ),
        &format!("{}", requests * 3600 / idle),
        "",
        None,
    );

    // Throughput and latency.
    let (rps, p50, p99) = throughput(&socket, clients, total).await;
    report(
        &format!("agent: GET /credentials, {clients} clients, {total} requests: throughput"),
        &format!("{rps:.0} req/s"),
        ">= 20,000 req/s",
        (!smoke).then_some(rps >= 20_000.0),
    );
    report(
        "agent: GET /credentials latency p50 / p99",
        &format!(
            "{:.0} µs / {:.0} µs",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        ),
        "",
        None,
    );
    report(
        "agent: resident memory after the load",
        &mib(rss_kib(agent.pid)),
        "",
        None,
    );
    drop(agent);
}

fn main() {
    // The load generator runs on one thread so that the agent keeps the
    // other core of a 2-core machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

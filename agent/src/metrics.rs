//! Counters for `GET /metrics` (Prometheus text format), served on the
//! metrics listener (see `metrics_listener`), apart from credentials.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use imds_client::ProviderState;

/// The agent's counters. Shared by the daemon and the socket server.
#[derive(Debug, Default)]
pub struct Metrics {
    refreshes: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
    last_success_unix: AtomicU64,
    requests: AtomicU64,
    denied: AtomicU64,
    refused: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    sink_failures: AtomicU64,
    outputs_stuck: AtomicU64,
    outputs_failing: AtomicU64,
    refresh_requests: Mutex<BTreeMap<&'static str, u64>>,
    on_change_runs: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// A successful refresh.
    pub fn refreshed(&self, at: SystemTime) {
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_success_unix.store(secs, Ordering::Relaxed);
    }

    /// A failed request to IMDS, counted by error kind (`ServerError`,
    /// `Timeout`, `NoRoleAttached`, ...).
    pub fn failed(&self, error: &imds_client::Error) {
        let kind = format!("{:?}", error.kind());
        let kind = kind.split([' ', '{', '(']).next().unwrap_or("Other");
        *self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.to_owned())
            .or_default() += 1;
    }

    /// A request served on the socket.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection refused by the peer allow-list.
    pub fn denied(&self) {
        self.denied.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection or request refused on `endpoint` (`socket`,
    /// `container`) for `reason` (`allow_list`, `peer_limit`, `no_token`, ...).
    pub fn refused(&self, endpoint: &'static str, reason: &'static str) {
        *self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((endpoint, reason))
            .or_default() += 1;
    }

    /// An output that could not be written.
    pub fn sink_failed(&self) {
        self.sink_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// An output write started (`true`) or stopped (`false`) being stuck
    /// past its timeout.
    pub fn output_stuck(&self, stuck: bool) {
        if stuck {
            self.outputs_stuck.fetch_add(1, Ordering::Relaxed);
        } else {
            self.outputs_stuck.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// How many outputs have a write stuck past its timeout right now.
    pub fn outputs_stuck(&self) -> u64 {
        self.outputs_stuck.load(Ordering::Relaxed)
    }

    /// An output's last write failed (`true`), or it succeeded again after
    /// failing (`false`). Each output's writer reports a change only.
    pub fn output_failing(&self, failing: bool) {
        if failing {
            self.outputs_failing.fetch_add(1, Ordering::Relaxed);
        } else {
            self.outputs_failing.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// How many outputs failed their last write (and are being retried).
    pub fn outputs_failing(&self) -> u64 {
        self.outputs_failing.load(Ordering::Relaxed)
    }

    /// A `POST /refresh` answered: `started` (it asked IMDS), `joined` (it
    /// waited for a refresh already running), `rate_limited` (429) or
    /// `stopping` (the agent was shutting down).
    pub fn refresh_request(&self, outcome: &'static str) {
        *self
            .refresh_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(outcome)
            .or_default() += 1;
    }

    /// An `--on-change` (or `--reload-unit`) run finished: `ok`, `failed`
    /// (non-zero exit), `timeout` (killed) or `spawn_error` (not started).
    pub fn on_change_run(&self, result: &'static str) {
        *self
            .on_change_runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(result)
            .or_default() += 1;
    }

    /// Renders every metric, with seconds until expiry from `state`.
    pub fn render(&self, state: &ProviderState, now: SystemTime) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        metric(
            "imds_agent_refreshes_total",
            "counter",
            "Successful checks and refreshes of the role and its credentials.",
            vec![(
                String::new(),
                self.refreshes.load(Ordering::Relaxed).to_string(),
            )],
        );
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        metric(
            "imds_agent_refresh_failures_total",
            "counter",
            "Failed checks and refreshes, by error kind.",
            failures
                .into_iter()
                .map(|(k, v)| (format!("{{kind=\"{k}\"}}"), v.to_string()))
                .collect(),
        );
        metric(
            "imds_agent_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful refresh.",
            vec![(
                String::new(),
                self.last_success_unix.load(Ordering::Relaxed).to_string(),
            )],
        );
        let expiry =
            state
                .current()
                .map(|c| match c.credentials.expiration().duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                });
        metric(
            "imds_agent_credentials_expiry_seconds",
            "gauge",
            "Seconds until the served credentials expire.",
            expiry
                .map(|e| vec![(String::new(), e.to_string())])
                .unwrap_or_default(),
        );
        metric(
            "imds_agent_requests_total",
            "counter",
            "Requests served on the credential socket.",
            vec![(
                String::new(),
                self.requests.load(Ordering::Relaxed).to_string(),
            )],
        );
        metric(
            "imds_agent_denied_connections_total",
            "counter",
            "Connections refused by the allow-list.",
            vec![(
                String::new(),
                self.denied.load(Ordering::Relaxed).to_string(),
            )],
        );
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        metric(
            "imds_agent_refused_connections_total",
            "counter",
            "Connections and requests refused at once, by endpoint and reason (allow_list, unknown_peer, peer_limit, global_limit, no_token, wrong_token, forged).",
            refused
                .into_iter()
                .map(|((endpoint, reason), v)| {
                    (
                        format!("{{endpoint=\"{endpoint}\",reason=\"{reason}\"}}"),
                        v.to_string(),
                    )
                })
                .collect(),
        );
        metric(
            "imds_agent_output_failures_total",
            "counter",
            "Failed writes to outputs.",
            vec![(
                String::new(),
                self.sink_failures.load(Ordering::Relaxed).to_string(),
            )],
        );
        metric(
            "imds_agent_outputs_stuck",
            "gauge",
            "Outputs whose current write has not returned within its timeout.",
            vec![(String::new(), self.outputs_stuck().to_string())],
        );
        metric(
            "imds_agent_outputs_failing",
            "gauge",
            "Outputs whose last write failed (retried every few seconds).",
            vec![(String::new(), self.outputs_failing().to_string())],
        );
        let refresh_requests = self
            .refresh_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        metric(
            "imds_agent_refresh_requests_total",
            "counter",
            "POST /refresh requests, by outcome (started, joined, rate_limited, stopping).",
            refresh_requests
                .into_iter()
                .map(|(outcome, v)| (format!("{{outcome=\"{outcome}\"}}"), v.to_string()))
                .collect(),
        );
        let on_change_runs = self
            .on_change_runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        metric(
            "imds_agent_on_change_runs_total",
            "counter",
            "Runs of --on-change and --reload-unit commands, by result (ok, failed, timeout, spawn_error).",
            on_change_runs
                .into_iter()
                .map(|(result, v)| (format!("{{result=\"{result}\"}}"), v.to_string()))
                .collect(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            metric(
                "imds_agent_tasks",
                "gauge",
                "Tasks alive in the agent's runtime (flat over time unless something leaks).",
                vec![(
                    String::new(),
                    runtime.metrics().num_alive_tasks().to_string(),
                )],
            );
        }
        out
    }
}

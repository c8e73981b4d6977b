//! The file outputs, written off the daemon's loop.
//!
//! A write can stall: a directory on a hung network file system, a disk that
//! stops answering, or a lock held by someone else. The daemon must keep
//! answering signals, polling IMDS (so a detach is noticed) and serving the
//! socket all the same. So each output gets its own writer task, fed through
//! a watch channel that holds only the latest wanted content (a burst of
//! changes is one write, never a queue). The write itself runs on the
//! blocking pool under a timeout: past it the output is reported stuck (a log
//! line, the `imds_agent_outputs_stuck` gauge, `degraded` health), and its
//! writer waits for that one write to return before it starts the next, so a
//! stuck output holds at most one blocking thread. Failed writes are retried
//! after `retry_interval`, or at once when newer content is wanted; while an
//! output's last write failed it counts in the `imds_agent_outputs_failing`
//! gauge (and `degraded` health) until a write succeeds.
//!
//! A failing output is logged sparingly: its first failure in full, then
//! at most one line per [`FAILURE_REPORT_INTERVAL`] while it keeps failing
//! (how many tries failed since the last line, and the latest cause; a new
//! cause is logged at once), and one line when it is written again. A full
//! disk so costs about one line a minute per output, not one per retry;
//! `imds_agent_output_failures_total` still counts every failed try.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use imds_client::RoleCredentials;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::sink::Sink;

/// What the outputs should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// These credentials (the role is attached).
    Credentials(RoleCredentials),
    /// None of ours (the role was detached).
    Withdrawn,
}

/// How the writers behave.
#[derive(Debug, Clone, Copy)]
pub struct WriteLimits {
    /// A write that has not returned after this long is reported stuck.
    pub timeout: Duration,
    /// A failed write is tried again after this long (or when newer content is wanted).
    pub retry_interval: Duration,
}

impl Default for WriteLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            retry_interval: Duration::from_secs(5),
        }
    }
}

/// While an output keeps failing, at most one log line per this long.
pub const FAILURE_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// A version of the wanted content: writers report which one they hold.
type Generation = u64;

/// The running writers of every output.
#[derive(Debug)]
pub struct Outputs {
    wanted: Vec<watch::Sender<Option<(Generation, Wanted)>>>,
    applied: Vec<Generation>,
    applied_rx: mpsc::UnboundedReceiver<(usize, Generation)>,
    generation: Generation,
    current: Option<Wanted>,
    tasks: Vec<JoinHandle<()>>,
}

impl Outputs {
    /// Starts one writer per sink. Must be called within a Tokio runtime.
    pub fn start(sinks: Vec<Arc<dyn Sink>>, limits: WriteLimits, metrics: Arc<Metrics>) -> Self {
        let (applied_tx, applied_rx) = mpsc::unbounded_channel();
        let mut wanted = Vec::with_capacity(sinks.len());
        let mut tasks = Vec::with_capacity(sinks.len());
        for (index, sink) in sinks.into_iter().enumerate() {
            let (tx, rx) = watch::channel(None);
            wanted.push(tx);
            tasks.push(tokio::spawn(
                Writer {
                    index,
                    sink,
                    limits,
                    metrics: metrics.clone(),
                    applied: applied_tx.clone(),
                    failing: false,
                    trouble: None,
                }
                .run(rx),
            ));
        }
        Self {
            applied: vec![0; wanted.len()],
            wanted,
            applied_rx,
            generation: 0,
            current: None,
            tasks,
        }
    }

    /// Asks every output to hold `wanted` (a no-op when it already is the
    /// wanted content). Never waits for a write.
    pub fn set(&mut self, wanted: Wanted) {
        if self.current.as_ref() == Some(&wanted) {
            return;
        }
        self.generation += 1;
        for tx in &self.wanted {
            tx.send_replace(Some((self.generation, wanted.clone())));
        }
        self.current = Some(wanted);
    }

    /// The content last asked for.
    pub fn wanted(&self) -> Option<&Wanted> {
        self.current.as_ref()
    }

    /// True when every output holds the content last asked for (also when
    /// there are no file outputs).
    pub fn all_applied(&self) -> bool {
        self.current.is_some() && self.applied.iter().all(|g| *g == self.generation)
    }

    /// Waits until some output reports a finished write; returns true when
    /// that made every output hold the wanted content. Pends forever when
    /// there are no outputs.
    pub async fn next_applied(&mut self) -> bool {
        match self.applied_rx.recv().await {
            Some((index, generation)) => {
                self.applied[index] = self.applied[index].max(generation);
                self.all_applied()
            }
            None => std::future::pending().await,
        }
    }

    /// Stops the writers: a write in progress gets `grace` to finish (so a
    /// clean stop leaves no temp file), a stuck one is abandoned.
    pub async fn stop(self, grace: Duration) {
        drop(self.wanted);
        let all = async {
            for task in self.tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("an output write was still running at shutdown; abandoned");
        }
    }
}

struct Writer {
    index: usize,
    sink: Arc<dyn Sink>,
    limits: WriteLimits,
    metrics: Arc<Metrics>,
    applied: mpsc::UnboundedSender<(usize, Generation)>,
    /// Whether this output's last write failed (counted in the gauge).
    failing: bool,
    /// While this output keeps failing: what its log has said so far.
    trouble: Option<Trouble>,
}

/// Why a write failed.
struct Failure {
    /// The cause, as logged.
    cause: String,
    /// The write panicked (or was cancelled) rather than returned an error.
    panicked: bool,
}

impl Failure {
    /// Logs this failure in full.
    fn log(&self, output: &str) {
        if self.panicked {
            tracing::error!(output, cause = %self.cause, "an output write failed; will retry");
        } else {
            tracing::error!(output, cause = %self.cause, "could not update an output; will retry");
        }
    }
}

/// A run of failed writes of one output, as far as the log has told it.
struct Trouble {
    /// Failed tries since the run began.
    tries: u64,
    /// Failed tries not in the log since its last line.
    unreported: u64,
    /// When the last line was logged.
    reported_at: Instant,
    /// The cause the last line gave.
    cause: String,
}

impl Writer {
    async fn run(mut self, mut wanted: watch::Receiver<Option<(Generation, Wanted)>>) {
        self.write_all(&mut wanted).await;
        // Stopped: this output no longer counts as failing.
        self.set_failing(false);
    }

    /// Reports a change of this output's failing state in the gauge.
    fn set_failing(&mut self, failing: bool) {
        if self.failing != failing {
            self.failing = failing;
            self.metrics.output_failing(failing);
        }
    }

    async fn write_all(&mut self, wanted: &mut watch::Receiver<Option<(Generation, Wanted)>>) {
        loop {
            let job = wanted.borrow_and_update().clone();
            let retry = match job {
                None => false,
                Some((generation, job)) => {
                    let failure = self.write(job).await;
                    let ok = failure.is_none();
                    self.report(failure);
                    self.set_failing(!ok);
                    if ok {
                        let _ = self.applied.send((self.index, generation));
                    }
                    !ok
                }
            };
            // The next job: newer content, or (after a failure) a retry.
            if retry {
                tokio::select! {
                    changed = wanted.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(self.limits.retry_interval) => {}
                }
            } else if wanted.changed().await.is_err() {
                return;
            }
        }
    }

    /// Logs a write's outcome sparingly (module docs): a first failure,
    /// or a new cause, in full; further failures in one line per
    /// [`FAILURE_REPORT_INTERVAL`]; the first success after failures.
    fn report(&mut self, failure: Option<Failure>) {
        let output = self.sink.name();
        let now = Instant::now();
        match (failure, &mut self.trouble) {
            (None, None) => {}
            (None, Some(trouble)) => {
                tracing::info!(
                    output,
                    failed_tries = trouble.tries,
                    "output written again after {} failed tries",
                    trouble.tries
                );
                self.trouble = None;
            }
            (Some(failure), None) => {
                failure.log(output);
                self.trouble = Some(Trouble {
                    tries: 1,
                    unreported: 0,
                    reported_at: now,
                    cause: failure.cause,
                });
            }
            (Some(failure), Some(trouble)) => {
                trouble.tries += 1;
                trouble.unreported += 1;
                if failure.cause != trouble.cause {
                    failure.log(output);
                } else if now.duration_since(trouble.reported_at) >= FAILURE_REPORT_INTERVAL {
                    tracing::error!(
                        output,
                        cause = %failure.cause,
                        failed_tries = trouble.unreported,
                        "an output still cannot be updated: {} more failed tries since the last report; will retry",
                        trouble.unreported
                    );
                } else {
                    return;
                }
                trouble.unreported = 0;
                trouble.reported_at = now;
                trouble.cause = failure.cause;
            }
        }
    }

    /// One write on the blocking pool; `None` when it succeeded.
    async fn write(&self, job: Wanted) -> Option<Failure> {
        let sink = self.sink.clone();
        let mut task = tokio::task::spawn_blocking(move || match &job {
            Wanted::Credentials(c) => sink.publish(c),
            Wanted::Withdrawn => sink.withdraw(),
        });
        let name = self.sink.name();
        let joined = match tokio::time::timeout(self.limits.timeout, &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                self.metrics.output_stuck(true);
                tracing::error!(
                    output = name,
                    timeout_seconds = self.limits.timeout.as_secs_f64(),
                    "an output write has not returned (a hung file system?); \
                     the agent goes on polling and serving, and retries once it returns"
                );
                let joined = task.await;
                self.metrics.output_stuck(false);
                tracing::info!(output = name, "the stuck output write returned");
                joined
            }
        };
        match joined {
            Ok(Ok(())) => {
                tracing::debug!(output = name, "output updated");
                None
            }
            Ok(Err(e)) => {
                self.metrics.sink_failed();
                Some(Failure {
                    cause: format!("{e:#}"),
                    panicked: false,
                })
            }
            Err(e) => {
                self.metrics.sink_failed();
                Some(Failure {
                    cause: e.to_string(),
                    panicked: true,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::Credentials;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    fn creds(n: u64) -> RoleCredentials {
        RoleCredentials {
            role: "r".into(),
            credentials: Arc::new(Credentials::new(
                format!("ASIAKEY{n:013}"),
                "secret",
                "token",
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + n),
            )),
        }
    }

    /// A sink whose writes block until the test lets them go, and that
    /// records what it was asked to hold.
    #[derive(Debug, Default)]
    struct Gate {
        open: Mutex<bool>,
        opened: std::sync::Condvar,
        writes: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
        /// Fail with another cause than the full disk.
        other_cause: std::sync::atomic::AtomicBool,
        last: Mutex<Option<Wanted>>,
    }

    impl Gate {
        fn release(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl Sink for Gate {
        fn name(&self) -> &str {
            "gate"
        }
        fn publish(&self, current: &RoleCredentials) -> anyhow::Result<()> {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            self.writes.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                if self.other_cause.load(Ordering::SeqCst) {
                    anyhow::bail!("the directory was made read-only");
                }
                anyhow::bail!("the disk is full");
            }
            *self.last.lock().unwrap() = Some(Wanted::Credentials(current.clone()));
            Ok(())
        }
        fn withdraw(&self) -> anyhow::Result<()> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            *self.last.lock().unwrap() = Some(Wanted::Withdrawn);
            Ok(())
        }
    }

    /// The once-a-minute lines of a failing output among `lines`.
    fn summaries<'a>(lines: &[&'a str]) -> Vec<&'a str> {
        lines
            .iter()
            .copied()
            .filter(|l| l.contains("an output still cannot be updated"))
            .collect()
    }

    /// One output whose every write fails (a full disk), started at the
    /// default limits and asked to publish `creds(1)`.
    fn failing_output() -> (Arc<Metrics>, Arc<Gate>, WriteLimits, Outputs) {
        let metrics = Arc::new(Metrics::default());
        let sink = Arc::new(Gate::default());
        sink.release();
        sink.fail.store(true, Ordering::SeqCst);
        let limits = WriteLimits::default();
        let mut outputs = Outputs::start(vec![sink.clone()], limits, metrics.clone());
        outputs.set(Wanted::Credentials(creds(1)));
        (metrics, sink, limits, outputs)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_output_is_reported_and_the_others_and_the_caller_go_on() {
        let metrics = Arc::new(Metrics::default());
        let stuck = Arc::new(Gate::default());
        let fine = Arc::new(Gate::default());
        fine.release();
        let mut outputs = Outputs::start(
            vec![stuck.clone(), fine.clone()],
            WriteLimits::default(),
            metrics.clone(),
        );
        outputs.set(Wanted::Credentials(creds(1)));
        // The healthy output is written while the other is stuck; `set`
        // never waited for either.
        assert!(
            !outputs.next_applied().await,
            "one output is stuck, so not all hold the credentials"
        );
        assert_eq!(
            *fine.last.lock().unwrap(),
            Some(Wanted::Credentials(creds(1)))
        );
        // Past the write timeout, the stuck output is reported. (A running
        // blocking task keeps tokio's paused clock from moving by itself.)
        tokio::time::advance(WriteLimits::default().timeout + Duration::from_secs(1)).await;
        for _ in 0..1000 {
            if metrics.outputs_stuck() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(metrics.outputs_stuck(), 1, "the stuck output is reported");
        // Newer content is taken by the healthy output at once; the stuck
        // one will write only the newest content, once.
        outputs.set(Wanted::Credentials(creds(2)));
        outputs.set(Wanted::Credentials(creds(3)));
        while *fine.last.lock().unwrap() != Some(Wanted::Credentials(creds(3))) {
            assert!(!outputs.next_applied().await);
        }
        stuck.release();
        while !outputs.next_applied().await {}
        assert_eq!(
            *stuck.last.lock().unwrap(),
            Some(Wanted::Credentials(creds(3)))
        );
        assert_eq!(
            stuck.writes.load(Ordering::SeqCst),
            2,
            "the stuck write, then only the newest content"
        );
        assert_eq!(metrics.outputs_stuck(), 0, "no longer stuck");
        outputs.stop(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_retried_until_it_succeeds() {
        let (metrics, sink, limits, mut outputs) = failing_output();
        tokio::time::sleep(limits.retry_interval * 3 + Duration::from_millis(1)).await;
        let tries = sink.writes.load(Ordering::SeqCst);
        assert!(
            (3..=4).contains(&tries),
            "one try, then one per retry interval: {tries}"
        );
        assert!(!outputs.all_applied());
        assert_eq!(
            metrics.outputs_failing(),
            1,
            "the failing output is counted once, however many tries"
        );
        sink.fail.store(false, Ordering::SeqCst);
        assert!(outputs.next_applied().await, "the retry succeeded");
        assert!(outputs.all_applied());
        assert_eq!(metrics.outputs_failing(), 0, "no longer failing");
        outputs.set(Wanted::Credentials(creds(1)));
        assert!(outputs.all_applied(), "the same content asks for no write");
        outputs.stop(Duration::from_secs(1)).await;
    }

    /// A full disk for ten minutes: every try is counted, but the log gets
    /// the first failure, about one line a minute, and one line when the
    /// output is written again.
    #[tokio::test(start_paused = true)]
    #[tracing_test::traced_test]
    async fn a_failing_output_logs_once_a_minute_and_once_when_it_recovers() {
        let (metrics, sink, limits, mut outputs) = failing_output();
        tokio::time::sleep(Duration::from_secs(600) + Duration::from_millis(1)).await;
        let tries = sink.writes.load(Ordering::SeqCst) as u64;
        assert!(
            (120..=121).contains(&tries),
            "one try every {:?} for ten minutes: {tries}",
            limits.retry_interval
        );
        let failures = metrics
            .render(
                &imds_client::ProviderState::Starting,
                SystemTime::UNIX_EPOCH,
            )
            .lines()
            .find_map(|l| {
                l.strip_prefix("imds_agent_output_failures_total ")?
                    .parse::<u64>()
                    .ok()
            });
        assert_eq!(failures, Some(tries), "every failed try is counted");
        assert_eq!(metrics.outputs_failing(), 1, "still failing");
        sink.fail.store(false, Ordering::SeqCst);
        assert!(outputs.next_applied().await, "the retry succeeded");
        logs_assert(|lines| {
            let count = |text: &str| lines.iter().filter(|l| l.contains(text)).count();
            let first = count("could not update an output; will retry");
            let summaries = summaries(lines);
            let recovered = count("output written again after");
            if first != 1 || !(9..=10).contains(&summaries.len()) || recovered != 1 {
                return Err(format!(
                    "expected the first failure once, 9 or 10 summaries and one recovery line; \
                     saw {first}, {} and {recovered}:\n{}",
                    summaries.len(),
                    lines.join("\n")
                ));
            }
            if !summaries
                .iter()
                .all(|l| l.contains("the disk is full") && l.contains("12 more failed tries"))
            {
                return Err(format!(
                    "expected each summary to give the cause and the 12 tries of its minute: {summaries:#?}"
                ));
            }
            Ok(())
        });
        assert!(
            logs_contain(&format!("output written again after {tries} failed tries")),
            "expected the recovery line to count all {tries} failed tries"
        );
        assert_eq!(metrics.outputs_failing(), 0, "no longer failing");
        outputs.stop(Duration::from_secs(1)).await;
    }

    /// A failure with a new cause is logged in full at once, not left for
    /// the next minute's summary; the summary then gives the new cause.
    #[tokio::test(start_paused = true)]
    #[tracing_test::traced_test]
    async fn a_failing_output_logs_a_new_cause_at_once() {
        let (_metrics, sink, limits, mut outputs) = failing_output();
        assert_eq!(limits.retry_interval, Duration::from_secs(5));
        // Tries at 0, 5, 10, 15 and 20 s fail on the full disk.
        tokio::time::sleep(Duration::from_secs(22)).await;
        assert_eq!(sink.writes.load(Ordering::SeqCst), 5);
        sink.other_cause.store(true, Ordering::SeqCst);
        // The try at 25 s fails for another reason.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(sink.writes.load(Ordering::SeqCst), 6);
        let full_lines = |lines: &[&str], cause: &str| {
            lines
                .iter()
                .filter(|l| {
                    l.contains("could not update an output; will retry") && l.contains(cause)
                })
                .count()
        };
        logs_assert(|lines| {
            let summaries = summaries(lines).len();
            match (
                full_lines(lines, "the disk is full"),
                full_lines(lines, "the directory was made read-only"),
                summaries,
            ) {
                (1, 1, 0) => Ok(()),
                seen => Err(format!(
                    "expected one full line per cause and no summary within the minute; \
                     saw {seen:?}:\n{}",
                    lines.join("\n")
                )),
            }
        });
        // A minute after the new cause was logged, its summary.
        tokio::time::sleep(Duration::from_secs(60)).await;
        logs_assert(|lines| {
            let summaries = summaries(lines);
            if summaries.len() == 1
                && summaries[0].contains("the directory was made read-only")
                && summaries[0].contains("12 more failed tries")
            {
                Ok(())
            } else {
                Err(format!(
                    "expected one summary with the new cause and its 12 tries: {summaries:#?}"
                ))
            }
        });
        sink.fail.store(false, Ordering::SeqCst);
        assert!(outputs.next_applied().await, "the retry succeeded");
        outputs.stop(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn stop_abandons_a_stuck_write_after_the_grace_period() {
        let metrics = Arc::new(Metrics::default());
        let stuck = Arc::new(Gate::default());
        let mut outputs = Outputs::start(vec![stuck.clone()], WriteLimits::default(), metrics);
        outputs.set(Wanted::Withdrawn);
        outputs.set(Wanted::Credentials(creds(1)));
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let grace = Duration::from_millis(300);
        tokio::join!(outputs.stop(grace), tokio::time::advance(grace));
        assert_eq!(
            started.elapsed(),
            grace,
            "stopped when the grace period ended"
        );
        assert_eq!(
            stuck.writes.load(Ordering::SeqCst),
            0,
            "the write is still stuck"
        );
        stuck.release();
    }
}

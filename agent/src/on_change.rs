//! Telling applications about a change: `--on-change CMD` and `--reload-unit UNIT`.
//!
//! Most SDKs read a credentials file once per process, so an application
//! that reads the agent's files does not see a rotation until it restarts.
//! The agent knows the exact moment what the outputs hold changes, so it can
//! run a command then: restart or reload the application, or tell it to
//! re-read its credentials.
//!
//! When: the daemon tells this module what the provider reports
//! ([`OnChange::observe`]) and when every file output holds the wanted
//! content ([`OnChange::applied`]); a run starts only after *every* output
//! has been written. The [`Event`]s are the changes in what the outputs hold:
//! the first credentials, a rotation, a role replacement, a detach, and the
//! recovery after an outage (IMDS failing, then answering again).
//!
//! How, and why so:
//! - No shell: the command is split into words the way systemd splits
//!   `ExecStart=` ([`split_command`]), so a value from the environment file is
//!   never interpreted by a shell, and quoting works as in a unit file.
//! - A minimal environment: `PATH` and the `IMDS_AGENT_*` variables of the
//!   event ([`Change::env`]), never a secret key or session token, and none of
//!   the agent's own environment (which may hold secrets of its own).
//! - Each run is bounded by a timeout; past it the whole process group is
//!   killed (SIGKILL), so a forked helper does not outlive it.
//! - Coalescing: each command has one slot holding the latest change. A burst
//!   of changes while a run is under way (or waits for its turn) gives one
//!   more run, with the latest event, never a queue. At most
//!   [`MAX_CONCURRENT_RUNS`] runs of all commands go at once.
//! - A failed run (non-zero exit, timeout, a program that cannot be started)
//!   is logged and counted (`imds_agent_on_change_runs_total{result}`) and
//!   never stops the agent. Logs name the program (the first word), never
//!   the rest of the command line, which may carry a token of its own.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use imds_client::ProviderState;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::outputs::Wanted;

/// At most this many runs (of all commands together) go at once.
pub const MAX_CONCURRENT_RUNS: usize = 4;

/// `PATH` given to a command when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What changed in what the outputs hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The outputs hold credentials, and held none before (the agent
    /// started, or a role was attached where none was).
    FirstDelivery,
    /// New credentials of the same role.
    Rotation,
    /// Credentials of another role.
    Replacement,
    /// The role was detached: the outputs hold no credentials now.
    Detach,
    /// IMDS answers again after failing; the outputs hold current
    /// credentials (new ones, if they rotated meanwhile).
    Recovery,
}

impl Event {
    /// The value of `IMDS_AGENT_EVENT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::FirstDelivery => "first-delivery",
            Event::Rotation => "rotation",
            Event::Replacement => "replacement",
            Event::Detach => "detach",
            Event::Recovery => "recovery",
        }
    }
}

/// One change, as a command sees it: never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub event: Event,
    /// The role the outputs hold (after a detach: the role detached).
    pub role: String,
    /// The access key id and the expiry (RFC 3339) the outputs hold; none
    /// after a detach.
    pub key: Option<(String, String)>,
}

impl Change {
    /// The command's environment besides `PATH`.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("IMDS_AGENT_EVENT", self.event.as_str().to_owned()),
            ("IMDS_AGENT_ROLE", self.role.clone()),
        ];
        if let Some((key, expiration)) = &self.key {
            env.push(("IMDS_AGENT_ACCESS_KEY_ID", key.clone()));
            env.push(("IMDS_AGENT_EXPIRATION", expiration.clone()));
        }
        env
    }
}

/// Decides which [`Event`] a state of the outputs is: what was last
/// delivered, and whether an outage ended since.
#[derive(Debug, Default)]
struct Tracker {
    delivered: Option<Wanted>,
    outage: bool,
    recovered: bool,
}

impl Tracker {
    /// An outage is a refresh failing (credentials still served, or none
    /// usable); it ends when the provider is healthy again. `healthy` is
    /// [`healthy`] of the provider's state.
    fn observe(&mut self, healthy: Option<bool>) {
        match healthy {
            Some(false) => self.outage = true,
            Some(true) => self.recovered |= std::mem::take(&mut self.outage),
            None => {}
        }
    }

    /// Every output holds `held`: the change to announce, if any. A first
    /// delivery, a replacement and a detach say more than a recovery, which
    /// says more than a rotation.
    fn applied(&mut self, held: Option<&Wanted>) -> Option<Change> {
        let held = held?;
        let recovered = std::mem::take(&mut self.recovered);
        let before = self.delivered.replace(held.clone());
        match (before, held) {
            (Some(Wanted::Credentials(old)), Wanted::Withdrawn) => Some(Change {
                event: Event::Detach,
                role: old.role.to_string(),
                key: None,
            }),
            (_, Wanted::Withdrawn) => None,
            (before, Wanted::Credentials(now)) => {
                let event = match before {
                    None | Some(Wanted::Withdrawn) => Event::FirstDelivery,
                    Some(Wanted::Credentials(old)) if old.role != now.role => Event::Replacement,
                    _ if recovered => Event::Recovery,
                    Some(Wanted::Credentials(old)) if old == *now => return None,
                    Some(Wanted::Credentials(_)) => Event::Rotation,
                };
                Some(Change {
                    event,
                    role: now.role.to_string(),
                    key: Some((
                        now.credentials.access_key_id().to_owned(),
                        now.credentials.expiration_rfc3339(),
                    )),
                })
            }
        }
    }
}

/// Whether IMDS answers as it should (`Some(true)`: credentials refreshed
/// without error, or no role attached), is failing (`Some(false)`), or is
/// not known yet (`None`).
fn healthy(state: &ProviderState) -> Option<bool> {
    match state {
        ProviderState::Active {
            last_error: Some(_),
            ..
        }
        | ProviderState::Unavailable { .. } => Some(false),
        ProviderState::Active {
            last_error: None, ..
        }
        | ProviderState::NoRole => Some(true),
        _ => None,
    }
}

/// A command to run on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    argv: Vec<String>,
}

impl Hook {
    /// `--on-change CMD`: `command` split as systemd splits `ExecStart=`.
    pub fn command(command: &str) -> Result<Self, String> {
        let argv = split_command(command)?;
        if argv.is_empty() {
            return Err("the command is empty: give a program and its arguments".into());
        }
        Ok(Self { argv })
    }

    /// `--reload-unit UNIT`: `systemctl --no-ask-password try-reload-or-restart UNIT`.
    pub fn reload_unit(unit: &str) -> Result<Self, String> {
        if unit.is_empty()
            || unit.starts_with('-')
            || unit.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "{unit:?} is not a unit name: give one such as myapp.service"
            ));
        }
        Ok(Self {
            argv: [
                "systemctl",
                "--no-ask-password",
                "try-reload-or-restart",
                unit,
            ]
            .map(str::to_owned)
            .to_vec(),
        })
    }

    /// The words: program, then arguments.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The program, as logs name it (never the arguments).
    fn program(&self) -> &str {
        &self.argv[0]
    }
}

/// How runs are bounded.
#[derive(Debug, Clone, Copy)]
pub struct HookLimits {
    /// A run still going after this long is killed, with its process group.
    pub timeout: Duration,
}

/// The daemon's end: tells each command's runner about changes.
#[derive(Debug, Default)]
pub struct OnChange {
    tracker: Tracker,
    slots: Vec<watch::Sender<Option<Change>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl OnChange {
    /// Nothing to run.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts one runner per hook. Must be called within a Tokio runtime.
    pub fn start(hooks: Vec<Hook>, limits: HookLimits, metrics: Arc<Metrics>) -> Self {
        let turns = Arc::new(Semaphore::new(MAX_CONCURRENT_RUNS));
        let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
        let mut slots = Vec::with_capacity(hooks.len());
        let mut tasks = Vec::with_capacity(hooks.len());
        for hook in hooks {
            let (tx, rx) = watch::channel(None);
            slots.push(tx);
            tasks.push(tokio::spawn(
                Runner {
                    hook,
                    limits,
                    metrics: metrics.clone(),
                    turns: turns.clone(),
                    path: path.clone(),
                }
                .run(rx),
            ));
        }
        Self {
            tracker: Tracker::default(),
            slots,
            tasks,
        }
    }

    /// What the provider reports now (to notice an outage and its end).
    pub fn observe(&mut self, state: &ProviderState) {
        self.tracker.observe(healthy(state));
    }

    /// Every file output holds `held`: run the commands if that is a change.
    pub fn applied(&mut self, held: Option<&Wanted>) {
        let Some(change) = self.tracker.applied(held) else {
            return;
        };
        if self.slots.is_empty() {
            return;
        }
        tracing::info!(
            event = change.event.as_str(),
            commands = self.slots.len(),
            "running the --on-change commands"
        );
        for slot in &self.slots {
            slot.send_replace(Some(change.clone()));
        }
    }

    /// Stops the runners: a run under way gets `grace` to finish, then it
    /// is killed with its process group.
    pub async fn stop(self, grace: Duration) {
        drop(self.slots);
        let mut tasks = self.tasks;
        let all = async {
            for task in &mut tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("an --on-change command was still running at shutdown; killed");
            for task in &tasks {
                task.abort();
            }
            for task in tasks {
                let _ = task.await;
            }
        }
    }
}

/// Runs one hook whenever its slot holds a new change.
struct Runner {
    hook: Hook,
    limits: HookLimits,
    metrics: Arc<Metrics>,
    turns: Arc<Semaphore>,
    path: String,
}

impl Runner {
    async fn run(self, mut slot: watch::Receiver<Option<Change>>) {
        while slot.changed().await.is_ok() {
            // Wait for a turn first: changes meanwhile replace the one to run.
            let Ok(_turn) = self.turns.acquire().await else {
                return;
            };
            let Some(change) = slot.borrow_and_update().clone() else {
                continue;
            };
            let result = self.run_once(&change).await;
            self.metrics.on_change_run(result);
        }
    }

    /// One run; the result as counted (`ok`, `failed`, `timeout`, `spawn_error`).
    async fn run_once(&self, change: &Change) -> &'static str {
        let program = self.hook.program();
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&self.hook.argv[1..])
            .env_clear()
            .env("PATH", &self.path)
            .envs(change.env())
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        // The command's output goes to the agent's log (stderr), never to
        // the agent's stdout.
        if let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() {
            cmd.stdout(std::process::Stdio::from(stderr));
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                tracing::error!(
                    program,
                    event = change.event.as_str(),
                    cause = %e,
                    "could not start an --on-change command; the agent goes on"
                );
                return "spawn_error";
            }
        };
        // Until the child is reaped its pid (= its process group id) cannot
        // be reused, so killing the group is safe while this guard is armed.
        let mut group = GroupKill(child.id());
        let waited = tokio::time::timeout(self.limits.timeout, child.wait()).await;
        let result = match waited {
            Ok(Ok(status)) => {
                group.0 = None;
                if status.success() {
                    tracing::info!(
                        program,
                        event = change.event.as_str(),
                        "--on-change command done"
                    );
                    "ok"
                } else {
                    tracing::warn!(
                        program,
                        event = change.event.as_str(),
                        %status,
                        "an --on-change command failed; the agent goes on"
                    );
                    "failed"
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(program, cause = %e, "waiting for an --on-change command failed");
                "failed"
            }
            Err(_) => {
                group.kill();
                let _ = child.wait().await;
                tracing::error!(
                    program,
                    event = change.event.as_str(),
                    timeout_seconds = self.limits.timeout.as_secs_f64(),
                    "an --on-change command ran past its timeout: killed it and its process group; \
                     the agent goes on"
                );
                "timeout"
            }
        };
        drop(group);
        result
    }
}

/// Kills a child's process group (SIGKILL) when dropped, unless disarmed
/// (the child was reaped).
struct GroupKill(Option<u32>);

impl GroupKill {
    fn kill(&mut self) {
        if let Some(pid) = self
            .0
            .take()
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Splits `line` into words as systemd splits `ExecStart=` (see
/// systemd.service(5), "Command lines"):
/// - words are separated by unquoted whitespace;
/// - `"..."` and `'...'` wrap a whole word: the opening quote only at the
///   start of a word, the closing quote followed by whitespace or the end;
/// - C-style escapes, inside quotes or not: `\a \b \f \n \r \t \v \\ \" \'`,
///   `\s` (a space), `\xHH`, `\NNN` (octal), `\uHHHH`, `\UHHHHHHHH`.
///
/// Unlike systemd, `$VAR` and `%` specifiers are not expanded (they stay as
/// written), and the `-@:+!` prefixes have no meaning. The error says what
/// is wrong and where.
pub fn split_command(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            return Ok(words);
        };
        let mut word = String::new();
        if first == '"' || first == '\'' {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(format!(
                            "unbalanced quoting: no closing {first} in {line:?}"
                        ));
                    }
                    Some(c) if c == first => break,
                    Some('\\') => word.push(unescape(&mut chars, line)?),
                    Some(c) => word.push(c),
                }
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(format!(
                    "a closing quote must end the word (systemd's rule): {line:?}; quote the whole word"
                ));
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                match c {
                    '\\' => word.push(unescape(&mut chars, line)?),
                    '"' | '\'' => {
                        return Err(format!(
                            "a quote may only open a word (systemd's rule): {line:?}; quote the whole word"
                        ));
                    }
                    c => word.push(c),
                }
            }
        }
        words.push(word);
    }
}

/// The character a C-style escape (after its backslash) stands for.
fn unescape(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    line: &str,
) -> Result<char, String> {
    let bad = |what: &str| format!("{what} in {line:?}; write \\\\ for a backslash");
    let number = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
                  first: Option<u32>,
                  count: usize,
                  radix: u32|
     -> Result<char, String> {
        let mut value = first.unwrap_or(0);
        for _ in 0..count {
            let digit = chars
                .next()
                .and_then(|c| c.to_digit(radix))
                .ok_or_else(|| bad("an escape with too few digits"))?;
            value = value * radix + digit;
        }
        match char::from_u32(value) {
            Some('\0') | None => Err(bad("an escape for no valid character")),
            _ if radix == 8 && value > 0o377 => Err(bad("an octal escape above \\377")),
            Some(c) => Ok(c),
        }
    };
    Ok(match chars.next() {
        Some('a') => '\x07',
        Some('b') => '\x08',
        Some('f') => '\x0c',
        Some('n') => '\n',
        Some('r') => '\r',
        Some('t') => '\t',
        Some('v') => '\x0b',
        Some('s') => ' ',
        Some('\\') => '\\',
        Some('"') => '"',
        Some('\'') => '\'',
        Some('x') => number(chars, None, 2, 16)?,
        Some('u') => number(chars, None, 4, 16)?,
        Some('U') => number(chars, None, 8, 16)?,
        Some(c @ '0'..='7') => number(chars, c.to_digit(8), 2, 8)?,
        Some(_) => return Err(bad("an unknown escape")),
        None => return Err(bad("a backslash at the end")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::{Credentials, RoleCredentials};
    use std::time::SystemTime;

    fn split(line: &str) -> Vec<String> {
        split_command(line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    /// systemd.service(5)'s rules and its own examples.
    #[test]
    fn commands_split_as_systemd_splits_exec_start() {
        assert_eq!(split("/bin/echo one two"), ["/bin/echo", "one", "two"]);
        assert_eq!(
            split("  /bin/echo\tone  \n two "),
            ["/bin/echo", "one", "two"]
        );
        // systemd.service(5): `/bin/echo "one two" three` is two arguments.
        assert_eq!(
            split(r#"/bin/echo "one two" three"#),
            ["/bin/echo", "one two", "three"]
        );
        assert_eq!(split("/bin/echo 'a \"b\" c'"), ["/bin/echo", "a \"b\" c"]);
        assert_eq!(split(r#"echo "" x"#), ["echo", "", "x"]);
        // C escapes, quoted or not; \s is a space.
        assert_eq!(split(r"echo a\sb\tc"), ["echo", "a b\tc"]);
        assert_eq!(split(r#"echo "a\"b\\c\n""#), ["echo", "a\"b\\c\n"]);
        assert_eq!(split(r"echo \x41\101\u00e9\U0001F600"), ["echo", "AAé😀"]);
        // No variables, no specifiers, no shell.
        assert_eq!(
            split("sh -c 'echo $HOME; ls %h'"),
            ["sh", "-c", "echo $HOME; ls %h"]
        );
        assert_eq!(split(""), Vec::<String>::new());
        for bad in [
            r#"echo "unbalanced"#,
            "echo 'no end",
            r#"echo a"b c""#,
            r#"echo "a b"c"#,
            r"echo \q",
            r"echo trailing\",
            r"echo \x4",
            r"echo \x00",
            r"echo \400",
        ] {
            assert!(split_command(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn reload_unit_runs_systemctl_and_refuses_an_option() {
        assert_eq!(
            Hook::reload_unit("app.service").unwrap().argv(),
            [
                "systemctl",
                "--no-ask-password",
                "try-reload-or-restart",
                "app.service"
            ]
        );
        for bad in ["", "--force", "a b", "a\nb"] {
            assert!(Hook::reload_unit(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(Hook::command("   ").is_err());
    }

    fn creds(role: &str, key: &str, expires: u64) -> Wanted {
        Wanted::Credentials(RoleCredentials {
            role: role.into(),
            credentials: Arc::new(Credentials::new(
                key,
                "SECRET",
                "TOKEN",
                SystemTime::UNIX_EPOCH + Duration::from_secs(expires),
            )),
        })
    }

    const OK: Option<bool> = Some(true);
    const FAILING: Option<bool> = Some(false);

    #[test]
    fn health_of_states_without_an_error() {
        let Wanted::Credentials(current) = creds("a", "AKIA1", 2_000) else {
            unreachable!()
        };
        assert_eq!(healthy(&ProviderState::Starting), None);
        assert_eq!(healthy(&ProviderState::NoRole), OK);
        let active = ProviderState::Active {
            current,
            last_error: None,
        };
        assert_eq!(healthy(&active), OK);
    }

    /// The events, as a table of (state seen, what the outputs hold) -> event.
    #[test]
    fn each_change_of_the_outputs_is_one_event() {
        let a1 = creds("a", "AKIA1", 2_000);
        let a2 = creds("a", "AKIA2", 3_000);
        let b1 = creds("b", "AKIAB", 1_000);
        let gone = Wanted::Withdrawn;
        /// (what happens, health seen, what the outputs hold, the event).
        type Step<'a> = (&'a str, Option<bool>, Option<&'a Wanted>, Option<Event>);
        let steps: Vec<Step<'_>> = vec![
            ("starting", None, None, None),
            ("failing from the start", FAILING, None, None),
            ("no role", OK, Some(&gone), None),
            ("attached", OK, Some(&a1), Some(Event::FirstDelivery)),
            ("nothing new", OK, Some(&a1), None),
            ("rotated", OK, Some(&a2), Some(Event::Rotation)),
            ("failing", FAILING, Some(&a2), None),
            ("still failing", FAILING, Some(&a2), None),
            ("recovered", OK, Some(&a2), Some(Event::Recovery)),
            ("only once", OK, Some(&a2), None),
            ("replaced", OK, Some(&b1), Some(Event::Replacement)),
            ("detached", OK, Some(&gone), Some(Event::Detach)),
            ("still detached", OK, Some(&gone), None),
            ("attached again", OK, Some(&a1), Some(Event::FirstDelivery)),
            ("failing", FAILING, Some(&a1), None),
            ("rotated on recovery", OK, Some(&a2), Some(Event::Recovery)),
            ("failing", FAILING, Some(&a2), None),
            (
                "replaced on recovery",
                OK,
                Some(&b1),
                Some(Event::Replacement),
            ),
        ];
        let mut tracker = Tracker::default();
        for (what, health, held, expected) in steps {
            tracker.observe(health);
            let change = tracker.applied(held);
            assert_eq!(change.as_ref().map(|c| c.event), expected, "{what}");
        }
    }

    #[test]
    fn the_environment_names_the_change_and_holds_no_secret() {
        let mut tracker = Tracker::default();
        let a1 = creds("a", "AKIA1", 2_000);
        let change = tracker.applied(Some(&a1)).unwrap();
        let env = change.env();
        assert_eq!(
            env,
            [
                ("IMDS_AGENT_EVENT", "first-delivery".to_owned()),
                ("IMDS_AGENT_ROLE", "a".to_owned()),
                ("IMDS_AGENT_ACCESS_KEY_ID", "AKIA1".to_owned()),
                ("IMDS_AGENT_EXPIRATION", "1970-01-01T00:33:20Z".to_owned()),
            ]
        );
        let detach = tracker.applied(Some(&Wanted::Withdrawn)).unwrap();
        assert_eq!(
            detach.env(),
            [
                ("IMDS_AGENT_EVENT", "detach".to_owned()),
                ("IMDS_AGENT_ROLE", "a".to_owned()),
            ],
            "after a detach: the role detached, and no key"
        );
        for (_, value) in env {
            assert!(!value.contains("SECRET") && !value.contains("TOKEN"));
        }
    }
}

#[cfg(test)]
mod runner_tests {
    use super::*;
    use imds_client::{Credentials, RoleCredentials};
    use std::time::SystemTime;

    /// Waits (real time, at most 60 s) until `check` holds.
    async fn wait_until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..3000 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("expected {what} within 60 s; it never happened");
    }

    fn count(dir: &std::path::Path, prefix: &str) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(prefix)
            })
            .count()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn at_most_four_runs_go_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        // Each run marks itself running, records how many runs it sees,
        // waits for the gate, then unmarks itself.
        let script = format!(
            "touch {d}/running-$$; ls {d} | grep -c running- > {d}/.seen-$$; \
             mv {d}/.seen-$$ {d}/seen-$$; \
             while [ ! -e {d}/gate ]; do sleep 0.02; done; rm {d}/running-$$"
        );
        let hooks = (0..6)
            .map(|_| Hook {
                argv: vec!["/bin/sh".into(), "-c".into(), script.clone()],
            })
            .collect();
        let metrics = Arc::new(Metrics::default());
        let limits = HookLimits {
            timeout: Duration::from_secs(60),
        };
        let mut on_change = OnChange::start(hooks, limits, metrics.clone());
        let held = Wanted::Credentials(RoleCredentials {
            role: "r".into(),
            credentials: Arc::new(Credentials::new(
                "AKIA1",
                "SECRET",
                "TOKEN",
                SystemTime::UNIX_EPOCH + Duration::from_secs(2_000),
            )),
        });
        on_change.applied(Some(&held));
        wait_until("four runs under way", || {
            count(dir.path(), "seen-") == MAX_CONCURRENT_RUNS
        })
        .await;
        std::fs::write(dir.path().join("gate"), "").unwrap();
        wait_until("all six runs", || count(dir.path(), "seen-") == 6).await;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seen-")
            {
                let seen: usize = std::fs::read_to_string(&path)
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                assert!(
                    seen <= MAX_CONCURRENT_RUNS,
                    "a run started while {seen} were under way"
                );
            }
        }
        on_change.stop(Duration::from_secs(60)).await;
        assert!(
            metrics
                .render(&ProviderState::Starting, SystemTime::UNIX_EPOCH)
                .contains("imds_agent_on_change_runs_total{result=\"ok\"} 6"),
            "six runs counted ok"
        );
    }
}

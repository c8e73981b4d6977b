//! The agent's config file: who the local consumers are and what each may do.
//!
//! ```toml
//! unmatched = "deny"                    # or "instance-role" (today's behaviour)
//!
//! [[consumer]]
//! name = "billing"                      # [A-Za-z0-9_.@-]{1,32}; used in the session name
//! uids = [1001]                         # Unix-socket peers (SO_PEERCRED) of this consumer
//! gids = []                             # ... or peers with one of these groups (primary or supplementary)
//! role_arn = "arn:aws:iam::123456789012:role/billing"   # default: the instance role itself
//! session_policy_file = "/etc/imds-agent/billing.json"  # or session_policy = '''{...}'''
//! policy_arns = ["arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"]
//! duration_seconds = 3600               # 900..=3600 (role chaining)
//! credentials_file = "/home/billing/.aws/credentials"
//! json_file = "/run/imds-agent/billing.json"
//! container_token_file = "/run/imds-agent/tokens/billing"
//! source_identity = false               # needs sts:SetSourceIdentity in the trust policy
//! session_tags = false                  # needs sts:TagSession in the trust policy
//! ```
//!
//! # Why it is validated the way it is
//!
//! The file decides which local user gets which permissions, so a mistake in
//! it is a security mistake. It is therefore checked completely before the
//! agent starts, and **every** problem is reported at once (not just the
//! first), each as `FILE:LINE: consumer "NAME", key `KEY`: what is wrong`, so
//! an operator fixes the file in one pass. Line numbers come from the TOML
//! parser's spans ([`toml::de::DeTable`]), which is also why the document is
//! walked by hand rather than deserialized with serde: serde stops at the
//! first error. Unknown keys are errors (a typo such as `uid = [1001]` would
//! otherwise silently hand that user nothing, or the whole role).
//!
//! Cross-consumer rules: names are unique, a uid or a gid belongs to at most
//! one consumer (otherwise which permissions a peer gets would depend on the
//! order of the file), and no two outputs name the same file.
//!
//! `duration_seconds` above 3600 is refused rather than capped: the agent
//! always assumes a role with the instance role's credentials (role
//! chaining), for which STS refuses anything above one hour. A silent cap
//! would make the file say twelve hours while the sessions last one.
//!
//! The config file and a `session_policy_file` are read through
//! [`crate::trust`]: a file (or a directory on its way) that another user
//! could have planted or changed is refused.
//!
//! # Matching a peer to a consumer
//!
//! [`Config::consumer_for`] looks at the peer's uid first, then at its
//! primary gid, then at its supplementary groups, all as the kernel captured
//! them when the peer connected (`SO_PEERCRED` and `SO_PEERGROUPS`, see
//! [`crate::peer_groups`]; never `/proc`, whose pid may by then be another
//! process's). The first rule that matches decides:
//!
//! 1. a consumer listing the peer's uid;
//! 2. else a consumer listing its primary gid;
//! 3. else a consumer listing one of its supplementary groups, if they all
//!    lead to that one consumer. If they lead to **two or more** consumers the
//!    peer is refused ([`Match::Ambiguous`], HTTP 403 naming the groups and
//!    consumers), even with `unmatched = "instance-role"`: picking one would
//!    make a peer's permissions depend on the order of the file, and the
//!    whole role is more than either consumer was meant to get. The fix is
//!    to list the peer's uid (rule 1) or to take it out of one group.
//!
//! A peer that matches nothing gets [`Match::Denied`], unless
//! `unmatched = "instance-role"` gives it [`Match::InstanceRole`]. When the
//! peer's supplementary groups are unknown (`SO_PEERGROUPS` failed: a
//! kernel before Linux 4.13), rule 3 cannot be checked, and a peer that
//! rules 1 and 2 do not match is refused ([`Match::GroupsUnknown`]) if any
//! consumer lists gids, even with `unmatched = "instance-role"`: its groups
//! might make it that consumer's, and the whole role is more than that
//! consumer was meant to get (fail closed).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::de::{DeTable, DeValue};

use crate::trust::{self, Trust};

/// Shortest session STS issues.
pub const MIN_DURATION_SECONDS: u64 = 900;
/// Longest session STS issues to a role whose maximum session is raised.
pub const MAX_DURATION_SECONDS: u64 = 43_200;
/// Longest session STS issues when chaining roles, which the agent always does.
pub const MAX_CHAINED_DURATION_SECONDS: u64 = 3_600;
/// Session length when `duration_seconds` is not set.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(MAX_CHAINED_DURATION_SECONDS);
/// Most managed session policies (`policy_arns`) STS accepts.
pub const MAX_POLICY_ARNS: usize = 10;
/// Most characters of an inline session policy STS accepts (after the agent
/// removes insignificant whitespace).
pub const MAX_SESSION_POLICY_CHARS: usize = 2_048;
/// Longest consumer name (the session name is `<name>@<instance-id>`).
pub const MAX_NAME_LEN: usize = 32;

const TOP_KEYS: &[&str] = &["consumer", "unmatched"];
const CONSUMER_KEYS: &[&str] = &[
    "name",
    "uids",
    "gids",
    "role_arn",
    "session_policy",
    "session_policy_file",
    "policy_arns",
    "duration_seconds",
    "credentials_file",
    "json_file",
    "container_token_file",
    "source_identity",
    "session_tags",
];

/// What a peer that matches no consumer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// HTTP 403: nothing. The default when a config file exists.
    Deny,
    /// The instance role's own credentials (the behaviour without a config file).
    InstanceRole,
}

/// One local consumer and what its sessions may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    /// `[A-Za-z0-9_.@-]{1,32}`, unique in the file.
    pub name: String,
    /// Peers with these uids are this consumer.
    pub uids: Vec<u32>,
    /// Peers with one of these gids as their primary or a supplementary
    /// group are this consumer (when no consumer claims their uid; see the
    /// module docs for the order).
    pub gids: Vec<u32>,
    /// The role to assume; `None`: the instance role itself (with the
    /// session policies narrowing it).
    pub role_arn: Option<String>,
    /// The inline session policy, JSON with insignificant whitespace removed.
    pub session_policy: Option<String>,
    /// Managed session policies (at most [`MAX_POLICY_ARNS`]).
    pub policy_arns: Vec<String>,
    /// Requested session length, 900 s to 3600 s.
    pub duration: Duration,
    /// Where to write an INI credentials file for this consumer.
    pub credentials_file: Option<PathBuf>,
    /// Where to write a `credential_process` JSON file for this consumer.
    pub json_file: Option<PathBuf>,
    /// The token a container presents to get this consumer's credentials.
    pub container_token_file: Option<PathBuf>,
    /// Set `SourceIdentity` on the session (the trust policy must allow
    /// `sts:SetSourceIdentity`).
    pub source_identity: bool,
    /// Tag the session (the trust policy must allow `sts:TagSession`).
    pub session_tags: bool,
}

/// Who a peer is, according to the config ([`Config::consumer_for`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match<'a> {
    /// This consumer's credentials.
    Consumer(&'a Consumer),
    /// No consumer, and `unmatched = "instance-role"`: the whole instance role.
    InstanceRole,
    /// No consumer, and `unmatched = "deny"`: nothing (HTTP 403).
    Denied,
    /// No consumer by uid or primary gid, and the peer's supplementary
    /// groups lead to more than one consumer: nothing (HTTP 403), whatever
    /// `unmatched` says. Each `(gid, consumer)` pair, by gid.
    Ambiguous(Vec<(u32, &'a str)>),
    /// No consumer by uid or primary gid, the peer's supplementary groups
    /// are unknown, and some consumer lists gids: nothing (HTTP 403), whatever
    /// `unmatched` says, since those groups might make it that consumer's.
    GroupsUnknown,
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    path: Option<PathBuf>,
    unmatched: Unmatched,
    consumers: Vec<Consumer>,
    by_uid: HashMap<u32, usize>,
    by_gid: HashMap<u32, usize>,
}

impl Config {
    /// The behaviour without a config file: no consumers, and every allowed
    /// peer gets the instance role.
    pub fn without_file() -> Self {
        Self {
            path: None,
            unmatched: Unmatched::InstanceRole,
            consumers: Vec::new(),
            by_uid: HashMap::new(),
            by_gid: HashMap::new(),
        }
    }

    /// Reads and validates the config file at `path`.
    ///
    /// The file is opened by the rules of [`crate::trust`] (a file or
    /// directory another user could have planted or changed is refused).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_trusted(path).map_err(|message| ConfigError {
            path: path.to_owned(),
            problems: vec![Problem {
                line: None,
                consumer: None,
                key: None,
                message,
            }],
        })?;
        Self::parse(&text, path)
    }

    /// Validates `text` as the config file at `path` (used in messages).
    /// A `session_policy_file` it names is read from disk.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut checker = Checker {
            text,
            problems: Vec::new(),
        };
        let config = checker.document(path);
        if checker.problems.is_empty() {
            Ok(config)
        } else {
            checker.problems.sort_by_key(|p| p.line);
            Err(ConfigError {
                path: path.to_owned(),
                problems: checker.problems,
            })
        }
    }

    /// The file this config came from; `None` for [`Config::without_file`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// What an unmatched peer gets.
    pub fn unmatched(&self) -> Unmatched {
        self.unmatched
    }

    /// Every consumer, in file order.
    pub fn consumers(&self) -> &[Consumer] {
        &self.consumers
    }

    /// The consumer called `name`.
    pub fn consumer(&self, name: &str) -> Option<&Consumer> {
        self.consumers.iter().find(|c| c.name == name)
    }

    /// Every file a consumer names (`credentials_file`, `json_file`,
    /// `container_token_file`) with its consumer and key, to check against
    /// the agent's own outputs.
    pub fn files(&self) -> impl Iterator<Item = (&Consumer, &'static str, &Path)> {
        self.consumers.iter().flat_map(|c| {
            [
                ("credentials_file", &c.credentials_file),
                ("json_file", &c.json_file),
                ("container_token_file", &c.container_token_file),
            ]
            .into_iter()
            .filter_map(move |(key, path)| path.as_deref().map(|p| (c, key, p)))
        })
    }

    /// Every gid a consumer lists: the only supplementary groups of a peer
    /// that [`consumer_for`](Self::consumer_for) looks at.
    pub fn gids(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_gid.keys().copied()
    }

    /// Who the peer with this uid, primary gid (`SO_PEERCRED`) and
    /// supplementary `groups` (`SO_PEERGROUPS`; `None` when unknown) is: the
    /// consumer listing the uid, else the consumer listing the primary gid,
    /// else the one consumer the supplementary groups lead to
    /// ([`Match::Ambiguous`] if they lead to several, [`Match::GroupsUnknown`]
    /// if they are unknown and could), else what `unmatched` says (module docs).
    pub fn consumer_for(&self, uid: u32, gid: u32, groups: Option<&[u32]>) -> Match<'_> {
        let mut index = self
            .by_uid
            .get(&uid)
            .or_else(|| self.by_gid.get(&gid))
            .copied();
        let Some(groups) = groups else {
            return match (index, self.unmatched) {
                (Some(i), _) => Match::Consumer(&self.consumers[i]),
                (None, _) if !self.by_gid.is_empty() => Match::GroupsUnknown,
                (None, Unmatched::InstanceRole) => Match::InstanceRole,
                (None, Unmatched::Deny) => Match::Denied,
            };
        };
        if index.is_none() {
            let mut found: Vec<(u32, usize)> = groups
                .iter()
                .filter_map(|g| Some((*g, *self.by_gid.get(g)?)))
                .collect();
            found.sort_unstable();
            found.dedup();
            match found.as_slice() {
                [] => {}
                [(_, only), rest @ ..] if rest.iter().all(|(_, i)| i == only) => {
                    index = Some(*only);
                }
                _ => {
                    return Match::Ambiguous(
                        found
                            .into_iter()
                            .map(|(g, i)| (g, self.consumers[i].name.as_str()))
                            .collect(),
                    );
                }
            }
        }
        match (index, self.unmatched) {
            (Some(i), _) => Match::Consumer(&self.consumers[i]),
            (None, Unmatched::InstanceRole) => Match::InstanceRole,
            (None, Unmatched::Deny) => Match::Denied,
        }
    }
}

/// Why a config file was refused: every problem found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    path: PathBuf,
    problems: Vec<Problem>,
}

impl ConfigError {
    /// The config file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Each problem, in line order.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid config file {} ({n} problem{}; nothing was started):",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  {}", problem.display(&self.path))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// The consumer it is in: its name, or `#N` (1-based) when it has no valid name.
    pub consumer: Option<String>,
    /// The key it is about.
    pub key: Option<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Problem {
    /// `FILE:LINE: consumer "NAME", key `KEY`: message`.
    pub fn display(&self, path: &Path) -> String {
        let mut out = path.display().to_string();
        if let Some(line) = self.line {
            out.push_str(&format!(":{line}"));
        }
        out.push_str(": ");
        match (&self.consumer, &self.key) {
            (Some(c), Some(k)) => out.push_str(&format!("consumer {c}, key `{k}`: ")),
            (Some(c), None) => out.push_str(&format!("consumer {c}: ")),
            (None, Some(k)) => out.push_str(&format!("key `{k}`: ")),
            (None, None) => {}
        }
        out.push_str(&self.message);
        out
    }
}

/// Reads a small file by the trust rules, as UTF-8.
fn read_trusted(path: &Path) -> Result<String, String> {
    let trust = Trust::agent();
    let opened = trust::open_parent(path, &trust, false).map_err(|e| format!("{e:#}"))?;
    let Some((dir, name)) = opened else {
        return Err(format!(
            "{} does not exist (a directory on its way is missing)",
            path.display()
        ));
    };
    let Some(mut file) = dir.open_file(&name, false).map_err(|e| format!("{e:#}"))? else {
        return Err(format!("{} does not exist", path.display()));
    };
    let bytes = file.read_all(path).map_err(|e| format!("{e:#}"))?;
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

/// Collects problems while walking the document.
struct Checker<'t> {
    text: &'t str,
    problems: Vec<Problem>,
}

/// A consumer as read, with the places of what the cross-checks look at.
struct Read {
    consumer: Consumer,
    label: String,
    name_span: Option<Range<usize>>,
    uid_spans: Vec<(u32, Range<usize>)>,
    gid_spans: Vec<(u32, Range<usize>)>,
    files: Vec<(&'static str, PathBuf, Range<usize>)>,
}

impl Checker<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn problem(
        &mut self,
        span: &Range<usize>,
        consumer: Option<&str>,
        key: Option<&str>,
        message: impl Into<String>,
    ) {
        let line = Some(self.line(span));
        self.problems.push(Problem {
            line,
            consumer: consumer.map(str::to_owned),
            key: key.map(str::to_owned),
            message: message.into(),
        });
    }

    fn document(&mut self, path: &Path) -> Config {
        let mut config = Config::without_file();
        config.path = Some(path.to_owned());
        config.unmatched = Unmatched::Deny;
        let (root, errors) = DeTable::parse_recoverable(self.text);
        if !errors.is_empty() {
            // What a broken document parses to is a guess: report only the
            // syntax errors rather than problems that follow from them.
            for error in errors {
                let span = error.span().unwrap_or(0..0);
                let mut message = format!("TOML syntax: {}", error.message().trim_end());
                let snippet = self.text.get(span.clone()).unwrap_or("").trim();
                if (1..=40).contains(&snippet.len()) && !snippet.contains('\n') {
                    message.push_str(&format!(" (at `{snippet}`)"));
                }
                self.problem(&span, None, None, message);
            }
            return config;
        }
        let root = root.into_inner();
        let mut reads = Vec::new();
        for (key, value) in root.iter() {
            let span = key.span();
            match key.get_ref().as_ref() {
                "unmatched" => match value.get_ref().as_str() {
                    Some("deny") => config.unmatched = Unmatched::Deny,
                    Some("instance-role") => config.unmatched = Unmatched::InstanceRole,
                    _ => self.problem(
                        &value.span(),
                        None,
                        Some("unmatched"),
                        format!(
                            "must be \"deny\" (peers that match no consumer get 403) or \
                             \"instance-role\" (they get the whole instance role), not {}",
                            shown(value.get_ref())
                        ),
                    ),
                },
                "consumer" => match value.get_ref().as_array() {
                    Some(items) if items.iter().all(|i| i.get_ref().is_table()) => {
                        for (index, item) in items.iter().enumerate() {
                            let table = item.get_ref().as_table().expect("checked above");
                            reads.push(self.consumer(index, table, item.span()));
                        }
                    }
                    _ => self.problem(
                        &span,
                        None,
                        Some("consumer"),
                        "must be an array of tables: write each consumer as a `[[consumer]]` \
                         section (two brackets)",
                    ),
                },
                other => {
                    let message = unknown_key(TOP_KEYS);
                    self.problem(&span, None, Some(other), message);
                }
            }
        }
        self.cross_check(&reads);
        for read in reads {
            let index = config.consumers.len();
            for &uid in &read.consumer.uids {
                config.by_uid.entry(uid).or_insert(index);
            }
            for &gid in &read.consumer.gids {
                config.by_gid.entry(gid).or_insert(index);
            }
            config.consumers.push(read.consumer);
        }
        config
    }

    fn consumer(&mut self, index: usize, table: &DeTable<'_>, span: Range<usize>) -> Read {
        let mut read = Read {
            consumer: Consumer {
                name: String::new(),
                uids: Vec::new(),
                gids: Vec::new(),
                role_arn: None,
                session_policy: None,
                policy_arns: Vec::new(),
                duration: DEFAULT_DURATION,
                credentials_file: None,
                json_file: None,
                container_token_file: None,
                source_identity: false,
                session_tags: false,
            },
            label: format!("#{}", index + 1),
            name_span: None,
            uid_spans: Vec::new(),
            gid_spans: Vec::new(),
            files: Vec::new(),
        };
        // The name first: every other message names the consumer by it.
        match table.get("name") {
            None => self.problem(
                &span,
                Some(&read.label.clone()),
                Some("name"),
                "is missing: every consumer needs a name ([A-Za-z0-9_.@-], 1 to 32 characters)",
            ),
            Some(value) => match value.get_ref().as_str() {
                Some(name) if valid_name(name) => {
                    read.consumer.name = name.to_owned();
                    read.label = format!("{name:?}");
                    read.name_span = Some(value.span());
                }
                _ => self.problem(
                    &value.span(),
                    Some(&read.label.clone()),
                    Some("name"),
                    format!(
                        "{} is not a valid name: use 1 to 32 of A-Z a-z 0-9 _ . @ - \
                         (it becomes part of the STS session name)",
                        shown(value.get_ref())
                    ),
                ),
            },
        }
        let label = read.label.clone();
        let mut policy_span = None;
        let mut policy_file_span = None;
        for (key, value) in table.iter() {
            let key_name: &str = key.get_ref().as_ref();
            let v = value.get_ref();
            let vspan = value.span();
            let bad = |checker: &mut Self, message: String| {
                checker.problem(&vspan, Some(&label), Some(key_name), message)
            };
            match key_name {
                "name" => {}
                "uids" | "gids" => {
                    let what = if key_name == "uids" { "uid" } else { "gid" };
                    let Some(items) = v.as_array() else {
                        bad(self, format!("must be an array of {what}s, like [1001]"));
                        continue;
                    };
                    for item in items.iter() {
                        match integer(item.get_ref()).and_then(|n| u32::try_from(n).ok()) {
                            Some(id) if id != u32::MAX => {
                                if key_name == "uids" {
                                    read.consumer.uids.push(id);
                                    read.uid_spans.push((id, item.span()));
                                } else {
                                    read.consumer.gids.push(id);
                                    read.gid_spans.push((id, item.span()));
                                }
                            }
                            _ => self.problem(
                                &item.span(),
                                Some(&label),
                                Some(key_name),
                                format!(
                                    "{} is not a {what}: use a number from 0 to 4294967294",
                                    shown(item.get_ref())
                                ),
                            ),
                        }
                    }
                }
                "role_arn" => match v.as_str() {
                    Some(arn) => match check_arn(arn, "role") {
                        Ok(()) => read.consumer.role_arn = Some(arn.to_owned()),
                        Err(why) => bad(self, why),
                    },
                    None => bad(
                        self,
                        "must be a string, like \"arn:aws:iam::123456789012:role/billing\"".into(),
                    ),
                },
                "policy_arns" => {
                    let Some(items) = v.as_array() else {
                        bad(self, "must be an array of policy ARNs".into());
                        continue;
                    };
                    if items.len() > MAX_POLICY_ARNS {
                        bad(
                            self,
                            format!(
                                "lists {} policies; STS accepts at most {MAX_POLICY_ARNS} \
                                 managed session policies. Fix: combine some into one policy",
                                items.len()
                            ),
                        );
                    }
                    for item in items.iter() {
                        let checked = match item.get_ref().as_str() {
                            Some(arn) => check_arn(arn, "policy").map(|()| arn),
                            None => Err(format!("{} is not a string", shown(item.get_ref()))),
                        };
                        match checked {
                            Ok(arn) if read.consumer.policy_arns.iter().any(|a| a == arn) => self
                                .problem(
                                    &item.span(),
                                    Some(&label),
                                    Some(key_name),
                                    format!("{arn} is listed twice"),
                                ),
                            Ok(arn) => read.consumer.policy_arns.push(arn.to_owned()),
                            Err(why) => {
                                self.problem(&item.span(), Some(&label), Some(key_name), why)
                            }
                        }
                    }
                }
                "session_policy" => {
                    policy_span = Some(key.span());
                    match v.as_str() {
                        Some(text) => match check_policy(text) {
                            Ok(compact) => read.consumer.session_policy = Some(compact),
                            Err(why) => bad(self, why),
                        },
                        None => bad(self, "must be a string holding a JSON policy (a '''literal''' string needs no escaping)".into()),
                    }
                }
                "session_policy_file" => {
                    policy_file_span = Some(key.span());
                    match v.as_str().map(absolute_path) {
                        Some(Ok(path)) => match read_trusted(&path).and_then(|t| {
                            check_policy(&t).map_err(|why| format!("{}: {why}", path.display()))
                        }) {
                            Ok(compact) => read.consumer.session_policy = Some(compact),
                            Err(why) => bad(self, why),
                        },
                        Some(Err(why)) => bad(self, why),
                        None => bad(
                            self,
                            "must be a string: the absolute path of a JSON policy".into(),
                        ),
                    }
                }
                "duration_seconds" => match integer(v) {
                    Some(n)
                        if !(MIN_DURATION_SECONDS as i64..=MAX_DURATION_SECONDS as i64)
                            .contains(&n) =>
                    {
                        bad(
                            self,
                            format!(
                                "{n} is outside STS's range of {MIN_DURATION_SECONDS} to \
                                 {MAX_DURATION_SECONDS} seconds, and the agent's sessions are at \
                                 most {MAX_CHAINED_DURATION_SECONDS}. Fix: a value from \
                                 {MIN_DURATION_SECONDS} to {MAX_CHAINED_DURATION_SECONDS}"
                            ),
                        )
                    }
                    Some(n) if n > MAX_CHAINED_DURATION_SECONDS as i64 => bad(
                        self,
                        format!(
                            "{n} is more than {MAX_CHAINED_DURATION_SECONDS}: the agent assumes \
                             roles with the instance role's credentials (role chaining), and STS \
                             refuses sessions longer than one hour for chained roles, whatever \
                             the role's maximum session duration. Fix: at most \
                             {MAX_CHAINED_DURATION_SECONDS} (the agent refreshes before expiry)"
                        ),
                    ),
                    Some(n) => read.consumer.duration = Duration::from_secs(n as u64),
                    None => bad(
                        self,
                        format!("{} is not a whole number of seconds", shown(v)),
                    ),
                },
                "credentials_file" | "json_file" | "container_token_file" => {
                    let key_static = CONSUMER_KEYS
                        .iter()
                        .copied()
                        .find(|k| *k == key_name)
                        .expect("matched above");
                    match v.as_str().map(absolute_path) {
                        Some(Ok(path)) => {
                            read.files.push((key_static, path.clone(), vspan.clone()));
                            let slot = match key_name {
                                "credentials_file" => &mut read.consumer.credentials_file,
                                "json_file" => &mut read.consumer.json_file,
                                _ => &mut read.consumer.container_token_file,
                            };
                            *slot = Some(path);
                        }
                        Some(Err(why)) => bad(self, why),
                        None => bad(self, "must be a string: an absolute path".into()),
                    }
                }
                "source_identity" | "session_tags" => match v.as_bool() {
                    Some(yes) if key_name == "source_identity" => {
                        read.consumer.source_identity = yes
                    }
                    Some(yes) => read.consumer.session_tags = yes,
                    None => bad(self, format!("must be true or false, not {}", shown(v))),
                },
                other => {
                    let message = unknown_key(CONSUMER_KEYS);
                    self.problem(&key.span(), Some(&label), Some(other), message);
                }
            }
        }
        if let (Some(_), Some(span)) = (policy_span, policy_file_span) {
            self.problem(
                &span,
                Some(&label),
                Some("session_policy_file"),
                "is set together with `session_policy`: give the session policy inline or in \
                 a file, not both",
            );
        }
        read
    }

    fn cross_check(&mut self, reads: &[Read]) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut uids: HashMap<u32, (usize, usize)> = HashMap::new();
        let mut gids: HashMap<u32, (usize, usize)> = HashMap::new();
        let mut files: HashMap<&Path, (usize, &'static str, usize)> = HashMap::new();
        for (i, read) in reads.iter().enumerate() {
            if let Some(span) = &read.name_span {
                let line = self.line(span);
                if let Some(first) = names.insert(&read.consumer.name, line) {
                    self.problem(
                        span,
                        Some(&read.label),
                        Some("name"),
                        format!(
                            "is used by another consumer too (line {first}): names must be unique"
                        ),
                    );
                    names.insert(&read.consumer.name, first);
                }
            }
            for (ids, spans, what, key) in [
                (&mut uids, &read.uid_spans, "uid", "uids"),
                (&mut gids, &read.gid_spans, "gid", "gids"),
            ] {
                for (id, span) in spans {
                    let line = self.line(span);
                    match ids.get(id) {
                        None => {
                            ids.insert(*id, (i, line));
                        }
                        Some(&(j, first)) => {
                            let message = if j == i {
                                format!("{what} {id} is listed twice (line {first})")
                            } else {
                                format!(
                                    "{what} {id} is already mapped to consumer {} (line \
                                     {first}): a {what} belongs to one consumer only",
                                    reads[j].label
                                )
                            };
                            self.problem(span, Some(&read.label), Some(key), message);
                        }
                    }
                }
            }
            for (key, path, span) in &read.files {
                let line = self.line(span);
                match files.get(path.as_path()) {
                    None => {
                        files.insert(path, (i, key, line));
                    }
                    Some(&(j, other_key, first)) => {
                        let owner = if j == i {
                            "this consumer".to_owned()
                        } else {
                            format!("consumer {}", reads[j].label)
                        };
                        let message = format!(
                            "{} is also the `{other_key}` of {owner} (line {first}): each \
                             output needs a file of its own",
                            path.display()
                        );
                        self.problem(span, Some(&read.label), Some(key), message);
                    }
                }
            }
        }
    }
}

fn unknown_key(known: &[&str]) -> String {
    format!(
        "unknown key (a typo?); the keys here are: {}",
        known.join(", ")
    )
}

/// A TOML value as shown in a message (strings quoted, tables and arrays by kind).
fn shown(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => format!("{:?}", s.as_ref()),
        DeValue::Integer(i) if i.radix() == 10 => i.as_str().to_owned(),
        DeValue::Boolean(b) => b.to_string(),
        other => format!("a {}", other.type_str()),
    }
}

fn integer(value: &DeValue<'_>) -> Option<i64> {
    let int = value.as_integer()?;
    i64::from_str_radix(int.as_str(), int.radix()).ok()
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}

/// An absolute path without `.`/`..` tricks, normalized (so two spellings of
/// one file compare equal).
fn absolute_path(text: &str) -> Result<PathBuf, String> {
    let path = Path::new(text);
    if !path.is_absolute() {
        return Err(format!(
            "{text:?} is not an absolute path: write it from / on"
        ));
    }
    if text.contains('\0') {
        return Err(format!("{text:?} contains a NUL character"));
    }
    if text.ends_with('/') {
        return Err(format!("{text:?} names a directory: name a file"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{text:?} contains `..`: write the path without it"));
    }
    Ok(path.components().collect())
}

/// Checks an ARN's shape: `arn:PARTITION:iam::ACCOUNT:KIND/[PATH/]NAME`.
/// For a role the account is 12 digits; for a policy it may also be `aws`
/// (AWS managed policies).
fn check_arn(arn: &str, kind: &str) -> Result<(), String> {
    let example = if kind == "role" {
        "arn:aws:iam::123456789012:role/billing"
    } else {
        "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"
    };
    let bad = |why: &str| {
        Err(format!(
            "{arn:?} is not an IAM {kind} ARN ({why}); expected the shape {example:?}"
        ))
    };
    if arn.len() > 2048 {
        return bad("longer than 2048 characters");
    }
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts[..] else {
        return bad("it needs six parts separated by `:`");
    };
    if prefix != "arn" {
        return bad("it must start with `arn:`");
    }
    let partition_ok = partition == "aws"
        || partition.strip_prefix("aws-").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .split('-')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        });
    if !partition_ok {
        return bad("the partition must be `aws` or `aws-...`");
    }
    if service != "iam" {
        return bad("the service must be `iam`");
    }
    if !region.is_empty() {
        return bad("IAM ARNs have no region: the fourth part is empty (`iam::`)");
    }
    let account_ok = (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()))
        || (kind == "policy" && account == "aws");
    if !account_ok {
        return bad(if kind == "role" {
            "the account must be 12 digits"
        } else {
            "the account must be 12 digits, or `aws` for an AWS managed policy"
        });
    }
    let Some(rest) = resource
        .strip_prefix(kind)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return bad(&format!("the resource must start with `{kind}/`"));
    };
    let (path, name) = match rest.rfind('/') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => ("", rest),
    };
    let max_name = if kind == "role" { 64 } else { 128 };
    let name_ok = (1..=max_name).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
    if !name_ok {
        return bad(&format!(
            "the {kind} name must be 1 to {max_name} of A-Z a-z 0-9 + = , . @ _ -"
        ));
    }
    if path.len() > 510 || !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return bad("the path must be printable ASCII without spaces");
    }
    Ok(())
}

/// Checks a session policy and returns it with insignificant whitespace
/// removed (STS counts every character of the plaintext).
fn check_policy(text: &str) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "the session policy is not valid JSON ({:?} error at line {} column {} of the policy)",
            e.classify(),
            e.line(),
            e.column()
        )
    })?;
    if !value.is_object() {
        return Err(
            "the session policy must be a JSON object ({\"Version\": ..., \"Statement\": [...]})"
                .into(),
        );
    }
    let compact = compact_json(text);
    if let Some(c) = compact
        .chars()
        .find(|&c| !matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{ff}'))
    {
        return Err(format!(
            "the session policy contains {c:?} (U+{:04X}); STS accepts only characters up to \
             U+00FF in a policy",
            c as u32
        ));
    }
    let chars = compact.chars().count();
    if chars > MAX_SESSION_POLICY_CHARS {
        return Err(format!(
            "the session policy is {chars} characters without whitespace; STS accepts at most \
             {MAX_SESSION_POLICY_CHARS}. Fix: shorten it, or move statements into a managed \
             policy listed in `policy_arns`"
        ));
    }
    Ok(compact)
}

/// Valid JSON without whitespace outside strings.
fn compact_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const FILE: &str = "/etc/imds-agent/agent.toml";

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, Path::new(FILE)) {
            Ok(config) => panic!("expected problems, but the config was accepted: {config:?}"),
            Err(e) => e
                .problems()
                .iter()
                .map(|p| p.display(Path::new(FILE)))
                .collect(),
        }
    }

    /// A policy file in a directory the agent trusts.
    fn policy_dir(policy: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("billing.json");
        std::fs::write(&path, policy).expect("write policy");
        (dir, path)
    }

    const POLICY: &str = r#"{
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::bills/*"}]
    }"#;

    #[test]
    fn a_good_three_consumer_config_is_read_whole() {
        let (_dir, policy_file) = policy_dir(POLICY);
        let text = format!(
            r#"
unmatched = "deny"

[[consumer]]
name = "billing"
uids = [1001]
role_arn = "arn:aws:iam::123456789012:role/billing"
session_policy_file = "{}"
policy_arns = ["arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"]
duration_seconds = 900
credentials_file = "/home/billing/.aws/credentials"
json_file = "/run/imds-agent/billing.json"

[[consumer]]
name = "log-shipper"
gids = [2000, 2001]
session_policy = '''
{{"Version": "2012-10-17",
  "Statement": [{{"Effect": "Allow", "Action": "logs:PutLogEvents", "Resource": "*"}}]}}
'''
source_identity = true
session_tags = true

[[consumer]]
name = "web@app.v2"
uids = [1002, 1003]
container_token_file = "/run/imds-agent/tokens/web"
"#,
            policy_file.display()
        );
        let config = Config::parse(&text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.path(), Some(Path::new(FILE)));
        assert_eq!(config.unmatched(), Unmatched::Deny);
        let names: Vec<&str> = config.consumers().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["billing", "log-shipper", "web@app.v2"]);

        let billing = config.consumer("billing").expect("billing");
        assert_eq!(billing.uids, [1001]);
        assert_eq!(
            billing.role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/billing")
        );
        assert_eq!(
            billing.session_policy.as_deref(),
            Some(
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::bills/*"}]}"#
            ),
            "the policy file's JSON, without insignificant whitespace"
        );
        assert_eq!(
            billing.policy_arns,
            ["arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"]
        );
        assert_eq!(billing.duration, Duration::from_secs(900));
        assert_eq!(
            billing.credentials_file.as_deref(),
            Some(Path::new("/home/billing/.aws/credentials"))
        );
        assert_eq!(
            billing.json_file.as_deref(),
            Some(Path::new("/run/imds-agent/billing.json"))
        );
        assert!(!billing.source_identity && !billing.session_tags);

        let shipper = config.consumer("log-shipper").expect("log-shipper");
        assert_eq!(shipper.gids, [2000, 2001]);
        assert_eq!(shipper.role_arn, None, "default: the instance role itself");
        assert_eq!(
            shipper.session_policy.as_deref(),
            Some(
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"logs:PutLogEvents","Resource":"*"}]}"#
            )
        );
        assert_eq!(shipper.duration, DEFAULT_DURATION);
        assert!(shipper.source_identity && shipper.session_tags);

        let files: Vec<(&str, &str, &Path)> = config
            .files()
            .map(|(c, key, path)| (c.name.as_str(), key, path))
            .collect();
        assert_eq!(
            files,
            [
                (
                    "billing",
                    "credentials_file",
                    Path::new("/home/billing/.aws/credentials")
                ),
                (
                    "billing",
                    "json_file",
                    Path::new("/run/imds-agent/billing.json")
                ),
                (
                    "web@app.v2",
                    "container_token_file",
                    Path::new("/run/imds-agent/tokens/web")
                ),
            ]
        );

        let web = config.consumer("web@app.v2").expect("web");
        assert_eq!(
            web.container_token_file.as_deref(),
            Some(Path::new("/run/imds-agent/tokens/web"))
        );
        assert_eq!(web.session_policy, None);
        assert!(web.policy_arns.is_empty());
    }

    #[test]
    fn peers_match_by_uid_first_then_gid_else_unmatched() {
        let text = r#"
[[consumer]]
name = "billing"
uids = [1001]
[[consumer]]
name = "shipper"
gids = [2000]
"#;
        let config = Config::parse(text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"));
        let name = |m: Match<'_>| match m {
            Match::Consumer(c) => c.name.clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(name(config.consumer_for(1001, 100, Some(&[]))), "billing");
        assert_eq!(
            name(config.consumer_for(1001, 2000, Some(&[]))),
            "billing",
            "the uid wins over the gid"
        );
        assert_eq!(name(config.consumer_for(1500, 2000, Some(&[]))), "shipper");
        assert_eq!(
            config.consumer_for(1500, 100, Some(&[])),
            Match::Denied,
            "with a config file, unmatched defaults to deny"
        );

        let open = format!("unmatched = \"instance-role\"\n{text}");
        let config = Config::parse(&open, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.consumer_for(1500, 100, Some(&[])),
            Match::InstanceRole
        );
        assert_eq!(name(config.consumer_for(1001, 100, Some(&[]))), "billing");

        let none = Config::without_file();
        assert_eq!(
            none.consumer_for(0, 0, Some(&[])),
            Match::InstanceRole,
            "today's behaviour"
        );
        assert!(none.consumers().is_empty() && none.path().is_none());
    }

    #[test]
    fn supplementary_groups_match_after_uid_and_primary_gid_and_never_two_consumers() {
        let text = r#"
[[consumer]]
name = "billing"
uids = [1001]
gids = [3000]
[[consumer]]
name = "shipper"
gids = [2000, 2001]
"#;
        let config = Config::parse(text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"));
        let name = |m: Match<'_>| match m {
            Match::Consumer(c) => c.name.clone(),
            other => format!("{other:?}"),
        };
        // A supplementary group is enough; two groups of one consumer are one match.
        assert_eq!(
            name(config.consumer_for(1500, 100, Some(&[2000]))),
            "shipper"
        );
        assert_eq!(
            name(config.consumer_for(1500, 100, Some(&[7, 2000, 2001]))),
            "shipper"
        );
        // Groups of two consumers: refused, naming each group and consumer.
        assert_eq!(
            config.consumer_for(1500, 100, Some(&[3000, 2001, 9])),
            Match::Ambiguous(vec![(2001, "shipper"), (3000, "billing")])
        );
        // The uid, then the primary gid, decide before supplementary groups.
        assert_eq!(
            name(config.consumer_for(1001, 100, Some(&[2000, 3000]))),
            "billing"
        );
        assert_eq!(
            name(config.consumer_for(1500, 2000, Some(&[2000, 3000]))),
            "shipper",
            "the primary gid wins over supplementary groups"
        );
        // Unknown groups (an old kernel) or unlisted ones: unmatched.
        assert_eq!(config.consumer_for(1500, 100, Some(&[4000])), Match::Denied);
        // Ambiguity is refused even where unmatched peers get the whole role.
        let open = format!("unmatched = \"instance-role\"\n{text}");
        let config = Config::parse(&open, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.consumer_for(1500, 100, Some(&[4000])),
            Match::InstanceRole
        );
        assert!(
            matches!(
                config.consumer_for(1500, 100, Some(&[2000, 3000])),
                Match::Ambiguous(_)
            ),
            "two consumers' groups never fall back to the instance role"
        );
    }

    /// A peer whose supplementary groups could not be read is never given
    /// the whole instance role while a consumer's gids might have claimed
    /// it (fail closed); the uid and primary gid still decide as before.
    #[test]
    fn unknown_groups_never_widen_a_peer_to_the_instance_role() {
        let text = r#"
unmatched = "instance-role"
[[consumer]]
name = "billing"
uids = [1001]
[[consumer]]
name = "shipper"
gids = [2000]
"#;
        let config = Config::parse(text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.consumer_for(1500, 100, None),
            Match::GroupsUnknown,
            "a peer that may be in gid 2000 (shipper) must not get the whole role"
        );
        assert!(matches!(
            config.consumer_for(1001, 100, None),
            Match::Consumer(c) if c.name == "billing"
        ));
        assert!(matches!(
            config.consumer_for(1500, 2000, None),
            Match::Consumer(c) if c.name == "shipper"
        ));
        // No consumer lists gids: groups cannot matter.
        let by_uid =
            "unmatched = \"instance-role\"\n[[consumer]]\nname = \"billing\"\nuids = [1001]\n";
        let config = Config::parse(by_uid, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.consumer_for(1500, 100, None), Match::InstanceRole);
        assert_eq!(
            Config::without_file().consumer_for(0, 0, None),
            Match::InstanceRole
        );
    }

    #[test]
    fn every_problem_is_reported_with_file_line_and_key() {
        // (config, the exact problems expected); each config holds one
        // mistake or one pair of clashing entries.
        let cases: &[(&str, &[&str])] = &[
            (
                "unmatched = \"allow\"\n",
                &[
                    "/etc/imds-agent/agent.toml:1: key `unmatched`: must be \"deny\" (peers that match no consumer get 403) or \"instance-role\" (they get the whole instance role), not \"allow\"",
                ],
            ),
            (
                "unmatch = \"deny\"\n",
                &[
                    "/etc/imds-agent/agent.toml:1: key `unmatch`: unknown key (a typo?); the keys here are: consumer, unmatched",
                ],
            ),
            (
                "[consumer]\nname = \"a\"\n",
                &[
                    "/etc/imds-agent/agent.toml:1: key `consumer`: must be an array of tables: write each consumer as a `[[consumer]]` section (two brackets)",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nuid = [1001]\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `uid`: unknown key (a typo?); the keys here are: name, uids, gids, role_arn, session_policy, session_policy_file, policy_arns, duration_seconds, credentials_file, json_file, container_token_file, source_identity, session_tags",
                ],
            ),
            (
                "[[consumer]]\nuids = [1]\n",
                &[
                    "/etc/imds-agent/agent.toml:1: consumer #1, key `name`: is missing: every consumer needs a name ([A-Za-z0-9_.@-], 1 to 32 characters)",
                ],
            ),
            (
                "[[consumer]]\nname = \"bad name\"\n",
                &[
                    "/etc/imds-agent/agent.toml:2: consumer #1, key `name`: \"bad name\" is not a valid name: use 1 to 32 of A-Z a-z 0-9 _ . @ - (it becomes part of the STS session name)",
                ],
            ),
            (
                "[[consumer]]\nname = \"a23456789012345678901234567890123\"\n",
                &[
                    "/etc/imds-agent/agent.toml:2: consumer #1, key `name`: \"a23456789012345678901234567890123\" is not a valid name: use 1 to 32 of A-Z a-z 0-9 _ . @ - (it becomes part of the STS session name)",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nuids = [\n  1001,\n  -1,\n]\n",
                &[
                    "/etc/imds-agent/agent.toml:5: consumer \"a\", key `uids`: -1 is not a uid: use a number from 0 to 4294967294",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\ngids = \"2000\"\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `gids`: must be an array of gids, like [1001]",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nrole_arn = \"arn:aws:iam::12345:role/x\"\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `role_arn`: \"arn:aws:iam::12345:role/x\" is not an IAM role ARN (the account must be 12 digits); expected the shape \"arn:aws:iam::123456789012:role/billing\"",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:user/x\"\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `role_arn`: \"arn:aws:iam::123456789012:user/x\" is not an IAM role ARN (the resource must start with `role/`); expected the shape \"arn:aws:iam::123456789012:role/billing\"",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\npolicy_arns = [\"arn:aws:s3:::bucket\"]\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `policy_arns`: \"arn:aws:s3:::bucket\" is not an IAM policy ARN (the service must be `iam`); expected the shape \"arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess\"",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nduration_seconds = 7200\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `duration_seconds`: 7200 is more than 3600: the agent assumes roles with the instance role's credentials (role chaining), and STS refuses sessions longer than one hour for chained roles, whatever the role's maximum session duration. Fix: at most 3600 (the agent refreshes before expiry)",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nduration_seconds = 60\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `duration_seconds`: 60 is outside STS's range of 900 to 43200 seconds, and the agent's sessions are at most 3600. Fix: a value from 900 to 3600",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nsession_policy = \"{not json\"\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `session_policy`: the session policy is not valid JSON (Syntax error at line 1 column 2 of the policy)",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nsession_policy = \"{}\"\nsession_policy_file = \"/etc/p.json\"\n",
                &[
                    // The file is still read and checked: every problem at once.
                    "/etc/imds-agent/agent.toml:4: consumer \"a\", key `session_policy_file`: /etc/p.json does not exist",
                    "/etc/imds-agent/agent.toml:4: consumer \"a\", key `session_policy_file`: is set together with `session_policy`: give the session policy inline or in a file, not both",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\njson_file = \"run/a.json\"\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `json_file`: \"run/a.json\" is not an absolute path: write it from / on",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nsession_tags = \"yes\"\n",
                &[
                    "/etc/imds-agent/agent.toml:3: consumer \"a\", key `session_tags`: must be true or false, not \"yes\"",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\n\n[[consumer]]\nname = \"a\"\n",
                &[
                    "/etc/imds-agent/agent.toml:5: consumer \"a\", key `name`: is used by another consumer too (line 2): names must be unique",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nuids = [1001]\n\n[[consumer]]\nname = \"b\"\nuids = [7, 1001]\n",
                &[
                    "/etc/imds-agent/agent.toml:7: consumer \"b\", key `uids`: uid 1001 is already mapped to consumer \"a\" (line 3): a uid belongs to one consumer only",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\ngids = [50]\n\n[[consumer]]\nname = \"b\"\ngids = [50]\n",
                &[
                    "/etc/imds-agent/agent.toml:7: consumer \"b\", key `gids`: gid 50 is already mapped to consumer \"a\" (line 3): a gid belongs to one consumer only",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\njson_file = \"/run/x\"\n\n[[consumer]]\nname = \"b\"\ncredentials_file = \"/run/./x\"\n",
                &[
                    "/etc/imds-agent/agent.toml:7: consumer \"b\", key `credentials_file`: /run/x is also the `json_file` of consumer \"a\" (line 3): each output needs a file of its own",
                ],
            ),
            (
                "[[consumer]]\nname = \"a\"\nuids = [1]\nuids = [2]\n",
                &["/etc/imds-agent/agent.toml:4: TOML syntax: duplicate key (at `uids`)"],
            ),
            (
                "[[consumer]]\nname = \"a\"\nuids = [1\n",
                &["/etc/imds-agent/agent.toml:3: TOML syntax: unclosed array, expected `]`"],
            ),
        ];
        let mut failures = Vec::new();
        for (text, expected) in cases {
            let got = problems(text);
            if got != *expected {
                failures.push(format!(
                    "config:\n{text}\nexpected: {expected:#?}\ngot: {got:#?}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    #[test]
    fn all_problems_are_reported_at_once_in_line_order() {
        let text = "unmatched = \"nope\"\n[[consumer]]\nname = \"a\"\nuids = [\"x\"]\nduration_seconds = 99999\nbogus = 1\n";
        let error = Config::parse(text, Path::new(FILE)).expect_err("four problems");
        let lines: Vec<Option<usize>> = error.problems().iter().map(|p| p.line).collect();
        assert_eq!(lines, [Some(1), Some(4), Some(5), Some(6)], "{error}");
        let shown = error.to_string();
        assert!(
            shown.starts_with(
                "invalid config file /etc/imds-agent/agent.toml (4 problems; nothing was started):\n  /etc/imds-agent/agent.toml:1: key `unmatched`"
            ),
            "{shown}"
        );
    }

    #[test]
    fn too_many_policy_arns_and_a_long_policy_are_refused_before_any_call() {
        let arns: Vec<String> = (0..11)
            .map(|i| format!("\"arn:aws:iam::aws:policy/P{i}\""))
            .collect();
        let text = format!(
            "[[consumer]]\nname = \"a\"\npolicy_arns = [{}]\n",
            arns.join(", ")
        );
        assert_eq!(
            problems(&text),
            [
                "/etc/imds-agent/agent.toml:3: consumer \"a\", key `policy_arns`: lists 11 policies; STS accepts at most 10 managed session policies. Fix: combine some into one policy"
            ]
        );
        let long = format!(r#"{{"Version":"2012-10-17","Sid":"{}"}}"#, "x".repeat(2100));
        let text = format!("[[consumer]]\nname = \"a\"\nsession_policy = '{long}'\n");
        let got = problems(&text);
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(
            got[0].contains(
                "key `session_policy`: the session policy is 2133 characters without whitespace; STS accepts at most 2048"
            ),
            "{got:#?}"
        );
    }

    #[test]
    fn arns_of_any_partition_and_with_paths_are_accepted() {
        for arn in [
            "arn:aws:iam::123456789012:role/billing",
            "arn:aws-cn:iam::123456789012:role/path/to/billing",
            "arn:aws-us-gov:iam::123456789012:role/a+b=c,d.e@f_g-h",
            "arn:aws-iso-b:iam::123456789012:role/x",
        ] {
            assert_eq!(check_arn(arn, "role"), Ok(()), "{arn}");
        }
        for arn in [
            "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess",
            "arn:aws:iam::aws:policy/service-role/AWSLambdaRole",
            "arn:aws-cn:iam::123456789012:policy/mine",
        ] {
            assert_eq!(check_arn(arn, "policy"), Ok(()), "{arn}");
        }
        for arn in [
            "arn:aws:iam::aws:role/x",
            "arn:gcp:iam::123456789012:role/x",
            "arn:aws:iam:us-east-1:123456789012:role/x",
            "arn:aws:sts::123456789012:role/x",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/bad name",
        ] {
            assert!(check_arn(arn, "role").is_err(), "{arn} was accepted");
        }
    }

    #[test]
    fn a_policy_file_must_be_json_and_is_named_in_the_message() {
        let (_dir, path) = policy_dir("Version: 2012");
        let text = format!(
            "[[consumer]]\nname = \"a\"\nsession_policy_file = \"{}\"\n",
            path.display()
        );
        assert_eq!(
            problems(&text),
            [format!(
                "/etc/imds-agent/agent.toml:3: consumer \"a\", key `session_policy_file`: {}: the session policy is not valid JSON (Syntax error at line 1 column 1 of the policy)",
                path.display()
            )]
        );
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn a_planted_policy_file_is_refused() {
        // A policy file owned by another user could have been put there to
        // widen a consumer's permissions: it is never read.
        let (dir, path) = policy_dir(POLICY);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).expect("chown");
        let text = format!(
            "[[consumer]]\nname = \"a\"\nsession_policy_file = \"{}\"\n",
            path.display()
        );
        let got = problems(&text);
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(
            got[0].starts_with(&format!(
                "/etc/imds-agent/agent.toml:3: consumer \"a\", key `session_policy_file`: refusing {}: it is owned by uid 65534",
                path.display()
            )),
            "{got:#?}"
        );
    }

    #[test]
    fn load_reads_the_file_and_names_it_in_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.toml");
        let missing = Config::load(&path).expect_err("no file yet");
        assert_eq!(
            missing.to_string(),
            format!(
                "invalid config file {0} (1 problem; nothing was started):\n  {0}: {0} does not exist",
                path.display()
            )
        );
        std::fs::write(
            &path,
            "[[consumer]]\nname = \"a\"\nuids = [5]\nbogus = true\n",
        )
        .expect("write");
        let error = Config::load(&path).expect_err("bogus key");
        assert_eq!(
            error.problems()[0].display(&path),
            format!(
                "{}:4: consumer \"a\", key `bogus`: unknown key (a typo?); the keys here are: name, uids, gids, role_arn, session_policy, session_policy_file, policy_arns, duration_seconds, credentials_file, json_file, container_token_file, source_identity, session_tags",
                path.display()
            )
        );
        std::fs::write(&path, "[[consumer]]\nname = \"a\"\nuids = [5]\n").expect("write");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.path(), Some(path.as_path()));
        assert!(
            matches!(config.consumer_for(5, 5, Some(&[])), Match::Consumer(c) if c.name == "a")
        );
    }
}

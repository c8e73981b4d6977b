//! `imds-agent doctor`: what an operator would ask about this host, each
//! finding with its fix.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use imds_client::ImdsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::DoctorArgs;
use crate::trust::{self, Trust};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// As it should be.
    Ok,
    /// Works, but weaker than it should be.
    Warn,
    /// Broken or unsafe.
    Fail,
}

/// One finding: what was checked, how it came out, and the fix.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Ok, warn or fail.
    pub verdict: Verdict,
    /// What was found.
    pub what: String,
    /// What to do about it, when something should be done.
    pub fix: Option<String>,
}

fn finding(verdict: Verdict, what: impl Into<String>, fix: Option<&str>) -> Finding {
    Finding {
        verdict,
        what: what.into(),
        fix: fix.map(str::to_owned),
    }
}

/// Runs every check.
pub async fn run_checks(args: &DoctorArgs) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut builder = ImdsClient::builder();
    if let Some(endpoint) = &args.imds_endpoint {
        match builder.endpoint(endpoint) {
            Ok(b) => builder = b,
            Err(e) => {
                findings.push(finding(
                    Verdict::Fail,
                    format!("--imds-endpoint: {e}"),
                    None,
                ));
                return findings;
            }
        }
    }
    let client = match builder.build() {
        Ok(client) => client,
        Err(e) => {
            findings.push(finding(
                Verdict::Fail,
                format!("IMDS settings: {e}"),
                e.hint(),
            ));
            return findings;
        }
    };
    match client.instance_id().await {
        Ok(id) => findings.push(finding(
            Verdict::Ok,
            format!("IMDS answers with a session token (instance {id})"),
            None,
        )),
        Err(e) => findings.push(finding(Verdict::Fail, format!("IMDS: {e}"), e.hint())),
    }
    match client.role_name().await {
        Ok(role) => findings.push(finding(
            Verdict::Ok,
            format!("IAM role attached: {role}"),
            None,
        )),
        Err(e) => findings.push(finding(Verdict::Warn, format!("IAM role: {e}"), e.hint())),
    }
    findings.push(tokens_required(client.endpoint()).await);
    findings.push(lockdown());
    findings.push(forward_path());
    let targets: Vec<String> = match &args.imds_endpoint {
        Some(_) => vec![client.endpoint().to_owned()],
        None => vec![
            "http://169.254.169.254".to_owned(),
            "http://[fd00:ec2::254]".to_owned(),
        ],
    };
    for target in targets {
        findings.push(other_user_reach(&target, args.probe_uid).await);
    }
    for (label, path) in [
        ("credentials file", &args.credentials_file),
        ("JSON file", &args.json_file),
        ("socket", &args.socket),
    ] {
        if let Some(path) = path {
            findings.push(output_access(label, path));
        }
    }
    let trust = Trust::agent().with_file_owner(args.agent_uid);
    for (label, path) in [
        ("credentials file", &args.credentials_file),
        ("JSON file", &args.json_file),
        ("socket", &args.socket),
    ] {
        if let Some(path) = path {
            findings.push(output_dir(label, path, &trust));
        }
    }
    if let Some(path) = &args.container_token_file {
        findings.push(token_file(path, &trust));
    }
    if let Some(path) = &args.config {
        findings.extend(consumers(&client, path).await);
    }
    findings
}

/// `--config`: the file validated, then each consumer's role assumed once
/// with the instance credentials, as the agent would.
async fn consumers(client: &ImdsClient, path: &std::path::Path) -> Vec<Finding> {
    use crate::broker::assumer::StsAssumer;
    use crate::broker::cache::{AssumeErrorKind, AssumeRole as _};
    use crate::broker::config::Config;
    use crate::broker::sts::StsClient;

    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            return e
                .problems()
                .iter()
                .map(|p| {
                    finding(
                        Verdict::Fail,
                        format!("config {}", p.display(path)),
                        Some("edit the config file; the agent refuses to start until it is valid"),
                    )
                })
                .collect();
        }
    };
    let mut findings = vec![finding(
        Verdict::Ok,
        format!(
            "config {} is valid ({} consumers)",
            path.display(),
            config.consumers().len()
        ),
        None,
    )];
    let with = match client.role_name().await {
        Ok(role) => match client.role_credentials(&role).await {
            Ok(credentials) => imds_client::RoleCredentials {
                role,
                credentials: std::sync::Arc::new(credentials),
            },
            Err(e) => {
                findings.push(finding(
                    Verdict::Fail,
                    format!("consumers: no instance credentials to assume with: {e}"),
                    e.hint(),
                ));
                return findings;
            }
        },
        Err(e) => {
            findings.push(finding(
                Verdict::Fail,
                format!("consumers: no instance role to assume with: {e}"),
                Some("attach an instance profile"),
            ));
            return findings;
        }
    };
    let assumer = match StsAssumer::new(client.clone(), StsClient::builder) {
        Ok(assumer) => assumer,
        Err(e) => {
            findings.push(finding(
                Verdict::Fail,
                format!("consumers: STS client: {e}"),
                e.hint(),
            ));
            return findings;
        }
    };
    for consumer in config.consumers() {
        let session = assumer
            .request(consumer, &with)
            .await
            .map(|r| r.session_name)
            .unwrap_or_default();
        match assumer.assume(consumer, &with).await {
            Ok(assumed) => findings.push(finding(
                Verdict::Ok,
                format!(
                    "consumer {}: assumed {} as session {session} (expires {})",
                    consumer.name,
                    assumed.role,
                    assumed.credentials.expiration_rfc3339()
                ),
                None,
            )),
            Err(e) => {
                let fix = match e.kind() {
                    AssumeErrorKind::AccessDenied => {
                        "the role's trust policy must allow the instance role sts:AssumeRole                          (and sts:SetSourceIdentity / sts:TagSession when the consumer sets                          source_identity / session_tags), and the instance role's policy must                          allow sts:AssumeRole on the role"
                    }
                    AssumeErrorKind::Invalid => {
                        "check the consumer's session policy, policy_arns and duration_seconds"
                    }
                    _ => {
                        "STS did not answer: check the network path to STS, AWS_REGION and                          AWS_ENDPOINT_URL_STS, then run doctor again"
                    }
                };
                findings.push(finding(
                    Verdict::Fail,
                    format!("consumer {}: {e}", consumer.name),
                    Some(fix),
                ));
            }
        }
    }
    findings
}

/// A refusal from [`crate::trust`] or [`crate::token_file`] as a finding:
/// `context` and the message, with its "Fix: ..." as the fix.
fn refusal(context: &str, error: &anyhow::Error) -> Finding {
    let message = format!("{context}{error:#}");
    match message.split_once(" Fix: ") {
        Some((what, fix)) => finding(
            Verdict::Fail,
            what.trim_end_matches('.'),
            Some(fix.trim_end_matches('.')),
        ),
        None => finding(Verdict::Fail, message, None),
    }
}

/// Could another user write the directory an output lives in? The agent's
/// rule ([`crate::trust`]): it must be root's or the agent's and not writable
/// by group or others, unless sticky like `/tmp`.
fn output_dir(label: &str, path: &Path, trust: &Trust) -> Finding {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match trust::open_dir_if_exists(parent, trust) {
        Ok(Some(dir)) if dir.is_shared() => finding(
            Verdict::Warn,
            format!(
                "the {label}'s directory {}: every user may create files in it (sticky, like /tmp); \
                 the agent refuses files they plant there, but they can take the name first",
                dir.path().display()
            ),
            Some(OUTPUT_DIR_FIX),
        ),
        Ok(Some(dir)) => finding(
            Verdict::Ok,
            format!(
                "the {label}'s directory {}: only root and the agent's user can write it",
                dir.path().display()
            ),
            None,
        ),
        Ok(None) => finding(
            Verdict::Warn,
            format!(
                "the {label}'s directory {} does not exist",
                parent.display()
            ),
            Some("create it, owned by root or the agent's user and not writable by others"),
        ),
        Err(e) => refusal(&format!("{label}: "), &e),
    }
}

const OUTPUT_DIR_FIX: &str =
    "keep outputs in a directory only root and the agent can write, e.g. /var/lib/imds-agent";

/// Is the container token file the agent's own, closed to others, and a
/// token too long to guess? (The rules the agent applies at start.)
fn token_file(path: &Path, trust: &Trust) -> Finding {
    match crate::token_file::read(path, trust) {
        Ok(Some(file)) => finding(
            Verdict::Ok,
            format!(
                "container token file {}: mode {:04o}, owner {}, closed to other users",
                path.display(),
                file.mode,
                file.uid
            ),
            None,
        ),
        Ok(None) => finding(
            Verdict::Ok,
            format!(
                "container token file {} does not exist yet: the agent writes a random token (mode 0640) at start",
                path.display()
            ),
            None,
        ),
        Err(e) => refusal("", &e),
    }
}

/// Does a metadata GET without a token get 401? (IMDSv2 required.)
async fn tokens_required(endpoint: &str) -> Finding {
    let Some(authority) = endpoint
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
    else {
        return finding(
            Verdict::Warn,
            "token requirement not checked (endpoint is not http://)",
            None,
        );
    };
    let probe = async {
        let mut stream = TcpStream::connect(authority).await?;
        let request = format!(
            "GET /latest/meta-data/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(head)) if head.split_whitespace().nth(1) == Some("401") => finding(
            Verdict::Ok,
            "IMDSv2 is required: a request without a token gets 401",
            None,
        ),
        Ok(Ok(head)) if head.split_whitespace().nth(1) == Some("200") => finding(
            Verdict::Warn,
            "IMDSv1 is allowed: requests without a session token are answered",
            Some(
                "aws ec2 modify-instance-metadata-options --instance-id <id> --http-tokens required",
            ),
        ),
        Ok(Ok(head)) => finding(
            Verdict::Warn,
            format!(
                "a request without a token got: {}",
                head.lines().next().unwrap_or("")
            ),
            None,
        ),
        _ => finding(
            Verdict::Warn,
            "token requirement not checked (IMDS did not answer)",
            None,
        ),
    }
}

/// Can a user other than the agent's open a connection to IMDS? Runs this
/// binary's hidden `probe-connect` as `uid` through `setpriv`.
async fn other_user_reach(endpoint: &str, uid: u32) -> Finding {
    let Some(authority) = endpoint
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
    else {
        return finding(
            Verdict::Warn,
            format!("other users' access to {endpoint} not checked"),
            None,
        );
    };
    let Ok(exe) = std::env::current_exe() else {
        return finding(
            Verdict::Warn,
            "other users' access not checked (own path unknown)",
            None,
        );
    };
    let uid = uid.to_string();
    let status = tokio::process::Command::new("setpriv")
        .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
        .arg(exe)
        .args(["probe-connect", authority])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
    match status.map(|s| s.code()) {
        Ok(Some(0)) => finding(
            Verdict::Warn,
            format!("uid {uid} (not the agent's user) can connect to IMDS at {authority}"),
            Some(
                "load the lock-down rule: systemctl enable --now /usr/share/imds-agent/imds-lockdown.service",
            ),
        ),
        Ok(Some(1)) => finding(
            Verdict::Ok,
            format!("uid {uid} cannot connect to IMDS at {authority}"),
            None,
        ),
        _ => finding(
            Verdict::Warn,
            format!("other users' access to {authority} not checked (needs root and setpriv)"),
            None,
        ),
    }
}

/// The hidden `probe-connect` subcommand: exit 0 when a TCP connection to
/// `authority` opens within 2 s, 1 when it is refused or times out.
pub async fn probe_connect(authority: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(authority)).await,
        Ok(Ok(_))
    )
}

/// Is the lock-down rule loaded, its output chain whole?
fn lockdown() -> Finding {
    let table = std::process::Command::new("nft")
        .args(["list", "table", "inet", "imds_lockdown"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    lockdown_verdict(table.as_deref())
}

/// The lock-down finding from `nft list table inet imds_lockdown` (`None`
/// when there is no such table, or it cannot be listed). The table alone
/// proves nothing: its output chain must reject other users' connections
/// to both IMDS addresses.
fn lockdown_verdict(table: Option<&str>) -> Finding {
    let Some(table) = table else {
        return finding(
            Verdict::Warn,
            "every local user can reach IMDS (no lock-down rule loaded)",
            Some(
                "systemctl enable --now /usr/share/imds-agent/imds-lockdown.service (see README, \"Locking IMDS down to the agent\")",
            ),
        );
    };
    let (v4, v6) = chain_blocks(table, "output", true);
    if v4 && v6 {
        return finding(
            Verdict::Ok,
            "the IMDS lock-down rule is loaded: only imds-agent reaches IMDS",
            None,
        );
    }
    let open = match (v4, v6) {
        (true, false) => "fd00:ec2::254 (IPv6)",
        (false, true) => "169.254.169.254 (IPv4)",
        _ => "169.254.169.254 and fd00:ec2::254",
    };
    finding(
        Verdict::Warn,
        format!(
            "the lock-down table inet imds_lockdown exists, but its output chain does not \
             reject other users' connections to {open}: every local user can reach it"
        ),
        Some(
            "reload the packaged rule: systemctl restart imds-lockdown.service (see README, \
             \"Locking IMDS down to the agent\")",
        ),
    )
}

/// Is the forward path to IMDS closed? Containers on a bridge reach IMDS
/// through the host's forwarding and NAT, which the output chain never
/// sees. Closed when a forward chain (the lock-down rule's, or any) rejects
/// or drops 169.254.169.254 and fd00:ec2::254, or when forwarding is off.
fn forward_path() -> Finding {
    let ruleset = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let on = |path: &str| std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1");
    let forwarding =
        on("/proc/sys/net/ipv4/ip_forward") || on("/proc/sys/net/ipv6/conf/all/forwarding");
    let mut bridges: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.path().join("bridge").is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    bridges.sort();
    forward_verdict(ruleset.as_deref(), forwarding, &bridges)
}

/// Which IMDS addresses (IPv4, IPv6) a forward-hook chain of `ruleset`
/// (`nft list ruleset`) rejects or drops for every forwarded packet. Only
/// tables that see routed traffic count (`ip`, `ip6`, `inet`: a `bridge`
/// table's forward hook sees frames switched inside a bridge, not traffic
/// routed to IMDS), and only rules that match the address alone: a rule
/// that also names a source, an interface or anything else leaves the rest
/// of the path open, so it does not make the path closed.
fn forward_blocked(ruleset: &str) -> (bool, bool) {
    chain_blocks(ruleset, "forward", false)
}

/// Which IMDS addresses (IPv4, IPv6) the base chains on `hook` of
/// `ruleset`'s `ip`, `ip6` and `inet` tables drop or reject, by rules that
/// match the address alone ([`blocks_imds`]); with `per_user`, rules that
/// also spare one user (`meta skuid != USER`) count.
fn chain_blocks(ruleset: &str, hook: &str, per_user: bool) -> (bool, bool) {
    let (mut v4, mut v6) = (false, false);
    let (mut routed, mut hooked) = (false, false);
    let on_hook = format!(" hook {hook} ");
    for line in ruleset.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix("table ") {
            routed = matches!(table.split_whitespace().next(), Some("ip" | "ip6" | "inet"));
            hooked = false;
        } else if line.starts_with("chain ") {
            hooked = false;
        } else if line.starts_with("type ") && line.contains(&on_hook) {
            hooked = routed;
        } else if hooked {
            match blocks_imds(line, per_user) {
                Some(false) => v4 = true,
                Some(true) => v6 = true,
                None => {}
            }
        }
    }
    (v4, v6)
}

/// Whether `rule` (one line of a chain, as `nft list` prints it) drops or
/// rejects every packet to IMDS, and for which family (`true`: IPv6); `None`
/// when it matches anything more than the address (and TCP, or TCP port
/// 80, which is all IMDS serves; with `per_user`, one user spared by
/// `meta skuid != USER`) or does not end in `drop` or `reject`.
fn blocks_imds(rule: &str, per_user: bool) -> Option<bool> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut rest = &words[..];
    let mut ipv6 = None;
    loop {
        rest = match rest {
            ["meta", "l4proto", "tcp", tail @ ..]
            | ["ip", "protocol", "tcp", tail @ ..]
            | ["ip6", "nexthdr", "tcp", tail @ ..]
            | ["tcp", "dport", "80", tail @ ..] => tail,
            ["ip", "daddr", "169.254.169.254", tail @ ..] if ipv6.is_none() => {
                ipv6 = Some(false);
                tail
            }
            ["ip6", "daddr", "fd00:ec2::254", tail @ ..] if ipv6.is_none() => {
                ipv6 = Some(true);
                tail
            }
            ["meta", "skuid", "!=", _, tail @ ..] if per_user => tail,
            ["counter", "packets", _, "bytes", _, tail @ ..] => tail,
            _ => break,
        };
    }
    match rest {
        ["drop"] | ["reject"] => ipv6,
        ["drop" | "reject", "comment", ..] | ["reject", "with", ..] => ipv6,
        _ => None,
    }
}

const HOP_LIMIT: &str =
    "the instance's hop limit (http-put-response-hop-limit 1) is the other guard";
const FORWARD_FIX: &str = "load the lock-down rule, which rejects forwarded traffic to IMDS: \
    systemctl enable --now /usr/share/imds-agent/imds-lockdown.service (README, \
    \"Locking IMDS down to the agent\"); keep the hop limit at 1";

/// The forward-path finding from what the host shows: the ruleset (`None`
/// when `nft` could not list it), whether forwarding is on, and its bridges.
fn forward_verdict(ruleset: Option<&str>, forwarding: bool, bridges: &[String]) -> Finding {
    let (v4, v6) = ruleset.map(forward_blocked).unwrap_or_default();
    if v4 && v6 {
        return finding(
            Verdict::Ok,
            format!(
                "the forward path to IMDS is closed: a forward rule rejects traffic routed to \
                 169.254.169.254 and fd00:ec2::254 (containers on bridges); {HOP_LIMIT}"
            ),
            None,
        );
    }
    if !forwarding {
        return finding(
            Verdict::Ok,
            format!(
                "the forward path to IMDS is closed: IP forwarding is off, so no container on \
                 a bridge is routed to IMDS; {HOP_LIMIT}"
            ),
            None,
        );
    }
    let open = match (v4, v6) {
        (true, false) => "fd00:ec2::254 (IPv6)",
        (false, true) => "169.254.169.254 (IPv4)",
        _ => "IMDS",
    };
    let unread = if ruleset.is_none() {
        " (nft list ruleset could not be read: run doctor as root)"
    } else {
        ""
    };
    let what = if bridges.is_empty() {
        format!(
            "IP forwarding is on and no forward rule stops traffic to {open}{unread}: anything \
             routed through this host reaches it; only the instance's hop limit \
             (http-put-response-hop-limit 1) keeps it from a session token"
        )
    } else {
        format!(
            "IP forwarding is on and a bridge exists ({}) with no forward rule for {open}{unread}: \
             a bridged container can reach IMDS through the host; only the instance's hop limit \
             (http-put-response-hop-limit 1) keeps it from a session token",
            bridges.join(", ")
        )
    };
    finding(Verdict::Warn, what, Some(FORWARD_FIX))
}

/// Is an output closed to other users?
fn output_access(label: &str, path: &Path) -> Finding {
    match std::fs::metadata(path) {
        Err(e) => finding(
            Verdict::Warn,
            format!("{label} {}: {e}", path.display()),
            Some("is the agent running with this output?"),
        ),
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            let what = format!(
                "{label} {}: mode {mode:04o}, owner {}, group {}",
                path.display(),
                meta.uid(),
                meta.gid()
            );
            if mode & 0o007 != 0 {
                finding(
                    Verdict::Fail,
                    format!("{what}: readable by every user"),
                    Some("use --file-mode 0600 or 0640 (--socket-mode for the socket)"),
                )
            } else {
                finding(Verdict::Ok, what, None)
            }
        }
    }
}

/// Prints the findings; true when none failed.
pub fn report(findings: &[Finding]) -> bool {
    for f in findings {
        let tag = match f.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        println!("[{tag}] {}", f.what);
        if let Some(fix) = &f.fix {
            println!("       fix: {fix}");
        }
    }
    findings.iter().all(|f| f.verdict != Verdict::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nft list ruleset` with the lock-down rule loaded beside Docker's tables.
    const LOCKED: &str = "\
table ip nat {
\tchain POSTROUTING {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 172.17.0.0/16 oifname != \"docker0\" masquerade
\t}
}
table inet imds_lockdown {
\tchain output {
\t\ttype filter hook output priority filter; policy accept;
\t\tmeta l4proto tcp ip daddr 169.254.169.254 meta skuid != 998 reject with tcp reset
\t\tmeta l4proto tcp ip6 daddr fd00:ec2::254 meta skuid != 998 reject with tcp reset
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tmeta l4proto tcp ip daddr 169.254.169.254 reject with tcp reset
\t\tip daddr 169.254.169.254 reject with icmp port-unreachable
\t\tmeta l4proto tcp ip6 daddr fd00:ec2::254 reject with tcp reset
\t\tip6 daddr fd00:ec2::254 reject with icmpv6 port-unreachable
\t}
}
";

    /// The rule as it was before the forward chain: output only.
    const OUTPUT_ONLY: &str = "\
table inet imds_lockdown {
\tchain output {
\t\ttype filter hook output priority filter; policy accept;
\t\tmeta l4proto tcp ip daddr 169.254.169.254 meta skuid != 998 reject with tcp reset
\t\tmeta l4proto tcp ip6 daddr fd00:ec2::254 meta skuid != 998 reject with tcp reset
\t}
}
";

    fn docker0() -> Vec<String> {
        vec!["docker0".to_owned()]
    }

    #[test]
    fn the_forward_chain_closes_the_path_and_names_the_hop_limit() {
        let f = forward_verdict(Some(LOCKED), true, &docker0());
        assert_eq!(f.verdict, Verdict::Ok, "{}", f.what);
        assert!(
            f.what.contains("forward path to IMDS is closed"),
            "{}",
            f.what
        );
        assert!(f.what.contains("hop limit"), "{}", f.what);
    }

    #[test]
    fn a_bridge_with_forwarding_and_no_forward_rule_is_a_warning() {
        for ruleset in [Some(OUTPUT_ONLY), Some(""), None] {
            let f = forward_verdict(ruleset, true, &docker0());
            assert_eq!(f.verdict, Verdict::Warn, "{ruleset:?}: {}", f.what);
            assert!(
                f.what.contains("a bridge exists (docker0)")
                    && f.what.contains("bridged container can reach IMDS")
                    && f.what.contains("hop limit"),
                "{}",
                f.what
            );
            assert!(f.fix.as_deref().unwrap().contains("imds-lockdown.service"));
        }
    }

    #[test]
    fn forwarding_off_closes_the_path_without_a_rule() {
        let f = forward_verdict(Some(OUTPUT_ONLY), false, &docker0());
        assert_eq!(f.verdict, Verdict::Ok, "{}", f.what);
        assert!(f.what.contains("IP forwarding is off"), "{}", f.what);
        assert!(f.what.contains("hop limit"), "{}", f.what);
    }

    /// Rules that stop only part of the forwarded traffic to IMDS, or that
    /// sit where routed traffic never passes, leave the path open.
    #[test]
    fn a_partial_or_misplaced_forward_rule_does_not_close_the_path() {
        let forward = |table: &str, rules: &[&str]| {
            format!(
                "table {table} {{\n\tchain forward {{\n\t\ttype filter hook forward priority \
                 filter; policy accept;\n{}\t}}\n}}\n",
                rules
                    .iter()
                    .map(|r| format!("\t\t{r}\n"))
                    .collect::<String>()
            )
        };
        for (what, ruleset) in [
            (
                "only one source",
                forward(
                    "inet filter",
                    &[
                        "ip saddr 10.1.2.3 ip daddr 169.254.169.254 drop",
                        "ip6 saddr fd00:1::3 ip6 daddr fd00:ec2::254 drop",
                    ],
                ),
            ),
            (
                "only one bridge",
                forward(
                    "inet filter",
                    &[
                        "iifname \"docker0\" ip daddr 169.254.169.254 reject",
                        "iifname \"docker0\" ip6 daddr fd00:ec2::254 reject",
                    ],
                ),
            ),
            (
                "new connections only",
                forward(
                    "inet filter",
                    &[
                        "ct state new ip daddr 169.254.169.254 drop",
                        "ct state new ip6 daddr fd00:ec2::254 drop",
                    ],
                ),
            ),
            (
                "a bridge table (switched frames, not routed traffic)",
                forward(
                    "bridge filter",
                    &[
                        "ip daddr 169.254.169.254 drop",
                        "ip6 daddr fd00:ec2::254 drop",
                    ],
                ),
            ),
            (
                "a rule that only counts",
                forward(
                    "inet filter",
                    &[
                        "ip daddr 169.254.169.254 counter packets 0 bytes 0 comment \"reject\"",
                        "ip6 daddr fd00:ec2::254 counter packets 0 bytes 0 comment \"drop\"",
                    ],
                ),
            ),
        ] {
            let f = forward_verdict(Some(&ruleset), true, &docker0());
            assert_eq!(
                f.verdict,
                Verdict::Warn,
                "{what}: expected the forward path reported open, got {}\n{ruleset}",
                f.what
            );
        }
        // The same chain, rules unconditional, with counters and comments: closed.
        let closed = forward(
            "inet filter",
            &[
                "ip daddr 169.254.169.254 counter packets 3 bytes 180 drop comment \"imds\"",
                "meta l4proto tcp ip6 daddr fd00:ec2::254 tcp dport 80 reject with tcp reset",
            ],
        );
        let f = forward_verdict(Some(&closed), true, &docker0());
        assert_eq!(f.verdict, Verdict::Ok, "{}\n{closed}", f.what);
    }

    /// The table alone is not the lock-down: its output chain must reject
    /// other users' connections to both addresses.
    #[test]
    fn the_lock_down_is_loaded_only_with_its_output_chain() {
        let table = |rules: &[&str]| {
            format!(
                "table inet imds_lockdown {{\n\tchain output {{\n\t\ttype filter hook output \
                 priority filter; policy accept;\n{}\t}}\n}}\n",
                rules
                    .iter()
                    .map(|r| format!("\t\t{r}\n"))
                    .collect::<String>()
            )
        };
        let loaded = table(&[
            "meta l4proto tcp ip daddr 169.254.169.254 meta skuid != 998 reject with tcp reset",
            "meta l4proto tcp ip6 daddr fd00:ec2::254 meta skuid != 998 reject with tcp reset",
        ]);
        let f = lockdown_verdict(Some(&loaded));
        assert_eq!(f.verdict, Verdict::Ok, "{}\n{loaded}", f.what);
        assert_eq!(lockdown_verdict(Some(LOCKED)).verdict, Verdict::Ok);
        for (what, listing, open) in [
            (
                "an empty table",
                "table inet imds_lockdown {\n}\n".to_owned(),
                "169.254.169.254 and fd00:ec2::254",
            ),
            (
                "the forward chain only",
                LOCKED.split("\tchain output").next().unwrap().to_owned()
                    + &LOCKED[LOCKED.find("\tchain forward").unwrap()..],
                "169.254.169.254 and fd00:ec2::254",
            ),
            (
                "IPv4 only",
                table(&["ip daddr 169.254.169.254 meta skuid != 998 reject"]),
                "fd00:ec2::254 (IPv6)",
            ),
            (
                "one user refused instead of all but one",
                table(&[
                    "ip daddr 169.254.169.254 meta skuid 1000 reject",
                    "ip6 daddr fd00:ec2::254 meta skuid 1000 reject",
                ]),
                "169.254.169.254 and fd00:ec2::254",
            ),
        ] {
            let f = lockdown_verdict(Some(&listing));
            assert_eq!(
                f.verdict,
                Verdict::Warn,
                "{what}: expected a warning, got {}\n{listing}",
                f.what
            );
            assert!(
                f.what.contains(open)
                    && f.fix.as_deref().unwrap().contains("imds-lockdown.service"),
                "{what}: expected {open:?} named and the fix, got {f:?}"
            );
        }
        assert_eq!(lockdown_verdict(None).verdict, Verdict::Warn);
    }

    #[test]
    fn a_forward_rule_for_one_family_leaves_the_other_open() {
        let ipv4_only: String = LOCKED
            .lines()
            .filter(|l| !l.contains("ip6 daddr"))
            .map(|l| format!("{l}\n"))
            .collect();
        let f = forward_verdict(Some(&ipv4_only), true, &docker0());
        assert_eq!(f.verdict, Verdict::Warn, "{}", f.what);
        assert!(f.what.contains("fd00:ec2::254 (IPv6)"), "{}", f.what);
    }
}

//! What the SDKs' own agents do, we do: the ECS agent's error bodies on the
//! container endpoint, `RoleArn` in the instance's partition, `AccountId`
//! and `aws_account_id` where botocore and the AWS SDK for Rust read them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;

use aws_credential_types::provider::ProvideCredentials;
use imds_client::mock::{Fault, FaultDuration, MockImds};
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, agent, agent_against, unix_get, wait_for, wait_for_served_credentials};

const IAM_INFO: &str = "/latest/meta-data/iam/info";

/// The agent with a container endpoint, and the token it wrote.
struct Container {
    _dir: tempfile::TempDir,
    port: u16,
    token_file: PathBuf,
    running: Running,
}

impl Container {
    fn start(imds: &MockImds) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        let mut cmd = agent_against(imds);
        cmd.args(["--poll-interval", "1"])
            .args(["--container-endpoint", "127.0.0.1:0"])
            .arg("--container-token-file")
            .arg(&token_file);
        let mut running = Running::start(cmd);
        let port = running.tcp_port();
        wait_for("the token file", || token_file.exists());
        wait_for("the container endpoint", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self {
            _dir: dir,
            port,
            token_file,
            running,
        }
    }

    /// `GET /credentials` with our token: (status, body).
    fn get(&self) -> (u16, String) {
        let token = std::fs::read_to_string(&self.token_file).unwrap();
        self.get_with(&format!("Authorization: {token}\r\n"))
    }

    fn get_with(&self, headers: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "GET /credentials HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{headers}Connection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        (
            status.unwrap_or_else(|| panic!("expected an HTTP answer, got {raw:?}")),
            body.to_owned(),
        )
    }

    /// Waits until the endpoint answers `status` with `{"code": code}`.
    fn wait_for_error(&self, status: u16, code: &str) -> String {
        let mut seen = (0, String::new());
        wait_for(&format!("{status} {code}"), || {
            seen = self.get();
            seen.0 == status && error_code(&seen.1).as_deref() == Some(code)
        });
        seen.1
    }

    /// Waits for a 200 whose document passes `check`, and returns it.
    fn wait_for_document(
        &self,
        what: &str,
        mut check: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = None;
        wait_for(what, || {
            let (status, body) = self.get();
            let doc = serde_json::from_str::<serde_json::Value>(&body).ok();
            let ok = status == 200 && doc.as_ref().is_some_and(&mut check);
            last = doc;
            ok
        });
        last.unwrap()
    }
}

/// The `code` of a `{"code": ..., "message": ...}` body with a message.
fn error_code(body: &str) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_str(body).ok()?;
    let fields = doc.as_object()?;
    (fields.len() == 2
        && fields
            .get("message")?
            .as_str()
            .is_some_and(|m| !m.is_empty()))
    .then(|| fields.get("code")?.as_str().map(str::to_owned))
    .flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn container_errors_carry_the_ecs_agents_codes_until_and_after_the_first_fetch() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    imds.inject(Fault::Status { status: 500 }, FaultDuration::Forever);
    let endpoint = Container::start(&imds);

    // No credentials yet: 503, which every SDK retries.
    let body = endpoint.wait_for_error(503, "CredentialsUninitialized");
    assert!(!body.contains("secret"), "{body}");
    // A missing or empty token is the ECS agent's missing credentials id.
    let (status, body) = endpoint.get_with("");
    eqnice!(400, status);
    eqnice!(Some("NoIdInRequest".to_owned()), error_code(&body));
    let (status, body) = endpoint.get_with("Authorization: \r\n");
    eqnice!(400, status);
    eqnice!(Some("NoIdInRequest".to_owned()), error_code(&body));
    let (status, body) = endpoint.get_with("Authorization: not-the-token\r\n");
    eqnice!(400, status);
    eqnice!(Some("InvalidIdInRequest".to_owned()), error_code(&body));

    imds.clear_faults();
    endpoint.wait_for_document("credentials", |doc| doc["AccessKeyId"].is_string());

    imds.detach_role();
    endpoint.wait_for_error(400, "NoCredentialsAssociated");
    assert!(endpoint.running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn role_arn_takes_the_partition_and_account_of_the_instance_profile() {
    // No AccountId in the credentials: the account must come from iam/info.
    let imds = MockImds::builder()
        .role("app")
        .extended_credentials(false)
        .start()
        .await
        .unwrap();
    imds.set_partition("aws-cn");
    let endpoint = Container::start(&imds);

    let doc = endpoint.wait_for_document("a RoleArn", |doc| doc["RoleArn"].is_string());
    eqnice!(
        serde_json::json!("arn:aws-cn:iam::123456789012:role/app"),
        doc["RoleArn"]
    );
    eqnice!(serde_json::json!("123456789012"), doc["AccountId"]);

    // Read until one read succeeds (the partition and account are the
    // instance's), then never again: not per request, not for a replaced role.
    let reads = imds.request_counts().count("GET", IAM_INFO);
    assert!(reads >= 1, "expected iam/info read, got {reads} reads");
    for _ in 0..20 {
        eqnice!(200, endpoint.get().0);
    }
    imds.replace_role("other");
    let doc = endpoint.wait_for_document("the replaced role's ARN", |doc| {
        doc["RoleArn"] == "arn:aws-cn:iam::123456789012:role/other"
    });
    let issued = imds.current_credentials().unwrap();
    eqnice!(
        serde_json::json!(issued.access_key_id()),
        doc["AccessKeyId"]
    );
    eqnice!(reads, imds.request_counts().count("GET", IAM_INFO));
    assert!(endpoint.running.stop_with(Signal::TERM).success());
}

/// The agent with every credential output, against `imds`.
struct Outputs {
    _dir: tempfile::TempDir,
    root: PathBuf,
    running: Running,
}

impl Outputs {
    fn start(imds: &MockImds) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let mut cmd = agent_against(imds);
        cmd.arg("--credentials-file")
            .arg(root.join("credentials"))
            .args(["--profile", "from-agent"])
            .arg("--json-file")
            .arg(root.join("credentials.json"))
            .arg("--socket")
            .arg(root.join("agent.sock"));
        let running = Running::start(cmd);
        wait_for_served_credentials(&root.join("agent.sock"));
        wait_for("the credentials and JSON files", || {
            root.join("credentials").exists() && root.join("credentials.json").exists()
        });
        std::fs::write(
            root.join("config"),
            format!(
                "[profile via-process]\ncredential_process = {} credential-process --socket {}\n",
                env!("CARGO_BIN_EXE_imds-agent"),
                root.join("agent.sock").display()
            ),
        )
        .unwrap();
        Self {
            _dir: dir,
            root,
            running,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The `AccountId` of every `credential_process` document: the socket's,
    /// the JSON file's and `imds-agent credential-process`'s.
    fn process_account_ids(&self) -> Vec<(&'static str, Option<String>)> {
        let socket = self.path("agent.sock");
        let (status, from_socket) = unix_get(&socket, "/credentials").unwrap();
        eqnice!(200, status);
        let from_file = std::fs::read_to_string(self.path("credentials.json")).unwrap();
        let out = agent()
            .arg("credential-process")
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "credential-process failed: {out:?}");
        let from_process = String::from_utf8(out.stdout).unwrap();
        [
            ("socket", from_socket),
            ("json file", from_file),
            ("credential-process", from_process),
        ]
        .into_iter()
        .map(|(name, text)| {
            let doc: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{name}: expected JSON, got {text:?}: {e}"));
            eqnice!(serde_json::json!(1), doc["Version"]);
            (
                name,
                doc.get("AccountId")
                    .and_then(|a| a.as_str())
                    .map(str::to_owned),
            )
        })
        .collect()
    }

    /// `aws_account_id` in our profile of the credentials file.
    fn profile_account_id(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.path("credentials")).unwrap();
        let mut ours = false;
        let mut found = None;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                ours = line == "[from-agent]";
            } else if ours && let Some(v) = line.strip_prefix("aws_account_id") {
                found = Some(v.trim_start().trim_start_matches('=').trim().to_owned());
            }
        }
        found
    }

    // The profile-file types are re-exported from aws-runtime under deprecated
    // names; using them keeps aws-runtime out of our direct dependencies.
    #[allow(deprecated)]
    fn sdk(&self, profile: &str) -> aws_config::profile::ProfileFileCredentialsProvider {
        use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
        aws_config::profile::ProfileFileCredentialsProvider::builder()
            .profile_files(
                ProfileFiles::builder()
                    .with_file(ProfileFileKind::Credentials, self.path("credentials"))
                    .with_file(ProfileFileKind::Config, self.path("config"))
                    .build(),
            )
            .profile_name(profile)
            .build()
    }
}

/// The credentials the AWS SDK for Rust resolves from our file and from
/// our `credential_process`, checked against what the emulator issued, with
/// the account id each reports.
async fn sdk_account_ids(outputs: &Outputs, imds: &MockImds) -> [Option<String>; 2] {
    let issued = imds.current_credentials().unwrap();
    let mut accounts = [None, None];
    for (i, profile) in ["from-agent", "via-process"].into_iter().enumerate() {
        let resolved = outputs
            .sdk(profile)
            .provide_credentials()
            .await
            .unwrap_or_else(|e| panic!("the SDK resolves profile {profile}: {e}"));
        eqnice!(issued.access_key_id(), resolved.access_key_id());
        eqnice!(issued.secret_access_key(), resolved.secret_access_key());
        eqnice!(Some(issued.session_token()), resolved.session_token());
        accounts[i] = resolved.account_id().map(|a| a.as_str().to_owned());
    }
    accounts
}

#[tokio::test(flavor = "multi_thread")]
async fn the_account_id_reaches_every_output_when_imds_gives_it() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let outputs = Outputs::start(&imds);
    let account = Some("123456789012".to_owned());
    for (name, got) in outputs.process_account_ids() {
        eqnice!((name, account.clone()), (name, got));
    }
    eqnice!(account.clone(), outputs.profile_account_id());
    let [from_file, from_process] = sdk_account_ids(&outputs, &imds).await;
    eqnice!(account.clone(), from_file);
    eqnice!(account, from_process);
    assert!(outputs.running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_account_id_is_left_out_when_imds_does_not_give_it() {
    let imds = MockImds::builder()
        .role("r")
        .extended_credentials(false)
        .start()
        .await
        .unwrap();
    let outputs = Outputs::start(&imds);
    for (name, got) in outputs.process_account_ids() {
        eqnice!((name, None), (name, got));
    }
    eqnice!(None, outputs.profile_account_id());
    eqnice!([None, None], sdk_account_ids(&outputs, &imds).await);
    assert!(outputs.running.stop_with(Signal::TERM).success());
}

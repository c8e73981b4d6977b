//! The AWS SDK for Rust's container credentials provider, pointed at the
//! agent's container endpoint, resolves the credentials the emulator issued,
//! and reports the endpoint's errors: a 503 (retried) before the first
//! fetch, a 400 at once for a wrong token or an instance without a role.
//!
//! The SDK reads `AWS_CONTAINER_*` from the process environment, so this
//! binary holds this one test and sets them before any other thread starts.
#![allow(missing_docs, unsafe_code)]

use std::process::{Command, Stdio};
use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::provider::error::CredentialsError;
use imds_client::mock::{Fault, FaultDuration, MockImds};

/// Stops the agent however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a user of the SDK sees: the error with its whole chain.
fn seen(error: &CredentialsError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Asks the SDK until `done` holds for its answer (bounded: 60 s).
async fn ask_until(
    what: &str,
    mut done: impl FnMut(&Result<aws_credential_types::Credentials, CredentialsError>) -> bool,
) -> Result<aws_credential_types::Credentials, CredentialsError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let provider = aws_config::ecs::EcsCredentialsProvider::builder().build();
        let answer = provider.provide_credentials().await;
        if done(&answer) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {what} within 60 s; the SDK last said {:?}",
            answer
                .as_ref()
                .map_err(seen)
                .map(|c| c.access_key_id().to_owned())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fails_with(
    status: &str,
) -> impl FnMut(&Result<aws_credential_types::Credentials, CredentialsError>) -> bool {
    let status = status.to_owned();
    move |answer| {
        answer.as_ref().is_err_and(|e| {
            seen(e).contains(&format!(
                "Non-success status from HTTP credential provider: StatusCode({status})"
            ))
        })
    }
}

#[test]
fn the_sdk_container_provider_gets_our_credentials() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    // The SDK reads its own copy, so that the test can hand it a wrong token.
    let sdk_token = dir.path().join("sdk-token");
    // SAFETY: the only test in this binary; no other thread exists yet.
    unsafe {
        std::env::set_var(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            format!("http://127.0.0.1:{port}/credentials"),
        );
        std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &sdk_token);
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let imds = MockImds::builder().role("r").start().await.unwrap();
        // No credentials until the fault is cleared.
        imds.inject(Fault::Status { status: 500 }, FaultDuration::Forever);
        let _agent = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_imds-agent"))
                .env("IMDS_AGENT_LOG", "warn")
                .arg("run")
                .arg("--imds-endpoint")
                .arg(imds.endpoint())
                .args(["--poll-interval", "1"])
                .arg("--container-endpoint")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--container-token-file")
                .arg(&token_file)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !(token_file.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected the token file and the endpoint within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let token = std::fs::read(&token_file).unwrap();
        std::fs::write(&sdk_token, &token).unwrap();

        // Before the first fetch: 503 CredentialsUninitialized, retried by
        // the SDK, then reported with its status.
        let before = ask_until("a 503", fails_with("503")).await;
        let message = seen(before.as_ref().unwrap_err());
        eprintln!("before the first fetch the SDK says: {message}");

        // A wrong token: 400 InvalidIdInRequest, reported at once.
        std::fs::write(&sdk_token, "not-the-token").unwrap();
        let wrong = ask_until("a 400 for a wrong token", fails_with("400")).await;
        eprintln!(
            "with a wrong token the SDK says: {}",
            seen(wrong.as_ref().unwrap_err())
        );
        std::fs::write(&sdk_token, &token).unwrap();

        imds.clear_faults();
        let resolved = ask_until("credentials", |a| a.is_ok())
            .await
            .expect("the SDK resolves credentials from the container endpoint");
        let issued = imds.current_credentials().unwrap();
        assert_eq!(resolved.access_key_id(), issued.access_key_id());
        assert_eq!(resolved.secret_access_key(), issued.secret_access_key());
        assert_eq!(resolved.session_token(), Some(issued.session_token()));
        assert_eq!(
            resolved.account_id().map(|a| a.as_str()),
            Some("123456789012"),
            "the SDK reads AccountId from the container document"
        );

        // No role: 400 NoCredentialsAssociated, reported at once.
        imds.detach_role();
        let after = ask_until("a 400 once the role is detached", fails_with("400")).await;
        eprintln!(
            "without a role the SDK says: {}",
            seen(after.as_ref().unwrap_err())
        );
    });
}

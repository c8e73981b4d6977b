//! The AWS SDK for Rust's container credentials provider, pointed at the
//! agent's container endpoint, resolves the credentials the emulator issued.
//!
//! The SDK reads `AWS_CONTAINER_*` from the process environment, so this
//! binary holds this one test and sets them before any other thread starts.
#![allow(missing_docs, unsafe_code)]

use std::process::{Command, Stdio};
use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials;
use imds_client::mock::MockImds;

#[test]
fn the_sdk_container_provider_gets_our_credentials() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    // SAFETY: the only test in this binary; no other thread exists yet.
    unsafe {
        std::env::set_var(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            format!("http://127.0.0.1:{port}/credentials"),
        );
        std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file);
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let imds = MockImds::builder().role("r").start().await.unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_imds-agent"))
            .env("IMDS_AGENT_LOG", "warn")
            .arg("run")
            .arg("--imds-endpoint")
            .arg(imds.endpoint())
            .arg("--container-endpoint")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--container-token-file")
            .arg(&token_file)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if token_file.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let provider = aws_config::ecs::EcsCredentialsProvider::builder().build();
        let resolved = provider.provide_credentials().await;
        let _ = child.kill();
        let _ = child.wait();
        let resolved = resolved.expect("the SDK resolves credentials from the container endpoint");
        let issued = imds.current_credentials().unwrap();
        assert_eq!(resolved.access_key_id(), issued.access_key_id());
        assert_eq!(resolved.secret_access_key(), issued.secret_access_key());
        assert_eq!(resolved.session_token(), Some(issued.session_token()));
    });
}

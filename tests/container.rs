//! The container-credentials endpoint: token, forged requests, loopback only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, agent, agent_against, wait_for};

/// The agent with a container endpoint on a port the kernel picks (learnt
/// with [`Running::tcp_port`]) and its token in `token_file`.
fn agent_with_container_endpoint(
    imds: &MockImds,
    token_file: &std::path::Path,
) -> std::process::Command {
    let mut cmd = agent_against(imds);
    cmd.arg("--container-endpoint")
        .arg("127.0.0.1:0")
        .arg("--container-token-file")
        .arg(token_file);
    cmd
}

fn request(port: u16, headers: &str) -> (u16, String) {
    crate::util::container_request(port, headers)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_required_and_forged_requests_are_refused() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let mut cmd = agent_with_container_endpoint(&imds, &token_file);
    cmd.env("IMDS_AGENT_LOG", "trace");
    let log = dir.path().join("agent.log");
    let mut running = Running::start_logging_to(cmd, &log);
    let port = running.tcp_port();
    wait_for("the token file", || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(token.len() >= 64 && !token.ends_with('\n'), "{token:?}");
    eqnice!(
        0o640,
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777
    );
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    wait_for("the endpoint", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    wait_for("credentials", || {
        request(port, &format!("{host}Authorization: {token}\r\n")).0 == 200
    });

    // RoleArn appears once the agent has read iam/info (at start, off the
    // request path).
    let mut body = String::new();
    wait_for("a document naming the RoleArn", || {
        let (status, got) = request(port, &format!("{host}Authorization: {token}\r\n"));
        body = got;
        status == 200 && body.contains("RoleArn")
    });
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let issued = imds.current_credentials().unwrap();
    eqnice!(
        serde_json::json!(issued.access_key_id()),
        doc["AccessKeyId"]
    );
    eqnice!(serde_json::json!(issued.session_token()), doc["Token"]);
    eqnice!(
        serde_json::json!("arn:aws:iam::123456789012:role/r"),
        doc["RoleArn"]
    );

    // The ECS agent's statuses: a missing or wrong token (its credentials
    // id) is a 400; a forged request is a 403.
    eqnice!(400, request(port, &host).0);
    let (status, body) = request(port, &format!("{host}Authorization: wrong\r\n"));
    eqnice!(400, status);
    assert!(body.contains("InvalidIdInRequest"), "{body}");
    assert!(!body.contains(&token));
    eqnice!(
        400,
        request(port, &format!("{host}Authorization: Bearer {token}\r\n")).0
    );
    eqnice!(
        403,
        request(
            port,
            &format!("Host: attacker.example:{port}\r\nAuthorization: {token}\r\n")
        )
        .0
    );
    eqnice!(
        403,
        request(
            port,
            &format!("{host}Origin: http://attacker.example\r\nAuthorization: {token}\r\n")
        )
        .0
    );
    eqnice!(
        403,
        request(
            port,
            &format!("{host}Referer: http://attacker.example/\r\nAuthorization: {token}\r\n")
        )
        .0
    );
    eqnice!(
        403,
        request(
            port,
            &format!("{host}X-Forwarded-For: 203.0.113.9\r\nAuthorization: {token}\r\n")
        )
        .0
    );
    assert!(running.stop_with(Signal::TERM).success());
    // Each refusal is logged, and neither the token nor a credential is.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("without a token"), "{log}");
    assert!(log.contains("with a wrong token"), "{log}");
    assert!(!log.contains(&token), "the container token reached the log");
    assert!(!log.contains(issued.secret_access_key()));
    assert!(!log.contains(issued.session_token()));
}

#[test]
fn only_loopback_addresses_are_accepted() {
    let out = agent()
        .args(["run", "--container-endpoint", "0.0.0.0:8901"])
        .output()
        .unwrap();
    eqnice!(Some(1), out.status.code());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_idle_or_garbage_connections_are_bounded_and_timed_out() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let cmd = agent_with_container_endpoint(&imds, &token_file);
    let mut running = Running::start(cmd);
    let port = running.tcp_port();
    wait_for("the token file", || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap();
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    let authorised = format!("{host}Authorization: {token}\r\n");
    wait_for("credentials", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok() && request(port, &authorised).0 == 200
    });

    let mut hostile: Vec<TcpStream> = (0..1000)
        .map(|i| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            if i % 2 == 1 {
                let _ = stream.write_all(b"\x16\x03\x01 not http, half a head\r\nX: ");
            }
            stream
        })
        .collect();
    // A good client is served while they are all held.
    eqnice!(200, request(port, &authorised).0);

    // None of them is kept past the header timeout (5 s).
    for stream in &mut hostile {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 512];
        // Closed by the agent: end of file (after a 4xx for the garbage).
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("a hostile connection was kept open: {e}"),
            }
        }
    }
    eqnice!(200, request(port, &authorised).0);
    assert!(running.stop_with(Signal::TERM).success());
}

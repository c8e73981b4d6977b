//! What the client puts on the wire: a User-Agent naming the crate, no
//! `X-Forwarded-For`, and never a proxy, whatever `HTTP_PROXY` says.
//!
//! This binary sets proxy variables for its whole process, so it holds this
//! one test only.
#![cfg(feature = "mock")]
#![allow(unsafe_code)]

use std::sync::{Arc, Mutex};

use imds_client::ImdsClient;
use imds_client::config::Env;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test]
async fn requests_name_the_crate_skip_proxies_and_carry_no_forwarding_header() {
    // SAFETY: this test binary has one test, and it sets the variables before
    // any other thread reads the environment.
    unsafe {
        std::env::set_var("HTTP_PROXY", "http://127.0.0.1:9");
        std::env::set_var("http_proxy", "http://127.0.0.1:9");
        std::env::set_var("ALL_PROXY", "http://127.0.0.1:9");
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let body = if request.starts_with("PUT") {
                    "a-token"
                } else {
                    "i-0123"
                };
                record.lock().unwrap().push(request);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    let client = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(format!("http://{addr}"))
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(client.instance_id().await.unwrap(), "i-0123");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        2,
        "token PUT and GET reached the server directly: {seen:?}"
    );
    for request in &seen {
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains(&format!(
                "user-agent: imds-client/{}",
                env!("CARGO_PKG_VERSION")
            )),
            "{request}"
        );
        assert!(!lower.contains("x-forwarded-for"), "{request}");
    }
    assert!(seen[0].starts_with("PUT /latest/api/token "), "{}", seen[0]);
    assert!(
        seen[0]
            .to_ascii_lowercase()
            .contains("x-aws-ec2-metadata-token-ttl-seconds: 21600")
    );
    assert!(
        seen[1]
            .to_ascii_lowercase()
            .contains("x-aws-ec2-metadata-token: a-token")
    );
}

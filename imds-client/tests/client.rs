//! `ImdsClient` against the emulator: tokens, retries, failures, settings.
#![cfg(feature = "mock")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use imds_client::config::Env;
use imds_client::mock::{Fault, FaultDuration, MockImds};
use imds_client::{ErrorKind, ImdsClient, ManualTimeSource, SharedTimeSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TOKEN: &str = "/latest/api/token";
const LIST: &str = "/latest/meta-data/iam/security-credentials/";

fn client(imds: &MockImds) -> ImdsClient {
    ImdsClient::builder()
        .env(Env::empty())
        .endpoint(imds.endpoint())
        .unwrap()
        .build()
        .unwrap()
}

#[tokio::test]
async fn one_token_serves_many_requests_and_concurrent_callers_share_it() {
    let imds = MockImds::builder().role("app-role").start().await.unwrap();
    let client = client(&imds);
    let calls = (0..50).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { client.role_name().await })
    });
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), "app-role");
    }
    assert_eq!(client.instance_id().await.unwrap(), "i-0a1b2c3d4e5f60718");
    let counts = imds.request_counts();
    assert_eq!(counts.count("PUT", TOKEN), 1, "{counts:?}");
    assert_eq!(counts.count("GET", LIST), 50);
}

#[tokio::test]
async fn a_rejected_token_is_replaced_once() {
    let clock = ManualTimeSource::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000));
    let imds = MockImds::builder()
        .role("r")
        .time_source(SharedTimeSource::new(clock.clone()))
        .start()
        .await
        .unwrap();
    let client = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(imds.endpoint())
        .unwrap()
        .token_ttl(Duration::from_secs(600))
        .build()
        .unwrap();
    client.role_name().await.unwrap();
    // The server's clock moves past the TTL while ours does not: IMDS says 401.
    clock.advance(Duration::from_secs(601));
    assert_eq!(client.role_name().await.unwrap(), "r");
    let counts = imds.request_counts();
    assert_eq!(counts.count("PUT", TOKEN), 2);
    assert_eq!(
        counts.count("GET", LIST),
        3,
        "first call, the 401, the retry"
    );
}

#[tokio::test]
async fn credentials_prefer_the_extended_path_and_remember_the_classic_one() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let creds = client(&imds).role_credentials("r").await.unwrap();
    assert_eq!(creds.account_id(), Some("123456789012"));
    assert_eq!(&creds, &imds.current_credentials().unwrap());

    let classic = MockImds::builder()
        .role("r")
        .extended_credentials(false)
        .start()
        .await
        .unwrap();
    let client = client(&classic);
    let creds = client.role_credentials("r").await.unwrap();
    assert_eq!(creds.account_id(), None);
    client.role_credentials("r").await.unwrap();
    let counts = classic.request_counts();
    assert_eq!(
        counts.count(
            "GET",
            "/latest/meta-data/iam/security-credentials-extended/r"
        ),
        1
    );
    assert_eq!(
        counts.count("GET", "/latest/meta-data/iam/security-credentials/r"),
        2
    );
}

#[tokio::test]
async fn no_role_and_failure_codes_are_typed() {
    let imds = MockImds::builder().start().await.unwrap();
    let client = client(&imds);
    assert_eq!(
        client.role_name().await.unwrap_err().kind(),
        &ErrorKind::NoRoleAttached
    );
    assert_eq!(
        client.role_credentials("gone").await.unwrap_err().kind(),
        &ErrorKind::NoRoleAttached
    );
    assert_eq!(
        client.iam_info().await.unwrap_err().kind(),
        &ErrorKind::NoRoleAttached
    );

    imds.attach_role("r");
    imds.inject(
        Fault::Code {
            code: "AssumeRoleUnauthorizedAccess".into(),
            message: "EC2 cannot assume the role r".into(),
        },
        FaultDuration::Requests(1),
    );
    let err = client.role_credentials("r").await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::CredentialsUnavailable { code, .. } if code == "AssumeRoleUnauthorizedAccess")
    );
    assert!(err.hint().unwrap().contains("trust policy"));

    imds.inject(Fault::TruncatedBody, FaultDuration::Requests(1));
    let err = client.role_credentials("r").await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::MalformedResponse { .. }),
        "{err:?}"
    );

    let pinned = ImdsClient::builder()
        .env(Env::from_pairs([(
            "AWS_EC2_INSTANCE_PROFILE_NAME",
            "other",
        )]))
        .endpoint(imds.endpoint())
        .unwrap()
        .build()
        .unwrap();
    imds.reset_request_counts();
    assert_eq!(pinned.role_name().await.unwrap(), "other", "no discovery");
    assert_eq!(imds.request_counts().total, 0);
    assert_eq!(
        pinned.role_credentials("other").await.unwrap_err().kind(),
        &ErrorKind::RoleNotFound {
            role: "other".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn server_errors_and_throttling_are_retried_client_errors_are_not() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let client = client(&imds);
    client.role_name().await.unwrap();

    imds.reset_request_counts();
    imds.inject(Fault::Status { status: 503 }, FaultDuration::Requests(2));
    assert_eq!(client.role_name().await.unwrap(), "r");
    assert_eq!(imds.request_counts().count("GET", LIST), 3);

    imds.reset_request_counts();
    imds.inject(Fault::Status { status: 500 }, FaultDuration::Forever);
    let err = client.role_name().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::ServerError { status: 500 });
    assert_eq!(
        imds.request_counts().count("GET", LIST),
        4,
        "DEFAULT_MAX_ATTEMPTS"
    );
    imds.clear_faults();

    imds.reset_request_counts();
    imds.inject(Fault::Status { status: 429 }, FaultDuration::Requests(1));
    let started = tokio::time::Instant::now();
    assert_eq!(client.role_name().await.unwrap(), "r");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "429 waits longer: {:?}",
        started.elapsed()
    );
    assert_eq!(imds.request_counts().count("GET", LIST), 2);

    for status in [400, 403, 404] {
        imds.reset_request_counts();
        imds.inject(Fault::Status { status }, FaultDuration::Requests(1));
        assert!(client.get("/latest/meta-data/instance-id").await.is_err());
        assert_eq!(imds.request_counts().total, 1, "{status} is not retried");
        imds.clear_faults();
    }
}

#[tokio::test]
async fn nothing_listening_fails_fast_and_is_remembered() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .build()
        .unwrap();
    let err = client.role_name().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Unreachable);
    assert!(err.hint().unwrap().contains("EC2"));
    // The memo: a second call does not even try.
    let listener = TcpListener::bind(("127.0.0.1", port)).await;
    let err = client.role_name().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Unreachable);
    if let Ok(listener) = listener {
        let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(accepted.is_err(), "the second call must not connect");
    }
}

#[tokio::test]
async fn a_token_request_that_never_answers_names_the_hop_limit() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    imds.inject(Fault::TokenBlackhole, FaultDuration::Forever);
    let client = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(imds.endpoint())
        .unwrap()
        .read_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = client.role_name().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::TokenTimeout);
    assert!(err.hint().unwrap().contains("hop limit"));
    assert_eq!(
        imds.request_counts().count("GET", LIST),
        0,
        "no IMDSv1 fallback on a timeout"
    );
    // Remembered: the next call fails at once, without another token request.
    let tokens = imds.request_counts().count("PUT", "/latest/api/token");
    let err = client.role_name().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::TokenTimeout);
    assert_eq!(
        tokens,
        imds.request_counts().count("PUT", "/latest/api/token")
    );

    // Without the memo (the agent's setting), every call asks again.
    let unmemoised = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(imds.endpoint())
        .unwrap()
        .read_timeout(Duration::from_millis(200))
        .unreachable_memo(Duration::ZERO)
        .build()
        .unwrap();
    for round in 1..=2 {
        let before = imds.request_counts().count("PUT", "/latest/api/token");
        let err = unmemoised.role_name().await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::TokenTimeout);
        assert!(
            imds.request_counts().count("PUT", "/latest/api/token") > before,
            "call {round} asked for a token"
        );
    }
}

#[tokio::test]
async fn imdsv1_fallback_only_when_enabled_and_not_disabled_by_setting() {
    let imds = MockImds::builder()
        .role("r")
        .tokens_required(false)
        .start()
        .await
        .unwrap();
    // A disabled endpoint answers the token request 403, one of the statuses
    // for which the SDKs document the IMDSv1 fallback.
    imds.set_enabled(false);
    let strict = client(&imds);
    assert_eq!(
        strict.role_name().await.unwrap_err().kind(),
        &ErrorKind::TokenRejected { status: 403 }
    );
    let forbidden = ImdsClient::builder()
        .env(Env::from_pairs([("AWS_EC2_METADATA_V1_DISABLED", "true")]))
        .endpoint(imds.endpoint())
        .unwrap()
        .imdsv1_fallback(true)
        .build()
        .unwrap();
    assert_eq!(
        forbidden.role_name().await.unwrap_err().kind(),
        &ErrorKind::TokenRejected { status: 403 }
    );
    let lenient = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(imds.endpoint())
        .unwrap()
        .imdsv1_fallback(true)
        .build()
        .unwrap();
    // With fallback the GET goes out without a token (and here also gets 403,
    // since the whole endpoint is off): what matters is that it was sent.
    imds.reset_request_counts();
    let _ = lenient.role_name().await;
    assert_eq!(imds.request_counts().count("GET", LIST), 1);
}

#[tokio::test]
async fn oversized_answers_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let body = if request.starts_with("PUT") {
                    "token".to_owned()
                } else {
                    "x".repeat(1 << 20)
                };
                let head =
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
                let _ = socket.write_all(head.as_bytes()).await;
                for chunk in body.as_bytes().chunks(8192) {
                    let _ = socket
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await;
                    let _ = socket.write_all(chunk).await;
                    let _ = socket.write_all(b"\r\n").await;
                }
                let _ = socket.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    let client = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(format!("http://{addr}"))
        .unwrap()
        .build()
        .unwrap();
    let err = client.get("/latest/meta-data/big").await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::ResponseTooLarge { limit: 64 * 1024 }
    );
}

#[tokio::test]
async fn disabled_means_no_io_at_all() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let client = ImdsClient::builder()
        .env(Env::from_pairs([("AWS_EC2_METADATA_DISABLED", "TRUE")]))
        .endpoint(imds.endpoint())
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(
        client.role_name().await.unwrap_err().kind(),
        &ErrorKind::Disabled
    );
    assert_eq!(imds.request_counts().total, 0);
}

#[test]
fn settings_follow_builder_then_environment_then_defaults() {
    let env = Env::from_pairs([
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9999"),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6"),
    ]);
    let from_env = ImdsClient::builder().env(env.clone()).build().unwrap();
    assert_eq!(
        from_env.endpoint(),
        "http://127.0.0.1:9999",
        "endpoint beats mode"
    );
    let explicit = ImdsClient::builder()
        .env(env)
        .endpoint("http://127.0.0.1:1")
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(explicit.endpoint(), "http://127.0.0.1:1");
    let mode = ImdsClient::builder()
        .env(Env::from_pairs([(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
            "ipv6",
        )]))
        .build()
        .unwrap();
    assert_eq!(mode.endpoint(), "http://[fd00:ec2::254]");
    let default = ImdsClient::builder().env(Env::empty()).build().unwrap();
    assert_eq!(default.endpoint(), "http://169.254.169.254");

    for (key, value) in [
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "ipv5"),
        ("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "many"),
        ("AWS_METADATA_SERVICE_TIMEOUT", "-1"),
        ("AWS_EC2_METADATA_DISABLED", "perhaps"),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "169.254.169.254"),
    ] {
        let err = ImdsClient::builder()
            .env(Env::from_pairs([(key, value)]))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains(key), "{key}: {err}");
    }
    for ttl in [0, 21_601] {
        let err = ImdsClient::builder()
            .env(Env::empty())
            .token_ttl(Duration::from_secs(ttl))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("token_ttl"), "{err}");
    }
}

#[tokio::test]
async fn a_role_name_iam_would_not_allow_is_refused() {
    let imds = MockImds::builder().start().await.unwrap();
    let client = client(&imds);
    for bad in ["role\r[evil]", "role name", "r\u{e9}le", &"r".repeat(65)] {
        imds.attach_role(bad);
        let err = client.role_name().await.unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::MalformedResponse { .. }),
            "{bad:?}: {err:?}"
        );
    }
    imds.attach_role("app_role+=,.@-1");
    assert_eq!("app_role+=,.@-1", client.role_name().await.unwrap());
}

/// A loopback listener that never accepts, with its accept queue full, so
/// the kernel drops every further SYN: a handshake that never completes,
/// like 169.254.169.254 off EC2.
async fn listener_that_drops_syns() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    // On loopback a handshake completes within the connect call or not at
    // all, so the first one still pending after 500 ms shows the queue is full.
    for _ in 0..16 {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(e)) => panic!("filling the accept queue of {addr}: {e}"),
            Err(_) => return (listener, fillers),
        }
    }
    panic!(
        "the accept queue of {addr} never filled ({} connections)",
        fillers.len()
    );
}

fn client_with_timeouts(endpoint: String) -> ImdsClient {
    ImdsClient::builder()
        .env(Env::empty())
        .endpoint(endpoint)
        .unwrap()
        // A read timeout shorter than the connect timeout: one timeout for
        // both would fire first and call a dead handshake a hop-limit problem.
        .connect_timeout(Duration::from_millis(400))
        .read_timeout(Duration::from_millis(200))
        .unreachable_memo(Duration::ZERO)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_unreachable_not_the_hop_limit() {
    let (listener, _fillers) = listener_that_drops_syns().await;
    let client = client_with_timeouts(format!("http://{}", listener.local_addr().unwrap()));
    let err = client.role_name().await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::Unreachable,
        "expected Unreachable for a handshake that never completes, got {err:?}"
    );
    let hint = err.hint().unwrap();
    assert!(
        hint.contains("EC2"),
        "expected the not-on-EC2 hint, got {hint:?}"
    );
    assert!(!hint.contains("hop limit"), "{hint}");
}

#[tokio::test]
async fn a_connection_whose_token_reply_never_comes_names_the_hop_limit() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Accept, read the request, never answer.
        while let Ok((socket, _)) = listener.accept().await {
            let _ = accepted_tx.send(());
            tokio::spawn(async move {
                let mut socket = socket;
                let mut buf = [0u8; 4096];
                while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    let client = client_with_timeouts(format!("http://{addr}"));
    let err = client.role_name().await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::TokenTimeout,
        "expected TokenTimeout for a connected token request with no reply, got {err:?}"
    );
    assert!(err.hint().unwrap().contains("hop limit"));
    assert!(
        accepted_rx.try_recv().is_ok(),
        "the listener must have accepted the connection"
    );
}

/// Counts connections to a loopback listener standing for "another host",
/// answering each with a 200 only after counting it.
async fn elsewhere() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nstolen",
                    )
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn redirects_are_errors_naming_status_and_location_and_go_nowhere() {
    let (addr, seen) = elsewhere().await;
    let imds = MockImds::builder().role("r").start().await.unwrap();
    for status in [301, 302, 303, 307, 308] {
        let client = client(&imds);
        // The token request redirected.
        let location = format!("http://{addr}/latest/api/token");
        imds.inject(
            Fault::Redirect {
                status,
                location: location.clone(),
            },
            FaultDuration::Requests(1),
        );
        let err = client.role_name().await.unwrap_err();
        assert_eq!(
            err.kind(),
            &ErrorKind::Redirected {
                status,
                location: Some(location.clone())
            },
            "token PUT answered {status}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&status.to_string()) && text.contains(&location),
            "the error names the status and the Location: {text}"
        );
        // A metadata request redirected, once a token is held.
        assert_eq!(client.instance_id().await.unwrap(), "i-0a1b2c3d4e5f60718");
        let location = format!("http://{addr}{LIST}");
        imds.inject(
            Fault::Redirect {
                status,
                location: location.clone(),
            },
            FaultDuration::Requests(1),
        );
        let err = client.role_name().await.unwrap_err();
        assert_eq!(
            err.kind(),
            &ErrorKind::Redirected {
                status,
                location: Some(location)
            },
            "GET answered {status}"
        );
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the host the redirects named must never be contacted (it would get the session token)"
    );
}

#[tokio::test]
async fn a_moto_like_500_on_the_extended_path_falls_back_to_the_classic_one_for_good() {
    const EXTENDED: &str = "/latest/meta-data/iam/security-credentials-extended/r";
    const CLASSIC: &str = "/latest/meta-data/iam/security-credentials/r";
    let imds = MockImds::builder().role("r").start().await.unwrap();
    imds.inject(
        Fault::ExtendedPathStatus { status: 500 },
        FaultDuration::Forever,
    );
    let client = client(&imds);
    let creds = client.role_credentials("r").await.unwrap();
    let issued = imds.current_credentials().unwrap();
    assert_eq!(creds.access_key_id(), issued.access_key_id());
    assert_eq!(creds.secret_access_key(), issued.secret_access_key());
    assert_eq!(
        creds.account_id(),
        None,
        "the classic path has no account id"
    );
    let asked = imds.request_counts().count("GET", EXTENDED);
    assert!(asked >= 1, "the extended path is tried first");
    client.role_credentials("r").await.unwrap();
    let counts = imds.request_counts();
    assert_eq!(
        counts.count("GET", EXTENDED),
        asked,
        "the extended path is not asked again: {counts:?}"
    );
    assert_eq!(counts.count("GET", CLASSIC), 2, "{counts:?}");

    // A 429 or 401 says nothing about the path: no fallback.
    for (status, kind) in [(429, ErrorKind::Throttled), (401, ErrorKind::Unauthorized)] {
        imds.clear_faults();
        imds.reset_request_counts();
        imds.inject(Fault::ExtendedPathStatus { status }, FaultDuration::Forever);
        let client = ImdsClient::builder()
            .env(Env::empty())
            .endpoint(imds.endpoint())
            .unwrap()
            .max_attempts(1)
            .build()
            .unwrap();
        let err = client.role_credentials("r").await.unwrap_err();
        assert_eq!(err.kind(), &kind, "{status}");
        assert_eq!(
            imds.request_counts().count("GET", CLASSIC),
            0,
            "{status} must not switch to the classic path"
        );
    }
}

/// A credentials document is never handed out as a plain `String`: `get`
/// refuses the path before sending anything, and `get_secret` returns it
/// redacted in `Debug`.
#[tokio::test]
async fn credentials_paths_come_back_only_as_secrets() {
    let imds = MockImds::builder().role("app-role").start().await.unwrap();
    let client = client(&imds);
    let path = format!("{LIST}app-role");
    let err = client.get(&path).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::InvalidConfiguration { .. }),
        "expected InvalidConfiguration, got {err:?}"
    );
    assert!(err.to_string().contains("get_secret"), "{err}");
    assert_eq!(imds.request_counts().total, 0, "nothing was sent");

    let secret = client.get_secret(&path).await.unwrap();
    let issued = imds.current_credentials().unwrap();
    assert!(secret.expose().contains(issued.secret_access_key()));
    assert!(!format!("{secret:?}").contains(issued.secret_access_key()));
    // The list of roles holds only names: a plain string.
    assert_eq!(client.get(LIST).await.unwrap().trim(), "app-role");
}

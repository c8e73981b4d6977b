//! The provider over the real client against the emulator: the AWS SDK for
//! Rust resolves our credentials, and no secret reaches the logs.
#![cfg(feature = "mock")]

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use imds_client::config::Env;
use imds_client::mock::{Fault, FaultDuration, MockImds};
use imds_client::{
    Credentials, ErrorKind, ImdsClient, ImdsCredentialsProvider, ManualTimeSource, ProviderState,
    SharedTimeSource,
};

const MINUTE: Duration = Duration::from_secs(60);

fn provider_for(imds: &MockImds) -> ImdsCredentialsProvider {
    let client = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(imds.endpoint())
        .unwrap()
        .build()
        .unwrap();
    ImdsCredentialsProvider::builder()
        .imds_client(client)
        .build()
}

#[tokio::test]
async fn the_aws_sdk_resolves_the_credentials_the_emulator_issued() {
    let imds = MockImds::builder().role("app-role").start().await.unwrap();
    let shared = SharedCredentialsProvider::new(provider_for(&imds));
    let config = aws_config::SdkConfig::builder()
        .credentials_provider(shared)
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let resolved = config
        .credentials_provider()
        .unwrap()
        .provide_credentials()
        .await
        .unwrap();
    let issued = imds.current_credentials().unwrap();
    assert_eq!(resolved.access_key_id(), issued.access_key_id());
    assert_eq!(resolved.secret_access_key(), issued.secret_access_key());
    assert_eq!(resolved.session_token(), Some(issued.session_token()));
    assert_eq!(resolved.expiry(), Some(issued.expiration()));
    assert_eq!(
        resolved.account_id().map(|a| a.as_str()),
        Some("123456789012")
    );
}

#[tokio::test]
async fn cold_start_herd_makes_three_imds_requests() {
    let imds = MockImds::builder().role("app-role").start().await.unwrap();
    let provider = provider_for(&imds);
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let provider = provider.clone();
            tokio::spawn(async move { provider.credentials().await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let counts = imds.request_counts();
    assert_eq!(counts.total, 3, "{counts:?}");
    assert_eq!(counts.count("PUT", "/latest/api/token"), 1);
    assert_eq!(
        counts.count("GET", "/latest/meta-data/iam/security-credentials/"),
        1
    );
    assert_eq!(
        counts.count(
            "GET",
            "/latest/meta-data/iam/security-credentials-extended/app-role"
        ),
        1
    );
}

#[tokio::test]
async fn sdk_error_taxonomy_for_no_role_and_trust_policy() {
    let imds = MockImds::builder().start().await.unwrap();
    let provider = provider_for(&imds);
    let err = provider.provide_credentials().await.unwrap_err();
    assert!(
        matches!(
            err,
            aws_credential_types::provider::error::CredentialsError::CredentialsNotLoaded(_)
        ),
        "{err:?}"
    );

    imds.attach_role("r");
    imds.inject(
        Fault::Code {
            code: "AssumeRoleUnauthorizedAccess".into(),
            message: "EC2 cannot assume the role r".into(),
        },
        FaultDuration::Forever,
    );
    let provider = provider_for(&imds);
    let err = provider.provide_credentials().await.unwrap_err();
    assert!(
        matches!(
            err,
            aws_credential_types::provider::error::CredentialsError::InvalidConfiguration(_)
        ),
        "{err:?}"
    );
    assert!(matches!(
        provider.credentials().await.unwrap_err().kind(),
        ErrorKind::CredentialsUnavailable { .. }
    ));
}

#[tokio::test]
#[tracing_test::traced_test]
async fn no_secret_reaches_the_logs_across_a_lifecycle() {
    let imds = MockImds::builder().role("first").start().await.unwrap();
    let provider = provider_for(&imds);
    let mut secrets = Vec::new();
    let first = provider.credentials().await.unwrap();
    secrets.push(first.secret_access_key().to_owned());
    secrets.push(first.session_token().to_owned());
    imds.replace_role("second");
    let second = provider.poll().await.unwrap();
    secrets.push(second.credentials.secret_access_key().to_owned());
    secrets.push(second.credentials.session_token().to_owned());
    imds.inject(Fault::Status { status: 503 }, FaultDuration::Requests(20));
    let _ = provider.refresh_now().await;
    imds.clear_faults();
    imds.detach_role();
    let _ = provider.poll().await;
    // Debug of the provider and of both credentials shows no secret, and
    // does show the public key id (so it is not just empty).
    let debug = format!("{provider:?} {first:?} {second:?}");
    for secret in &secrets {
        assert!(
            !debug.contains(secret.as_str()),
            "a secret key or session token appeared in the Debug output of the provider or the credentials"
        );
    }
    assert!(
        debug.contains(first.access_key_id()) && debug.contains(second.credentials.access_key_id()),
        "expected the access key ids in the Debug output: {debug}"
    );
    logs_assert(|lines: &[&str]| {
        if lines.is_empty() {
            return Err("expected some log lines".into());
        }
        for line in lines {
            for secret in &secrets {
                if line.contains(secret.as_str()) {
                    return Err(format!("a secret leaked into: {line}"));
                }
            }
        }
        Ok(())
    });
    assert!(logs_contain("fetched instance-role credentials"));
    assert!(logs_contain("detached"));
}

#[tokio::test]
async fn credentials_load_from_a_moto_like_endpoint_that_answers_500_on_the_extended_path() {
    let imds = MockImds::builder().role("app-role").start().await.unwrap();
    imds.inject(
        Fault::ExtendedPathStatus { status: 500 },
        FaultDuration::Forever,
    );
    let provider = provider_for(&imds);
    let credentials = provider.credentials().await.unwrap();
    let issued = imds.current_credentials().unwrap();
    assert_eq!(credentials.access_key_id(), issued.access_key_id());
    assert_eq!(credentials.secret_access_key(), issued.secret_access_key());
    assert_eq!(
        imds.request_counts()
            .count("GET", "/latest/meta-data/iam/security-credentials/app-role"),
        1,
        "the classic path served them"
    );
}

/// An emulator and a provider (default windows unless `advisory` is given)
/// on one manual wall clock.
async fn on_manual_clock(
    advisory: Option<Duration>,
) -> (MockImds, ImdsCredentialsProvider, ManualTimeSource) {
    let clock = ManualTimeSource::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000));
    let time = SharedTimeSource::new(clock.clone());
    let imds = MockImds::builder()
        .role("app-role")
        .time_source(time.clone())
        .start()
        .await
        .unwrap();
    let client = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(imds.endpoint())
        .unwrap()
        .build()
        .unwrap();
    let mut builder = ImdsCredentialsProvider::builder()
        .imds_client(client)
        .time_source(time);
    if let Some(window) = advisory {
        builder = builder.advisory_refresh_window(window);
    }
    (imds, builder.build(), clock)
}

/// Waits (60 s at most) until the provider publishes credentials other
/// than `old`.
async fn wait_for_new_credentials(
    provider: &ImdsCredentialsProvider,
    old: &Credentials,
    what: &str,
) {
    let mut state = provider.subscribe();
    let replaced = |s: &ProviderState| {
        s.current()
            .is_some_and(|c| c.credentials.access_key_id() != old.access_key_id())
    };
    if tokio::time::timeout(Duration::from_secs(60), state.wait_for(replaced))
        .await
        .is_err()
    {
        panic!(
            "{what}: expected a refresh to credentials other than {} within 60 s; the state stayed {:?}",
            old.access_key_id(),
            *state.borrow()
        );
    }
}

#[tokio::test]
async fn a_date_three_years_off_on_one_response_does_not_stall_refresh() {
    let three_years: i64 = 3 * 365 * 24 * 3600;
    for skew in [-three_years, three_years] {
        let (imds, provider, clock) = on_manual_clock(None).await;
        imds.set_clock_skew(skew);
        let first = provider.credentials().await.unwrap();
        imds.set_clock_skew(0);
        let requests = imds.request_counts().total;
        // Still fresh on the local clock: served from the cache whatever
        // that one Date said (3 years ahead would have made them look expired).
        assert_eq!(
            provider.credentials().await.unwrap().access_key_id(),
            first.access_key_id(),
            "skew {skew} s: fresh credentials are served from the cache"
        );
        assert_eq!(
            imds.request_counts().total,
            requests,
            "skew {skew} s: no request while fresh"
        );

        // 15 minutes before expiry is inside the default advisory window
        // (24 to 30 minutes for six-hour credentials): served at once, and a
        // background refresh fetches the emulator's newer credentials.
        clock.set(first.expiration() - 15 * MINUTE);
        assert_eq!(
            provider.credentials().await.unwrap().access_key_id(),
            first.access_key_id(),
            "skew {skew} s: the advisory window serves the cached credentials at once"
        );
        wait_for_new_credentials(&provider, &first, &format!("a Date {skew} s off")).await;
    }
}

#[tokio::test]
async fn a_role_check_remeasures_the_clock_skew() {
    let (imds, provider, clock) = on_manual_clock(Some(20 * MINUTE)).await;
    let first = provider.credentials().await.unwrap();
    // 25 minutes before expiry on the local clock: outside the 20-minute
    // advisory window, so nothing is asked.
    clock.set(first.expiration() - 25 * MINUTE);
    let requests = imds.request_counts().total;
    provider.credentials().await.unwrap();
    assert_eq!(
        imds.request_counts().total,
        requests,
        "no request outside the advisory window"
    );

    // IMDS's clock is 10 minutes ahead: on its time 15 minutes remain. The
    // agent's periodic role check is the only response that can tell.
    imds.set_clock_skew(600);
    let polled = provider.poll().await.unwrap();
    assert_eq!(
        polled.credentials.access_key_id(),
        first.access_key_id(),
        "the advisory window serves the cached credentials at once"
    );
    wait_for_new_credentials(&provider, &first, "after a role check 10 minutes ahead").await;
}

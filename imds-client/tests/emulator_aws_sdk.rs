//! Fidelity shown by a client we did not write: the AWS SDK for Rust's own
//! IMDS client and `ImdsCredentialsProvider` against the emulator.
#![cfg(feature = "mock")]

use aws_config::imds::client::Client as SdkImdsClient;
use aws_config::imds::credentials::ImdsCredentialsProvider as SdkImdsProvider;
use aws_credential_types::provider::ProvideCredentials;
use imds_client::mock::MockImds;

fn sdk_provider(imds: &MockImds) -> SdkImdsProvider {
    let client = SdkImdsClient::builder()
        .endpoint(imds.endpoint())
        .expect("loopback endpoint is valid")
        .build();
    SdkImdsProvider::builder().imds_client(client).build()
}

#[tokio::test]
async fn the_sdk_reads_metadata_with_a_session_token() {
    let imds = MockImds::builder().role("app-role").start().await.unwrap();
    let client = SdkImdsClient::builder()
        .endpoint(imds.endpoint())
        .unwrap()
        .build();
    let id: String = client
        .get("/latest/meta-data/instance-id")
        .await
        .unwrap()
        .into();
    assert!(id.starts_with("i-"));
    let counts = imds.request_counts();
    assert_eq!(counts.count("PUT", "/latest/api/token"), 1);
}

#[tokio::test]
async fn the_sdk_provider_gets_credentials_follows_a_replacement_and_fails_after_detach() {
    let imds = MockImds::builder()
        .role("first-role")
        .start()
        .await
        .unwrap();
    let provider = sdk_provider(&imds);
    let first = provider
        .provide_credentials()
        .await
        .expect("credentials from the emulator");
    let served = imds.current_credentials().unwrap();
    assert_eq!(first.access_key_id(), served.access_key_id());
    assert_eq!(first.secret_access_key(), served.secret_access_key());
    assert_eq!(first.session_token(), Some(served.session_token()));
    assert_eq!(first.expiry(), Some(served.expiration()));

    imds.replace_role("second-role");
    // Without the SDK's identity cache in front, each call goes to IMDS and
    // re-reads the role name, so the same provider sees the new role.
    let second = provider.provide_credentials().await.unwrap();
    let served = imds.current_credentials().unwrap();
    assert_eq!(second.access_key_id(), served.access_key_id());
    assert_ne!(second.access_key_id(), first.access_key_id());

    imds.detach_role();
    // A new SDK provider (a new process) gets an error...
    let err = sdk_provider(&imds).provide_credentials().await.unwrap_err();
    let shown = format!("{err:?}");
    assert!(
        shown.contains("404") || shown.to_lowercase().contains("profile"),
        "{shown}"
    );
    // ...while the long-lived SDK provider falls back to the detached role's
    // last credentials (its static stability). Our provider must not do that;
    // this assertion records the SDK behaviour we differ from.
    let kept = provider.provide_credentials().await.unwrap();
    assert_eq!(kept.access_key_id(), second.access_key_id());
}

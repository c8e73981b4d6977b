//! The provider plugged into an AWS SDK for Rust configuration.
//!
//! Runs against the bundled emulator so it works anywhere:
//!
//! ```sh
//! cargo run -p imds-client --features mock --example with_aws_sdk
//! ```
//!
//! On EC2, build the client with `ImdsClient::builder().build()` instead and
//! pass `sdk_config` to any service client (`aws_sdk_s3::Client::new(&sdk_config)`).

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use imds_client::mock::MockImds;
use imds_client::{ImdsClient, ImdsCredentialsProvider};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let imds = MockImds::builder().role("example-role").start().await?;
    let client = ImdsClient::builder().endpoint(imds.endpoint())?.build()?;
    let provider = ImdsCredentialsProvider::builder()
        .imds_client(client)
        .build();

    let sdk_config = aws_config::SdkConfig::builder()
        .credentials_provider(SharedCredentialsProvider::new(provider))
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .build();

    let credentials = sdk_config
        .credentials_provider()
        .expect("set above")
        .provide_credentials()
        .await?;
    println!("the SDK resolved {}", credentials.access_key_id());
    println!("expires {:?}", credentials.expiry());
    Ok(())
}

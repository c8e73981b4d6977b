//! Prints the attached role, its access key id and expiry (never the secret).
//!
//! The endpoint comes from the standard settings, so against the emulator:
//!
//! ```sh
//! cargo run -p imds-agent -- mock-imds --listen 127.0.0.1:8080 --role demo-role &
//! AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:8080 \
//!     cargo run -p imds-client --example fetch_credentials
//! ```

use std::process::ExitCode;

use imds_client::ImdsClient;

/// Prints the credentials' public parts, or the error and its hint (exit 1).
/// A bad setting (say `AWS_METADATA_SERVICE_TIMEOUT=1e20`) is such an error.
#[tokio::main(flavor = "current_thread")]
pub(crate) async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            if let Some(hint) = err.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), imds_client::Error> {
    let client = ImdsClient::builder().build()?;
    let role = client.role_name().await?;
    let credentials = client.role_credentials(&role).await?;
    println!("role:        {role}");
    println!("AccessKeyId: {}", credentials.access_key_id());
    println!("Expiration:  {}", credentials.expiration_rfc3339());
    Ok(())
}

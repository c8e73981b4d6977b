//! Prints the instance id, region and instance identity document.
//!
//! ```sh
//! AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:8080 \
//!     cargo run -p imds-client --example instance_metadata
//! ```

use std::process::ExitCode;

use imds_client::ImdsClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
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
    println!("instance id: {}", client.instance_id().await?);
    println!("region:      {}", client.region().await?);
    println!(
        "identity document:\n{}",
        client.instance_identity_document().await?
    );
    Ok(())
}

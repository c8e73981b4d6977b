//! `imds-agent mock-imds`: the emulator as a standalone process.

use std::time::Duration;

use anyhow::Context;
use imds_client::mock::MockImds;

use crate::cli::MockImdsArgs;

/// Runs the emulator until `shutdown` (SIGTERM or SIGINT).
pub async fn run(
    args: MockImdsArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut builder = MockImds::builder()
        .listen(args.listen)
        .credential_lifetime(Duration::from_secs(args.credential_lifetime))
        .rotation_interval(Duration::from_secs(args.rotation_interval))
        .tokens_required(!args.tokens_optional);
    if let Some(role) = &args.role {
        builder = builder.role(role);
    }
    let imds = builder
        .start()
        .await
        .with_context(|| format!("starting the IMDS emulator on {}", args.listen))?;
    println!("IMDS emulator listening on {}", imds.endpoint());
    match &args.role {
        Some(role) => println!("role attached: {role}"),
        None => println!(
            "no role attached (PUT a name to {}/_mock/role)",
            imds.endpoint()
        ),
    }
    tracing::info!(endpoint = %imds.endpoint(), "IMDS emulator started");
    shutdown.await;
    tracing::info!("stopping the IMDS emulator");
    imds.shutdown().await;
    Ok(())
}

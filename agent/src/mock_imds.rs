//! `imds-agent mock-imds`: the IMDS emulator, and the STS emulator beside
//! it, as a standalone process.

use std::time::Duration;

use anyhow::Context;
use imds_client::mock::{MockImds, MockSts};

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
    // The STS emulator beside it, on a loopback port of its own, verifying
    // SigV4 against the credentials this IMDS emulator issues: for the
    // agent's consumers (`run --config`).
    let sts_listen = std::net::SocketAddr::new(args.listen.ip(), 0);
    let sts = MockSts::for_imds(&imds)
        .listen(sts_listen)
        .start()
        .await
        .with_context(|| format!("starting the STS emulator on {sts_listen}"))?;
    println!("AWS_ENDPOINT_URL_STS={}", sts.endpoint());
    tracing::info!(endpoint = %imds.endpoint(), sts = %sts.endpoint(), "IMDS and STS emulators started");
    shutdown.await;
    tracing::info!("stopping the IMDS and STS emulators");
    sts.shutdown().await;
    imds.shutdown().await;
    Ok(())
}

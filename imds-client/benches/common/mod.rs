//! Shared by the benchmarks: the emulator, both providers built the same way,
//! the SDK's identity cache driven as the SDK's orchestrator drives it, and
//! the result rows the `scripts/bench` table is made of.

use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aws_config::imds::client::Client as SdkImdsClient;
use aws_config::imds::credentials::ImdsCredentialsProvider as SdkImdsProvider;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_smithy_async::rt::sleep::{SharedAsyncSleep, TokioSleep};
use aws_smithy_async::time::{SharedTimeSource, SystemTimeSource};
use aws_smithy_runtime::client::auth::no_auth::{NO_AUTH_SCHEME_ID, NoAuthScheme};
use aws_smithy_runtime::client::identity::IdentityCache;
use aws_smithy_runtime::client::orchestrator::endpoints::StaticUriEndpointResolver;
use aws_smithy_runtime::client::retries::strategy::NeverRetryStrategy;
use aws_smithy_runtime_api::client::auth::static_resolver::StaticAuthSchemeOptionResolver;
use aws_smithy_runtime_api::client::identity::{
    Identity, ResolveCachedIdentity, SharedIdentityCache, SharedIdentityResolver,
};
use aws_smithy_runtime_api::client::runtime_components::{
    RuntimeComponents, RuntimeComponentsBuilder,
};
use aws_smithy_types::config_bag::ConfigBag;
use imds_client::config::Env;
use imds_client::mock::MockImds;
use imds_client::{ImdsClient, ImdsCredentialsProvider};

/// The role the emulator serves.
pub(crate) const ROLE: &str = "bench-role";

/// True unless cargo ran us as a benchmark (`cargo bench` passes `--bench`):
/// under `cargo test` every scenario runs once, small, as a smoke test.
pub(crate) fn smoke() -> bool {
    std::env::var_os("IMDS_BENCH_SMOKE").is_some() || !std::env::args().any(|a| a == "--bench")
}

/// A started emulator with the bench role attached.
pub(crate) async fn emulator() -> MockImds {
    MockImds::builder()
        .role(ROLE)
        .start()
        .await
        .expect("emulator starts on a loopback port")
}

/// Our provider, default settings, pointed at `endpoint` (the process
/// environment ignored, so a developer's AWS_* variables do not skew it).
pub(crate) fn ours(endpoint: &str) -> ImdsCredentialsProvider {
    let client = ImdsClient::builder()
        .env(Env::empty())
        .endpoint(endpoint)
        .expect("valid endpoint")
        .build()
        .expect("client builds");
    ImdsCredentialsProvider::builder()
        .imds_client(client)
        .build()
}

/// aws-config's IMDS provider, default settings, pointed at `endpoint`.
pub(crate) fn sdk_provider(endpoint: &str) -> SdkImdsProvider {
    let client = SdkImdsClient::builder()
        .endpoint(endpoint)
        .expect("valid endpoint")
        .build();
    SdkImdsProvider::builder().imds_client(client).build()
}

/// aws-config's provider behind the SDK's default identity cache
/// (`IdentityCache::lazy()`), called the way the SDK's orchestrator calls it
/// before every request: `resolve_cached_identity` with the client's runtime
/// components (time source and sleep) and config bag.
#[derive(Debug)]
pub(crate) struct SdkCached {
    cache: SharedIdentityCache,
    resolver: SharedIdentityResolver,
    components: RuntimeComponents,
    bag: ConfigBag,
}

impl SdkCached {
    /// The SDK's stack over `provider`.
    pub(crate) fn new(provider: SdkImdsProvider) -> Self {
        let cache = IdentityCache::lazy().build();
        let resolver = SharedIdentityResolver::new(SharedCredentialsProvider::new(provider));
        // The cache reads only the time source and the sleep; the other
        // components are required by the builder and never called here.
        let components = RuntimeComponentsBuilder::new("imds-bench")
            .with_time_source(Some(SharedTimeSource::new(SystemTimeSource::new())))
            .with_sleep_impl(Some(SharedAsyncSleep::new(TokioSleep::new())))
            .with_identity_cache(Some(cache.clone()))
            .with_identity_resolver(NO_AUTH_SCHEME_ID, resolver.clone())
            .with_auth_scheme(NoAuthScheme::new())
            .with_auth_scheme_option_resolver(Some(StaticAuthSchemeOptionResolver::new(vec![
                NO_AUTH_SCHEME_ID,
            ])))
            .with_endpoint_resolver(Some(StaticUriEndpointResolver::http_localhost(80)))
            .with_retry_strategy(Some(NeverRetryStrategy::new()))
            .build()
            .expect("components build");
        Self {
            cache,
            resolver,
            components,
            bag: ConfigBag::base(),
        }
    }

    /// One credentials lookup, as before an SDK request. Needs a tokio
    /// runtime context (the cache arms a load timeout).
    pub(crate) async fn get(&self) -> Result<Identity, String> {
        self.cache
            .resolve_cached_identity(self.resolver.clone(), &self.components, &self.bag)
            .await
            .map_err(|e| format!("{e}"))
    }
}

/// Polls `future` once with a no-op waker and returns its output when it is
/// ready at once (a cached read); otherwise drives it on `rt`. Keeps the
/// executor's own cost out of the cached-call figures, for both providers.
pub(crate) fn now_or_block<F: Future>(rt: &tokio::runtime::Runtime, future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => rt.block_on(future),
    }
}

/// Reads a monotonic clock (benchmarks only measure; nothing here is tested
/// against a moved clock).
#[allow(clippy::disallowed_methods)] // reason: benchmarks time real work on the real clock
pub(crate) fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// The median of `samples` (sorted in place).
pub(crate) fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A duration shown with a unit that fits it.
pub(crate) fn show(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else if ns < 10_000_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", ns as f64 / 1e9)
    }
}

/// `ours / sdk` as "0.05x" (lower is better for times).
pub(crate) fn ratio(ours: Duration, sdk: Duration) -> String {
    if sdk.is_zero() {
        return "-".into();
    }
    format!("{:.3}x", ours.as_secs_f64() / sdk.as_secs_f64())
}

/// One row of the results table: figure, ours, SDK, ratio, target, met.
#[derive(Debug, Default)]
pub(crate) struct Row<'a> {
    /// What was measured.
    pub(crate) figure: &'a str,
    /// Our figure.
    pub(crate) ours: String,
    /// The SDK's figure, or empty.
    pub(crate) sdk: String,
    /// ours / SDK, or empty.
    pub(crate) ratio: String,
    /// The target, or empty.
    pub(crate) target: &'a str,
    /// Whether the target was met: Some(true/false), or None (no target).
    pub(crate) met: Option<bool>,
}

/// Prints `row` and appends it (tab-separated) to `$IMDS_BENCH_RESULTS` when set.
pub(crate) fn report(row: Row<'_>) {
    // Smoke runs are tiny (and, under `cargo test`, unoptimised): no verdicts.
    let met = if smoke() { None } else { row.met };
    let met = match met {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let mut line = String::new();
    let _ = write!(
        line,
        "{}\t{}\t{}\t{}\t{}\t{}",
        row.figure,
        dash(&row.ours),
        dash(&row.sdk),
        dash(&row.ratio),
        dash(row.target),
        met
    );
    println!("RESULT\t{line}");
    if let Some(path) = std::env::var_os("IMDS_BENCH_RESULTS") {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("results file opens");
        writeln!(file, "{line}").expect("results file is writable");
    }
}

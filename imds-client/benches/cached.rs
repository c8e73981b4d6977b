//! Cached calls, ours against aws-config's `ImdsCredentialsProvider` behind
//! the SDK's identity cache, on the same emulator: 1 thread, and 2 threads at
//! once (time per call on each thread). Ours twice: the native
//! `credentials()` and the SDK trait's `provide_credentials()`, the path SDK
//! users take. Criterion measures; the medians are
//! then read back from criterion's estimates and reported as table rows.
//!
//! `cargo bench -p imds-client --features mock --bench cached`. Under
//! `cargo test` criterion runs each benchmark once (its test mode).

#![allow(missing_docs)] // reason: a benchmark binary, not an API

#[allow(dead_code)] // reason: each benchmark uses part of the shared module
mod common;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::Duration;

use aws_credential_types::credential_feature::AwsCredentialFeature;
use aws_credential_types::provider::ProvideCredentials;
use common::{Row, SdkCached, now, now_or_block, ratio, report, show};
use criterion::{Bencher, Criterion};

const GROUP: &str = "cached";

/// Runs `call` on 2 threads at once, `iters` times each, and returns the
/// slower thread's time: per call, what each caller sees while both run.
fn two_threads<T>(
    rt: &tokio::runtime::Runtime,
    iters: u64,
    call: &(dyn Fn() -> T + Sync),
) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let _entered = rt.enter();
                    barrier.wait();
                    let start = now();
                    for _ in 0..iters {
                        black_box(call());
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("criterion")
}

/// Criterion's median estimate for `id`, if it ran.
fn median_of(dir: &Path, id: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(dir.join(GROUP).join(id).join("new/estimates.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let ns = json["median"]["point_estimate"].as_f64()?;
    Some(Duration::from_secs_f64(ns / 1e9))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = rt.enter();
    let imds = rt.block_on(common::emulator());
    let endpoint = imds.endpoint();

    let ours = common::ours(&endpoint);
    let sdk = SdkCached::new(common::sdk_provider(&endpoint));
    // Warm both caches: what follows is the cached path only.
    rt.block_on(ours.credentials()).expect("our first fetch");
    rt.block_on(sdk.get()).expect("the SDK's first fetch");
    let before = imds.request_counts().total;

    let dir = criterion_dir();
    let mut c = Criterion::default()
        .output_directory(&dir)
        .configure_from_args();
    {
        let mut group = c.benchmark_group(GROUP);
        group.bench_function("ours_1_thread", |b: &mut Bencher<'_>| {
            b.iter(|| now_or_block(&rt, ours.credentials()).expect("cached"))
        });
        group.bench_function("ours_trait_1_thread", |b: &mut Bencher<'_>| {
            b.iter(|| now_or_block(&rt, ours.provide_credentials()).expect("cached"))
        });
        group.bench_function("ours_role_credentials_1_thread", |b: &mut Bencher<'_>| {
            b.iter(|| now_or_block(&rt, ours.role_credentials()).expect("cached"))
        });
        group.bench_function("sdk_1_thread", |b: &mut Bencher<'_>| {
            b.iter(|| now_or_block(&rt, sdk.get()).expect("cached"))
        });
        // For scale: cloning the SDK's credentials type as we hand it out,
        // and with the SDK's feature mark (`CredentialsImds`), which lives in
        // a property map that every clone copies.
        let unmarked = now_or_block(&rt, ours.provide_credentials()).expect("cached");
        let mut marked = unmarked.clone();
        marked
            .get_property_mut_or_default::<Vec<AwsCredentialFeature>>()
            .push(AwsCredentialFeature::CredentialsImds);
        group.bench_function("sdk_clone_marked", |b: &mut Bencher<'_>| {
            b.iter(|| marked.clone())
        });
        group.bench_function("sdk_clone_unmarked", |b: &mut Bencher<'_>| {
            b.iter(|| unmarked.clone())
        });
        group.bench_function("ours_2_threads", |b: &mut Bencher<'_>| {
            b.iter_custom(|iters| {
                two_threads(&rt, iters, &|| {
                    now_or_block(&rt, ours.credentials()).is_ok()
                })
            })
        });
        group.bench_function("ours_trait_2_threads", |b: &mut Bencher<'_>| {
            b.iter_custom(|iters| {
                two_threads(&rt, iters, &|| {
                    now_or_block(&rt, ours.provide_credentials()).is_ok()
                })
            })
        });
        group.bench_function("sdk_2_threads", |b: &mut Bencher<'_>| {
            b.iter_custom(|iters| two_threads(&rt, iters, &|| now_or_block(&rt, sdk.get()).is_ok()))
        });
        group.finish();
    }
    c.final_summary();

    let after = imds.request_counts().total;
    assert_eq!(before, after, "the cached benchmarks must not reach IMDS");

    if common::smoke() {
        println!("smoke mode: each benchmark ran once; no figures reported");
        return;
    }
    let get =
        |id: &str| median_of(&dir, id).unwrap_or_else(|| panic!("no criterion estimate for {id}"));
    let (o1, t1, s1) = (
        get("ours_1_thread"),
        get("ours_trait_1_thread"),
        get("sdk_1_thread"),
    );
    let (o2, t2, s2) = (
        get("ours_2_threads"),
        get("ours_trait_2_threads"),
        get("sdk_2_threads"),
    );
    let faster_10x = |ours: Duration| s1.as_secs_f64() >= 10.0 * ours.as_secs_f64();
    report(Row {
        figure: "cached call, credentials() (native), 1 thread (median)",
        ours: show(o1),
        sdk: show(s1),
        ratio: ratio(o1, s1),
        target: "< 40 ns",
        met: Some(o1 < Duration::from_nanos(40)),
    });
    report(Row {
        figure: "cached call, provide_credentials() (SDK trait), 1 thread (median)",
        ours: show(t1),
        sdk: show(s1),
        ratio: ratio(t1, s1),
        target: "< 60 ns and >= 10x faster",
        met: Some(t1 < Duration::from_nanos(60) && faster_10x(t1)),
    });
    let rc = get("ours_role_credentials_1_thread");
    report(Row {
        figure: "cached call, role_credentials() (clones the role name)",
        ours: show(rc),
        sdk: show(s1),
        ratio: ratio(rc, s1),
        ..Row::default()
    });
    report(Row {
        figure: "cached call, credentials(), 2 threads at once (per call)",
        ours: show(o2),
        sdk: show(s2),
        ratio: ratio(o2, s2),
        target: "<= 1.5x the 1-thread figure",
        met: Some(o2.as_secs_f64() <= o1.as_secs_f64() * 1.5),
    });
    report(Row {
        figure: "cached call, provide_credentials(), 2 threads at once (per call)",
        ours: show(t2),
        sdk: show(s2),
        ratio: ratio(t2, s2),
        target: "<= 1.5x the 1-thread figure",
        met: Some(t2.as_secs_f64() <= t1.as_secs_f64() * 1.5),
    });
    let (cm, cu) = (get("sdk_clone_marked"), get("sdk_clone_unmarked"));
    report(Row {
        figure: "for scale: cloning the SDK's Credentials, with the CredentialsImds mark / as handed out",
        ours: format!("{} / {}", show(cm), show(cu)),
        ..Row::default()
    });
}

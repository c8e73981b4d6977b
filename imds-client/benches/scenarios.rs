//! Scenarios, ours against aws-config's `ImdsCredentialsProvider` (behind the
//! SDK's identity cache unless said otherwise), on the same in-process
//! emulator: cold start, first fetch in a new process, a herd at cold start,
//! off EC2 (a closed port, a listener that never answers), and an IMDS outage.
//!
//! These are whole-scenario timings (milliseconds to seconds, a few
//! repetitions, medians), so they use a plain harness rather than criterion.
//! `cargo bench -p imds-client --features mock --bench scenarios`; under
//! `cargo test` (no `--bench` argument) every scenario runs once, small.

#![allow(missing_docs)] // reason: a benchmark binary, not an API

#[allow(dead_code)] // reason: each benchmark uses part of the shared module
mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials;
use common::{Row, SdkCached, median, now, ratio, report, show};
use imds_client::mock::{Fault, FaultDuration};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], &args[i + 2]);
        return;
    }
    let smoke = common::smoke();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(cold_start(smoke));
    rt.block_on(new_process(smoke));
    rt.block_on(herd(smoke));
    rt.block_on(off_ec2(smoke));
    rt.block_on(outage(smoke));
}

/// Whether `ours` is no slower than `sdk`, allowing 5 % for noise.
fn no_slower(ours: Duration, sdk: Duration) -> bool {
    ours.as_secs_f64() <= sdk.as_secs_f64() * 1.05
}

const NO_SLOWER: &str = "no slower than the SDK (5% noise)";

async fn cold_start(smoke: bool) {
    let reps = if smoke { 1 } else { 50 };
    let imds = common::emulator().await;
    let endpoint = imds.endpoint();
    let (mut o, mut s) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let start = now();
        let provider = common::ours(&endpoint);
        provider.credentials().await.expect("our cold start");
        o.push(start.elapsed());

        let start = now();
        let sdk = SdkCached::new(common::sdk_provider(&endpoint));
        sdk.get().await.expect("the SDK's cold start");
        s.push(start.elapsed());
    }
    let (o, s) = (median(&mut o), median(&mut s));
    report(Row {
        figure: "cold start: new provider to credentials (median)",
        ours: show(o),
        sdk: show(s),
        ratio: ratio(o, s),
        target: NO_SLOWER,
        met: Some(no_slower(o, s)),
    });
}

/// Child mode: one fetch in a fresh process; prints the time from `main` to
/// credentials in nanoseconds.
fn child(which: &str, endpoint: &str) {
    let start = now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        match which {
            "ours" => {
                common::ours(endpoint)
                    .credentials()
                    .await
                    .expect("credentials");
            }
            _ => {
                SdkCached::new(common::sdk_provider(endpoint))
                    .get()
                    .await
                    .expect("credentials");
            }
        }
    });
    println!("{}", start.elapsed().as_nanos());
}

async fn new_process(smoke: bool) {
    let reps = if smoke { 1 } else { 20 };
    let imds = common::emulator().await;
    let endpoint = imds.endpoint();
    let exe = std::env::current_exe().expect("own path");
    let run = |which: &'static str| {
        let exe = exe.clone();
        let endpoint = endpoint.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let start = now();
                let out = Command::new(&exe)
                    .args(["--child", which, &endpoint])
                    .stdin(Stdio::null())
                    .stderr(Stdio::inherit())
                    .output()
                    .expect("child runs");
                let wall = start.elapsed();
                assert!(out.status.success(), "child {which} failed");
                let inner: u64 = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("child prints nanoseconds");
                (wall, Duration::from_nanos(inner))
            })
            .await
            .expect("join")
        }
    };
    let (mut ow, mut oi, mut sw, mut si) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let (w, i) = run("ours").await;
        ow.push(w);
        oi.push(i);
        let (w, i) = run("sdk").await;
        sw.push(w);
        si.push(i);
    }
    let (ow, oi, sw, si) = (
        median(&mut ow),
        median(&mut oi),
        median(&mut sw),
        median(&mut si),
    );
    report(Row {
        figure: "first fetch in a new process: spawn to exit (median)",
        ours: show(ow),
        sdk: show(sw),
        ratio: ratio(ow, sw),
        target: "< 5 ms",
        met: Some(ow < Duration::from_millis(5)),
    });
    report(Row {
        figure: "first fetch in a new process: main to credentials",
        ours: show(oi),
        sdk: show(si),
        ratio: ratio(oi, si),
        target: "< 5 ms",
        met: Some(oi < Duration::from_millis(5)),
    });
}

/// `tasks` tasks asking `get` at once; (time until all have credentials).
async fn stampede<F, Fut>(tasks: usize, get: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let start = now();
    let handles: Vec<_> = (0..tasks).map(|_| tokio::spawn(get())).collect();
    let mut ok = 0;
    for h in handles {
        ok += usize::from(h.await.expect("task"));
    }
    assert_eq!(ok, tasks, "every task got credentials");
    start.elapsed()
}

async fn herd(smoke: bool) {
    let (tasks, reps) = if smoke { (100, 1) } else { (10_000, 7) };
    let imds = common::emulator().await;
    let endpoint = imds.endpoint();
    let (mut ot, mut st, mut or, mut sr) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        imds.reset_request_counts();
        let provider = common::ours(&endpoint);
        ot.push(
            stampede(tasks, || {
                let p = provider.clone();
                async move { p.credentials().await.is_ok() }
            })
            .await,
        );
        or.push(imds.request_counts().total);

        imds.reset_request_counts();
        let sdk = Arc::new(SdkCached::new(common::sdk_provider(&endpoint)));
        st.push(
            stampede(tasks, || {
                let s = sdk.clone();
                async move { s.get().await.is_ok() }
            })
            .await,
        );
        sr.push(imds.request_counts().total);
    }
    let show_counts = |v: &[u64]| {
        let (min, max) = (v.iter().min().unwrap(), v.iter().max().unwrap());
        if min == max {
            min.to_string()
        } else {
            format!("{min} to {max}")
        }
    };
    let figure = format!("herd of {tasks} tasks at cold start: IMDS requests ({reps} runs)");
    report(Row {
        figure: &figure,
        ours: show_counts(&or),
        sdk: show_counts(&sr),
        ratio: String::new(),
        target: "3 requests",
        met: Some(or.iter().all(|&n| n == 3)),
    });
    let (ot, st) = (median(&mut ot), median(&mut st));
    let figure = format!("herd of {tasks} tasks: time until all have credentials (median)");
    report(Row {
        figure: &figure,
        ours: show(ot),
        sdk: show(st),
        ratio: ratio(ot, st),
        ..Row::default()
    });
}

/// A loopback port where nothing listens.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

/// A loopback listener that accepts connections and never answers. Dropped
/// with the returned task.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (format!("http://{addr}"), task)
}

/// Time of a first and a second call, each expected to fail.
async fn two_failures<F, Fut>(call: F) -> (Duration, Duration)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = now();
    assert!(!call().await, "no credentials expected off EC2");
    let first = start.elapsed();
    let start = now();
    assert!(!call().await, "no credentials expected off EC2");
    (first, start.elapsed())
}

async fn off_ec2(smoke: bool) {
    // A closed port fails in microseconds: medians of 21 fresh providers.
    // The black hole takes the timeouts (seconds): one run.
    let mut cases = vec![(
        "closed port".to_owned(),
        closed_port(),
        None,
        if smoke { 1 } else { 21 },
    )];
    if !smoke {
        let (endpoint, task) = black_hole().await;
        cases.push(("accepts, never replies".to_owned(), endpoint, Some(task), 1));
    }
    for (name, endpoint, task, reps) in cases {
        let (mut o1, mut o2, mut s1, mut s2) = (vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            let provider = common::ours(&endpoint);
            let (a, b) = two_failures(|| async { provider.credentials().await.is_ok() }).await;
            o1.push(a);
            o2.push(b);
            let (a, b) = if smoke {
                (Duration::ZERO, Duration::ZERO)
            } else {
                let sdk = SdkCached::new(common::sdk_provider(&endpoint));
                two_failures(|| async { sdk.get().await.is_ok() }).await
            };
            s1.push(a);
            s2.push(b);
        }
        let (o1, o2, s1, s2) = (
            median(&mut o1),
            median(&mut o2),
            median(&mut s1),
            median(&mut s2),
        );
        let figure = format!("off EC2 ({name}): first call, to an error");
        report(Row {
            figure: &figure,
            ours: show(o1),
            sdk: if smoke { "not run".into() } else { show(s1) },
            ratio: ratio(o1, s1),
            target: NO_SLOWER,
            met: (!smoke).then(|| no_slower(o1, s1)),
        });
        let figure = format!("off EC2 ({name}): second call");
        report(Row {
            figure: &figure,
            ours: show(o2),
            sdk: if smoke { "not run".into() } else { show(s2) },
            ratio: ratio(o2, s2),
            target: "microseconds (< 1 ms)",
            met: Some(o2 < Duration::from_millis(1)),
        });
        if let Some(task) = task {
            task.abort();
        }
    }
}

/// One good fetch, then 503 for every IMDS request; `calls` calls (stopping
/// early after `budget`). Returns (calls made, successes, IMDS requests, time).
async fn outage_run<F, Fut>(
    calls: usize,
    budget: Duration,
    make: impl FnOnce(String) -> F,
) -> (usize, usize, u64, Duration)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let imds = common::emulator().await;
    let call = make(imds.endpoint());
    assert!(call().await, "the good fetch");
    imds.reset_request_counts();
    imds.inject(Fault::Status { status: 503 }, FaultDuration::Forever);
    let start = now();
    let (mut made, mut ok) = (0, 0);
    while made < calls && start.elapsed() < budget {
        ok += usize::from(call().await);
        made += 1;
    }
    (made, ok, imds.request_counts().total, start.elapsed())
}

async fn outage(smoke: bool) {
    let calls = if smoke { 5 } else { 100 };
    let budget = if smoke {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(30)
    };
    let ours = outage_run(calls, budget, |ep| {
        let p = common::ours(&ep);
        move || {
            let p = p.clone();
            async move { p.credentials().await.is_ok() }
        }
    })
    .await;
    let cached = outage_run(calls, budget, |ep| {
        let s = Arc::new(SdkCached::new(common::sdk_provider(&ep)));
        move || {
            let s = s.clone();
            async move { s.get().await.is_ok() }
        }
    })
    .await;
    // Without a cache every call retries against IMDS for seconds: skipped
    // in smoke mode.
    let bare_calls = if smoke { 0 } else { calls };
    let bare = outage_run(bare_calls, budget, |ep| {
        let p = Arc::new(common::sdk_provider(&ep));
        move || {
            let p = p.clone();
            async move { p.provide_credentials().await.is_ok() }
        }
    })
    .await;
    let cell = |(made, ok, _, _): (usize, usize, u64, Duration)| -> String {
        if made == 0 {
            "not run".to_owned()
        } else if made < calls {
            format!("{ok}/{made} ok (budget hit)")
        } else {
            format!("{ok}/{made} ok")
        }
    };
    let figure = format!("outage (503 after one good fetch), {calls} calls: served");
    report(Row {
        figure: &figure,
        ours: cell(ours),
        sdk: format!("{} (no cache: {})", cell(cached), cell(bare)),
        ..Row::default()
    });
    let figure = format!("outage, {calls} calls: IMDS requests");
    report(Row {
        figure: &figure,
        ours: ours.2.to_string(),
        sdk: if smoke {
            cached.2.to_string()
        } else {
            format!("{} (no cache: {})", cached.2, bare.2)
        },
        ..Row::default()
    });
    let figure = format!("outage, {calls} calls: time");
    report(Row {
        figure: &figure,
        ours: show(ours.3),
        sdk: if smoke {
            show(cached.3)
        } else {
            format!("{} (no cache: {})", show(cached.3), show(bare.3))
        },
        ratio: ratio(ours.3, cached.3),
        ..Row::default()
    });
}

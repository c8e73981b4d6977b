//! The cached path allocates nothing: `credentials()` and the SDK trait's
//! `provide_credentials()` hand out a clone of what the cache built once per
//! fetch. Counted by a global allocator, in a binary of its own (one test,
//! so no other test allocates while it counts).
#![allow(unsafe_code)] // reason: a counting global allocator (GlobalAlloc is an unsafe trait)

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials;
use imds_client::provider::{BoxFuture, FetchedCredentials, FetchedRole};
use imds_client::{
    Credentials, CredentialsSource, Error, ImdsCredentialsProvider, SystemTimeSource, TimeSource,
};

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counter is an atomic, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

#[derive(Debug)]
struct Fixed(Credentials);

impl CredentialsSource for Fixed {
    fn role_name(&self) -> BoxFuture<'_, Result<FetchedRole, Error>> {
        Box::pin(async {
            Ok(FetchedRole {
                role: "r".into(),
                server_time: None,
            })
        })
    }
    fn role_credentials<'a>(
        &'a self,
        _role: &'a str,
    ) -> BoxFuture<'a, Result<FetchedCredentials, Error>> {
        Box::pin(async {
            Ok(FetchedCredentials {
                credentials: self.0.clone(),
                server_time: None,
            })
        })
    }
}

/// Polls `future` once; a cached call is ready at once.
fn poll_once<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("expected a cached call to be ready at once"),
    }
}

#[test]
fn cached_calls_allocate_nothing() {
    let now = SystemTimeSource.now();
    let credentials = Credentials::new(
        "AKIDEXAMPLE000000",
        "s".repeat(40),
        "t".repeat(800),
        now + Duration::from_secs(6 * 3600),
    )
    .with_last_updated(now);
    let provider = ImdsCredentialsProvider::builder()
        .source(Fixed(credentials))
        .build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(provider.credentials()).unwrap();
    // First calls on this thread may set up thread-locals.
    poll_once(provider.credentials()).unwrap();
    poll_once(provider.provide_credentials()).unwrap();

    ARMED.store(true, Ordering::SeqCst);
    for _ in 0..1000 {
        let ours = poll_once(provider.credentials());
        let sdk = poll_once(provider.provide_credentials());
        assert!(ours.is_ok() && sdk.is_ok());
    }
    ARMED.store(false, Ordering::SeqCst);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst);
    assert_eq!(
        allocations, 0,
        "expected 2000 cached calls to allocate nothing, saw {allocations} allocations"
    );
}

//! Read-side critical sections for the cached path, and the writer's wait
//! for them (read-copy-update).
//!
//! Why: a cached call must know that the entry it reads is still alive. A
//! reference count (an `Arc` clone, a weak upgrade) proves it by writing a
//! shared counter with a locked instruction, and on the cached path those
//! writes cost more than everything else we do. Here a reader instead
//! announces itself in its own thread's [`Slot`] (two plain stores, no
//! locked instruction), and a writer that has published a new entry waits
//! for the readers announced at that moment before it drops the old one
//! ([`wait_for_readers`]). Readers never wait; a writer waits only for
//! sections already under way, each a few loads and a clone.
//!
//! The store that announces a reader must be seen by the writer, or the
//! reader must see the writer's new entry (store-then-load on both sides).
//! Where the kernel offers it, the writer issues a process-wide barrier
//! (`membarrier(2)`, `MEMBARRIER_CMD_PRIVATE_EXPEDITED`), which lets the
//! reader's barrier be a compiler fence only; this is how liburcu's
//! "memb" flavour works. Where it is refused (not Linux, an old kernel, a
//! seccomp filter such as systemd's `@system-service`, Miri), both sides use a
//! `SeqCst` fence: correct everywhere, one locked instruction per read.
//!
//! Secrets: a writer drops the entry it replaced as soon as the readers of
//! that moment are done, so withdrawn credentials are zeroized at once, not
//! when some idle thread next calls. Should the process-wide barrier fail
//! after it was set up (a seccomp filter installed later), the writer
//! cannot prove no reader holds the old entry, so from then on it keeps
//! every entry it replaces alive for good (memory safe; a few hundred bytes
//! a refresh; those secrets are not zeroized), logs it once, and readers use
//! the fence.
//!
//! [`Published`] is the safe face of all this: one value, read in sections,
//! replaced under a lock. The module's one `unsafe` dereference is there.
#![allow(unsafe_code)] // reason: `Published::read` dereferences the pointer its sections protect

use std::cell::Cell;
use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU8, AtomicU64, Ordering, compiler_fence, fence,
};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

/// One shared value (or none): read without writing shared memory inside
/// read-side sections, replaced under a lock.
#[derive(Debug)]
pub(crate) struct Published<T> {
    /// The owner of the value.
    held: ArcSwapOption<T>,
    /// The value in `held` (null: none), valid inside a section: `update`
    /// drops a replaced value only after the sections under way have ended.
    current: AtomicPtr<T>,
    write: Mutex<()>,
}

impl<T> Default for Published<T> {
    fn default() -> Self {
        Self {
            held: ArcSwapOption::empty(),
            current: AtomicPtr::new(std::ptr::null_mut()),
            write: Mutex::new(()),
        }
    }
}

impl<T> Published<T> {
    /// The value, to keep.
    pub(crate) fn get(&self) -> Option<Arc<T>> {
        self.held.load_full()
    }

    /// `read` applied to the value and this thread's number (see
    /// [`this_threads_number`]), inside a read-side section; `None` when
    /// there is no value. `read` must be quick (a clone) and must not call
    /// back into this value: a writer may be waiting for it.
    #[inline]
    pub(crate) fn read<R>(&self, read: impl FnOnce(&T, usize) -> R) -> Option<R> {
        let mut read = Some(read);
        let in_section = section(|thread| {
            let value = self.current.load(Ordering::Acquire);
            // SAFETY: `current` is null or points into an `Arc<T>` that
            // `held` owned when it was stored. `update` stores the
            // replacement first and drops that `Arc` only after
            // `wait_for_readers`, which waits for this section (or, if it
            // cannot, never drops it). So the value outlives this borrow.
            let value = unsafe { value.as_ref() }?;
            read.take().map(|read| read(value, thread))
        });
        if let Some(out) = in_section {
            return out;
        }
        // This thread's thread-locals are gone (it is exiting), so `read`
        // was not called: the slower read that counts a reference.
        let read = read?;
        let held = self.held.load();
        held.as_deref().map(|value| read(value, 0))
    }

    /// Replaces the value with what `change` makes of the current one, with
    /// no other change in between; returns what `change` returns. The old
    /// value is dropped here (if nothing else holds it) once no section can
    /// still be reading it.
    pub(crate) fn update<R>(
        &self,
        change: impl FnOnce(Option<Arc<T>>) -> (Option<Arc<T>>, R),
    ) -> R {
        let _writing = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.held.load_full();
        let (next, result) = change(old.clone());
        let next_ptr = next
            .as_ref()
            .map_or(std::ptr::null_mut(), |value| Arc::as_ptr(value).cast_mut());
        self.held.store(next);
        let old_ptr = self.current.swap(next_ptr, Ordering::SeqCst);
        if old_ptr != next_ptr && !wait_for_readers() {
            // A section may still hold the old value and no wait can show
            // otherwise: it must never be freed.
            std::mem::forget(old);
        }
        result
    }
}

/// How readers and writers order their accesses (see the module docs).
const UNDECIDED: u8 = 0;
/// Writers issue `membarrier`; readers a compiler fence.
const PROCESS_BARRIER: u8 = 1;
/// Both sides issue `SeqCst` fences.
const FENCES: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// Set once a writer's process-wide barrier failed after setup (MODE is then
/// FENCES too).
static BARRIER_FAILED: AtomicBool = AtomicBool::new(false);

/// One thread's announcement: odd while it is inside a section.
#[derive(Debug, Default)]
#[repr(align(64))] // one cache line per thread: readers never share a line
struct Slot {
    sections: AtomicU64,
}

/// Every live thread's slot (registered at its first section).
static SLOTS: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());

/// A thread's registration; dropping it (at thread exit) unregisters.
struct Registration {
    slot: Arc<Slot>,
    /// This thread's number (see [`this_threads_number`]), kept here so
    /// that a cached call reads one thread-local, not two.
    number: Cell<usize>,
}

impl Registration {
    fn new() -> Self {
        decide_mode();
        let slot = Arc::new(Slot::default());
        lock_slots().push(slot.clone());
        Self {
            slot,
            number: Cell::new(usize::MAX),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock_slots().retain(|slot| !Arc::ptr_eq(slot, &self.slot));
    }
}

thread_local! {
    static REGISTRATION: Registration = Registration::new();
}

fn lock_slots() -> std::sync::MutexGuard<'static, Vec<Arc<Slot>>> {
    SLOTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Chooses the mode once per process: the process-wide barrier if the
/// kernel lets this process register for it.
fn decide_mode() {
    if MODE.load(Ordering::Acquire) != UNDECIDED {
        return;
    }
    let mode = if membarrier(Membarrier::Register) {
        PROCESS_BARRIER
    } else {
        FENCES
    };
    // Whoever decides first wins; both would decide the same.
    let _ = MODE.compare_exchange(UNDECIDED, mode, Ordering::AcqRel, Ordering::Acquire);
}

/// Set in a test's own child process: the barrier registers, then fails.
#[cfg(test)]
fn barrier_fails_in_this_test_process() -> bool {
    std::env::var_os(tests::FAIL_BARRIER_ENV).is_some()
}

/// A `membarrier(2)` step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membarrier {
    /// Register this process for the expedited private barrier (once).
    Register,
    /// Issue the barrier on every running thread of this process.
    Issue,
}

/// Takes `step`; `false` where there is no `membarrier` or it is refused.
fn membarrier(step: Membarrier) -> bool {
    #[cfg(test)]
    if barrier_fails_in_this_test_process() {
        return step == Membarrier::Register;
    }
    #[cfg(all(any(target_os = "linux", target_os = "android"), not(miri)))]
    {
        use rustix::thread::MembarrierCommand;
        let command = match step {
            Membarrier::Register => MembarrierCommand::RegisterPrivateExpedited,
            Membarrier::Issue => MembarrierCommand::PrivateExpedited,
        };
        rustix::thread::membarrier(command).is_ok()
    }
    #[cfg(not(all(any(target_os = "linux", target_os = "android"), not(miri))))]
    {
        let _ = step;
        false
    }
}

/// The reader's side of the barrier pair.
#[inline]
fn reader_barrier() {
    // One load: a failed barrier also turns MODE to FENCES.
    if MODE.load(Ordering::Relaxed) == PROCESS_BARRIER {
        // The writer's membarrier stands in for this thread's fence.
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// Runs `read` inside a read-side section, with this thread's number, or
/// answers `None` when this thread can no longer take part (its
/// thread-locals are being torn down).
///
/// `read` may dereference a pointer loaded (with `Acquire`) inside it from
/// a place whose writer calls [`wait_for_readers`] after replacing it and
/// before freeing what it pointed to. It must be short and must not block
/// or start a write: a writer may be waiting for it.
#[inline]
fn section<T>(read: impl FnOnce(usize) -> T) -> Option<T> {
    REGISTRATION
        .try_with(|registration| {
            let slot = &registration.slot.sections;
            // Only this thread writes its slot: a plain load and store, no
            // locked instruction. Both stores are `Release` (plain moves on
            // x86): a writer that reads either this section's end or any
            // later section's start has everything this section read
            // happen before it frees.
            let before = slot.load(Ordering::Relaxed);
            slot.store(before.wrapping_add(1), Ordering::Release);
            // Ends the section even if `read` unwinds, so no writer waits
            // for a section that is over.
            let _leave = Leave {
                slot,
                at: before.wrapping_add(2),
            };
            reader_barrier();
            read(thread_number(&registration.number))
        })
        .ok()
}

/// Ends a section when dropped.
struct Leave<'a> {
    slot: &'a AtomicU64,
    at: u64,
}

impl Drop for Leave<'_> {
    #[inline]
    fn drop(&mut self) {
        self.slot.store(self.at, Ordering::Release);
    }
}

/// This thread's number: threads are numbered in the order they first read,
/// so that concurrent callers mostly differ (to pick copies of a value).
pub(crate) fn this_threads_number() -> usize {
    REGISTRATION
        .try_with(|registration| thread_number(&registration.number))
        .unwrap_or(0)
}

#[inline]
fn thread_number(number: &Cell<usize>) -> usize {
    let n = number.get();
    if n != usize::MAX {
        return n;
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as usize;
    number.set(n);
    n
}

/// How long a writer waits for one section before it keeps the old value
/// instead. A section takes nanoseconds; one lasts longer only when its
/// thread was descheduled mid-way, or in a child forked mid-section (the
/// thread is gone, its slot stays odd): then the old value is kept alive
/// (a few hundred bytes) rather than the writer waiting for good.
const STUCK_SECTION: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until every read-side section under way when this is called has
/// ended. Call it after publishing a replacement (with a `Release` store or
/// stronger) and before dropping what readers could have loaded.
///
/// Answers `false` when that cannot be shown (the process-wide barrier
/// failed, or a section lasted longer than [`STUCK_SECTION`]): the caller
/// must then keep the old value alive for good.
#[must_use]
fn wait_for_readers() -> bool {
    wait_for_readers_within(STUCK_SECTION)
}

fn wait_for_readers_within(stuck: std::time::Duration) -> bool {
    decide_mode();
    // MODE before BARRIER_FAILED: a failure stores them the other way
    // round, so FENCES set by a failure is never taken for plain fences.
    let mode = MODE.load(Ordering::Acquire);
    if BARRIER_FAILED.load(Ordering::Acquire) {
        return false;
    }
    if mode == PROCESS_BARRIER {
        if !membarrier(Membarrier::Issue) {
            // Readers fence themselves from now on, but one already past
            // its compiler fence may hold what was replaced, now or later:
            // nothing replaced is freed again.
            BARRIER_FAILED.store(true, Ordering::SeqCst);
            MODE.store(FENCES, Ordering::SeqCst);
            tracing::error!(
                "membarrier(2) failed after it was set up (a seccomp filter installed later?): \
                 replaced credentials are kept in memory, not zeroized; cached reads now fence"
            );
            return false;
        }
    } else {
        fence(Ordering::SeqCst);
    }
    let slots: Vec<Arc<Slot>> = lock_slots().clone();
    let mut all_ended = true;
    for slot in slots {
        let seen = slot.sections.load(Ordering::Acquire);
        if seen % 2 == 0 {
            continue;
        }
        // A section under way: wait for that section to end (the count
        // moves on), however many follow it. Spin, then yield, then sleep
        // in steps of a millisecond.
        let mut tries = 0u32;
        let mut slept = std::time::Duration::ZERO;
        while slot.sections.load(Ordering::Acquire) == seen {
            tries = tries.saturating_add(1);
            if tries < 100 {
                std::hint::spin_loop();
            } else if tries < 1_100 {
                std::thread::yield_now();
            } else if slept < stuck {
                let step = std::time::Duration::from_millis(1);
                std::thread::sleep(step);
                slept += step;
            } else {
                tracing::warn!(
                    "a cached read has not finished in {} s (a thread stopped mid-read, or a \
                     forked child): the credentials it may hold are kept in memory",
                    stuck.as_secs_f64()
                );
                all_ended = false;
                break;
            }
        }
    }
    all_ended
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// Makes the process-wide barrier fail in a child test process.
    pub(super) const FAIL_BARRIER_ENV: &str = "IMDS_CLIENT_TEST_FAIL_MEMBARRIER";

    #[test]
    #[cfg(all(any(target_os = "linux", target_os = "android"), not(miri)))]
    fn a_failed_process_barrier_never_frees_what_a_reader_may_hold() {
        const NAME: &str = "provider::read_side::tests::a_failed_process_barrier_never_frees_what_a_reader_may_hold";
        if !barrier_fails_in_this_test_process() {
            // The failure is process-wide and for good: run in a child.
            let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args(["--exact", NAME, "--test-threads=1"])
                .env(FAIL_BARRIER_ENV, "1")
                .output()
                .expect("run the child test");
            assert!(
                out.status.success(),
                "child failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                "the child ran the test"
            );
            return;
        }
        let published = Published::default();
        let first = Arc::new(1u64);
        let first_weak = Arc::downgrade(&first);
        published.update(|_| (Some(first), ()));
        assert_eq!(published.read(|v, _| *v), Some(1));
        // The barrier fails: the replaced value is kept, readers now fence.
        published.update(|_| (Some(Arc::new(2)), ()));
        assert!(
            first_weak.upgrade().is_some(),
            "a value a reader may hold was freed"
        );
        assert_eq!(MODE.load(Ordering::SeqCst), FENCES);
        // And every later replacement is kept too.
        let second_weak = Arc::downgrade(&published.get().expect("published"));
        published.update(|_| (None, ()));
        assert!(
            second_weak.upgrade().is_some(),
            "freed after a failed barrier"
        );
        assert_eq!(published.read(|v, _| *v), None);
    }

    #[test]
    fn a_replaced_value_is_freed_at_once_when_no_reader_holds_it() {
        let published = Published::default();
        let value = Arc::new(1u64);
        let weak = Arc::downgrade(&value);
        published.update(|_| (Some(value), ()));
        assert_eq!(published.read(|v, _| *v), Some(1));
        published.update(|_| (Some(Arc::new(2)), ()));
        assert!(weak.upgrade().is_none(), "the replaced value must be gone");
        assert_eq!(published.read(|v, _| *v), Some(2));
    }

    /// A reader thread held inside a section until told to leave.
    struct ParkedReader {
        leave: mpsc::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    }

    impl ParkedReader {
        /// Returns once the reader is inside its section.
        fn inside_a_section() -> Self {
            let (inside_tx, inside_rx) = mpsc::channel();
            let (leave, leave_rx) = mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                section(|_| {
                    inside_tx.send(()).expect("send");
                    leave_rx.recv().expect("leave");
                })
                .expect("a live thread reads");
            });
            inside_rx.recv().expect("the reader is inside");
            Self { leave, thread }
        }

        /// Ends the section and the thread.
        fn leave(self) {
            self.leave.send(()).expect("leave");
            self.thread.join().expect("reader");
        }
    }

    #[test]
    fn a_writer_waits_for_a_section_under_way_and_not_for_later_ones() {
        let reader = ParkedReader::inside_a_section();
        let waited = std::thread::spawn(wait_for_readers);
        // The writer cannot finish while the section is open.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waited.is_finished(), "the writer must wait for the reader");
        reader.leave();
        assert!(waited.join().expect("writer"));
        // No section open: no wait.
        assert!(wait_for_readers());
    }

    #[test]
    fn a_section_that_unwinds_is_over() {
        let unwound = std::thread::spawn(|| {
            let caught =
                std::panic::catch_unwind(|| section(|_| panic!("a reader's clone failed")));
            assert!(caught.is_err());
            // Still inside this thread: no writer may wait for it.
            assert!(wait_for_readers_within(std::time::Duration::from_secs(5)));
        });
        unwound
            .join()
            .expect("the writer did not wait for an unwound section");
    }

    #[test]
    fn a_writer_gives_up_on_a_section_that_never_ends_and_says_so() {
        let reader = ParkedReader::inside_a_section();
        assert!(
            !wait_for_readers_within(std::time::Duration::from_millis(20)),
            "a writer must not claim a stuck section ended"
        );
        reader.leave();
    }

    #[test]
    fn readers_never_see_a_value_after_it_is_retired() {
        // Values live in an arena and are never freed, so a wrong protocol
        // shows as a retired value read (not as undefined behaviour): a
        // writer publishes each next value, waits, then retires the old one;
        // readers take their time inside the section and then check that
        // what they loaded is not retired yet.
        const VALUES: usize = 1_000;
        let arena: Arc<Vec<AtomicBool>> =
            Arc::new((0..VALUES).map(|_| AtomicBool::new(true)).collect());
        let current = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (arena, current, stop) = (arena.clone(), current.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) || reads == 0 {
                        let retired = section(|_| {
                            let index = current.load(Ordering::Acquire) as usize;
                            for _ in 0..50 {
                                std::hint::spin_loop();
                            }
                            !arena[index].load(Ordering::SeqCst)
                        })
                        .expect("a live thread reads");
                        assert!(!retired, "a reader held a value the writer retired");
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for next in 1..VALUES {
            let old = current.swap(next as u64, Ordering::SeqCst) as usize;
            assert!(wait_for_readers());
            arena[old].store(false, Ordering::SeqCst);
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().expect("reader") > 0);
        }
    }
}

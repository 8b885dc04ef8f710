//! The engine's own compute threads.
//!
//! A step runs a few hundred short parallel loops (one per matmul). Waking a sleeping thread for
//! each would cost more than the loop, so between loops the helpers spin briefly, then yield the
//! core, then sleep. Work is handed out in small chunks from a shared counter and the calling
//! thread takes chunks too: when another process holds a core and a helper is not running, the
//! caller simply does that helper's share instead of waiting for it, so speed degrades towards
//! one core's instead of collapsing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper keeps polling (spinning, then yielding) before it sleeps.
const POLL: Duration = Duration::from_millis(2);
/// Spins between checks of the clock while polling.
const SPINS: u32 = 64;

/// One parallel loop: `f(chunk)` for every chunk in `0..chunks`.
#[derive(Clone, Copy)]
struct Job {
    /// Erased `&(dyn Fn(usize) + Sync)`; valid while the loop runs (see [`ComputePool::run`]).
    f: *const (dyn Fn(usize) + Sync),
    chunks: usize,
}

// SAFETY: the pointee is `Sync`, and `run` keeps it alive until no helper can use it.
unsafe impl Send for Job {}

struct Shared {
    /// The loop in progress, if any. A helper joins it (counting itself in `active`) only while
    /// holding this lock, and `run` clears it under the lock before waiting for `active` to drop
    /// to zero, so no helper touches a job after `run` returns.
    job: Mutex<Option<Job>>,
    /// Bumped for each new loop; helpers poll it.
    epoch: AtomicU64,
    next: AtomicUsize,
    active: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Sleeping helpers wait here for a new epoch or for `stop`.
    wake: Condvar,
    sleepers: Mutex<usize>,
}

/// A fixed set of helper threads that, with the calling thread, run parallel loops.
pub struct ComputePool {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    /// Serializes `run` calls from different threads.
    caller: Mutex<()>,
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ComputePool({} threads)", self.threads())
    }
}

impl ComputePool {
    /// A pool that computes on `threads` threads in all: the caller and `threads - 1` helpers.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            epoch: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            sleepers: Mutex::new(0),
        });
        let helpers = (1..threads.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("herd-compute-{i}"))
                    .spawn(move || helper(&shared))
                    .expect("cannot start a compute thread")
            })
            .collect();
        Self { shared, helpers, caller: Mutex::new(()) }
    }

    /// Threads computing a loop, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Calls `f(chunk)` once for every chunk in `0..chunks`, spread over the pool's threads, and
    /// returns when all calls have. A panic in `f` is re-raised here.
    pub fn run(&self, chunks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() || chunks <= 1 {
            (0..chunks).for_each(f);
            return;
        }
        let _serial = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased; the job is withdrawn and every helper that joined
        // it has left (`active == 0`) before this function returns and `f` goes out of scope.
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        {
            let mut job = s.job.lock().unwrap_or_else(|e| e.into_inner());
            s.next.store(0, Ordering::SeqCst);
            *job = Some(Job { f, chunks });
            s.epoch.fetch_add(1, Ordering::SeqCst);
        }
        if *s.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        // SAFETY: `f` is the caller's live reference.
        let caller_result = catch_unwind(AssertUnwindSafe(|| work(s, unsafe { &*f }, chunks)));
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut polls = 0u32;
        while s.active.load(Ordering::SeqCst) != 0 {
            // A helper is inside a chunk, maybe descheduled: let it have the core.
            polls += 1;
            if polls < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(p) = caller_result {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a compute thread panicked");
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _sleepers = self.shared.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Takes chunks of the current loop until none are left.
fn work(s: &Shared, f: &(dyn Fn(usize) + Sync), chunks: usize) {
    loop {
        let i = s.next.fetch_add(1, Ordering::SeqCst);
        if i >= chunks {
            return;
        }
        f(i);
    }
}

fn helper(s: &Shared) {
    let mut seen = s.epoch.load(Ordering::SeqCst);
    loop {
        // Wait for a new loop: spin, then yield, then sleep.
        let since = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
            if s.epoch.load(Ordering::SeqCst) != seen {
                break;
            }
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
                continue;
            }
            spins = 0;
            if since.elapsed() < POLL {
                std::thread::yield_now();
                continue;
            }
            let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            *sleepers += 1;
            while s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
            }
            *sleepers -= 1;
        }
        let job = {
            let job = s.job.lock().unwrap_or_else(|e| e.into_inner());
            seen = s.epoch.load(Ordering::SeqCst);
            let j = *job;
            if j.is_some() {
                s.active.fetch_add(1, Ordering::SeqCst);
            }
            j
        };
        if let Some(Job { f, chunks }) = job {
            // SAFETY: counted in `active` under the lock while the job was published, so `run`
            // has not returned and `f` is alive until `active` is decremented below.
            if catch_unwind(AssertUnwindSafe(|| work(s, unsafe { &*f }, chunks))).is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
            s.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once() {
        for threads in [1, 2, 4] {
            let pool = ComputePool::new(threads);
            for chunks in [0, 1, 2, 7, 100] {
                let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(chunks, &|i| {
                    hits[i].fetch_add(1, Ordering::SeqCst);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1), "{threads} threads, {chunks} chunks");
            }
        }
    }

    #[test]
    fn many_short_loops_and_a_sleeping_pool() {
        let pool = ComputePool::new(3);
        let total = AtomicUsize::new(0);
        for _ in 0..2000 {
            pool.run(8, &|i| {
                total.fetch_add(i, Ordering::SeqCst);
            });
        }
        assert_eq!(total.load(Ordering::SeqCst), 2000 * 28);
        // Past the polling window the helpers sleep; a new loop must wake them or run alone.
        std::thread::sleep(POLL * 5);
        pool.run(8, &|i| {
            total.fetch_add(i, Ordering::SeqCst);
        });
        assert_eq!(total.load(Ordering::SeqCst), 2001 * 28);
    }

    #[test]
    fn a_panic_in_a_chunk_reaches_the_caller_and_the_pool_survives() {
        let pool = ComputePool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(16, &|i| assert!(i != 5, "chunk 5"))));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(16, &|_| {
            n.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(n.load(Ordering::SeqCst), 16);
    }
}

//! The engine's own compute threads.
//!
//! A step runs a few hundred short parallel loops (one per matmul). Waking a sleeping thread for
//! each would cost more than the loop, so between loops the helpers spin briefly, then yield the
//! core, then sleep.
//!
//! The caller never waits long for a helper. Chunks are handed out from a shared counter and the
//! caller takes them too; once none are left, a chunk a helper claimed but has not finished
//! (it may have been descheduled by another process mid-chunk) is computed again by the caller
//! after a short grace period. Chunks are deterministic and write their results with atomic
//! stores, so a late duplicate writes the same bits, and a job owns everything it touches, so
//! a straggler can finish after `run` has returned. Measured here with two busy processes on
//! the two cores, waiting for stragglers instead cut decode speed to a third, or less.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper keeps polling (spinning, then yielding) before it sleeps.
const POLL: Duration = Duration::from_millis(2);
/// Spins between checks of the clock while polling.
const SPINS: u32 = 64;
/// A gap this long between two checks of the clock while polling means the thread lost its
/// core; twice within [`QUIET`], and it sleeps between loops instead of polling for [`QUIET`].
const PREEMPTED: Duration = Duration::from_micros(500);
const QUIET: Duration = Duration::from_millis(200);
/// How long the caller waits for a helper's unfinished chunk before computing it itself: a few
/// chunks' worth of work for a running helper.
const GRACE: Duration = Duration::from_micros(50);

/// The body of a parallel loop: called once per chunk index.
pub type Chunks = Arc<dyn Fn(usize) + Send + Sync>;

/// One parallel loop and its progress.
struct Job {
    f: Chunks,
    chunks: usize,
    next: AtomicUsize,
    done: Vec<AtomicBool>,
}

impl Job {
    /// Claims and runs chunks until none are left unclaimed.
    fn take_chunks(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.chunks {
                return;
            }
            (self.f)(i);
            self.done[i].store(true, Ordering::Release);
        }
    }
}

struct Shared {
    /// The loop in progress, if any.
    job: Mutex<Option<Arc<Job>>>,
    /// Bumped for each new loop; helpers poll it.
    epoch: AtomicU64,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ComputePool {
    /// A pool that computes on `threads` threads in all: the caller and `threads - 1` helpers;
    /// fails when the system refuses a thread.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            epoch: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            sleepers: Mutex::new(0),
        });
        let mut pool = Self { shared, helpers: Vec::new(), caller: Mutex::new(()) };
        for i in 1..threads.max(1) {
            let shared = pool.shared.clone();
            // On failure, dropping `pool` stops the helpers already started.
            pool.helpers
                .push(std::thread::Builder::new().name(format!("herd-compute-{i}")).spawn(move || helper(&shared))?);
        }
        Ok(pool)
    }

    /// Threads computing a loop, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Calls `f(chunk)` for every chunk in `0..chunks`, spread over the pool's threads, and
    /// returns when each chunk has completed at least once. `f` must be deterministic and write
    /// its results with atomic stores: a chunk may run twice, and a helper may still be running
    /// one after `run` returns. A panic in `f` is re-raised here.
    pub fn run(&self, chunks: usize, f: Chunks) {
        if self.helpers.is_empty() || chunks <= 1 {
            (0..chunks).for_each(|i| f(i));
            return;
        }
        let _serial = lock(&self.caller);
        let s = &*self.shared;
        let job = Arc::new(Job {
            f,
            chunks,
            next: AtomicUsize::new(0),
            done: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
        });
        *lock(&s.job) = Some(job.clone());
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if *lock(&s.sleepers) > 0 {
            s.wake.notify_all();
        }
        job.take_chunks();
        // Withdraw the job: helpers that have not looked at it yet will not start on it.
        *lock(&s.job) = None;
        let since = Instant::now();
        for (i, done) in job.done.iter().enumerate() {
            let mut spins = 0u32;
            while !done.load(Ordering::Acquire) {
                if since.elapsed() > GRACE {
                    // The helper holding it is probably descheduled: compute it here.
                    (job.f)(i);
                    done.store(true, Ordering::Release);
                    break;
                }
                spins += 1;
                if spins.is_multiple_of(SPINS) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _sleepers = lock(&self.shared.sleepers);
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Whether a helper that lost its core at `now`, and before that at `previous`, stops polling:
/// once alone is the host's hiccup (a VM's, every second or so), twice within [`QUIET`] is
/// another process. Stopping at every hiccup made helpers sleep between most loops, each then
/// paying a wake-up.
fn goes_quiet(previous: Option<Instant>, now: Instant) -> bool {
    previous.is_some_and(|at| now.duration_since(at) < QUIET)
}

fn helper(s: &Shared) {
    // The epoch the pool started with: a loop may begin before this thread first runs.
    let mut seen = 0;
    // Polling pays only while this thread keeps its core. Once it finds itself descheduled
    // while polling again and again (another process wants the core), it sleeps between loops
    // for a while: measured here with two busy processes on two cores, polling cut decode speed
    // to a third.
    let mut quiet_until = Instant::now();
    let mut preempted: Option<Instant> = None;
    loop {
        let since = Instant::now();
        let mut last = since;
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
            let now = Instant::now();
            if now - last > PREEMPTED {
                if goes_quiet(preempted, now) {
                    quiet_until = now + QUIET;
                }
                preempted = Some(now);
            }
            last = now;
            if now - since < POLL && now >= quiet_until {
                std::thread::yield_now();
                continue;
            }
            let mut sleepers = lock(&s.sleepers);
            *sleepers += 1;
            while s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
            }
            *sleepers -= 1;
        }
        let job = {
            let job = lock(&s.job);
            seen = s.epoch.load(Ordering::SeqCst);
            job.clone()
        };
        if let Some(job) = job {
            // A chunk that panics stays unfinished; the caller runs it again and re-raises.
            let _ = catch_unwind(AssertUnwindSafe(|| job.take_chunks()));
        }
    }
}

/// A buffer of results that parallel chunks write with atomic stores: f64 values, or values
/// rounded to f32 as they are stored (half the memory, and no conversion afterwards).
pub enum Results {
    F64(Box<[AtomicU64]>),
    F32(Box<[AtomicU32]>),
}

impl Results {
    /// `n` f64 zeros.
    pub fn new(n: usize) -> Self {
        Self::F64((0..n).map(|_| AtomicU64::new(0)).collect())
    }

    /// `n` f32 zeros.
    pub fn new_f32(n: usize) -> Self {
        Self::F32((0..n).map(|_| AtomicU32::new(0)).collect())
    }

    /// Sets value `i`.
    pub fn set(&self, i: usize, v: f64) {
        match self {
            Self::F64(x) => x[i].store(v.to_bits(), Ordering::Relaxed),
            Self::F32(x) => x[i].store((v as f32).to_bits(), Ordering::Relaxed),
        }
    }

    /// The values, once the loop writing them has returned.
    pub fn to_vec(&self) -> Vec<f64> {
        match self {
            Self::F64(x) => x.iter().map(|v| f64::from_bits(v.load(Ordering::Relaxed))).collect(),
            Self::F32(x) => x.iter().map(|v| f64::from(f32::from_bits(v.load(Ordering::Relaxed)))).collect(),
        }
    }

    /// The values rounded to f32, once the loop writing them has returned.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Self::F64(x) => x.iter().map(|v| f64::from_bits(v.load(Ordering::Relaxed)) as f32).collect(),
            Self::F32(x) => x.iter().map(|v| f32::from_bits(v.load(Ordering::Relaxed))).collect(),
        }
    }

    /// [`Results::to_f32_vec`], reusing the buffer of f32 results (the loop is over and no
    /// straggler holds them, so plain reads are fine).
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self {
            Self::F32(x) => x.into_vec().into_iter().map(|v| f32::from_bits(v.into_inner())).collect(),
            other => other.to_f32_vec(),
        }
    }

    /// The values rounded to f32 once the loop writing them has returned, without a copy
    /// unless a straggler still holds them.
    pub fn take_f32(this: Arc<Self>) -> Vec<f32> {
        Arc::try_unwrap(this).map_or_else(|shared| shared.to_f32_vec(), Self::into_f32_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(n: usize) -> Arc<Vec<AtomicUsize>> {
        Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect())
    }

    #[test]
    fn every_chunk_runs_at_least_once() {
        for threads in [1, 2, 4] {
            let pool = ComputePool::new(threads).unwrap();
            for chunks in [0, 1, 2, 7, 100] {
                let hits = counter(chunks);
                let h = hits.clone();
                pool.run(
                    chunks,
                    Arc::new(move |i| {
                        h[i].fetch_add(1, Ordering::SeqCst);
                    }),
                );
                let runs: Vec<usize> = hits.iter().map(|h| h.load(Ordering::SeqCst)).collect();
                assert!(runs.iter().all(|&r| r >= 1), "{threads} threads, {chunks} chunks: {runs:?}");
            }
        }
    }

    #[test]
    fn helpers_stop_polling_only_when_preempted_twice_within_the_quiet_time() {
        let now = Instant::now() + QUIET * 2;
        assert!(!goes_quiet(None, now), "a first preemption is a hiccup");
        assert!(!goes_quiet(Some(now - QUIET - PREEMPTED), now), "one a while ago is another hiccup");
        assert!(goes_quiet(Some(now - QUIET / 20), now), "two close together are another process");
    }

    #[test]
    fn f32_results_round_once_and_come_back_with_or_without_a_copy() {
        let pool = ComputePool::new(2).unwrap();
        let third = 1.0f64 / 3.0;
        let out = Arc::new(Results::new_f32(64));
        let o = out.clone();
        pool.run(64, Arc::new(move |i| o.set(i, i as f64 * third)));
        let want: Vec<f32> = (0..64).map(|i| (i as f64 * third) as f32).collect();
        assert_eq!(out.to_f32_vec(), want);
        assert_eq!(out.to_vec(), want.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
        let held = out.clone();
        assert_eq!(Results::take_f32(out), want, "copied: another reference holds the buffer");
        assert_eq!(Results::take_f32(held), want, "taken: the last reference");
    }

    #[test]
    fn many_short_loops_and_a_sleeping_pool() {
        let pool = ComputePool::new(3).unwrap();
        for round in 0..2000 {
            let out = Arc::new(Results::new(8));
            let o = out.clone();
            pool.run(8, Arc::new(move |i| o.set(i, (i * round) as f64)));
            assert_eq!(out.to_vec(), (0..8).map(|i| (i * round) as f64).collect::<Vec<_>>());
        }
        // Past the polling window the helpers sleep; a new loop must wake them or run alone.
        std::thread::sleep(POLL * 5);
        let out = Arc::new(Results::new(8));
        let o = out.clone();
        pool.run(8, Arc::new(move |i| o.set(i, i as f64)));
        assert_eq!(out.to_vec(), (0..8).map(|i| i as f64).collect::<Vec<_>>());
    }

    #[test]
    fn a_stalled_helper_does_not_hold_up_the_caller() {
        let pool = ComputePool::new(2).unwrap();
        let stall = Arc::new(AtomicBool::new(true));
        let started = Instant::now();
        let out = Arc::new(Results::new(4));
        let (o, st) = (out.clone(), stall.clone());
        let caller = std::thread::current().id();
        pool.run(
            4,
            Arc::new(move |i| {
                if std::thread::current().id() == caller {
                    // Slow enough that the helper surely claims a chunk meanwhile.
                    std::thread::sleep(Duration::from_millis(20));
                } else if st.swap(false, Ordering::SeqCst) {
                    // The helper sits on its first chunk, as if descheduled.
                    std::thread::sleep(Duration::from_secs(2));
                }
                o.set(i, i as f64 + 0.5);
            }),
        );
        assert!(!stall.load(Ordering::SeqCst), "the helper never took a chunk");
        assert!(started.elapsed() < Duration::from_secs(1), "the caller waited for the stalled helper");
        assert_eq!(out.to_vec(), vec![0.5, 1.5, 2.5, 3.5]);
    }

    #[test]
    fn a_panic_in_a_chunk_reaches_the_caller_and_the_pool_survives() {
        let pool = ComputePool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(16, Arc::new(|i| assert!(i != 5, "chunk 5")))));
        assert!(r.is_err());
        let hits = counter(16);
        let h = hits.clone();
        pool.run(
            16,
            Arc::new(move |i| {
                h[i].fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) >= 1));
    }
}

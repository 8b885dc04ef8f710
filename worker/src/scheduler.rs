//! Runs admitted sequences on the engine's own thread: each round is one batched forward pass
//! that gives every running sequence its next token.
//!
//! The engine's compute stays off the async runtime: candle's CPU kernels spin-wait their
//! threads, and sharing cores with tokio's workers collapses throughput.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{Engine, EngineError, Progress, Sequence, Step};

/// What a running sequence sends back: a step, or the error that ended it.
pub type StepResult = Result<Step, EngineError>;

/// A sequence waiting for a slot, and where its steps go.
struct Job {
    seq: Sequence,
    out: UnboundedSender<StepResult>,
    /// The submitter's span (it carries the request id), so the engine thread's log lines about
    /// this sequence name its request.
    span: tracing::Span,
}

/// Running and waiting sequences, as heartbeats report them.
#[derive(Debug, Default)]
pub struct Load {
    running: AtomicUsize,
    waiting: AtomicUsize,
    /// Submitted and not yet finished, cancelled or failed: what a drain waits for.
    active: AtomicUsize,
    /// The engine thread has exited (it only does so on a bug).
    stopped: AtomicBool,
    /// Sequences evicted from the KV cache so far (each is recomputed later).
    preempted: AtomicUsize,
    /// KV blocks in use, cached (free, holding findable prefixes) and in all, and tokens per
    /// block, as of the last round.
    kv_used: AtomicUsize,
    kv_cached: AtomicUsize,
    kv_total: AtomicUsize,
    kv_block_size: AtomicUsize,
    /// Batched forward passes run so far.
    steps: AtomicUsize,
    /// Sequences in those passes, summed (divided by `steps`: the mean batch size).
    stepped: AtomicUsize,
    /// Sequences in the latest pass.
    last_batch: AtomicUsize,
    /// Tokens sampled so far.
    generated: AtomicUsize,
    /// Prompts that found a cached prefix, and the tokens they found.
    prefix_hits: AtomicUsize,
    prefix_hit_tokens: AtomicUsize,
    /// Prompt tokens of every prompt that ran.
    prompt_tokens: AtomicUsize,
    /// Moving averages of a step's wall time in microseconds, by `herd_proto::step_bucket` of
    /// the tokens it computed (0: none yet).
    step_us: [AtomicU32; herd_proto::STEP_BUCKETS],
    /// The short hashes of the KV cache's full blocks, and the pool version they are from.
    hashes: std::sync::Mutex<(u64, Arc<Vec<u64>>)>,
}

impl Load {
    /// Sequences being stepped.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Sequences queued for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Nothing left to finish: no sequence is submitted, or the engine thread is gone.
    pub fn is_idle(&self) -> bool {
        self.active.load(Ordering::SeqCst) == 0 || self.is_stopped()
    }

    /// KV blocks in use, cached and in all, and tokens per block.
    pub fn kv_blocks(&self) -> KvBlocks {
        KvBlocks {
            used: self.kv_used.load(Ordering::SeqCst),
            cached: self.kv_cached.load(Ordering::SeqCst),
            total: self.kv_total.load(Ordering::SeqCst),
            block_size: self.kv_block_size.load(Ordering::SeqCst),
        }
    }

    /// Times a running sequence was evicted to stay within the KV budget.
    pub fn preemptions(&self) -> usize {
        self.preempted.load(Ordering::SeqCst)
    }

    /// Batched steps run, sequences stepped in them (summed), and the latest batch size.
    pub fn steps(&self) -> (usize, usize, usize) {
        (
            self.steps.load(Ordering::Relaxed),
            self.stepped.load(Ordering::Relaxed),
            self.last_batch.load(Ordering::Relaxed),
        )
    }

    /// Tokens sampled since the scheduler started.
    pub fn generated(&self) -> usize {
        self.generated.load(Ordering::Relaxed)
    }

    /// Prompts that found a cached prefix, and the prompt tokens they found.
    pub fn prefix(&self) -> (usize, usize) {
        (self.prefix_hits.load(Ordering::Relaxed), self.prefix_hit_tokens.load(Ordering::Relaxed))
    }

    /// Prompt tokens of every prompt that ran.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens.load(Ordering::Relaxed)
    }

    /// Recent wall time of a step in microseconds, by `herd_proto::step_bucket` of the tokens it
    /// computed (0 where none ran yet).
    pub fn step_us_by_tokens(&self) -> Vec<u32> {
        self.step_us.iter().map(|us| us.load(Ordering::Relaxed)).collect()
    }

    /// Folds a step of `tokens` tokens that took `took` into its bucket's moving average (an
    /// eighth of the new one: smooth enough that one slow step moves no traffic).
    fn note_step(&self, tokens: usize, took: Duration) {
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX).max(1);
        let slot = &self.step_us[herd_proto::step_bucket(tokens)];
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { ((7 * u64::from(old) + u64::from(us)) / 8) as u32 };
        slot.store(new.max(1), Ordering::Relaxed);
    }

    /// The short hashes of the blocks the KV cache can find (what routing matches prompts
    /// against), and a version that changes whenever they do.
    pub fn kv_hashes(&self) -> (u64, Arc<Vec<u64>>) {
        let hashes = self.hashes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (hashes.0, hashes.1.clone())
    }

    /// Replaces the published block hashes.
    pub(crate) fn publish_hashes(&self, version: u64, hashes: Vec<u64>) {
        *self.hashes.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = (version, Arc::new(hashes));
    }

    /// Publishes the engine's KV counts.
    fn store_kv(&self, engine: &Engine) {
        let kv = engine.kv_stats();
        self.prompt_tokens.store(kv.prompt_tokens as usize, Ordering::Relaxed);
        if self.kv_hashes().0 != kv.version {
            let (version, list) = engine.kv_hashes();
            self.publish_hashes(version, list);
        }
        self.kv_used.store(kv.used, Ordering::SeqCst);
        self.kv_cached.store(kv.cached, Ordering::SeqCst);
        self.kv_total.store(kv.total, Ordering::SeqCst);
        self.kv_block_size.store(kv.block_size, Ordering::SeqCst);
        self.prefix_hits.store(kv.hits as usize, Ordering::Relaxed);
        self.prefix_hit_tokens.store(kv.hit_tokens as usize, Ordering::Relaxed);
    }

    /// The engine thread has exited; nothing submitted will run.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// KV blocks in use, cached (free, holding prefixes later prompts may find) and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvBlocks {
    pub used: usize,
    pub cached: usize,
    pub total: usize,
    pub block_size: usize,
}

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences stepped together.
    pub max_batch_size: usize,
    /// Sequences queued when every batch slot is taken, before submissions are refused.
    pub max_queue: usize,
    /// Sleep after each round; a test-only knob to make a worker slower than its peer.
    pub step_delay: Duration,
    /// Tokens one step runs at most; longer prompts are prefilled in chunks between decodes.
    pub max_batch_tokens: usize,
}

impl SchedulerConfig {
    /// `max_batch_size` slots and `max_queue` waiting places; no step-token limit, no delay.
    pub fn new(max_batch_size: usize, max_queue: usize) -> Self {
        Self { max_batch_size, max_queue, step_delay: Duration::ZERO, max_batch_tokens: usize::MAX }
    }
}

/// Why a submission was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Every batch slot is taken and the queue holds `max_queue` sequences.
    QueueFull,
    /// The engine thread has stopped.
    Stopped,
}

/// Handle to the engine thread.
pub struct Scheduler {
    jobs: mpsc::Sender<Job>,
    load: Arc<Load>,
    capacity: usize,
}

impl Scheduler {
    /// Starts the engine thread.
    pub fn start(engine: Arc<Engine>, config: SchedulerConfig) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel();
        let load = Arc::new(Load::default());
        load.store_kv(&engine);
        let thread_load = load.clone();
        let capacity = config.max_batch_size.max(1) + config.max_queue;
        std::thread::Builder::new().name("herd-engine".into()).spawn(move || {
            // Whatever ends the loop, a panic included, the service must learn that nothing runs.
            struct Stopped<'a>(&'a Load);
            impl Drop for Stopped<'_> {
                fn drop(&mut self) {
                    self.0.stopped.store(true, Ordering::SeqCst);
                }
            }
            let _stopped = Stopped(&thread_load);
            run(&engine, &config, &rx, &thread_load)
        })?;
        Ok(Self { jobs, load, capacity })
    }

    /// True when `more` submissions now would not all find room.
    pub fn lacks_room_for(&self, more: usize) -> bool {
        self.load.active.load(Ordering::SeqCst) + more > self.capacity
    }

    /// Queues `seq`; its steps arrive on `out`. Dropping the receiver cancels it at the next round.
    pub fn submit(&self, seq: Sequence, out: UnboundedSender<StepResult>) -> Result<(), SubmitError> {
        if self.load.is_stopped() {
            return Err(SubmitError::Stopped);
        }
        // Reserve the slot first so concurrent submitters cannot overshoot the capacity.
        if self.load.active.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.load.active.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        self.load.waiting.fetch_add(1, Ordering::SeqCst);
        self.jobs.send(Job { seq, out, span: tracing::Span::current() }).map_err(|_| {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            self.load.active.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// Current load.
    pub fn load(&self) -> &Arc<Load> {
        &self.load
    }
}

/// Steps every running sequence at once; a panic in the engine fails this round's sequences
/// instead of the thread.
fn step(engine: &Engine, running: &mut [Job], max_tokens: usize) -> Vec<Result<Progress, EngineError>> {
    let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|j| &mut j.seq).collect();
    let n = seqs.len();
    let failed = |msg: String| (0..n).map(|_| Err(EngineError::Model(msg.clone()))).collect();
    match std::panic::catch_unwind(AssertUnwindSafe(|| engine.step_batch(&mut seqs, max_tokens))) {
        Ok(Ok(results)) => results,
        Ok(Err(EngineError::Model(msg))) => failed(msg),
        Ok(Err(e)) => failed(e.to_string()),
        Err(_) => failed("the engine panicked during this step".into()),
    }
}

fn run(engine: &Engine, config: &SchedulerConfig, rx: &mpsc::Receiver<Job>, load: &Load) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Job> = Vec::new();
    // Marks a job as gone from the scheduler, whichever way it left.
    let retire = || load.active.fetch_sub(1, Ordering::SeqCst);
    loop {
        // Block only when there is nothing to step.
        if running.is_empty() && queue.is_empty() {
            match rx.recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => return,
            }
        }
        queue.extend(rx.try_iter());
        // Clients that left while queued free their place at once.
        queue.retain(|job| {
            let alive = !job.out.is_closed();
            if !alive {
                load.waiting.fetch_sub(1, Ordering::SeqCst);
                retire();
            }
            alive
        });
        // Admit from the front of the queue while the KV blocks its prompt needs (after what
        // the cache holds of it) are free, beside those promised to sequences admitted before
        // it this round.
        let kv = engine.kv_stats();
        let mut promised = 0;
        while running.len() < config.max_batch_size.max(1) {
            let Some(job) = queue.front_mut() else { break };
            let room = kv.total * kv.block_size;
            if job.seq.max_kv_tokens() > room {
                let job = queue.pop_front().expect("a front job");
                load.waiting.fetch_sub(1, Ordering::SeqCst);
                retire();
                job.span.in_scope(|| tracing::info!("refused: the sequence cannot fit the KV cache"));
                let e = EngineError::KvCacheFull { tokens: job.seq.max_kv_tokens(), budget: room };
                let _ = job.out.send(Err(e));
                continue;
            }
            let needed = engine.blocks_to_admit(&mut job.seq);
            let free = engine.kv_stats();
            if !running.is_empty() && promised + needed > free.total - free.used {
                // It waits without holding blocks.
                job.seq.evict();
                break;
            }
            promised += needed;
            running.push(queue.pop_front().expect("a front job"));
            // Count it as running before it stops counting as waiting, so the load never dips.
            load.running.store(running.len(), Ordering::SeqCst);
            load.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        // Clients that went away: stop spending compute on them.
        running.retain(|job| {
            let alive = !job.out.is_closed();
            if !alive {
                retire();
            }
            alive
        });
        if !running.is_empty() {
            load.steps.fetch_add(1, Ordering::Relaxed);
            load.stepped.fetch_add(running.len(), Ordering::Relaxed);
        }
        load.last_batch.store(running.len(), Ordering::Relaxed);
        let computed = |running: &[Job]| running.iter().map(|job| job.seq.computed_tokens()).sum::<usize>();
        let (before, started) = (computed(&running), Instant::now());
        let mut results =
            if running.is_empty() { Vec::new() } else { step(engine, &mut running, config.max_batch_tokens) }
                .into_iter();
        let tokens = computed(&running) - before;
        let (mut kept, mut preempted) = (Vec::with_capacity(running.len()), Vec::new());
        for mut job in running.drain(..) {
            let keep = match results.next() {
                // Still waiting for its turn or part-way through its prompt.
                Some(Ok(Progress::Waiting)) => true,
                // Older sequences needed its blocks: it waits at the front of the queue.
                Some(Ok(Progress::Preempted)) => {
                    preempted.push(job);
                    continue;
                }
                Some(Ok(Progress::Sampled(step))) => {
                    let done = step.finish.is_some();
                    if step.token.is_some() {
                        load.generated.fetch_add(1, Ordering::Relaxed);
                    }
                    job.out.send(Ok(step)).is_ok() && !done
                }
                Some(Err(e)) => {
                    job.span.in_scope(|| tracing::error!(error = %e, "generation failed"));
                    let _ = job.out.send(Err(e));
                    false
                }
                None => false,
            };
            if keep {
                kept.push(job);
            } else {
                retire();
                job.seq.evict();
            }
        }
        running = kept;
        for job in preempted.into_iter().rev() {
            job.span.in_scope(|| tracing::debug!("preempted: too few KV blocks; it will be recomputed"));
            load.waiting.fetch_add(1, Ordering::SeqCst);
            load.preempted.fetch_add(1, Ordering::SeqCst);
            queue.push_front(job);
        }
        load.running.store(running.len(), Ordering::SeqCst);
        load.store_kv(engine);
        if !config.step_delay.is_zero() {
            std::thread::sleep(config.step_delay);
        }
        if tokens > 0 {
            load.note_step(tokens, started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_times_average_by_step_size() {
        let load = Load::default();
        assert!(load.step_us_by_tokens().iter().all(|&us| us == 0), "none ran yet");
        load.note_step(1, Duration::from_millis(10));
        load.note_step(100, Duration::from_millis(80));
        load.note_step(1, Duration::from_millis(18));
        let times = load.step_us_by_tokens();
        assert_eq!(times.len(), herd_proto::STEP_BUCKETS);
        assert_eq!(times[0], 11_000, "an eighth of the new step moves the average");
        assert_eq!(times[herd_proto::step_bucket(100)], 80_000);
        assert_eq!(times.iter().filter(|&&us| us > 0).count(), 2);
    }
}

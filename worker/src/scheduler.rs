//! Runs admitted sequences on the engine's own thread, one token per sequence per round.
//!
//! The engine's compute stays off the async runtime: candle's CPU kernels spin-wait their
//! threads, and sharing cores with tokio's workers collapses throughput.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{Engine, EngineError, Sequence, Step};

/// What a running sequence sends back: a step, or the error that ended it.
pub type StepResult = Result<Step, EngineError>;

/// A sequence waiting for a slot, and where its steps go.
struct Job {
    seq: Sequence,
    out: UnboundedSender<StepResult>,
}

/// Running and waiting sequences, as heartbeats report them.
#[derive(Debug, Default)]
pub struct Load {
    running: AtomicUsize,
    waiting: AtomicUsize,
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

    /// Nothing running or queued.
    pub fn is_idle(&self) -> bool {
        self.running() == 0 && self.waiting() == 0
    }
}

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences stepped together.
    pub max_batch_size: usize,
    /// Sequences queued beyond those before submissions are refused.
    pub max_queue: usize,
    /// Sleep after each round; a test-only knob to make a worker slower than its peer.
    pub step_delay: Duration,
}

/// Why a submission was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds `max_queue` sequences already.
    QueueFull,
    /// The engine thread has stopped.
    Stopped,
}

/// Handle to the engine thread.
pub struct Scheduler {
    jobs: mpsc::Sender<Job>,
    load: Arc<Load>,
    max_queue: usize,
}

impl Scheduler {
    /// Starts the engine thread.
    pub fn start(engine: Arc<Engine>, config: SchedulerConfig) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel();
        let load = Arc::new(Load::default());
        let thread_load = load.clone();
        let max_queue = config.max_queue;
        std::thread::Builder::new()
            .name("herd-engine".into())
            .spawn(move || run(&engine, &config, &rx, &thread_load))?;
        Ok(Self { jobs, load, max_queue })
    }

    /// Queues `seq`; its steps arrive on `out`. Dropping the receiver cancels it at the next round.
    pub fn submit(&self, seq: Sequence, out: UnboundedSender<StepResult>) -> Result<(), SubmitError> {
        // Reserve the queue slot first so concurrent submitters cannot overshoot max_queue.
        let prev = self.load.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_queue {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        self.jobs.send(Job { seq, out }).map_err(|_| {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// Current load.
    pub fn load(&self) -> &Arc<Load> {
        &self.load
    }
}

fn run(engine: &Engine, config: &SchedulerConfig, rx: &mpsc::Receiver<Job>, load: &Load) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Job> = Vec::new();
    loop {
        // Block only when there is nothing to step.
        if running.is_empty() && queue.is_empty() {
            match rx.recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => return,
            }
        }
        queue.extend(rx.try_iter());
        while running.len() < config.max_batch_size.max(1) {
            let Some(job) = queue.pop_front() else { break };
            load.waiting.fetch_sub(1, Ordering::SeqCst);
            if !job.out.is_closed() {
                running.push(job);
            }
        }
        load.running.store(running.len(), Ordering::SeqCst);
        running.retain_mut(|job| {
            // The client went away: stop spending compute on it.
            if job.out.is_closed() {
                return false;
            }
            match engine.step(&mut job.seq) {
                Ok(step) => {
                    let done = step.finish.is_some();
                    let delivered = job.out.send(Ok(step)).is_ok();
                    delivered && !done
                }
                Err(e) => {
                    tracing::error!(error = %e, "generation failed");
                    let _ = job.out.send(Err(e));
                    false
                }
            }
        });
        load.running.store(running.len(), Ordering::SeqCst);
        if !config.step_delay.is_zero() {
            std::thread::sleep(config.step_delay);
        }
    }
}

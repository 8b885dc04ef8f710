//! The worker's scheduler on a tiny random model: sequences interleave, a dropped receiver
//! cancels its sequence, and a full queue refuses work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herd_tests::steps::collect;
use herd_tests::tiny;
use herd_worker::engine::{Engine, GenerationParams, LoadOptions, SamplingParams};
use herd_worker::scheduler::{Scheduler, SchedulerConfig, SubmitError};

fn tiny_engine(dir: &std::path::Path) -> Arc<Engine> {
    let model = dir.join("tiny");
    tiny::write_hf(&model, tiny::Dims::BASE, &tiny::tensors(tiny::Dims::BASE, 7), 1);
    Arc::new(Engine::load(&LoadOptions::new(&model), &mut |_, _| {}).unwrap())
}

fn params(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

fn wait_idle(scheduler: &Scheduler, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if scheduler.load().is_idle() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn sequences_interleave_and_finish_like_generate() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path());
    let config = SchedulerConfig::new(2, 4);
    let scheduler = Scheduler::start(engine.clone(), config).unwrap();
    let (prompt_a, prompt_b) = (vec![1, 5, 9], vec![1, 7, 7, 3]);
    let (tx_a, mut rx_a) = tokio::sync::mpsc::unbounded_channel();
    let (tx_b, mut rx_b) = tokio::sync::mpsc::unbounded_channel();
    scheduler.submit(engine.start(&prompt_a, &params(6)).unwrap(), tx_a).unwrap();
    scheduler.submit(engine.start(&prompt_b, &params(6)).unwrap(), tx_b).unwrap();
    let (a, b) = (collect(&mut rx_a), collect(&mut rx_b));
    let alone = |p: &[u32]| engine.generate(p, &params(6), &mut |_| {}).unwrap().token_ids;
    assert_eq!(a, alone(&prompt_a), "interleaving does not change a sequence's tokens");
    assert_eq!(b, alone(&prompt_b));
    assert!(wait_idle(&scheduler, Duration::from_secs(10)));
}

#[test]
fn a_dropped_receiver_cancels_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path());
    // 1000 tokens at >= 20 ms a round would take over 20 s if the sequence kept running.
    let config = SchedulerConfig { step_delay: Duration::from_millis(20), ..SchedulerConfig::new(1, 4) };
    let scheduler = Scheduler::start(engine.clone(), config).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    scheduler.submit(engine.start(&[1, 2, 3], &params(1000)).unwrap(), tx).unwrap();
    rx.blocking_recv().expect("a first step").unwrap();
    drop(rx);
    assert!(wait_idle(&scheduler, Duration::from_secs(10)), "the sequence kept running after its client left");
}

#[test]
fn a_full_queue_refuses_new_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path());
    let config = SchedulerConfig { step_delay: Duration::from_millis(20), ..SchedulerConfig::new(1, 1) };
    let scheduler = Scheduler::start(engine.clone(), config).unwrap();
    let mut receivers = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        match scheduler.submit(engine.start(&[1, 2], &params(500)).unwrap(), tx) {
            Ok(()) => receivers.push(rx),
            Err(e) => {
                assert_eq!(e, SubmitError::QueueFull);
                refused += 1;
            }
        }
    }
    // One may already be running, one waits; the rest are refused.
    assert!((2..=3).contains(&refused), "refused {refused} of 4 with one slot and a queue of one");
    drop(receivers);
    assert!(wait_idle(&scheduler, Duration::from_secs(10)));
}

//! Batched steps on the test model: sequences that share forward passes (prompts of different
//! lengths, prefills beside decodes) get exactly the tokens they get alone.

use std::sync::Arc;
use std::time::Duration;

use herd_tests::steps::collect;
use herd_tests::test_model;
use herd_worker::engine::kv::{DEFAULT_BLOCK_SIZE, KvOptions};
use herd_worker::engine::{Engine, GenerationParams, LoadOptions, Message, SamplingParams};
use herd_worker::scheduler::{Scheduler, SchedulerConfig};
use tokio::sync::mpsc::unbounded_channel;

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Who wrote the play Hamlet?",
    "Explain what a CPU does in one sentence.",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
];

#[test]
fn eight_concurrent_greedy_answers_equal_each_one_alone() {
    let engine = Arc::new(Engine::load(&LoadOptions::new(test_model()), &mut |_, _| {}).expect("load the test model"));
    let params = GenerationParams { sampling: SamplingParams::greedy(), max_tokens: Some(24), ..Default::default() };
    let prompts: Vec<Vec<u32>> =
        PROMPTS.iter().map(|p| engine.encode_chat(&[Message::new("user", *p)]).unwrap()).collect();
    let config = SchedulerConfig::new(8, 8);
    let scheduler = Scheduler::start(engine.clone(), config).unwrap();
    let mut streams = Vec::new();
    // Half start together; the rest join once those are decoding, so prefills share steps with decodes.
    for (i, p) in prompts.iter().enumerate() {
        let (tx, rx) = unbounded_channel();
        scheduler.submit(engine.start(p, &params).unwrap(), tx).unwrap();
        streams.push(rx);
        if i == 3 {
            while scheduler.load().running() < 4 {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let batched: Vec<Vec<u32>> = streams.iter_mut().map(collect).collect();
    for ((p, ids), text) in prompts.iter().zip(&batched).zip(PROMPTS) {
        let alone = engine.generate(p, &params, &mut |_| {}).unwrap().token_ids;
        // A final stop token is not streamed as a token.
        let alone: Vec<u32> = alone.into_iter().filter(|t| !engine.eos_ids().contains(t)).collect();
        assert_eq!(ids, &alone, "{text:?} answered differently in a batch");
    }
}

/// A recomputed sequence runs its whole context as one prompt; on the CPU each query's attention
/// is computed alike either way, so its answer does not change.
#[test]
fn a_kv_budget_for_two_runs_four_by_evicting_and_recomputing() {
    let probe = Engine::load(&LoadOptions::new(test_model()), &mut |_, _| {}).expect("load the test model");
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(24),
        ignore_eos: true,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> =
        PROMPTS[..4].iter().map(|p| probe.encode_chat(&[Message::new("user", *p)]).unwrap()).collect();
    // Blocks for the two largest sequences at their full length, not for all four.
    let mut sizes: Vec<usize> = prompts.iter().map(|p| (p.len() + 24).div_ceil(DEFAULT_BLOCK_SIZE)).collect();
    sizes.sort_unstable();
    let blocks = sizes[2] + sizes[3];
    let kv = KvOptions { cache_bytes: Some((blocks * probe.kv_block_bytes()) as u64), ..KvOptions::default() };
    drop(probe);
    let engine = Arc::new(Engine::load(&LoadOptions { kv, ..LoadOptions::new(test_model()) }, &mut |_, _| {}).unwrap());
    assert_eq!(engine.kv_stats().total, blocks);
    let scheduler = Scheduler::start(engine.clone(), SchedulerConfig::new(4, 4)).unwrap();
    let mut streams = Vec::new();
    for p in &prompts {
        let (tx, rx) = unbounded_channel();
        scheduler.submit(engine.start(p, &params).unwrap(), tx).unwrap();
        streams.push(rx);
    }
    let batched: Vec<Vec<u32>> = streams.iter_mut().map(collect).collect();
    assert!(scheduler.load().preemptions() > 0, "the budget never forced an eviction");
    for ((p, ids), text) in prompts.iter().zip(&batched).zip(PROMPTS) {
        let alone = engine.generate(p, &params, &mut |_| {}).unwrap().token_ids;
        assert_eq!(ids, &alone, "{text:?} answered differently after being evicted and recomputed");
    }
    // A sequence that could never fit is refused, not stalled.
    let room = blocks * DEFAULT_BLOCK_SIZE;
    let (tx, mut rx) = unbounded_channel();
    let long = GenerationParams { max_tokens: Some(room), ..params };
    scheduler.submit(engine.start(&prompts[0], &long).unwrap(), tx).unwrap();
    let err = rx.blocking_recv().expect("an answer").expect_err("an error").to_string();
    assert!(err.contains("KV cache") && err.contains(&room.to_string()), "{err}");
}

/// On the quantized path, where a last-bit difference from chunking could grow through the 8-bit
/// activation rounding into another choice at a near-tie: the CPU's attention and kernels
/// compute each token alike however the prompt is cut.
#[test]
fn prompts_prefilled_in_chunks_beside_decodes_answer_as_alone() {
    let engine = Arc::new(Engine::load(&LoadOptions::new(test_model()), &mut |_, _| {}).expect("load the test model"));
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(16),
        ignore_eos: true,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> =
        PROMPTS[4..7].iter().map(|p| engine.encode_chat(&[Message::new("user", *p)]).unwrap()).collect();
    // 12 tokens a step: every prompt (30+ tokens) takes several steps, shared with the decodes.
    let config = SchedulerConfig { max_batch_tokens: 12, ..SchedulerConfig::new(3, 3) };
    let scheduler = Scheduler::start(engine.clone(), config).unwrap();
    let mut streams = Vec::new();
    for p in &prompts {
        assert!(p.len() > 24, "the prompt must need several chunks");
        let (tx, rx) = unbounded_channel();
        scheduler.submit(engine.start(p, &params).unwrap(), tx).unwrap();
        streams.push(rx);
    }
    for ((p, rx), text) in prompts.iter().zip(streams.iter_mut()).zip(&PROMPTS[4..7]) {
        let alone = engine.generate(p, &params, &mut |_| {}).unwrap().token_ids;
        assert_eq!(collect(rx), alone, "{text:?} answered differently when prefilled in chunks");
    }
}

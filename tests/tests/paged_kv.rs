//! The paged KV cache: a shared system prompt is stored once for every request that uses it,
//! long chats that outgrow the cache are preempted and recomputed with the answers they give
//! alone, and tensor attention over the blocks computes what the CPU's loops compute.

use std::sync::Arc;
use std::time::Duration;

use herd_tests::steps::collect;
use herd_tests::{test_model, tiny};
use herd_worker::engine::kv::{DEFAULT_BLOCK_SIZE, KvOptions};
use herd_worker::engine::{Engine, GenerationParams, LoadOptions, Message, Progress, SamplingParams, Sequence};
use herd_worker::scheduler::{Scheduler, SchedulerConfig};
use tokio::sync::mpsc::unbounded_channel;

/// 32 chats through a real worker, sharing a system prompt of 1,800 tokens, on a worker whose
/// cache holds that prompt once and each request's own tokens, and not four copies of the
/// prompt: they all run together, none is preempted, and the blocks in use never exceed one
/// copy of the shared blocks plus each request's own.
#[tokio::test(flavor = "multi_thread")]
async fn a_shared_system_prompt_is_stored_once_for_32_concurrent_requests() {
    use herd_tests::cluster::{controller, free_addr, gateway, series, wait_for_workers, worker};
    const REQUESTS: usize = 32;
    const MAX_TOKENS: usize = 24;
    let probe = Engine::load(&LoadOptions::new(test_model()), &mut |_, _| {}).unwrap();
    let system: String = (0..127).map(|i| format!("Rule {i}: answer politely, briefly and in plain words. ")).collect();
    let messages = |i: usize| {
        vec![
            Message::new("system", system.clone()),
            Message::new("user", format!("Question {i}: what is {i} plus {i}?")),
        ]
    };
    let prompts: Vec<Vec<u32>> = (0..REQUESTS).map(|i| probe.encode_chat(&messages(i)).unwrap()).collect();
    let shared = prompts.iter().map(|p| herd_worker::engine::kv::common_prefix(p, &prompts[0])).min().unwrap();
    assert!(shared >= 1800, "the shared prompt is {shared} tokens");
    let bs = DEFAULT_BLOCK_SIZE;
    let shared_blocks = shared / bs;
    let own: Vec<usize> = prompts.iter().map(|p| (p.len() - shared_blocks * bs + MAX_TOKENS).div_ceil(bs)).collect();
    let once = shared_blocks + own.iter().sum::<usize>();
    assert!(once < 4 * shared_blocks, "the budget must not hold four copies of the prompt");
    let mb = (once * probe.kv_block_bytes()).div_ceil(1 << 20);
    drop(probe);

    let ctl = controller("127.0.0.1:0", "5s");
    let metrics = free_addr();
    let args = ["--metrics-listen", &metrics, "--kv-cache-mb", &mb.to_string(), "--max-batch-size", "32"];
    let _w = worker(&ctl, &args);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let http = reqwest::Client::new();
    let scrape = async |http: &reqwest::Client| {
        let text = http.get(format!("http://{metrics}/metrics")).send().await.unwrap().text().await.unwrap();
        let get = |name: &str| series(&text, name).unwrap_or_else(|| panic!("{name} in {text}")) as usize;
        (
            get("herd_worker_running_sequences"),
            get("herd_worker_kv_blocks{state=\"used\"}"),
            get("herd_worker_kv_blocks{state=\"total\"}"),
            get("herd_worker_preemptions_total"),
        )
    };
    let asks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (http, url) = (http.clone(), format!("{}/v1/chat/completions", gw.url()));
            let body = serde_json::json!({"model": herd_tests::cluster::MODEL, "max_tokens": MAX_TOKENS,
                "temperature": 0, "messages": [{"role": "system", "content": system},
                {"role": "user", "content": format!("Question {i}: what is {i} plus {i}?")}]});
            tokio::spawn(async move {
                let resp = http.post(url).json(&body).send().await.unwrap();
                assert_eq!(resp.status().as_u16(), 200);
                resp.json::<serde_json::Value>().await.unwrap()
            })
        })
        .collect();
    let (mut most_running, mut most_used) = (0, 0);
    while !asks.iter().all(|a| a.is_finished()) {
        let (running, used, _, _) = scrape(&http).await;
        (most_running, most_used) = (most_running.max(running), most_used.max(used));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut cached = 0;
    for a in asks {
        let v = a.await.unwrap();
        cached += v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() as usize;
    }
    let (_, _, total, preemptions) = scrape(&http).await;
    eprintln!(
        "shared prompt {shared} tokens ({shared_blocks} blocks); cache {total} blocks ({mb} MiB); most running \
         {most_running}; most blocks used {most_used} (one copy: {once}); cached prompt tokens {cached}"
    );
    assert_eq!(most_running, REQUESTS, "every request ran in the same batch");
    assert_eq!(preemptions, 0, "nothing was preempted");
    assert!(most_used <= once, "{most_used} blocks in use: more than one copy of the prompt ({once})");
    assert!(cached >= (REQUESTS - 1) * shared_blocks * bs, "the others found the prompt: {cached} tokens");
}

/// Token ids for a prompt of `len` tokens of a tiny model's vocabulary.
fn ids(seed: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| (3 + (i * 7919 + seed * 104_729) % (tiny::VOCAB - 3)) as u32).collect()
}

/// 16 chats growing to 2,000 tokens each on a cache with room for about five: sequences are
/// preempted, wait and are recomputed, and each answers what it answers alone. A tiny model
/// quantized to Q8_0 follows llama.cpp's arithmetic, which computes each token alike however
/// the steps are batched, so "alike" is to the bit; its attention is the CPU's, over the same
/// block tables as a real model's.
#[test]
fn sixteen_long_chats_under_preemption_answer_as_alone() {
    const CHATS: usize = 16;
    const LENGTH: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.gguf");
    let d = tiny::Dims { hidden: 64, inter: 128, heads: 4, kv_heads: 2, context: 4096, ..tiny::Dims::BASE };
    tiny::write_gguf(&path, d, &tiny::tensors(d, 41), candle_core::quantized::GgmlDType::Q8_0);
    let load = |kv: KvOptions| Engine::load(&LoadOptions { kv, ..LoadOptions::new(&path) }, &mut |_, _| {}).unwrap();
    let alone_engine = load(KvOptions { prefix_caching: false, ..KvOptions::default() });
    let blocks = 5 * LENGTH / DEFAULT_BLOCK_SIZE;
    let engine = Arc::new(load(KvOptions {
        cache_bytes: Some((blocks * alone_engine.kv_block_bytes()) as u64),
        ..KvOptions::default()
    }));
    let prompts: Vec<Vec<u32>> = (0..CHATS).map(|i| ids(i, LENGTH - 100 - 20 * i)).collect();
    let params = |p: &[u32]| GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(LENGTH - p.len()),
        ignore_eos: true,
        ..Default::default()
    };
    let config = SchedulerConfig { max_batch_tokens: 512, ..SchedulerConfig::new(CHATS, CHATS) };
    let scheduler = Scheduler::start(engine.clone(), config).unwrap();
    let mut streams = Vec::new();
    for p in &prompts {
        let (tx, rx) = unbounded_channel();
        scheduler.submit(engine.start(p, &params(p)).unwrap(), tx).unwrap();
        streams.push(rx);
    }
    let batched: Vec<Vec<u32>> = streams.iter_mut().map(collect).collect();
    let preemptions = scheduler.load().preemptions();
    eprintln!("{CHATS} chats of {LENGTH} tokens in {blocks} blocks: {preemptions} preemptions");
    assert!(preemptions > 0, "the cache never ran short");
    for (i, (p, got)) in prompts.iter().zip(&batched).enumerate() {
        assert_eq!(got.len(), LENGTH - p.len());
        let alone = alone_engine.generate(p, &params(p), &mut |_| {}).unwrap().token_ids;
        assert_eq!(got, &alone, "chat {i} answered differently after preemption");
    }
}

/// The same script of steps on two engines of a tiny f32 model, one attending in the CPU's
/// loops, one with tensor attention over the paged cache: prompts cut in chunks beside decodes,
/// a prompt sharing another's blocks (a partly filled one copied), and a sequence preempted for
/// want of blocks and resumed. Every step ends alike, within 1e-4 in each token's logprob.
#[test]
fn tensor_attention_equals_the_host_loops_on_mixed_steps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    tiny::write_hf(&path, tiny::Dims::BASE, &tiny::tensors(tiny::Dims::BASE, 31), 1);
    let load = |tensor_attention: bool| {
        let probe = Engine::load(&LoadOptions::new(&path), &mut |_, _| {}).unwrap();
        // Blocks of 4 tokens; 22 of them, short of the 26 the three sequences come to.
        let block_bytes = probe.kv_block_bytes() / DEFAULT_BLOCK_SIZE * 4;
        let kv = KvOptions { block_size: 4, cache_bytes: Some(22 * block_bytes as u64), ..KvOptions::default() };
        Engine::load(&LoadOptions { tensor_attention, kv, ..LoadOptions::new(&path) }, &mut |_, _| {}).unwrap()
    };
    let (host, device) = (load(false), load(true));
    assert_eq!(host.kv_stats().total, 22);
    let a: Vec<u32> = (0..30).map(|i| 1 + (i * 37) % 390).collect();
    let b: Vec<u32> = a[..22].iter().copied().chain((0..10).map(|i| 3 + (i * 11) % 390)).collect();
    let c: Vec<u32> = (0..25).map(|i| 2 + (i * 53) % 390).collect();
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(12),
        ignore_eos: true,
        logprobs: Some(0),
        ..Default::default()
    };
    let start = |e: &Engine| -> Vec<Sequence> { [&a, &b, &c].iter().map(|p| e.start(p, &params).unwrap()).collect() };
    let (mut hs, mut ds) = (start(&host), start(&device));
    let (mut preempted, mut worst) = (0, 0f32);
    for round in 0..400 {
        let live: Vec<usize> = (0..3).filter(|&i| hs[i].finish_reason().is_none()).collect();
        if live.is_empty() {
            break;
        }
        let step = |seqs: &mut [Sequence], e: &Engine| {
            let mut batch: Vec<&mut Sequence> = seqs.iter_mut().filter(|s| s.finish_reason().is_none()).collect();
            e.step_batch(&mut batch, 32).unwrap().into_iter().map(Result::unwrap).collect::<Vec<_>>()
        };
        let (h, d) = (step(&mut hs, &host), step(&mut ds, &device));
        for (&i, (h, d)) in live.iter().zip(h.iter().zip(&d)) {
            match (h, d) {
                (Progress::Sampled(h), Progress::Sampled(d)) => {
                    assert_eq!(h.token, d.token, "round {round}, sequence {i}");
                    let (h, d) = (h.logprob.as_ref().unwrap().logprob, d.logprob.as_ref().unwrap().logprob);
                    worst = worst.max((h - d).abs());
                }
                (Progress::Waiting, Progress::Waiting) => {}
                (Progress::Preempted, Progress::Preempted) => preempted += 1,
                other => panic!("round {round}, sequence {i}: {other:?}"),
            }
        }
    }
    assert!(hs.iter().chain(&ds).all(|s| s.finish_reason().is_some()), "every sequence finished");
    assert!(worst < 1e-4, "logprobs differ by {worst}");
    assert!(preempted > 0, "no sequence was preempted");
    assert_eq!(hs[1].cached_prompt_tokens(), 22, "the second prompt shares the first's blocks, a partial one copied");
    assert_eq!(ds[1].cached_prompt_tokens(), 22);
}

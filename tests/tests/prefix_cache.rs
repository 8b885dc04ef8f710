//! Prefix caching on tiny random models: a prompt that starts like an earlier prompt or answer
//! shares its KV blocks (and copies the rows of a partly matching block), and generates exactly
//! what it generates computed from scratch; a burst of prompts sharing a prefix computes it once.

use std::path::{Path, PathBuf};

use candle_core::Device;
use herd_tests::tiny;
use herd_worker::engine::kv::KvOptions;
use herd_worker::engine::{Engine, GenerationParams, LoadOptions, Progress, SamplingParams, Sequence};

/// A tiny random model in `dir`, named for its seed.
fn tiny_model(dir: &tempfile::TempDir, dims: tiny::Dims, seed: u64) -> PathBuf {
    let path = dir.path().join(format!("m{seed}"));
    tiny::write_hf(&path, dims, &tiny::tensors(dims, seed), 1);
    path
}

/// An engine whose KV cache holds `blocks` blocks of 16 tokens, prefix caching on if `caching`.
fn load(path: &Path, tp: usize, tensor_attention: bool, caching: bool, blocks: usize) -> Engine {
    let devices = vec![Device::Cpu; tp];
    let probe = Engine::load(&LoadOptions { devices: devices.clone(), ..LoadOptions::new(path) }, &mut |_, _| {});
    let bytes = blocks * probe.unwrap().kv_block_bytes();
    let kv = KvOptions { cache_bytes: Some(bytes as u64), prefix_caching: caching, ..KvOptions::default() };
    let opts = LoadOptions { devices, tensor_attention, kv, ..LoadOptions::new(path) };
    Engine::load(&opts, &mut |_, _| {}).unwrap()
}

fn params(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        logprobs: Some(0),
        ..Default::default()
    }
}

/// Greedy tokens and each one's logprob.
fn generate(engine: &Engine, prompt: &[u32], max_tokens: usize) -> (Vec<u32>, Vec<f32>) {
    let mut logprobs = Vec::new();
    let done = engine
        .generate(prompt, &params(max_tokens), &mut |t| logprobs.push(t.logprob.as_ref().unwrap().logprob))
        .unwrap();
    (done.token_ids, logprobs)
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 1 + (i * 37 + seed * 11) % 390).collect()
}

/// Logprobs agree within 1e-4: a matrix product over fewer rows may round differently.
fn check_reuse(path: &Path, tp: usize, tensor_attention: bool) {
    let what = format!("tp {tp}, tensor attention {tensor_attention}");
    let fresh = load(path, tp, tensor_attention, false, 256);
    let cached = load(path, tp, tensor_attention, true, 256);
    let system = prompt(1, 40);
    let first = [system.clone(), prompt(2, 5)].concat();
    // The first prompt misses, the repeat copies all but its last token.
    let (a, a_lp) = generate(&cached, &first, 12);
    assert_eq!(cached.kv_stats().hits, 0, "{what}");
    let (again, again_lp) = generate(&cached, &first, 12);
    assert_eq!(cached.kv_stats().hit_tokens, first.len() as u64 - 1, "{what}");
    assert_eq!(again, a, "{what}: a repeated prompt answers alike");
    // A follow-up turn: the earlier prompt and answer, then more.
    let follow_up = [first.clone(), a.clone(), prompt(3, 7)].concat();
    let before = cached.kv_stats().hit_tokens;
    let (b, b_lp) = generate(&cached, &follow_up, 12);
    // The answer's last token was sampled but never run, so it is not in the cache.
    let copied = cached.kv_stats().hit_tokens - before;
    assert_eq!(copied, (first.len() + a.len() - 1) as u64, "{what}: the follow-up copies the first turn");
    // Another prompt sharing only the system part.
    let other = [system.clone(), prompt(4, 9)].concat();
    let (c, c_lp) = generate(&cached, &other, 12);
    assert_eq!(cached.kv_stats().hit_tokens - before - copied, system.len() as u64, "{what}");
    for (name, p, got, got_lp) in
        [("repeat", &first, &again, &again_lp), ("follow-up", &follow_up, &b, &b_lp), ("other", &other, &c, &c_lp)]
    {
        let (want, want_lp) = generate(&fresh, p, 12);
        assert_eq!(got, &want, "{what}: {name} with a cached prefix differs from computing it");
        let diff = want_lp.iter().zip(got_lp).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-4, "{what}: {name} logprobs differ by {diff}");
    }
    assert_eq!(a_lp, generate(&fresh, &first, 12).1, "{what}: the first run computes like no cache");
    let stats = fresh.kv_stats();
    assert_eq!((stats.hits, stats.cached), (0, 0), "without prefix caching nothing is found or kept");
}

#[test]
fn cached_prefixes_generate_what_computing_them_does() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir, tiny::Dims::BASE, 21);
    check_reuse(&base, 1, false);
    check_reuse(&base, 1, true);
    let split = tiny_model(&dir, tiny::Dims::TP, 22);
    check_reuse(&split, 2, false);
}

#[test]
fn the_cache_keeps_to_its_budget_and_forgets_the_least_recent() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(&dir, tiny::Dims::BASE, 23);
    // Three blocks for each of three answered prompts (40 + 4 - 1 tokens), seven in all.
    let engine = load(&path, 1, false, true, 7);
    let prompts: Vec<Vec<u32>> = (0..3).map(|s| prompt(10 + s, 40)).collect();
    for p in &prompts {
        generate(&engine, p, 4);
    }
    assert_eq!((engine.kv_stats().used, engine.kv_stats().cached), (0, 7), "{:?}", engine.kv_stats());
    let found = |p: &[u32]| {
        let before = engine.kv_stats().hit_tokens;
        generate(&engine, p, 4);
        engine.kv_stats().hit_tokens - before
    };
    assert_eq!(found(&prompts[2]), 39, "the most recent prompt is cached whole");
    assert!(found(&prompts[0]) < 32, "the least recent lost its later blocks");
}

#[test]
fn a_burst_sharing_a_prompt_computes_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(&dir, tiny::Dims::BASE, 24);
    let engine = load(&path, 1, false, true, 256);
    let fresh = load(&path, 1, false, false, 256);
    let shared = prompt(6, 48);
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| [shared.clone(), vec![7 + i]].concat()).collect();
    let mut seqs: Vec<Sequence> = prompts.iter().map(|p| engine.start(p, &params(6)).unwrap()).collect();
    let mut tokens = vec![Vec::new(); seqs.len()];
    for round in 0.. {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].finish_reason().is_none()).collect();
        if live.is_empty() {
            break;
        }
        let mut batch: Vec<&mut Sequence> = seqs.iter_mut().filter(|s| s.finish_reason().is_none()).collect();
        let results = engine.step_batch(&mut batch, usize::MAX).unwrap();
        for (&i, result) in live.iter().zip(results) {
            let step = match result.unwrap() {
                Progress::Sampled(step) => Some(step),
                Progress::Waiting => None,
                Progress::Preempted => panic!("nothing needed its blocks"),
            };
            if round == 0 {
                assert_eq!(step.is_some(), i == 0, "only the first prompt runs at first; the others wait for it");
            }
            tokens[i].extend(step.and_then(|s| s.token));
        }
    }
    for (p, got) in prompts.iter().zip(&tokens) {
        assert_eq!(got, &generate(&fresh, p, 6).0, "a prompt that waited for the shared prefix");
    }
    let stats = engine.kv_stats();
    assert_eq!((stats.hits, stats.hit_tokens), (3, 3 * shared.len() as u64), "the three others share it: {stats:?}");
}

/// A prompt run in chunks is kept once its last chunk ran, even a chunk of one token.
#[test]
fn a_prompt_run_in_chunks_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(&dir, tiny::Dims::BASE, 25);
    let engine = load(&path, 1, false, true, 256);
    let ids = prompt(8, 49);
    // Not finished after its first token: only the end of the prompt keeps it.
    let mut seq = engine.start(&ids, &params(3)).unwrap();
    // 24, 24, then 1 token a step.
    let mut rounds = 0;
    while matches!(engine.step_batch(&mut [&mut seq], 24).unwrap().pop().unwrap().unwrap(), Progress::Waiting) {
        rounds += 1;
    }
    assert_eq!(rounds, 2);
    assert_eq!(engine.kv_stats().used, 4, "{:?}", engine.kv_stats());
    generate(&engine, &ids, 1);
    assert_eq!(engine.kv_stats().hit_tokens, ids.len() as u64 - 1, "its blocks are shared while it runs");
}

/// Through a real worker and gateway on the test model: the same chat twice copies the first
/// one's prefix (the metrics say so) and answers alike; `--no-prefix-cache` finds nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_reuses_prefixes_and_reports_it() {
    use herd_tests::cluster::{controller, free_addr, gateway, series, wait_for_workers, worker};
    let ctl = controller("127.0.0.1:0", "5s");
    let (on, off) = (free_addr(), free_addr());
    let _w = worker(&ctl, &["--metrics-listen", &on, "--model-name", "cached"]);
    let _w_off = worker(&ctl, &["--metrics-listen", &off, "--model-name", "uncached", "--no-prefix-cache"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 2, std::time::Duration::from_secs(120)).await;
    let http = reqwest::Client::new();
    let ask = async |model: &str| {
        let body = serde_json::json!({"model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "system", "content": "You answer in one short sentence, politely."},
                         {"role": "user", "content": "What colour is the sky on a clear day?"}]});
        let resp = http.post(format!("{}/v1/chat/completions", gw.url())).json(&body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let v: serde_json::Value = resp.json().await.unwrap();
        let usage = &v["usage"];
        let (prompt, cached) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap(),
        );
        (v["choices"][0]["message"]["content"].as_str().unwrap().to_string(), prompt, cached)
    };
    let scrape =
        async |addr: &str| http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    let (first, prompt, cached) = ask("cached").await;
    assert_eq!(cached, 0, "nothing is cached before the first request");
    let (again, _, cached) = ask("cached").await;
    assert_eq!(first, again, "a cached prefix changes the greedy answer");
    // All but the last prompt token, whose logits the answer needs.
    assert_eq!(cached, prompt - 1, "usage.prompt_tokens_details.cached_tokens");
    assert_eq!(ask("uncached").await, (first, prompt, 0), "the worker without a prefix cache answers alike");
    assert_eq!(ask("uncached").await.2, 0);
    // The engine thread publishes its counts after each step, just after sending its tokens.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut text = scrape(&on).await;
    while series(&text, "herd_worker_prefix_cache_hits_total") != Some(1.0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        text = scrape(&on).await;
    }
    assert_eq!(series(&text, "herd_worker_prefix_cache_hits_total"), Some(1.0), "{text}");
    assert!(series(&text, "herd_worker_prefix_cache_hit_tokens_total").unwrap() >= 20.0, "{text}");
    assert!(series(&text, "herd_worker_prefix_cache_tokens").unwrap() >= 20.0, "{text}");
    let text = scrape(&off).await;
    assert_eq!(series(&text, "herd_worker_prefix_cache_hits_total"), Some(0.0), "{text}");
    assert_eq!(series(&text, "herd_worker_prefix_cache_tokens"), Some(0.0), "{text}");
}

#[test]
fn kv_flags_out_of_range_are_refused_by_name() {
    for (flag, value) in [("--kv-block-size", "0"), ("--kv-block-size", "4096"), ("--gpu-memory-utilization", "1.5")] {
        let out = std::process::Command::new(herd_tests::herd_bin())
            .args(["worker", "--model", "/nonexistent.gguf", "--controller", "http://127.0.0.1:9"])
            .args(["--listen", "127.0.0.1:0", flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}

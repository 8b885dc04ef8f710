//! `herd bench --engine`: prompt and decode speed of the engine alone, with no server, single
//! stream and batched, so that kernel and scheduling regressions show up as numbers.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use herd_worker::engine::kv::KvOptions;
use herd_worker::engine::{Engine, GenerationParams, LoadOptions, SamplingParams, Sequence};
use serde_json::{Value, json};

/// Text the prompt is cut from (any prose works; this tokenizes to ordinary word pieces).
const PROSE: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the \
    worn stone steps as his father had taught him, and lit the great lamp that warned the fishing boats \
    away from the rocks below the cliff. ";

/// What `--engine` measures.
pub struct EngineBench<'a> {
    pub model: &'a Path,
    pub dtype: herd_worker::engine::DTypeChoice,
    pub quantize: Option<herd_worker::engine::QuantizeChoice>,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub batch: usize,
    pub runs: usize,
}

/// Exactly `n` prompt ids cut from repeated prose.
fn prompt(engine: &Engine, n: usize) -> anyhow::Result<Vec<u32>> {
    let piece = engine.tokenizer().encode(&PROSE.repeat(n / 40 + 1))?;
    if piece.is_empty() {
        bail!("the model's tokenizer turns the benchmark prose into no tokens");
    }
    let ids: Vec<u32> = piece.iter().copied().cycle().take(n).collect();
    Ok(ids)
}

/// Runs `seqs` to the end in batched steps: (prefill time, decode time, tokens per sequence).
fn run_batch(engine: &Engine, seqs: &mut [Sequence]) -> anyhow::Result<(Duration, Duration, usize)> {
    let start = Instant::now();
    let mut prefill = None;
    loop {
        let mut live: Vec<&mut Sequence> = seqs.iter_mut().filter(|s| s.finish_reason().is_none()).collect();
        if live.is_empty() {
            break;
        }
        for r in engine.step_batch(&mut live, usize::MAX)? {
            r?;
        }
        prefill.get_or_insert_with(|| start.elapsed());
    }
    let prefill = prefill.unwrap_or_default();
    let tokens = seqs.iter().map(Sequence::completion_tokens).min().unwrap_or(0);
    Ok((prefill, start.elapsed() - prefill, tokens))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Loads the model and measures; the report is JSON.
pub fn bench(b: &EngineBench) -> anyhow::Result<Value> {
    if !b.model.exists() {
        bail!("--model {}: no such file or directory", b.model.display());
    }
    // Every sequence computes its own prompt: the benchmark measures computing, not sharing.
    let kv = KvOptions { prefix_caching: false, ..KvOptions::default() };
    let opts =
        LoadOptions { dtype: b.dtype, quantize: b.quantize, threads: b.threads, kv, ..LoadOptions::new(b.model) };
    let load_start = Instant::now();
    let engine = Engine::load(&opts, &mut |_, _| {}).with_context(|| format!("loading {}", b.model.display()))?;
    let load_s = load_start.elapsed().as_secs_f64();
    let loaded_rss = peak_rss_mb();
    let ids = prompt(&engine, b.prompt_tokens)?;
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(b.max_tokens),
        ignore_eos: true,
        ..Default::default()
    };
    let mut sizes = vec![1];
    if b.batch > 1 {
        sizes.push(b.batch);
    }
    let mut rows = Vec::new();
    for &size in &sizes {
        let (mut prompt_rates, mut decode_rates) = (Vec::new(), Vec::new());
        // The first run warms caches and the allocator; it is not counted.
        for run in 0..=b.runs {
            let mut seqs = (0..size).map(|_| engine.start(&ids, &params)).collect::<Result<Vec<_>, _>>()?;
            let (prefill, decode, tokens) = run_batch(&engine, &mut seqs)?;
            if run > 0 {
                prompt_rates.push((size * ids.len()) as f64 / prefill.as_secs_f64());
                // The first token of each sequence comes from the prefill step.
                decode_rates.push((size * tokens.saturating_sub(1)) as f64 / decode.as_secs_f64());
            }
        }
        rows.push(json!({
            "batch": size,
            "prompt_tokens_per_s": median(prompt_rates),
            "decode_tokens_per_s": median(decode_rates),
        }));
    }
    Ok(json!({
        "model": b.model.display().to_string(), "threads": b.threads, "tp": engine.tp_size(),
        "prompt_tokens": ids.len(), "max_tokens": b.max_tokens, "runs": b.runs, "results": rows,
        "load_s": load_s, "peak_rss_mb_after_load": loaded_rss, "peak_rss_mb": peak_rss_mb(),
    }))
}

/// This process's peak resident memory in MB (`VmHWM`), where the OS reports it.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// The report as a table.
pub fn print_text(r: &Value) {
    println!(
        "{} ({} threads), prompt {} tokens, {} new tokens, greedy, median of {} runs",
        r["model"].as_str().unwrap_or_default(),
        r["threads"],
        r["prompt_tokens"],
        r["max_tokens"],
        r["runs"]
    );
    let mb = |k: &str| r[k].as_f64().map_or_else(|| "unknown".to_owned(), |v| format!("{v:.0} MB"));
    println!(
        "loaded in {:.1} s; peak RSS {} after loading, {} in all",
        r["load_s"].as_f64().unwrap_or(f64::NAN),
        mb("peak_rss_mb_after_load"),
        mb("peak_rss_mb")
    );
    println!("{:>6} {:>16} {:>16}", "batch", "prompt tok/s", "decode tok/s");
    for row in r["results"].as_array().into_iter().flatten() {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        println!("{:>6} {:>16.1} {:>16.1}", row["batch"], f("prompt_tokens_per_s"), f("decode_tokens_per_s"));
    }
}

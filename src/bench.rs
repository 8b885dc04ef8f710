//! `herd bench`: a load generator for an OpenAI-compatible gateway. It streams completions at a
//! fixed concurrency and reports throughput, time to first token, inter-token latency and
//! end-to-end latency. It only ever talks to the URL it is given. With `--engine` it measures
//! the engine alone instead (see `bench_engine`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

/// Flags of `herd bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The gateway, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "HERD_URL", required_unless_present = "engine")]
    url: Option<String>,
    /// The model to ask (default: the gateway's first model); with --engine, the model file or
    /// directory to load.
    #[arg(long)]
    model: Option<String>,
    /// Measure the engine alone on --model, in this process: prompt and decode tokens/s, single
    /// stream and batched at --concurrency.
    #[arg(long)]
    engine: bool,
    /// With --engine: compute threads (default: every core).
    #[arg(long, requires = "engine", value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
    /// With --engine: weight dtype (auto, f32, f16, bf16).
    #[arg(long, requires = "engine", default_value = "auto")]
    dtype: herd_worker::engine::DTypeChoice,
    /// With --engine: quantize an HF checkpoint's matrices as they are read (q8_0, q4_0, q4_k).
    #[arg(long, requires = "engine")]
    quantize: Option<herd_worker::engine::QuantizeChoice>,
    /// With --engine: measured runs per batch size (after one warm-up run); the median is reported.
    #[arg(long, requires = "engine", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Requests in flight at once (with --engine: the batch size measured besides 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// Requests to send in all.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    requests: u32,
    /// Tokens generated per request (EOS is ignored, so each request makes exactly this many).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_tokens: u32,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    prompt_tokens: u32,
    /// Start each prompt with its run's and request's numbers, so that none shares a prefix: measures
    /// without the workers' prefix cache, which otherwise serves every prompt after the first.
    #[arg(long, conflicts_with = "engine")]
    unique_prompts: bool,
    /// Stop starting requests after this long, and give up on those still running.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    time_limit: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    /// `--threads`, for the engine's compute pools.
    pub fn threads(&self) -> Option<usize> {
        self.threads.map(|n| n as usize)
    }
}

/// What one request did.
#[derive(Default)]
struct Sample {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    total: Duration,
    tokens: usize,
    error: Option<String>,
}

/// Streams one completion, timing every event that carries a token.
async fn one(http: &reqwest::Client, url: &str, body: &Value) -> Sample {
    let start = Instant::now();
    let mut s = Sample::default();
    let mut last = start;
    let mut usage_tokens = None;
    let run = async {
        let resp = http.post(url).json(body).send().await?;
        crate::openai_client::for_each_event(resp, |event| {
            if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
                usage_tokens = Some(n as usize);
            }
            if event["choices"][0]["text"].is_string() {
                let now = Instant::now();
                match s.ttft {
                    None => s.ttft = Some(now - start),
                    Some(_) => s.gaps.push(now - last),
                }
                last = now;
                s.tokens += 1;
            }
            Ok(())
        })
        .await
    };
    if let Err(e) = run.await {
        s.error = Some(format!("{e:#}"));
    }
    s.tokens = usage_tokens.unwrap_or(s.tokens);
    s.total = start.elapsed();
    s
}

/// The p-th percentile (0..=100) of sorted durations, in seconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64()
}

fn summary(mut v: Vec<Duration>) -> Value {
    v.sort();
    json!({ "p50": percentile(&v, 50.0), "p90": percentile(&v, 90.0), "p99": percentile(&v, 99.0) })
}

async fn bench(args: BenchArgs) -> anyhow::Result<Value> {
    let base = args.url.as_deref().unwrap_or_default().trim_end_matches('/').to_string();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        bail!("--url {base}: expected an http:// or https:// URL");
    }
    let http = reqwest::Client::new();
    let model = match args.model.clone() {
        Some(m) => m,
        None => crate::openai_client::first_model(&http, &base).await?,
    };
    let prompt = "hello ".repeat(args.prompt_tokens as usize);
    let (unique, max_tokens, name) = (args.unique_prompts, args.max_tokens, model.clone());
    // A number of this run's own, so that no earlier run's prompts are cached either.
    let run = rand::random::<u32>();
    let body = move |i: usize| {
        let prompt = if unique { format!("{run}-{i} {}", prompt.trim_end()) } else { prompt.trim_end().to_string() };
        json!({
            "model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true,
        })
    };
    let url = format!("{base}/v1/completions");
    let deadline = Instant::now() + args.time_limit;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let clients: Vec<_> = (0..args.concurrency.min(args.requests))
        .map(|_| {
            let (http, url, body, next) = (http.clone(), url.clone(), body.clone(), next.clone());
            let requests = args.requests as usize;
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= requests || Instant::now() >= deadline {
                        break;
                    }
                    let limit = deadline.saturating_duration_since(Instant::now());
                    let sample = tokio::time::timeout(limit, one(&http, &url, &body(i))).await.unwrap_or_else(|_| {
                        Sample { error: Some("--time-limit reached".into()), ..Default::default() }
                    });
                    samples.push(sample);
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for c in clients {
        samples.extend(c.await.context("a client task failed")?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (ok, failed): (Vec<Sample>, Vec<Sample>) = samples.into_iter().partition(|s| s.error.is_none());
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let mut errors: Vec<String> = failed.iter().filter_map(|s| s.error.clone()).collect();
    errors.sort();
    errors.dedup();
    Ok(json!({
        "url": base, "model": model, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens, "unique_prompts": args.unique_prompts,
        "completed": ok.len(), "failed": failed.len(), "errors": errors,
        "not_started": args.requests as usize - ok.len() - failed.len(),
        "seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens as f64 / elapsed,
        "ttft_s": summary(ok.iter().filter_map(|s| s.ttft).collect()),
        "itl_s": summary(ok.iter().flat_map(|s| s.gaps.iter().copied()).collect()),
        "e2e_s": summary(ok.iter().map(|s| s.total).collect()),
    }))
}

fn print_text(r: &Value) {
    let line = |name: &str, v: &Value| {
        let ms = |k: &str| v[k].as_f64().unwrap_or(f64::NAN) * 1e3;
        println!("{name:<22} p50 {:>8.1} ms   p90 {:>8.1} ms   p99 {:>8.1} ms", ms("p50"), ms("p90"), ms("p99"));
    };
    println!(
        "{} completed, {} failed, {} not started in {:.1} s (concurrency {}, {} tokens each)",
        r["completed"],
        r["failed"],
        r["not_started"],
        r["seconds"].as_f64().unwrap_or(0.0),
        r["concurrency"],
        r["max_tokens"]
    );
    println!("output: {} tokens, {:.1} tokens/s", r["output_tokens"], r["output_tokens_per_s"].as_f64().unwrap_or(0.0));
    line("time to first token", &r["ttft_s"]);
    line("inter-token latency", &r["itl_s"]);
    line("end-to-end latency", &r["e2e_s"]);
    for e in r["errors"].as_array().into_iter().flatten() {
        println!("error: {}", e.as_str().unwrap_or_default());
    }
}

/// Runs `herd bench`; fails when any request failed.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let json_out = args.json;
    if args.engine {
        let Some(model) = &args.model else { bail!("--engine needs --model PATH (a .gguf file or an HF directory)") };
        let report = crate::bench_engine::bench(&crate::bench_engine::EngineBench {
            model: std::path::Path::new(model),
            dtype: args.dtype,
            quantize: args.quantize,
            threads: args.threads().unwrap_or_else(herd_worker::engine::default_threads),
            prompt_tokens: args.prompt_tokens as usize,
            max_tokens: args.max_tokens as usize,
            batch: args.concurrency as usize,
            runs: args.runs as usize,
        })?;
        if json_out {
            println!("{report}");
        } else {
            crate::bench_engine::print_text(&report);
        }
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = rt.block_on(bench(args))?;
    if json_out {
        println!("{report}");
    } else {
        print_text(&report);
    }
    match report["failed"].as_u64() {
        Some(0) => Ok(()),
        _ => bail!("{} of the requests failed", report["failed"]),
    }
}

//! `herd bench`: a load generator for an OpenAI-compatible gateway. By default it streams
//! completions at a fixed concurrency and reports throughput, time to first token, inter-token
//! latency and end-to-end latency; `--workload multi-turn` instead holds chat conversations whose
//! every turn resends the whole history, to measure how much of it the workers find cached. Both
//! report each worker's generation rate when the gateway's admin view tells it. It only ever talks
//! to the URL it is given. With `--engine` it measures the engine alone instead (see `bench_engine`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// What `herd bench` sends (without `--engine`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Independent one-shot completions at --concurrency, --requests in all.
    Single,
    /// --conversations chats at once, each of --turns turns that resend the whole history.
    MultiTurn,
}

/// Flags of `herd bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The gateway, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "HERD_URL", required_unless_present = "engine")]
    url: Option<String>,
    /// An API key of the gateway, sent as `Authorization: Bearer KEY` on every call (the admin
    /// view that gives the per-worker rates needs one too when the gateway has keys).
    #[arg(long, env = "HERD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A PEM file of the CA that signed the gateway's certificate, for an `https://` URL that
    /// the system's roots do not vouch for.
    #[arg(long, env = "HERD_CA_CERT")]
    ca_cert: Option<PathBuf>,
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
    /// What to send: `single` one-shot completions, or `multi-turn` chat conversations.
    #[arg(long, value_enum, default_value_t = Workload::Single, conflicts_with = "engine")]
    workload: Workload,
    /// Requests in flight at once (with --engine: the batch size measured besides 1). The
    /// multi-turn workload ignores it: it has one request in flight per conversation.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// Requests to send in all. The multi-turn workload ignores it: it sends --conversations ×
    /// --turns.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    requests: u32,
    /// Multi-turn: conversations, all held at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    conversations: u32,
    /// Multi-turn: turns per conversation, one after the other.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    turns: u32,
    /// Multi-turn: seconds a conversation pauses after each answer, uniform in A-B (e.g. 0.5-3)
    /// or fixed (e.g. 1.5); conversations then also start at random times in [0, B]. Default: no
    /// pause.
    #[arg(long, value_name = "A-B", value_parser = parse_think_time)]
    think_time: Option<ThinkTime>,
    /// Multi-turn: seed of the think times, so that a run's schedule can be repeated.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens generated per request (EOS is ignored, so each request makes exactly this many).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_tokens: u32,
    /// Approximate prompt length in tokens (multi-turn: of each user message).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    prompt_tokens: u32,
    /// Start each prompt with its run's and request's numbers, so that none shares a prefix: measures
    /// without the workers' prefix cache, which otherwise serves every prompt after the first.
    /// (Multi-turn user messages always carry such numbers.)
    #[arg(long, conflicts_with = "engine")]
    unique_prompts: bool,
    /// Constrain every answer to this JSON schema (a file), as `structured_outputs.json`: measures
    /// what constrained decoding costs. EOS is then not ignored; a schema that needs more than
    /// `--max-tokens` tokens still makes every request that long.
    #[arg(long, value_name = "FILE", conflicts_with = "engine")]
    json_schema: Option<PathBuf>,
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

/// `--think-time`: the bounds, in seconds, of a conversation's pause between turns.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ThinkTime {
    min: f64,
    max: f64,
}

/// Parses `--think-time`: `A-B` or a single number of seconds, finite, ≥ 0, with A ≤ B.
fn parse_think_time(s: &str) -> Result<ThinkTime, String> {
    let s = s.trim();
    let number = |x: &str| x.trim().parse::<f64>().map_err(|_| format!("{:?} is not a number of seconds", x.trim()));
    // A lone number first, so that "-1" reads as a negative number rather than a range.
    let (min, max) = match s.parse::<f64>() {
        Ok(x) => (x, x),
        Err(_) => {
            let (a, b) = s
                .split_once('-')
                .ok_or_else(|| format!("expected seconds as A-B (e.g. 0.5-3) or one number, not {s:?}"))?;
            (number(a)?, number(b)?)
        }
    };
    if !(min.is_finite() && max.is_finite()) {
        return Err("the seconds must be finite".into());
    }
    if min < 0.0 {
        return Err(format!("{min} s: the seconds must be ≥ 0"));
    }
    if min > max {
        return Err(format!("{min}-{max}: the lower bound is above the upper one"));
    }
    Ok(ThinkTime { min, max })
}

/// A duration uniform in [lo, hi] seconds.
fn uniform(rng: &mut StdRng, lo: f64, hi: f64) -> Duration {
    let secs = if hi > lo { rng.random_range(lo..=hi) } else { lo };
    // `<=` also catches -0.0 (which "--think-time -0" parses to); past Duration's range, wait "forever"
    // (the deadline cuts every pause short anyway).
    if secs <= 0.0 { Duration::ZERO } else { Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX) }
}

/// The pause before each turn of conversation `index`: a stagger in [0, B] before the first (so
/// that the conversations do not all start at once), a think time in [A, B] before each later
/// one; all zero without a think time. Drawn from a generator seeded with `seed ^ index`, so that
/// a run's schedule can be repeated.
fn pauses(think: Option<ThinkTime>, seed: u64, index: usize, turns: usize) -> Vec<Duration> {
    let Some(think) = think else { return vec![Duration::ZERO; turns] };
    let mut rng = StdRng::seed_from_u64(seed ^ index as u64);
    (0..turns).map(|turn| uniform(&mut rng, if turn == 0 { 0.0 } else { think.min }, think.max)).collect()
}

/// What one request did.
#[derive(Default)]
struct Sample {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    total: Duration,
    tokens: usize,
    /// The usage's prompt tokens, and how many of them the workers found cached (0 if not told).
    prompt_tokens: u64,
    cached_tokens: u64,
    /// The streamed text, when asked for (a conversation sends it back in its next turn).
    text: String,
    error: Option<String>,
}

/// Streams one completion or chat completion, timing every event that carries a token; keeps
/// the streamed text when `keep_text`.
async fn one(http: &reqwest::Client, url: &str, body: &Value, keep_text: bool) -> Sample {
    let start = Instant::now();
    let mut s = Sample::default();
    let mut last = start;
    let mut usage_tokens = None;
    let run = async {
        let resp = http.post(url).json(body).send().await?;
        crate::openai_client::for_each_event(resp, |event| {
            let usage = &event["usage"];
            if let Some(n) = usage["completion_tokens"].as_u64() {
                usage_tokens = Some(n as usize);
            }
            if let Some(n) = usage["prompt_tokens"].as_u64() {
                s.prompt_tokens = n;
            }
            if let Some(n) = usage["prompt_tokens_details"]["cached_tokens"].as_u64() {
                s.cached_tokens = n;
            }
            // Completions stream `text`, chats `delta.content`. An empty string carries no token:
            // the chat's opening role chunk and every final chunk have one.
            let choice = &event["choices"][0];
            let piece = choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str());
            if let Some(piece) = piece.filter(|p| !p.is_empty()) {
                let now = Instant::now();
                match s.ttft {
                    None => s.ttft = Some(now - start),
                    Some(_) => s.gaps.push(now - last),
                }
                last = now;
                s.tokens += 1;
                if keep_text {
                    s.text.push_str(piece);
                }
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

/// `one`, given up on at `deadline`.
async fn one_until(http: &reqwest::Client, url: &str, body: &Value, keep_text: bool, deadline: Instant) -> Sample {
    let limit = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(limit, one(http, url, body, keep_text))
        .await
        .unwrap_or_else(|_| Sample { error: Some("--time-limit reached".into()), ..Default::default() })
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

/// The distinct error messages of the failed samples, sorted.
fn distinct_errors<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Vec<String> {
    let mut errors: Vec<String> = samples.into_iter().filter_map(|s| s.error.clone()).collect();
    errors.sort();
    errors.dedup();
    errors
}

/// `words` words of filler, about as many tokens.
fn filler(words: u32) -> String {
    vec!["hello"; words as usize].join(" ")
}

async fn bench(args: BenchArgs) -> anyhow::Result<Value> {
    let base = args.url.as_deref().unwrap_or_default().trim_end_matches('/').to_string();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        bail!("--url {base}: expected an http:// or https:// URL");
    }
    if args.json_schema.is_some() && args.workload == Workload::MultiTurn {
        bail!("--json-schema applies to the single workload only");
    }
    let http = crate::openai_client::http_client(args.api_key.as_deref(), args.ca_cert.as_deref())?;
    let model = match args.model.clone() {
        Some(m) => m,
        None => crate::openai_client::first_model(&http, &base).await?,
    };
    let before = worker_counts(&http, &base).await.map(|(counts, _)| counts);
    let mut report = match args.workload {
        Workload::Single => single(&args, &http, &base, &model).await?,
        Workload::MultiTurn => multi_turn(&args, &http, &base, &model).await?,
    };
    let end = Instant::now();
    let seconds = report["seconds"].as_f64().unwrap_or(f64::NAN);
    let (workers, note) = per_worker(&http, &base, before, end, seconds).await;
    report["workers"] = workers;
    report["workers_note"] = note.map_or(Value::Null, Value::String);
    Ok(report)
}

/// The single workload: `--requests` completions, `--concurrency` at a time.
async fn single(args: &BenchArgs, http: &reqwest::Client, base: &str, model: &str) -> anyhow::Result<Value> {
    let prompt = filler(args.prompt_tokens);
    let (unique, max_tokens, name) = (args.unique_prompts, args.max_tokens, model.to_string());
    let schema = match &args.json_schema {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--json-schema {}: cannot read it", path.display()))?;
            let schema: Value =
                serde_json::from_str(&text).with_context(|| format!("--json-schema {}: not JSON", path.display()))?;
            Some(schema)
        }
    };
    // A number of this run's own, so that no earlier run's prompts are cached either.
    let run = rand::random::<u32>();
    let body = move |i: usize| {
        let prompt = if unique { format!("{run}-{i} {prompt}") } else { prompt.clone() };
        let mut body = json!({
            "model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true},
        });
        match &schema {
            Some(schema) => body["structured_outputs"] = json!({"json": schema}),
            None => body["ignore_eos"] = json!(true),
        }
        body
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
                    samples.push(one_until(&http, &url, &body(i), false, deadline).await);
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
    Ok(json!({
        "workload": "single",
        "url": base, "model": model, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens, "unique_prompts": args.unique_prompts,
        "json_schema": args.json_schema.as_ref().map(|p| p.display().to_string()),
        "completed": ok.len(), "failed": failed.len(), "errors": distinct_errors(&failed),
        "not_started": args.requests as usize - ok.len() - failed.len(),
        "seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens as f64 / elapsed,
        "ttft_s": summary(ok.iter().filter_map(|s| s.ttft).collect()),
        "itl_s": summary(ok.iter().flat_map(|s| s.gaps.iter().copied()).collect()),
        "e2e_s": summary(ok.iter().map(|s| s.total).collect()),
    }))
}

/// The system message of every conversation: shared by all, so the workers may cache it once.
const SYSTEM_PROMPT: &str = "You are a helpful assistant taking part in a load test. Answer every \
    question of the user plainly and at length. Keep the whole conversation in mind when you answer, \
    and refer back to earlier turns where it helps.";

/// A user message of about `tokens` tokens, its run's, conversation's and turn's own from its first
/// words (so that no two messages share more than the system message and their own history).
fn user_message(run: u32, conversation: usize, turn: usize, tokens: u32) -> String {
    // The numbers take about a dozen tokens of the budget.
    let words = tokens.saturating_sub(12).max(1);
    format!("Run {run}, conversation {}, turn {}: {}", conversation + 1, turn + 1, filler(words))
}

/// One conversation of the multi-turn workload, ready to run in its own task.
struct Conversation {
    http: reqwest::Client,
    url: String,
    model: String,
    run: u32,
    index: usize,
    max_tokens: u32,
    prompt_tokens: u32,
    /// The pause before each turn (see `pauses`); one entry per turn.
    pauses: Vec<Duration>,
    deadline: Instant,
}

impl Conversation {
    /// Runs the turns one after the other; returns each turn's index (from 0) and sample. A failed
    /// turn ends the conversation, since the history it would resend is incomplete.
    async fn run(self) -> Vec<(usize, Sample)> {
        let mut messages = vec![json!({"role": "system", "content": SYSTEM_PROMPT})];
        let mut samples = Vec::with_capacity(self.pauses.len());
        for (turn, &pause) in self.pauses.iter().enumerate() {
            tokio::time::sleep(pause.min(self.deadline.saturating_duration_since(Instant::now()))).await;
            if Instant::now() >= self.deadline {
                break;
            }
            let user = user_message(self.run, self.index, turn, self.prompt_tokens);
            messages.push(json!({"role": "user", "content": user}));
            let body = json!({
                "model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true,
            });
            let mut sample = one_until(&self.http, &self.url, &body, true, self.deadline).await;
            let failed = sample.error.is_some();
            messages.push(json!({"role": "assistant", "content": std::mem::take(&mut sample.text)}));
            samples.push((turn, sample));
            if failed {
                break;
            }
        }
        samples
    }
}

/// Statistics of a group of requests: TTFT percentiles (of those that succeeded) and the share of
/// their prompt tokens that the workers found cached (NaN, i.e. null in JSON, when none).
fn turn_stats<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Value {
    let (mut ttft, mut completed, mut failed, mut prompt, mut cached) = (Vec::new(), 0usize, 0usize, 0u64, 0u64);
    for s in samples {
        if s.error.is_some() {
            failed += 1;
            continue;
        }
        completed += 1;
        ttft.extend(s.ttft);
        prompt += s.prompt_tokens;
        cached += s.cached_tokens;
    }
    let share = if prompt == 0 { f64::NAN } else { cached as f64 / prompt as f64 };
    json!({
        "completed": completed, "failed": failed, "ttft_s": summary(ttft),
        "prompt_tokens": prompt, "cached_tokens": cached, "cached_share": share,
    })
}

/// Each turn's statistics (with its number, from 1), and those of turns 2..=`turns` together
/// (null with a single turn): the later turns are the ones whose history may be cached.
fn per_turn(samples: &[(usize, Sample)], turns: usize) -> (Vec<Value>, Value) {
    let each = (0..turns)
        .map(|turn| {
            let mut stats = turn_stats(samples.iter().filter(|(t, _)| *t == turn).map(|(_, s)| s));
            stats["turn"] = json!(turn + 1);
            stats
        })
        .collect();
    if turns < 2 {
        return (each, Value::Null);
    }
    let mut later = turn_stats(samples.iter().filter(|(t, _)| *t >= 1).map(|(_, s)| s));
    later["turns"] = json!(format!("2-{turns}"));
    (each, later)
}

/// The multi-turn workload: `--conversations` chats at once, each of `--turns` turns.
async fn multi_turn(args: &BenchArgs, http: &reqwest::Client, base: &str, model: &str) -> anyhow::Result<Value> {
    let url = format!("{base}/v1/chat/completions");
    let turns = args.turns as usize;
    // A number of this run's own in every user message, so that no earlier run's conversations
    // are cached; the system message stays shared.
    let run = rand::random::<u32>();
    let deadline = Instant::now() + args.time_limit;
    let start = Instant::now();
    let tasks: Vec<_> = (0..args.conversations as usize)
        .map(|index| {
            let conversation = Conversation {
                http: http.clone(),
                url: url.clone(),
                model: model.to_string(),
                run,
                index,
                max_tokens: args.max_tokens,
                prompt_tokens: args.prompt_tokens,
                pauses: pauses(args.think_time, args.seed, index, turns),
                deadline,
            };
            tokio::spawn(conversation.run())
        })
        .collect();
    let mut samples: Vec<(usize, Sample)> = Vec::new();
    for task in tasks {
        samples.extend(task.await.context("a conversation task failed")?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let completed = samples.iter().filter(|(_, s)| s.error.is_none()).count();
    let failed = samples.len() - completed;
    let tokens: usize = samples.iter().filter(|(_, s)| s.error.is_none()).map(|(_, s)| s.tokens).sum();
    let (each, later) = per_turn(&samples, turns);
    let think = args.think_time.map_or(Value::Null, |t| json!({"min": t.min, "max": t.max}));
    Ok(json!({
        "workload": "multi-turn",
        "url": base, "model": model, "conversations": args.conversations, "turns": args.turns,
        "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens, "think_time_s": think,
        "seed": args.seed,
        "completed": completed, "failed": failed, "errors": distinct_errors(samples.iter().map(|(_, s)| s)),
        "not_started": args.conversations as usize * turns - samples.len(),
        "seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens as f64 / elapsed,
        "per_turn": each, "later_turns": later,
    }))
}

/// How long to wait after a run for every worker to report its final count.
const FRESH_WAIT: Duration = Duration::from_secs(8);

/// Each worker's cumulative count of generated tokens, from a `/admin/cluster` answer, and the age
/// in seconds of the oldest count (they arrive with the workers' load reports; workers missing from
/// the controller's view no longer report, so they are left out of the age).
fn parse_worker_counts(cluster: &Value) -> anyhow::Result<(BTreeMap<String, u64>, f64)> {
    let workers = cluster["workers"].as_array().context("the answer has no workers list")?;
    let mut counts = BTreeMap::new();
    let mut oldest = 0.0f64;
    for w in workers {
        let id = w["id"].as_str().context("a worker without an id")?;
        let n = w["generated_tokens"]
            .as_u64()
            .with_context(|| format!("worker {id} has no generated_tokens (an older gateway?)"))?;
        counts.insert(id.to_string(), n);
        if w["state"] != "missing" {
            let age = w["seconds_since_report"].as_f64().or_else(|| w["seconds_since_heartbeat"].as_f64());
            oldest = oldest.max(age.unwrap_or(0.0));
        }
    }
    Ok((counts, oldest))
}

/// `GET /admin/cluster`, read by `parse_worker_counts`.
async fn worker_counts(http: &reqwest::Client, base: &str) -> anyhow::Result<(BTreeMap<String, u64>, f64)> {
    let resp = http.get(format!("{base}/admin/cluster")).send().await.context("GET /admin/cluster")?;
    let status = resp.status();
    if !status.is_success() {
        bail!("GET /admin/cluster: {status}");
    }
    let cluster: Value = resp.json().await.context("reading /admin/cluster")?;
    parse_worker_counts(&cluster).context("/admin/cluster")
}

/// What each worker generated over a run of `seconds`, and its rate. A worker absent before
/// counts from 0 (it joined during the run); one whose count fell (it restarted) from 0 as well.
fn worker_rates(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, seconds: f64) -> Value {
    after
        .iter()
        .map(|(id, &n)| {
            let made = match before.get(id) {
                Some(&b) if b <= n => n - b,
                _ => n,
            };
            json!({"id": id, "generated_tokens": made, "tokens_per_s": made as f64 / seconds})
        })
        .collect()
}

/// The per-worker rates over a run that ended at `end`, given the counts from before it; or, when
/// the admin view cannot tell them, null and a note saying why (a bench never fails for this).
/// The second value is also a note when some count may be short.
async fn per_worker(
    http: &reqwest::Client,
    base: &str,
    before: anyhow::Result<BTreeMap<String, u64>>,
    end: Instant,
    seconds: f64,
) -> (Value, Option<String>) {
    let before = match before {
        Ok(before) => before,
        Err(e) => return (Value::Null, Some(format!("no per-worker rates: {e:#}"))),
    };
    loop {
        // Measured before asking, so that a count younger than this was surely made after `end`.
        let since_end = end.elapsed();
        let (after, oldest) = match worker_counts(http, base).await {
            Ok(counts) => counts,
            Err(e) => return (Value::Null, Some(format!("no per-worker rates: {e:#}"))),
        };
        // Counts arrive with load reports (heartbeats, seconds apart, where a worker streams none):
        // wait for one from every worker after the run, or its last tokens would be missing.
        let fresh = oldest < since_end.as_secs_f64();
        if fresh || end.elapsed() >= FRESH_WAIT {
            let note = (!fresh).then(|| {
                format!(
                    "some workers had not reported within {FRESH_WAIT:?} of the run's end; their counts may be short"
                )
            });
            return (worker_rates(&before, &after, seconds), note);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Milliseconds of a value in seconds (NaN when absent or null).
fn ms(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN) * 1e3
}

fn print_text(r: &Value) {
    if r["workload"] == "multi-turn" {
        print_multi_turn(r);
        return;
    }
    let line = |name: &str, v: &Value| {
        let (p50, p90, p99) = (ms(&v["p50"]), ms(&v["p90"]), ms(&v["p99"]));
        println!("{name:<22} p50 {p50:>8.1} ms   p90 {p90:>8.1} ms   p99 {p99:>8.1} ms");
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
    print_workers(r);
    print_errors(r);
}

fn print_multi_turn(r: &Value) {
    let think = match r["think_time_s"].as_object() {
        Some(t) => format!(", think time {}-{} s", t["min"], t["max"]),
        None => String::new(),
    };
    println!(
        "{} completed, {} failed, {} not started in {:.1} s ({} conversations of {} turns, {} tokens each{think})",
        r["completed"],
        r["failed"],
        r["not_started"],
        r["seconds"].as_f64().unwrap_or(0.0),
        r["conversations"],
        r["turns"],
        r["max_tokens"]
    );
    println!("output: {} tokens, {:.1} tokens/s", r["output_tokens"], r["output_tokens_per_s"].as_f64().unwrap_or(0.0));
    println!("{:<10} {:>13} {:>13} {:>8}", "turn", "TTFT p50", "TTFT p90", "cached");
    let row = |name: &str, v: &Value| {
        let share = v["cached_share"].as_f64().unwrap_or(f64::NAN) * 100.0;
        println!("{name:<10} {:>10.1} ms {:>10.1} ms {share:>7.1}%", ms(&v["ttft_s"]["p50"]), ms(&v["ttft_s"]["p90"]));
    };
    for t in r["per_turn"].as_array().into_iter().flatten() {
        row(&t["turn"].to_string(), t);
    }
    if let Some(turns) = r["later_turns"]["turns"].as_str() {
        row(&format!("turns {turns}"), &r["later_turns"]);
    }
    print_workers(r);
    print_errors(r);
}

fn print_workers(r: &Value) {
    for w in r["workers"].as_array().into_iter().flatten() {
        println!(
            "worker {:<24} {:>10} tokens {:>10.1} tokens/s",
            w["id"].as_str().unwrap_or("?"),
            w["generated_tokens"].as_u64().unwrap_or(0),
            w["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(note) = r["workers_note"].as_str() {
        println!("note: {note}");
    }
}

fn print_errors(r: &Value) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn think_time_parses_ranges_and_single_numbers() {
        assert_eq!(parse_think_time("0.5-3"), Ok(ThinkTime { min: 0.5, max: 3.0 }));
        assert_eq!(parse_think_time(" 1 - 2.5 "), Ok(ThinkTime { min: 1.0, max: 2.5 }));
        assert_eq!(parse_think_time("2"), Ok(ThinkTime { min: 2.0, max: 2.0 }));
        assert_eq!(parse_think_time("0"), Ok(ThinkTime { min: 0.0, max: 0.0 }));
        for bad in ["", "x", "1-", "-1", "3-0.5", "1-2-3", "inf", "NaN", "0-inf", "1..2"] {
            assert!(parse_think_time(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn think_time_is_a_clap_error_naming_the_flag() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let flags = ["bench", "--url", "http://x", "--workload", "multi-turn", "--think-time", "0.5-3"];
        let cli = Cli::try_parse_from(flags).expect("valid flags");
        assert_eq!(cli.bench.workload, Workload::MultiTurn);
        assert_eq!(cli.bench.think_time, Some(ThinkTime { min: 0.5, max: 3.0 }));
        let err = Cli::try_parse_from(["bench", "--url", "http://x", "--think-time", "3-1"]).unwrap_err();
        assert!(err.to_string().contains("--think-time"), "{err}");
        let defaults = Cli::try_parse_from(["bench", "--url", "http://x"]).expect("valid flags");
        let bench = defaults.bench;
        assert_eq!((bench.workload, bench.conversations, bench.turns, bench.seed), (Workload::Single, 16, 4, 0));
    }

    #[test]
    fn seeded_pauses_repeat_and_stay_in_range() {
        let think = Some(ThinkTime { min: 0.5, max: 3.0 });
        let a = pauses(think, 7, 3, 6);
        assert_eq!(a, pauses(think, 7, 3, 6), "the same seed and conversation give the same pauses");
        assert_ne!(a, pauses(think, 7, 4, 6), "another conversation gets other pauses");
        assert_ne!(a, pauses(think, 8, 3, 6), "another seed gives other pauses");
        assert_eq!(a.len(), 6);
        assert!(a[0] <= Duration::from_secs(3), "the start stagger is in [0, B]: {a:?}");
        assert!(a[1..].iter().all(|&d| d >= Duration::from_millis(500) && d <= Duration::from_secs(3)), "{a:?}");
        let fixed = pauses(Some(ThinkTime { min: 2.0, max: 2.0 }), 0, 1, 3);
        assert_eq!(fixed[1..], [Duration::from_secs(2); 2]);
        assert_eq!(pauses(None, 7, 3, 4), vec![Duration::ZERO; 4]);
    }

    fn sample(ttft_ms: u64, prompt_tokens: u64, cached_tokens: u64) -> Sample {
        Sample { ttft: Some(Duration::from_millis(ttft_ms)), prompt_tokens, cached_tokens, ..Default::default() }
    }

    #[test]
    fn turn_stats_count_cached_share_and_ttft_of_successes() {
        let failed = Sample { error: Some("boom".into()), prompt_tokens: 1000, ..Default::default() };
        let v = turn_stats(&[sample(300, 40, 0), sample(100, 60, 30), sample(200, 100, 50), failed]);
        assert_eq!((v["completed"].as_u64(), v["failed"].as_u64()), (Some(3), Some(1)), "{v}");
        assert_eq!((v["prompt_tokens"].as_u64(), v["cached_tokens"].as_u64()), (Some(200), Some(80)), "{v}");
        assert!((v["cached_share"].as_f64().unwrap() - 0.4).abs() < 1e-9, "{v}");
        assert!((v["ttft_s"]["p50"].as_f64().unwrap() - 0.2).abs() < 1e-9, "{v}");
        assert!((v["ttft_s"]["p90"].as_f64().unwrap() - 0.3).abs() < 1e-9, "{v}");
        // No prompt tokens: no share (null), not a division by zero.
        assert!(turn_stats(&Vec::<Sample>::new()).get("cached_share").is_some_and(Value::is_null));
    }

    #[test]
    fn per_turn_groups_by_turn_and_pools_the_later_ones() {
        let samples: Vec<(usize, Sample)> = vec![
            (0, sample(500, 100, 0)),
            (1, sample(100, 200, 150)),
            (0, sample(700, 100, 50)),
            (2, sample(300, 300, 250)),
        ];
        let (each, later) = per_turn(&samples, 3);
        let turns: Vec<_> = each.iter().map(|t| t["turn"].as_u64()).collect();
        assert_eq!(turns, [Some(1), Some(2), Some(3)]);
        assert_eq!(each[0]["completed"], 2);
        assert!((each[0]["cached_share"].as_f64().unwrap() - 0.25).abs() < 1e-9);
        assert!((each[0]["ttft_s"]["p50"].as_f64().unwrap() - 0.7).abs() < 1e-9, "the upper middle of two");
        assert_eq!(later["turns"], "2-3");
        assert_eq!(later["completed"], 2);
        assert!((later["cached_share"].as_f64().unwrap() - 0.8).abs() < 1e-9, "{later}");
        assert!(per_turn(&samples, 1).1.is_null(), "no later turns with one turn");
    }

    #[test]
    fn user_messages_differ_from_their_first_words() {
        let a = user_message(9, 0, 0, 32);
        let b = user_message(9, 1, 0, 32);
        let c = user_message(9, 0, 1, 32);
        assert!(a != b && a != c && b != c);
        assert_eq!(a.split_whitespace().filter(|w| *w == "hello").count(), 20);
        assert!(user_message(9, 0, 0, 1).ends_with("hello"), "at least one word of filler");
    }

    #[test]
    fn worker_rates_come_from_the_growth_of_the_counts() {
        let cluster = json!({"workers": [
            {"id": "w1", "generated_tokens": 1000, "state": "ready", "seconds_since_heartbeat": 0.5},
            {"id": "w2", "generated_tokens": 10, "state": "missing", "seconds_since_heartbeat": 30.0},
        ]});
        let (after, oldest) = parse_worker_counts(&cluster).unwrap();
        assert_eq!(oldest, 0.5, "a missing worker does not hold the wait");
        let before = BTreeMap::from([("w1".to_string(), 200), ("w2".to_string(), 50)]);
        let rates = worker_rates(&before, &after, 4.0);
        assert_eq!(rates[0], json!({"id": "w1", "generated_tokens": 800, "tokens_per_s": 200.0}));
        assert_eq!(rates[1]["generated_tokens"], 10, "a restarted worker counts from 0");
        let old = json!({"workers": [{"id": "w1", "state": "ready"}]});
        assert!(parse_worker_counts(&old).is_err(), "an older gateway without the field is told apart");
    }
}

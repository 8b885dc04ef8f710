//! Single-stream decode speed: 128 new greedy tokens on the test model.
//!
//! `cargo bench -p herd-worker --bench decode` (model: HERD_BENCH_MODEL, default
//! models/SmolLM2-135M-Instruct.Q4_1.gguf; dtype: HERD_BENCH_DTYPE, default auto).

use std::path::PathBuf;
use std::time::Instant;

use herd_worker::engine::{DTypeChoice, Engine, GenerationParams, LoadOptions, Message, SamplingParams};

const NEW_TOKENS: usize = 128;
const RUNS: usize = 3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::env::var_os("HERD_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !model.exists() {
        return Err(format!("{} is missing: run scripts/fetch-test-model.sh first", model.display()).into());
    }
    let dtype: DTypeChoice = std::env::var("HERD_BENCH_DTYPE").unwrap_or_else(|_| "auto".into()).parse()?;
    let engine = Engine::load(&LoadOptions { dtype, ..LoadOptions::new(&model) }, &mut |_, _| {})?;
    let prompt = engine.encode_chat(&[Message::new("user", "Write a short story about a lighthouse keeper.")])?;
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(NEW_TOKENS),
        ignore_eos: true,
        ..Default::default()
    };
    println!(
        "model {} ({:?}), prompt {} tokens, {NEW_TOKENS} new tokens, greedy",
        model.display(),
        dtype,
        prompt.len()
    );
    let mut rates = Vec::new();
    for run in 0..=RUNS {
        let start = Instant::now();
        let mut first = None;
        let done = engine.generate(&prompt, &params, &mut |_| {
            first.get_or_insert_with(|| start.elapsed());
        })?;
        let total = start.elapsed();
        let ttft = first.unwrap_or(total);
        let decode_rate = (done.completion_tokens - 1) as f64 / (total - ttft).as_secs_f64();
        if run == 0 {
            continue; // warm-up
        }
        println!(
            "run {run}: first token {:.0} ms, decode {decode_rate:.1} tokens/s ({} tokens in {:.2} s)",
            ttft.as_secs_f64() * 1e3,
            done.completion_tokens,
            total.as_secs_f64()
        );
        rates.push(decode_rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("median decode: {:.1} tokens/s", rates[rates.len() / 2]);
    Ok(())
}

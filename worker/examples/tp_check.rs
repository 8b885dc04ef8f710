//! Checks a model loaded on some devices (and `--tp`) against the same model on one CPU rank:
//! greedy tokens and logits at every step on 5 prompts × 32 tokens, then decode speed on the
//! devices. Exits non-zero on a disagreement. `scripts/gpu-check.sh` runs it on CUDA.
//!
//! cargo run --release [--features cuda] -p herd-worker --example tp_check -- \
//!     --model models/SmolLM2-135M-Instruct.Q4_1.gguf --devices cuda:0,cuda:1 [--dtype f32]

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use herd_worker::engine::tp::check::greedy_side_by_side;
use herd_worker::engine::{DTypeChoice, Engine, GenerationParams, LoadOptions, Message, SamplingParams, parse_devices};

#[derive(Parser)]
struct Args {
    /// An HF checkpoint directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Devices of the model under test: cpu, cuda, or cuda:0,cuda:1,...
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    devices: Vec<String>,
    /// Ranks (default: one per device listed).
    #[arg(long)]
    tp: Option<usize>,
    /// Weight dtype of both models: auto, f32 (f16/bf16 apply to the model under test only).
    #[arg(long, default_value = "auto")]
    dtype: DTypeChoice,
    /// Largest logit difference accepted at any step.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
}

const PROMPTS: [&str; 5] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Who wrote the play Hamlet?",
    "Explain what a CPU does in one sentence.",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let devices = parse_devices(&args.devices, args.tp)?;
    let cpu_dtype = match args.dtype {
        DTypeChoice::F16 | DTypeChoice::BF16 => DTypeChoice::F32,
        other => other,
    };
    let reference = Engine::load(&LoadOptions { dtype: cpu_dtype, ..LoadOptions::new(&args.model) }, &mut |_, _| {})?;
    let opts = LoadOptions { dtype: args.dtype, devices, ..LoadOptions::new(&args.model) };
    let start = Instant::now();
    let engine = Engine::load(&opts, &mut |_, _| {})?;
    println!(
        "loaded {} on {:?} (tp {}) in {:.1} s",
        args.model.display(),
        args.devices,
        engine.tp_size(),
        start.elapsed().as_secs_f64()
    );
    let mut ok = true;
    for p in PROMPTS {
        let ids = reference.encode_chat(&[Message::new("user", p)])?;
        let run = greedy_side_by_side(&reference, &engine, &ids, 32)?;
        let good = run.agrees() && run.max_diff <= args.tolerance;
        ok &= good;
        println!(
            "{} {p:?}: {} of 32 tokens agree, largest logit difference {:.2e}",
            if good { "ok  " } else { "FAIL" },
            run.reference.iter().zip(&run.other).take_while(|(a, b)| a == b).count(),
            run.max_diff
        );
    }
    let prompt = engine.encode_chat(&[Message::new("user", "Write a short story about a lighthouse keeper.")])?;
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(128),
        ignore_eos: true,
        ..Default::default()
    };
    for run in 0..2 {
        let start = Instant::now();
        let mut first = None;
        let done = engine.generate(&prompt, &params, &mut |_| {
            first.get_or_insert_with(|| start.elapsed());
        })?;
        let ttft = first.unwrap_or_default();
        let rate = (done.completion_tokens - 1) as f64 / (start.elapsed() - ttft).as_secs_f64();
        if run == 1 {
            println!("decode: {rate:.1} tokens/s single stream, first token {:.0} ms", ttft.as_secs_f64() * 1e3);
        }
    }
    if !ok {
        return Err("the model under test disagrees with the CPU reference".into());
    }
    Ok(())
}

//! Writes a LLaMA GGUF file of a given shape with random f16 weights and another GGUF's
//! tokenizer, for checks at real sizes on machines that reach no model hub and no Python
//! packages (`scripts/make-checkpoint.sh` makes the same shapes where Python is at hand).
//! `scripts/gpu-check.sh` runs it.
//!
//! cargo run --release -p herd-worker --example random_gguf -- \
//!     --vocab-from models/SmolLM2-135M-Instruct.Q4_1.gguf --shape vicuna-7b --out /tmp/v7b.gguf

use std::path::PathBuf;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use clap::{Parser, ValueEnum};
use rayon::prelude::*;

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    /// Vicuna-7B's: hidden 4096, 32 layers of 32 heads, FFN 11008.
    #[value(name = "vicuna-7b")]
    Vicuna7b,
    /// Two small layers, to try the tool.
    Tiny,
}

#[derive(Parser)]
struct Args {
    /// The GGUF file whose tokenizer (and vocabulary size) the new file takes.
    #[arg(long)]
    vocab_from: PathBuf,
    #[arg(long, value_enum, default_value = "vicuna-7b")]
    shape: Shape,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// `n` values uniform in [-a, a], the same for the same seed.
fn uniform(n: usize, a: f32, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut x = (seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(6364136223846793005) | 1;
        for o in out {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *o = ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a;
        }
    });
    v
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    use gguf_file::Value as V;
    let args = Args::parse();
    let (hidden, inter, layers, heads) = match args.shape {
        Shape::Vicuna7b => (4096, 11008, 32, 32),
        Shape::Tiny => (256, 512, 2, 4),
    };
    let mut file = std::fs::File::open(&args.vocab_from)?;
    let source = gguf_file::Content::read(&mut file)?;
    let vocab = match source.metadata.get("tokenizer.ggml.tokens") {
        Some(V::Array(tokens)) => tokens.len(),
        _ => return Err(format!("{}: no tokenizer.ggml.tokens", args.vocab_from.display()).into()),
    };
    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String("llama".into())),
        ("llama.context_length".into(), V::U32(4096)),
        ("llama.embedding_length".into(), V::U32(hidden as u32)),
        ("llama.feed_forward_length".into(), V::U32(inter as u32)),
        ("llama.block_count".into(), V::U32(layers as u32)),
        ("llama.vocab_size".into(), V::U32(vocab as u32)),
        ("llama.attention.head_count".into(), V::U32(heads as u32)),
        ("llama.attention.head_count_kv".into(), V::U32(heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), V::F32(1e-5)),
        ("llama.rope.freq_base".into(), V::F32(10000.0)),
    ];
    md.extend(source.metadata.into_iter().filter(|(k, _)| k.starts_with("tokenizer.")));
    // Projections ~ variance 1/fan_in, so activations stay finite through every layer;
    // embeddings variance 1; norms 1.
    let mut names: Vec<(String, Vec<usize>)> = vec![("token_embd.weight".into(), vec![vocab, hidden])];
    for i in 0..layers {
        let b = |p: &str| format!("blk.{i}.{p}.weight");
        names.push((b("attn_norm"), vec![hidden]));
        for p in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            names.push((b(p), vec![hidden, hidden]));
        }
        names.push((b("ffn_norm"), vec![hidden]));
        names.push((b("ffn_gate"), vec![inter, hidden]));
        names.push((b("ffn_up"), vec![inter, hidden]));
        names.push((b("ffn_down"), vec![hidden, inter]));
    }
    names.push(("output_norm.weight".into(), vec![hidden]));
    names.push(("output.weight".into(), vec![vocab, hidden]));
    let mut tensors = Vec::with_capacity(names.len());
    for (k, (name, shape)) in names.iter().enumerate() {
        let n: usize = shape.iter().product();
        let q = if shape.len() == 1 {
            QTensor::quantize(&Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?, GgmlDType::F32)?
        } else {
            let a = if name == "token_embd.weight" { 3f32.sqrt() } else { (3.0 / shape[1] as f32).sqrt() };
            let t = Tensor::from_vec(uniform(n, a, args.seed.wrapping_add(k as u64)), shape.as_slice(), &Device::Cpu)?;
            QTensor::quantize(&t, GgmlDType::F16)?
        };
        tensors.push((name.clone(), q));
    }
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    gguf_file::write(&mut out, &md_refs, &t_refs)?;
    eprintln!("wrote {} ({} tensors, vocabulary {vocab})", args.out.display(), tensors.len());
    Ok(())
}

//! Tiny random LLaMA checkpoints, written in each format herd reads.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

/// The shape of a tiny model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// At least the sentencepiece fixture's 400 tokens, whose tokenizer the HF directories use.
    pub vocab: usize,
    /// Positions a sequence may hold.
    pub context: usize,
}

impl Dims {
    /// The usual tiny model.
    pub const BASE: Dims =
        Dims { hidden: 32, inter: 64, layers: 2, heads: 4, kv_heads: 2, vocab: VOCAB, context: CONTEXT };
    /// For tensor parallelism: heads and KV heads divide by 2 and 4, the attention output's
    /// 64 columns split into 32-value quantization blocks at `--tp 2` (but not at 4), and the
    /// vocabulary splits unevenly at `--tp 4`.
    pub const TP: Dims =
        Dims { hidden: 64, inter: 128, layers: 2, heads: 8, kv_heads: 4, vocab: 402, context: CONTEXT };
    /// Widths that are multiples of 256, for the K-quants' super-blocks.
    pub const K: Dims =
        Dims { hidden: 256, inter: 512, layers: 2, heads: 4, kv_heads: 2, vocab: VOCAB, context: CONTEXT };
}

/// The sentencepiece fixture's vocabulary size.
pub const VOCAB: usize = 400;
/// Positions the usual tiny models hold.
pub const CONTEXT: usize = 1024;

/// HF `config.json` of a tiny model.
pub fn config_json(d: Dims) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d.hidden,
        "intermediate_size": d.inter,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "vocab_size": d.vocab,
        "max_position_embeddings": d.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": false
    })
}

/// Deterministic pseudo-random values in [-scale, scale] (no RNG crate needed).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A tiny model's tensors under HF names, in a fixed order.
pub fn tensors(d: Dims, seed: u64) -> Vec<(String, Tensor)> {
    let Dims { hidden, inter, heads, kv_heads, vocab, .. } = d;
    let hd = hidden / heads;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    for i in 0..d.layers {
        let p = format!("model.layers.{i}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![hidden]),
            (format!("{p}.self_attn.q_proj.weight"), vec![heads * hd, hidden]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv_heads * hd, hidden]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv_heads * hd, hidden]),
            (format!("{p}.self_attn.o_proj.weight"), vec![hidden, heads * hd]),
            (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
            (format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let v = if shape.len() == 1 {
                values(n, seed + i as u64, 0.1).into_iter().map(|x| 1.0 + x).collect()
            } else {
                values(n, seed + i as u64, 0.3)
            };
            (name, Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor"))
        })
        .collect()
}

/// Writes an HF directory: config, the sentencepiece fixture tokenizer, and the weights in
/// `shards` safetensors files (with an index when more than one).
pub fn write_hf(dir: &Path, d: Dims, tensors: &[(String, Tensor)], shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json(d).to_string()).unwrap();
    std::fs::copy(crate::fixture("sentencepiece/tokenizer.model"), dir.join("tokenizer.model")).unwrap();
    if shards == 1 {
        let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
        return;
    }
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
        let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        candle_core::safetensors::save(&map, dir.join(&file)).unwrap();
        for (name, _) in chunk {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// llama.cpp's q/k row order: each head's two rotary halves interleaved.
fn permute_for_gguf(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp)).unwrap().transpose(1, 2).unwrap().reshape((out, inp)).unwrap()
}

fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
    let (i, part) = rest.split_once('.').unwrap();
    let part = match part {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => panic!("unknown tensor {other}"),
    };
    format!("blk.{i}.{part}.weight")
}

/// A llama-style (sentencepiece) vocabulary of `VOCAB` entries for GGUF metadata.
pub fn gguf_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let letters: Vec<String> = ('a'..='z').map(String::from).collect();
    let mut normal: Vec<String> = vec!["\u{2581}".into()];
    normal.extend(letters.iter().cloned());
    normal.extend(letters.iter().map(|l| format!("\u{2581}{l}")));
    normal.extend(["he", "ll", "llo", "\u{2581}he", "\u{2581}hello", "or", "ld", "\u{2581}world"].map(String::from));
    let mut i = 0;
    while tokens.len() + normal.len() < VOCAB {
        normal.push(format!("{}{}", letters[i % 26], letters[(i / 26) % 26]));
        i += 1;
    }
    normal.truncate(VOCAB - tokens.len());
    let first_normal = tokens.len();
    tokens.extend(normal);
    types.resize(tokens.len(), 1);
    let scores = (0..tokens.len()).map(|i| if i < first_normal { 0.0 } else { -((i - first_normal) as f32) }).collect();
    (tokens, scores, types)
}

/// Writes a GGUF file (q/k permuted as llama.cpp does) with an embedded tokenizer: norms in F32,
/// weight matrices in `matrices` (F32, or a block quantization).
pub fn write_gguf(path: &Path, d: Dims, tensors: &[(String, Tensor)], matrices: GgmlDType) {
    use gguf_file::Value as V;
    let (tokens, scores, types) = gguf_vocab();
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.context_length", V::U32(d.context as u32)),
        ("llama.embedding_length", V::U32(d.hidden as u32)),
        ("llama.feed_forward_length", V::U32(d.inter as u32)),
        ("llama.block_count", V::U32(d.layers as u32)),
        ("llama.vocab_size", V::U32(d.vocab as u32)),
        ("llama.attention.head_count", V::U32(d.heads as u32)),
        ("llama.attention.head_count_kv", V::U32(d.kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("tokenizer.ggml.model", V::String("llama".into())),
        ("tokenizer.ggml.tokens", V::Array(tokens.into_iter().map(V::String).collect())),
        ("tokenizer.ggml.scores", V::Array(scores.into_iter().map(V::F32).collect())),
        ("tokenizer.ggml.token_type", V::Array(types.into_iter().map(V::I32).collect())),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
    ];
    let qs: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = if name.ends_with("q_proj.weight") {
                permute_for_gguf(t, d.heads)
            } else if name.ends_with("k_proj.weight") {
                permute_for_gguf(t, d.kv_heads)
            } else {
                t.clone()
            };
            let dtype = if t.rank() == 2 { matrices } else { GgmlDType::F32 };
            (gguf_name(name), QTensor::quantize(&t, dtype).unwrap())
        })
        .collect();
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

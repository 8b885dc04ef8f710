//! One set of tiny random weights loaded from every checkpoint format gives the same logits.

use std::path::Path;

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{DType, Device, Tensor};
use herd_tests::{fixture, tiny};
use herd_worker::engine::pool::ComputePool;
use herd_worker::engine::weights::{GgufMode, LayerPart, Part, WeightName, Weights};
use herd_worker::engine::{DTypeChoice, Engine, EngineError, LoadOptions, Message, Progress, QuantizeChoice};

fn logits(path: &Path, dtype: DTypeChoice, ids: &[u32]) -> Vec<Vec<f32>> {
    quantized_logits(path, dtype, None, ids)
}

fn quantized_logits(path: &Path, dtype: DTypeChoice, quantize: Option<QuantizeChoice>, ids: &[u32]) -> Vec<Vec<f32>> {
    let opts = LoadOptions { dtype, quantize, ..LoadOptions::new(path) };
    let engine = Engine::load(&opts, &mut |_, _| {}).unwrap_or_else(|e| panic!("load {}: {e}", path.display()));
    engine.logits(ids).unwrap().to_vec2::<f32>().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const IDS: [u32; 12] = [1, 300, 17, 5, 42, 399, 260, 261, 3, 100, 200, 350];

#[test]
fn safetensors_sharded_and_gguf_give_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny::tensors(tiny::Dims::BASE, 7);
    let single = dir.path().join("single");
    let sharded = dir.path().join("sharded");
    let gguf = dir.path().join("tiny-f32.gguf");
    tiny::write_hf(&single, tiny::Dims::BASE, &weights, 1);
    tiny::write_hf(&sharded, tiny::Dims::BASE, &weights, 3);
    tiny::write_gguf(&gguf, tiny::Dims::BASE, &weights, GgmlDType::F32);
    assert!(sharded.join("model.safetensors.index.json").is_file());

    let base = logits(&single, DTypeChoice::Auto, &IDS);
    assert_eq!(base.len(), IDS.len());
    assert_eq!(base[0].len(), tiny::VOCAB);
    for (what, other) in [
        ("sharded safetensors", logits(&sharded, DTypeChoice::Auto, &IDS)),
        ("GGUF F32", logits(&gguf, DTypeChoice::Auto, &IDS)),
        ("GGUF F32 --dtype f32", logits(&gguf, DTypeChoice::F32, &IDS)),
    ] {
        let d = max_diff(&base, &other);
        assert!(d < 1e-5, "{what}: logits differ from single safetensors by {d}");
    }
}

#[test]
fn incremental_decoding_matches_one_full_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    tiny::write_hf(&path, tiny::Dims::BASE, &tiny::tensors(tiny::Dims::BASE, 11), 1);
    let engine = Engine::load(&LoadOptions::new(&path), &mut |_, _| {}).unwrap();
    let full = engine.logits(&IDS).unwrap().to_vec2::<f32>().unwrap();
    // Greedy generation feeds one token at a time through the KV cache: its first sampled
    // token must be the argmax of the full pass's last row.
    let params = herd_worker::engine::GenerationParams {
        sampling: herd_worker::engine::SamplingParams::greedy(),
        max_tokens: Some(1),
        ignore_eos: true,
        ..Default::default()
    };
    let done = engine.generate(&IDS, &params, &mut |_| {}).unwrap();
    let want = herd_worker::engine::sampler::argmax(full.last().unwrap());
    assert_eq!(done.token_ids, vec![want]);
    // And a prompt processed in two steps gives the full pass's logits.
    let split = engine.logits(&IDS[..5]).unwrap().to_vec2::<f32>().unwrap();
    assert!(max_diff(&split, &full[..5]) < 1e-5);
    let _ = engine.encode_chat(&[Message::new("user", "hi")]).unwrap();
}

/// The tensor attention GPUs use agrees with the CPU's loops, and its KV cache carries a prompt
/// fed in chunks.
#[test]
fn tensor_attention_agrees_with_the_cpu_loops() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough for the CPU loops to cut the queries into pieces.
    let long: Vec<u32> = (0..40).map(|i| i * 37 % tiny::VOCAB as u32).collect();
    // Grouped query heads, one KV head per query head, and one KV head for all.
    for kv_heads in [2, 4, 1] {
        let d = tiny::Dims { kv_heads, ..tiny::Dims::BASE };
        let path = dir.path().join(format!("kv{kv_heads}"));
        tiny::write_hf(&path, d, &tiny::tensors(d, 13), 1);
        let opts = LoadOptions { tensor_attention: true, ..LoadOptions::new(&path) };
        let engine = Engine::load(&opts, &mut |_, _| {}).unwrap();
        for ids in [&IDS[..], &long] {
            let loops = logits(&path, DTypeChoice::Auto, ids);
            let diff = max_diff(&loops, &engine.logits(ids).unwrap().to_vec2::<f32>().unwrap());
            assert!(
                diff < 1e-4,
                "{kv_heads} KV heads: tensor attention differs from the CPU loops by {diff} over {} tokens",
                ids.len()
            );
        }
    }
    let path = dir.path().join("kv2");
    let opts = LoadOptions { tensor_attention: true, ..LoadOptions::new(&path) };
    let engine = Engine::load(&opts, &mut |_, _| {}).unwrap();
    let full = engine.logits(&IDS).unwrap().to_vec2::<f32>().unwrap();
    let params = herd_worker::engine::GenerationParams {
        sampling: herd_worker::engine::SamplingParams::greedy(),
        max_tokens: Some(1),
        ignore_eos: true,
        ..Default::default()
    };
    let mut seq = engine.start(&IDS, &params).unwrap();
    let step = loop {
        // At most 5 tokens a step: the prompt runs in three chunks.
        if let Progress::Sampled(step) = engine.step_batch(&mut [&mut seq], 5).unwrap().pop().unwrap().unwrap() {
            break step;
        }
    };
    assert_eq!(step.token, Some(herd_worker::engine::sampler::argmax(full.last().unwrap())));
}

/// The `.bin` fixture and its safetensors twin as two HF directories, `bin` and `st`, in `dir`.
fn bin_twins(dir: &Path) {
    let src = fixture("tiny-llama-bin");
    for (name, weights) in [("bin", "pytorch_model.bin"), ("st", "model.safetensors")] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
        std::fs::copy(src.join(weights), d.join(weights)).unwrap();
        std::fs::copy(fixture("sentencepiece/tokenizer.model"), d.join("tokenizer.model")).unwrap();
    }
}

#[test]
fn pytorch_bin_fixture_matches_its_safetensors_twin() {
    let dir = tempfile::tempdir().unwrap();
    bin_twins(dir.path());
    let ids = [1, 5, 9, 33, 63, 2, 17];
    let bin = logits(&dir.path().join("bin"), DTypeChoice::Auto, &ids);
    let st = logits(&dir.path().join("st"), DTypeChoice::Auto, &ids);
    assert_eq!(bin[0].len(), 64);
    assert!(max_diff(&bin, &st) < 1e-5, "pytorch .bin and safetensors twins disagree");
}

/// `--quantize` turns an HF checkpoint's matrices into blocks as they are read: Q4_K from sharded
/// safetensors answers exactly like the GGUF file of the same weights in Q4_K (q/k rows permuted
/// alike), and the .bin and safetensors twins quantize to the same bits.
#[test]
fn quantize_flag_reads_hf_checkpoints_into_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny::tensors(tiny::Dims::K, 11);
    let hf = dir.path().join("hf");
    let gguf = dir.path().join("tiny-q4k.gguf");
    tiny::write_hf(&hf, tiny::Dims::K, &weights, 3);
    tiny::write_gguf(&gguf, tiny::Dims::K, &weights, GgmlDType::Q4K);
    let quantized = quantized_logits(&hf, DTypeChoice::Auto, Some(QuantizeChoice::Q4K), &IDS);
    let from_gguf = logits(&gguf, DTypeChoice::Auto, &IDS);
    let f32 = logits(&hf, DTypeChoice::Auto, &IDS);
    assert_eq!(quantized, from_gguf, "--quantize q4_k and the Q4_K GGUF differ");
    assert!(max_diff(&quantized, &f32) > 1e-4, "--quantize q4_k left the weights in f32");

    // The .bin fixture and its safetensors twin, 32 wide: Q8_0 blocks (and Q8_0 where q4_k's
    // super-blocks do not fit).
    bin_twins(dir.path());
    let ids = [1, 5, 9, 33, 63, 2, 17];
    for q in [QuantizeChoice::Q8_0, QuantizeChoice::Q4K] {
        let bin = quantized_logits(&dir.path().join("bin"), DTypeChoice::Auto, Some(q), &ids);
        let st = quantized_logits(&dir.path().join("st"), DTypeChoice::Auto, Some(q), &ids);
        assert_eq!(bin, st, "{q:?}: the .bin and safetensors twins quantize alike");
        let plain = logits(&dir.path().join("st"), DTypeChoice::Auto, &ids);
        let d = max_diff(&bin, &plain);
        assert!(d > 0.0 && d < 0.05, "{q:?}: quantized logits differ from f32 by {d}");
    }

    // Clear refusals: GGUF files are already quantized; the kernels run on the CPU in f32.
    let refuse = |path: &Path, dtype| {
        let opts = LoadOptions { dtype, quantize: Some(QuantizeChoice::Q4_0), ..LoadOptions::new(path) };
        match Engine::load(&opts, &mut |_, _| {}) {
            Err(EngineError::InvalidArgument(m)) => m,
            Err(e) => panic!("{}: unexpected error {e}", path.display()),
            Ok(_) => panic!("{}: --quantize was accepted", path.display()),
        }
    };
    assert!(refuse(&gguf, DTypeChoice::Auto).contains("applies to HF checkpoint directories"));
    assert!(refuse(&hf, DTypeChoice::F16).contains("--dtype auto or f32"));
}

#[test]
fn gguf_llama_tokenizer_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    tiny::write_gguf(&gguf, tiny::Dims::BASE, &tiny::tensors(tiny::Dims::BASE, 3), GgmlDType::F32);
    let engine = Engine::load(&LoadOptions::new(&gguf), &mut |_, _| {}).unwrap();
    let tok = engine.tokenizer();
    let ids = tok.encode("hello world").unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.token(i).unwrap()).collect();
    // "▁world" has no merge path in this vocabulary, so BPE stops at "▁w" "or" "ld".
    assert_eq!(pieces, vec!["<s>", "\u{2581}hello", "\u{2581}w", "or", "ld"]);
    let ids = tok.encode("héllo 7").unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "héllo 7", "byte fallback round-trips");
}

/// Opens a GGUF file's weights the way the engine does.
fn open_gguf(path: &Path, mode: GgufMode) -> Weights {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Weights::open_gguf(path, content, mode, DType::F32).unwrap()
}

#[test]
fn fused_layers_answer_like_each_layer_apart_to_the_bit() {
    let dir = tempfile::tempdir().unwrap();
    let d = tiny::Dims::TP;
    let weights = tiny::tensors(d, 11);
    let hd = d.hidden / d.heads;
    let (q_out, kv_out) = (d.heads * hd, d.kv_heads * hd);
    // A rank's rows, as under tensor parallelism.
    let layers = [
        (WeightName::Layer(1, LayerPart::Q), [q_out, d.hidden], Part::Rows(q_out / 2..q_out)),
        (WeightName::Layer(1, LayerPart::K), [kv_out, d.hidden], Part::Rows(kv_out / 2..kv_out)),
        (WeightName::Layer(1, LayerPart::V), [kv_out, d.hidden], Part::Rows(kv_out / 2..kv_out)),
    ];
    let pool = ComputePool::new(2).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 5, d.hidden), &Device::Cpu).unwrap();
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        tiny::write_gguf(&path, d, &weights, dtype);
        let w = open_gguf(&path, GgufMode::Quantized);
        let (fused, outs) = w.fused_linear(&layers, &Device::Cpu).unwrap().expect("block-quantized layers fuse");
        assert_eq!(outs, [q_out / 2, kv_out / 2, kv_out / 2]);
        let y = fused.forward(&x, &pool).unwrap();
        let mut at = 0;
        for ((name, shape, part), n) in layers.iter().zip(outs) {
            let apart = w.linear(*name, *shape, part.clone(), &Device::Cpu).unwrap().forward(&x, &pool).unwrap();
            let part = y.narrow(2, at, n).unwrap();
            assert_eq!(part.to_vec3::<f32>().unwrap(), apart.to_vec3::<f32>().unwrap(), "{dtype:?} {name:?}");
            at += n;
        }
        // Dequantized weights keep each layer apart, and so do layers of different formats or
        // inputs (checked before anything is read).
        assert!(open_gguf(&path, GgufMode::Dequantized).fused_linear(&layers, &Device::Cpu).unwrap().is_none());
        let q = layers[0].clone();
        let norm = (WeightName::Layer(1, LayerPart::AttnNorm), [1, d.hidden], Part::Whole);
        let down = (WeightName::Layer(1, LayerPart::Down), [d.hidden, d.inter], Part::Whole);
        for other in [norm, down] {
            let what = format!("{dtype:?} {:?}", other.0);
            assert!(w.fused_linear(&[q.clone(), other], &Device::Cpu).unwrap().is_none(), "{what}");
        }
    }
}

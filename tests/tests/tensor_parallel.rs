//! Tensor parallelism on CPU thread ranks: a model split over N ranks computes what the whole
//! model computes, from every checkpoint format, and holds about one copy of the weights.

use std::path::Path;
use std::process::{Command, Stdio};

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use herd_tests::{fixture, herd_bin, test_model, tiny};
use herd_worker::engine::tp::check::greedy_side_by_side;
use herd_worker::engine::{DTypeChoice, Engine, LoadOptions, Message};

fn load(path: &Path, dtype: DTypeChoice, tp: usize) -> herd_worker::engine::Result<Engine> {
    let opts = LoadOptions { dtype, devices: vec![Device::Cpu; tp], ..LoadOptions::new(path) };
    Engine::load(&opts, &mut |_, _| {})
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows of different lengths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Greedy-decodes `steps` tokens with both engines side by side; checks that every step picks
/// the same token and returns the largest logit difference.
fn decode_both(a: &Engine, b: &Engine, prompt: &[u32], steps: usize) -> f32 {
    let run = greedy_side_by_side(a, b, prompt, steps).unwrap();
    assert!(run.agrees(), "the split model picks other tokens: {:?} against {:?}", run.other, run.reference);
    run.max_diff
}

#[test]
fn test_model_over_three_ranks_decodes_like_one() {
    let model = test_model();
    let one = load(&model, DTypeChoice::Auto, 1).expect("load the test model");
    let three = load(&model, DTypeChoice::Auto, 3).expect("load the test model over 3 ranks");
    assert_eq!(three.tp_size(), 3);
    let prompts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "Who wrote the play Hamlet?",
        "Explain what a CPU does in one sentence.",
    ];
    for p in prompts {
        let ids = one.encode_chat(&[Message::new("user", p)]).unwrap();
        let worst = decode_both(&one, &three, &ids, 32);
        eprintln!("{p:?}: 32 tokens agree, largest logit difference {worst:.2e}");
        assert!(worst <= 1e-3, "{p:?}: logits differ by {worst} between --tp 1 and --tp 3");
    }
}

/// Full-prompt logits and 8 decode steps of a split model against the whole one.
fn assert_split_matches(path: &Path, dtype: DTypeChoice, tp: usize, ids: &[u32]) {
    let what = format!("{} --tp {tp}", path.file_name().unwrap().to_string_lossy());
    let one = load(path, dtype, 1).unwrap_or_else(|e| panic!("{what}: {e}"));
    let split = load(path, dtype, tp).unwrap_or_else(|e| panic!("{what}: {e}"));
    let full_one = one.logits(ids).unwrap().to_vec2::<f32>().unwrap();
    let full_split = split.logits(ids).unwrap().to_vec2::<f32>().unwrap();
    let prefill = full_one.iter().zip(&full_split).map(|(a, b)| max_diff(a, b)).fold(0.0, f32::max);
    assert!(prefill <= 1e-4, "{what}: prompt logits differ by {prefill}");
    let decode = decode_both(&one, &split, ids, 8);
    assert!(decode <= 1e-4, "{what}: decode logits differ by {decode}");
}

const IDS: [u32; 12] = [1, 300, 17, 5, 42, 399, 260, 261, 3, 100, 200, 350];

#[test]
fn tiny_checkpoints_split_over_two_and_four_ranks_match() {
    let dir = tempfile::tempdir().unwrap();
    let d = tiny::Dims::TP;
    let weights = tiny::tensors(d, 21);
    let single = dir.path().join("single");
    let sharded = dir.path().join("sharded");
    let gguf = dir.path().join("tiny-f32.gguf");
    let q8 = dir.path().join("tiny-q8_0.gguf");
    tiny::write_hf(&single, d, &weights, 1);
    tiny::write_hf(&sharded, d, &weights, 3);
    tiny::write_gguf(&gguf, d, &weights, GgmlDType::F32);
    tiny::write_gguf(&q8, d, &weights, GgmlDType::Q8_0);
    for tp in [2, 4] {
        assert_split_matches(&single, DTypeChoice::Auto, tp, &IDS);
        assert_split_matches(&sharded, DTypeChoice::Auto, tp, &IDS);
        assert_split_matches(&gguf, DTypeChoice::Auto, tp, &IDS);
    }
    // Quantized weights on CPU ranks split by whole rows only (o_proj and down_proj by output
    // rows), so any rank count works; dequantized ones may split anywhere.
    for tp in [2, 4] {
        assert_split_matches(&q8, DTypeChoice::Auto, tp, &IDS);
    }
    assert_split_matches(&q8, DTypeChoice::F32, 4, &IDS);
    // Where o_proj and down_proj split by input columns instead (tensor attention, as on GPUs),
    // a split inside quantization blocks is refused, saying why.
    let opts = LoadOptions { tensor_attention: true, devices: vec![Device::Cpu; 4], ..LoadOptions::new(&q8) };
    let e = Engine::load(&opts, &mut |_, _| {}).err().expect("a split inside Q8_0 blocks is refused").to_string();
    assert!(e.contains("blocks of 32") && e.contains("--dtype f32"), "{e}");
}

#[test]
fn pytorch_bin_checkpoint_splits_over_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama-bin");
    let d = dir.path().join("bin");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "pytorch_model.bin"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    std::fs::copy(fixture("sentencepiece/tokenizer.model"), d.join("tokenizer.model")).unwrap();
    assert_split_matches(&d, DTypeChoice::Auto, 2, &[1, 5, 9, 33, 63, 2, 17]);
}

/// The high-water mark of a live process's resident memory, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `herd` to completion; returns its stdout and its peak resident memory in KiB.
///
/// The peak is read from /proc while it runs: a child's rusage would also count the memory of
/// this test process, which it shares until exec.
fn run_measured(args: &[&str]) -> (String, u64) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(herd_bin())
        .args(args)
        .env("HERD_LOG", "warn")
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap())
        .stdin(Stdio::null())
        .spawn()
        .expect("start herd");
    let mut peak = 0;
    let status = loop {
        // Read before reaping: the mark only grows, and vanishes with the process.
        peak = peak.max(vm_hwm_kib(child.id()).unwrap_or(0));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(err.path()).unwrap();
    assert!(status.success(), "herd {args:?} failed: {stderr}");
    (std::fs::read_to_string(out.path()).unwrap(), peak)
}

#[test]
fn split_cli_answers_alike_holding_one_copy_of_the_weights() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let ask = |tp: &str| {
        run_measured(&[
            "chat",
            "--model",
            model,
            "--tp",
            tp,
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ])
    };
    let (answer1, rss1) = ask("1");
    let (answer3, rss3) = ask("3");
    let file_kib = std::fs::metadata(model).unwrap().len() / 1024;
    eprintln!("peak RSS: --tp 1 {} MiB, --tp 3 {} MiB (model file {} MiB)", rss1 / 1024, rss3 / 1024, file_kib / 1024);
    assert!(!answer1.trim().is_empty());
    assert_eq!(answer1, answer3, "--tp 3 answers differently");
    // One copy plus a little per rank (thread stacks, per-rank buffers), never N copies.
    assert!(rss3 < rss1 + rss1 / 4, "--tp 3 peaked at {rss3} KiB against {rss1} KiB for --tp 1");
}

#[test]
fn indivisible_or_impossible_splits_fail_at_start_naming_the_numbers() {
    let model = test_model();
    let model = model.to_str().unwrap();
    let out = Command::new(herd_bin())
        .args([
            "worker",
            "--model",
            model,
            "--tp",
            "2",
            "--controller",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("HERD_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the worker started with --tp 2");
    assert!(err.contains("--tp 2") && err.contains("9 attention heads and 3 KV heads"), "{err}");

    let out = Command::new(herd_bin())
        .args(["chat", "--model", model, "--tp", "2", "--devices", "cuda:0", "--prompt", "hi"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--tp 2 needs 2 devices, but --devices cuda:0 names 1"), "{err}");
}

/// The K-quant fixtures (Q4_K, Q5_K and Q6_K matrices from llama.cpp's quantizer) split over two
/// ranks give the whole model's logits to the bit: each rank sums its rows in the same order.
#[test]
fn k_quant_models_over_two_ranks_match_one_to_the_bit() {
    let ids: Vec<u32> = (0..40).map(|i| 17 + (i * 37) % 1000).collect();
    for name in ["tiny-k-q4_k_m.gguf", "tiny-k-q5_k_m.gguf", "tiny-k-q6_k.gguf"] {
        let path = fixture(&format!("kquant/{name}"));
        let one = load(&path, DTypeChoice::Auto, 1).unwrap_or_else(|e| panic!("{name}: {e}"));
        let two = load(&path, DTypeChoice::Auto, 2).unwrap_or_else(|e| panic!("{name} --tp 2: {e}"));
        assert_eq!(two.tp_size(), 2);
        let a = one.logits(&ids).unwrap().to_vec2::<f32>().unwrap();
        let b = two.logits(&ids).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b, "{name}: --tp 2 logits differ from --tp 1");
        assert_eq!(decode_both(&one, &two, &ids, 8), 0.0, "{name}: decoding differs");
    }
}

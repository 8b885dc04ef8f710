//! The `herd` binary: one-shot answers on the test model, the interactive loop, and one clear
//! line (never a panic) for every kind of bad checkpoint or flag.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use candle_core::quantized::GgmlDType;
use herd_tests::{herd_bin, test_model, tiny};

fn herd(args: &[&str]) -> Output {
    Command::new(herd_bin()).args(args).env("HERD_LOG", "warn").output().expect("run herd")
}

fn chat(model: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["chat", "--model", model.to_str().unwrap()];
    args.extend(extra);
    herd(&args)
}

#[test]
fn prompt_answers_hamlet_with_only_the_answer_on_stdout() {
    let run = |log: Option<&str>| {
        let mut cmd = Command::new(herd_bin());
        cmd.args(["chat", "--model", test_model().to_str().unwrap(), "--temperature", "0"]);
        cmd.args(["--prompt", "Who wrote the play Hamlet?"]).env_remove("HERD_LOG");
        if let Some(level) = log {
            cmd.env("HERD_LOG", level);
        }
        cmd.output().unwrap()
    };
    let out = run(Some("info"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Shakespeare"), "answer: {stdout}");
    assert!(!stdout.contains("INFO") && stderr.contains("model loaded"), "logs belong on stderr");
    // Unless HERD_LOG asks for more, a chat logs only warnings: nothing between its turns.
    let out = run(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("INFO"), "{stderr}");
}

#[test]
fn interactive_chat_keeps_history_and_handles_commands() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny::write_hf(&model, tiny::Dims::BASE, &tiny::tensors(tiny::Dims::BASE, 5), 1);
    let mut child = Command::new(herd_bin())
        .args(["chat", "--model", model.to_str().unwrap(), "--max-tokens", "3", "--seed", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello there\nand again\n/reset\nfresh start\n/exit\nnot read\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let answers = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(answers, 3, "one answer line per message before /exit");
    assert!(stderr.contains("conversation cleared"));
}

/// Asserts a failed run that explains itself in one line naming every `needle`, without a panic.
fn assert_clear_failure(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        stderr.lines().any(|l| needles.iter().all(|n| l.contains(n))),
        "no line of stderr mentions all of {needles:?}:\n{stderr}"
    );
}

#[test]
fn bad_checkpoints_end_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny::tensors(tiny::Dims::BASE, 9);
    let good = dir.path().join("good");
    tiny::write_hf(&good, tiny::Dims::BASE, &weights, 1);

    // Missing file.
    assert_clear_failure(&chat(&dir.path().join("nope.gguf"), &["--prompt", "hi"]), &["nope.gguf", "no such file"]);

    // Unsupported architecture.
    let arch = dir.path().join("arch");
    tiny::write_hf(&arch, tiny::Dims::BASE, &weights, 1);
    let mut cfg = tiny::config_json(tiny::Dims::BASE);
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(arch.join("config.json"), cfg.to_string()).unwrap();
    assert_clear_failure(
        &chat(&arch, &["--prompt", "hi"]),
        &["config.json", "unsupported architecture GPT2LMHeadModel"],
    );

    // Heads that don't divide.
    let heads = dir.path().join("heads");
    tiny::write_hf(&heads, tiny::Dims::BASE, &weights, 1);
    let mut cfg = tiny::config_json(tiny::Dims::BASE);
    cfg["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(heads.join("config.json"), cfg.to_string()).unwrap();
    assert_clear_failure(&chat(&heads, &["--prompt", "hi"]), &["config.json", "not a multiple"]);

    // A tensor of the wrong shape.
    let shape = dir.path().join("shape");
    let mut bad = weights.clone();
    let q = bad.iter_mut().find(|(n, _)| n == "model.layers.1.self_attn.q_proj.weight").unwrap();
    q.1 = q.1.narrow(0, 0, 16).unwrap();
    tiny::write_hf(&shape, tiny::Dims::BASE, &bad, 1);
    assert_clear_failure(
        &chat(&shape, &["--prompt", "hi"]),
        &["model.safetensors", "model.layers.1.self_attn.q_proj.weight", "[16, 32]", "[32, 32]"],
    );

    // A missing tensor in a sharded checkpoint.
    let missing = dir.path().join("missing");
    let fewer: Vec<_> = weights.iter().filter(|(n, _)| n != "model.norm.weight").cloned().collect();
    tiny::write_hf(&missing, tiny::Dims::BASE, &fewer, 2);
    assert_clear_failure(&chat(&missing, &["--prompt", "hi"]), &["missing tensor model.norm.weight"]);

    // Corrupt files: a truncated safetensors file and a GGUF that is not one.
    let corrupt = dir.path().join("corrupt");
    tiny::write_hf(&corrupt, tiny::Dims::BASE, &weights, 1);
    let st = corrupt.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert_clear_failure(
        &chat(&corrupt, &["--prompt", "hi"]),
        &["model.safetensors", "not a readable safetensors file"],
    );
    let gguf = dir.path().join("junk.gguf");
    std::fs::write(&gguf, b"definitely not gguf").unwrap();
    assert_clear_failure(&chat(&gguf, &["--prompt", "hi"]), &["junk.gguf", "not a readable GGUF file"]);
    let truncated = dir.path().join("truncated.gguf");
    tiny::write_gguf(&truncated, tiny::Dims::BASE, &weights, GgmlDType::F32);
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 4000]).unwrap();
    assert_clear_failure(&chat(&truncated, &["--prompt", "hi"]), &["truncated.gguf"]);

    // No weights at all.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(good.join("config.json"), empty.join("config.json")).unwrap();
    std::fs::copy(good.join("tokenizer.model"), empty.join("tokenizer.model")).unwrap();
    assert_clear_failure(&chat(&empty, &["--prompt", "hi"]), &["empty", "no weights found"]);
}

#[test]
fn bad_flags_name_the_flag() {
    let model = test_model();
    assert_clear_failure(&chat(&model, &["--dtype", "f64", "--prompt", "hi"]), &["--dtype"]);
    assert_clear_failure(
        &chat(&model, &["--chat-template", "no-such-template", "--prompt", "hi"]),
        &["--chat-template"],
    );
    assert_clear_failure(&chat(&model, &["--top-p", "0", "--prompt", "hi"]), &["top_p"]);
    assert_clear_failure(&chat(&model, &["--max-tokens", "9000", "--prompt", "hi"]), &["9000", "8192"]);
}

#[test]
fn bench_refuses_bad_flags_and_unreachable_gateways() {
    let url = "http://127.0.0.1:9";
    assert_clear_failure(&herd(&["bench", "--url", url, "--concurrency", "0"]), &["--concurrency"]);
    assert_clear_failure(&herd(&["bench", "--url", url, "--max-tokens", "x"]), &["--max-tokens"]);
    assert_clear_failure(&herd(&["bench", "--url", "ftp://example"]), &["--url ftp://example"]);
    assert_clear_failure(&herd(&["bench", "--url", url]), &["--url http://127.0.0.1:9", "no answer"]);
}

//! Writes herd's logits of every position of a token sequence, as `scripts/llama-cpp/logits.cpp`
//! writes llama.cpp's: for comparing the two on a model too large for the test fixtures (the
//! 7B files of `scripts/make-checkpoint.sh`; `scripts/llama-cpp/compare-logits.sh` runs both).
//!
//! cargo run --release -p herd-worker --example logits -- MODEL IDS.txt OUT.bin
//!   IDS.txt: token ids, whitespace-separated. OUT.bin: n_tokens x n_vocab float32.

use std::io::Write;

use herd_worker::engine::{Engine, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, ids, out] = &args[..] else { return Err("usage: logits MODEL IDS.txt OUT.bin".into()) };
    let text = std::fs::read_to_string(ids).map_err(|e| format!("reading {ids}: {e}"))?;
    let ids: Vec<u32> = text.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    let engine = Engine::load(&LoadOptions::new(model), &mut |_, _| {})?;
    let logits = engine.logits(&ids)?.to_vec2::<f32>()?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).map_err(|e| format!("creating {out}: {e}"))?);
    for v in logits.iter().flatten() {
        f.write_all(&v.to_le_bytes())?;
    }
    f.flush()?;
    Ok(())
}

//! Throughput of the CPU matrix kernels on one thread: every implementation this CPU runs, the
//! formats with herd's own kernels, both ways of summing rows, 1 to 16 activation rows (decode
//! batches) and 64 and 512 (prompts), on a SmolLM2-sized MLP matrix (1024 columns for the
//! K-quants, whose 256-value super-blocks do not divide SmolLM2's 576).
//! `cargo bench -p herd-worker --bench kernels`.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use herd_worker::engine::pool::ComputePool;
use herd_worker::engine::quant::{Kernels, QuantMatrix, Sums};

/// Multiply-adds per timed run; the best of `RUNS` runs is reported.
const WORK: usize = 600_000_000;
const RUNS: usize = 7;

fn main() -> candle_core::Result<()> {
    let out = 1536;
    let pool = ComputePool::new(1).map_err(candle_core::Error::wrap)?;
    println!("{out}x576 (K-quants {out}x1024) matrix, 1 thread, GMAC/s (best of {RUNS})");
    println!(
        "{:<8} {:<9} {:<6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "format", "kernels", "sums", "1 row", "4 rows", "16 rows", "64 rows", "512 rows"
    );
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        let inp = if dtype.block_size() == 256 { 1024 } else { 576 };
        let w = Tensor::randn(0f32, 0.3, (out, inp), &Device::Cpu)?;
        let bytes = QTensor::quantize(&w, dtype)?.data()?.into_owned();
        // The K-quants' exact sums (only for layers split by input columns) are scalar.
        let k_quant = dtype.block_size() == 256;
        let runs = Kernels::available().into_iter().flat_map(|k| [(k, Sums::Llama), (k, Sums::Exact)]);
        for (kernels, sums) in runs.filter(|&(k, s)| !k_quant || (s == Sums::Llama && k != Kernels::Portable)) {
            let m = QuantMatrix::from_gguf(dtype, &bytes, [out, inp], kernels, sums).expect("a supported matrix");
            let mut line =
                format!("{:<8} {:<9} {:<6}", format!("{dtype:?}"), format!("{kernels:?}"), format!("{sums:?}"));
            for rows in [1, 4, 16, 64, 512] {
                let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu)?;
                let iters = (WORK / (rows * out * inp)).max(1);
                let mut best = f64::MAX;
                for _ in 0..RUNS {
                    let t = Instant::now();
                    for _ in 0..iters {
                        std::hint::black_box(m.forward(&x, &pool, DType::F32)?);
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                line += &format!(" {:>8.1}", (iters * rows * out * inp) as f64 / best / 1e9);
            }
            println!("{line}");
        }
    }
    Ok(())
}

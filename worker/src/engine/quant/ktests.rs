use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5K, BlockQ6K, GgmlType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::engine::quant::Kernels;

/// A random GGUF super-block of `K`: random quants and scales, small finite f16 scales; with
/// `extreme`, every quant and 6-bit scale at its maximum (Q6_K's scales at -128).
fn random_block<K: KQuants>(rng: &mut StdRng, extreme: bool) -> Vec<u8> {
    let mut b: Vec<u8> = (0..K::GGUF_BYTES).map(|_| if extreme { 0xff } else { rng.random() }).collect();
    let mut put = |at: usize| {
        let v = f16::from_f32(rng.random_range(-0.02f32..0.02)).to_le_bytes();
        b[at..at + 2].copy_from_slice(&v);
    };
    if K::GGUF_BYTES == 210 {
        put(208);
        if extreme {
            b[192..208].fill(0x80);
        }
    } else {
        put(0);
        put(2);
    }
    b
}

/// Activations with a wide spread of magnitudes, an all-zero block, and exact ties.
fn activations(rng: &mut StdRng, blocks: usize, extreme: bool) -> Vec<f32> {
    let mut x: Vec<f32> = (0..blocks * QK_K)
        .map(|_| {
            let v = rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-3..3));
            if extreme { v.signum() } else { v }
        })
        .collect();
    if blocks > 1 {
        x[QK_K..2 * QK_K].fill(0.0);
    }
    x
}

fn acts(x: &[f32]) -> Vec<Q8K> {
    let mut out = vec![Q8K::ZERO; x.len() / QK_K];
    quantize_q8k(x, &mut out);
    out
}

#[test]
fn activations_quantize_as_llama_cpp() {
    let mut x = vec![0f32; QK_K];
    // The largest magnitude is negative: the scale -127 / max is positive, d = max / -127.
    x[0] = -127.0;
    (x[1], x[2], x[3], x[4]) = (2.5, -3.5, 127.0, 0.49);
    let [q] = acts(&x)[..] else { unreachable!() };
    assert_eq!(q.d, 1.0 / (-127.0f32 / -127.0));
    // Half to even, as ggml's `nearest_int`.
    assert_eq!(&q.qs[..5], &[-127, 2, -4, 127, 0]);
    assert_eq!(q.bsums[0], -127 + 2 - 4 + 127);
    // A positive maximum makes d negative and flips the quants' signs.
    let [q] = acts(&x.iter().map(|v| -v).collect::<Vec<_>>())[..] else { unreachable!() };
    assert!(q.d < 0.0);
    assert_eq!(&q.qs[..5], &[-127, 2, -4, 127, 0]);
    // An all-zero block is all zeros, sums included.
    assert_eq!(acts(&[0.0; QK_K])[0], Q8K::ZERO);
    let mut rng = StdRng::seed_from_u64(1);
    for q in acts(&activations(&mut rng, 8, false)) {
        assert!(q.qs.iter().all(|&v| v != -128));
        for (s, chunk) in q.bsums.iter().zip(q.qs.chunks_exact(16)) {
            assert_eq!(i32::from(*s), chunk.iter().map(|&v| i32::from(v)).sum::<i32>());
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_avx2_quantizer_gives_the_portable_bits() {
    if !is_x86_feature_detected!("avx2") {
        eprintln!("no AVX2 on this CPU: nothing to compare");
        return;
    }
    let mut rng = StdRng::seed_from_u64(5);
    let mut x = activations(&mut rng, 16, false);
    x.extend(activations(&mut rng, 4, true));
    // Ties at every half step, a largest magnitude that appears twice with both signs, NaN.
    x.extend((0..QK_K).map(|i| (i as f32 - 128.0) * 0.5));
    x.extend((0..QK_K).map(|i| match i {
        7 => -3.0,
        9 => 3.0,
        11 => f32::NAN,
        _ => (i % 5) as f32 * 0.25,
    }));
    let want = acts(&x);
    let mut got = vec![Q8K::ZERO; want.len()];
    // SAFETY: checked above.
    unsafe { crate::engine::quant::ksimd::quantize_q8k(&x, &mut got) };
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!((g.qs, g.d.to_bits(), g.bsums), (w.qs, w.d.to_bits(), w.bsums), "block {i}");
    }
}

/// The decoded quants and scales give candle's dequantized weights: GGUF's layout is read right.
fn check_decoding<K: KQuants, C: GgmlType>(value: impl Fn(&K, usize) -> f32) {
    let mut rng = StdRng::seed_from_u64(2);
    for extreme in [false, true] {
        let bytes = random_block::<K>(&mut rng, extreme);
        let block = K::from_gguf(&bytes);
        assert_eq!(size_of::<C>(), K::GGUF_BYTES);
        // SAFETY: candle's block types are plain #[repr(C)] data of exactly GGUF_BYTES bytes.
        let theirs: C = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let mut want = vec![0f32; QK_K];
        C::to_float(&[theirs], &mut want);
        for (e, want) in want.iter().enumerate() {
            let got = value(&block, e);
            assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "element {e}: {got} vs {want}");
        }
    }
}

#[test]
fn super_blocks_decode_as_candle_reads_them() {
    check_decoding::<Q4K, BlockQ4K>(|b, e| {
        b.d * b.scale(e) as f32 * b.quant(e) as f32 - b.dmin * f32::from(b.m[e / 32])
    });
    check_decoding::<Q5K, BlockQ5K>(|b, e| {
        b.d * b.scale(e) as f32 * b.quant(e) as f32 - b.dmin * f32::from(b.m[e / 32])
    });
    check_decoding::<Q6K, BlockQ6K>(|b, e| b.d * b.scale(e) as f32 * (b.quant(e) - 32) as f32);
}

/// The llama.cpp-order sum and the exact one agree to f32 precision with the plain definition
/// (dequantized weights times dequantized activations), and every kernel gives the portable
/// kernel's bits, one row or four at a time.
fn check_kernels<K: super::super::NativeKQuants>(value: impl Fn(&K, usize) -> f64) {
    let mut rng = StdRng::seed_from_u64(3);
    for blocks in [1, 2, 3, 11] {
        for round in 0..12 {
            let extreme = round == 0;
            let w: Vec<K> = (0..blocks).map(|_| K::from_gguf(&random_block::<K>(&mut rng, extreme))).collect();
            let xs: Vec<Vec<Q8K>> = (0..4).map(|_| acts(&activations(&mut rng, blocks, extreme))).collect();
            for x in &xs {
                let plain: f64 = (0..blocks * QK_K)
                    .map(|e| {
                        value(&w[e / QK_K], e % QK_K) * f64::from(x[e / QK_K].d) * f64::from(x[e / QK_K].qs[e % QK_K])
                    })
                    .sum();
                let scale: f64 = (0..blocks * QK_K)
                    .map(|e| (value(&w[e / QK_K], e % QK_K) * f64::from(x[e / QK_K].d)).abs() * 127.0)
                    .sum();
                let (llama, exact) = (f64::from(lane_dot(&w, x)), dot(&w, x));
                assert!((exact - plain).abs() <= 1e-9 * (1.0 + scale), "{blocks} blocks: exact {exact} vs {plain}");
                assert!((llama - plain).abs() <= 1e-5 * (1.0 + scale), "{blocks} blocks: {llama} vs {plain}");
            }
            let rows: [&[Q8K]; 4] = std::array::from_fn(|k| &xs[k][..]);
            let want = rows.map(|x| lane_dot(&w, x));
            for k in Kernels::available() {
                assert_eq!(k.k_lane_dot(&w, rows).map(f32::to_bits), want.map(f32::to_bits), "{k:?}, {blocks} blocks");
                let one = rows.map(|x| k.k_lane_dot(&w, [x])[0]);
                assert_eq!(one.map(f32::to_bits), want.map(f32::to_bits), "{k:?}, {blocks} blocks, one row");
            }
        }
    }
}

#[test]
fn q4_k_kernels_match_the_reference() {
    check_kernels::<Q4K>(|b, e| {
        f64::from(b.d) * f64::from(b.scale(e) * b.quant(e)) - f64::from(b.dmin) * f64::from(b.m[e / 32])
    });
}

#[test]
fn q5_k_kernels_match_the_reference() {
    check_kernels::<Q5K>(|b, e| {
        f64::from(b.d) * f64::from(b.scale(e) * b.quant(e)) - f64::from(b.dmin) * f64::from(b.m[e / 32])
    });
}

#[test]
fn q6_k_kernels_match_the_reference() {
    check_kernels::<Q6K>(|b, e| f64::from(b.d) * f64::from(b.scale(e) * (b.quant(e) - 32)));
}

/// Whole matrices (rows that do not fill the last panel, prompts cut into tiles and groups of
/// four rows) give every kernel the portable kernel's bits, in llama.cpp's order.
fn check_matrices<K: KQuants>(dtype: candle_core::quantized::GgmlDType) {
    use crate::engine::pool::ComputePool;
    use crate::engine::quant::{QuantMatrix, Sums};
    use candle_core::{DType, Device, Tensor};
    let mut rng = StdRng::seed_from_u64(4);
    let pool = ComputePool::new(2).unwrap();
    for (out, blocks) in [(13, 3), (24, 1)] {
        let bytes: Vec<u8> = (0..out * blocks).flat_map(|i| random_block::<K>(&mut rng, i % 7 == 0)).collect();
        for m in [1, 5, 70] {
            let x =
                Tensor::from_vec(activations(&mut rng, m * blocks, false), (m, blocks * QK_K), &Device::Cpu).unwrap();
            let forward = |k: Kernels| {
                let w = QuantMatrix::from_gguf(dtype, &bytes, [out, blocks * QK_K], k, Sums::Llama).unwrap();
                let y = w.forward(&x, &pool, DType::F32).unwrap().to_vec2::<f32>().unwrap();
                y.into_iter().flatten().map(f32::to_bits).collect::<Vec<_>>()
            };
            let want = forward(Kernels::Portable);
            for k in Kernels::available() {
                assert_eq!(forward(k), want, "{dtype:?} {k:?}: {out}x{blocks} blocks, {m} rows");
            }
        }
    }
}

#[test]
fn k_quant_matrices_match_the_portable_kernels() {
    use candle_core::quantized::GgmlDType;
    check_matrices::<Q4K>(GgmlDType::Q4K);
    check_matrices::<Q5K>(GgmlDType::Q5K);
    check_matrices::<Q6K>(GgmlDType::Q6K);
}

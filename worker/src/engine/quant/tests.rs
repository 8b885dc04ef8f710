use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scalar::{ActRows, Q4_0, Q4_1, Q8_0, QK, Quants, WeightRows};
use super::*;
use candle_core::Module;
use candle_core::quantized::{QMatMul, QTensor};

fn scale(rng: &mut StdRng) -> f16 {
    f16::from_f32(rng.random_range(-0.05f32..0.05))
}

trait Random: NativeQuants {
    fn random(rng: &mut StdRng) -> Self;
    /// The block's quants as integers (before scale and offset).
    fn ints(&self) -> [i32; QK];
}

fn nibble_ints(qs: &[u8; QK / 2], bias: i32) -> [i32; QK] {
    std::array::from_fn(|j| i32::from(if j < QK / 2 { qs[j] & 0x0f } else { qs[j - QK / 2] >> 4 }) - bias)
}

impl Random for Q4_0 {
    fn random(rng: &mut StdRng) -> Self {
        Self(rng.random())
    }
    fn ints(&self) -> [i32; QK] {
        nibble_ints(&self.0, 8)
    }
}

impl Random for Q4_1 {
    fn random(rng: &mut StdRng) -> Self {
        Self(rng.random())
    }
    fn ints(&self) -> [i32; QK] {
        nibble_ints(&self.0, 0)
    }
}

impl Random for Q8_0 {
    fn random(rng: &mut StdRng) -> Self {
        // Include -128, which GGUF files may hold though llama.cpp never writes it.
        Self(std::array::from_fn(|_| rng.random_range(-128i32..=127) as i8))
    }
    fn ints(&self) -> [i32; QK] {
        self.0.map(i32::from)
    }
}

/// Activations with a wide spread of magnitudes, some all-zero blocks, and exact half-way ties.
fn activations(rng: &mut StdRng, blocks: usize) -> Vec<f32> {
    let mut x: Vec<f32> =
        (0..blocks * QK).map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-3..3))).collect();
    if blocks > 2 {
        x[QK..2 * QK].fill(0.0);
    }
    if blocks > 3 {
        // max 127 makes the scale 1, so 2.5 and -3.5 are ties: half to even gives 2 and -4.
        let tie = &mut x[2 * QK..3 * QK];
        tie[0] = 127.0;
        tie[1] = 2.5;
        tie[2] = -3.5;
    }
    x
}

fn quantized(k: Kernels, x: &[f32]) -> ActRows {
    let blocks = x.len() / QK;
    let mut a = ActRows::zeros(1, blocks);
    k.quantize(x, &mut a.qs, &mut a.d, &mut a.s);
    a
}

fn kernels() -> Vec<Kernels> {
    let k = Kernels::available();
    if k.len() == 1 {
        eprintln!("this CPU has no SIMD kernels for herd: only the portable ones are tested");
    }
    k
}

/// The dot products of `w`'s only row with `xs`, through the VNNI kernel's interleaved layout.
#[cfg(target_arch = "x86_64")]
fn vnni_dot<Q: Random, const R: usize>(w: &WeightRows<Q>, xs: [&ActRows; R]) -> [f64; R] {
    let rows = super::vnni::VnniRows::new(w);
    let acts = xs.map(super::vnni::VnniActs::new);
    let rows_of = std::array::from_fn::<_, R, _>(|k| acts[k].row(0));
    // SAFETY: only called when `vnni::available()`.
    unsafe { super::vnni::dot::<Q, R>(&rows.row(0), std::array::from_fn(|k| &rows_of[k])) }
}

fn check_dot<Q: Random>() {
    let mut rng = StdRng::seed_from_u64(7);
    // Row lengths with and without a tail after groups of four blocks.
    for blocks in [1, 2, 3, 4, 5, 7, 8, 18, 33] {
        for _ in 0..20 {
            let qs: Vec<Q> = (0..blocks).map(|_| Q::random(&mut rng)).collect();
            let d: Vec<f16> = (0..blocks).map(|_| scale(&mut rng)).collect();
            let m: Vec<f16> = if Q::HAS_MIN { (0..blocks).map(|_| scale(&mut rng)).collect() } else { Vec::new() };
            let w = WeightRows::new(qs.clone(), d.clone(), m.clone(), blocks);
            let x = quantized(Kernels::Portable, &activations(&mut rng, blocks));
            // The plain definition: integer quants times scales, block by block, plus Q4_1's
            // offset times the activations' stored sum (as llama.cpp computes it).
            let plain: f64 = (0..blocks)
                .map(|b| {
                    let ints: i64 = qs[b].ints().iter().zip(&x.qs[b]).map(|(&a, &c)| i64::from(a) * i64::from(c)).sum();
                    let offset = if Q::HAS_MIN { f64::from(m[b].to_f32()) * x.s[b] } else { 0.0 };
                    f64::from(d[b].to_f32()) * x.d[b] * ints as f64 + offset
                })
                .sum();
            let reference = scalar::dot(&w.row(0), &x.row(0));
            assert!(
                (reference - plain).abs() <= 1e-12 * (1.0 + plain.abs()),
                "{blocks} blocks: {reference} vs {plain}"
            );
            // Three more activation rows: the four-row form gives each row's one-row result.
            let more: Vec<ActRows> =
                (0..3).map(|_| quantized(Kernels::Portable, &activations(&mut rng, blocks))).collect();
            for k in kernels() {
                let [got] = k.dot(&w.row(0), [&x.row(0)]);
                assert!(
                    (got - reference).abs() <= 1e-12 * (1.0 + reference.abs()),
                    "{k:?}, {blocks} blocks: {got} vs {reference}"
                );
                let rows = [&x.row(0), &more[0].row(0), &more[1].row(0), &more[2].row(0)];
                let four = k.dot(&w.row(0), rows);
                let one: Vec<f64> = rows.iter().map(|r| k.dot(&w.row(0), [*r])[0]).collect();
                assert_eq!(four.to_vec(), one, "{k:?}, {blocks} blocks: four rows at once");
                #[cfg(target_arch = "x86_64")]
                if k == Kernels::Vnni {
                    let [got] = vnni_dot(&w, [&x]);
                    assert!(
                        (got - reference).abs() <= 1e-12 * (1.0 + reference.abs()),
                        "VNNI, {blocks} blocks: {got} vs {reference}"
                    );
                    let four = vnni_dot(&w, [&x, &more[0], &more[1], &more[2]]);
                    let one: Vec<f64> = [&x, &more[0], &more[1], &more[2]].map(|r| vnni_dot(&w, [r])[0]).to_vec();
                    assert_eq!(four.to_vec(), one, "VNNI, {blocks} blocks: four rows at once");
                }
            }
        }
    }
}

#[test]
fn q4_0_kernels_match_the_reference() {
    check_dot::<Q4_0>();
}

#[test]
fn q4_1_kernels_match_the_reference() {
    check_dot::<Q4_1>();
}

#[test]
fn q8_0_kernels_match_the_reference() {
    check_dot::<Q8_0>();
}

#[test]
fn activation_quantization_is_identical_across_kernels() {
    let mut rng = StdRng::seed_from_u64(11);
    for blocks in [1, 4, 9] {
        let x = activations(&mut rng, blocks);
        let reference = quantized(Kernels::Portable, &x);
        if blocks > 3 {
            assert_eq!((reference.qs[1], reference.d[1], reference.s[1]), ([0; QK], 0.0, 0.0), "a zero block");
            assert_eq!(&reference.qs[2][..3], &[127, 2, -4], "ties round half to even");
        }
        assert!(reference.qs.iter().flatten().all(|&v| v != -128), "activations stay within -127..=127");
        for k in kernels() {
            assert_eq!(quantized(k, &x), reference, "{k:?}, {blocks} blocks");
        }
    }
}

fn random_matrix(out: usize, inp: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let w: Vec<f32> = (0..out * inp).map(|_| rng.random_range(-0.3f32..0.3)).collect();
    Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap()
}

fn gguf_bytes(w: &Tensor, dtype: GgmlDType) -> Vec<u8> {
    QTensor::quantize(w, dtype).unwrap().data().unwrap().into_owned()
}

/// Every format, on every kernel and thread count, matches candle's quantized matmul, with more
/// activation rows than a tile and a row count that does not divide into the chunks evenly.
#[test]
fn matrices_agree_with_candle_for_every_format() {
    let (out, inp) = (37, 512);
    let w = random_matrix(out, inp, 3);
    // Seventy rows: a full tile of 64, then one group of four and two single rows.
    let x = random_matrix(70, inp, 4);
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let reference = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for (k, sums) in kernels().into_iter().flat_map(|k| [(k, Sums::Llama), (k, Sums::Exact)]) {
            let m = QuantMatrix::from_gguf(dtype, &gguf_bytes(&w, dtype), [out, inp], k, sums).unwrap();
            for threads in [1, 3] {
                let pool = ComputePool::new(threads).unwrap();
                let y = m.forward(&x, &pool, DType::F32).unwrap().to_vec2::<f32>().unwrap();
                for (r, (a, b)) in y.iter().zip(&reference).enumerate() {
                    for c in 0..out {
                        // candle rounds activation ties away from zero and sums in f32.
                        let tol = 2e-3 * (1.0 + b[c].abs());
                        assert!((a[c] - b[c]).abs() < tol, "{dtype:?} {k:?} [{r},{c}]: {} vs {}", a[c], b[c]);
                    }
                }
                // One row at a time gives the same numbers as the batch, in either tile.
                for r in [1, 66, 69] {
                    let row =
                        m.forward(&x.narrow(0, r, 1).unwrap(), &pool, DType::F32).unwrap().to_vec2::<f32>().unwrap();
                    assert_eq!(row[0], y[r], "{dtype:?} {k:?} row {r}");
                }
                // A strided input, copied rather than read in place, gives the same numbers.
                let strided = x.t().unwrap().contiguous().unwrap().t().unwrap();
                assert!(!strided.is_contiguous());
                let ys = m.forward(&strided, &pool, DType::F32).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(ys, y, "{dtype:?} {k:?} strided");
            }
        }
    }
}

/// Rows whose blocks end in tail groups (7 = 4 + 2 + 1 and 19 = 8 + 8 + 2 + 1 blocks) give every
/// kernel the portable kernel's sums, in every row of a tiled batch: the exact sums up to the
/// order of f64 additions, llama.cpp's order to the bit.
#[test]
fn every_kernel_matches_the_portable_one_on_rows_with_tails() {
    let pool = ComputePool::new(2).unwrap();
    // 40 rows: Q4_0 sums per block (llama.cpp repacks it), in a panel the rows do not fill.
    for (out, inp) in [(37, 7 * QK), (37, 19 * QK), (40, 19 * QK)] {
        let w = random_matrix(out, inp, 8);
        let x = random_matrix(70, inp, 9);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let bytes = gguf_bytes(&w, dtype);
            let forward = |k: Kernels, sums| {
                let m = QuantMatrix::from_gguf(dtype, &bytes, [out, inp], k, sums).unwrap();
                m.forward(&x, &pool, DType::F64).unwrap().to_vec2::<f64>().unwrap()
            };
            let reference = forward(Kernels::Portable, Sums::Exact);
            let llama = forward(Kernels::Portable, Sums::Llama);
            for k in kernels() {
                assert_eq!(forward(k, Sums::Llama), llama, "{dtype:?} {k:?} {inp} in llama.cpp's order");
                for (r, (a, b)) in forward(k, Sums::Exact).iter().zip(&reference).enumerate() {
                    for (c, (a, b)) in a.iter().zip(b).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                            "{dtype:?} {k:?} {inp} [{r},{c}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

/// A matrix split by input columns into two halves gives f64 partial sums that add up exactly
/// to the unsplit matrix's output: what keeps tensor-parallel ranks bit-identical.
#[test]
fn split_partial_sums_add_up_to_the_whole() {
    let (out, inp) = (24, 512);
    let w = random_matrix(out, inp, 5);
    let x = random_matrix(2, inp, 6);
    let pool = ComputePool::new(2).unwrap();
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
        let k = Kernels::detect();
        let whole = QuantMatrix::from_gguf(dtype, &gguf_bytes(&w, dtype), [out, inp], k, Sums::Exact).unwrap();
        let y = whole.forward(&x, &pool, DType::F64).unwrap().to_vec2::<f64>().unwrap();
        // Halves of 256 columns: a whole number of blocks for every format here.
        let half = |i: usize| {
            let w = w.narrow(1, i * 256, 256).unwrap().contiguous().unwrap();
            let part = QuantMatrix::from_gguf(dtype, &gguf_bytes(&w, dtype), [out, 256], k, Sums::Exact).unwrap();
            let x = x.narrow(1, i * 256, 256).unwrap().contiguous().unwrap();
            part.forward(&x, &pool, DType::F64).unwrap().to_vec2::<f64>().unwrap()
        };
        let (a, b) = (half(0), half(1));
        for r in 0..2 {
            for c in 0..out {
                assert_eq!((a[r][c] + b[r][c]) as f32, y[r][c] as f32, "{dtype:?} [{r},{c}]");
            }
        }
    }
}

/// Q4_0 matrices whose row count is a multiple of 8 sum per block, as llama.cpp's repacked
/// kernels do; others in lanes, as its `vec_dot`.
#[test]
fn q4_0_sums_per_block_where_llama_cpp_repacks() {
    let pool = ComputePool::new(1).unwrap();
    let inp = 9 * QK;
    let x = random_matrix(5, inp, 11);
    let mut acts = ActRows::zeros(5, 9);
    Kernels::Portable.quantize(
        &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &mut acts.qs,
        &mut acts.d,
        &mut acts.s,
    );
    for (out, repacked) in [(16, true), (13, false)] {
        let bytes = gguf_bytes(&random_matrix(out, inp, 10), GgmlDType::Q4_0);
        let rows = WeightRows::<Q4_0>::from_gguf(&bytes, 9).unwrap();
        let got = QuantMatrix::from_gguf(GgmlDType::Q4_0, &bytes, [out, inp], Kernels::Portable, Sums::Llama)
            .unwrap()
            .forward(&x, &pool, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, got) in got.iter().enumerate() {
            for (c, &got) in got.iter().enumerate() {
                let (w, a) = (rows.row(c), acts.row(r));
                // The plain definition of the per-block order.
                let mut blocks = 0f32;
                for b in 0..9 {
                    let ints: i32 = (0..QK).map(|e| w.qs[b].quant(e) * i32::from(a.qs[b][e])).sum();
                    blocks = (ints as f32).mul_add(w.d[b].to_f32() * a.d[b] as f32, blocks);
                }
                assert_eq!(scalar::block_dot(&w, &a).to_bits(), blocks.to_bits());
                let want = if repacked { blocks } else { scalar::lane_dot(&w, &a) };
                assert_eq!(got.to_bits(), want.to_bits(), "{out} rows: [{r}, {c}]");
            }
        }
    }
}

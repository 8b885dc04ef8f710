//! llama.cpp's CPU arithmetic (ggml built for AVX2), which quantized GGUF models follow on the
//! CPU: with it herd computes what llama.cpp computes for the same file, to the bit (checked on the
//! test model's Q4_1/Q8_0 file; formats herd leaves to candle's kernels sum in candle's order),
//! rather than numbers that differ by rounding. Rounding differences matter more than their size suggests:
//! activations are quantized to 8 bits before each matmul, so a last-bit difference can move a
//! value to the next quantization step, and after 30 layers the top token can change where the
//! two are close. Each function names the ggml routine whose arithmetic it repeats; the
//! quantized matmuls' order is [`super::quant::scalar::lane_dot`].

use half::f16;

use super::kv::PagedRows;
use super::quant::scalar::hsum8;

/// `ggml_compute_forward_rms_norm_f32` fused with the weight multiply, over rows of `w.len()`:
/// squares summed in f64, then `x * scale * w` in f32.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / row.len() as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
            *o = v * scale * w;
        }
    }
    out
}

/// `ggml_rope_cache_init` for position `p`: (cos, sin) of each of `dims / 2` pairs, the angle
/// multiplied by `base^(-2/dims)` from pair to pair in f32 (then by `freq_scale`, for linear
/// scaling).
pub fn rope_cache(p: usize, dims: usize, base: f32, freq_scale: f32) -> impl Iterator<Item = (f32, f32)> {
    let step = base.powf(-2.0 / dims as f32);
    (0..dims / 2).scan(p as f32, move |theta, _| {
        let t = freq_scale * *theta;
        *theta *= step;
        Some((t.cos(), t.sin()))
    })
}

/// ggml's `rotate_pairs` on one pair, as GCC compiles it (each first product fused).
#[inline(always)]
pub fn rotate(x0: f32, x1: f32, cos: f32, sin: f32) -> (f32, f32) {
    (x0.mul_add(cos, -(x1 * sin)), x0.mul_add(sin, x1 * cos))
}

/// [`rotate`] on each adjacent pair of one head `x`, by one position's `cos` and `sin`, with the
/// CPU's fused multiply-add instruction where it has one.
pub fn rotate_head(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA.
        return unsafe { rotate_head_fma(x, cos, sin) };
    }
    rotate_pairs(x, cos, sin)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn rotate_head_fma(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    rotate_pairs(x, cos, sin)
}

#[inline(always)]
fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((pair, &c), &s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
        (pair[0], pair[1]) = rotate(pair[0], pair[1], c, s);
    }
}

/// A value as the f16 KV cache and f16 matmul inputs hold it.
#[inline(always)]
pub fn half(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds `x` to f16 values in place ([`half`] of each). `SIMD` callers must run on a CPU with
/// AVX2 and F16C.
#[inline(always)]
pub fn round_half<const SIMD: bool>(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: as documented, the caller checked that the CPU has AVX2 and F16C.
        return unsafe { round_half_f16c(x) };
    }
    x.iter_mut().for_each(|v| *v = half(*v));
}

/// [`round_half`] for callers that do not know the CPU: F16C when it has it.
pub fn round_half_any(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
        return round_half::<true>(x);
    }
    round_half::<false>(x)
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn round_half_f16c(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: 8 floats; the accesses are unaligned.
        unsafe {
            let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_loadu_ps(c.as_ptr()));
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    chunks.into_remainder().iter_mut().for_each(|v| *v = half(*v));
}

/// The dot product of an f16 matmul (llamafile's `tinyBLAS` with 8 lanes): lane `l` adds the
/// products of elements `l, l + 8, ..` with fused multiply-adds, then [`hsum8`]. `a.len()` is
/// a multiple of 8. `SIMD` callers must run on a CPU with AVX2, FMA and F16C (same bits).
#[inline(always)]
pub fn dot8<const SIMD: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: as documented, the caller checked that the CPU has AVX2 and FMA.
        return unsafe { dot8_avx2(a, b) };
    }
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let (x, y): (&[f32; 8], &[f32; 8]) = (x.try_into().expect("8 lanes"), y.try_into().expect("8 lanes"));
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    hsum8(acc)
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot8_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        // SAFETY: 8 floats each; the loads are unaligned.
        let (x, y) = unsafe { (_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr())) };
        acc = _mm256_fmadd_ps(x, y, acc);
    }
    super::quant::avx2::hsum8(acc)
}

/// `ggml_v_expf` (AVX2): exp with a degree-5 polynomial after range reduction, within 1.5 ulp.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(f32::from_bits(0x35bf_be8e), (-n).mul_add(f32::from_bits(0x3f31_7200), x));
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17))
        .mul_add(u, f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)))
        .mul_add(u, f32::from_bits(0x3f7f_fff6) * b);
    if n.abs() <= 126.0 {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    if n.abs() > 192.0 {
        return s1 * s1;
    }
    let s2 = f32::from_bits(e.wrapping_sub(g));
    s2.mul_add(j, s2) * s1
}

/// `ggml_vec_swiglu_f32` (AVX2): `x / (1 + exp(-x)) * g`.
#[inline(always)]
pub fn swiglu(x: f32, g: f32) -> f32 {
    x / (1.0 + expf(0.0 - x)) * g
}

/// [`swiglu`] over slices, with the CPU's fused multiply-add instruction where it has one
/// (`mul_add` is a slow library call otherwise).
pub fn swiglu_slice(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { swiglu_fma(g, u, out) };
    }
    swiglu_each(g, u, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn swiglu_fma(g: &[f32], u: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = g.len().min(u.len()).min(out.len()) / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n, within all three slices; the accesses are unaligned.
        unsafe {
            let x = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = expf8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let silu = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(silu, _mm256_loadu_ps(u.as_ptr().add(i))));
        }
    }
    swiglu_each(&g[n..], &u[n..], &mut out[n..])
}

/// [`expf`] on eight lanes at once, as ggml writes it (the same value in every lane).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn expf8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    let r = c(0x4b40_0000);
    let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), r);
    let n = _mm256_sub_ps(z, r);
    let b = _mm256_fnmadd_ps(n, c(0x35bf_be8e), _mm256_fnmadd_ps(n, c(0x3f31_7200), x));
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(_mm256_set1_ps(1.0))));
    let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let far = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(abs, _mm256_set1_ps(126.0)));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
            u,
            _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
        ),
        u,
        _mm256_mul_ps(c(0x3f7f_fff6), b),
    );
    let near = _mm256_fmadd_ps(j, k, k);
    if _mm256_movemask_ps(_mm256_castsi256_ps(far)) == 0 {
        return near;
    }
    let g = _mm256_and_si256(
        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
        _mm256_set1_epi32(0x8200_0000u32 as i32),
    );
    let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
    let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    let huge = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(abs, _mm256_set1_ps(192.0)));
    let mid = _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1);
    let inner =
        _mm256_or_ps(_mm256_and_ps(_mm256_castsi256_ps(far), mid), _mm256_andnot_ps(_mm256_castsi256_ps(far), near));
    _mm256_or_ps(
        _mm256_and_ps(_mm256_castsi256_ps(huge), _mm256_mul_ps(s1, s1)),
        _mm256_andnot_ps(_mm256_castsi256_ps(huge), inner),
    )
}

#[inline(always)]
fn swiglu_each(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(g).zip(u) {
        *o = swiglu(x, y);
    }
}

/// Scratch space for [`attend`], reused from call to call.
#[derive(Debug, Default)]
pub struct Scratch {
    scores: Vec<f32>,
    lanes: Vec<f32>,
}

/// Attention for one query head over `seen` cached positions, as llama.cpp's non-flash path
/// computes it (`kq` matmul, `ggml_compute_forward_soft_max_f32`, `kqv` matmul): `q`, `k`, `v`
/// already f16 values, the keys and values read through a block table; scores scaled, exponentiated with [`expf`], summed eight positions at a
/// time into f64, normalized, rounded to f16, then the values summed in eight lanes by position.
/// `out` receives the head's `hd` values. Inlined into callers compiled with FMA, so that
/// `mul_add` is one instruction; plain loops, as iterator adapters may be compiled apart.
/// `SIMD` as for [`dot8`].
#[inline(always)]
pub fn attend<const SIMD: bool>(
    q: &[f32],
    k: PagedRows<'_>,
    v: PagedRows<'_>,
    seen: usize,
    scale: f32,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let hd = q.len();
    let Scratch { scores, lanes } = scratch;
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    // Block by block: plain loops over contiguous rows, which compile tighter than one
    // flattened iterator.
    for run in k.runs(seen) {
        for kj in run.chunks_exact(hd) {
            let s = dot8::<SIMD>(q, kj) * scale;
            max = max.max(s);
            scores.push(s);
        }
    }
    let mut sum = 0f64;
    for c in scores.chunks_mut(8) {
        let mut group = [0f32; 8];
        for (g, s) in group.iter_mut().zip(c.iter_mut()) {
            *s = expf(*s - max);
            *g = *s;
        }
        sum += f64::from(hsum8(group));
    }
    let inv = (1.0 / sum) as f32;
    for s in scores.iter_mut() {
        *s *= inv;
    }
    round_half::<SIMD>(scores);
    // Lane l takes positions l, l + 8, ..; a zero probability leaves a lane as it is.
    lanes.clear();
    lanes.resize(8 * hd, 0.0);
    let mut j = 0;
    for run in v.runs(seen) {
        for vj in run.chunks_exact(hd) {
            let p = scores[j];
            if p != 0.0 {
                for (a, &x) in lanes[(j % 8) * hd..][..hd].iter_mut().zip(vj) {
                    *a = p.mul_add(x, *a);
                }
            }
            j += 1;
        }
    }
    for (d, o) in out.iter_mut().enumerate() {
        *o = hsum8(std::array::from_fn(|l| lanes[l * hd + d]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_within_two_ulp_of_exp() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.0437;
            let (a, b) = (expf(x), x.exp());
            let ulp = (b.to_bits() as i64 - a.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}): {a} vs {b}");
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(0.0), 1.0);
        assert!(expf(100.0).is_infinite());
    }

    #[test]
    fn swiglu_gives_the_same_bits_on_every_path() {
        // Values that reach every range of the exponential, and a tail shorter than 8.
        let g: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.47).collect();
        let u: Vec<f32> = (0..1003).map(|i| 1.0 + i as f32 * 1e-3).collect();
        let mut fast = vec![0f32; g.len()];
        swiglu_slice(&g, &u, &mut fast);
        let mut each = vec![0f32; g.len()];
        swiglu_each(&g, &u, &mut each);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast), bits(&each));
    }

    #[test]
    fn rms_norm_scales_each_row_to_unit_mean_square() {
        let x = [3.0, 4.0, -3.0, -4.0, 1.0, 1.0, 1.0, 1.0];
        let y = rms_norm(&x, &[1.0, 2.0, 1.0, 2.0], 0.0);
        let r = 1.0 / 12.5f32.sqrt();
        assert_eq!(y[..4], [3.0 * r, 4.0 * r * 2.0, -3.0 * r, -4.0 * r * 2.0]);
        assert_eq!(y[4..], [1.0, 2.0, 1.0, 2.0]);
    }

    #[test]
    fn attention_weights_positions_by_softmax() {
        // Two positions, the second scoring ln(3) higher: weights 1/4 and 3/4.
        let q = [1.0f32; 8];
        let mut k = vec![0f32; 16];
        k[8..].fill(3f32.ln() / 8.0);
        let v: Vec<f32> = (0..16).map(|i| if i < 8 { 4.0 } else { 8.0 }).collect();
        let mut out = [0f32; 8];
        let rows = |data| PagedRows { data, table: &[0], head: 0, heads: 1, block_size: 2, dim: 8 };
        attend::<false>(&q, rows(&k), rows(&v), 2, 1.0, &mut Scratch::default(), &mut out);
        for o in out {
            assert!((o - 7.0).abs() < 1e-2, "{o}");
        }
    }
}

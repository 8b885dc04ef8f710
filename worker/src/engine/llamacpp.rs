//! llama.cpp's CPU arithmetic (ggml built for AVX2), which quantized GGUF models follow on the
//! CPU: with it herd computes what llama.cpp computes for the same file, to the bit, rather than
//! numbers that differ by rounding. Rounding differences matter more than their size suggests:
//! activations are quantized to 8 bits before each matmul, so a last-bit difference can move a
//! value to the next quantization step, and after 30 layers the top token can change where the
//! two are close. Each function names the ggml routine whose arithmetic it repeats; the
//! quantized matmuls' order is [`super::quant::scalar::lane_dot`].

use half::f16;

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
#[inline]
pub fn rotate(x0: f32, x1: f32, cos: f32, sin: f32) -> (f32, f32) {
    (x0.mul_add(cos, -(x1 * sin)), x0.mul_add(sin, x1 * cos))
}

/// A value as the f16 KV cache and f16 matmul inputs hold it.
#[inline(always)]
pub fn half(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// ggml's horizontal sum of eight lanes (`hsum_float_8`).
#[inline(always)]
pub fn hsum8(a: [f32; 8]) -> f32 {
    super::quant::scalar::hsum8(a)
}

/// The dot product of an f16 matmul (llamafile's `tinyBLAS` with 8 lanes): lane `l` adds the
/// products of elements `l, l + 8, ..` with fused multiply-adds, then [`hsum8`]. `a.len()` is
/// a multiple of 8.
#[inline(always)]
pub fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let (x, y): (&[f32; 8], &[f32; 8]) = (x.try_into().expect("8 lanes"), y.try_into().expect("8 lanes"));
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    hsum8(acc)
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
    if is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA.
        return unsafe { swiglu_fma(g, u, out) };
    }
    swiglu_each(g, u, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn swiglu_fma(g: &[f32], u: &[f32], out: &mut [f32]) {
    swiglu_each(g, u, out)
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
/// already f16 values; scores scaled, exponentiated with [`expf`], summed eight positions at a
/// time into f64, normalized, rounded to f16, then the values summed in eight lanes by position.
/// `out` receives the head's `hd` values. Inlined into callers compiled with FMA, so that
/// `mul_add` is one instruction; plain loops, as iterator adapters may be compiled apart.
#[inline(always)]
pub fn attend(q: &[f32], k: &[f32], v: &[f32], seen: usize, scale: f32, scratch: &mut Scratch, out: &mut [f32]) {
    let hd = q.len();
    let Scratch { scores, lanes } = scratch;
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for kj in k[..seen * hd].chunks_exact(hd) {
        let s = dot8(q, kj) * scale;
        max = max.max(s);
        scores.push(s);
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
    // Lane l takes positions l, l + 8, ..; a zero probability leaves a lane as it is.
    lanes.clear();
    lanes.resize(8 * hd, 0.0);
    for (j, (&e, vj)) in scores.iter().zip(v.chunks_exact(hd)).enumerate() {
        let p = half(e * inv);
        if p != 0.0 {
            for (a, &x) in lanes[(j % 8) * hd..][..hd].iter_mut().zip(vj) {
                *a = p.mul_add(x, *a);
            }
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
        attend(&q, &k, &v, 2, 1.0, &mut Scratch::default(), &mut out);
        for o in out {
            assert!((o - 7.0).abs() < 1e-2, "{o}");
        }
    }
}

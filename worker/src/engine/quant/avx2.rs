//! AVX2 kernels (with FMA and F16C), chosen at run time when the CPU has them.
//!
//! Per block: 32 unsigned-by-signed byte products summed in pairs (`maddubs`), then in fours
//! (`madd`), as llama.cpp does. Four blocks' lane sums are reduced together and scaled in f64,
//! where each block's value is exact, so the result equals the portable kernel's up to the
//! order of exact f64 additions.

use std::arch::x86_64::*;

use super::scalar::{ActRow, Q4_0, Q4_1, Q8_0, QK, Quants, WeightRow, scales};

/// Whether this CPU runs the kernels of this module.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// A weight format with an AVX2 integer dot product, in two halves so that a block's weights
/// are unpacked once for several activation rows.
pub trait Avx2Quants: Quants {
    /// The block's 32 weights as bytes, ready for [`Avx2Quants::mul`].
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn load(&self) -> __m256i;
    /// Eight i32 lanes that sum to the integer dot product of loaded weights and activations.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn mul(w: __m256i, x: __m256i) -> __m256i;
}

#[inline]
#[target_feature(enable = "avx2")]
fn load32(x: &[i8; QK]) -> __m256i {
    // SAFETY: 32 bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(x.as_ptr().cast()) }
}

/// 32 nibbles as bytes 0..15: low nibbles first, then high nibbles (GGUF's element order).
#[inline]
#[target_feature(enable = "avx2")]
fn nibbles(qs: &[u8; QK / 2]) -> __m256i {
    // SAFETY: 16 bytes; the load is unaligned.
    let lo = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(lo), lo);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// Signed bytes times signed bytes, summed in groups of four.
#[inline]
#[target_feature(enable = "avx2")]
fn signed_dot(a: __m256i, b: __m256i) -> __m256i {
    // maddubs takes unsigned left operands: move a's sign onto b. No pair sum saturates, as
    // |a| <= 128 and |b| <= 127 (activations never hold -128).
    let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

impl Avx2Quants for Q4_0 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(&self) -> __m256i {
        _mm256_sub_epi8(nibbles(&self.0), _mm256_set1_epi8(8))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mul(w: __m256i, x: __m256i) -> __m256i {
        signed_dot(w, x)
    }
}

impl Avx2Quants for Q4_1 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(&self) -> __m256i {
        nibbles(&self.0)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mul(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }
}

impl Avx2Quants for Q8_0 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: 32 bytes; the load is unaligned.
        unsafe { _mm256_loadu_si256(self.0.as_ptr().cast()) }
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mul(w: __m256i, x: __m256i) -> __m256i {
        signed_dot(w, x)
    }
}

/// Four consecutive f16 values widened to f64.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn f16x4(v: &[half::f16]) -> __m256d {
    assert!(v.len() >= 4);
    // SAFETY: at least 8 bytes; the load is unaligned.
    _mm256_cvtps_pd(_mm_cvtph_ps(unsafe { _mm_loadl_epi64(v.as_ptr().cast()) }))
}

/// Four consecutive f64 values.
#[inline]
#[target_feature(enable = "avx2")]
fn f64x4(v: &[f64]) -> __m256d {
    assert!(v.len() >= 4);
    // SAFETY: at least 32 bytes; the load is unaligned.
    unsafe { _mm256_loadu_pd(v.as_ptr()) }
}

/// The sums of four blocks' eight lanes each.
#[inline]
#[target_feature(enable = "avx2")]
fn sum4(p0: __m256i, p1: __m256i, p2: __m256i, p3: __m256i) -> __m128i {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
}

/// The sum of eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum(v: __m256i) -> i32 {
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)))
}

/// Adds four blocks' values to `acc`: weights `wb` (loaded) with scales `dw` and offsets `mw`,
/// activations `xq` with scales `xd` and sums `xs` (four each).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group<Q: Avx2Quants>(
    acc: &mut __m256d,
    wb: &[__m256i; 4],
    (dw, mw): (__m256d, __m256d),
    xq: [&[i8; QK]; 4],
    xd: &[f64],
    xs: &[f64],
) {
    // SAFETY: AVX2 is enabled in this function.
    let ints = unsafe {
        sum4(
            Q::mul(wb[0], load32(xq[0])),
            Q::mul(wb[1], load32(xq[1])),
            Q::mul(wb[2], load32(xq[2])),
            Q::mul(wb[3], load32(xq[3])),
        )
    };
    // Products of two f16 values and a small integer are exact in f64.
    *acc = _mm256_fmadd_pd(_mm256_mul_pd(dw, f64x4(xd)), _mm256_cvtepi32_pd(ints), *acc);
    if Q::HAS_MIN {
        *acc = _mm256_fmadd_pd(mw, f64x4(xs), *acc);
    }
}

/// A weight row's dot products with `R` activation rows, each as [`super::scalar::dot`]
/// computes it (up to the order of exact f64 additions). Every row's result is the same
/// whatever `R` is: the weights are only unpacked once for all of them.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot<Q: Avx2Quants, const R: usize>(w: &WeightRow<'_, Q>, xs: [&ActRow<'_>; R]) -> [f64; R] {
    let n = w.qs.len();
    assert!(w.d.len() == n && (!Q::HAS_MIN || w.m.len() == n));
    assert!(xs.iter().all(|x| x.qs.len() == n && x.d.len() == n && (!Q::HAS_MIN || x.s.len() == n)));
    let mut acc = [_mm256_setzero_pd(); R];
    let zeros = [0i8; QK];
    let mut i = 0;
    while i < n {
        let have = (n - i).min(4);
        // SAFETY: AVX2 is enabled in this function.
        let wb: [__m256i; 4] =
            std::array::from_fn(|k| if k < have { unsafe { w.qs[i + k].load() } } else { _mm256_setzero_si256() });
        if have == 4 {
            let scales = (f16x4(&w.d[i..]), if Q::HAS_MIN { f16x4(&w.m[i..]) } else { _mm256_setzero_pd() });
            for (acc, x) in acc.iter_mut().zip(xs) {
                let xq = [&x.qs[i], &x.qs[i + 1], &x.qs[i + 2], &x.qs[i + 3]];
                group::<Q>(acc, &wb, scales, xq, &x.d[i..], if Q::HAS_MIN { &x.s[i..] } else { &[0.0; 4] });
            }
        } else {
            // The last, partial group: missing blocks have zero weights and scales.
            let pad = |v: &[half::f16]| -> [half::f16; 4] {
                std::array::from_fn(|k| v.get(i + k).copied().unwrap_or_default())
            };
            let scales = (f16x4(&pad(w.d)), if Q::HAS_MIN { f16x4(&pad(w.m)) } else { _mm256_setzero_pd() });
            for (acc, x) in acc.iter_mut().zip(xs) {
                let xq = std::array::from_fn(|k| x.qs.get(i + k).unwrap_or(&zeros));
                let pad = |v: &[f64]| -> [f64; 4] { std::array::from_fn(|k| v.get(i + k).copied().unwrap_or(0.0)) };
                group::<Q>(acc, &wb, scales, xq, &pad(x.d), &pad(x.s));
            }
        }
        i += 4;
    }
    acc.map(|acc| {
        let pair = _mm_add_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd::<1>(acc));
        _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)))
    })
}

/// Quantizes `x` into blocks exactly as [`super::scalar::quantize`] does.
///
/// # Safety
/// The CPU must support AVX2 ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize(x: &[f32], qs: &mut [[i8; QK]], d: &mut [f64], s: &mut [f64]) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (b, x) in x.chunks_exact(QK).enumerate() {
        // SAFETY: `x` holds 32 floats; the loads are unaligned.
        let v: [__m256; 4] = std::array::from_fn(|k| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * k)) });
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
        );
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let id = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        // Round half to even (the default rounding mode), as the portable kernel does.
        let ints: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                v[k], id,
            )))
        });
        let total = hsum(_mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3])));
        // Pack 32 i32 to 32 i8; packs work within 128-bit halves, so restore the order after.
        let lo = _mm256_packs_epi32(ints[0], ints[1]);
        let hi = _mm256_packs_epi32(ints[2], ints[3]);
        let bytes = _mm256_packs_epi16(lo, hi);
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `qs` is 32 bytes; the store is unaligned.
        unsafe { _mm256_storeu_si256(qs[b].as_mut_ptr().cast(), ordered) };
        (d[b], s[b]) = scales(amax, total);
    }
}

/// llama.cpp's horizontal sum of eight f32 lanes (`hsum_float_8`): the halves added, then
/// pairs, then the last two.
#[inline]
#[target_feature(enable = "avx2")]
pub fn hsum8(v: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
}

/// A weight row's dot products with `R` activation rows, each summed in llama.cpp's order
/// (see [`super::scalar::lane_dot`], to whose results these are equal). The weights are
/// unpacked once for all rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn lane_dot<Q: Avx2Quants, const R: usize>(w: &WeightRow<'_, Q>, xs: [&ActRow<'_>; R]) -> [f32; R] {
    let n = w.qs.len();
    assert!(w.d.len() == n && (!Q::HAS_MIN || w.m.len() == n));
    assert!(xs.iter().all(|x| x.qs.len() == n && x.d.len() == n && (!Q::HAS_MIN || x.s.len() == n)));
    let mut acc = [_mm256_setzero_ps(); R];
    let mut offsets = [0f32; R];
    for b in 0..n {
        // SAFETY: AVX2 is enabled in this function.
        let wq = unsafe { w.qs[b].load() };
        let dw = w.d[b].to_f32();
        let mw = if Q::HAS_MIN { w.m[b].to_f32() } else { 0.0 };
        for k in 0..R {
            let x = xs[k];
            // SAFETY: as above.
            let lanes = _mm256_cvtepi32_ps(unsafe { Q::mul(wq, load32(&x.qs[b])) });
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d[b] as f32), lanes, acc[k]);
            if Q::HAS_MIN {
                offsets[k] = mw.mul_add(x.s[b] as f32, offsets[k]);
            }
        }
    }
    std::array::from_fn(|k| hsum8(acc[k]) + offsets[k])
}

/// A weight row's dot products with `R` activation rows, each summed per block as
/// [`super::scalar::block_dot`] sums it (to whose results these are equal).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn block_dot<Q: Avx2Quants, const R: usize>(w: &WeightRow<'_, Q>, xs: [&ActRow<'_>; R]) -> [f32; R] {
    let n = w.qs.len();
    assert!(w.d.len() == n && !Q::HAS_MIN && xs.iter().all(|x| x.qs.len() == n && x.d.len() == n));
    let mut acc = [0f32; R];
    for b in 0..n {
        // SAFETY: AVX2 is enabled in this function.
        let wq = unsafe { w.qs[b].load() };
        let dw = w.d[b].to_f32();
        for k in 0..R {
            // SAFETY: as above.
            let lanes = unsafe { Q::mul(wq, load32(&xs[k].qs[b])) };
            let pair = _mm_add_epi32(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256::<1>(lanes));
            let pair = _mm_add_epi32(pair, _mm_unpackhi_epi64(pair, pair));
            let ints = _mm_cvtsi128_si32(_mm_add_epi32(pair, _mm_shuffle_epi32::<1>(pair)));
            acc[k] = (ints as f32).mul_add(dw * xs[k].d[b] as f32, acc[k]);
        }
    }
    acc
}

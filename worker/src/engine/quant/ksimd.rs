//! AVX2 and AVX-512 VNNI kernels for the K-quant formats, chosen at run time.
//!
//! Both compute a super-block's [`super::kquants::pairs`] exactly (integers), the weights
//! unpacked once for several activation rows, and leave the few f32 operations per super-block
//! to [`KQuants::accumulate`], so that every kernel gives the portable kernel's bits.

use std::arch::x86_64::*;

use super::kquants::{Acc, KQuants, Q4K, Q5K, Q6K, Q8K, QK_K};

/// A K-quant format with SIMD unpacking.
pub trait KSimd: KQuants {
    /// The super-block's stored quants as bytes, 32 consecutive elements per vector.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn quants(&self) -> [__m256i; 8];
    /// Chunk `c`'s scales as 16-bit lanes for `madd`: lane `k` scales elements `2k, 2k + 1`.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn scales_avx2(&self, c: usize) -> __m256i;
    /// Chunks `2j, 2j + 1`'s scales, lane `k` scaling elements `4k..4k + 4`, each a 16-bit value
    /// in the low half of its 32-bit lane (the high half zero), for `vpdpwssd`.
    ///
    /// # Safety
    /// The CPU must support AVX-512.
    unsafe fn scales_vnni(&self, j: usize) -> __m512i;
}

/// 128 bytes of nibbles, 32 per 64 elements, as bytes in element order.
#[inline]
#[target_feature(enable = "avx2")]
fn nibbles128(qs: &[u8; 128]) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(0x0f);
    // SAFETY: 32 bytes at 32 * (c / 2) of 128; unaligned loads.
    let v: [__m256i; 4] = std::array::from_fn(|j| unsafe { _mm256_loadu_si256(qs.as_ptr().add(32 * j).cast()) });
    std::array::from_fn(|c| {
        let v = v[c / 2];
        if c % 2 == 0 { _mm256_and_si256(v, m4) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4) }
    })
}

/// Picks bytes of `v` by a constant pattern: `mask[i]` is the index of output byte `i`.
#[inline]
#[target_feature(enable = "avx2")]
fn pick(v: __m128i, mask: [u8; 16]) -> __m128i {
    // SAFETY: 16 bytes; unaligned load.
    _mm_shuffle_epi8(v, unsafe { _mm_loadu_si128(mask.as_ptr().cast()) })
}

/// Eight scales loaded into the low bytes of a vector.
#[inline]
#[target_feature(enable = "avx2")]
fn load8(sc: &[u8; 8]) -> __m128i {
    _mm_set_epi64x(0, i64::from_le_bytes(*sc))
}

/// Q4_K's and Q5_K's lanes for chunks `2j, 2j + 1`: eight of sub-block `2j`'s scale, eight of `2j + 1`'s.
#[inline]
#[target_feature(enable = "avx2,avx512f")]
fn pair_scales(sc: &[u8; 8], j: usize) -> __m512i {
    let (a, b) = (2 * j as u8, 2 * j as u8 + 1);
    _mm512_cvtepu8_epi32(pick(load8(sc), [a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b]))
}

impl KSimd for Q4K {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quants(&self) -> [__m256i; 8] {
        nibbles128(&self.qs)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scales_avx2(&self, c: usize) -> __m256i {
        _mm256_set1_epi16(i16::from(self.sc[c]))
    }
    #[inline]
    #[target_feature(enable = "avx2,avx512f")]
    unsafe fn scales_vnni(&self, j: usize) -> __m512i {
        pair_scales(&self.sc, j)
    }
}

impl KSimd for Q5K {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quants(&self) -> [__m256i; 8] {
        let low = nibbles128(&self.qs);
        // SAFETY: 32 bytes of qh.
        let qh = unsafe { _mm256_loadu_si256(self.qh.as_ptr().cast()) };
        let one = _mm256_set1_epi8(1);
        std::array::from_fn(|c| {
            // Bit c of each byte, moved to bit 4.
            let bit = _mm256_and_si256(_mm256_srlv_epi32(qh, _mm256_set1_epi32(c as i32)), one);
            _mm256_or_si256(low[c], _mm256_slli_epi16::<4>(bit))
        })
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scales_avx2(&self, c: usize) -> __m256i {
        _mm256_set1_epi16(i16::from(self.sc[c]))
    }
    #[inline]
    #[target_feature(enable = "avx2,avx512f")]
    unsafe fn scales_vnni(&self, j: usize) -> __m512i {
        pair_scales(&self.sc, j)
    }
}

impl KSimd for Q6K {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quants(&self) -> [__m256i; 8] {
        let (m4, m3) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3));
        let load = |p: &[u8]| {
            // SAFETY: callers pass 32 bytes; unaligned load.
            unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
        };
        std::array::from_fn(|c| {
            // Chunk c: half n = c / 4, quarter q = c % 4 (as in `Q6K::quant`).
            let (n, q) = (c / 4, c % 4);
            let l = load(&self.ql[64 * n + 32 * (q % 2)..]);
            let low = if q < 2 { _mm256_and_si256(l, m4) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(l), m4) };
            let h = _mm256_srlv_epi32(load(&self.qh[32 * n..]), _mm256_set1_epi32(2 * q as i32));
            _mm256_or_si256(low, _mm256_slli_epi16::<4>(_mm256_and_si256(h, m3)))
        })
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scales_avx2(&self, c: usize) -> __m256i {
        // SAFETY: 16 scales; unaligned load.
        let sc = unsafe { _mm_loadu_si128(self.sc.as_ptr().cast()) };
        let (a, b) = (2 * c as u8, 2 * c as u8 + 1);
        _mm256_cvtepi8_epi16(pick(sc, [a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b]))
    }
    #[inline]
    #[target_feature(enable = "avx2,avx512f")]
    unsafe fn scales_vnni(&self, j: usize) -> __m512i {
        // SAFETY: 16 scales; unaligned load.
        let sc = unsafe { _mm_loadu_si128(self.sc.as_ptr().cast()) };
        let k = |i: usize| (4 * j + i) as u8;
        let (a, b, c, d) = (k(0), k(1), k(2), k(3));
        let signed = _mm256_cvtepi8_epi16(pick(sc, [a, a, a, a, b, b, b, b, c, c, c, c, d, d, d, d]));
        _mm512_cvtepu16_epi32(signed)
    }
}

/// The totals of four vectors of eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn totals(v: [__m256i; 4]) -> [i32; 4] {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
    let mut out = [0i32; 4];
    // SAFETY: 4 i32; unaligned store.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), t) };
    out
}

/// A weight row's dot products with activation rows `xs`, each summed as
/// [`super::kquants::lane_dot`] sums it.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`super::avx2::available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn lane_dots_avx2<K: KSimd, const R: usize>(w: &[K], xs: [&[Q8K]; R]) -> [f32; R] {
    let mut acc = [Acc::default(); R];
    for (b, w) in w.iter().enumerate() {
        // SAFETY: the caller's CPU has AVX2.
        let q = unsafe { w.quants() };
        let scales: [__m256i; 8] = std::array::from_fn(|c| unsafe { w.scales_avx2(c) });
        for (acc, x) in acc.iter_mut().zip(xs) {
            let x = &x[b];
            let lanes: [__m256i; 8] = std::array::from_fn(|c| {
                // SAFETY: 32 bytes at 32c of 256; unaligned load.
                let v = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(32 * c).cast()) };
                // No pair of products saturates: quants are below 64 and |x| <= 127.
                _mm256_madd_epi16(scales[c], _mm256_maddubs_epi16(q[c], v))
            });
            let pairs = totals(std::array::from_fn(|p| _mm256_add_epi32(lanes[2 * p], lanes[2 * p + 1])));
            w.accumulate(x, acc, pairs);
        }
    }
    acc.map(|a| K::finish(&a))
}

/// Like [`lane_dots_avx2`], with AVX-512 VNNI taking 64 elements per instruction.
///
/// # Safety
/// The CPU must support AVX-512 VNNI ([`super::vnni::available`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn lane_dots_vnni<K: KSimd, const R: usize>(w: &[K], xs: [&[Q8K]; R]) -> [f32; R] {
    let mut acc = [Acc::default(); R];
    for (b, w) in w.iter().enumerate() {
        // SAFETY: the caller's CPU has AVX2 and AVX-512.
        let q = unsafe { w.quants() };
        let u: [__m512i; 4] =
            std::array::from_fn(|j| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q[2 * j]), q[2 * j + 1]));
        let scales: [__m512i; 4] = std::array::from_fn(|j| unsafe { w.scales_vnni(j) });
        for (acc, x) in acc.iter_mut().zip(xs) {
            let x = &x[b];
            let sums: [__m256i; 4] = std::array::from_fn(|j| {
                // SAFETY: 64 bytes at 64j of 256; unaligned load.
                let v = unsafe { _mm512_loadu_si512(x.qs.as_ptr().add(64 * j).cast()) };
                // Sums of four products fit 16 bits (below 64 * 127 * 4), so vpdpwssd scales them exactly.
                let fours = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[j], v);
                let scaled = _mm512_dpwssd_epi32(_mm512_setzero_si512(), fours, scales[j]);
                _mm256_add_epi32(_mm512_castsi512_si256(scaled), _mm512_extracti64x4_epi64::<1>(scaled))
            });
            w.accumulate(x, acc, totals(sums));
        }
    }
    acc.map(|a| K::finish(&a))
}

/// [`super::kquants::quantize_q8k`] on AVX2, to the same bits: the rounding is the vector
/// conversion's (half to even, the default mode), the products are the same f32 products.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn quantize_q8k(x: &[f32], out: &mut [Q8K]) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (x, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        // SAFETY (loads): 8 floats at 8i of 256; unaligned.
        let v: [__m256; QK_K / 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
        // NaN lanes lose against the running maximum, as the portable loop skips them.
        let amax = v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(_mm256_and_ps(v, abs_mask), m));
        let amax = {
            let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps::<1>(amax));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
        };
        if amax == 0.0 {
            *y = Q8K::ZERO;
            continue;
        }
        // The first value of that magnitude, with its sign.
        let max = x[x.iter().position(|v| v.abs() == amax).expect("amax is one of the values")];
        let iscale = -127.0 / max;
        let scale = _mm256_set1_ps(iscale);
        let cap = _mm256_set1_epi32(127);
        for (c, chunk) in v.chunks_exact(4).enumerate() {
            let q: [__m256i; 4] = std::array::from_fn(|i| {
                let v = _mm256_mul_ps(chunk[i], scale);
                // NaN quantizes to 0, as in the portable code and ggml's `nearest_int`.
                let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
                _mm256_min_epi32(_mm256_cvtps_epi32(v), cap)
            });
            // Packing interleaves 128-bit lanes; the permute puts the 32 bytes back in order.
            let words = [_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])];
            let bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(words[0], words[1]),
                _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
            );
            // SAFETY: 32 bytes at 32c of 256; unaligned store.
            unsafe { _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * c).cast(), bytes) };
        }
        for (s, q) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| i16::from(v)).sum();
        }
        y.d = 1.0 / iscale;
    }
}

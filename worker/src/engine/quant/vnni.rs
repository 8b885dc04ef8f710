//! AVX-512 VNNI kernels, chosen at run time on CPUs that have them (Intel since Cascade Lake,
//! AMD since Zen 4).
//!
//! `vpdpbusd` multiplies 4 unsigned weight bytes by 4 signed activation bytes and adds the sum
//! to one i32 lane, 8 lanes at once. Summing a block per lane means no horizontal reduction per
//! block, so blocks are interleaved at load: in a group of 8 blocks, lane `j` of step `s` holds
//! elements `4s..4s + 4` of block `j`, and after 8 steps each lane holds one block's integer dot
//! product, scaled per lane in f64. A row's last `n % 8` blocks form groups of 4, 2 and 1
//! blocks, where each block spreads over 2, 4 or 8 lanes: every step does useful work.
//!
//! Each lane's value is exact in f64 (as in [`super::scalar`]), so results equal the portable
//! kernel's up to the order of exact f64 additions, and a row's result never depends on how many
//! activation rows share the weights' unpacking.

use std::arch::x86_64::*;

use half::f16;

use super::scalar::{ActRows, Q4_0, Q4_1, Q8_0, QK, Quants, WeightRows, nibble};

/// Whether this CPU runs the kernels of this module.
pub fn available() -> bool {
    super::avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// i32 lanes of a step: one 256-bit vector.
const LANES: usize = 8;
/// Elements a lane takes from its block per step.
const CHUNK: usize = 4;
/// Bytes of a step.
const STEP: usize = LANES * CHUNK;

/// The groups a row of `n` blocks is cut into, as (first block, blocks): groups of 8, then one
/// each of 4, 2 and 1 as the remainder needs. A group of `p` blocks takes `p` steps.
fn groups(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = n / LANES * LANES;
    let tail = [4, 2, 1].into_iter().filter(move |p| (n % LANES) & p != 0).scan(full, |at, p| {
        let first = *at;
        *at += p;
        Some((first, p))
    });
    (0..full).step_by(LANES).map(|b| (b, LANES)).chain(tail)
}

/// The block (within its group of `p`) and the element that byte `t` of lane `j` of step `s`
/// holds.
#[inline]
fn source(p: usize, s: usize, j: usize, t: usize) -> (usize, usize) {
    let (b, lane) = lane_block(p, j);
    (b, CHUNK * ((s << lanes_shift(p)) + lane) + t)
}

/// log2 of the lanes a block of a group of `p` spreads over (`p` is 1, 2, 4 or 8): shifts, not
/// divisions, since activations are interleaved at every matmul.
#[inline]
fn lanes_shift(p: usize) -> u32 {
    debug_assert!(p.is_power_of_two() && p <= LANES);
    (LANES / p).trailing_zeros()
}

/// The block (within its group of `p`) lane `j` sums, and which of the block's lanes it is.
#[inline]
fn lane_block(p: usize, j: usize) -> (usize, usize) {
    let shift = lanes_shift(p);
    (j >> shift, j & ((1 << shift) - 1))
}

/// A weight format with a VNNI kernel: quants as unsigned bytes, `OFFSET` above the signed value.
pub trait VnniQuants: Quants {
    /// What is subtracted from [`VnniQuants::unsigned`] to give the quant.
    const OFFSET: i32;
    /// Whether quants fit in a nibble (stored two per byte after interleaving).
    const NIBBLES: bool;
    /// Element `e`'s quant plus `OFFSET`.
    fn unsigned(&self, e: usize) -> u8;
}

impl VnniQuants for Q4_0 {
    const OFFSET: i32 = 8;
    const NIBBLES: bool = true;
    fn unsigned(&self, e: usize) -> u8 {
        nibble(&self.0, e)
    }
}

impl VnniQuants for Q4_1 {
    const OFFSET: i32 = 0;
    const NIBBLES: bool = true;
    fn unsigned(&self, e: usize) -> u8 {
        nibble(&self.0, e)
    }
}

impl VnniQuants for Q8_0 {
    const OFFSET: i32 = 128;
    const NIBBLES: bool = false;
    fn unsigned(&self, e: usize) -> u8 {
        (i16::from(self.0[e]) + 128) as u8
    }
}

/// Weight rows interleaved for [`dot`]: per row, the groups' quants, and per group and lane the
/// block's scale and (first lane only, so that it counts once) its offset.
#[derive(Debug, Clone)]
pub struct VnniRows<Q> {
    qs: Vec<u8>,
    d: Vec<f16>,
    m: Vec<f16>,
    per_row: usize,
    groups: usize,
    _format: std::marker::PhantomData<Q>,
}

/// One row of [`VnniRows`].
#[derive(Debug, Clone, Copy)]
pub struct VnniRow<'a> {
    qs: &'a [u8],
    d: &'a [f16],
    m: &'a [f16],
    per_row: usize,
}

impl<Q: VnniQuants> VnniRows<Q> {
    /// Bytes of quants per block.
    const BLOCK_BYTES: usize = if Q::NIBBLES { QK / 2 } else { QK };

    /// Interleaves `rows`.
    pub fn new(rows: &WeightRows<Q>) -> Self {
        let per_row = rows.per_row();
        let count = groups(per_row).count();
        let n = rows.rows();
        let mut out = Self {
            qs: super::weight_vec(n * per_row * Self::BLOCK_BYTES),
            d: super::weight_vec(n * count * LANES),
            m: super::weight_vec(if Q::HAS_MIN { n * count * LANES } else { 0 }),
            per_row,
            groups: count,
            _format: std::marker::PhantomData,
        };
        for r in 0..n {
            let row = rows.row(r);
            for (first, p) in groups(per_row) {
                // The group's unsigned quants, step after step.
                let stream: Vec<u8> = (0..p * STEP)
                    .map(|i| {
                        let (b, e) = source(p, i / STEP, i % STEP / CHUNK, i % CHUNK);
                        row.qs[first + b].unsigned(e)
                    })
                    .collect();
                if Q::NIBBLES {
                    // Byte i holds stream bytes i and i + half: steps s and s + p/2 share a
                    // vector (for one step, its two 16-byte halves do).
                    let half = stream.len() / 2;
                    out.qs.extend((0..half).map(|i| stream[i] | stream[i + half] << 4));
                } else {
                    out.qs.extend_from_slice(&stream);
                }
                for j in 0..LANES {
                    let (b, lane) = lane_block(p, j);
                    out.d.push(row.d[first + b]);
                    if Q::HAS_MIN {
                        out.m.push(if lane == 0 { row.m[first + b] } else { f16::ZERO });
                    }
                }
            }
        }
        out
    }

    /// Blocks per row.
    pub fn per_row(&self) -> usize {
        self.per_row
    }

    /// Row `r`.
    #[inline(always)]
    pub fn row(&self, r: usize) -> VnniRow<'_> {
        let lanes = self.groups * LANES;
        VnniRow {
            qs: &self.qs[r * self.per_row * Self::BLOCK_BYTES..][..self.per_row * Self::BLOCK_BYTES],
            d: &self.d[r * lanes..][..lanes],
            m: if Q::HAS_MIN { &self.m[r * lanes..][..lanes] } else { &[] },
            per_row: self.per_row,
        }
    }
}

/// Activation rows interleaved like the weights, with per group and lane the block's scale `d`,
/// its sum `s` (as in [`ActRows`]; first lane only) and the sum of the lane's quants (for the
/// weights' offset).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VnniActs {
    qs: Vec<i8>,
    d: Vec<f64>,
    s: Vec<f64>,
    sums: Vec<i32>,
    per_row: usize,
    groups: usize,
}

/// One row of [`VnniActs`].
#[derive(Debug, Clone, Copy)]
pub struct VnniAct<'a> {
    qs: &'a [i8],
    d: &'a [f64],
    s: &'a [f64],
    sums: &'a [i32],
}

impl VnniActs {
    /// Interleaves quantized activations.
    pub fn new(acts: &ActRows) -> Self {
        let per_row = acts.per_row();
        let count = groups(per_row).count();
        let n = acts.qs.len().checked_div(per_row).unwrap_or(0);
        let lanes = n * count * LANES;
        let mut out = Self {
            qs: Vec::with_capacity(acts.qs.len() * QK),
            d: Vec::with_capacity(lanes),
            s: Vec::with_capacity(lanes),
            sums: Vec::with_capacity(lanes),
            per_row,
            groups: count,
        };
        for r in 0..n {
            let row = acts.row(r);
            for (first, p) in groups(per_row) {
                let mut sums = [0i32; LANES];
                for s in 0..p {
                    for (j, sum) in sums.iter_mut().enumerate() {
                        // A lane's bytes are consecutive elements of one block.
                        let (b, e) = source(p, s, j, 0);
                        let quad: &[i8; CHUNK] = row.qs[first + b][e..][..CHUNK].try_into().expect("CHUNK bytes");
                        out.qs.extend_from_slice(quad);
                        *sum += quad.iter().map(|&q| i32::from(q)).sum::<i32>();
                    }
                }
                for (j, &sum) in sums.iter().enumerate() {
                    let (b, lane) = lane_block(p, j);
                    out.d.push(row.d[first + b]);
                    // Like the weights' offset, once per block: no 0 * inf in the other lanes.
                    out.s.push(if lane == 0 { row.s[first + b] } else { 0.0 });
                    out.sums.push(sum);
                }
            }
        }
        out
    }

    /// Row `r`.
    #[inline(always)]
    pub fn row(&self, r: usize) -> VnniAct<'_> {
        let lanes = self.groups * LANES;
        let span = r * lanes..(r + 1) * lanes;
        VnniAct {
            qs: &self.qs[r * self.per_row * QK..][..self.per_row * QK],
            d: &self.d[span.clone()],
            s: &self.s[span.clone()],
            sums: &self.sums[span],
        }
    }
}

/// The unsigned quants of a group of `P` blocks, one vector per step.
///
/// # Safety
/// The CPU must support AVX2; `qs` holds the group's bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack<Q: VnniQuants, const P: usize>(qs: &[u8]) -> [__m256i; P] {
    let mut steps = [_mm256_setzero_si256(); P];
    if !Q::NIBBLES {
        assert!(qs.len() >= P * STEP);
        for (s, v) in steps.iter_mut().enumerate() {
            // SAFETY: 32 bytes inside `qs`; the load is unaligned.
            *v = unsafe { _mm256_loadu_si256(qs.as_ptr().add(s * STEP).cast()) };
        }
        return steps;
    }
    assert!(qs.len() >= P * STEP / 2);
    let low = _mm256_set1_epi8(0x0f);
    if P == 1 {
        // SAFETY: 16 bytes inside `qs`; the load is unaligned.
        let v = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
        steps[0] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(v), v), low);
        return steps;
    }
    for s in 0..P / 2 {
        // SAFETY: 32 bytes inside `qs`; the load is unaligned.
        let v = unsafe { _mm256_loadu_si256(qs.as_ptr().add(s * STEP).cast()) };
        steps[s] = _mm256_and_si256(v, low);
        steps[s + P / 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
    }
    steps
}

/// Eight f16 values widened to f64.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn f16x8(v: &[f16]) -> __m512d {
    assert!(v.len() >= LANES);
    // SAFETY: 16 bytes; the load is unaligned.
    _mm512_cvtps_pd(_mm256_cvtph_ps(unsafe { _mm_loadu_si128(v.as_ptr().cast()) }))
}

/// Eight f64 values.
#[inline]
#[target_feature(enable = "avx512f")]
fn f64x8(v: &[f64]) -> __m512d {
    assert!(v.len() >= LANES);
    // SAFETY: 64 bytes; the load is unaligned.
    unsafe { _mm512_loadu_pd(v.as_ptr()) }
}

/// Adds group `g` (first block `first`, `P` blocks) of a weight row to `R` rows' accumulators.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn group<Q: VnniQuants, const R: usize, const P: usize>(
    acc: &mut [__m512d; R],
    w: &VnniRow<'_>,
    xs: &[&VnniAct<'_>; R],
    g: usize,
    first: usize,
) {
    let bytes = if Q::NIBBLES { QK / 2 } else { QK };
    // SAFETY: AVX2 is enabled here and the slice holds the group's bytes.
    let steps = unsafe { unpack::<Q, P>(&w.qs[first * bytes..]) };
    let lanes = g * LANES..(g + 1) * LANES;
    let dw = f16x8(&w.d[lanes.clone()]);
    let mw = if Q::HAS_MIN { f16x8(&w.m[lanes.clone()]) } else { _mm512_setzero_pd() };
    for (acc, x) in acc.iter_mut().zip(xs) {
        let xq = &x.qs[first * QK..][..P * STEP];
        // Four independent chains: `vpdpbusd` has a latency of several cycles.
        let mut chains = [_mm256_setzero_si256(); 4];
        for (s, &step) in steps.iter().enumerate() {
            // SAFETY: 32 bytes inside `xq`; the load is unaligned.
            let x = unsafe { _mm256_loadu_si256(xq.as_ptr().add(s * STEP).cast()) };
            chains[s % 4] = _mm256_dpbusd_epi32(chains[s % 4], step, x);
        }
        let mut ints = _mm256_add_epi32(_mm256_add_epi32(chains[0], chains[1]), _mm256_add_epi32(chains[2], chains[3]));
        if Q::OFFSET != 0 {
            // SAFETY: 32 bytes: the group's eight lane sums; the load is unaligned.
            let sums = unsafe { _mm256_loadu_si256(x.sums[lanes.clone()].as_ptr().cast()) };
            ints = _mm256_sub_epi32(ints, _mm256_mullo_epi32(sums, _mm256_set1_epi32(Q::OFFSET)));
        }
        // Products of two f16 values and an integer below 2^20 are exact in f64.
        *acc = _mm512_fmadd_pd(_mm512_mul_pd(dw, f64x8(&x.d[lanes.clone()])), _mm512_cvtepi32_pd(ints), *acc);
        if Q::HAS_MIN {
            *acc = _mm512_fmadd_pd(mw, f64x8(&x.s[lanes.clone()]), *acc);
        }
    }
}

/// [`dot`] of weight rows `cols` with activation rows `r..r + R`, passed to `put` a row at a time (one call for many
/// rows, so that the kernel is inlined into the loop).
///
/// # Safety
/// The CPU must support this module's kernels ([`available`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn dots<Q: VnniQuants, const R: usize>(
    w: &VnniRows<Q>,
    cols: std::ops::Range<usize>,
    acts: &VnniActs,
    r: usize,
    mut put: impl FnMut(usize, [f64; R]),
) {
    let x: [VnniAct<'_>; R] = std::array::from_fn(|k| acts.row(r + k));
    let xs = std::array::from_fn(|k| &x[k]);
    for col in cols {
        // SAFETY: the same features are enabled here.
        put(col, unsafe { dot::<Q, R>(&w.row(col), xs) });
    }
}

/// A weight row's dot products with `R` activation rows, each as [`super::scalar::dot`]
/// computes it (up to the order of exact f64 additions), and the same whatever `R` is.
///
/// # Safety
/// The CPU must support this module's kernels ([`available`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn dot<Q: VnniQuants, const R: usize>(w: &VnniRow<'_>, xs: [&VnniAct<'_>; R]) -> [f64; R] {
    assert!(xs.iter().all(|x| x.qs.len() == w.per_row * QK && x.d.len() == w.d.len()));
    let mut acc = [_mm512_setzero_pd(); R];
    // The groups of `groups`, unrolled.
    let full = w.per_row / LANES;
    for g in 0..full {
        group::<Q, R, LANES>(&mut acc, w, &xs, g, g * LANES);
    }
    let (mut g, mut first) = (full, full * LANES);
    let rest = w.per_row % LANES;
    if rest & 4 != 0 {
        group::<Q, R, 4>(&mut acc, w, &xs, g, first);
        (g, first) = (g + 1, first + 4);
    }
    if rest & 2 != 0 {
        group::<Q, R, 2>(&mut acc, w, &xs, g, first);
        (g, first) = (g + 1, first + 2);
    }
    if rest & 1 != 0 {
        group::<Q, R, 1>(&mut acc, w, &xs, g, first);
    }
    acc.map(|acc| _mm512_reduce_add_pd(acc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_cover_every_block_once_in_steps_that_fill_all_lanes() {
        for n in 0..40 {
            let gs: Vec<_> = groups(n).collect();
            assert_eq!(gs.iter().map(|g| g.1).sum::<usize>(), n, "{n} blocks");
            assert!(gs.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0), "{n} blocks: {gs:?}");
            for &(_, p) in &gs {
                // Every (block, element) of the group appears exactly once over its steps.
                let mut seen = vec![false; p * QK];
                for s in 0..p {
                    for j in 0..LANES {
                        for t in 0..CHUNK {
                            let (b, e) = source(p, s, j, t);
                            assert!(!std::mem::replace(&mut seen[b * QK + e], true));
                            assert_eq!(lane_block(p, j).0, b);
                        }
                    }
                }
                assert!(seen.iter().all(|&v| v));
            }
        }
    }
}

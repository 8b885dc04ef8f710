//! GGUF's K-quant formats (256-element super-blocks: Q4_K, Q5_K, Q6_K), the 8-bit `q8_K`
//! activation blocks they are multiplied with, and the portable kernels, which are also the
//! reference the SIMD kernels ([`super::ksimd`]) are tested against.
//!
//! llama.cpp computes a super-block's products in integers, exactly, and rounds only a few sums
//! per super-block to f32. Which sums depends on its kernel, and its kernels depend on how many
//! rows a matmul has: a prompt (8 rows or more) runs the repacked `ggml_gemm_q4_K_8x8_q8_K`
//! for Q4_K and the tiled kernels (`tiled/tiled-kernel.cpp`) for Q5_K and Q6_K; a decoded token
//! (one row) runs `ggml_gemv_q4_K_8x8_q8_K` and `ggml_vec_dot_q{5,6}_K_q8_K`, summed otherwise.
//! herd computes every row alike, however a step is batched, and follows the prompt kernels
//! (x86, AVX2 build), so that a prompt's logits are llama.cpp's bit for bit:
//! - Q4_K: per 64 elements (a pair of sub-blocks), the integer sum of `sc * q * x` added with a
//!   fused multiply-add by `d_w * d_x` to one f32 sum, and the offsets' `m * sum(x)` likewise to
//!   another, by `dmin_w * d_x`; the row is the first sum minus the second.
//! - Q5_K: per super-block, `r = d_w * s1 - dmin_w * s2` (a multiply, then a fused
//!   multiply-add) for the scaled and offset integer totals, added as `fma(r, d_x, sum)`.
//! - Q6_K: per super-block, `fma(d_w * s, d_x, sum)` for the integer total `s` of
//!   `sc * (q - 32) * x`.
//!
//! Weights are stored with their scales unpacked (a few bytes more per super-block than the
//! file), so that kernels need not decode GGUF's 6-bit packing at every step.

use half::f16;

/// Elements per super-block.
pub const QK_K: usize = 256;

/// Activations quantized as llama.cpp's `block_q8_K`: `d * q` per element, and the sums of
/// each 16 quants.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(64))]
pub struct Q8K {
    pub qs: [i8; QK_K],
    pub d: f32,
    pub bsums: [i16; 16],
}

impl Q8K {
    /// An all-zero block.
    pub const ZERO: Self = Self { qs: [0; QK_K], d: 0.0, bsums: [0; 16] };

    /// The sums of each 32 quants (a 32-element sub-block's).
    pub fn sums32(&self) -> [i32; 8] {
        std::array::from_fn(|s| i32::from(self.bsums[2 * s]) + i32::from(self.bsums[2 * s + 1]))
    }
}

/// Quantizes `x` (`out.len() * 256` values) as llama.cpp's `quantize_row_q8_K_ref` does: the
/// scale is `-127 / x_max` (`x_max` the first value of largest magnitude, so `d` takes the
/// opposite sign), quants rounded half to even and capped at 127.
pub fn quantize_q8k(x: &[f32], out: &mut [Q8K]) {
    for (x, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in x {
            if v.abs() > amax {
                (amax, max) = (v.abs(), v);
            }
        }
        if amax == 0.0 {
            *y = Q8K::ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in y.qs.iter_mut().zip(x) {
            // ggml's `nearest_int` rounds half to even; values stay far inside its range.
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (s, q) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| i16::from(v)).sum();
        }
        y.d = 1.0 / iscale;
    }
}

/// A K-quant super-block format.
pub trait KQuants: Copy + Send + Sync + 'static {
    /// Bytes of a super-block in the GGUF file.
    const GGUF_BYTES: usize;
    /// Reads a super-block from GGUF's bytes.
    fn from_gguf(bytes: &[u8]) -> Self;
    /// Element `e`'s quant as stored (unsigned, before any bias).
    fn quant(&self, e: usize) -> i32;
    /// The integer scale of element `e`.
    fn scale(&self, e: usize) -> i32;
    /// The super-block's dot product with an activation block, in llama.cpp's order, added to
    /// the row's accumulators; `pairs` are its [`pairs`].
    fn accumulate(&self, x: &Q8K, acc: &mut Acc, pairs: [i32; 4]);
    /// The row's dot product from its accumulators.
    fn finish(acc: &Acc) -> f32;
    /// The super-block's value against `x`, in f64 (for sums split over ranks).
    fn exact(&self, x: &Q8K) -> f64;
}

/// A row's f32 accumulators: the main sum and (Q4_K) the offsets' sum.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Acc {
    pub sum: f32,
    pub offsets: f32,
}

/// A super-block's integer sums of `sc * q * x` per 64 elements (stored, unsigned quants `q`):
/// the part of its dot product every kernel computes exactly before llama.cpp's f32 steps.
pub fn pairs<K: KQuants>(w: &K, x: &Q8K) -> [i32; 4] {
    std::array::from_fn(|p| (64 * p..64 * p + 64).map(|e| w.scale(e) * w.quant(e) * i32::from(x.qs[e])).sum())
}

/// Q4_K: weights `d * sc * q - dmin * m` per 32-element sub-block, 4-bit `q`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct Q4K {
    /// Chunk `j`'s 32 bytes hold elements `64j..64j + 32` (low nibbles) and `64j + 32..64j + 64`.
    pub qs: [u8; 128],
    pub sc: [u8; 8],
    pub m: [u8; 8],
    pub d: f32,
    pub dmin: f32,
}

/// Q5_K: as Q4_K, with a fifth bit per element in `qh`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct Q5K {
    pub qs: [u8; 128],
    /// Bit `2j` of byte `l`: element `64j + l`'s fifth bit; bit `2j + 1`: element `64j + 32 + l`'s.
    pub qh: [u8; 32],
    pub sc: [u8; 8],
    pub m: [u8; 8],
    pub d: f32,
    pub dmin: f32,
}

/// Q6_K: weights `d * sc * (q - 32)` per 16-element group, 6-bit `q`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct Q6K {
    /// Half `n`'s 64 bytes: low nibbles of elements `128n..128n + 64`, then high nibbles of
    /// `128n + 64..128n + 128`, as in GGUF.
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub sc: [i8; 16],
    pub d: f32,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// GGUF's twelve bytes of 6-bit scales and offsets (`get_scale_min_k4`).
fn scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        (sc[j], m[j]) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
        };
    }
    (sc, m)
}

fn nibble128(qs: &[u8; 128], e: usize) -> i32 {
    let (j, l) = (e / 64, e % 64);
    i32::from(if l < 32 { qs[32 * j + l] & 0xf } else { qs[32 * j + l - 32] >> 4 })
}

/// The offsets' integer sums per 64 elements: `m_s * sum(x)` over the two sub-blocks of each.
fn min_pairs(m: &[u8; 8], x: &Q8K) -> [i32; 4] {
    let s = x.sums32();
    std::array::from_fn(|p| i32::from(m[2 * p]) * s[2 * p] + i32::from(m[2 * p + 1]) * s[2 * p + 1])
}

/// Q4_K's and Q5_K's value of a super-block in f64: scales' and offsets' totals apart.
fn exact_with_mins(d: f32, dmin: f32, m: &[u8; 8], x: &Q8K, pairs: [i32; 4]) -> f64 {
    let total = |v: [i32; 4]| v.iter().map(|&v| f64::from(v)).sum::<f64>();
    let dx = f64::from(x.d);
    f64::from(d) * dx * total(pairs) - f64::from(dmin) * dx * total(min_pairs(m, x))
}

impl KQuants for Q4K {
    const GGUF_BYTES: usize = 144;
    fn from_gguf(b: &[u8]) -> Self {
        let (sc, m) = scales_mins(&b[4..16]);
        Self { qs: b[16..144].try_into().expect("144-byte block"), sc, m, d: f16_at(b, 0), dmin: f16_at(b, 2) }
    }
    fn quant(&self, e: usize) -> i32 {
        nibble128(&self.qs, e)
    }
    fn scale(&self, e: usize) -> i32 {
        i32::from(self.sc[e / 32])
    }
    #[inline]
    fn accumulate(&self, x: &Q8K, acc: &mut Acc, pairs: [i32; 4]) {
        // `ggml_gemm_q4_K_8x8_q8_K`: one multiply-add per pair of sub-blocks.
        let (ds, dm) = (self.d * x.d, self.dmin * x.d);
        for (p, m) in pairs.into_iter().zip(min_pairs(&self.m, x)) {
            acc.sum = (p as f32).mul_add(ds, acc.sum);
            acc.offsets = (m as f32).mul_add(dm, acc.offsets);
        }
    }
    #[inline]
    fn finish(acc: &Acc) -> f32 {
        acc.sum - acc.offsets
    }
    fn exact(&self, x: &Q8K) -> f64 {
        exact_with_mins(self.d, self.dmin, &self.m, x, pairs(self, x))
    }
}

impl KQuants for Q5K {
    const GGUF_BYTES: usize = 176;
    fn from_gguf(b: &[u8]) -> Self {
        let (sc, m) = scales_mins(&b[4..16]);
        Self {
            qh: b[16..48].try_into().expect("176-byte block"),
            qs: b[48..176].try_into().expect("176-byte block"),
            sc,
            m,
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
        }
    }
    fn quant(&self, e: usize) -> i32 {
        let (sub, l) = (e / 32, e % 32);
        nibble128(&self.qs, e) | i32::from((self.qh[l] >> sub) & 1) << 4
    }
    fn scale(&self, e: usize) -> i32 {
        i32::from(self.sc[e / 32])
    }
    #[inline]
    fn accumulate(&self, x: &Q8K, acc: &mut Acc, pairs: [i32; 4]) {
        // The tiled kernel: `r = d * s1`, `r = fma(-dmin, s2, r)`, `sum = fma(r, d_x, sum)`.
        let s1: i32 = pairs.iter().sum();
        let s2: i32 = min_pairs(&self.m, x).iter().sum();
        let r = (-self.dmin).mul_add(s2 as f32, self.d * s1 as f32);
        acc.sum = r.mul_add(x.d, acc.sum);
    }
    #[inline]
    fn finish(acc: &Acc) -> f32 {
        acc.sum
    }
    fn exact(&self, x: &Q8K) -> f64 {
        exact_with_mins(self.d, self.dmin, &self.m, x, pairs(self, x))
    }
}

impl Q6K {
    /// The bias of 32 times the scaled activation sums: `32 * sum(sc_g * sum of group g's x)`.
    fn bias(&self, x: &Q8K) -> i32 {
        32 * self.sc.iter().zip(x.bsums).map(|(&s, b)| i32::from(s) * i32::from(b)).sum::<i32>()
    }
}

impl KQuants for Q6K {
    const GGUF_BYTES: usize = 210;
    fn from_gguf(b: &[u8]) -> Self {
        Self {
            ql: b[0..128].try_into().expect("210-byte block"),
            qh: b[128..192].try_into().expect("210-byte block"),
            sc: std::array::from_fn(|i| b[192 + i] as i8),
            d: f16_at(b, 208),
        }
    }
    fn quant(&self, e: usize) -> i32 {
        let (n, r) = (e / 128, e % 128);
        let (quarter, l) = (r / 32, r % 32);
        let low = self.ql[64 * n + 32 * (quarter % 2) + l];
        let low = if quarter < 2 { low & 0xf } else { low >> 4 };
        let high = (self.qh[32 * n + l] >> (2 * quarter)) & 3;
        i32::from(low | high << 4)
    }
    fn scale(&self, e: usize) -> i32 {
        i32::from(self.sc[e / 16])
    }
    #[inline]
    fn accumulate(&self, x: &Q8K, acc: &mut Acc, pairs: [i32; 4]) {
        // The tiled kernel: `sum = fma(d * s, d_x, sum)`.
        let s = pairs.iter().sum::<i32>() - self.bias(x);
        acc.sum = (self.d * s as f32).mul_add(x.d, acc.sum);
    }
    #[inline]
    fn finish(acc: &Acc) -> f32 {
        acc.sum
    }
    fn exact(&self, x: &Q8K) -> f64 {
        let s = pairs(self, x).iter().sum::<i32>() - self.bias(x);
        f64::from(self.d) * f64::from(x.d) * f64::from(s)
    }
}

/// A row's dot product in llama.cpp's order (see the module docs).
pub fn lane_dot<K: KQuants>(w: &[K], x: &[Q8K]) -> f32 {
    let mut acc = Acc::default();
    for (w, x) in w.iter().zip(x) {
        w.accumulate(x, &mut acc, pairs(w, x));
    }
    K::finish(&acc)
}

/// A row's dot product as the f64 sum of its super-blocks' values, so that sums over parts of
/// a row add up to the whole row's up to f64 rounding.
pub fn dot<K: KQuants>(w: &[K], x: &[Q8K]) -> f64 {
    w.iter().zip(x).map(|(w, x)| w.exact(x)).sum()
}

/// Super-block rows of one K format, read from GGUF.
#[derive(Debug, Clone)]
pub struct KRows<K> {
    blocks: Vec<K>,
    per_row: usize,
}

impl<K: KQuants> KRows<K> {
    /// Reads GGUF super-blocks, `per_row` per row; `None` when the byte count does not match.
    pub fn from_gguf(bytes: &[u8], per_row: usize) -> Option<Self> {
        if per_row == 0 || !bytes.len().is_multiple_of(K::GGUF_BYTES * per_row) {
            return None;
        }
        let mut blocks = super::weight_vec(bytes.len() / K::GGUF_BYTES);
        blocks.extend(bytes.chunks_exact(K::GGUF_BYTES).map(K::from_gguf));
        Some(Self { blocks, per_row })
    }

    /// Super-blocks per row.
    pub fn per_row(&self) -> usize {
        self.per_row
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.blocks.len() / self.per_row
    }

    /// Row `r`'s super-blocks.
    pub fn row(&self, r: usize) -> &[K] {
        &self.blocks[r * self.per_row..(r + 1) * self.per_row]
    }
}

/// Quantized activation rows.
#[derive(Debug, Clone)]
pub struct KActs {
    blocks: Vec<Q8K>,
    per_row: usize,
}

impl KActs {
    /// Quantizes the `m` rows of `x`, `per_row` super-blocks each.
    pub fn new(x: &[f32], m: usize, per_row: usize) -> Self {
        let mut blocks = vec![Q8K::ZERO; m * per_row];
        let x = &x[..blocks.len() * QK_K];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            unsafe { super::ksimd::quantize_q8k(x, &mut blocks) };
            return Self { blocks, per_row };
        }
        quantize_q8k(x, &mut blocks);
        Self { blocks, per_row }
    }

    /// Super-blocks per row.
    pub fn per_row(&self) -> usize {
        self.per_row
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.blocks.len().checked_div(self.per_row).unwrap_or(0)
    }

    /// Row `r`'s blocks.
    pub fn row(&self, r: usize) -> &[Q8K] {
        &self.blocks[r * self.per_row..(r + 1) * self.per_row]
    }
}

#[cfg(test)]
#[path = "ktests.rs"]
mod tests;

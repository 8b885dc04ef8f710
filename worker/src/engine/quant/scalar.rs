//! GGUF's 32-element block formats, the 8-bit activation blocks they are multiplied with, and
//! portable kernels, which are also the reference the SIMD kernels are tested against.
//!
//! The arithmetic follows llama.cpp's: activations are quantized per block to int8 with scale
//! `max|x|/127` (stored as f16), each block's dot product is an exact integer, and the result is
//! `d_w * d_x * dot` (plus `m_w * s_x` for Q4_1's offset). Those per-block values are exact in
//! f64, and a row sums them in f64, so sums over any split of the blocks agree (the module
//! above says why that matters).
//!
//! Blocks are stored split into their parts (quants, scales, offsets), each part contiguous per
//! row, so that kernels load four blocks' scales at once.

use half::f16;

/// Elements per block.
pub const QK: usize = 32;

/// The quants of one weight block in a GGUF format with 32-element blocks.
pub trait Quants: Copy + Send + Sync + 'static {
    /// Bytes of a block in the GGUF file: an f16 scale, `HAS_MIN`'s f16 offset, the quants.
    const GGUF_BYTES: usize;
    /// Whether blocks carry an offset `m` (weights are `d * q + m`).
    const HAS_MIN: bool;
    /// Reads the quants from the end of a GGUF block.
    fn from_gguf(bytes: &[u8]) -> Self;
    /// The exact integer dot product with an activation block's quants.
    fn int_dot(&self, x: &[i8; QK]) -> i32;
    /// Element `e`'s quant (before scale and offset).
    fn quant(&self, e: usize) -> i32;
    /// Whether llama.cpp's x86 builds (AVX2 and up) repack matrices of this format whose row
    /// count is a multiple of 8 into GEMM tiles that sum per block ([`block_dot`]).
    const REPACKED: bool = false;
}

/// Q4_0: weights `d * (q - 8)`; element `j` is the low nibble of byte `j`, `j + 16` the high.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Q4_0(pub [u8; QK / 2]);

/// Q4_1: weights `d * q + m`, nibbles as in [`Q4_0`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Q4_1(pub [u8; QK / 2]);

/// Q8_0: weights `d * q`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Q8_0(pub [i8; QK]);

/// Element `e` of 32 nibbles: the low nibble of byte `e`, or the high one of byte `e - 16`.
pub(super) fn nibble(qs: &[u8; QK / 2], e: usize) -> u8 {
    if e < QK / 2 { qs[e] & 0x0f } else { qs[e - QK / 2] >> 4 }
}

fn nibble_dot(qs: &[u8; QK / 2], x: &[i8; QK], bias: i32) -> i32 {
    qs.iter()
        .enumerate()
        .map(|(j, &b)| {
            (i32::from(b & 0x0f) - bias) * i32::from(x[j]) + (i32::from(b >> 4) - bias) * i32::from(x[j + QK / 2])
        })
        .sum()
}

impl Quants for Q4_0 {
    const GGUF_BYTES: usize = 18;
    const HAS_MIN: bool = false;
    const REPACKED: bool = true;
    fn from_gguf(bytes: &[u8]) -> Self {
        Self(bytes[2..18].try_into().expect("18-byte block"))
    }
    fn int_dot(&self, x: &[i8; QK]) -> i32 {
        nibble_dot(&self.0, x, 8)
    }
    fn quant(&self, e: usize) -> i32 {
        i32::from(nibble(&self.0, e)) - 8
    }
}

impl Quants for Q4_1 {
    const GGUF_BYTES: usize = 20;
    const HAS_MIN: bool = true;
    fn from_gguf(bytes: &[u8]) -> Self {
        Self(bytes[4..20].try_into().expect("20-byte block"))
    }
    fn int_dot(&self, x: &[i8; QK]) -> i32 {
        nibble_dot(&self.0, x, 0)
    }
    fn quant(&self, e: usize) -> i32 {
        i32::from(nibble(&self.0, e))
    }
}

impl Quants for Q8_0 {
    const GGUF_BYTES: usize = 34;
    const HAS_MIN: bool = false;
    fn from_gguf(bytes: &[u8]) -> Self {
        Self(std::array::from_fn(|j| bytes[2 + j] as i8))
    }
    fn int_dot(&self, x: &[i8; QK]) -> i32 {
        self.0.iter().zip(x).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum()
    }
    fn quant(&self, e: usize) -> i32 {
        i32::from(self.0[e])
    }
}

/// One row of weight blocks: quants, scales and (for formats with them) offsets.
#[derive(Debug, Clone, Copy)]
pub struct WeightRow<'a, Q> {
    pub qs: &'a [Q],
    pub d: &'a [f16],
    /// Empty unless `Q::HAS_MIN`.
    pub m: &'a [f16],
}

/// Block-quantized weight rows, split into parts (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct WeightRows<Q> {
    qs: Vec<Q>,
    d: Vec<f16>,
    m: Vec<f16>,
    per_row: usize,
}

impl<Q: Quants> WeightRows<Q> {
    /// Splits GGUF blocks, `per_row` per row; `None` when the byte count does not match.
    pub fn from_gguf(bytes: &[u8], per_row: usize) -> Option<Self> {
        if per_row == 0 || !bytes.len().is_multiple_of(Q::GGUF_BYTES * per_row) {
            return None;
        }
        let blocks = bytes.chunks_exact(Q::GGUF_BYTES);
        let f16_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
        Some(Self {
            qs: blocks.clone().map(Q::from_gguf).collect(),
            d: blocks.clone().map(|b| f16_at(b, 0)).collect(),
            m: if Q::HAS_MIN { blocks.map(|b| f16_at(b, 2)).collect() } else { Vec::new() },
            per_row,
        })
    }

    /// Builds rows from their parts (`m` empty unless `Q::HAS_MIN`).
    pub fn new(qs: Vec<Q>, d: Vec<f16>, m: Vec<f16>, per_row: usize) -> Self {
        Self { qs, d, m, per_row }
    }

    /// Blocks per row.
    pub fn per_row(&self) -> usize {
        self.per_row
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.qs.len().checked_div(self.per_row).unwrap_or(0)
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> WeightRow<'_, Q> {
        let span = r * self.per_row..(r + 1) * self.per_row;
        let m = if Q::HAS_MIN { &self.m[span.clone()] } else { &[] };
        WeightRow { qs: &self.qs[span.clone()], d: &self.d[span], m }
    }
}

/// Activations quantized in blocks: `d * q` per block, with `s = d * sum(q)`. `d` and `s` hold
/// f16-rounded values (llama.cpp's `block_q8_1`), widened to f64 so kernels need not convert.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActRows {
    pub qs: Vec<[i8; QK]>,
    pub d: Vec<f64>,
    pub s: Vec<f64>,
    per_row: usize,
}

/// One row of [`ActRows`].
#[derive(Debug, Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [[i8; QK]],
    pub d: &'a [f64],
    pub s: &'a [f64],
}

impl ActRows {
    /// Room for `rows` rows of `per_row` blocks.
    pub fn zeros(rows: usize, per_row: usize) -> Self {
        let n = rows * per_row;
        Self { qs: vec![[0; QK]; n], d: vec![0.0; n], s: vec![0.0; n], per_row }
    }

    /// Blocks per row.
    pub fn per_row(&self) -> usize {
        self.per_row
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> ActRow<'_> {
        let span = r * self.per_row..(r + 1) * self.per_row;
        ActRow { qs: &self.qs[span.clone()], d: &self.d[span.clone()], s: &self.s[span] }
    }
}

/// A row's dot product: the sum of its blocks' exact values, in order.
pub fn dot<Q: Quants>(w: &WeightRow<'_, Q>, x: &ActRow<'_>) -> f64 {
    (0..w.qs.len())
        .map(|b| {
            let v = w.d[b].to_f64() * x.d[b] * f64::from(w.qs[b].int_dot(&x.qs[b]));
            if Q::HAS_MIN { v + w.m[b].to_f64() * x.s[b] } else { v }
        })
        .sum()
}

/// A row's dot product summed as llama.cpp's AVX2 kernels (`ggml_vec_dot_q4_1_q8_1` and kin)
/// do, in f32: per block, eight lanes of four products each, scaled by `d_w * d_x` and added to
/// the lane with a fused multiply-add; the lanes reduced as [`hsum8`]; plus the offsets'
/// `m_w * s_x`, summed with fused multiply-adds. Unlike [`dot`], splitting the blocks changes it.
pub fn lane_dot<Q: Quants>(w: &WeightRow<'_, Q>, x: &ActRow<'_>) -> f32 {
    let mut acc = [0f32; 8];
    let mut offsets = 0f32;
    for b in 0..w.qs.len() {
        let d = w.d[b].to_f32() * x.d[b] as f32;
        for (l, acc) in acc.iter_mut().enumerate() {
            let ints: i32 = (4 * l..4 * l + 4).map(|e| w.qs[b].quant(e) * i32::from(x.qs[b][e])).sum();
            *acc = d.mul_add(ints as f32, *acc);
        }
        if Q::HAS_MIN {
            offsets = w.m[b].to_f32().mul_add(x.s[b] as f32, offsets);
        }
    }
    hsum8(acc) + offsets
}

/// A row's dot product summed as llama.cpp's repacked kernels (`ggml_gemm_q4_0_8x8_q8_0` and
/// its GEMV) do, in f32: per block, the exact integer dot product, converted and added with a
/// fused multiply-add by `d_w * d_x`.
pub fn block_dot<Q: Quants>(w: &WeightRow<'_, Q>, x: &ActRow<'_>) -> f32 {
    debug_assert!(!Q::HAS_MIN);
    (0..w.qs.len())
        .fold(0f32, |acc, b| (w.qs[b].int_dot(&x.qs[b]) as f32).mul_add(w.d[b].to_f32() * x.d[b] as f32, acc))
}

/// llama.cpp's horizontal sum of eight lanes: lane `i` plus lane `i + 4`, then those in pairs.
#[inline(always)]
pub fn hsum8(a: [f32; 8]) -> f32 {
    let r: [f32; 4] = std::array::from_fn(|i| a[i + 4] + a[i]);
    (r[0] + r[2]) + (r[1] + r[3])
}

/// Quantizes `x` (`qs.len() * 32` values) into the blocks `qs`, `d`, `s`.
pub fn quantize(x: &[f32], qs: &mut [[i8; QK]], d: &mut [f64], s: &mut [f64]) {
    for (b, x) in x.chunks_exact(QK).enumerate() {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs[b].iter_mut().zip(x) {
            // Round half to even, as the SIMD conversion does.
            *q = (v * id).round_ties_even() as i8;
            sum += i32::from(*q);
        }
        (d[b], s[b]) = scales(amax, sum);
    }
}

/// A quantized block's `d` and `s` from its absolute maximum and the sum of its quants.
pub fn scales(amax: f32, sum: i32) -> (f64, f64) {
    let d = amax / 127.0;
    (f16::from_f32(d).to_f64(), f16::from_f32(d * sum as f32).to_f64())
}

//! AVX-512 VNNI kernels that sum in llama.cpp's order ([`super::scalar::lane_dot`]), for CPUs
//! with them.
//!
//! llama.cpp's order adds each block's eight lanes (four products each) into the row's eight
//! accumulators with a fused multiply-add by `d_w * d_x`, block after block: a chain per (weight
//! row, activation row) that cannot be regrouped. So the work is spread the other way: weight
//! rows are stored in panels of eight, and one 512-bit `vpdpbusd` computes one block's lanes for
//! two rows of a panel at once, its conversion and multiply-add likewise, with the scales of all
//! eight rows multiplied in one instruction. Each value is the portable kernel's, bit for bit.
//!
//! Where llama.cpp repacks the matrix (Q4_0, [`super::scalar::Quants::REPACKED`]) it sums per
//! block instead ([`super::scalar::block_dot`]): one f32 step per 32 products. [`block_dots`]
//! does that with panels of sixteen rows, one per 32-bit lane, the activations broadcast.

use std::arch::x86_64::*;

use super::scalar::{ActRows, QK};
use super::vnni::VnniQuants;

/// Weight rows per panel.
pub const PANEL: usize = 8;

/// Weight rows in panels of [`PANEL`]: per panel and block, the rows' unsigned quants (two rows
/// per 512-bit load once unpacked), their scales and offsets as f16. Rows past the last pad the
/// last panel with zeros.
#[derive(Debug, Clone)]
pub struct PanelRows<Q> {
    qs: Vec<u8>,
    /// Scales and offsets as the file's f16 (converted when loaded into registers): the panels
    /// take no more memory than the file.
    d: Vec<half::f16>,
    m: Vec<half::f16>,
    per_row: usize,
    rows: usize,
    _format: std::marker::PhantomData<Q>,
}

impl<Q: VnniQuants> PanelRows<Q> {
    /// Bytes of one row's block: nibbles two to a byte, else one quant per byte.
    const BLOCK_BYTES: usize = if Q::NIBBLES { QK / 2 } else { QK };

    /// Arranges `rows` (GGUF blocks split into parts) in panels.
    pub fn new(rows: &super::scalar::WeightRows<Q>) -> Self {
        let (n, per_row) = (rows.rows(), rows.per_row());
        let panels = n.div_ceil(PANEL);
        let mut out = Self {
            qs: super::weight_vec(panels * PANEL * per_row * Self::BLOCK_BYTES),
            d: super::weight_vec(panels * PANEL * per_row),
            m: super::weight_vec(if Q::HAS_MIN { panels * PANEL * per_row } else { 0 }),
            per_row,
            rows: n,
            _format: std::marker::PhantomData,
        };
        for p in 0..panels {
            for b in 0..per_row {
                for j in 0..PANEL {
                    let r = p * PANEL + j;
                    let row = (r < n).then(|| rows.row(r));
                    // Element e's unsigned quant; nibbles keep GGUF's packing (e and e + 16 share a byte).
                    let u = |e: usize| row.map_or(0, |w| w.qs[b].unsigned(e));
                    if Q::NIBBLES {
                        out.qs.extend((0..QK / 2).map(|e| u(e) | u(e + QK / 2) << 4));
                    } else {
                        out.qs.extend((0..QK).map(u));
                    }
                    out.d.push(row.map_or(half::f16::ZERO, |w| w.d[b]));
                    if Q::HAS_MIN {
                        out.m.push(row.map_or(half::f16::ZERO, |w| w.m[b]));
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
}

/// Activations for [`dots`]: the blocks, with their scales and sums as f32.
#[derive(Debug, Clone, Default)]
pub struct PanelActs {
    rows: ActRows,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl PanelActs {
    /// Wraps quantized activations.
    pub fn new(rows: ActRows) -> Self {
        // The f16-rounded values convert exactly.
        let d = rows.d.iter().map(|&v| v as f32).collect();
        let s = rows.s.iter().map(|&v| v as f32).collect();
        Self { rows, d, s }
    }
}

/// Two rows' 16 nibble bytes (32 bytes at `p`) unpacked to [low nibbles, high nibbles] per
/// row: each row's 32 quants in element order.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn nibbles2(p: *const u8) -> __m512i {
    // SAFETY: the caller passes 32 readable bytes; the load is unaligned.
    let pair = _mm512_castsi256_si512(unsafe { _mm256_loadu_si256(p.cast()) });
    let spread = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), pair);
    let shifts = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);
    _mm512_and_si512(_mm512_srlv_epi64(spread, shifts), _mm512_set1_epi8(0x0f))
}

/// Two rows of a panel (`2k`, `2k + 1`) of block data at `p`, as unsigned bytes in element order.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pair<Q: VnniQuants>(p: *const u8, k: usize) -> __m512i {
    // SAFETY: the caller passes a panel's block (8 rows).
    unsafe { if Q::NIBBLES { nibbles2(p.add(k * QK)) } else { _mm512_loadu_si512(p.add(k * 2 * QK).cast()) } }
}

/// ggml's `hsum_float_8` of each 256-bit half.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
fn halves(v: __m512) -> [f32; 2] {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    [super::avx2::hsum8(lo), super::avx2::hsum8(hi)]
}

/// Weight rows `cols` times activation rows `r..r + R`, each summed as
/// [`super::scalar::lane_dot`] sums it, passed to `put` a row at a time.
///
/// # Safety
/// The CPU must support AVX-512 VNNI ([`super::vnni::available`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn dots<Q: VnniQuants, const R: usize>(
    w: &PanelRows<Q>,
    cols: std::ops::Range<usize>,
    acts: &PanelActs,
    r: usize,
    mut put: impl FnMut(usize, [f64; R]),
) {
    let nb = w.per_row;
    assert!(acts.rows.per_row() == nb && (r + R) * nb <= acts.d.len() && cols.end <= w.rows);
    let bytes = PanelRows::<Q>::BLOCK_BYTES;
    // Lanes 0-7 take row 2k's scale, lanes 8-15 row 2k + 1's.
    let pick: [__m512i; 4] = std::array::from_fn(|k| {
        let (a, b) = (2 * k as i32, 2 * k as i32 + 1);
        _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
    });
    let offset = _mm512_set1_epi8(Q::OFFSET as i8);
    for p in cols.start / PANEL..cols.end.div_ceil(PANEL) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut offsets = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let at = (p * nb + b) * PANEL;
            // SAFETY: the panel's block holds 8 rows' bytes at `at * bytes`.
            let wq: [__m512i; 4] = std::array::from_fn(|k| unsafe { pair::<Q>(w.qs.as_ptr().add(at * bytes), k) });
            // SAFETY: 8 scales (and offsets) per panel block.
            let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(w.d.as_ptr().add(at).cast()) });
            let mw =
                if Q::HAS_MIN { _mm256_cvtph_ps(unsafe { _mm_loadu_si128(w.m.as_ptr().add(at).cast()) }) } else { dw };
            for (k, (acc, offsets)) in acc.iter_mut().zip(&mut offsets).enumerate() {
                let xb = (r + k) * nb + b;
                // SAFETY: block `xb` of the activations is 32 bytes.
                let x = _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(acts.rows.qs[xb].as_ptr().cast()) });
                // dpbusd takes unsigned weights: take the offset's products back out per lane.
                let bias = if Q::OFFSET != 0 { _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, x) } else { x };
                let d = _mm512_castps256_ps512(_mm256_mul_ps(dw, _mm256_set1_ps(acts.d[xb])));
                for (j, (acc, wq)) in acc.iter_mut().zip(&wq).enumerate() {
                    let mut lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), *wq, x);
                    if Q::OFFSET != 0 {
                        lanes = _mm512_sub_epi32(lanes, bias);
                    }
                    let scale = _mm512_permutexvar_ps(pick[j], d);
                    *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(lanes), *acc);
                }
                if Q::HAS_MIN {
                    *offsets = _mm256_fmadd_ps(mw, _mm256_set1_ps(acts.s[xb]), *offsets);
                }
            }
        }
        let sums: [[f32; PANEL]; R] = std::array::from_fn(|k| {
            let mut out = [0f32; PANEL];
            let mut off = [0f32; PANEL];
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(off.as_mut_ptr(), offsets[k]) };
            for (j, acc) in acc[k].iter().enumerate() {
                let [a, b] = halves(*acc);
                out[2 * j] = a + if Q::HAS_MIN { off[2 * j] } else { 0.0 };
                out[2 * j + 1] = b + if Q::HAS_MIN { off[2 * j + 1] } else { 0.0 };
            }
            out
        });
        for col in (p * PANEL).max(cols.start)..((p + 1) * PANEL).min(cols.end) {
            put(col, std::array::from_fn(|k| f64::from(sums[k][col % PANEL])));
        }
    }
}

/// Weight rows per panel of the per-block kernels: one per 32-bit lane of a 512-bit vector.
pub const BLOCK_PANEL: usize = 16;

/// Panel blocks between the one computed and the one prefetched (1 KiB of weights).
const PREFETCH: usize = 4;

/// Rows of a nibble format without offsets (Q4_0) in panels of [`BLOCK_PANEL`] for
/// [`block_dots`]: per panel and block, four vectors whose lane `r` holds row `r`'s bytes
/// `4v..4v + 4` (elements `4v..` in the low nibbles, `16 + 4v..` in the high ones), and the
/// rows' f16 scales. Rows past the last pad the last panel with zeros.
#[derive(Debug, Clone)]
pub struct BlockPanelRows<Q> {
    qs: Vec<u8>,
    d: Vec<half::f16>,
    per_row: usize,
    rows: usize,
    _format: std::marker::PhantomData<Q>,
}

impl<Q: VnniQuants> BlockPanelRows<Q> {
    /// Arranges `rows` in panels.
    pub fn new(rows: &super::scalar::WeightRows<Q>) -> Self {
        assert!(Q::NIBBLES && !Q::HAS_MIN, "per-block panels take nibble formats without offsets");
        let (n, per_row) = (rows.rows(), rows.per_row());
        let panels = n.div_ceil(BLOCK_PANEL);
        let mut out = Self {
            qs: super::weight_vec(panels * BLOCK_PANEL * per_row * QK / 2),
            d: super::weight_vec(panels * BLOCK_PANEL * per_row),
            per_row,
            rows: n,
            _format: std::marker::PhantomData,
        };
        for p in 0..panels {
            for b in 0..per_row {
                let row = |j: usize| (p * BLOCK_PANEL + j < n).then(|| rows.row(p * BLOCK_PANEL + j));
                // Element e's unsigned quant; nibbles keep GGUF's packing (e and e + 16 share a byte).
                let u = |j: usize, e: usize| row(j).map_or(0, |w| w.qs[b].unsigned(e));
                for v in 0..4 {
                    for j in 0..BLOCK_PANEL {
                        out.qs.extend((4 * v..4 * v + 4).map(|e| u(j, e) | u(j, e + QK / 2) << 4));
                    }
                }
                out.d.extend((0..BLOCK_PANEL).map(|j| row(j).map_or(half::f16::ZERO, |w| w.d[b])));
            }
        }
        out
    }

    /// Blocks per row.
    pub fn per_row(&self) -> usize {
        self.per_row
    }
}

/// Activations for [`block_dots`]: the blocks, their scales as f32, and what the weights'
/// offset adds to each block's integer sum (`-OFFSET * sum(q)`).
#[derive(Debug, Clone, Default)]
pub struct BlockPanelActs {
    rows: ActRows,
    d: Vec<f32>,
    bias: Vec<i32>,
}

impl BlockPanelActs {
    /// Wraps quantized activations for format `Q`.
    pub fn new<Q: VnniQuants>(rows: ActRows) -> Self {
        // The f16-rounded values convert exactly.
        let d = rows.d.iter().map(|&v| v as f32).collect();
        let bias = rows.qs.iter().map(|q| -Q::OFFSET * q.iter().map(|&v| i32::from(v)).sum::<i32>()).collect();
        Self { rows, d, bias }
    }
}

/// Weight rows `cols` times activation rows `r..r + R`, each summed per block as
/// [`super::scalar::block_dot`] sums it, passed to `put` a row at a time: each lane of a
/// `vpdpbusd` is one weight row's four elements, the activations' four bytes broadcast to all.
///
/// # Safety
/// The CPU must support AVX-512 VNNI ([`super::vnni::available`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub unsafe fn block_dots<Q: VnniQuants, const R: usize>(
    w: &BlockPanelRows<Q>,
    cols: std::ops::Range<usize>,
    acts: &BlockPanelActs,
    r: usize,
    mut put: impl FnMut(usize, [f64; R]),
) {
    let nb = w.per_row;
    assert!(acts.rows.per_row() == nb && (r + R) * nb <= acts.d.len() && cols.end <= w.rows);
    let m4 = _mm512_set1_epi8(0x0f);
    for p in cols.start / BLOCK_PANEL..cols.end.div_ceil(BLOCK_PANEL) {
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let at = (p * nb + b) * BLOCK_PANEL;
            // Ask for the weights a few blocks ahead, as the K-quant panels do.
            let ahead = (at + PREFETCH * BLOCK_PANEL).min(w.d.len() - BLOCK_PANEL);
            // SAFETY: block `ahead` exists; prefetches never fault.
            unsafe {
                let q = w.qs.as_ptr().add(ahead * QK / 2);
                for line in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(q.add(64 * line).cast());
                }
                _mm_prefetch::<_MM_HINT_T0>(w.d.as_ptr().add(ahead).cast());
            }
            // SAFETY: the panel's block holds 16 rows' 16 bytes at `at * 16`, and 16 scales at `at`.
            let (v, dw): ([__m512i; 4], __m512) = unsafe {
                let q = w.qs.as_ptr().add(at * QK / 2);
                (
                    std::array::from_fn(|v| _mm512_loadu_si512(q.add(64 * v).cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(at).cast())),
                )
            };
            let lo = v.map(|v| _mm512_and_si512(v, m4));
            let hi = v.map(|v| _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4));
            for (k, acc) in acc.iter_mut().enumerate() {
                let xb = (r + k) * nb + b;
                let x = acts.rows.qs[xb].as_ptr();
                // Two chains of four, not one of eight: the products wait less on each other.
                let (mut low, mut high) = (_mm512_set1_epi32(acts.bias[xb]), _mm512_setzero_si512());
                for v in 0..4 {
                    // SAFETY: bytes 4v.. and 16 + 4v.. of the block's 32; unaligned reads.
                    let (xl, xh) = unsafe {
                        (x.add(4 * v).cast::<i32>().read_unaligned(), x.add(16 + 4 * v).cast::<i32>().read_unaligned())
                    };
                    low = _mm512_dpbusd_epi32(low, lo[v], _mm512_set1_epi32(xl));
                    high = _mm512_dpbusd_epi32(high, hi[v], _mm512_set1_epi32(xh));
                }
                let ints = _mm512_add_epi32(low, high);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), _mm512_mul_ps(dw, _mm512_set1_ps(acts.d[xb])), *acc);
            }
        }
        let sums: [[f32; BLOCK_PANEL]; R] = std::array::from_fn(|k| {
            let mut out = [0f32; BLOCK_PANEL];
            // SAFETY: 16 floats; unaligned store.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc[k]) };
            out
        });
        for col in (p * BLOCK_PANEL).max(cols.start)..((p + 1) * BLOCK_PANEL).min(cols.end) {
            put(col, std::array::from_fn(|k| f64::from(sums[k][col % BLOCK_PANEL])));
        }
    }
}

//! AVX-512 VNNI kernels for Q4_K and Q6_K with weight rows in panels of sixteen, for CPUs with
//! them: the formats of most of a Q4_K_M file.
//!
//! The per-row kernels ([`super::ksimd`]) reduce each super-block's integer lanes to a few
//! totals per row, which costs more than the products themselves. Here each 32-bit lane of a
//! `vpdpbusd` belongs to one weight row of the panel and holds four of its elements, the same four
//! in every lane, so the activations' four bytes are one broadcast from memory (a load, no
//! shuffle); the totals come out one row per lane, and the f32 steps of [`KQuants::accumulate`]
//! run on sixteen rows at once, in the same order: the portable kernel's bits.

use std::arch::x86_64::*;

use super::kquants::{KActs, KQuants, Q4K, Q6K, Q8K, QK_K};

/// Weight rows per panel: one per 32-bit lane of a 512-bit vector.
pub const PANEL: usize = 16;

/// A K format laid out in panels.
pub trait KPanel: KQuants {
    /// Panel bytes per super-block (all eight rows): quants, scales and offsets.
    const BYTES: usize;
    const SCALE_BYTES: usize;
    const MIN_BYTES: usize;
    /// Whether the format has offsets (`dmin`).
    const HAS_MIN: bool;
    /// Writes row `r`'s part of a panel super-block into `out`.
    fn place(&self, r: usize, out: &mut PanelBlock);
    /// The activation sums the format's offsets or bias multiply, two 16-bit values per lane.
    fn act_sums(x: &Q8K) -> [i32; 8];
}

/// One panel super-block's parts, before they are stored.
#[derive(Debug, Clone)]
pub struct PanelBlock {
    quants: Vec<u8>,
    /// Per scale unit (sub-block or group of 16), the eight rows' scales.
    scales: Vec<u8>,
    /// Q4_K: per pair of sub-blocks, the eight rows' two offsets (empty for Q6_K).
    mins: Vec<u8>,
    d: [f32; PANEL],
    dmin: [f32; PANEL],
}

impl PanelBlock {
    fn new<K: KPanel>() -> Self {
        Self {
            quants: vec![0; K::BYTES],
            scales: vec![0; K::SCALE_BYTES],
            mins: vec![0; K::MIN_BYTES],
            d: [0.0; PANEL],
            dmin: [0.0; PANEL],
        }
    }
}

/// Weight rows of `K` in panels of [`PANEL`] (the last padded with zero rows).
#[derive(Debug, Clone)]
pub struct KPanelRows<K> {
    quants: Vec<u8>,
    scales: Vec<u8>,
    mins: Vec<u8>,
    d: Vec<f32>,
    dmin: Vec<f32>,
    per_row: usize,
    rows: usize,
    _format: std::marker::PhantomData<K>,
}

impl<K: KPanel> KPanelRows<K> {
    /// Arranges GGUF super-blocks (`per_row` per row) in panels, reading them straight from
    /// the file's bytes; `None` when the byte count does not match.
    pub fn from_gguf(bytes: &[u8], per_row: usize) -> Option<Self> {
        if per_row == 0 || !bytes.len().is_multiple_of(K::GGUF_BYTES * per_row) {
            return None;
        }
        let n = bytes.len() / (K::GGUF_BYTES * per_row);
        let blocks = n.div_ceil(PANEL) * per_row;
        let mut out = Self {
            quants: super::weight_vec(blocks * K::BYTES),
            scales: super::weight_vec(blocks * K::SCALE_BYTES),
            mins: super::weight_vec(blocks * K::MIN_BYTES),
            d: super::weight_vec(blocks * PANEL),
            dmin: super::weight_vec(if K::HAS_MIN { blocks * PANEL } else { 0 }),
            per_row,
            rows: n,
            _format: std::marker::PhantomData,
        };
        let mut block = PanelBlock::new::<K>();
        for p in 0..n.div_ceil(PANEL) {
            for b in 0..per_row {
                block.quants.fill(0);
                block.scales.fill(0);
                block.mins.fill(0);
                (block.d, block.dmin) = ([0.0; PANEL], [0.0; PANEL]);
                for r in 0..PANEL {
                    if p * PANEL + r < n {
                        let at = ((p * PANEL + r) * per_row + b) * K::GGUF_BYTES;
                        K::from_gguf(&bytes[at..at + K::GGUF_BYTES]).place(r, &mut block);
                    }
                }
                out.quants.extend_from_slice(&block.quants);
                out.scales.extend_from_slice(&block.scales);
                out.mins.extend_from_slice(&block.mins);
                out.d.extend_from_slice(&block.d);
                if K::HAS_MIN {
                    out.dmin.extend_from_slice(&block.dmin);
                }
            }
        }
        Some(out)
    }

    /// Super-blocks per row.
    pub fn per_row(&self) -> usize {
        self.per_row
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Byte `k` of row `r`'s four in vector `v`.
fn at(v: usize, r: usize, k: usize) -> usize {
    64 * v + 4 * r + k
}

impl KPanel for Q4K {
    const BYTES: usize = 128 * PANEL;
    const SCALE_BYTES: usize = 8 * PANEL;
    const MIN_BYTES: usize = 8 * PANEL;
    const HAS_MIN: bool = true;
    fn place(&self, r: usize, out: &mut PanelBlock) {
        // Vector 8j + g holds qs bytes 32j + 4g..32j + 4g + 4: elements 64j + 4g.. in the low
        // nibbles, 64j + 32 + 4g.. in the high ones, split at run time.
        for j in 0..4 {
            for g in 0..8 {
                for k in 0..4 {
                    out.quants[at(8 * j + g, r, k)] = self.qs[32 * j + 4 * g + k];
                }
            }
        }
        for s in 0..8 {
            out.scales[PANEL * s + r] = self.sc[s];
        }
        // Per sub-block pair, the rows' two offsets side by side (16-bit pairs once widened).
        for p in 0..4 {
            out.mins[2 * PANEL * p + 2 * r] = self.m[2 * p];
            out.mins[2 * PANEL * p + 2 * r + 1] = self.m[2 * p + 1];
        }
        (out.d[r], out.dmin[r]) = (self.d, self.dmin);
    }
    fn act_sums(x: &Q8K) -> [i32; 8] {
        // The sub-block pairs' 32-value sums.
        let s = x.sums32();
        std::array::from_fn(|p| if p < 4 { pack16(s[2 * p], s[2 * p + 1]) } else { 0 })
    }
}

impl KPanel for Q6K {
    const BYTES: usize = 192 * PANEL;
    const SCALE_BYTES: usize = 16 * PANEL;
    const MIN_BYTES: usize = 0;
    const HAS_MIN: bool = false;
    fn place(&self, r: usize, out: &mut PanelBlock) {
        // Per (half n, group g of four), three vectors: the low-nibble bytes of quarters 0/2,
        // of quarters 1/3, and the high bits of all four.
        for n in 0..2 {
            for g in 0..8 {
                let base = 3 * (8 * n + g);
                for k in 0..4 {
                    let e = 4 * g + k;
                    out.quants[at(base, r, k)] = self.ql[64 * n + e];
                    out.quants[at(base + 1, r, k)] = self.ql[64 * n + 32 + e];
                    out.quants[at(base + 2, r, k)] = self.qh[32 * n + e];
                }
            }
        }
        // Per pair of 16-value groups, the rows' two scales side by side.
        for p in 0..8 {
            out.scales[2 * PANEL * p + 2 * r] = self.sc[2 * p] as u8;
            out.scales[2 * PANEL * p + 2 * r + 1] = self.sc[2 * p + 1] as u8;
        }
        out.d[r] = self.d;
    }
    fn act_sums(x: &Q8K) -> [i32; 8] {
        // The groups' 16-value sums, in pairs.
        std::array::from_fn(|k| pack16(i32::from(x.bsums[2 * k]), i32::from(x.bsums[2 * k + 1])))
    }
}

/// Activations for [`dots`]: the quantized rows, and per super-block the sums the offsets or
/// bias need.
#[derive(Debug, Clone)]
pub struct KPanelActs {
    acts: KActs,
    /// Per super-block: Q4_K's four sub-block pair sums `s(2p) | s(2p + 1) << 16` (32-value sums),
    /// or Q6_K's eight `b(2k) | b(2k + 1) << 16` (16-value sums).
    sums: Vec<[i32; 8]>,
}

fn pack16(a: i32, b: i32) -> i32 {
    (a & 0xffff) | (b << 16)
}

impl KPanelActs {
    /// Adds the sums format `K` needs to quantized activation rows.
    pub fn new<K: KPanel>(acts: KActs) -> Self {
        let sums = (0..acts.rows()).flat_map(|r| acts.row(r)).map(K::act_sums).collect();
        Self { acts, sums }
    }
}

/// The four activation bytes at `p` in every 32-bit lane.
///
/// # Safety
/// `p` must have four readable bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn broadcast(p: *const i8) -> __m512i {
    // SAFETY: as the caller promises; unaligned read.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// One activation row's super-block, for [`PanelStep::step`].
#[derive(Clone, Copy)]
pub struct Act<'a> {
    qs: &'a [i8; QK_K],
    d: f32,
    sums: &'a [i32; 8],
}

/// A K format with panel kernels: per panel, the rows' values of one super-block against one activation row,
/// added to the f32 accumulators (`sum`, `off`) as [`KQuants::accumulate`] does per row.
pub trait PanelStep: KPanel {
    /// # Safety
    /// The CPU must support AVX-512 VNNI; `at` indexes a panel super-block, `xs` are the
    /// activation rows' blocks, each unpacked weight vector serving all of them.
    unsafe fn step<const R: usize>(w: &KPanelRows<Self>, at: usize, xs: [Act<'_>; R], acc: &mut [[__m512; 2]; R])
    where
        Self: Sized;
    /// The rows' results from the accumulators.
    ///
    /// # Safety
    /// The CPU must support AVX-512.
    unsafe fn finish(acc: [__m512; 2]) -> __m512;
}

impl PanelStep for Q4K {
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    unsafe fn step<const R: usize>(w: &KPanelRows<Self>, at: usize, xs: [Act<'_>; R], acc: &mut [[__m512; 2]; R]) {
        let m4 = _mm512_set1_epi8(0x0f);
        // SAFETY: `at` indexes a whole panel super-block in each part.
        let (q, sc, mins) = unsafe {
            (
                w.quants.as_ptr().add(at * Q4K::BYTES),
                w.scales.as_ptr().add(at * Q4K::SCALE_BYTES),
                w.mins.as_ptr().add(at * Q4K::MIN_BYTES),
            )
        };
        // SAFETY: 16 f32 each.
        let (d, dmin) = unsafe {
            (_mm512_loadu_ps(w.d.as_ptr().add(at * PANEL)), _mm512_loadu_ps(w.dmin.as_ptr().add(at * PANEL)))
        };
        for j in 0..4 {
            // Per activation row, sub-blocks 2j (low nibbles) and 2j + 1 (high), even and odd
            // groups of four apart: a lane's sum of 16 products stays below 16 * 15 * 127, within
            // the 16 bits `vpdpwssd` multiplies.
            let mut lo = [[_mm512_setzero_si512(); 2]; R];
            let mut hi = [[_mm512_setzero_si512(); 2]; R];
            for pair in 0..4 {
                // Even and odd groups by constant index, so that the sums stay in registers.
                for (odd, g) in [(0, 2 * pair), (1, 2 * pair + 1)] {
                    // SAFETY: vector 8j + g of the block's 32.
                    let v = unsafe { _mm512_loadu_si512(q.add(64 * (8 * j + g)).cast()) };
                    let (wl, wh) = (_mm512_and_si512(v, m4), _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4));
                    for k in 0..R {
                        // SAFETY: elements 64j + 4g.. and 64j + 32 + 4g.. of 256.
                        let (xl, xh) = unsafe {
                            let x = xs[k].qs.as_ptr().add(64 * j + 4 * g);
                            (broadcast(x), broadcast(x.add(32)))
                        };
                        lo[k][odd] = _mm512_dpbusd_epi32(lo[k][odd], wl, xl);
                        hi[k][odd] = _mm512_dpbusd_epi32(hi[k][odd], wh, xh);
                    }
                }
            }
            // SAFETY: 16 scale bytes per sub-block, 32 offset bytes per pair.
            let (sl, sh, m) = unsafe {
                (
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.add(PANEL * 2 * j).cast())),
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.add(PANEL * (2 * j + 1)).cast())),
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(mins.add(2 * PANEL * j).cast())),
                )
            };
            for k in 0..R {
                let xd = _mm512_set1_ps(xs[k].d);
                let mut pair = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo[k][0], sl);
                pair = _mm512_dpwssd_epi32(pair, lo[k][1], sl);
                pair = _mm512_dpwssd_epi32(pair, hi[k][0], sh);
                pair = _mm512_dpwssd_epi32(pair, hi[k][1], sh);
                let imin = _mm512_madd_epi16(m, _mm512_set1_epi32(xs[k].sums[j]));
                acc[k][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair), _mm512_mul_ps(d, xd), acc[k][0]);
                acc[k][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin), _mm512_mul_ps(dmin, xd), acc[k][1]);
            }
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish(acc: [__m512; 2]) -> __m512 {
        _mm512_sub_ps(acc[0], acc[1])
    }
}

impl PanelStep for Q6K {
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    unsafe fn step<const R: usize>(w: &KPanelRows<Self>, at: usize, xs: [Act<'_>; R], acc: &mut [[__m512; 2]; R]) {
        let (m4, m3) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(3));
        let low16 = _mm512_set1_epi32(0xffff);
        // SAFETY: `at` indexes a whole panel super-block in each part.
        let (q, sc) = unsafe { (w.quants.as_ptr().add(at * Q6K::BYTES), w.scales.as_ptr().add(at * Q6K::SCALE_BYTES)) };
        let mut total = [_mm512_setzero_si512(); R];
        let mut bias = [_mm512_setzero_si512(); R];
        for n in 0..2 {
            // Per quarter, its two groups' scales as 16-bit pairs (sign-extended), and each
            // group's alone in the low half of a lane, for `vpdpwssd`.
            // SAFETY: 32 bytes per pair of groups.
            let pairs: [__m512i; 4] = std::array::from_fn(|qi| unsafe {
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(sc.add(2 * PANEL * (4 * n + qi)).cast()))
            });
            let scales: [[__m512i; 2]; 4] =
                std::array::from_fn(|qi| [_mm512_and_si512(pairs[qi], low16), _mm512_srli_epi32::<16>(pairs[qi])]);
            for g in 0..8 {
                let base = 3 * (8 * n + g);
                // SAFETY: vectors base..base + 3 of the block's 48.
                let (a, b, h) = unsafe {
                    (
                        _mm512_loadu_si512(q.add(64 * base).cast()),
                        _mm512_loadu_si512(q.add(64 * (base + 1)).cast()),
                        _mm512_loadu_si512(q.add(64 * (base + 2)).cast()),
                    )
                };
                let high = |s: u32| {
                    _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(h, _mm512_set1_epi16(s as i16)), m3))
                };
                let quarters = [
                    _mm512_or_si512(_mm512_and_si512(a, m4), high(0)),
                    _mm512_or_si512(_mm512_and_si512(b, m4), high(2)),
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(a), m4), high(4)),
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(b), m4), high(6)),
                ];
                for (qi, wq) in quarters.into_iter().enumerate() {
                    for k in 0..R {
                        // A lane's four products stay below 4 * 63 * 127: 16 bits.
                        // SAFETY: element 128n + 32qi + 4g of 256.
                        let x = unsafe { broadcast(xs[k].qs.as_ptr().add(128 * n + 32 * qi + 4 * g)) };
                        let fours = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, x);
                        total[k] = _mm512_dpwssd_epi32(total[k], fours, scales[qi][g / 4]);
                    }
                }
            }
            for k in 0..R {
                // The bias of 32: 32 * sum(sc_g * b_g), groups in pairs.
                for (qi, pair) in pairs.iter().enumerate() {
                    bias[k] = _mm512_dpwssd_epi32(bias[k], *pair, _mm512_set1_epi32(xs[k].sums[4 * n + qi]));
                }
            }
        }
        // SAFETY: 16 f32.
        let d = unsafe { _mm512_loadu_ps(w.d.as_ptr().add(at * PANEL)) };
        for k in 0..R {
            let s = _mm512_sub_epi32(total[k], _mm512_slli_epi32::<5>(bias[k]));
            acc[k][0] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(s)), _mm512_set1_ps(xs[k].d), acc[k][0]);
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish(acc: [__m512; 2]) -> __m512 {
        acc[0]
    }
}

/// Weight rows `cols` times activation rows `r..r + R`, each summed as
/// [`super::kquants::lane_dot`] sums it, passed to `put` a row at a time.
///
/// # Safety
/// The CPU must support AVX-512 VNNI ([`super::vnni::available`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dots<K: PanelStep, const R: usize>(
    w: &KPanelRows<K>,
    cols: std::ops::Range<usize>,
    acts: &KPanelActs,
    r: usize,
    mut put: impl FnMut(usize, [f64; R]),
) {
    let nb = w.per_row;
    assert!(acts.acts.per_row() == nb && r + R <= acts.acts.rows() && cols.end <= w.rows);
    let blocks = w.d.len() / PANEL;
    for p in cols.start / PANEL..cols.end.div_ceil(PANEL) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for b in 0..nb {
            // Weights stream from memory once per matmul: ask for them a few blocks ahead, as
            // the hardware's prefetchers alone leave the kernels waiting on DRAM.
            let ahead = (p * nb + b + PREFETCH).min(blocks - 1);
            // SAFETY: in bounds (block `ahead` exists); prefetches never fault.
            unsafe { prefetch(w, ahead) };
            let xs: [Act<'_>; R] = std::array::from_fn(|k| {
                let x = &acts.acts.row(r + k)[b];
                Act { qs: &x.qs, d: x.d, sums: &acts.sums[(r + k) * nb + b] }
            });
            // SAFETY: the caller's CPU has AVX-512 VNNI; block p * nb + b exists.
            unsafe { K::step(w, p * nb + b, xs, &mut acc) };
        }
        let rows: [[f32; PANEL]; R] = std::array::from_fn(|k| {
            let mut out = [0f32; PANEL];
            // SAFETY: 16 f32; unaligned store.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), <K as PanelStep>::finish(acc[k])) };
            out
        });
        for col in (p * PANEL).max(cols.start)..((p + 1) * PANEL).min(cols.end) {
            put(col, std::array::from_fn(|k| f64::from(rows[k][col % PANEL])));
        }
    }
}

/// Panel super-blocks between the one computed and the one prefetched.
const PREFETCH: usize = 4;

/// Asks for panel super-block `at`'s weights to be brought into cache.
///
/// # Safety
/// `at` must be a panel super-block of `w`.
#[inline]
#[target_feature(enable = "sse")]
unsafe fn prefetch<K: KPanel>(w: &KPanelRows<K>, at: usize) {
    // SAFETY: the caller's block exists, so these addresses lie inside the vectors.
    unsafe {
        let q = w.quants.as_ptr().add(at * K::BYTES);
        for line in (0..K::BYTES).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(q.add(line).cast());
        }
        let sc = w.scales.as_ptr().add(at * K::SCALE_BYTES);
        for line in (0..K::SCALE_BYTES).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(sc.add(line).cast());
        }
        _mm_prefetch::<_MM_HINT_T0>(w.d.as_ptr().add(at * PANEL).cast());
        if K::HAS_MIN {
            _mm_prefetch::<_MM_HINT_T0>(w.mins.as_ptr().add(at * K::MIN_BYTES).cast());
            _mm_prefetch::<_MM_HINT_T0>(w.dmin.as_ptr().add(at * PANEL).cast());
        }
    }
}

/// Whether this CPU runs the kernels of this module.
pub fn available() -> bool {
    super::vnni::available() && is_x86_feature_detected!("avx512bw")
}

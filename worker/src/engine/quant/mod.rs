//! Block-quantized matrices multiplied on the CPU by herd's own kernels and threads.
//!
//! Q4_0, Q4_1 and Q8_0 run on SIMD kernels chosen at run time ([`vnni`] where the CPU has
//! AVX-512 VNNI, else [`avx2`], else the portable [`scalar`] ones), and so do the K-quants of
//! Q4_K_M and Q5_K_M files: Q4_K, Q5_K and Q6_K ([`kquants`], [`ksimd`]); the other GGUF formats
//! use candle's dot products. A row is summed one of two ways
//! ([`Sums`]): in llama.cpp's order, so that a quantized model computes what llama.cpp computes,
//! or exactly, each block's value added in f64, so that a row-parallel layer split over ranks
//! (o_proj, down_proj) adds up to the same result whatever the split: those layers return the
//! f64 sums, the ranks all-reduce them, and the model rounds once.

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod kpanels;
pub mod kquants;
#[cfg(target_arch = "x86_64")]
pub mod ksimd;
#[cfg(target_arch = "x86_64")]
pub mod panels;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod vnni;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, GgmlType,
};
use candle_core::{DType, Device, Tensor};

use std::ops::Range;
use std::sync::Arc;

use super::pool::{ComputePool, Results};
use scalar::{ActRow, ActRows, Q4_0, Q4_1, Q8_0, QK, WeightRow, WeightRows};

/// A weight format herd has its own kernels for.
#[cfg(target_arch = "x86_64")]
pub trait NativeQuants: avx2::Avx2Quants + vnni::VnniQuants {}
#[cfg(target_arch = "x86_64")]
impl<T: avx2::Avx2Quants + vnni::VnniQuants> NativeQuants for T {}
/// A weight format herd has its own kernels for.
#[cfg(not(target_arch = "x86_64"))]
pub trait NativeQuants: scalar::Quants {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: scalar::Quants> NativeQuants for T {}

/// Which implementation of the native kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 VNNI for matrices (interleaved at load), AVX2 for [`Kernels::dot`]'s plain rows.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernels {
    /// The fastest kernels this CPU runs.
    pub fn detect() -> Self {
        Self::available().pop().unwrap_or(Self::Portable)
    }

    /// Every implementation this CPU runs, the portable one first.
    pub fn available() -> Vec<Self> {
        let all = [
            Self::Portable,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2,
            #[cfg(target_arch = "x86_64")]
            Self::Vnni,
        ];
        all.into_iter().filter(|k| k.supported()).collect()
    }

    /// Whether this CPU runs these kernels.
    pub fn supported(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => vnni::available(),
        }
    }

    /// A weight row's dot products with `R` rows of quantized activations; each row's result is
    /// the same whatever `R` is.
    pub fn dot<Q: NativeQuants, const R: usize>(self, w: &WeightRow<'_, Q>, xs: [&ActRow<'_>; R]) -> [f64; R] {
        match self {
            // SAFETY: the guard checks that the CPU has AVX2 (a VNNI CPU has it too).
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 | Self::Vnni if avx2::available() => unsafe { avx2::dot(w, xs) },
            // Also for kernels this CPU lacks, asked for anyway: the portable ones give the same sums.
            _ => xs.map(|x| scalar::dot(w, x)),
        }
    }

    /// Like [`Kernels::dot`], summed in llama.cpp's order ([`scalar::lane_dot`]).
    pub fn lane_dot<Q: NativeQuants, const R: usize>(self, w: &WeightRow<'_, Q>, xs: [&ActRow<'_>; R]) -> [f32; R] {
        match self {
            // SAFETY: as in `dot`.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 | Self::Vnni if avx2::available() => unsafe { avx2::lane_dot(w, xs) },
            _ => xs.map(|x| scalar::lane_dot(w, x)),
        }
    }

    /// Like [`Kernels::dot`], summed per block as llama.cpp's repacked kernels do
    /// ([`scalar::block_dot`]).
    pub fn block_dot<Q: NativeQuants, const R: usize>(self, w: &WeightRow<'_, Q>, xs: [&ActRow<'_>; R]) -> [f32; R] {
        match self {
            // SAFETY: as in `dot`.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 | Self::Vnni if avx2::available() => unsafe { avx2::block_dot(w, xs) },
            _ => xs.map(|x| scalar::block_dot(w, x)),
        }
    }

    /// Quantizes the `m` rows of `x`, `per_row` blocks each.
    fn quantize_rows(self, x: &[f32], m: usize, per_row: usize) -> ActRows {
        let mut acts = ActRows::zeros(m, per_row);
        self.quantize(&x[..acts.qs.len() * QK], &mut acts.qs, &mut acts.d, &mut acts.s);
        acts
    }

    /// Quantizes activations (`qs.len() * 32` values) to 8-bit blocks.
    pub fn quantize(self, x: &[f32], qs: &mut [[i8; QK]], d: &mut [f64], s: &mut [f64]) {
        match self {
            // SAFETY: as in `dot`.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 | Self::Vnni if avx2::available() => unsafe { avx2::quantize(x, qs, d, s) },
            _ => scalar::quantize(x, qs, d, s),
        }
    }
}

/// How a row's block products are added up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sums {
    /// In f32, in the order of llama.cpp's CPU kernels on x86: per block where llama.cpp
    /// repacks the matrix ([`scalar::block_dot`]), else in lanes ([`scalar::lane_dot`]).
    Llama,
    /// Exactly, in f64, so that sums over parts of a row add up to the whole row's.
    Exact,
}

/// Weight rows of one format, and the quantized activations they multiply.
trait Rows: Send + Sync + 'static {
    type Acts: Send + Sync;
    /// Blocks per row.
    fn per_row(&self) -> usize;
    /// Quantizes the `m` rows of `x` (cheap next to the matmul: not worth threads).
    fn quantize(&self, x: &[f32], m: usize) -> Self::Acts;
    /// Weight rows `cols` times activation rows `r..r + N`, passed to `put` a weight row at a
    /// time; each value is the same whatever `N` is.
    fn dots<const N: usize>(&self, cols: Range<usize>, acts: &Self::Acts, r: usize, put: impl FnMut(usize, [f64; N]));
    /// Weight rows the kernels compute together: chunks of a matmul start at multiples of it.
    fn align(&self) -> usize {
        1
    }
}

/// An empty vector with room for `n` values, whose memory the OS is asked to back with huge
/// pages: weights are streamed from memory at every step, and 4 KiB pages cost a TLB miss every
/// 4 KiB (dearer in virtual machines). The OS may not find huge pages; nothing depends on it.
pub(crate) fn weight_vec<T>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    let bytes = n * size_of::<T>();
    #[cfg(target_os = "linux")]
    if bytes >= 1 << 21 {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let start = (v.as_ptr() as usize).next_multiple_of(page);
        let end = (v.as_ptr() as usize + bytes) / page * page;
        if end > start {
            // SAFETY: the range lies inside the vector's own, still unused allocation; the
            // advice changes only how the kernel backs it.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// Copies GGUF's packed blocks into a vector of `T`; `None` when the sizes disagree.
fn blocks_from_bytes<T>(bytes: &[u8], n: usize) -> Option<Vec<T>> {
    if bytes.len() != n * size_of::<T>() {
        return None;
    }
    let mut data: Vec<T> = Vec::with_capacity(n);
    // SAFETY: candle's block types are #[repr(C)] structs of f16 and integer arrays, valid for
    // any bit pattern, and `bytes` holds exactly `n` of them in GGUF's layout; the copy
    // initialises all `n` elements before the length is set.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), data.as_mut_ptr().cast::<u8>(), bytes.len());
        data.set_len(n);
    }
    Some(data)
}

/// Rows in a format with herd's kernels.
struct Native<Q> {
    rows: WeightRows<Q>,
    kernels: Kernels,
    sums: Sums,
    /// Whether llama.cpp's order is per block ([`scalar::Quants::REPACKED`]).
    blocks: bool,
}

impl<Q: NativeQuants> Rows for Native<Q> {
    type Acts = ActRows;
    fn per_row(&self) -> usize {
        self.rows.per_row()
    }
    fn quantize(&self, x: &[f32], m: usize) -> ActRows {
        self.kernels.quantize_rows(x, m, self.per_row())
    }
    fn dots<const N: usize>(&self, cols: Range<usize>, acts: &ActRows, r: usize, mut put: impl FnMut(usize, [f64; N])) {
        let x: [ActRow<'_>; N] = std::array::from_fn(|k| acts.row(r + k));
        for col in cols {
            let (w, xs) = (self.rows.row(col), std::array::from_fn(|k| &x[k]));
            put(
                col,
                match self.sums {
                    Sums::Llama if self.blocks => self.kernels.block_dot(&w, xs).map(f64::from),
                    Sums::Llama => self.kernels.lane_dot(&w, xs).map(f64::from),
                    Sums::Exact => self.kernels.dot(&w, xs),
                },
            );
        }
    }
}

/// Rows in a format with herd's kernels, interleaved for the VNNI kernels.
#[cfg(target_arch = "x86_64")]
struct Interleaved<Q> {
    rows: vnni::VnniRows<Q>,
}

#[cfg(target_arch = "x86_64")]
impl<Q: NativeQuants> Rows for Interleaved<Q> {
    type Acts = vnni::VnniActs;
    fn per_row(&self) -> usize {
        self.rows.per_row()
    }
    fn quantize(&self, x: &[f32], m: usize) -> Self::Acts {
        vnni::VnniActs::new(&Kernels::Vnni.quantize_rows(x, m, self.per_row()))
    }
    fn dots<const N: usize>(&self, cols: Range<usize>, acts: &Self::Acts, r: usize, put: impl FnMut(usize, [f64; N])) {
        // SAFETY: `Interleaved` is only built when the CPU has VNNI (`native`).
        unsafe { vnni::dots::<Q, N>(&self.rows, cols, acts, r, put) }
    }
}

/// Rows in a format with herd's kernels, in panels for the VNNI kernels that sum in llama.cpp's
/// order.
#[cfg(target_arch = "x86_64")]
struct Panels<Q> {
    rows: panels::PanelRows<Q>,
}

#[cfg(target_arch = "x86_64")]
impl<Q: NativeQuants> Rows for Panels<Q> {
    type Acts = panels::PanelActs;
    fn per_row(&self) -> usize {
        self.rows.per_row()
    }
    fn quantize(&self, x: &[f32], m: usize) -> Self::Acts {
        panels::PanelActs::new(Kernels::Vnni.quantize_rows(x, m, self.per_row()))
    }
    fn dots<const N: usize>(&self, cols: Range<usize>, acts: &Self::Acts, r: usize, put: impl FnMut(usize, [f64; N])) {
        // SAFETY: `Panels` is only built when the CPU has VNNI (`native`).
        unsafe { panels::dots::<Q, N>(&self.rows, cols, acts, r, put) }
    }
    fn align(&self) -> usize {
        panels::PANEL
    }
}

/// Rows of a repacked format ([`scalar::Quants::REPACKED`]) in panels for the VNNI kernels that sum per
/// block.
#[cfg(target_arch = "x86_64")]
struct BlockPanels<Q> {
    rows: panels::BlockPanelRows<Q>,
}

#[cfg(target_arch = "x86_64")]
impl<Q: NativeQuants> Rows for BlockPanels<Q> {
    type Acts = panels::BlockPanelActs;
    fn per_row(&self) -> usize {
        self.rows.per_row()
    }
    fn quantize(&self, x: &[f32], m: usize) -> Self::Acts {
        panels::BlockPanelActs::new::<Q>(Kernels::Vnni.quantize_rows(x, m, self.per_row()))
    }
    fn dots<const N: usize>(&self, cols: Range<usize>, acts: &Self::Acts, r: usize, put: impl FnMut(usize, [f64; N])) {
        // SAFETY: `BlockPanels` is only built when the CPU has VNNI (`native`).
        unsafe { panels::block_dots::<Q, N>(&self.rows, cols, acts, r, put) }
    }
    fn align(&self) -> usize {
        panels::BLOCK_PANEL
    }
}

/// A K-quant format herd has its own kernels for.
#[cfg(target_arch = "x86_64")]
pub trait NativeKQuants: ksimd::KSimd {}
#[cfg(target_arch = "x86_64")]
impl<T: ksimd::KSimd> NativeKQuants for T {}
/// A K-quant format herd has its own kernels for.
#[cfg(not(target_arch = "x86_64"))]
pub trait NativeKQuants: kquants::KQuants {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: kquants::KQuants> NativeKQuants for T {}

impl Kernels {
    /// A K-quant weight row's dot products with `R` activation rows, summed in llama.cpp's
    /// order ([`kquants::lane_dot`]); every implementation gives the same bits.
    pub fn k_lane_dot<K: NativeKQuants, const R: usize>(self, w: &[K], xs: [&[kquants::Q8K]; R]) -> [f32; R] {
        match self {
            // SAFETY: the guards check the CPU's features.
            #[cfg(target_arch = "x86_64")]
            Self::Vnni if vnni::available() => unsafe { ksimd::lane_dots_vnni(w, xs) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 | Self::Vnni if avx2::available() => unsafe { ksimd::lane_dots_avx2(w, xs) },
            _ => xs.map(|x| kquants::lane_dot(w, x)),
        }
    }
}

/// Rows in a K-quant format with herd's kernels.
struct KNative<K> {
    rows: kquants::KRows<K>,
    kernels: Kernels,
    sums: Sums,
}

impl<K: NativeKQuants> Rows for KNative<K> {
    type Acts = kquants::KActs;
    fn per_row(&self) -> usize {
        self.rows.per_row()
    }
    fn quantize(&self, x: &[f32], m: usize) -> Self::Acts {
        kquants::KActs::new(x, m, self.per_row())
    }
    fn dots<const N: usize>(
        &self,
        cols: Range<usize>,
        acts: &Self::Acts,
        r: usize,
        mut put: impl FnMut(usize, [f64; N]),
    ) {
        let xs: [&[kquants::Q8K]; N] = std::array::from_fn(|k| acts.row(r + k));
        for col in cols {
            let w = self.rows.row(col);
            put(
                col,
                match self.sums {
                    Sums::Llama => self.kernels.k_lane_dot(w, xs).map(f64::from),
                    Sums::Exact => xs.map(|x| kquants::dot(w, x)),
                },
            );
        }
    }
}

/// K-quant rows in panels for the VNNI kernels.
#[cfg(target_arch = "x86_64")]
struct KPanels<K> {
    rows: kpanels::KPanelRows<K>,
}

#[cfg(target_arch = "x86_64")]
impl<K: kpanels::PanelStep> Rows for KPanels<K> {
    type Acts = kpanels::KPanelActs;
    fn per_row(&self) -> usize {
        self.rows.per_row()
    }
    fn quantize(&self, x: &[f32], m: usize) -> Self::Acts {
        kpanels::KPanelActs::new::<K>(kquants::KActs::new(x, m, self.per_row()))
    }
    fn dots<const N: usize>(&self, cols: Range<usize>, acts: &Self::Acts, r: usize, put: impl FnMut(usize, [f64; N])) {
        // SAFETY: `KPanels` is only built when the CPU has the kernels' features (`k_panels`).
        unsafe { kpanels::dots::<K, N>(&self.rows, cols, acts, r, put) }
    }
    fn align(&self) -> usize {
        kpanels::PANEL
    }
}

/// Q4_K or Q6_K rows in panels, where the CPU has VNNI and rows sum in llama.cpp's order.
#[cfg(target_arch = "x86_64")]
fn k_panels<K: kpanels::PanelStep>(
    bytes: &[u8],
    out: usize,
    per_row: usize,
    kernels: Kernels,
    sums: Sums,
) -> Option<Arc<dyn MatMul>> {
    if kernels != Kernels::Vnni || sums != Sums::Llama || !kpanels::available() {
        return None;
    }
    let rows = kpanels::KPanelRows::<K>::from_gguf(bytes, per_row).filter(|r| r.rows() == out)?;
    Some(Arc::new(KPanels { rows }))
}

/// No panels off x86.
#[cfg(not(target_arch = "x86_64"))]
fn k_panels<K>(_: &[u8], _: usize, _: usize, _: Kernels, _: Sums) -> Option<Arc<dyn MatMul>> {
    None
}

fn k_native<K: NativeKQuants>(
    bytes: &[u8],
    out: usize,
    per_row: usize,
    kernels: Kernels,
    sums: Sums,
) -> Option<Arc<dyn MatMul>> {
    let rows = kquants::KRows::<K>::from_gguf(bytes, per_row).filter(|r| r.rows() == out)?;
    Some(Arc::new(KNative { rows, kernels, sums }))
}

/// Rows in another GGUF format, through candle's dot products: over whole rows (candle's own
/// order, which follows llama.cpp's for most formats) or summed exactly per block or pair.
struct Candle<T: GgmlType> {
    data: Vec<T>,
    per_row: usize,
    sums: Sums,
}

/// Blocks per `vec_dot` call: candle's Q4_1, Q5_0 and Q5_1 kernels take blocks in pairs.
fn candle_group<T: GgmlType>() -> usize {
    match T::DTYPE {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => 2,
        _ => 1,
    }
}

impl<T: GgmlType + 'static> Rows for Candle<T> {
    type Acts = Vec<T::VecDotType>;
    fn per_row(&self) -> usize {
        self.per_row
    }
    fn quantize(&self, x: &[f32], m: usize) -> Self::Acts {
        let mut acts = vec![T::VecDotType::zeros(); m * self.per_row];
        T::VecDotType::from_float(&x[..acts.len() * T::BLCK_SIZE], &mut acts);
        acts
    }
    fn dots<const N: usize>(
        &self,
        cols: Range<usize>,
        acts: &Self::Acts,
        r: usize,
        mut put: impl FnMut(usize, [f64; N]),
    ) {
        let g = candle_group::<T>();
        for col in cols {
            let w = &self.data[col * self.per_row..][..self.per_row];
            put(
                col,
                std::array::from_fn(|k| {
                    let x = &acts[(r + k) * self.per_row..][..self.per_row];
                    if self.sums == Sums::Llama {
                        return f64::from(T::vec_dot(self.per_row * T::BLCK_SIZE, w, x));
                    }
                    w.chunks_exact(g)
                        .zip(x.chunks_exact(g))
                        .map(|(w, x)| f64::from(T::vec_dot(g * T::BLCK_SIZE, w, x)))
                        .sum()
                }),
            );
        }
    }
}

/// Weight blocks per chunk of a parallel matmul: some microseconds of work, so that a thread
/// delayed by another process holds up little.
const CHUNK_BLOCKS: usize = 8192;

/// Activation rows per chunk at most: a prompt's many rows are cut into tiles, so that a chunk's
/// activations and weight rows stay in cache while each meets all of the other.
const ROW_TILE: usize = 64;

/// Weight rows per chunk at least, where the row tile is large: each activation row loaded is
/// used for this many weight rows.
const MIN_COLS: usize = 32;

/// Computes rows `r..r + N` of columns `cols` of an `(m, out)` result; returns `N`.
fn fill<R: Rows, const N: usize>(
    rows: &R,
    acts: &R::Acts,
    cols: Range<usize>,
    r: usize,
    results: &Results,
    out: usize,
) -> usize {
    rows.dots::<N>(cols, acts, r, |col, values| {
        for (k, v) in values.into_iter().enumerate() {
            results.set((r + k) * out + col, v);
        }
    });
    N
}

/// The object-safe face of [`Rows`].
trait MatMul: Send + Sync {
    /// `x` is `(m, in)` row-major; writes the `(m, out)` row-major sums to `y`.
    fn matmul(self: Arc<Self>, x: &[f32], m: usize, out: usize, pool: &ComputePool, y: Arc<Results>);
}

impl<R: Rows> MatMul for R {
    fn matmul(self: Arc<Self>, x: &[f32], m: usize, out: usize, pool: &ComputePool, y: Arc<Results>) {
        let acts = self.quantize(x, m);
        // Chunks of about CHUNK_BLOCKS blocks (more for long prompts), and several per thread
        // to even out the ends.
        let tile = m.clamp(1, ROW_TILE);
        let per_col = tile * self.per_row();
        let cols_per_chunk = (CHUNK_BLOCKS / per_col.max(1))
            .max(if tile == ROW_TILE { MIN_COLS } else { 1 })
            .clamp(1, (out / (pool.threads() * 4)).max(1))
            .next_multiple_of(self.align());
        let col_chunks = out.div_ceil(cols_per_chunk);
        // The job owns what it reads and writes: a helper may finish a chunk after `run` returns.
        pool.run(
            col_chunks * m.div_ceil(tile),
            Arc::new(move |c: usize| {
                let (rows, cols) = (c / col_chunks * tile, c % col_chunks * cols_per_chunk);
                let cols = cols..(cols + cols_per_chunk).min(out);
                let end = (rows + tile).min(m);
                // Activation rows four at a time share each weight block's unpacking (eight
                // measured no faster).
                let mut r = rows;
                while r < end {
                    r += match end - r {
                        4.. => fill::<R, 4>(&self, &acts, cols.clone(), r, &y, out),
                        _ => fill::<R, 1>(&self, &acts, cols.clone(), r, &y, out),
                    };
                }
            }),
        );
    }
}

/// A block-quantized `(out, in)` matrix applied as `x @ W^T` on the CPU.
pub struct QuantMatrix {
    rows: Arc<dyn MatMul>,
    out: usize,
    inp: usize,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantMatrix({}x{})", self.out, self.inp)
    }
}

fn native<Q: NativeQuants>(
    bytes: &[u8],
    out: usize,
    per_row: usize,
    kernels: Kernels,
    sums: Sums,
) -> Option<Arc<dyn MatMul>> {
    let rows = WeightRows::<Q>::from_gguf(bytes, per_row).filter(|_| bytes.len() == out * per_row * Q::GGUF_BYTES)?;
    let blocks = Q::REPACKED && out.is_multiple_of(8);
    #[cfg(target_arch = "x86_64")]
    if kernels == Kernels::Vnni && vnni::available() {
        return Some(match sums {
            Sums::Exact => Arc::new(Interleaved { rows: vnni::VnniRows::new(&rows) }),
            Sums::Llama if blocks => Arc::new(BlockPanels { rows: panels::BlockPanelRows::new(&rows) }),
            Sums::Llama => Arc::new(Panels { rows: panels::PanelRows::new(&rows) }),
        });
    }
    Some(Arc::new(Native { rows, kernels, sums, blocks }))
}

fn candle<T: GgmlType + 'static>(bytes: &[u8], out: usize, inp: usize, sums: Sums) -> Option<Arc<dyn MatMul>> {
    if !inp.is_multiple_of(T::BLCK_SIZE * candle_group::<T>()) {
        return None;
    }
    let per_row = inp / T::BLCK_SIZE;
    Some(Arc::new(Candle::<T> { data: blocks_from_bytes(bytes, out * per_row)?, per_row, sums }))
}

impl QuantMatrix {
    /// Wraps raw GGUF blocks of an `(out, in)` matrix, for `kernels`, its rows summed as `sums`
    /// says; `None` for encodings or shapes it does not cover.
    pub fn from_gguf(
        dtype: GgmlDType,
        bytes: &[u8],
        [out, inp]: [usize; 2],
        kernels: Kernels,
        sums: Sums,
    ) -> Option<Self> {
        let per_row = inp / scalar::QK;
        let native_shape = inp.is_multiple_of(scalar::QK);
        let (k_per_row, k_shape) = (inp / kquants::QK_K, inp.is_multiple_of(kquants::QK_K));
        let rows = match dtype {
            GgmlDType::Q4_0 if native_shape => native::<Q4_0>(bytes, out, per_row, kernels, sums),
            GgmlDType::Q4_1 if native_shape => native::<Q4_1>(bytes, out, per_row, kernels, sums),
            GgmlDType::Q8_0 if native_shape => native::<Q8_0>(bytes, out, per_row, kernels, sums),
            GgmlDType::Q5_0 => candle::<BlockQ5_0>(bytes, out, inp, sums),
            GgmlDType::Q5_1 => candle::<BlockQ5_1>(bytes, out, inp, sums),
            GgmlDType::Q2K => candle::<BlockQ2K>(bytes, out, inp, sums),
            GgmlDType::Q3K => candle::<BlockQ3K>(bytes, out, inp, sums),
            GgmlDType::Q4K if k_shape => k_panels::<kquants::Q4K>(bytes, out, k_per_row, kernels, sums)
                .or_else(|| k_native::<kquants::Q4K>(bytes, out, k_per_row, kernels, sums)),
            GgmlDType::Q5K if k_shape => k_native::<kquants::Q5K>(bytes, out, k_per_row, kernels, sums),
            GgmlDType::Q6K if k_shape => k_panels::<kquants::Q6K>(bytes, out, k_per_row, kernels, sums)
                .or_else(|| k_native::<kquants::Q6K>(bytes, out, k_per_row, kernels, sums)),
            GgmlDType::Q4K => candle::<BlockQ4K>(bytes, out, inp, sums),
            GgmlDType::Q5K => candle::<BlockQ5K>(bytes, out, inp, sums),
            GgmlDType::Q6K => candle::<BlockQ6K>(bytes, out, inp, sums),
            _ => None,
        }?;
        Some(Self { rows, out, inp })
    }

    /// `x @ W^T` for `x` of shape `(.., in)`: `(.., out)` in f64 (exact block sums) when
    /// `dtype` is F64, else rounded to f32.
    pub fn forward(&self, x: &Tensor, pool: &ComputePool, dtype: DType) -> candle_core::Result<Tensor> {
        let m = x.elem_count() / self.inp;
        let x = x.to_dtype(DType::F32)?;
        let wide = dtype == DType::F64;
        let n = m * self.out;
        let y = Arc::new(if wide { Results::new(n) } else { Results::new_f32(n) });
        super::host::with_values(&x, |x| self.rows.clone().matmul(x, m, self.out, pool, y.clone()))?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.out;
        }
        if wide {
            Tensor::from_vec(y.to_vec(), dims, &Device::Cpu)
        } else {
            Tensor::from_vec(Results::take_f32(y), dims, &Device::Cpu)
        }
    }
}

#[cfg(test)]
mod tests;

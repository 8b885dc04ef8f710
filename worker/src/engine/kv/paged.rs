//! Attention over the paged cache as one op: every query row of a step, every head, keys and
//! values read through the block tables without gathering the cache, each row seeing the
//! positions of its sequence up to its own. On CUDA it runs `kernels/paged_attention.cu` (a
//! kernel for decodes, one for prompt chunks); on the CPU, their twin below, so that the CPU
//! tests check what the kernels are asked to compute.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

/// Positions a tile holds (the decode kernel's `TILE`): the softmax runs over tiles, rescaling
/// what earlier tiles summed, so that shared memory holds one tile's scores whatever the length.
const TILE: usize = 1024;

/// The op, applied to `q (rows, heads, dim)` and the layer's caches `(blocks, block_size,
/// kv_heads * dim)`; gives `(rows, heads, dim)`.
#[derive(Debug, Clone)]
pub struct PagedAttention {
    /// Each sequence's block ids, `max_blocks` a row (padded with any block).
    pub tables: Vec<u32>,
    pub max_blocks: usize,
    /// Each query row's sequence (its row of `tables`); a sequence's rows are consecutive and in
    /// the order of their positions.
    pub rows: Vec<u32>,
    /// The positions each query row attends to (its own and those before it).
    pub lens: Vec<u32>,
    pub scale: f32,
}

impl PagedAttention {
    /// The attention of `q` over caches `k` and `v`.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        q.apply_op3_no_bwd(k, v, self)
    }

    /// Query rows, heads, head size, block size and KV heads, checked against the tables.
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
        let (rows, heads, dim) = q.shape().dims3()?;
        let (_, bs, width) = k.shape().dims3()?;
        if v.shape() != k.shape() || width % dim != 0 || heads % (width / dim) != 0 {
            bail!("paged attention: q {:?}, k {:?}, v {:?} do not fit together", q.shape(), k.shape(), v.shape());
        }
        let seqs = self.tables.len() / self.max_blocks.max(1);
        if self.rows.len() != rows || self.lens.len() != rows || self.tables.len() != seqs * self.max_blocks {
            bail!(
                "paged attention: {rows} query rows, {} sequences of rows, {} lengths",
                self.rows.len(),
                self.lens.len()
            );
        }
        if self.rows.iter().any(|&s| s as usize >= seqs) {
            bail!("paged attention: a row of a sequence past the {seqs} tables");
        }
        if self.lens.iter().any(|&n| n == 0 || n as usize > self.max_blocks * bs) {
            bail!("paged attention: a length outside 1..={}", self.max_blocks * bs);
        }
        Ok((rows, heads, dim, bs, width / dim))
    }

    /// Whether every row is its sequence's only one, in order (a step of decodes).
    #[cfg(any(feature = "cuda", test))]
    fn decodes(&self) -> bool {
        self.tables.len() == self.rows.len() * self.max_blocks
            && self.rows.iter().enumerate().all(|(i, &s)| s as usize == i)
    }
}

/// A contiguous layout's values.
fn values<'a>(data: &'a [f32], layout: &Layout) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("paged attention takes contiguous tensors"),
    }
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "herd-paged-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else {
            bail!("paged attention on the CPU takes f32")
        };
        let (q, k, v) = (values(q, ql)?, values(k, kl)?, values(v, vl)?);
        let (rows, heads, dim, bs, kv_heads) = self.dims(ql, kl, vl)?;
        let mut out = vec![0f32; rows * heads * dim];
        let mut scores = vec![0f32; TILE];
        let mut acc = vec![0f32; dim];
        for s in 0..rows {
            let table = &self.tables[self.rows[s] as usize * self.max_blocks..][..self.max_blocks];
            let len = self.lens[s] as usize;
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let qh = &q[(s * heads + h) * dim..][..dim];
                let row = |p: usize| ((table[p / bs] as usize * bs + p % bs) * kv_heads + g) * dim;
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                acc.fill(0.0);
                for base in (0..len).step_by(TILE) {
                    let n = TILE.min(len - base);
                    let mut most = f32::NEG_INFINITY;
                    for (i, sc) in scores[..n].iter_mut().enumerate() {
                        let kr = &k[row(base + i)..][..dim];
                        *sc = qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * self.scale;
                        most = most.max(*sc);
                    }
                    let next = m.max(most);
                    let keep = (m - next).exp();
                    let mut sum = 0f32;
                    for sc in &mut scores[..n] {
                        *sc = (*sc - next).exp();
                        sum += *sc;
                    }
                    l = l * keep + sum;
                    acc.iter_mut().for_each(|a| *a *= keep);
                    m = next;
                    for (i, &w) in scores[..n].iter().enumerate() {
                        let vr = &v[row(base + i)..][..dim];
                        acc.iter_mut().zip(vr).for_each(|(a, x)| *a += w * x);
                    }
                }
                let o = &mut out[(s * heads + h) * dim..][..dim];
                o.iter_mut().zip(&acc).for_each(|(o, a)| *o = a / l);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, heads, dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let dev = qs.device().clone();
        let dims = self.dims(ql, kl, vl)?;
        let call = Launch::new(self, &dev, dims)?;
        let kernel = if self.decodes() { "paged_attention" } else { "paged_prefill" };
        let slice = match (&qs.slice, &ks.slice, &vs.slice) {
            (S::F32(q), S::F32(k), S::F32(v)) => {
                S::F32(call.run(&format!("{kernel}_f32"), (q, ql), (k, kl), (v, vl))?)
            }
            (S::F16(q), S::F16(k), S::F16(v)) => {
                S::F16(call.run(&format!("{kernel}_f16"), (q, ql), (k, kl), (v, vl))?)
            }
            (S::BF16(q), S::BF16(k), S::BF16(v)) => {
                S::BF16(call.run(&format!("{kernel}_bf16"), (q, ql), (k, kl), (v, vl))?)
            }
            _ => bail!("paged attention takes f32, f16 or bf16, all alike, got {:?}", qs.dtype()),
        };
        let (rows, heads, dim, ..) = dims;
        Ok((candle_core::CudaStorage { slice, device: dev }, Shape::from((rows, heads, dim))))
    }
}

/// The kernel's PTX, compiled by `build.rs` with nvcc.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));

/// Keys a prompt tile takes at a time (the prefill kernel's `KTILE`).
#[cfg(feature = "cuda")]
const KTILE: usize = 32;

/// One launch of a kernel: what every dtype's call shares, on the device.
#[cfg(feature = "cuda")]
struct Launch<'a> {
    op: &'a PagedAttention,
    dev: &'a candle_core::cuda_backend::CudaDevice,
    dims: (usize, usize, usize, usize, usize),
    tables: Slice<u32>,
    rows: Slice<u32>,
    lens: Slice<u32>,
    /// For prompt rows: query rows per tile, and each tile's first row and row count.
    qrows: usize,
    tiles: Option<(Slice<u32>, Slice<u32>)>,
}

#[cfg(feature = "cuda")]
type Slice<T> = candle_core::cuda_backend::cudarc::driver::CudaSlice<T>;

#[cfg(feature = "cuda")]
impl<'a> Launch<'a> {
    /// Copies the tables and lengths to the device, and for prompt rows cuts them into tiles.
    fn new(
        op: &'a PagedAttention,
        dev: &'a candle_core::cuda_backend::CudaDevice,
        dims: (usize, usize, usize, usize, usize),
    ) -> Result<Self> {
        use candle_core::cuda_backend::WrapErr;
        let stream = dev.cuda_stream();
        let up = |v: &[u32]| stream.clone_htod(v).w();
        // Shared memory holds a tile's queries and outputs: fewer rows for wider heads.
        let qrows = if dims.2 <= 128 { 16 } else { 4 };
        let tiles = if op.decodes() {
            None
        } else {
            let (mut first, mut count) = (Vec::new(), Vec::<u32>::new());
            for (r, &s) in op.rows.iter().enumerate() {
                let last = first.last().map(|&f: &u32| (op.rows[f as usize], count[count.len() - 1]));
                match last {
                    Some((seq, n)) if seq == s && (n as usize) < qrows => *count.last_mut().expect("a tile") += 1,
                    _ => {
                        first.push(r as u32);
                        count.push(1);
                    }
                }
            }
            Some((up(&first)?, up(&count)?))
        };
        Ok(Self { op, dev, dims, tables: up(&op.tables)?, rows: up(&op.rows)?, lens: up(&op.lens)?, qrows, tiles })
    }

    /// Runs kernel `name` on `q`, `k` and `v` (contiguous), into a new buffer.
    fn run<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        name: &str,
        (q, ql): (&Slice<T>, &Layout),
        (k, kl): (&Slice<T>, &Layout),
        (v, vl): (&Slice<T>, &Layout),
    ) -> Result<Slice<T>> {
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let part = |l: &Layout| l.contiguous_offsets().ok_or_else(|| candle_core::Error::msg("not contiguous"));
        let ((q0, q1), (k0, k1), (v0, v1)) = (part(ql)?, part(kl)?, part(vl)?);
        let (q, k, v) = (q.slice(q0..q1), k.slice(k0..k1), v.slice(v0..v1));
        let (rows, heads, dim, bs, kv_heads) = self.dims;
        let func = self.dev.get_or_load_custom_func(name, "herd_paged_attention", PTX)?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { self.dev.alloc::<T>(rows * heads * dim) }?;
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&self.tables);
        let cfg = match &self.tiles {
            None => {
                b.arg(&self.lens);
                // Each thread keeps two of the head's values; warps whole.
                let threads = dim.div_ceil(2).div_ceil(32).max(4) * 32;
                LaunchConfig {
                    grid_dim: (heads as u32, rows as u32, 1),
                    block_dim: (threads as u32, 1, 1),
                    shared_mem_bytes: ((dim + TILE + 32) * size_of::<f32>()) as u32,
                }
            }
            Some((first, count)) => {
                b.arg(&self.rows);
                b.arg(&self.lens);
                b.arg(first);
                b.arg(count);
                let q = self.qrows;
                LaunchConfig {
                    grid_dim: (heads as u32, first.len() as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: ((2 * q * dim + KTILE * dim + q * KTILE + 3 * q) * size_of::<f32>()) as u32,
                }
            }
        };
        b.arg(&out);
        let mut ints = vec![heads, kv_heads, dim, bs, self.op.max_blocks];
        if self.tiles.is_some() {
            ints.push(self.qrows);
        }
        let ints: Vec<i32> = ints.into_iter().map(|x| x as i32).collect();
        for x in &ints {
            b.arg(x);
        }
        b.arg(&self.op.scale);
        // SAFETY: the arguments match the kernel's signature, and every index it reads was
        // checked in `dims` (tables, rows and lengths) or by the caller (block ids within the cache).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Runs `op` on random values and compares it with a plain softmax over the gathered rows.
    fn check(op: &PagedAttention, blocks: usize, (heads, kv, dim, bs): (usize, usize, usize, usize)) {
        let rand = |n: usize| Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let (kc, vc) = (rand(blocks * bs * kv * dim), rand(blocks * bs * kv * dim));
        let seqs = op.lens.len();
        let q = rand(seqs * heads * dim);
        // Row `s`'s sequence.
        let seq = |s: usize| op.rows[s] as usize;
        let t = |x: &[f32], shape: (usize, usize, usize)| Tensor::from_slice(x, shape, &Device::Cpu).unwrap();
        let shape = (blocks, bs, kv * dim);
        let got = op.forward(&t(&q, (seqs, heads, dim)), &t(&kc, shape), &t(&vc, shape)).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for s in 0..seqs {
            for h in 0..heads {
                let g = h / (heads / kv);
                let row =
                    |p: usize| ((op.tables[seq(s) * op.max_blocks + p / bs] as usize * bs + p % bs) * kv + g) * dim;
                let qh = &q[(s * heads + h) * dim..][..dim];
                let scores: Vec<f32> = (0..op.lens[s] as usize)
                    .map(|p| qh.iter().zip(&kc[row(p)..][..dim]).map(|(a, b)| a * b).sum::<f32>() * op.scale)
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f32 = e.iter().sum();
                for d in 0..dim {
                    let want: f32 = e.iter().enumerate().map(|(p, w)| w * vc[row(p) + d]).sum::<f32>() / total;
                    let have = got[(s * heads + h) * dim + d];
                    assert!((want - have).abs() < 1e-4, "sequence {s}, head {h}: {have} vs {want}");
                }
            }
        }
    }

    #[test]
    fn the_op_attends_like_a_plain_softmax_over_the_gathered_rows() {
        // Two sequences of 3 and 5 positions over blocks of 2 rows; 4 query heads on 2 KV heads.
        let tables = vec![4, 1, 0, 5, 2, 3];
        let op =
            PagedAttention { tables: tables.clone(), max_blocks: 3, rows: vec![0, 1], lens: vec![3, 5], scale: 0.5 };
        assert!(op.decodes());
        check(&op, 6, (4, 2, 8, 2));
        // Prompt rows: the first sequence's last two positions and the second's three, each
        // row seeing up to its own.
        let op =
            PagedAttention { tables, max_blocks: 3, rows: vec![0, 0, 1, 1, 1], lens: vec![2, 3, 3, 4, 5], scale: 0.5 };
        assert!(!op.decodes());
        check(&op, 6, (4, 2, 8, 2));
        // Longer than a tile: later tiles rescale what earlier ones summed.
        let tables: Vec<u32> = (0..160).rev().collect();
        check(
            &PagedAttention { tables, max_blocks: 160, rows: vec![0], lens: vec![2500], scale: 0.3 },
            160,
            (2, 1, 8, 16),
        );
    }

    #[test]
    fn lengths_past_the_tables_are_refused() {
        let op = PagedAttention { tables: vec![0, 1], max_blocks: 2, rows: vec![0], lens: vec![5], scale: 1.0 };
        let t = |shape: (usize, usize, usize)| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(op.forward(&t((1, 2, 4)), &t((2, 2, 4)), &t((2, 2, 4))).is_err());
        let op = PagedAttention { lens: vec![4], rows: vec![1], ..op };
        assert!(op.forward(&t((1, 2, 4)), &t((2, 2, 4)), &t((2, 2, 4))).is_err(), "no second table");
    }
}

//! Decode attention over the paged cache as one op: every sequence's one query row, every
//! head, read through the block tables without gathering the cache. On CUDA it runs
//! `kernels/paged_attention.cu`; on the CPU, its twin below, tile for tile, so that the CPU
//! tests check what the kernel is asked to compute.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

/// Positions a tile holds (the kernel's `TILE`): the softmax runs over tiles, rescaling what
/// earlier tiles summed, so that shared memory holds one tile's scores whatever the length.
const TILE: usize = 1024;

/// The op, applied to `q (seqs, heads, dim)` and the layer's caches `(blocks, block_size,
/// kv_heads * dim)`; gives `(seqs, heads, dim)`.
#[derive(Debug, Clone)]
pub struct PagedAttention {
    /// Each sequence's block ids, `max_blocks` a row (padded with any block).
    pub tables: Vec<u32>,
    pub max_blocks: usize,
    /// The positions each sequence attends to.
    pub lens: Vec<u32>,
    pub scale: f32,
}

impl PagedAttention {
    /// The attention of `q` over caches `k` and `v`.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        q.apply_op3_no_bwd(k, v, self)
    }

    /// Sequences, heads, head size, block size and KV heads, checked against the tables.
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
        let (seqs, heads, dim) = q.shape().dims3()?;
        let (_, bs, width) = k.shape().dims3()?;
        if v.shape() != k.shape() || width % dim != 0 || heads % (width / dim) != 0 {
            bail!("paged attention: q {:?}, k {:?}, v {:?} do not fit together", q.shape(), k.shape(), v.shape());
        }
        if self.lens.len() != seqs || self.tables.len() != seqs * self.max_blocks {
            bail!(
                "paged attention: {} sequences, {} lengths, {} table entries",
                seqs,
                self.lens.len(),
                self.tables.len()
            );
        }
        if self.lens.iter().any(|&n| n == 0 || n as usize > self.max_blocks * bs) {
            bail!("paged attention: a length outside 1..={}", self.max_blocks * bs);
        }
        Ok((seqs, heads, dim, bs, width / dim))
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
        let (seqs, heads, dim, bs, kv_heads) = self.dims(ql, kl, vl)?;
        let mut out = vec![0f32; seqs * heads * dim];
        let mut scores = vec![0f32; TILE];
        let mut acc = vec![0f32; dim];
        for s in 0..seqs {
            let table = &self.tables[s * self.max_blocks..][..self.max_blocks];
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
        Ok((CpuStorage::F32(out), Shape::from((seqs, heads, dim))))
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
        use candle_core::cuda_backend::WrapErr;
        let dev = qs.device().clone();
        let dims = self.dims(ql, kl, vl)?;
        let stream = dev.cuda_stream();
        let tables = stream.clone_htod(&self.tables).w()?;
        let lens = stream.clone_htod(&self.lens).w()?;
        let call = Launch { op: self, dev: &dev, dims, tables: &tables, lens: &lens };
        let slice = match (&qs.slice, &ks.slice, &vs.slice) {
            (S::F32(q), S::F32(k), S::F32(v)) => S::F32(call.run("paged_attention_f32", (q, ql), (k, kl), (v, vl))?),
            (S::F16(q), S::F16(k), S::F16(v)) => S::F16(call.run("paged_attention_f16", (q, ql), (k, kl), (v, vl))?),
            (S::BF16(q), S::BF16(k), S::BF16(v)) => {
                S::BF16(call.run("paged_attention_bf16", (q, ql), (k, kl), (v, vl))?)
            }
            _ => bail!("paged attention takes f32, f16 or bf16, all alike, got {:?}", qs.dtype()),
        };
        let (seqs, heads, dim, ..) = dims;
        Ok((candle_core::CudaStorage { slice, device: dev }, Shape::from((seqs, heads, dim))))
    }
}

/// The kernel's PTX, compiled by `build.rs` with nvcc.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));

/// One launch of the kernel: what every dtype's call shares.
#[cfg(feature = "cuda")]
struct Launch<'a> {
    op: &'a PagedAttention,
    dev: &'a candle_core::cuda_backend::CudaDevice,
    dims: (usize, usize, usize, usize, usize),
    tables: &'a candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    lens: &'a candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
}

#[cfg(feature = "cuda")]
impl Launch<'_> {
    /// Runs kernel `name` on `q`, `k` and `v` (contiguous), into a new buffer.
    fn run<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        name: &str,
        (q, ql): (&candle_core::cuda_backend::cudarc::driver::CudaSlice<T>, &Layout),
        (k, kl): (&candle_core::cuda_backend::cudarc::driver::CudaSlice<T>, &Layout),
        (v, vl): (&candle_core::cuda_backend::cudarc::driver::CudaSlice<T>, &Layout),
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let part = |l: &Layout| l.contiguous_offsets().ok_or_else(|| candle_core::Error::msg("not contiguous"));
        let ((q0, q1), (k0, k1), (v0, v1)) = (part(ql)?, part(kl)?, part(vl)?);
        let (q, k, v) = (q.slice(q0..q1), k.slice(k0..k1), v.slice(v0..v1));
        let (seqs, heads, dim, bs, kv_heads) = self.dims;
        // Each thread keeps two of the head's values; warps whole.
        let threads = dim.div_ceil(2).div_ceil(32).max(4) * 32;
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, seqs as u32, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: ((dim + TILE + 32) * size_of::<f32>()) as u32,
        };
        let func = self.dev.get_or_load_custom_func(name, "herd_paged_attention", PTX)?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { self.dev.alloc::<T>(seqs * heads * dim) }?;
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(self.tables);
        b.arg(self.lens);
        b.arg(&out);
        let ints = [heads, kv_heads, dim, bs, self.op.max_blocks].map(|x| x as i32);
        for x in &ints {
            b.arg(x);
        }
        b.arg(&self.op.scale);
        // SAFETY: the arguments match the kernel's signature, and every index it reads was
        // checked in `dims` (tables and lengths) or by the caller (block ids within the cache).
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
        let t = |x: &[f32], shape: (usize, usize, usize)| Tensor::from_slice(x, shape, &Device::Cpu).unwrap();
        let shape = (blocks, bs, kv * dim);
        let got = op.forward(&t(&q, (seqs, heads, dim)), &t(&kc, shape), &t(&vc, shape)).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for s in 0..seqs {
            for h in 0..heads {
                let g = h / (heads / kv);
                let row = |p: usize| ((op.tables[s * op.max_blocks + p / bs] as usize * bs + p % bs) * kv + g) * dim;
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
        let op = PagedAttention { tables: vec![4, 1, 0, 5, 2, 3], max_blocks: 3, lens: vec![3, 5], scale: 0.5 };
        check(&op, 6, (4, 2, 8, 2));
        // Longer than a tile: later tiles rescale what earlier ones summed.
        let tables: Vec<u32> = (0..160).rev().collect();
        check(&PagedAttention { tables, max_blocks: 160, lens: vec![2500], scale: 0.3 }, 160, (2, 1, 8, 16));
    }

    #[test]
    fn lengths_past_the_tables_are_refused() {
        let op = PagedAttention { tables: vec![0, 1], max_blocks: 2, lens: vec![5], scale: 1.0 };
        let t = |shape: (usize, usize, usize)| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(op.forward(&t((1, 2, 4)), &t((2, 2, 4)), &t((2, 2, 4))).is_err());
    }
}

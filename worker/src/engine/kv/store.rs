//! One rank's keys and values of every block: plain vectors for the CPU's own attention loops,
//! laid out `[block][kv head][row][head_dim]` so that a head's rows of a block are contiguous;
//! tensors `(blocks, block_size, kv heads * head_dim)` for tensor attention (the layout of
//! paged flash attention kernels).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::BlockId;
use crate::engine::error::Result;

/// A layer's keys and values. Host vectors are shared with the attention job reading them, which
/// a straggling compute thread may still hold after the step (see [`crate::engine::pool`]).
enum Layer {
    Host { k: Arc<Vec<f32>>, v: Arc<Vec<f32>> },
    Device { k: Tensor, v: Tensor },
}

/// One rank's share of every block, for every layer.
pub struct KvStore {
    layers: Vec<Layer>,
    block_size: usize,
    heads: usize,
    dim: usize,
}

impl KvStore {
    /// Room for `blocks` blocks of `block_size` tokens of `heads` KV heads of `dim` values, in
    /// each of `layers` layers: host vectors (`host`) or zeroed tensors of `dtype` on `device`.
    /// Host memory is only touched as blocks are first written.
    pub fn new(
        layers: usize,
        (blocks, block_size): (usize, usize),
        (heads, dim): (usize, usize),
        host: bool,
        (device, dtype): (&Device, DType),
    ) -> Result<Self> {
        let n = blocks * block_size * heads * dim;
        let layers = (0..layers)
            .map(|_| {
                Ok(if host {
                    Layer::Host { k: Arc::new(vec![0.0; n]), v: Arc::new(vec![0.0; n]) }
                } else {
                    let shape = (blocks, block_size, heads * dim);
                    Layer::Device { k: Tensor::zeros(shape, dtype, device)?, v: Tensor::zeros(shape, dtype, device)? }
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { layers, block_size, heads, dim })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Copies the rows of each `(source, destination)` block pair, in every layer.
    pub fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]) -> Result<()> {
        let span = self.block_size * self.heads * self.dim;
        for layer in &mut self.layers {
            for &(src, dst) in copies {
                let (src, dst) = (src as usize, dst as usize);
                match layer {
                    Layer::Host { k, v } => {
                        for t in [k, v] {
                            unique(t).copy_within(src * span..(src + 1) * span, dst * span);
                        }
                    }
                    Layer::Device { k, v } => {
                        for t in [k, v] {
                            // A copy of its own: slice_set refuses a source sharing its storage.
                            let block = t.narrow(0, src, 1)?.copy()?;
                            t.slice_set(&block, 0, dst)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Where position `p` of a sequence with block table `table` lives in the host vectors of
    /// KV head `head`: the offset of its `dim` values.
    pub fn host_offset(&self, table: &[BlockId], p: usize, head: usize) -> usize {
        let b = table[p / self.block_size] as usize;
        ((b * self.heads + head) * self.block_size + p % self.block_size) * self.dim
    }

    /// A layer's host vectors, to write rows into.
    pub fn host_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        match &mut self.layers[layer] {
            Layer::Host { k, v } => (unique(k), unique(v)),
            Layer::Device { .. } => unreachable!("host attention on a tensor store"),
        }
    }

    /// A layer's host vectors, for a job on the compute pool to read.
    pub fn host(&self, layer: usize) -> (Arc<Vec<f32>>, Arc<Vec<f32>>) {
        match &self.layers[layer] {
            Layer::Host { k, v } => (k.clone(), v.clone()),
            Layer::Device { .. } => unreachable!("host attention on a tensor store"),
        }
    }

    /// A layer's tensors `(blocks, block_size, heads * dim)`.
    pub fn tensors(&self, layer: usize) -> (&Tensor, &Tensor) {
        match &self.layers[layer] {
            Layer::Device { k, v } => (k, v),
            Layer::Host { .. } => unreachable!("tensor attention on a host store"),
        }
    }

    /// KV heads and head size.
    pub fn shape(&self) -> (usize, usize) {
        (self.heads, self.dim)
    }
}

/// Mutable access to host vectors once no straggling reader holds them (a chunk's worth of
/// work at most).
fn unique(data: &mut Arc<Vec<f32>>) -> &mut [f32] {
    while Arc::get_mut(data).is_none() {
        std::thread::yield_now();
    }
    Arc::get_mut(data).expect("checked just above")
}

/// One KV head's rows of one sequence in host vectors, read through its block table.
#[derive(Clone, Copy)]
pub struct PagedRows<'a> {
    pub data: &'a [f32],
    pub table: &'a [BlockId],
    pub head: usize,
    pub heads: usize,
    pub block_size: usize,
    pub dim: usize,
}

impl<'a> PagedRows<'a> {
    /// The first `n` rows in order, a block's run of them at a time (`dim` values a row).
    #[inline(always)]
    pub fn runs(self, n: usize) -> impl Iterator<Item = &'a [f32]> {
        let span = self.block_size * self.dim;
        self.table.iter().enumerate().take(n.div_ceil(self.block_size)).map(move |(i, &b)| {
            let at = (b as usize * self.heads + self.head) * span;
            let rows = (n - i * self.block_size).min(self.block_size);
            &self.data[at..at + rows * self.dim]
        })
    }

    /// The first `n` rows in order, `dim` values each.
    #[inline(always)]
    pub fn rows(self, n: usize) -> impl Iterator<Item = &'a [f32]> {
        let dim = self.dim;
        self.runs(n).flat_map(move |run| run.chunks_exact(dim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_in_position_order_whatever_blocks_hold_them() {
        // Two heads, blocks of 2 rows of 3 values; the table visits blocks 2, 0, 1.
        let (heads, bs, dim) = (2, 2, 3);
        let data: Vec<f32> = (0..3 * heads * bs * dim).map(|x| x as f32).collect();
        let table = [2, 0, 1];
        let rows = |head| PagedRows { data: &data, table: &table, head, heads, block_size: bs, dim };
        let got: Vec<f32> = rows(1).rows(5).flatten().copied().collect();
        // Head 1 of block b starts at (b*2+1)*6.
        let want: Vec<f32> = [30..36, 6..12, 18..21].into_iter().flatten().map(|x| x as f32).collect();
        assert_eq!(got, want);
        let store = KvStore::new(1, (3, bs), (heads, dim), true, (&Device::Cpu, DType::F32)).unwrap();
        assert_eq!(store.host_offset(&table, 4, 1), 18);
    }

    #[test]
    fn copied_blocks_hold_their_sources_rows_on_either_store() {
        for host in [true, false] {
            let mut store = KvStore::new(2, (3, 2), (1, 2), host, (&Device::Cpu, DType::F32)).unwrap();
            if host {
                store.host_mut(1).0[..4].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
            } else {
                let src = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0]]], &Device::Cpu).unwrap();
                store.tensors(1).0.slice_set(&src, 0, 0).unwrap();
            }
            store.copy_blocks(&[(0, 2)]).unwrap();
            let got = if host {
                store.host_mut(1).0[8..12].to_vec()
            } else {
                store.tensors(1).0.narrow(0, 2, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert_eq!(got, [1.0, 2.0, 3.0, 4.0], "host {host}");
        }
    }
}

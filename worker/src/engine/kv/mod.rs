//! The KV cache, paged (vLLM's PagedAttention): every rank's keys and values live in one store
//! of fixed-size blocks, a sequence holds a table of the blocks its positions are in, and
//! sequences that start alike share the blocks of what they have in common (automatic prefix
//! caching). One [`BlockPool`] decides for all the ranks of a model; each rank's [`KvStore`]
//! holds its own KV heads of every block.

mod blocks;
mod paged;
mod store;

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Device;

use super::error::{EngineError, Result};

pub use blocks::{BlockId, BlockPool, KvStats, common_prefix};
pub use paged::PagedAttention;
pub use store::{KvStore, PagedRows};

/// Tokens per block unless `--kv-block-size` says otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// How much KV cache to hold and how.
#[derive(Debug, Clone, PartialEq)]
pub struct KvOptions {
    /// Tokens per block.
    pub block_size: usize,
    /// Bytes for the cache over all ranks (`--kv-cache-mb`); `None`: on GPUs a share of the
    /// memory free after loading the weights, on the CPU half the memory available.
    pub cache_bytes: Option<u64>,
    /// The share of a GPU's free memory the cache takes when `cache_bytes` is not given.
    pub gpu_memory_utilization: f64,
    /// Whether blocks are found again by later prompts that start alike.
    pub prefix_caching: bool,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self { block_size: DEFAULT_BLOCK_SIZE, cache_bytes: None, gpu_memory_utilization: 0.9, prefix_caching: true }
    }
}

/// Most tokens a block may hold.
pub const MAX_BLOCK_SIZE: usize = 1024;

/// The blocks `opts` holds when a block takes `block_bytes` over all ranks on `devices`.
pub fn blocks_for(opts: &KvOptions, block_bytes: usize, devices: &[Device]) -> Result<usize> {
    if !(1..=MAX_BLOCK_SIZE).contains(&opts.block_size) {
        return Err(EngineError::InvalidArgument(format!(
            "--kv-block-size must be between 1 and {MAX_BLOCK_SIZE} tokens, got {}",
            opts.block_size
        )));
    }
    let per_rank = block_bytes.div_ceil(devices.len().max(1)).max(1);
    let blocks = match opts.cache_bytes {
        Some(bytes) => usize::try_from(bytes).unwrap_or(usize::MAX) / block_bytes.max(1),
        None if devices.iter().all(Device::is_cpu) => {
            super::available_memory_bytes().map_or(0, |b| b as usize / 2) / block_bytes.max(1)
        }
        None => {
            if !(opts.gpu_memory_utilization > 0.0 && opts.gpu_memory_utilization <= 1.0) {
                return Err(EngineError::InvalidArgument(format!(
                    "--gpu-memory-utilization must be more than 0 and at most 1, got {}",
                    opts.gpu_memory_utilization
                )));
            }
            let mut least = usize::MAX;
            for d in devices {
                least = least.min(gpu_free_bytes(d)?);
            }
            (least as f64 * opts.gpu_memory_utilization) as usize / per_rank
        }
    };
    let blocks = blocks.min(u32::MAX as usize - 1);
    if blocks == 0 {
        return Err(EngineError::InvalidArgument(format!(
            "the KV cache has no room for one block of {} tokens ({} KiB over all ranks): raise --kv-cache-mb",
            opts.block_size,
            block_bytes.div_ceil(1024)
        )));
    }
    Ok(blocks)
}

/// Bytes free on a GPU now.
#[cfg(feature = "cuda")]
fn gpu_free_bytes(device: &Device) -> Result<usize> {
    let cuda = device.as_cuda_device()?;
    let (free, _total) = cuda
        .cuda_stream()
        .context()
        .mem_get_info()
        .map_err(|e| EngineError::Model(format!("cannot read the GPU's free memory: {e}")))?;
    Ok(free)
}

#[cfg(not(feature = "cuda"))]
fn gpu_free_bytes(_: &Device) -> Result<usize> {
    Err(EngineError::InvalidArgument("GPU devices need herd built with --features cuda".into()))
}

/// The pool did not have the blocks a step needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvFull;

/// One sequence's part of the cache: its block table, and the tokens its blocks hold.
/// Dropping it gives the blocks back.
#[derive(Debug)]
pub struct SeqCache {
    pool: Arc<Mutex<BlockPool>>,
    table: Vec<BlockId>,
    tokens: Vec<u32>,
    /// Copies to make before the next step writes (source, destination): the shared, partly
    /// filled block it was given and its own copy of it.
    copies: Vec<(BlockId, BlockId)>,
    /// Sources of those copies, held until they are made.
    held: Vec<BlockId>,
}

/// Locks a pool, whatever a panicking holder left (its state is updated in whole steps).
pub(crate) fn lock(pool: &Mutex<BlockPool>) -> MutexGuard<'_, BlockPool> {
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

impl SeqCache {
    /// An empty cache drawing on `pool`.
    pub fn new(pool: Arc<Mutex<BlockPool>>) -> Self {
        Self { pool, table: Vec::new(), tokens: Vec::new(), copies: Vec::new(), held: Vec::new() }
    }

    /// Tokens already in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Blocks its table holds.
    pub fn blocks(&self) -> usize {
        self.table.len()
    }

    /// Takes the longest cached prefix of `context` (all of it short of the last token, at
    /// most) when the cache is empty; returns the tokens found.
    pub fn reuse_prefix(&mut self, context: &[u32]) -> usize {
        if !self.is_empty() || !self.table.is_empty() {
            return 0;
        }
        let (table, n) = lock(&self.pool).lookup(context);
        self.table = table;
        self.tokens = context[..n].to_vec();
        n
    }

    /// New blocks `run` more tokens need: those past its table, and a copy of a partly filled
    /// block it shares.
    pub fn blocks_needed(&self, run: usize) -> usize {
        let pool = lock(&self.pool);
        self.needed(&pool, run)
    }

    fn needed(&self, pool: &BlockPool, run: usize) -> usize {
        let (len, bs) = (self.len(), pool.block_size());
        let copy = len % bs != 0 && pool.must_copy(self.table[len / bs], len % bs);
        (len + run).div_ceil(bs).saturating_sub(self.table.len()) + usize::from(copy)
    }

    /// Makes room for `run` more tokens: its own copy of a shared, partly filled last block,
    /// then new blocks. Takes nothing when the pool lacks any of them.
    pub fn prepare(&mut self, run: usize) -> std::result::Result<(), KvFull> {
        let mut pool = lock(&self.pool);
        if self.needed(&pool, run) > pool.available() {
            return Err(KvFull);
        }
        let (len, bs) = (self.len(), pool.block_size());
        if len % bs != 0 && pool.must_copy(self.table[len / bs], len % bs) {
            let src = self.table[len / bs];
            let dst = pool.allocate().ok_or(KvFull)?;
            pool.copy_tokens(src, dst, len % bs);
            self.copies.push((src, dst));
            self.held.push(src);
            self.table[len / bs] = dst;
        }
        while self.table.len() < (len + run).div_ceil(bs) {
            self.table.push(pool.allocate().ok_or(KvFull)?);
        }
        Ok(())
    }

    /// Its block table, for a step.
    pub(crate) fn table(&self) -> Arc<[BlockId]> {
        self.table.as_slice().into()
    }

    /// The copies to make before the step writes.
    pub(crate) fn take_copies(&mut self) -> Vec<(BlockId, BlockId)> {
        std::mem::take(&mut self.copies)
    }

    /// Notes that a step wrote `tokens` after what it held, and lets the sources of its copies go.
    pub(crate) fn commit(&mut self, tokens: &[u32]) {
        let from = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        let mut pool = lock(&self.pool);
        pool.record(&self.table, &self.tokens, from);
        pool.release(&std::mem::take(&mut self.held));
    }

    /// Gives every block back (a preempted sequence waits without them and recomputes later;
    /// what its blocks hold stays findable until their space is needed).
    pub fn clear(&mut self) {
        let mut pool = lock(&self.pool);
        pool.release(&std::mem::take(&mut self.held));
        pool.release(&std::mem::take(&mut self.table));
        self.tokens.clear();
        self.copies.clear();
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize, bs: usize) -> Arc<Mutex<BlockPool>> {
        Arc::new(Mutex::new(BlockPool::new(blocks, bs, true)))
    }

    #[test]
    fn a_shared_partial_block_is_copied_before_it_is_written() {
        let pool = pool(8, 4);
        let prompt: Vec<u32> = (1..=7).collect();
        let mut a = SeqCache::new(pool.clone());
        a.prepare(7).unwrap();
        a.commit(&prompt);
        assert_eq!(a.blocks(), 2);
        // The same prompt: the first block whole, then 2 of the second's 3 rows.
        let mut b = SeqCache::new(pool.clone());
        assert_eq!(b.reuse_prefix(&prompt), 6);
        assert_eq!(lock(&pool).stats().used, 2, "nothing new taken by the lookup");
        assert_eq!(b.blocks_needed(1), 1, "its own copy of the partial block");
        b.prepare(1).unwrap();
        let copies = b.take_copies();
        assert_eq!(copies, vec![(a.table[1], b.table[1])]);
        assert_eq!(b.table[0], a.table[0], "the full block is shared");
        b.commit(&prompt[6..]);
        assert_eq!(lock(&pool).stats().used, 3);
        // The owner appends to its block in place: nobody else holds it now.
        assert_eq!(a.blocks_needed(1), 0);
        drop(a);
        drop(b);
        assert_eq!(lock(&pool).stats().used, 0);
    }

    #[test]
    fn a_step_that_does_not_fit_takes_nothing() {
        let pool = pool(2, 4);
        let mut a = SeqCache::new(pool.clone());
        assert_eq!(a.prepare(9), Err(KvFull));
        assert_eq!((a.blocks(), lock(&pool).available()), (0, 2));
        a.prepare(8).unwrap();
        a.clear();
        assert_eq!(lock(&pool).available(), 2);
    }
}

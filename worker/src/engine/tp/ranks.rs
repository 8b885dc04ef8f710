//! The ranks of one model: a thread per rank holding its shard, driven in lock-step.
//!
//! Every forward pass is sent to all ranks in the same order, so their collectives line up.
//! A rank owns its compute thread for the model's lifetime (NCCL and CUDA contexts are bound to
//! threads, and CPU ranks must not run on the async runtime).

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};

use super::{Backend, Shard, check_divisible};
use crate::engine::config::ModelConfig;
use crate::engine::error::{EngineError, Result};
use crate::engine::kv::{self, BlockId, BlockPool, KvOptions, KvStats, SeqCache};
use crate::engine::model::{Llama, Segment};
use crate::engine::pool::ComputePool;
use crate::engine::weights::Weights;

struct Forward {
    segments: Arc<[Segment]>,
    copies: Arc<[(BlockId, BlockId)]>,
    all_positions: bool,
}

/// A rank's answer: rank 0's logits, and whether it was the first to fail.
struct Reply {
    result: Result<Option<Tensor>>,
    first_failure: bool,
}

struct Rank {
    commands: Sender<Forward>,
    replies: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
}

/// A model split over one or more ranks.
pub struct Ranks {
    cfg: ModelConfig,
    world: usize,
    dtype: candle_core::DType,
    /// Held for a whole step, so that steps from different threads never interleave.
    ranks: Mutex<Vec<Rank>>,
    backend: Backend,
    /// Set when a failed step left the group unusable.
    broken: std::sync::atomic::AtomicBool,
    /// The KV blocks every rank holds its part of, and the bytes one takes over all ranks.
    pool: Arc<Mutex<BlockPool>>,
    block_bytes: usize,
}

impl Ranks {
    /// Loads a shard of `w` for each device (one rank each), sizes the KV cache as `kv` says,
    /// and starts the rank threads; CPU ranks share `threads` compute threads, and use tensor
    /// attention if `tensor_attention`.
    pub fn load(
        cfg: &ModelConfig,
        w: &Weights,
        devices: &[Device],
        (threads, tensor_attention): (usize, bool),
        kv: &KvOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let world = devices.len();
        check_divisible(cfg, world)?;
        let backend = Backend::for_devices(devices)?;
        let mut shards = Vec::with_capacity(world);
        for (rank, device) in devices.iter().enumerate() {
            let shard = Shard { rank, world };
            let pool = ComputePool::new((threads / world).max(1))
                .map_err(|e| EngineError::Model(format!("cannot start compute threads: {e}")))?;
            let llama = Llama::load(cfg, w, shard, device, (pool, tensor_attention), &mut |done, total| {
                progress(rank * total + done, world * total)
            })?;
            shards.push((shard, device.clone(), llama));
        }
        let block_bytes: usize = shards.iter().map(|(_, _, l)| l.kv_bytes_per_block(kv.block_size)).sum();
        let blocks = kv::blocks_for(kv, block_bytes, devices)?;
        let (ready_tx, ready_rx) = channel();
        let mut ranks = Vec::with_capacity(world);
        for (shard, device, llama) in shards {
            let (commands, command_rx) = channel::<Forward>();
            let (reply_tx, replies) = channel();
            let (backend, ready, block_size) = (backend.clone(), ready_tx.clone(), kv.block_size);
            let thread = std::thread::Builder::new()
                .name(format!("herd-rank-{}", shard.rank))
                .spawn(move || {
                    let started = backend
                        .connect(shard, &device)
                        .and_then(|comm| Ok((comm, llama.new_store(blocks, block_size)?)));
                    let (comm, mut store) = match started {
                        Ok(c) => {
                            let _ = ready.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    for Forward { segments, copies, all_positions } in command_rx {
                        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            llama.forward(&*comm, &mut store, (&segments, &copies), all_positions)
                        }));
                        let result = run.unwrap_or_else(|_| {
                            Err(EngineError::Model(format!("rank {} panicked during this step", shard.rank)))
                        });
                        let first_failure = result.is_err() && comm.abort();
                        let result = result.map(|logits| (shard.rank == 0).then_some(logits));
                        if reply_tx.send(Reply { result, first_failure }).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| EngineError::Model(format!("cannot start rank thread: {e}")))?;
            ranks.push(Rank { commands, replies, thread: Some(thread) });
        }
        drop(ready_tx);
        for _ in 0..world {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(EngineError::Model("a rank thread exited while starting".into())),
            }
        }
        let pool = Arc::new(Mutex::new(BlockPool::new(blocks, kv.block_size, kv.prefix_caching)));
        Ok(Self {
            cfg: cfg.clone(),
            world,
            dtype: w.dtype(),
            ranks: Mutex::new(ranks),
            backend,
            broken: false.into(),
            pool,
            block_bytes,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Ranks the model is split over.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The dtype of activations and KV cache.
    pub fn dtype(&self) -> candle_core::DType {
        self.dtype
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.pool.clone())
    }

    /// The KV blocks: in use, cached and in all.
    pub fn kv_stats(&self) -> KvStats {
        kv::lock(&self.pool).stats()
    }

    /// Bytes one KV block takes over all ranks.
    pub fn kv_block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Whether blocks are found again by later prompts.
    pub fn prefix_caching(&self) -> bool {
        kv::lock(&self.pool).caching()
    }

    /// Counts a prompt of `prompt` tokens that found `tokens` of itself in the cache.
    pub fn count_prompt(&self, prompt: usize, tokens: usize) {
        kv::lock(&self.pool).count_prompt(prompt, tokens);
    }

    /// The short hashes of the cached full blocks, with the version they are current for.
    pub fn kv_hashes(&self) -> (u64, Vec<u64>) {
        let pool = kv::lock(&self.pool);
        (pool.stats().version, pool.hashes())
    }

    /// Runs `tokens` after what `cache` holds on every rank; returns f32 logits `(n, vocab)` for
    /// every position when `all_positions`, else `(1, vocab)` for the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut SeqCache, all_positions: bool) -> Result<Tensor> {
        self.forward_batch(&mut [(tokens, cache)], all_positions)
    }

    /// One step of several sequences at once, each running its tokens after what its cache
    /// holds (taking the blocks they need); returns f32 logits `(sequences, vocab)` for each
    /// one's last token, or `(n, vocab)` for every token when `all_positions`. A failed step
    /// leaves every cache of the batch empty.
    pub fn forward_batch(&self, batch: &mut [(&[u32], &mut SeqCache)], all_positions: bool) -> Result<Tensor> {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::SeqCst) {
            return Err(EngineError::Model("the tensor-parallel group failed earlier; restart the worker".into()));
        }
        let mut copies = Vec::new();
        let mut segments = Vec::with_capacity(batch.len());
        for i in 0..batch.len() {
            let (tokens, cache) = &mut batch[i];
            if cache.prepare(tokens.len()).is_err() {
                let tokens = cache.len() + tokens.len();
                batch.iter_mut().for_each(|(_, c)| c.clear());
                let stats = self.kv_stats();
                return Err(EngineError::KvCacheFull { tokens, budget: stats.total * stats.block_size });
            }
            copies.extend(cache.take_copies());
            segments.push(Segment { tokens: Arc::from(*tokens), start: cache.len(), table: cache.table() });
        }
        let (segments, copies): (Arc<[Segment]>, Arc<[_]>) = (segments.into(), copies.into());
        let result = self.run(&segments, &copies, all_positions);
        for (tokens, cache) in batch.iter_mut() {
            match &result {
                Ok(_) => cache.commit(tokens),
                // Its blocks may hold part of what failed, or miss a copy.
                Err(_) => cache.clear(),
            }
        }
        result
    }

    /// Sends one step to every rank and gathers the answers.
    fn run(
        &self,
        segments: &Arc<[Segment]>,
        copies: &Arc<[(BlockId, BlockId)]>,
        all_positions: bool,
    ) -> Result<Tensor> {
        use std::sync::atomic::Ordering;
        let ranks = self.ranks.lock().unwrap_or_else(|p| p.into_inner());
        for rank in ranks.iter() {
            let forward = Forward { segments: segments.clone(), copies: copies.clone(), all_positions };
            if rank.commands.send(forward).is_err() {
                self.broken.store(true, Ordering::SeqCst);
                return Err(EngineError::Model("a tensor-parallel rank thread has exited".into()));
            }
        }
        let mut logits = None;
        let mut failure: Option<EngineError> = None;
        for rank in ranks.iter() {
            let Ok(reply) = rank.replies.recv() else {
                self.broken.store(true, Ordering::SeqCst);
                return Err(EngineError::Model("a tensor-parallel rank thread has exited".into()));
            };
            match reply.result {
                Ok(l) => logits = logits.or(l),
                // Peers of the failed rank only report that it failed; keep its own error.
                Err(e) if reply.first_failure || failure.is_none() => failure = Some(e),
                Err(_) => {}
            }
        }
        if let Some(e) = failure {
            if !self.backend.recover() {
                self.broken.store(true, Ordering::SeqCst);
            }
            return Err(e);
        }
        logits.ok_or_else(|| EngineError::Model("rank 0 returned no logits".into()))
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        // Closing the command channels ends the rank loops.
        let ranks = self.ranks.get_mut().unwrap_or_else(|p| p.into_inner());
        let threads: Vec<_> = ranks.iter_mut().filter_map(|r| r.thread.take()).collect();
        ranks.clear();
        for t in threads {
            let _ = t.join();
        }
    }
}

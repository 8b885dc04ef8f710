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
use crate::engine::model::{Llama, Segment, ShardCache};
use crate::engine::pool::ComputePool;
use crate::engine::weights::Weights;

/// The KV cache of one sequence: a shard per rank, and the position they share.
#[derive(Debug)]
pub struct SeqCache {
    shards: Vec<ShardCache>,
    len: usize,
}

impl SeqCache {
    /// Tokens already in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// A copy of its first `n` positions (all of them if it holds fewer).
    pub fn prefix(&self, n: usize) -> Result<Self> {
        let n = n.min(self.len);
        let shards = self.shards.iter().map(|s| s.prefix(n, self.len)).collect::<Result<_>>()?;
        Ok(Self { shards, len: n })
    }

    /// Notes that its sequence may come to `positions`, so that memory for them is set aside once.
    pub fn will_hold(&mut self, positions: usize) {
        for shard in &mut self.shards {
            shard.will_hold(positions);
        }
    }

    /// Drops every cached token.
    pub fn clear(&mut self) {
        for shard in &mut self.shards {
            shard.clear();
        }
        self.len = 0;
    }
}

struct Forward {
    segments: Vec<Segment>,
    all_positions: bool,
}

/// A rank's answer: its caches back, rank 0's logits, and whether it was the first to fail.
struct Reply {
    segments: Vec<Segment>,
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
}

impl Ranks {
    /// Loads a shard of `w` for each device (one rank each) and starts the rank threads; CPU
    /// ranks share `threads` compute threads, and use tensor attention if `tensor_attention`.
    pub fn load(
        cfg: &ModelConfig,
        w: &Weights,
        devices: &[Device],
        (threads, tensor_attention): (usize, bool),
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
        let (ready_tx, ready_rx) = channel();
        let mut ranks = Vec::with_capacity(world);
        for (shard, device, llama) in shards {
            let (commands, command_rx) = channel::<Forward>();
            let (reply_tx, replies) = channel();
            let (backend, ready) = (backend.clone(), ready_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("herd-rank-{}", shard.rank))
                .spawn(move || {
                    let comm = match backend.connect(shard, &device) {
                        Ok(c) => {
                            let _ = ready.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    for Forward { mut segments, all_positions } in command_rx {
                        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            llama.forward(&*comm, &mut segments, all_positions)
                        }));
                        let result = run.unwrap_or_else(|_| {
                            Err(EngineError::Model(format!("rank {} panicked during this step", shard.rank)))
                        });
                        let first_failure = result.is_err() && comm.abort();
                        let result = result.map(|logits| (shard.rank == 0).then_some(logits));
                        if reply_tx.send(Reply { segments, result, first_failure }).is_err() {
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
        Ok(Self { cfg: cfg.clone(), world, dtype: w.dtype(), ranks: Mutex::new(ranks), backend, broken: false.into() })
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
        SeqCache { shards: vec![ShardCache::new(self.cfg.num_layers); self.world], len: 0 }
    }

    /// Runs `tokens` after what `cache` holds on every rank; returns f32 logits `(n, vocab)` for
    /// every position when `all_positions`, else `(1, vocab)` for the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut SeqCache, all_positions: bool) -> Result<Tensor> {
        self.forward_batch(&mut [(tokens, cache)], all_positions)
    }

    /// One step of several sequences at once, each running its tokens after what its cache
    /// holds; returns f32 logits `(sequences, vocab)` for each one's last token, or `(n, vocab)`
    /// for every token when `all_positions`.
    pub fn forward_batch(&self, batch: &mut [(&[u32], &mut SeqCache)], all_positions: bool) -> Result<Tensor> {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::SeqCst) {
            return Err(EngineError::Model("the tensor-parallel group failed earlier; restart the worker".into()));
        }
        let tokens: Vec<Arc<[u32]>> = batch.iter().map(|(t, _)| Arc::from(*t)).collect();
        let ranks = self.ranks.lock().unwrap_or_else(|p| p.into_inner());
        for (r, rank) in ranks.iter().enumerate() {
            let segments = batch
                .iter_mut()
                .zip(&tokens)
                .map(|((_, cache), tokens)| Segment {
                    tokens: tokens.clone(),
                    start: cache.len,
                    cache: std::mem::take(&mut cache.shards[r]),
                })
                .collect();
            if rank.commands.send(Forward { segments, all_positions }).is_err() {
                self.broken.store(true, Ordering::SeqCst);
                return Err(EngineError::Model("a tensor-parallel rank thread has exited".into()));
            }
        }
        let mut logits = None;
        let mut failure: Option<EngineError> = None;
        for (r, rank) in ranks.iter().enumerate() {
            let Ok(reply) = rank.replies.recv() else {
                self.broken.store(true, Ordering::SeqCst);
                return Err(EngineError::Model("a tensor-parallel rank thread has exited".into()));
            };
            for ((_, cache), seg) in batch.iter_mut().zip(reply.segments) {
                cache.shards[r] = seg.cache;
            }
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
        for ((t, cache), _) in batch.iter_mut().zip(&tokens) {
            cache.len += t.len();
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

//! Tensor parallelism, Megatron style: every rank holds a slice of each large weight, the ranks
//! run the forward pass in lock-step on their own threads and meet in collectives.
//!
//! How the model is split over N ranks:
//! - q/k/v by output rows (whole heads: rank r owns heads r·H/N.., and the KV heads they share),
//!   o_proj by input columns, then an all-reduce of the partial sums;
//! - gate/up by output rows, down_proj by input columns, then an all-reduce;
//! - the embedding and lm_head by vocabulary rows (vocab-parallel): each rank looks up the ids it
//!   owns and the rows are summed, each rank computes its slice of the logits and they are gathered.
//!   This keeps one copy of the (large, often tied) vocabulary matrices across the ranks;
//! - norms are replicated (a few KiB).
//!
//! Every rank reads only its slice of each tensor from the checkpoint.

pub mod check;
#[cfg(feature = "cuda")]
mod nccl;
mod ranks;
mod threads;

use std::ops::Range;

use candle_core::{Device, Tensor};

use super::config::ModelConfig;
use super::error::{EngineError, Result, candle_message};

pub use ranks::Ranks;
use threads::ThreadGroup;

/// What ranks do together. Every rank of a group calls the same collectives in the same order.
pub trait Communicator {
    /// This rank's index, from 0.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// The elementwise sum of every rank's `x`; all ranks get bit-identical results.
    fn all_reduce_sum(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// Every rank's `x` concatenated along the last dimension, in rank order.
    fn all_gather(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// Called by a rank that failed mid-step, so peers blocked in a collective return an error
    /// instead of waiting forever. Returns true for the first rank to abort.
    fn abort(&self) -> bool;
}

/// A rank's place in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The only rank of an unsplit model.
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// This rank's equal part of `n` units (`n` divisible by the world size).
    pub fn even(&self, n: usize) -> Range<usize> {
        let per = n / self.world;
        self.rank * per..(self.rank + 1) * per
    }

    /// This rank's part of `n` rows cut in chunks of ⌈n/world⌉; the last part may be shorter.
    pub fn chunk(&self, n: usize) -> Range<usize> {
        let per = n.div_ceil(self.world);
        (self.rank * per).min(n)..((self.rank + 1) * per).min(n)
    }
}

/// Checks that a model can be split over `world` ranks, before any weight is read.
pub fn check_divisible(cfg: &ModelConfig, world: usize) -> Result<()> {
    let (heads, kv) = (cfg.num_heads, cfg.num_kv_heads);
    if !heads.is_multiple_of(world) || !kv.is_multiple_of(world) {
        return Err(EngineError::InvalidArgument(format!(
            "--tp {world}: the model has {heads} attention heads and {kv} KV heads; both must be \
             divisible by the tensor-parallel size (try a --tp that divides {})",
            gcd(heads, kv)
        )));
    }
    if !cfg.intermediate_size.is_multiple_of(world) {
        return Err(EngineError::InvalidArgument(format!(
            "--tp {world}: the model's intermediate size {} is not divisible by {world}",
            cfg.intermediate_size
        )));
    }
    if cfg.vocab_size.div_ceil(world) * (world - 1) >= cfg.vocab_size {
        return Err(EngineError::InvalidArgument(format!(
            "--tp {world}: the vocabulary of {} tokens is too small to split over {world} ranks",
            cfg.vocab_size
        )));
    }
    Ok(())
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn open_cuda(ordinal: usize, flag: &str) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        EngineError::InvalidArgument(format!(
            "--devices {flag}: {} (build herd with --features cuda)",
            candle_message(&e)
        ))
    })
}

/// Resolves `--devices` and `--tp` into one device per rank.
///
/// `cpu` runs every rank as a thread on the CPU. `cuda` takes the first N GPUs. A list
/// (`cuda:0,cuda:2`) names one GPU per rank; without `--tp` its length is the rank count.
pub fn parse_devices(spec: &[String], tp: Option<usize>) -> Result<Vec<Device>> {
    if tp == Some(0) {
        return Err(EngineError::InvalidArgument("--tp must be at least 1".into()));
    }
    let spec: Vec<&str> = spec.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
    let joined = spec.join(",");
    match spec.as_slice() {
        [] | ["cpu"] => Ok(vec![Device::Cpu; tp.unwrap_or(1)]),
        ["cuda"] => {
            let n = tp.unwrap_or(1);
            (0..n)
                .map(|i| {
                    open_cuda(i, "cuda").map_err(|e| match i {
                        0 => e,
                        _ => EngineError::InvalidArgument(format!(
                            "--tp {n} needs {n} GPUs, but only {i} are visible ({e})"
                        )),
                    })
                })
                .collect()
        }
        list => {
            if let Some(n) = tp.filter(|&n| n != list.len()) {
                return Err(EngineError::InvalidArgument(format!(
                    "--tp {n} needs {n} devices, but --devices {joined} names {}",
                    list.len()
                )));
            }
            let mut ordinals = Vec::with_capacity(list.len());
            for d in list {
                let ordinal = d.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).ok_or_else(|| {
                    EngineError::InvalidArgument(format!(
                        "--devices {joined}: {d:?} is not a device (expected cpu, cuda, or a list of cuda:N)"
                    ))
                })?;
                if ordinals.contains(&ordinal) {
                    return Err(EngineError::InvalidArgument(format!(
                        "--devices {joined}: cuda:{ordinal} is named twice; each rank needs its own GPU"
                    )));
                }
                ordinals.push(ordinal);
            }
            ordinals.into_iter().map(|o| open_cuda(o, &joined)).collect()
        }
    }
}

/// How the ranks of a group reach each other.
#[derive(Clone)]
pub(crate) enum Backend {
    /// Threads of this process sharing memory (CPU ranks).
    Threads(std::sync::Arc<ThreadGroup>),
    /// NCCL, one rank per GPU.
    #[cfg(feature = "cuda")]
    Nccl(nccl::Id),
}

impl Backend {
    /// The backend for ranks on these devices (all CPU, or all distinct GPUs).
    pub(crate) fn for_devices(devices: &[Device]) -> Result<Self> {
        // A single rank never calls a collective.
        if devices.len() == 1 || devices.iter().all(Device::is_cpu) {
            return Ok(Self::Threads(std::sync::Arc::new(ThreadGroup::new(devices.len()))));
        }
        #[cfg(feature = "cuda")]
        if devices.iter().all(Device::is_cuda) {
            return nccl::Id::new(devices.len()).map(Self::Nccl);
        }
        Err(EngineError::InvalidArgument("--devices: every rank must be on the CPU, or every rank on a GPU".into()))
    }

    /// This rank's communicator. NCCL ranks block here until every rank has joined.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn connect(&self, shard: Shard, device: &Device) -> Result<Box<dyn Communicator>> {
        match self {
            Self::Threads(group) => Ok(Box::new(group.member(shard.rank))),
            #[cfg(feature = "cuda")]
            Self::Nccl(id) => Ok(Box::new(nccl::NcclComm::connect(id, shard, device)?)),
        }
    }

    /// Makes the group usable again after a failed step, once every rank has returned.
    /// False when it cannot be (an aborted NCCL communicator is gone for good).
    pub(crate) fn recover(&self) -> bool {
        match self {
            Self::Threads(group) => {
                group.reset();
                true
            }
            #[cfg(feature = "cuda")]
            Self::Nccl(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_and_chunked_parts_cover_everything_once() {
        let parts: Vec<_> = (0..3).map(|rank| Shard { rank, world: 3 }.even(9)).collect();
        assert_eq!(parts, vec![0..3, 3..6, 6..9]);
        let parts: Vec<_> = (0..3).map(|rank| Shard { rank, world: 3 }.chunk(10)).collect();
        assert_eq!(parts, vec![0..4, 4..8, 8..10]);
    }

    #[test]
    fn devices_resolve_or_name_the_flags() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_devices(&s(&["cpu"]), Some(4)).unwrap().len(), 4);
        assert_eq!(parse_devices(&s(&[]), None).unwrap().len(), 1);
        let e = parse_devices(&s(&["cpu"]), Some(0)).unwrap_err().to_string();
        assert!(e.contains("--tp must be at least 1"), "{e}");
        let e = parse_devices(&s(&["cuda:0"]), Some(2)).unwrap_err().to_string();
        assert!(e.contains("--tp 2 needs 2 devices, but --devices cuda:0 names 1"), "{e}");
        let e = parse_devices(&s(&["cuda:0", "cuda:0"]), None).unwrap_err().to_string();
        assert!(e.contains("named twice"), "{e}");
        let e = parse_devices(&s(&["gpu0"]), None).unwrap_err().to_string();
        assert!(e.contains("\"gpu0\" is not a device"), "{e}");
    }

    #[test]
    fn indivisible_heads_are_refused_with_both_numbers() {
        // SmolLM2-135M's shape.
        let cfg = ModelConfig {
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_scaling: crate::engine::config::RopeScaling::None,
            context_length: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        };
        let e = check_divisible(&cfg, 2).unwrap_err().to_string();
        assert!(e.contains("--tp 2") && e.contains("9 attention heads") && e.contains("3 KV heads"), "{e}");
        check_divisible(&cfg, 3).unwrap();
    }
}

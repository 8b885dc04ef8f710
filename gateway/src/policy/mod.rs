//! Routing policies: which of the healthy workers serving a model gets a call. One file per
//! policy; the worker table gathers the candidates and their loads, a policy picks.

mod kv_aware;
mod least_loaded;
mod power_of_two;
mod round_robin;

use rand::Rng;

pub use kv_aware::KvAware;
pub use least_loaded::LeastLoaded;
pub use power_of_two::PowerOfTwo;
pub use round_robin::RoundRobin;

/// One worker a call may go to, as a policy sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Its load (`WorkerLoad::paced_score`: sequences running, waiting and sent, plus KV use,
    /// counted for more on a worker slower than the others).
    pub load: f64,
    /// Leading blocks of the prompt it holds in its KV cache, beyond a start that other prompts
    /// share (0 when unknown).
    pub overlap: usize,
}

/// Why a policy chose what it chose, for logs and `herd_gateway_routing_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The least loaded.
    LeastLoaded,
    /// The less loaded of two drawn at random.
    PowerOfTwo,
    /// Next in turn.
    RoundRobin,
    /// The most of the prompt cached, among workers within the balance threshold.
    Prefix,
    /// Another worker holds more of the prompt but is too busy: least loaded instead.
    Balance,
}

impl Reason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::LeastLoaded => "least_loaded",
            Self::PowerOfTwo => "power_of_two",
            Self::RoundRobin => "round_robin",
            Self::Prefix => "prefix",
            Self::Balance => "balance",
        }
    }
}

/// A routing policy.
pub trait Policy: Send + Sync {
    /// Its `--routing-policy` name.
    fn name(&self) -> &'static str;

    /// Whether it needs the prompt's block hashes (tokenizing costs the gateway a little).
    fn uses_prefix(&self) -> bool {
        false
    }

    /// The index of the chosen candidate (`candidates` is non-empty, ordered by worker id).
    fn choose(&self, candidates: &[Candidate]) -> (usize, Reason);
}

/// `--routing-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyName {
    /// The worker holding most of the prompt in its KV cache, unless it is busier than the least
    /// loaded by more than `--routing-balance-threshold`.
    KvAware,
    /// The least loaded worker.
    LeastLoaded,
    /// The less loaded of two workers drawn at random.
    PowerOfTwo,
    /// Each worker in turn.
    RoundRobin,
}

impl PolicyName {
    /// The policy, with `balance_threshold` for `kv-aware`.
    pub fn build(self, balance_threshold: f64) -> Box<dyn Policy> {
        match self {
            Self::KvAware => Box::new(KvAware::new(balance_threshold)),
            Self::LeastLoaded => Box::new(LeastLoaded),
            Self::PowerOfTwo => Box::new(PowerOfTwo),
            Self::RoundRobin => Box::new(RoundRobin::default()),
        }
    }
}

/// The least loaded of `indices` into `candidates`, at random among equals so that idle workers
/// share the work.
fn least_loaded_of(candidates: &[Candidate], indices: impl Iterator<Item = usize>) -> usize {
    let mut best: Vec<usize> = Vec::new();
    let mut best_load = f64::INFINITY;
    for i in indices {
        let load = candidates[i].load;
        if load < best_load {
            best_load = load;
            best.clear();
        }
        if load == best_load {
            best.push(i);
        }
    }
    match best.len() {
        0 => 0,
        1 => best[0],
        n => best[rand::rng().random_range(0..n)],
    }
}

#[cfg(test)]
pub(crate) fn candidates(list: &[(f64, usize)]) -> Vec<Candidate> {
    list.iter().map(|&(load, overlap)| Candidate { load, overlap }).collect()
}

//! herd's gRPC contract: the only thing the controller, worker and gateway crates share.

/// `herd.v1`: the `Controller` and `Worker` services and their messages.
pub mod v1 {
    tonic::include_proto!("herd.v1");
}

/// The largest message a controller sends and a gateway reads: a `WatchWorkers` snapshot of a
/// full registry (the controller bounds how many workers register, and how large each record is).
pub const MAX_WATCH_MESSAGE_BYTES: usize = 16 << 20;

/// The largest `Generate` or `CountTokens` request a worker reads (a prompt of a few MiB).
pub const MAX_WORKER_REQUEST_BYTES: usize = 16 << 20;

/// The largest `ModelInfo` answer a gateway reads: it carries the model's tokenizer (a few MiB
/// for a 150k-token vocabulary).
pub const MAX_MODEL_INFO_BYTES: usize = 64 << 20;

impl v1::WorkerLoad {
    /// How busy the worker is, the one measure every router compares: its running and waiting
    /// sequences, plus `unreported` calls sent to it that its report does not count yet, plus
    /// the share of its KV blocks in use (a full cache weighs as one more queued sequence: it
    /// breaks ties toward room, and a worker near preemption looks busier).
    pub fn score(&self, unreported: u32) -> f64 {
        let sequences = f64::from(self.running) + f64::from(self.waiting) + f64::from(unreported);
        let kv = if self.kv_blocks_total == 0 {
            0.0
        } else {
            f64::from(self.kv_blocks_used.min(self.kv_blocks_total)) / f64::from(self.kv_blocks_total)
        };
        sequences + kv
    }
}

#[cfg(test)]
mod tests {
    use super::v1::WorkerLoad;

    #[test]
    fn score_counts_sequences_then_kv_use() {
        let load = |running, waiting, used| WorkerLoad {
            running,
            waiting,
            kv_blocks_used: used,
            kv_blocks_total: 100,
            ..WorkerLoad::default()
        };
        assert_eq!(load(2, 1, 0).score(1), 4.0);
        assert_eq!(load(2, 1, 50).score(0), 3.5);
        assert!(load(1, 0, 99).score(0) < load(2, 0, 0).score(0), "sequences first");
        assert_eq!(WorkerLoad::default().score(0), 0.0, "no blocks reported: no KV term");
    }
}

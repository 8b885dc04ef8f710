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

    /// [`score`](Self::score) on a worker `pace` times slower than the quickest (see [`paces`]):
    /// each of its sequences, the new one included, goes `pace` times slower there, so they
    /// count `pace` times over. At pace 1 it is the score itself.
    pub fn paced_score(&self, unreported: u32, pace: f64) -> f64 {
        (self.score(unreported) + 1.0) * pace - 1.0
    }
}

/// Size buckets of `WorkerLoad::step_us_by_tokens`.
pub const STEP_BUCKETS: usize = 12;

/// The most times slower [`paces`] rates a worker, so that one odd measurement cannot shut it out.
pub const MAX_PACE: f64 = 16.0;

/// The `step_us_by_tokens` bucket of a step that computed `tokens` tokens.
pub fn step_bucket(tokens: usize) -> usize {
    ((usize::BITS - 1 - tokens.max(1).leading_zeros()) as usize).min(STEP_BUCKETS - 1)
}

/// How many times slower each of `loads` steps than the quickest of them, from their step times
/// compared bucket by bucket (steps of about as many tokens), so that a worker busy with a large
/// batch does not look slow: in each bucket two or more have run, a worker's time over the least;
/// the median of those; 1 where there is nothing to compare. At most [`MAX_PACE`].
pub fn paces(loads: &[&v1::WorkerLoad]) -> Vec<f64> {
    let time = |load: &v1::WorkerLoad, bucket: usize| load.step_us_by_tokens.get(bucket).copied().filter(|&us| us > 0);
    let least: Vec<Option<(u32, usize)>> = (0..STEP_BUCKETS)
        .map(|b| {
            let times: Vec<u32> = loads.iter().filter_map(|l| time(l, b)).collect();
            (times.len() >= 2).then(|| (*times.iter().min().expect("two or more"), times.len()))
        })
        .collect();
    loads
        .iter()
        .map(|load| {
            let mut ratios: Vec<f64> = least
                .iter()
                .enumerate()
                .filter_map(|(b, least)| Some(f64::from(time(load, b)?) / f64::from(least.as_ref()?.0)))
                .collect();
            if ratios.is_empty() {
                return 1.0;
            }
            ratios.sort_by(f64::total_cmp);
            let mid = ratios.len() / 2;
            let median = if ratios.len() % 2 == 1 { ratios[mid] } else { (ratios[mid - 1] + ratios[mid]) / 2.0 };
            median.clamp(1.0, MAX_PACE)
        })
        .collect()
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

    #[test]
    fn steps_are_bucketed_by_powers_of_two() {
        use super::{STEP_BUCKETS, step_bucket};
        assert_eq!([0, 1, 2, 3, 4, 7, 8].map(step_bucket), [0, 0, 1, 1, 2, 2, 3]);
        assert_eq!(step_bucket(usize::MAX), STEP_BUCKETS - 1);
    }

    #[test]
    fn paces_compare_steps_of_the_same_size_whatever_the_batch() {
        let load =
            |running, steps: &[u32]| WorkerLoad { running, step_us_by_tokens: steps.to_vec(), ..WorkerLoad::default() };
        // The slow worker takes twice as long as the fast one at every size; the fast one is now
        // running far larger steps (its bucket 5), which alone would look slower.
        let slow = load(4, &[20_000, 24_000, 30_000]);
        let fast = load(9, &[10_000, 12_000, 15_000, 0, 0, 90_000]);
        let fresh = load(1, &[]);
        let paces = super::paces(&[&slow, &fast, &fresh]);
        assert_eq!(paces, [2.0, 1.0, 1.0]);
        assert_eq!(slow.paced_score(0, paces[0]), 9.0, "its 4 and a new one, each twice as slow");
        assert_eq!(fast.paced_score(0, paces[1]), 9.0);
        assert_eq!(super::paces(&[&slow]), [1.0], "nothing to compare against");
        let odd = load(0, &[u32::MAX]);
        assert_eq!(super::paces(&[&odd, &load(0, &[1])]), [super::MAX_PACE, 1.0]);
    }
}

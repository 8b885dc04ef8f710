//! `kv-aware`: send a prompt where its prefix already is. Chat clients resend the whole
//! conversation each turn; the worker that holds the earlier turns' KV blocks answers without
//! recomputing them. Load still bounds the choice: no worker gets a call while it is busier
//! than the least loaded by more than the balance threshold.

use super::{Candidate, Policy, Reason, least_loaded_of};

/// Scores workers by cached-prefix overlap within a load threshold.
pub struct KvAware {
    threshold: f64,
}

impl KvAware {
    /// The policy with `threshold`: how much busier than the least loaded worker (in sequences,
    /// `WorkerLoad::paced_score`'s unit) a worker holding more of the prompt may be and still get it.
    pub fn new(threshold: f64) -> Self {
        Self { threshold: threshold.max(0.0) }
    }
}

impl Policy for KvAware {
    fn name(&self) -> &'static str {
        "kv-aware"
    }

    fn uses_prefix(&self) -> bool {
        true
    }

    fn choose(&self, candidates: &[Candidate]) -> (usize, Reason) {
        let least = candidates.iter().map(|c| c.load).fold(f64::INFINITY, f64::min);
        let most_overlap = candidates.iter().map(|c| c.overlap).max().unwrap_or(0);
        let within = |c: &Candidate| c.load <= least + self.threshold;
        let best_within = candidates.iter().filter(|c| within(c)).map(|c| c.overlap).max().unwrap_or(0);
        if best_within == 0 {
            let reason = if most_overlap > 0 { Reason::Balance } else { Reason::LeastLoaded };
            return (least_loaded_of(candidates, 0..candidates.len()), reason);
        }
        // The most overlap among those within the threshold; the least loaded of equals.
        let holders = (0..candidates.len()).filter(|&i| within(&candidates[i]) && candidates[i].overlap == best_within);
        let chosen = least_loaded_of(candidates, holders);
        (chosen, if best_within < most_overlap { Reason::Balance } else { Reason::Prefix })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::policy::candidates;

    #[test]
    fn follows_the_prefix_within_the_threshold() {
        let policy = KvAware::new(4.0);
        // Worker 1 holds 10 blocks and is 3 busier: it still gets the call.
        assert_eq!(policy.choose(&candidates(&[(1.0, 2), (4.0, 10)])), (1, Reason::Prefix));
        // 5 busier: too much, the least loaded of the rest takes it, and it is counted as such.
        assert_eq!(policy.choose(&candidates(&[(1.0, 2), (6.0, 10)])), (0, Reason::Balance));
        assert_eq!(policy.choose(&candidates(&[(1.0, 0), (6.0, 10)])), (0, Reason::Balance));
        // Equal overlap: the less loaded.
        assert_eq!(policy.choose(&candidates(&[(3.0, 5), (2.0, 5)])), (1, Reason::Prefix));
        // Nothing cached anywhere: plain least-loaded.
        assert_eq!(policy.choose(&candidates(&[(3.0, 0), (2.0, 0)])), (1, Reason::LeastLoaded));
    }

    proptest! {
        /// Under any loads and overlaps, the choice is never busier than the least loaded
        /// worker by more than the threshold, and no worker within it holds more of the prompt.
        #[test]
        fn never_exceeds_the_threshold_above_the_least_loaded(
            list in prop::collection::vec((0.0f64..64.0, 0usize..32), 1..12),
            threshold in 0.0f64..16.0,
        ) {
            let c = candidates(&list);
            let (i, _) = KvAware::new(threshold).choose(&c);
            let least = c.iter().map(|c| c.load).fold(f64::INFINITY, f64::min);
            prop_assert!(c[i].load <= least + threshold, "chose load {} with least {least}", c[i].load);
            let better = c.iter().any(|o| o.load <= least + threshold && o.overlap > c[i].overlap);
            prop_assert!(!better, "a worker within the threshold held more: {c:?}, chose {i}");
        }
    }
}

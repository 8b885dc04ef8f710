//! `round-robin`: each worker in turn, whatever its load.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Policy, Reason};

/// Hands calls to the workers in turn (by worker id).
#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn choose(&self, candidates: &[Candidate]) -> (usize, Reason) {
        (self.next.fetch_add(1, Ordering::Relaxed) % candidates.len(), Reason::RoundRobin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::candidates;

    #[test]
    fn takes_turns_whatever_the_load() {
        let policy = RoundRobin::default();
        let c = candidates(&[(9.0, 0), (0.0, 0), (0.0, 5)]);
        let picks: Vec<usize> = (0..6).map(|_| policy.choose(&c).0).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}

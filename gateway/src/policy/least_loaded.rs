//! `least-loaded`: the worker with the lowest load.

use super::{Candidate, Policy, Reason, least_loaded_of};

/// Picks the least loaded worker, at random among equals.
pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn choose(&self, candidates: &[Candidate]) -> (usize, Reason) {
        (least_loaded_of(candidates, 0..candidates.len()), Reason::LeastLoaded)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::policy::candidates;

    #[test]
    fn picks_the_lowest_load_and_spreads_ties() {
        let c = candidates(&[(3.0, 9), (1.0, 0), (2.5, 0)]);
        assert_eq!(LeastLoaded.choose(&c), (1, Reason::LeastLoaded), "overlap is ignored");
        let tied = candidates(&[(0.0, 0), (0.0, 0), (1.0, 0)]);
        let seen: HashSet<usize> = (0..200).map(|_| LeastLoaded.choose(&tied).0).collect();
        assert_eq!(seen, HashSet::from([0, 1]));
    }
}

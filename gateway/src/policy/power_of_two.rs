//! `power-of-two`: the less loaded of two workers drawn at random. Close to least-loaded's
//! balance, while gateways that see the same stale loads do not all pile onto one worker.

use rand::seq::index::sample;

use super::{Candidate, Policy, Reason, least_loaded_of};

/// Draws two workers and picks the less loaded.
pub struct PowerOfTwo;

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power-of-two"
    }

    fn choose(&self, candidates: &[Candidate]) -> (usize, Reason) {
        let drawn = sample(&mut rand::rng(), candidates.len(), candidates.len().min(2));
        (least_loaded_of(candidates, drawn.into_iter()), Reason::PowerOfTwo)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::policy::candidates;

    #[test]
    fn never_picks_the_busiest_and_favours_the_idlest() {
        let c = candidates(&[(0.0, 0), (5.0, 0), (9.0, 0)]);
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for _ in 0..600 {
            *counts.entry(PowerOfTwo.choose(&c).0).or_default() += 1;
        }
        // The idlest wins both draws it is in (2 of 3), the middle one the third.
        assert!(!counts.contains_key(&2), "{counts:?}");
        assert!(counts[&0] > counts[&1], "{counts:?}");
        assert_eq!(PowerOfTwo.choose(&candidates(&[(4.0, 0)])).0, 0, "one candidate");
    }
}

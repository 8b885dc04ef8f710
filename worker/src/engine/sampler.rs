//! Turns logits into the next token: penalties, logit bias, temperature, top-k, top-p, min-p,
//! seeded sampling.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::error::{EngineError, Result};

/// Temperatures below this are greedy: dividing logits by less overflows them to infinity (and
/// the softmax to NaN), and the draw is the argmax anyway.
pub const MIN_TEMPERATURE: f32 = 1e-5;

/// Most tokens a `logit_bias` may name.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// How to pick tokens; OpenAI semantics, with vLLM's extras.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or anything below [`MIN_TEMPERATURE`]) means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps everything.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// HF-style: > 1 discourages tokens already in the prompt or output.
    pub repetition_penalty: f32,
    /// OpenAI: subtracted once from tokens that appeared in the output.
    pub presence_penalty: f32,
    /// OpenAI: subtracted per occurrence in the output.
    pub frequency_penalty: f32,
    /// Same seed, same output.
    pub seed: Option<u64>,
    /// Drop tokens less likely than this share of the most likely one's probability; 0 keeps all.
    pub min_p: f32,
    /// Added to the logits of these token ids before sampling (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            min_p: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Rejects values outside the documented ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidArgument(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return bad(format!("logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {}", self.logit_bias.len()));
        }
        if let Some((id, bias)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return bad(format!("logit_bias of token {id} must be in [-100, 100], got {bias}"));
        }
        Ok(())
    }
}

/// A sampler for one sequence, holding its random state.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`, or from the OS when unset.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Applies penalties in place: repetition over `context` (prompt + output), presence and
    /// frequency over `output`; then the logit bias.
    pub fn apply_penalties(&self, logits: &mut [f32], context: &[u32], output: &[u32]) {
        let p = &self.params;
        self.penalize(logits, context, output);
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
    }

    fn penalize(&self, logits: &mut [f32], context: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in context {
                let Some(l) = logits.get_mut(t as usize) else { continue };
                if std::mem::replace(&mut seen[t as usize], true) {
                    continue;
                }
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    /// Picks the next token from penalized logits. Only the candidates top-k and top-p keep
    /// are ordered, by partial selection: no full-vocabulary sort.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature < MIN_TEMPERATURE {
            return argmax(logits);
        }
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if cands.is_empty() {
            return argmax(logits);
        }
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, likelier);
            cands.truncate(p.top_k);
        }
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        if p.min_p > 0.0 {
            // exp(l - max) is a token's probability over the most likely one's.
            cands.retain(|(_, l)| (l - max).exp() >= p.min_p);
        }
        let total: f32 = cands.iter().map(|(_, l)| (l - max).exp()).sum();
        let keep = if p.top_p < 1.0 { nucleus(&mut cands, max, total, p.top_p) } else { cands.len() };
        let kept = &cands[..keep];
        let mass: f32 = if keep == cands.len() { total } else { kept.iter().map(|(_, l)| (l - max).exp()).sum() };
        let r = self.rng.random::<f32>() * mass;
        let mut acc = 0.0;
        for (id, l) in kept {
            acc += (l - max).exp();
            if r < acc {
                return *id;
            }
        }
        kept[keep - 1].0
    }
}

/// Orders candidates from the most likely down, lower ids first on ties.
fn likelier(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Moves the most likely candidates to the front in order, as many as reach `top_p` of the
/// probability mass (`exp(l - max)` over `total`), and returns how many that is. It orders a
/// prefix that grows fourfold until it holds that mass, rather than sorting everything.
fn nucleus(cands: &mut [(u32, f32)], max: f32, total: f32, top_p: f32) -> usize {
    let mut n = cands.len().min(64);
    loop {
        if n < cands.len() {
            cands.select_nth_unstable_by(n - 1, likelier);
        }
        cands[..n].sort_unstable_by(likelier);
        let mut acc = 0.0;
        for (i, (_, l)) in cands[..n].iter().enumerate() {
            acc += (l - max).exp() / total;
            if acc >= top_p {
                return i + 1;
            }
        }
        if n == cands.len() {
            return n;
        }
        n = (n * 4).min(cands.len());
    }
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Natural-log softmax of `logits`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|l| l - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(7), ..SamplingParams::default() };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)));
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        let logits = [1.0, 5.0, 4.9, 0.0, 30.0, 29.99];
        for t in [1e-38, f32::MIN_POSITIVE, 1e-6, 9.9e-6] {
            let mut s = Sampler::new(params(|p| p.temperature = t));
            assert!((0..20).all(|_| s.sample(&logits) == 4), "temperature {t}");
        }
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_small_keeps_best() {
        let logits = [1.0, 5.0, 4.9, 0.0];
        let mut s = Sampler::new(params(|p| p.top_k = 1));
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        for top_p in [0.01, f32::MIN_POSITIVE] {
            let mut s = Sampler::new(params(|p| p.top_p = top_p));
            assert!((0..20).all(|_| s.sample(&logits) == 1), "top_p {top_p}");
        }
    }

    /// The partial ordering keeps exactly the tokens a full sort would, for nuclei needing a
    /// few candidates and thousands, and sampling stays inside them.
    #[test]
    fn nucleus_matches_a_full_sort_on_a_large_vocabulary() {
        let logits: Vec<f32> = (0..49_152).map(|i| ((i * 7919) % 10_007) as f32 / 1500.0).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        let mut sorted: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        sorted.sort_by(likelier);
        for top_p in [0.001, 0.05, 0.5, 0.9, 0.999] {
            let mut cands: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            let keep = nucleus(&mut cands, max, total, top_p);
            let mut acc = 0.0;
            let want = sorted.iter().position(|(_, l)| {
                acc += (l - max).exp() / total;
                acc >= top_p
            });
            assert_eq!(keep, want.map_or(sorted.len(), |i| i + 1), "top_p {top_p}");
            assert_eq!(&cands[..keep], &sorted[..keep], "top_p {top_p}");
            let mut s = Sampler::new(params(|p| p.top_p = top_p));
            let allowed: std::collections::HashSet<u32> = sorted[..keep].iter().map(|c| c.0).collect();
            assert!((0..50).all(|_| allowed.contains(&s.sample(&logits))), "top_p {top_p}");
        }
    }

    #[test]
    fn penalties_follow_hf_and_openai() {
        let s = Sampler::new(params(|p| {
            p.repetition_penalty = 2.0;
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        }));
        let mut l = vec![4.0, -4.0, 4.0, 1.0];
        s.apply_penalties(&mut l, &[0, 1, 0], &[2, 2]);
        assert_eq!(l, vec![2.0, -8.0, 4.0 - 0.5 - 0.5, 1.0]);
    }

    #[test]
    fn logit_bias_moves_the_greedy_token() {
        let s = Sampler::new(params(|p| p.logit_bias = vec![(0, -100.0), (3, 2.5), (99, 5.0)]));
        let mut l = vec![4.0, 3.0, 1.0, 1.0];
        s.apply_penalties(&mut l, &[], &[]);
        assert_eq!(l, vec![-96.0, 3.0, 1.0, 3.5], "ids past the vocabulary are left alone");
        assert_eq!(argmax(&l), 3);
    }

    #[test]
    fn min_p_drops_the_unlikely() {
        // Token 1 has e^-3 ≈ 0.05 of token 0's probability: min_p 0.1 drops it, 0.01 keeps it.
        let logits = [0.0, -3.0];
        let draws = |min_p| {
            let mut s = Sampler::new(params(|p| p.min_p = min_p));
            (0..2000).filter(|_| s.sample(&logits) == 1).count()
        };
        assert_eq!(draws(0.1), 0);
        assert!(draws(0.01) > 20);
    }

    #[test]
    fn validation_names_the_parameter() {
        let e = params(|p| p.top_p = 0.0).validate().unwrap_err().to_string();
        assert!(e.contains("top_p"), "{e}");
        let e = params(|p| p.temperature = -1.0).validate().unwrap_err().to_string();
        assert!(e.contains("temperature"), "{e}");
        let e = params(|p| p.min_p = 1.5).validate().unwrap_err().to_string();
        assert!(e.contains("min_p"), "{e}");
        let e = params(|p| p.logit_bias = vec![(5, 101.0)]).validate().unwrap_err().to_string();
        assert!(e.contains("logit_bias of token 5"), "{e}");
        assert!(params(|_| {}).validate().is_ok());
    }

    #[test]
    fn log_softmax_normalizes() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}

//! Prefix caching: the keys and values of prompts (and finished answers) run before, kept so that
//! a later prompt starting with the same tokens copies them instead of recomputing them. Shared
//! system prompts, few-shot examples and the history of a multi-turn chat all start that way.
//!
//! Entries are whole token sequences, least recently used evicted first, within a token budget.
//! A copied prefix holds what the sequence would have computed itself, up to the rounding of
//! matrix products over a different number of rows.

use std::collections::VecDeque;

use super::error::Result;
use super::tp::SeqCache;

/// Shorter matches are not worth a lookup's copy, nor holding back a prompt for.
pub const MIN_REUSE: usize = 16;

/// Counters of the cache's use, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Lookups that found a prefix.
    pub hits: u64,
    /// Prompt tokens copied instead of computed.
    pub hit_tokens: u64,
    /// Tokens the cache holds now.
    pub tokens: usize,
}

struct Entry {
    tokens: Vec<u32>,
    cache: SeqCache,
}

/// Cached KV prefixes, most recently used first, holding at most `capacity` tokens in all.
pub struct PrefixCache {
    capacity: usize,
    entries: VecDeque<Entry>,
    stats: PrefixStats,
}

/// Tokens `a` and `b` share from their start.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// An empty cache of `capacity` tokens; 0 turns caching off.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, entries: VecDeque::new(), stats: PrefixStats::default() }
    }

    /// Tokens it may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Its use so far.
    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// A copy of the longest cached prefix of `context`, short of its last token (whose logits
    /// the step needs), if one of at least [`MIN_REUSE`] tokens is cached.
    pub fn lookup(&mut self, context: &[u32]) -> Result<Option<SeqCache>> {
        if self.capacity == 0 || context.len() <= MIN_REUSE {
            return Ok(None);
        }
        let wanted = &context[..context.len() - 1];
        // The first of equally long matches is the most recently used.
        let best = self.entries.iter().enumerate().map(|(i, e)| (common_prefix(&e.tokens, wanted), i)).fold(
            None,
            |best: Option<(usize, usize)>, (n, i)| if best.is_none_or(|(m, _)| n > m) { Some((n, i)) } else { best },
        );
        let Some((n, i)) = best.filter(|&(n, _)| n >= MIN_REUSE) else { return Ok(None) };
        let entry = self.entries.remove(i).expect("an entry just found");
        let cache = entry.cache.prefix(n);
        self.entries.push_front(entry);
        let cache = cache?;
        self.stats.hits += 1;
        self.stats.hit_tokens += n as u64;
        Ok(Some(cache))
    }

    /// Keeps the first `held` tokens of `tokens`, whose keys and values a sequence's cache
    /// holds; `take(n)` gives them up (a copy of the first `n`, or the cache itself), and is
    /// only called when they are kept.
    pub fn insert(&mut self, tokens: &[u32], held: usize, take: impl FnOnce(usize) -> Result<SeqCache>) -> Result<()> {
        let n = held.min(tokens.len());
        if n < MIN_REUSE || n > self.capacity {
            return Ok(());
        }
        let tokens = &tokens[..n];
        if let Some(i) = self.entries.iter().position(|e| e.tokens.starts_with(tokens)) {
            let entry = self.entries.remove(i).expect("an entry just found");
            self.entries.push_front(entry);
            return Ok(());
        }
        let cache = take(n)?;
        // Entries the new one extends add nothing once it is in.
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        let mut held: usize = self.entries.iter().map(|e| e.tokens.len()).sum();
        while held + n > self.capacity {
            held -= self.entries.pop_back().map_or(0, |e| e.tokens.len());
        }
        self.entries.push_front(Entry { tokens: tokens.to_vec(), cache });
        self.stats.tokens = held + n;
        Ok(())
    }
}

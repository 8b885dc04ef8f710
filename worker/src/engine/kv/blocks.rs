//! The block pool: which blocks hold what, who uses them, and which to give out next.
//!
//! vLLM's design (v1 `BlockPool`): every block has a reference count; free blocks wait in one
//! queue, least recently freed first, so that a freed block keeps its contents (and stays
//! findable) until its space is needed. A full block is found by the hash of its tokens and of
//! every block before it. Partly filled blocks are found through their parent's hash and
//! their tokens, and shared by copying the rows that match (copy-on-write).

use std::collections::HashMap;

pub use herd_prompt::blocks::Digest;
use herd_prompt::blocks::{ROOT, chain};

/// A block's index in every rank's storage.
pub type BlockId = u32;

/// No block (the free queue's ends).
const NONE: u32 = u32::MAX;

/// Tokens `a` and `b` share from their start.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[derive(Debug, Clone)]
struct Meta {
    /// Sequences whose tables hold it.
    refs: u32,
    /// The tokens whose keys and values its rows hold.
    tokens: Vec<u32>,
    /// The hash of the blocks before it, when it is indexed under it.
    parent: Option<Digest>,
    /// Its own chain hash, once full.
    hash: Option<Digest>,
    /// Neighbours in the free queue.
    prev: u32,
    next: u32,
    free: bool,
}

/// Blocks in use, cached (free but holding a findable prefix) and in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    pub used: usize,
    pub cached: usize,
    pub total: usize,
    pub block_size: usize,
    /// Lookups that found a prefix, and the prompt tokens they found.
    pub hits: u64,
    pub hit_tokens: u64,
    /// Prompt tokens of every prompt that ran, found or computed.
    pub prompt_tokens: u64,
    /// Bumped whenever a full block is indexed or forgotten: the published hashes changed.
    pub version: u64,
}

/// The blocks of one device group (every rank holds block `b` at the same place).
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    /// Whether contents are indexed for later prompts (automatic prefix caching).
    caching: bool,
    meta: Vec<Meta>,
    /// The free queue: its head is given out first.
    head: u32,
    tail: u32,
    free: usize,
    /// Free blocks that are indexed.
    cached: usize,
    /// Full blocks by chain hash (the first of equal ones).
    full: HashMap<Digest, BlockId>,
    /// Indexed blocks, full or not, by their parent's hash.
    children: HashMap<Digest, Vec<BlockId>>,
    hits: u64,
    hit_tokens: u64,
    prompt_tokens: u64,
    version: u64,
}

impl BlockPool {
    /// `blocks` free blocks of `block_size` tokens; `caching` indexes their contents.
    pub fn new(blocks: usize, block_size: usize, caching: bool) -> Self {
        let n = u32::try_from(blocks).expect("fewer blocks than u32::MAX");
        let meta = (0..n)
            .map(|b| Meta {
                refs: 0,
                tokens: Vec::new(),
                parent: None,
                hash: None,
                prev: if b == 0 { NONE } else { b - 1 },
                next: if b + 1 == n { NONE } else { b + 1 },
                free: true,
            })
            .collect();
        Self {
            block_size,
            caching,
            meta,
            head: if n == 0 { NONE } else { 0 },
            tail: if n == 0 { NONE } else { n - 1 },
            free: blocks,
            cached: 0,
            full: HashMap::new(),
            children: HashMap::new(),
            hits: 0,
            hit_tokens: 0,
            prompt_tokens: 0,
            version: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can be given out now (free ones, cached ones included).
    pub fn available(&self) -> usize {
        self.free
    }

    /// Blocks in all.
    pub fn total(&self) -> usize {
        self.meta.len()
    }

    /// Whether contents are indexed for reuse.
    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Its state and use so far.
    pub fn stats(&self) -> KvStats {
        KvStats {
            used: self.meta.len() - self.free,
            cached: self.cached,
            total: self.meta.len(),
            block_size: self.block_size,
            hits: self.hits,
            hit_tokens: self.hit_tokens,
            prompt_tokens: self.prompt_tokens,
            version: self.version,
        }
    }

    /// The short hashes of the full blocks it can find, which workers publish for routing.
    pub fn hashes(&self) -> Vec<u64> {
        self.full.keys().map(herd_prompt::blocks::short).collect()
    }

    /// Counts a prompt of `prompt` tokens that found `tokens` of itself cached.
    pub fn count_prompt(&mut self, prompt: usize, tokens: usize) {
        self.prompt_tokens += prompt as u64;
        if tokens > 0 {
            self.hits += 1;
            self.hit_tokens += tokens as u64;
        }
    }

    fn unlink(&mut self, b: BlockId) {
        let (prev, next) = (self.meta[b as usize].prev, self.meta[b as usize].next);
        match prev {
            NONE => self.head = next,
            p => self.meta[p as usize].next = next,
        }
        match next {
            NONE => self.tail = prev,
            n => self.meta[n as usize].prev = prev,
        }
        let m = &mut self.meta[b as usize];
        (m.prev, m.next, m.free) = (NONE, NONE, false);
        self.free -= 1;
        if m.parent.is_some() {
            self.cached -= 1;
        }
    }

    /// Queues a block that became free: at the tail when its contents may be found again
    /// (given out last), else at the head.
    fn enqueue(&mut self, b: BlockId) {
        let indexed = self.meta[b as usize].parent.is_some();
        let m = &mut self.meta[b as usize];
        m.free = true;
        if indexed {
            (m.prev, m.next) = (self.tail, NONE);
            match self.tail {
                NONE => self.head = b,
                t => self.meta[t as usize].next = b,
            }
            self.tail = b;
            self.cached += 1;
        } else {
            (m.prev, m.next) = (NONE, self.head);
            match self.head {
                NONE => self.tail = b,
                h => self.meta[h as usize].prev = b,
            }
            self.head = b;
        }
        self.free += 1;
    }

    /// Takes a block out of the indexes, its contents about to be overwritten.
    fn forget(&mut self, b: BlockId) {
        let m = &mut self.meta[b as usize];
        let (parent, hash) = (m.parent.take(), m.hash.take());
        m.tokens.clear();
        if let Some(p) = parent
            && let Some(kids) = self.children.get_mut(&p)
        {
            kids.retain(|&k| k != b);
            if kids.is_empty() {
                self.children.remove(&p);
            }
        }
        if let Some(h) = hash
            && self.full.get(&h) == Some(&b)
        {
            self.full.remove(&h);
            self.version += 1;
        }
    }

    /// A block for new contents, the least recently freed one; `None` when none is free.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = self.head;
        if b == NONE {
            return None;
        }
        self.unlink(b);
        self.forget(b);
        self.meta[b as usize].refs = 1;
        Some(b)
    }

    /// One more sequence holds `b`.
    pub fn acquire(&mut self, b: BlockId) {
        if self.meta[b as usize].free {
            self.unlink(b);
        }
        self.meta[b as usize].refs += 1;
    }

    /// A sequence gives `blocks` up, its last ones first, so that the start of a prefix
    /// stays cached longest.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            let m = &mut self.meta[b as usize];
            m.refs -= 1;
            if m.refs == 0 {
                if !self.caching {
                    self.forget(b);
                }
                self.enqueue(b);
            }
        }
    }

    /// Whether a sequence holding `b` with `rows` of its rows must copy it before writing the
    /// next: another sequence holds it too, or it holds rows past those.
    pub fn must_copy(&self, b: BlockId, rows: usize) -> bool {
        let m = &self.meta[b as usize];
        m.refs > 1 || m.tokens.len() != rows
    }

    /// The longest cached prefix of `context` short of its last token (whose logits a step
    /// needs): full blocks found by hash, then at most one block whose first rows match what is
    /// left. The blocks are acquired; returns them and the tokens they cover.
    pub fn lookup(&mut self, context: &[u32]) -> (Vec<BlockId>, usize) {
        if !self.caching || context.len() < 2 {
            return (Vec::new(), 0);
        }
        let wanted = &context[..context.len() - 1];
        let (mut parent, mut blocks) = (ROOT, Vec::new());
        for chunk in wanted.chunks_exact(self.block_size) {
            let h = chain(&parent, chunk);
            let Some(&b) = self.full.get(&h) else { break };
            blocks.push(b);
            parent = h;
        }
        let mut n = blocks.len() * self.block_size;
        let rest = &wanted[n..];
        if !rest.is_empty() {
            // The first of equally long matches.
            let best = self.children.get(&parent).into_iter().flatten().fold((0, NONE), |best, &b| {
                let k = common_prefix(&self.meta[b as usize].tokens, rest);
                if k > best.0 { (k, b) } else { best }
            });
            if best.0 > 0 {
                blocks.push(best.1);
                n += best.0;
            }
        }
        for &b in &blocks {
            self.acquire(b);
        }
        (blocks, n)
    }

    /// Notes that a sequence whose table is `table` now holds the keys and values of `tokens`,
    /// written from position `from` on: its blocks from there take those tokens, and (with
    /// caching) are indexed for later prompts.
    pub fn record(&mut self, table: &[BlockId], tokens: &[u32], from: usize) {
        let bs = self.block_size;
        if tokens.len() <= from {
            return;
        }
        for i in from / bs..=(tokens.len() - 1) / bs {
            let b = table[i];
            let rows = &tokens[i * bs..tokens.len().min((i + 1) * bs)];
            let m = &mut self.meta[b as usize];
            m.tokens.clear();
            m.tokens.extend_from_slice(rows);
            if !self.caching {
                continue;
            }
            let parent = match i {
                0 => ROOT,
                _ => match self.meta[table[i - 1] as usize].hash {
                    Some(h) => h,
                    None => continue,
                },
            };
            let m = &mut self.meta[b as usize];
            if m.parent.is_none() {
                m.parent = Some(parent);
                self.children.entry(parent).or_default().push(b);
            }
            if rows.len() == bs && m.hash.is_none() {
                let h = chain(&parent, rows);
                m.hash = Some(h);
                if let std::collections::hash_map::Entry::Vacant(slot) = self.full.entry(h) {
                    slot.insert(b);
                    self.version += 1;
                }
            }
        }
    }

    /// A copy of block `src`'s first `rows` token ids for block `dst`, which takes its place.
    pub fn copy_tokens(&mut self, src: BlockId, dst: BlockId, rows: usize) {
        let tokens = self.meta[src as usize].tokens[..rows].to_vec();
        self.meta[dst as usize].tokens = tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32, seed: u32) -> Vec<u32> {
        (0..n).map(|i| 1 + (i * 7 + seed) % 100).collect()
    }

    /// Allocates and records a sequence of `tokens`, as a step would.
    fn write(pool: &mut BlockPool, tokens: &[u32]) -> Vec<BlockId> {
        let table: Vec<_> = (0..tokens.len().div_ceil(pool.block_size())).map(|_| pool.allocate().unwrap()).collect();
        pool.record(&table, tokens, 0);
        table
    }

    #[test]
    fn a_cached_prefix_is_found_by_whole_blocks_then_a_partial_one() {
        let mut pool = BlockPool::new(16, 4, true);
        let a = ids(10, 1);
        let table = write(&mut pool, &a);
        assert_eq!(pool.stats().used, 3);
        // The same prompt again: everything but its last token, the third block in part.
        let (found, n) = pool.lookup(&a);
        assert_eq!((found.as_slice(), n), (table.as_slice(), 9));
        assert!(pool.must_copy(table[2], 1), "the partial block is shared, so it is copied before a write");
        pool.release(&found);
        // A prompt that diverges inside the second block.
        let mut b = a[..6].to_vec();
        b.extend([999, 998, 997]);
        let (found, n) = pool.lookup(&b);
        assert_eq!((found.as_slice(), n), (&table[..2], 6));
        pool.release(&found);
        // Nothing in common.
        assert_eq!(pool.lookup(&ids(9, 50)), (vec![], 0));
        pool.release(&table);
        assert_eq!((pool.stats().used, pool.stats().cached), (0, 3), "freed blocks stay findable");
        let (found, n) = pool.lookup(&a);
        assert_eq!((found.len(), n), (3, 9));
        assert_eq!(pool.stats().used, 3);
    }

    #[test]
    fn least_recently_freed_blocks_go_first_and_are_forgotten() {
        let mut pool = BlockPool::new(4, 2, true);
        let (a, b) = (ids(4, 1), ids(4, 2));
        let ta = write(&mut pool, &a);
        let tb = write(&mut pool, &b);
        assert_eq!(pool.available(), 0);
        assert_eq!(pool.allocate(), None);
        pool.release(&ta);
        pool.release(&tb);
        // a's blocks were freed first, so they are given out first: a is forgotten, b kept.
        let x = [pool.allocate().unwrap(), pool.allocate().unwrap()];
        assert_eq!(x.iter().copied().collect::<std::collections::HashSet<_>>(), ta.iter().copied().collect());
        assert_eq!(pool.lookup(&[a.clone(), vec![5]].concat()).1, 0);
        assert_eq!(pool.lookup(&[b.clone(), vec![5]].concat()).1, 4);
    }

    #[test]
    fn a_freed_sequence_gives_its_last_block_out_before_its_first() {
        let mut pool = BlockPool::new(3, 2, true);
        let t = write(&mut pool, &ids(6, 3));
        pool.release(&t);
        assert_eq!(pool.allocate(), Some(t[2]));
        assert_eq!(pool.allocate(), Some(t[1]));
    }

    #[test]
    fn unindexed_blocks_are_reused_before_cached_ones() {
        let mut pool = BlockPool::new(3, 2, true);
        let cached = write(&mut pool, &ids(2, 4));
        let scratch = pool.allocate().unwrap();
        pool.release(&cached);
        pool.release(&[scratch]);
        assert_eq!(pool.allocate(), Some(scratch), "the block holding nothing findable first");
        assert_eq!(pool.allocate(), Some(2), "then the never-used one");
        assert_eq!(pool.stats().cached, 1, "the cached block is still there");
    }

    #[test]
    fn without_caching_nothing_is_found() {
        let mut pool = BlockPool::new(4, 2, false);
        let a = ids(4, 1);
        let t = write(&mut pool, &a);
        pool.release(&t);
        assert_eq!(pool.lookup(&a), (vec![], 0));
        assert_eq!(pool.stats().cached, 0);
    }

    #[test]
    fn equal_blocks_computed_twice_are_indexed_once_and_forgotten_alike() {
        let mut pool = BlockPool::new(4, 2, true);
        let a = ids(4, 1);
        let (t1, t2) = (write(&mut pool, &a), write(&mut pool, &a));
        let (found, _) = pool.lookup(&[a.clone(), vec![1]].concat());
        assert_eq!(found, t1, "the first one is found");
        pool.release(&found);
        pool.release(&t1);
        pool.release(&t2);
        assert_eq!(pool.stats().used, 0);
        for _ in 0..4 {
            pool.allocate().unwrap();
        }
        assert!(pool.full.is_empty() && pool.children.is_empty(), "every index entry left with its block");
    }
}

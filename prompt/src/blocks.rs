//! The hashes that name KV blocks. A full block's hash covers its tokens and, through its
//! parent's hash, every token before it, so equal hashes mean equal prefixes. Workers index
//! their cache by them and publish them; gateways hash a prompt the same way to see which
//! worker holds how much of it.

use sha2::{Digest as _, Sha256};

/// The hash of a chain of full blocks.
pub type Digest = [u8; 32];

/// The parent of a sequence's first block.
pub const ROOT: Digest = [0; 32];

/// The hash of a full block's `tokens` after the chain `parent`.
pub fn chain(parent: &Digest, tokens: &[u32]) -> Digest {
    let mut h = Sha256::new();
    h.update(parent);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

/// The short form of a digest that workers publish: its first eight bytes. A collision only
/// misleads a routing guess; the worker itself matches on the whole digest.
pub fn short(digest: &Digest) -> u64 {
    u64::from_le_bytes(digest[..8].try_into().expect("a digest has 32 bytes"))
}

/// The short hashes of the full blocks of `ids`, in order.
pub fn prefix_hashes(ids: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = ROOT;
    ids.chunks_exact(block_size.max(1))
        .map(|block| {
            parent = chain(&parent, block);
            short(&parent)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_hash_depends_on_every_earlier_token() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[3] = 99;
        let (ha, hb) = (prefix_hashes(&a, 16), prefix_hashes(&b, 16));
        assert_eq!(ha.len(), 2, "only full blocks");
        assert!(ha.iter().zip(&hb).all(|(x, y)| x != y));
        assert_eq!(prefix_hashes(&a[..32], 16), ha);
        assert_eq!(ha[0], short(&chain(&ROOT, &a[..16])));
    }
}

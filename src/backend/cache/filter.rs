//! A growable Bloom filter over cache keys, so a lookup of a key that was never stored (every
//! lookup of a first run) is answered without reading the database.
//!
//! The keys are SHA-256 digests, so the bit positions are taken straight from the key's bytes,
//! with no hashing. The filter grows while it is shared (a key set is never known in advance):
//! it is a list of *layers*, each a blocked Bloom filter (one 512-bit block per key, so one
//! cache line is read per layer) twice the capacity of the one before; a key goes into the
//! newest layer and is looked for in all of them. At 10 bits per key and 7 probes, a layer
//! answers "maybe" for about 1% of absent keys, and a "maybe" costs one database read. It
//! never answers "no" for a key inserted.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// Bits of filter per key of a layer's capacity.
const BITS_PER_KEY: usize = 10;
/// Bits set (and tested) per key, all in one block.
const PROBES: usize = 7;
/// Words of 64 bits per block: 512 bits, one cache line.
const BLOCK_WORDS: usize = 8;
/// The capacity of the first layer of an empty filter (about 80 KB).
const MIN_CAPACITY: usize = 1 << 16;

struct Layer {
    words: Box<[AtomicU64]>,
    /// Blocks - 1 (a power of two minus one).
    block_mask: u64,
    capacity: usize,
    len: AtomicUsize,
}

impl Layer {
    fn new(capacity: usize) -> Layer {
        let blocks = (capacity * BITS_PER_KEY)
            .div_ceil(BLOCK_WORDS * 64)
            .next_power_of_two();
        Layer {
            words: (0..blocks * BLOCK_WORDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            block_mask: blocks as u64 - 1,
            capacity,
            len: AtomicUsize::new(0),
        }
    }

    /// The block's first word and the probes' (word offset, bit mask) pairs, all from the key.
    fn positions(&self, key: &[u8; 32]) -> (usize, [(usize, u64); PROBES]) {
        let word = |i: usize| u64::from_le_bytes(key[i * 8..i * 8 + 8].try_into().expect("8"));
        let block = (word(0) & self.block_mask) as usize * BLOCK_WORDS;
        // 9 bits per probe (a bit of the block) from the next 128 bits of the key.
        let bits = u128::from(word(1)) | (u128::from(word(2)) << 64);
        let probes = std::array::from_fn(|i| {
            let bit = ((bits >> (9 * i)) & 511) as usize;
            (bit >> 6, 1u64 << (bit & 63))
        });
        (block, probes)
    }

    fn insert(&self, key: &[u8; 32]) {
        let (block, probes) = self.positions(key);
        for (w, mask) in probes {
            self.words[block + w].fetch_or(mask, Ordering::Relaxed);
        }
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    fn may_contain(&self, key: &[u8; 32]) -> bool {
        let (block, probes) = self.positions(key);
        probes
            .iter()
            .all(|&(w, mask)| self.words[block + w].load(Ordering::Relaxed) & mask != 0)
    }

    fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

/// A shared, growable Bloom filter of 32-byte keys; see the [module docs](self).
pub(crate) struct KeyFilter {
    layers: RwLock<Vec<Arc<Layer>>>,
}

impl KeyFilter {
    /// A filter sized for `expected` keys before its first growth.
    pub(crate) fn with_capacity(expected: usize) -> KeyFilter {
        KeyFilter {
            // Bounded so the bit count cannot overflow; it grows past that if it must.
            layers: RwLock::new(vec![Arc::new(Layer::new(
                expected.clamp(MIN_CAPACITY, usize::MAX / (BITS_PER_KEY * 64)),
            ))]),
        }
    }

    /// Adds `key`. Safe to call from several threads at once.
    pub(crate) fn insert(&self, key: &[u8; 32]) {
        let newest = {
            let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
            layers[layers.len() - 1].clone()
        };
        if newest.len.load(Ordering::Relaxed) < newest.capacity {
            newest.insert(key);
            return;
        }
        let mut layers = self.layers.write().unwrap_or_else(|p| p.into_inner());
        let last = &layers[layers.len() - 1];
        if last.len.load(Ordering::Relaxed) >= last.capacity {
            let grown = Arc::new(Layer::new(last.capacity * 2));
            layers.push(grown);
        }
        layers[layers.len() - 1].insert(key);
    }

    /// False only if `key` was never inserted.
    pub(crate) fn may_contain(&self, key: &[u8; 32]) -> bool {
        let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
        layers.iter().any(|l| l.may_contain(key))
    }

    /// The memory the filter holds.
    pub(crate) fn bytes(&self) -> usize {
        let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
        layers.iter().map(|l| l.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn key(i: u64) -> [u8; 32] {
        Sha256::digest(i.to_le_bytes()).into()
    }

    #[test]
    fn never_forgets_a_key_across_growth_and_rarely_claims_an_absent_one() {
        let filter = KeyFilter::with_capacity(0);
        let n = 300_000u64; // several layers past the first 65,536
        for i in 0..n {
            filter.insert(&key(i));
        }
        assert!(filter.layers.read().unwrap().len() >= 3);
        assert!((0..n).all(|i| filter.may_contain(&key(i))));
        let absent = 100_000u64;
        let false_positives = (n..n + absent)
            .filter(|&i| filter.may_contain(&key(i)))
            .count();
        // About 1% per layer, and the lookup asks each layer: 3 layers, well under 5%.
        let rate = false_positives as f64 / absent as f64;
        assert!(rate < 0.05, "false positive rate {rate}");
        // About 10 bits per key of capacity, with up to twice the capacity allocated.
        assert!(
            filter.bytes() < (n as usize) * 10 / 8 * 4,
            "{} bytes",
            filter.bytes()
        );
    }

    #[test]
    fn an_empty_filter_contains_nothing() {
        let filter = KeyFilter::with_capacity(10);
        assert!(!(0..10_000).any(|i| filter.may_contain(&key(i))));
    }

    #[test]
    fn concurrent_inserts_are_all_kept() {
        let filter = Arc::new(KeyFilter::with_capacity(1000));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let f = filter.clone();
                std::thread::spawn(move || {
                    for i in 0..50_000 {
                        f.insert(&key(t * 1_000_000 + i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..4u64 {
            assert!((0..50_000).all(|i| filter.may_contain(&key(t * 1_000_000 + i))));
        }
    }
}

//! Resume: the compact set of ids already in an output file ([`Resume`], [`IdSet`]) and the
//! stable id hash ([`IdHash`]) that also assigns ids to shards.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::Error;

/// A 128-bit hash of an example id: the first 16 bytes of SHA-256 of
/// `"rmboost/id/v1\0"` followed by the id's UTF-8 bytes.
///
/// It is stable across runs, machines and releases (a golden test pins it), so it serves both
/// to remember ids compactly and to assign them to shards ([`IdHash::shard`]).
///
/// Two different ids share a hash with probability about `n² / 2¹²⁹` among `n` ids: below
/// 10⁻²¹ for a billion ids. (A collision would make resume skip one id as already done.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct IdHash(pub(crate) u128);

impl IdHash {
    /// The hash of `id`.
    #[must_use]
    pub(crate) fn of(id: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"rmboost/id/v1\0");
        h.update(id.as_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        IdHash(u128::from_le_bytes(b))
    }

    /// The shard of the id among `count` shards, in `0..count`: the low 64 bits of the hash
    /// (the first 8 digest bytes, little-endian) modulo `count`. Stable: the same id always
    /// lands in the same shard for the same count. `count` 0 is treated as 1.
    #[must_use]
    #[cfg_attr(not(feature = "run"), allow(dead_code))]
    pub(crate) fn shard(self, count: u32) -> u32 {
        let low = self.0 as u64;
        (low % u64::from(count.max(1))) as u32
    }
}

/// A set of example ids stored as [`IdHash`]es (exact 128-bit values: two ids are the same
/// only if their whole hashes are), in a B-tree: about 25 bytes per id whatever the length of
/// the ids, and no table that doubles (a hash set would hold 17 to 34 bytes per id, and both
/// tables while it grows).
#[derive(Debug, Clone, Default)]
pub(crate) struct IdSet(BTreeSet<u128>);

impl<S: AsRef<str> + ?Sized> From<&S> for IdHash {
    fn from(id: &S) -> Self {
        IdHash::of(id.as_ref())
    }
}

impl IdSet {
    /// An empty set.
    #[must_use]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds an id (or its hash); returns whether it was new.
    pub(crate) fn insert(&mut self, id: impl Into<IdHash>) -> bool {
        self.0.insert(id.into().0)
    }

    /// Removes an id (or its hash).
    #[cfg_attr(not(feature = "run"), allow(dead_code))]
    pub(crate) fn remove(&mut self, id: impl Into<IdHash>) {
        self.0.remove(&id.into().0);
    }

    /// Whether an id (or its hash) is in the set.
    #[must_use]
    pub(crate) fn contains(&self, id: impl Into<IdHash>) -> bool {
        self.0.contains(&id.into().0)
    }

    /// How many ids.
    #[must_use]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// The ids already written to an output file, so a rerun skips them.
///
/// Built by [`Resume::scan`], which streams the file line by line and keeps only the hash of
/// each line's `id` field (about 25 bytes per id). Lines that are not a JSON object
/// with a string `id` are counted in [`unreadable`](Self::unreadable) and otherwise ignored:
/// their ids, if any, are generated again.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    ids: IdSet,
    lines: u64,
    duplicates: u64,
    unreadable: u64,
}

/// The `id` of one JSON line (a string or an integer), if it has one.
pub(crate) fn line_id(line: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        // Other fields are read past without being kept.
        id: Value,
    }
    match serde_json::from_slice::<IdOnly>(line).ok()?.id {
        Value::String(s) => Some(s),
        Value::Number(n) if !n.is_f64() => Some(n.to_string()),
        _ => None,
    }
}

impl Resume {
    /// An empty index: nothing is done yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the ids of every line of `path`; a missing file gives an empty index.
    ///
    /// Streams the file (one line in memory at a time). A torn last line should be repaired
    /// first ([`OutputFile::open`](super::OutputFile::open) does); if not, it counts as
    /// unreadable.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file exists but cannot be read.
    pub fn scan(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let mut resume = Resume::new();
        if let Some(file) = super::append::if_exists(path, std::fs::File::open)? {
            resume
                .scan_reader(BufReader::with_capacity(1 << 16, file))
                .map_err(|source| Error::io(path.to_path_buf(), source))?;
        }
        Ok(resume)
    }

    /// Adds the ids of every line of `reader`.
    ///
    /// # Errors
    ///
    /// The reader's error.
    pub fn scan_reader(&mut self, mut reader: impl BufRead) -> std::io::Result<()> {
        let mut line = Vec::new();
        while super::line::next_nonblank_line(&mut reader, &mut line)? {
            self.lines += 1;
            match line_id(&line) {
                Some(id) => self.duplicates += u64::from(!self.ids.insert(&id)),
                None => self.unreadable += 1,
            }
        }
        Ok(())
    }

    /// Whether `id` is already done.
    #[must_use]
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// The set of done ids, without copying it.
    #[must_use]
    #[cfg_attr(not(feature = "run"), allow(dead_code))]
    pub(crate) fn into_ids(self) -> IdSet {
        self.ids
    }

    /// Distinct ids found.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no id was found.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ids.len() == 0
    }

    /// Non-blank lines scanned.
    #[must_use]
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Lines whose id had already been seen earlier in the file (a file written without
    /// resume, or concatenated).
    #[must_use]
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Lines without a readable `id`.
    #[must_use]
    pub fn unreadable(&self) -> u64 {
        self.unreadable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hash_is_stable() {
        // Golden values: changing them reshuffles shards of existing runs.
        assert_eq!(IdHash::of("q1"), IdHash::of("q1"));
        assert_ne!(IdHash::of("q1"), IdHash::of("q2"));
        let h = IdHash::of("q1");
        assert_eq!(format!("{:032x}", h.0), GOLDEN_Q1);
        assert_eq!(h.shard(1), 0);
        assert_eq!(h.shard(7), 3);
        assert_eq!(h.shard(0), 0);
    }

    const GOLDEN_Q1: &str = "5e7696cc408303906e8c09c2e6c17197";

    #[test]
    fn scan_counts_ids_duplicates_and_junk() {
        let mut r = Resume::new();
        r.scan_reader(
            &b"{\"id\":\"a\",\"prompt\":\"x\"}\n\n{\"id\":7}\n{\"id\":\"a\"}\nnot json\n{\"prompt\":1}\n{\"id\":\"b\"}"[..],
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        assert!(r.contains("a") && r.contains("7") && r.contains("b"));
        assert!(!r.contains("c"));
        assert_eq!(r.lines(), 6);
        assert_eq!(r.duplicates(), 1);
        assert_eq!(r.unreadable(), 2);
    }

    #[test]
    fn missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Resume::scan(dir.path().join("none.jsonl"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn id_set_basics() {
        let mut s = IdSet::new();
        assert!(s.len() == 0 && !s.contains("a"));
        assert!(s.insert("a") && !s.insert("a"));
        assert!(s.contains("a") && !s.contains("b"));
        let n = 10_000;
        for i in 0..n {
            assert!(s.insert(&format!("id-{i}")), "{i}");
        }
        assert_eq!(s.len(), n + 1);
        for i in 0..n {
            assert!(s.contains(&format!("id-{i}")), "{i}");
            assert!(!s.insert(&format!("id-{i}")), "{i}");
            assert!(!s.contains(&format!("other-{i}")), "{i}");
        }
        assert_eq!(s.len(), n + 1);
        let c = s.clone();
        assert_eq!(c.len(), s.len());
        assert!(c.contains("id-17") && c.contains("a"));
    }

    #[test]
    fn id_set_exact_on_hashes_sharing_top_or_low_bits() {
        // Hashes that differ only in their top bits (the directory's) or only in their low
        // bits (the hash table's) stay distinct.
        let mut s = IdSet::new();
        let mut model = std::collections::HashSet::new();
        for i in 0..4_000u128 {
            for h in [i, i << 64, (i << 100) | 5, u128::MAX - i] {
                assert_eq!(s.insert(IdHash(h)), model.insert(h), "{h:x}");
            }
        }
        assert_eq!(s.len(), model.len());
        for i in 0..6_000u128 {
            for h in [i, i << 64, (i << 100) | 5, u128::MAX - i, i << 1 | 1 << 90] {
                assert_eq!(s.contains(IdHash(h)), model.contains(&h), "{h:x}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn id_set_behaves_like_a_hash_set(
            ops in proptest::collection::vec((proptest::bool::ANY, 0u128..20_000, 0u8..3), 0..3_000)
        ) {
            let mut s = IdSet::new();
            let mut model = std::collections::HashSet::new();
            for (insert, x, spread) in ops {
                // Small values, values in the top bits, and uniform hashes.
                let h = match spread {
                    0 => x,
                    1 => x << 110,
                    _ => IdHash::of(&x.to_string()).0,
                };
                if insert {
                    proptest::prop_assert_eq!(s.insert(IdHash(h)), model.insert(h));
                } else {
                    proptest::prop_assert_eq!(s.contains(IdHash(h)), model.contains(&h));
                }
                proptest::prop_assert_eq!(s.len(), model.len());
            }
            for h in &model {
                proptest::prop_assert!(s.contains(IdHash(*h)));
            }
        }
    }

    #[test]
    fn shards_partition_ids() {
        let n = 4;
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[IdHash::of(&format!("id-{i}")).shard(n) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }
}

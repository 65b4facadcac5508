//! The generator's own overhead per example: a zero-latency fake backend, 1 KB prompts and
//! responses, the default template, concurrency 1 and 64, on a single-threaded runtime (one
//! core). The figure includes the fake backend's own work (building 1 KB answers), so it is an
//! upper bound on the library's overhead.
//!
//! Also the resume id set ([`rmboost::io::IdSet`]) at a million ids, inserts and lookups,
//! next to a plain `HashSet` of the same hashes (what it replaced).
//!
//! Run: `cargo bench --bench overhead --features test-util` (`-- id_set` for the id set only).

use rmboost::GeneratorExt;
use std::num::NonZeroUsize;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use rmboost::testing::FakeBackend;
use rmboost::{Prompt, RmBoost};

const BATCH: usize = 1000;

fn prompts() -> Vec<Prompt> {
    let body: String = "Explain the following carefully. "
        .chars()
        .cycle()
        .take(1024)
        .collect();
    (0..BATCH)
        .map(|i| Prompt::with_id(format!("p{i}"), format!("{i} {body}")))
        .collect()
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("generator_overhead");
    group.throughput(Throughput::Elements(BATCH as u64));
    for concurrency in [1usize, 64] {
        let rmb = RmBoost::builder()
            .backend(FakeBackend::with_response_len(1024))
            .concurrency(NonZeroUsize::new(concurrency).unwrap())
            .seed(1)
            .build()
            .unwrap();
        let input = prompts();
        group.bench_with_input(
            BenchmarkId::new("concurrency", concurrency),
            &concurrency,
            |b, _| {
                b.iter_batched(
                    || input.clone(),
                    |batch| {
                        rt.block_on(async {
                            let mut n = 0usize;
                            let mut s = rmb.generate_iter(batch);
                            while let Some(r) = s.next().await {
                                r.unwrap();
                                n += 1;
                            }
                            assert_eq!(n, BATCH);
                        })
                    },
                    criterion::BatchSize::LargeInput,
                )
            },
        );
    }
    group.finish();
}

/// Hashes an `IdHash` by its low 64 bits (it is already a uniform hash): the fairest plain
/// hash set to compare `IdSet` with.
#[derive(Default)]
struct Low64(u64);

impl std::hash::Hasher for Low64 {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, i: u128) {
        self.0 = i as u64;
    }
}

/// The id set's inputs: a million ids' hashes, a million other hashes, and both sets filled.
struct IdSetData {
    hashes: Vec<rmboost::io::IdHash>,
    misses: Vec<rmboost::io::IdHash>,
    full: rmboost::io::IdSet,
    model: std::collections::HashSet<rmboost::io::IdHash, std::hash::BuildHasherDefault<Low64>>,
}

fn id_set_data() -> IdSetData {
    use rmboost::io::{IdHash, IdSet};
    const N: usize = 1_000_000;
    let hashes: Vec<IdHash> = (0..N).map(|i| IdHash::of(&format!("p{i:08}"))).collect();
    let misses: Vec<IdHash> = (0..N).map(|i| IdHash::of(&format!("q{i:08}"))).collect();
    let mut full = IdSet::new();
    let mut model = std::collections::HashSet::default();
    for &h in &hashes {
        full.insert_hash(h);
        model.insert(h);
    }
    IdSetData {
        hashes,
        misses,
        full,
        model,
    }
}

fn id_set(c: &mut Criterion) {
    use rmboost::io::{IdHash, IdSet};
    use std::collections::HashSet;
    use std::hash::BuildHasherDefault;
    // Built on first use, so that a run filtered to other benchmarks does not pay for it.
    let data = std::cell::OnceCell::new();
    let data = || data.get_or_init(id_set_data);
    let mut group = c.benchmark_group("id_set");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1_000_000));
    group.bench_function("insert_1m", |b| {
        let hashes = &data().hashes;
        b.iter(|| {
            let mut s = IdSet::new();
            for &h in hashes {
                s.insert_hash(h);
            }
            s.len()
        });
    });
    group.bench_function("hashset_insert_1m", |b| {
        let hashes = &data().hashes;
        b.iter(|| {
            let mut s: HashSet<IdHash, BuildHasherDefault<Low64>> = HashSet::default();
            for &h in hashes {
                s.insert(h);
            }
            s.len()
        });
    });
    group.bench_function("contains_1m_hits_and_1m_misses", |b| {
        let d = data();
        b.iter(|| {
            let hits = d
                .hashes
                .iter()
                .filter(|&&h| d.full.contains_hash(h))
                .count();
            hits + d
                .misses
                .iter()
                .filter(|&&h| d.full.contains_hash(h))
                .count()
        });
    });
    group.bench_function("hashset_contains_1m_hits_and_1m_misses", |b| {
        let d = data();
        b.iter(|| {
            let hits = d.hashes.iter().filter(|h| d.model.contains(*h)).count();
            hits + d.misses.iter().filter(|h| d.model.contains(*h)).count()
        });
    });
    group.finish();
}

criterion_group!(benches, overhead, id_set);
criterion_main!(benches);

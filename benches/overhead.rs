//! The generator's own overhead per example: a zero-latency fake backend, 1 KB prompts and
//! responses, the default template, concurrency 1 and 64, on a single-threaded runtime (one
//! core). The figure includes the fake backend's own work (building 1 KB answers), so it is an
//! upper bound on the library's overhead.
//!
//! Run: `cargo bench --bench overhead --features test-util`.

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

criterion_group!(benches, overhead);
criterion_main!(benches);

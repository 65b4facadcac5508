//! Attention's inner loop for the query heads that share one key/value head, over one
//! sequence's cache: AVX2, FMA and F16C on x86-64 CPUs that have them, plain loops elsewhere.
//!
//! The cache holds keys and values as 16-bit floats; the query heads of a group (grouped-query
//! attention) are computed together, so each key and value is read once for all of them. The
//! version that runs (chosen at run time) depends only on the CPU and the model's shapes, never
//! on the batch, and each head's result is computed by the same instructions in the same order
//! whatever else is in the step.
//!
//! Design notes and measurements: see ARCHITECTURE.md in the repository.

#![allow(unsafe_code)]

use half::f16;

/// One key/value head's view of a sequence's cache: `n` positions, position `t`'s key at
/// `keys[t * stride + offset..][..d]` (values likewise), `d` the head width.
#[derive(Clone, Copy)]
pub(crate) struct Cache<'a> {
    pub(crate) keys: &'a [f16],
    pub(crate) values: &'a [f16],
    pub(crate) stride: usize,
    pub(crate) offset: usize,
    pub(crate) n: usize,
}

/// Query heads computed together by the AVX2 version (larger groups are split).
const MAX_GROUP: usize = 4;

/// Whether this CPU runs the AVX2 version.
fn fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Causal attention of the query heads `q` (`heads × d` values, already turned by the rotary
/// embedding) that share the key/value head `cache` views: for each head,
/// `out = softmax(q·K / √d) · V` over the `cache.n` positions. `scores` is scratch space.
///
/// # Panics
///
/// If `q` and `out` differ in length or are not a whole number of heads of width `d`,
/// `cache.n` is 0, or the cache is shorter than its view says.
pub(crate) fn group(q: &[f32], d: usize, cache: Cache<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    assert!(
        d > 0 && !q.is_empty() && q.len().is_multiple_of(d) && out.len() == q.len() && cache.n > 0,
        "attention shapes"
    );
    let last = (cache.n - 1) * cache.stride + cache.offset + d;
    assert!(
        cache.keys.len() >= last && cache.values.len() >= last,
        "a cache shorter than its view"
    );
    let inv_scale = 1.0 / (d as f32).sqrt();
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && fast() {
        for (q, out) in q.chunks(MAX_GROUP * d).zip(out.chunks_mut(MAX_GROUP * d)) {
            scores.clear();
            scores.resize(q.len() / d * cache.n, 0.0);
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above), `d` is a multiple
            // of 16, `q` and `out` hold `heads × d` values, `scores` `heads × n`, and the
            // cache's lengths were checked: every position's `d` keys and values are in bounds.
            unsafe {
                match q.len() / d {
                    1 => avx2::group::<1>(q, d, cache, inv_scale, scores, out),
                    2 => avx2::group::<2>(q, d, cache, inv_scale, scores, out),
                    3 => avx2::group::<3>(q, d, cache, inv_scale, scores, out),
                    _ => avx2::group::<MAX_GROUP>(q, d, cache, inv_scale, scores, out),
                }
            }
        }
        return;
    }
    for (q, out) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        plain(q, cache, inv_scale, scores, out);
    }
}

/// The portable version, one head at a time: the same steps as the AVX2 one.
fn plain(q: &[f32], cache: Cache<'_>, inv_scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    let d = q.len();
    scores.clear();
    scores.extend((0..cache.n).map(|t| {
        let k = &cache.keys[t * cache.stride + cache.offset..][..d];
        let mut acc = [0f32; 8];
        let (q8, k8) = (q.chunks_exact(8), k.chunks_exact(8));
        let (qr, kr) = (q8.remainder(), k8.remainder());
        for (x, y) in q8.zip(k8) {
            for j in 0..8 {
                acc[j] += x[j] * y[j].to_f32();
            }
        }
        let mut sum =
            ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (x, y) in qr.iter().zip(kr) {
            sum += x * y.to_f32();
        }
        sum * inv_scale
    }));
    let inv_sum = 1.0 / exp_in_place(scores);
    out.fill(0.0);
    for (t, &w) in scores.iter().enumerate() {
        let v = &cache.values[t * cache.stride + cache.offset..][..d];
        for (o, x) in out.iter_mut().zip(v) {
            *o += w * x.to_f32();
        }
    }
    for o in out.iter_mut() {
        *o *= inv_sum;
    }
}

/// Replaces each score by `exp(score - max)` and returns their sum (the softmax's divisor).
fn exp_in_place(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    super::vmath::exp_sum(scores, max, 1.0)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_castps256_ps128, _mm256_cvtph_ps, _mm256_extractf128_ps, _mm256_fmadd_ps,
        _mm256_hadd_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps,
        _mm256_storeu_ps, _mm_add_ss, _mm_cvtss_f32, _mm_loadu_si128,
    };

    use super::{exp_in_place, Cache};

    /// The 8 lanes of `v` summed as `((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7))`.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let h = _mm256_hadd_ps(v, v);
        let h = _mm256_hadd_ps(h, h);
        _mm_cvtss_f32(_mm_add_ss(
            _mm256_castps256_ps128(h),
            _mm256_extractf128_ps(h, 1),
        ))
    }

    /// Eight cached 16-bit floats from `p` as f32.
    ///
    /// # Safety
    ///
    /// The CPU must have F16C; `p` must address 8 values.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const half::f16) -> __m256 {
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
    }

    /// See [`super::group`], for `G` heads.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2, FMA and F16C; `d` must be a multiple of 16; `q` and `out` must
    /// hold `G × d` values and `scores` `G × cache.n`; for every `t < cache.n`, `cache.keys`
    /// and `cache.values` must hold `t * cache.stride + cache.offset + d` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group<const G: usize>(
        q: &[f32],
        d: usize,
        cache: Cache<'_>,
        inv_scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let n = cache.n;
        let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
        // SAFETY (all pointer reads and writes below): in bounds by the caller's lengths.
        for t in 0..n {
            let kp = unsafe { cache.keys.as_ptr().add(t * cache.stride + cache.offset) };
            let mut acc = [_mm256_setzero_ps(); G];
            for j in (0..d).step_by(8) {
                let k = unsafe { load8(kp.add(j)) };
                for (g, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(qp.add(g * d + j)) }, k, *acc);
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                scores[g * n + t] = hsum(*acc) * inv_scale;
            }
        }
        let mut inv_sum = [_mm256_setzero_ps(); G];
        for (g, inv) in inv_sum.iter_mut().enumerate() {
            *inv = _mm256_set1_ps(1.0 / exp_in_place(&mut scores[g * n..(g + 1) * n]));
        }
        // Sixteen output values of every head at a time, kept in registers over all positions.
        for base in (0..d).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; G];
            for t in 0..n {
                let vp = unsafe {
                    cache
                        .values
                        .as_ptr()
                        .add(t * cache.stride + cache.offset + base)
                };
                let (v0, v1) = unsafe { (load8(vp), load8(vp.add(8))) };
                for (g, acc) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(scores[g * n + t]);
                    acc[0] = _mm256_fmadd_ps(w, v0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(w, v1, acc[1]);
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                unsafe {
                    _mm256_storeu_ps(op.add(g * d + base), _mm256_mul_ps(acc[0], inv_sum[g]));
                    _mm256_storeu_ps(op.add(g * d + base + 8), _mm256_mul_ps(acc[1], inv_sum[g]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Attention written out in f64 as a reference, for one head.
    fn reference(q: &[f32], c: Cache<'_>) -> Vec<f64> {
        let d = q.len();
        let s: Vec<f64> = (0..c.n)
            .map(|t| {
                let k = &c.keys[t * c.stride + c.offset..][..d];
                q.iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * b.to_f64())
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..d)
            .map(|j| {
                (0..c.n)
                    .map(|t| e[t] / sum * c.values[t * c.stride + c.offset + j].to_f64())
                    .sum()
            })
            .collect()
    }

    #[test]
    fn both_versions_agree_with_a_reference_and_heads_do_not_depend_on_their_group() {
        // Widths with and without the AVX2 version's multiple of 16; groups of 1 to 9 heads
        // (split into runs of at most four); one and many positions.
        for (d, n, heads) in [
            (64, 1, 3),
            (64, 300, 3),
            (64, 40, 9),
            (16, 7, 1),
            (32, 50, 2),
            (128, 90, 4),
            (24, 5, 2),
            (12, 5, 1),
        ] {
            let (stride, offset) = (3 * d + 4, d + 2);
            let f16s = |v: Vec<f32>| v.into_iter().map(f16::from_f32).collect::<Vec<_>>();
            let keys = f16s(values(n * stride, 1 + d as u64));
            let vals = f16s(values(n * stride, 2 + n as u64));
            let q: Vec<f32> = values(heads * d, 3).iter().map(|x| x * 4.0).collect();
            let cache = Cache {
                keys: &keys,
                values: &vals,
                stride,
                offset,
                n,
            };
            let mut scores = Vec::new();
            let mut together = vec![0f32; heads * d];
            group(&q, d, cache, &mut scores, &mut together);
            for h in 0..heads {
                let qh = &q[h * d..(h + 1) * d];
                let want = reference(qh, cache);
                let mut alone = vec![0f32; d];
                group(qh, d, cache, &mut scores, &mut alone);
                let mut portable = vec![0f32; d];
                plain(
                    qh,
                    cache,
                    1.0 / (d as f32).sqrt(),
                    &mut scores,
                    &mut portable,
                );
                let got = &together[h * d..(h + 1) * d];
                assert!(
                    got.iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "d={d} n={n}: head {h} differs in a group of {heads} and alone"
                );
                for (name, got) in [("dispatched", got), ("plain", &portable[..])] {
                    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5,
                            "{name} d={d} n={n} head {h} [{j}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "shorter than its view")]
    fn a_short_cache_is_refused() {
        let keys = vec![f16::ZERO; 100];
        let cache = Cache {
            keys: &keys,
            values: &keys,
            stride: 64,
            offset: 0,
            n: 2,
        };
        group(&[0.0; 64], 64, cache, &mut Vec::new(), &mut [0.0; 64]);
    }
}

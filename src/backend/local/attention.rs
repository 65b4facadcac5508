//! Attention's inner loop for one query head over one sequence's cache, with AVX2 and FMA on
//! x86-64 CPUs that have them and plain loops elsewhere.
//!
//! The crate is built for the baseline x86-64 target (SSE2, no FMA) unless the user asks for
//! more, so plain loops run four floats at a time without fused multiply-adds. Attention over
//! a prompt of a few hundred tokens is quadratic in its length, and with those loops it took
//! about a third of the time of the bundled example; this version takes eight floats per
//! instruction, with fused multiply-adds, chosen at run time for the CPU found.
//!
//! Which version runs depends only on the CPU, never on the batch: a head's result is computed
//! by the same instructions in the same order whatever else is in the step.

#![allow(unsafe_code)]

/// One query head's view of a sequence's cache: `n` positions, position `t`'s key for this
/// head at `keys[t * stride + offset..][..d]` (values likewise), `d` the head's width.
#[derive(Clone, Copy)]
pub(crate) struct Cache<'a> {
    pub(crate) keys: &'a [f32],
    pub(crate) values: &'a [f32],
    pub(crate) stride: usize,
    pub(crate) offset: usize,
    pub(crate) n: usize,
}

/// Whether this CPU runs the AVX2 and FMA version.
fn fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Causal attention of one query head `q` (already turned by the rotary embedding) over the
/// `cache.n` positions of `cache`: `out = softmax(q·K / √d) · V`. `scores` is scratch space.
///
/// # Panics
///
/// If `out` is not as long as `q`, `cache.n` is 0, or the cache is shorter than its view says.
pub(crate) fn head(q: &[f32], cache: Cache<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let d = q.len();
    assert!(d > 0 && out.len() == d && cache.n > 0, "attention shapes");
    let last = (cache.n - 1) * cache.stride + cache.offset + d;
    assert!(
        cache.keys.len() >= last && cache.values.len() >= last,
        "a cache shorter than its view"
    );
    let inv_scale = 1.0 / (d as f32).sqrt();
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && fast() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), `d` is a multiple of 8, and
        // the lengths were checked: every position's `d` keys and values are in bounds.
        unsafe { avx2::head(q, cache, inv_scale, scores, out) };
        return;
    }
    plain(q, cache, inv_scale, scores, out);
}

/// The portable version: the same steps as the AVX2 one, four or eight floats at a time as the
/// compiler sees fit.
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
                acc[j] += x[j] * y[j];
            }
        }
        let mut sum =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (x, y) in qr.iter().zip(kr) {
            sum += x * y;
        }
        sum * inv_scale
    }));
    let inv_sum = 1.0 / exp_in_place(scores);
    out.fill(0.0);
    for (t, &w) in scores.iter().enumerate() {
        let v = &cache.values[t * cache.stride + cache.offset..][..d];
        for (o, x) in out.iter_mut().zip(v) {
            *o += w * x;
        }
    }
    for o in out.iter_mut() {
        *o *= inv_sum;
    }
}

/// Replaces each score by `exp(score - max)` and returns their sum (the softmax's divisor).
fn exp_in_place(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_fmadd_ps,
        _mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
        _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_movehl_ps, _mm_shuffle_ps,
    };

    use super::{exp_in_place, Cache};

    /// The 8 lanes summed in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    /// See [`super::head`].
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA; `q.len()` must be a multiple of 8 equal to `out.len()`;
    /// for every `t < cache.n`, `cache.keys` and `cache.values` must hold
    /// `t * cache.stride + cache.offset + q.len()` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn head(
        q: &[f32],
        cache: Cache<'_>,
        inv_scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let d = q.len();
        let qp = q.as_ptr();
        scores.clear();
        scores.reserve(cache.n);
        for t in 0..cache.n {
            // SAFETY (all loads below): in bounds by the caller's lengths.
            let kp = unsafe { cache.keys.as_ptr().add(t * cache.stride + cache.offset) };
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut j = 0;
            while j + 16 <= d {
                unsafe {
                    a0 =
                        _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(j)), _mm256_loadu_ps(kp.add(j)), a0);
                    a1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(qp.add(j + 8)),
                        _mm256_loadu_ps(kp.add(j + 8)),
                        a1,
                    );
                }
                j += 16;
            }
            if j < d {
                unsafe {
                    a0 =
                        _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(j)), _mm256_loadu_ps(kp.add(j)), a0);
                }
            }
            scores.push(hsum(_mm256_add_ps(a0, a1)) * inv_scale);
        }
        let inv_sum = _mm256_set1_ps(1.0 / exp_in_place(scores));
        let op = out.as_mut_ptr();
        let mut base = 0;
        // Four registers of the output at a time, kept in registers over all positions.
        while base + 32 <= d {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (t, &w) in scores.iter().enumerate() {
                let w = _mm256_set1_ps(w);
                let vp = unsafe {
                    cache
                        .values
                        .as_ptr()
                        .add(t * cache.stride + cache.offset + base)
                };
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(vp.add(8 * i)) }, *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                // SAFETY: `base + 8 * i + 8 <= d = out.len()`.
                unsafe { _mm256_storeu_ps(op.add(base + 8 * i), _mm256_mul_ps(*a, inv_sum)) };
            }
            base += 32;
        }
        while base < d {
            let mut acc = _mm256_setzero_ps();
            for (t, &w) in scores.iter().enumerate() {
                let vp = unsafe {
                    cache
                        .values
                        .as_ptr()
                        .add(t * cache.stride + cache.offset + base)
                };
                acc = _mm256_fmadd_ps(_mm256_set1_ps(w), unsafe { _mm256_loadu_ps(vp) }, acc);
            }
            unsafe { _mm256_storeu_ps(op.add(base), _mm256_mul_ps(acc, inv_sum)) };
            base += 8;
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

    /// Attention written out in f64 as a reference.
    fn reference(q: &[f32], c: Cache<'_>) -> Vec<f64> {
        let d = q.len();
        let s: Vec<f64> = (0..c.n)
            .map(|t| {
                let k = &c.keys[t * c.stride + c.offset..][..d];
                q.iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
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
                    .map(|t| e[t] / sum * c.values[t * c.stride + c.offset + j] as f64)
                    .sum()
            })
            .collect()
    }

    #[test]
    fn both_versions_agree_with_a_reference() {
        // Widths with and without a 32-float block, with an odd 8; one and many positions.
        for (d, n) in [
            (64, 1),
            (64, 300),
            (8, 7),
            (24, 50),
            (40, 33),
            (128, 90),
            (12, 5),
        ] {
            let (stride, offset) = (3 * d + 4, d + 2);
            let keys = values(n * stride, 1 + d as u64);
            let vals = values(n * stride, 2 + n as u64);
            let q: Vec<f32> = values(d, 3).iter().map(|x| x * 4.0).collect();
            let cache = Cache {
                keys: &keys,
                values: &vals,
                stride,
                offset,
                n,
            };
            let want = reference(&q, cache);
            let mut scores = Vec::new();
            let (mut fast_out, mut plain_out) = (vec![0f32; d], vec![0f32; d]);
            head(&q, cache, &mut scores, &mut fast_out);
            plain(
                &q,
                cache,
                1.0 / (d as f32).sqrt(),
                &mut scores,
                &mut plain_out,
            );
            for (name, got) in [("dispatched", &fast_out), ("plain", &plain_out)] {
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5,
                        "{name} d={d} n={n} [{j}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "shorter than its view")]
    fn a_short_cache_is_refused() {
        let keys = vec![0f32; 100];
        let cache = Cache {
            keys: &keys,
            values: &keys,
            stride: 64,
            offset: 0,
            n: 2,
        };
        head(&[0.0; 64], cache, &mut Vec::new(), &mut [0.0; 64]);
    }
}

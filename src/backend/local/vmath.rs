//! The exponentials the local model computes per token (SiLU in every MLP, softmax in attention,
//! the sampler's distribution over the whole vocabulary), eight at a time with AVX2 and FMA on
//! x86-64 CPUs that have them, and with a portable loop elsewhere.
//!
//! `e^x` is computed as `2^n · p(r)` with `n = round(x / ln 2)`, `r = x - n ln 2` (ln 2 in two
//! parts, for precision) and `p` a degree-7 polynomial fitted on `[-ln 2 / 2, ln 2 / 2]`:
//! relative error under 3e-7 over the whole range of f32 exponents. Inputs are clamped to where
//! `e^x` is a normal f32, so `e^(-∞)` gives 0. Each CPU gets one version (AVX2 or the portable
//! one), whatever the batch, so results do not depend on what else is decoded in the step.

#![allow(unsafe_code)]

/// Below this, `e^x` is taken as 0 (the smallest normal f32 is `e^-87.3`).
const LO: f32 = -88.376_26;
/// Inputs are clamped to this (`e^88` is about 1.7e38; f32 ends at 3.4e38).
const HI: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 as a short part, exact in f32, and the rest.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `e^r ≈ 1 + r + r² (P0 r⁵ + P1 r⁴ + P2 r³ + P3 r² + P4 r + P5)` on `[-ln 2 / 2, ln 2 / 2]`.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

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

/// `e^x` by the module's method, one value.
fn exp1(x: f32) -> f32 {
    let x = x.clamp(LO, HI);
    let n = (x * LOG2E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut y = P[0];
    for p in &P[1..] {
        y = y * r + p;
    }
    let y = y * (r * r) + (r + 1.0);
    // 2^n as an f32: n in -127..=127 here, and -127 gives 0 (below the normals).
    let bits = ((n as i32 + 127).max(0) as u32) << 23;
    y * f32::from_bits(bits)
}

/// Replaces each `x` by `e^((x - shift) · scale)` and returns the sum of the results.
pub(crate) fn exp_sum(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fast() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::exp_sum(xs, shift, scale) };
    }
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = exp1((*x - shift) * scale);
        sum += *x;
    }
    sum
}

/// `gate = silu(gate) · up`, element by element, with `silu(x) = x / (1 + e^-x)`.
pub(crate) fn silu_times(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_times lengths");
    #[cfg(target_arch = "x86_64")]
    if fast() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); the lengths are equal.
        unsafe { avx2::silu_times(gate, up) };
        return;
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp1(-*g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_add_epi32, _mm256_add_ps, _mm256_castsi256_ps, _mm256_cvtps_epi32,
        _mm256_div_ps, _mm256_fmadd_ps, _mm256_fnmadd_ps, _mm256_loadu_ps, _mm256_max_epi32,
        _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps, _mm256_round_ps, _mm256_set1_epi32,
        _mm256_set1_ps, _mm256_setzero_ps, _mm256_setzero_si256, _mm256_slli_epi32,
        _mm256_storeu_ps, _mm256_sub_ps, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
    };

    use super::{exp1, HI, LN2_HI, LN2_LO, LO, LOG2E, P};

    /// `e^x` for 8 lanes (the same steps as [`exp1`], with fused multiply-adds).
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut y = _mm256_set1_ps(P[0]);
        for p in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*p));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let e = _mm256_max_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            _mm256_setzero_si256(),
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
    }

    /// See [`super::exp_sum`].
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sum(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
        let (shift8, scale8) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
        let mut acc = _mm256_setzero_ps();
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds 8 floats.
            unsafe {
                let v = exp8(_mm256_mul_ps(
                    _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), shift8),
                    scale8,
                ));
                _mm256_storeu_ps(c.as_mut_ptr(), v);
                acc = _mm256_add_ps(acc, v);
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for x in chunks.into_remainder() {
            *x = exp1((*x - shift) * scale);
            sum += *x;
        }
        sum
    }

    /// See [`super::silu_times`].
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA; `gate` and `up` must be as long.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_times(gate: &mut [f32], up: &[f32]) {
        let one = _mm256_set1_ps(1.0);
        let mut g = gate.chunks_exact_mut(8);
        let mut u = up.chunks_exact(8);
        for (g, u) in (&mut g).zip(&mut u) {
            // SAFETY: both chunks hold 8 floats.
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr());
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
                _mm256_storeu_ps(
                    g.as_mut_ptr(),
                    _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr())),
                );
            }
        }
        for (g, u) in g.into_remainder().iter_mut().zip(u.remainder()) {
            *g = *g / (1.0 + exp1(-*g)) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_the_true_value_over_the_whole_range() {
        let xs: Vec<f32> = (-9000..=9000).map(|i| i as f32 / 100.0).collect();
        for version in ["dispatched", "portable"] {
            let mut got = xs.clone();
            if version == "dispatched" {
                exp_sum(&mut got, 0.0, 1.0);
            } else {
                got.iter_mut().for_each(|x| *x = exp1(*x));
            }
            for (x, g) in xs.iter().zip(&got) {
                let want = (*x as f64).exp();
                if *x < -87.3 {
                    assert!(*g < 1e-37, "{version}: e^{x} = {g}");
                } else if *x <= 88.0 {
                    let rel = ((*g as f64) - want).abs() / want;
                    assert!(
                        rel < 3e-7,
                        "{version}: e^{x} = {g}, want {want} (rel {rel:e})"
                    );
                }
            }
        }
        let mut v = [
            f32::NEG_INFINITY,
            0.0,
            f32::INFINITY,
            1.0,
            -1.0,
            2.0,
            3.0,
            4.0,
            5.0,
        ];
        exp_sum(&mut v, 0.0, 1.0);
        assert_eq!(v[0], 0.0, "e^-inf");
        assert_eq!(v[1], 1.0, "e^0");
        assert!(
            v[2].is_finite() && v[2] > 1e38,
            "e^inf is clamped: {}",
            v[2]
        );
    }

    #[test]
    fn shift_and_scale_and_silu() {
        let mut v: Vec<f32> = (0..21).map(|i| i as f32 * 0.5).collect();
        let sum = exp_sum(&mut v, 10.0, 0.5);
        for (i, x) in v.iter().enumerate() {
            let want = ((i as f64 * 0.5 - 10.0) * 0.5).exp();
            assert!((*x as f64 - want).abs() / want < 1e-6);
        }
        assert!((sum - v.iter().sum::<f32>()).abs() < 1e-5);

        let xs: Vec<f32> = (-50..=50).map(|i| i as f32 * 0.37).collect();
        let up: Vec<f32> = (0..xs.len()).map(|i| 1.0 + i as f32 * 0.01).collect();
        let mut g = xs.clone();
        silu_times(&mut g, &up);
        for ((x, u), g) in xs.iter().zip(&up).zip(&g) {
            let want = *x as f64 / (1.0 + (-*x as f64).exp()) * *u as f64;
            assert!(
                (*g as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                "silu({x})·{u} = {g}"
            );
        }
    }
}

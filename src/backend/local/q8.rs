//! Our own matrix product for Q8_0 weights, on x86-64 CPUs with AVX2 and FMA.
//!
//! candle's quantised product computes each (row, column) dot product with a kernel that
//! converts both blocks' f16 scales on every call, so at the small widths of a small model it
//! is bound by that work rather than by reading the weights: measured on the default model
//! (SmolLM2-135M, 2 cores), decoding 8 sequences together was only 1.1 times as fast as one.
//! This kernel keeps the weights' scales as f32 (converted once, at load), quantises each
//! activation row once per product, and computes up to four rows against each weight column
//! while that column's 32-byte blocks are in registers, so a batch of rows reads the weights
//! once. The work is split by column ranges over candle's own thread pool (no second pool
//! competing with it for the cores).
//!
//! # Same bits for a row alone and in a batch
//!
//! Every output is the dot product of one activation row and one weight column, computed by
//! the same instructions in the same order whatever the other rows are: per block, an 8-lane
//! integer product of the 32 quantised values, converted to f32 and added with one FMA to an
//! 8-lane accumulator (scale = weight scale × activation scale), then the 8 lanes summed in a
//! fixed order. Four rows at a time or one, the per-row sequence is identical, so a request's
//! logits do not depend on its neighbours (the model's load-time check verifies it too).
//!
//! Activations are quantised as ggml's `Q8_0` does (per block of 32: scale = max |x| / 127,
//! values rounded to the nearest integer), except that the scale stays f32.

#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};

type Result<T> = candle_core::Result<T>;

/// Values per quantised block.
const BLOCK: usize = 32;
/// Bytes per `Q8_0` block in a GGUF tensor: an f16 scale, then 32 signed bytes.
const BLOCK_BYTES: usize = 2 + BLOCK;
/// Activation rows computed together against each weight column.
const ROW_TILE: usize = 4;
/// Weight columns per unit of work handed to a thread.
const COLUMN_CHUNK: usize = 16;

/// A `Q8_0` weight matrix of `rows` output features by `cols` input features, with f32 scales.
pub(crate) struct Q8Matrix {
    rows: usize,
    cols: usize,
    blocks: usize,
    /// `rows × blocks` scales, row-major.
    scales: Vec<f32>,
    /// `rows × blocks × 32` quantised values, row-major.
    quants: Vec<i8>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

/// Whether this CPU runs the kernel (AVX2 and FMA on x86-64).
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Q8Matrix {
    /// The matrix of a 2-D `Q8_0` tensor (`[rows, cols]`), or `None` when the tensor is of
    /// another type or shape, or this CPU lacks the kernel's instructions (then candle's
    /// product is used).
    pub(crate) fn from_qtensor(t: &QTensor) -> Result<Option<Q8Matrix>> {
        if t.dtype() != GgmlDType::Q8_0 || !supported() {
            return Ok(None);
        }
        let Ok((rows, cols)) = t.shape().dims2() else {
            return Ok(None);
        };
        if cols == 0 || cols % BLOCK != 0 {
            return Ok(None);
        }
        let blocks = cols / BLOCK;
        let data = t.data()?;
        if data.len() != rows * blocks * BLOCK_BYTES {
            candle_core::bail!(
                "a Q8_0 tensor of {rows}x{cols} holds {} bytes, not {}",
                data.len(),
                rows * blocks * BLOCK_BYTES
            );
        }
        let mut scales = Vec::with_capacity(rows * blocks);
        let mut quants = Vec::with_capacity(rows * blocks * BLOCK);
        for block in data.chunks_exact(BLOCK_BYTES) {
            scales.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
            quants.extend(block[2..].iter().map(|&b| b as i8));
        }
        Ok(Some(Q8Matrix {
            rows,
            cols,
            blocks,
            scales,
            quants,
        }))
    }

    /// Input features.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Output features.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// `x` (`m × cols`, row-major) times this matrix transposed: `m × rows`, row-major.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation length");
        let acts = Activations::quantize(x, m, self.blocks);
        let n = self.rows;
        let mut out = vec![0f32; m * n];
        let chunks = n.div_ceil(COLUMN_CHUNK);
        let dst = SharedOut(out.as_mut_ptr());
        let work = |range: std::ops::Range<usize>| {
            for chunk in range {
                let c0 = chunk * COLUMN_CHUNK;
                let c1 = n.min(c0 + COLUMN_CHUNK);
                self.columns(&acts, c0..c1, &dst, n);
            }
        };
        if m * n * self.blocks < 4096 {
            work(0..chunks);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(chunks, work);
        }
        out
    }

    /// Computes every row's outputs for the columns `cols`, writing them through `dst`.
    fn columns(&self, acts: &Activations, cols: std::ops::Range<usize>, dst: &SharedOut, n: usize) {
        let b = self.blocks;
        let mut row = 0;
        while row < acts.rows {
            let tile = ROW_TILE.min(acts.rows - row);
            for col in cols.clone() {
                let w_q = &self.quants[col * b * BLOCK..(col + 1) * b * BLOCK];
                let w_s = &self.scales[col * b..(col + 1) * b];
                let mut sums = [0f32; ROW_TILE];
                if tile == ROW_TILE {
                    sums = dot::<ROW_TILE>(w_q, w_s, acts, row);
                } else {
                    for (r, sum) in sums.iter_mut().enumerate().take(tile) {
                        *sum = dot::<1>(w_q, w_s, acts, row + r)[0];
                    }
                }
                for (r, sum) in sums.iter().take(tile).enumerate() {
                    // SAFETY: (row + r, col) is in bounds (row + r < m, col < n) and is written
                    // by this call only: each unit of work owns a distinct range of columns.
                    unsafe { dst.0.add((row + r) * n + col).write(*sum) };
                }
            }
            row += tile;
        }
    }
}

/// The output buffer, written by several threads at disjoint (row, column) places.
struct SharedOut(*mut f32);
// SAFETY: the threads write disjoint elements (see `Q8Matrix::columns`) and the buffer
// outlives the pool's call, which returns only when every unit of work is done.
unsafe impl Sync for SharedOut {}

/// Activation rows quantised as `Q8_0` with f32 scales.
struct Activations {
    rows: usize,
    blocks: usize,
    scales: Vec<f32>,
    quants: Vec<i8>,
}

impl Activations {
    fn quantize(x: &[f32], rows: usize, blocks: usize) -> Activations {
        let mut scales = Vec::with_capacity(rows * blocks);
        let mut quants = Vec::with_capacity(rows * blocks * BLOCK);
        for block in x.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
            scales.push(d);
            quants.extend(block.iter().map(|v| (v * inv).round() as i8));
        }
        Activations {
            rows,
            blocks,
            scales,
            quants,
        }
    }
}

/// The dot products of rows `first..first + R` of `acts` with one weight column.
fn dot<const R: usize>(w_q: &[i8], w_s: &[f32], acts: &Activations, first: usize) -> [f32; R] {
    let b = acts.blocks;
    assert!(first + R <= acts.rows && w_q.len() == b * BLOCK && w_s.len() == b);
    #[cfg(target_arch = "x86_64")]
    {
        let x_q: [&[i8]; R] = std::array::from_fn(|r| {
            &acts.quants[(first + r) * b * BLOCK..(first + r + 1) * b * BLOCK]
        });
        let x_s: [&[f32]; R] =
            std::array::from_fn(|r| &acts.scales[(first + r) * b..(first + r + 1) * b]);
        // SAFETY: `Q8Matrix` exists only when `supported()` found AVX2 and FMA, and the slices'
        // lengths were checked above (the kernel reads `b` blocks of each).
        unsafe { avx2::dot(w_q, w_s, x_q, x_s, b) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w_q, w_s);
        unreachable!("Q8Matrix is only built on x86-64")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_castps256_ps128, _mm256_cvtepi32_ps, _mm256_extractf128_ps, _mm256_fmadd_ps,
        _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_set1_epi16,
        _mm256_set1_ps, _mm256_setzero_ps, _mm256_sign_epi8, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32,
        _mm_movehl_ps, _mm_shuffle_ps,
    };

    use super::BLOCK;

    /// `R` dot products against one weight column of `blocks` blocks.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA; `w_q` and every `x_q[r]` must hold `blocks * 32`
    /// values, `w_s` and every `x_s[r]` `blocks` scales. Quantised values must lie in
    /// `-127..=127` for the activations (ours do; the weights may hold -128).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot<const R: usize>(
        w_q: &[i8],
        w_s: &[f32],
        x_q: [&[i8]; R],
        x_s: [&[f32]; R],
        blocks: usize,
    ) -> [f32; R] {
        let ones = _mm256_set1_epi16(1);
        let mut acc: [__m256; R] = [_mm256_setzero_ps(); R];
        for i in 0..blocks {
            // SAFETY: block `i` of each slice is in bounds (the caller's lengths).
            let w = unsafe { _mm256_loadu_si256(w_q.as_ptr().add(i * BLOCK).cast()) };
            // |w| as unsigned bytes (-128 gives 128, which is right for unsigned).
            let w_abs = _mm256_sign_epi8(w, w);
            let ws = w_s[i];
            for r in 0..R {
                let x = unsafe { _mm256_loadu_si256(x_q[r].as_ptr().add(i * BLOCK).cast()) };
                // x with w's sign, so that |w| * (x * sign w) = w * x.
                let x_signed = _mm256_sign_epi8(x, w);
                // Pairs of products as i16 (at most 2 * 128 * 127, no saturation), then
                // quads as i32.
                let p16 = _mm256_maddubs_epi16(w_abs, x_signed);
                let p32 = _mm256_madd_epi16(p16, ones);
                let scale = _mm256_set1_ps(ws * x_s[r][i]);
                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p32), acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            // The 8 lanes summed in a fixed order.
            let hi = _mm256_extractf128_ps(acc[r], 1);
            let lo = _mm256_castps256_ps128(acc[r]);
            let s4 = _mm_add_ps(lo, hi);
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            out[r] = _mm_cvtss_f32(s1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    fn input(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..rows * cols)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn matrix(rows: usize, cols: usize) -> Option<(Q8Matrix, QTensor)> {
        let w = Tensor::from_vec(input(rows, cols, 7), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        Q8Matrix::from_qtensor(&q).unwrap().map(|m| (m, q))
    }

    #[test]
    fn agrees_with_candle_and_rows_do_not_depend_on_the_batch() {
        if !supported() {
            eprintln!("SKIPPED q8 kernel test: this CPU has no AVX2 and FMA (the kernel is off)");
            return;
        }
        let (rows, cols) = (67, 96);
        let (m, q) = matrix(rows, cols).expect("a Q8_0 matrix");
        let x = input(9, cols, 3);
        let batch = m.matmul(&x, 9);
        let reference = candle_core::quantized::QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&Tensor::from_vec(x.clone(), (9, cols), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Both quantise the activations to 8 bits (candle also rounds their scales to f16), so
        // they differ by quantisation noise: well under 0.05 for dot products of 96 values in
        // [-1, 1) (sums of up to ~3 in size), where a wrong block or sign is off by far more.
        let mut worst = 0f32;
        for (a, b) in batch.iter().zip(&reference) {
            worst = worst.max((a - b).abs());
        }
        assert!(
            worst < 0.05,
            "differs from candle's product by up to {worst}"
        );
        for r in 0..9 {
            let alone = m.matmul(&x[r * cols..(r + 1) * cols], 1);
            let in_batch = &batch[r * rows..(r + 1) * rows];
            assert!(
                alone
                    .iter()
                    .zip(in_batch)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {r} differs alone and in a batch of 9"
            );
        }
    }

    #[test]
    fn other_types_are_left_to_candle() {
        let w = Tensor::from_vec(input(8, 64, 1), (8, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
        assert!(Q8Matrix::from_qtensor(&q).unwrap().is_none());
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    #[ignore = "a timing probe, run by hand with --release"]
    fn kernel_speed() {
        for (rows, cols) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
                .collect();
            let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let m8 = Q8Matrix::from_qtensor(&q).unwrap().unwrap();
            for m in [1usize, 2, 4, 8, 16, 64, 256] {
                let x: Vec<f32> = (0..m * cols)
                    .map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0)
                    .collect();
                let reps = (2_000_000_000 / (rows * cols * m)).max(3);
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(m8.matmul(&x, m));
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                eprintln!(
                    "{rows}x{cols} m={m:>3}: {:8.1} us  {:6.1} GMAC/s  {:6.1} GB/s weights",
                    s * 1e6,
                    (rows * cols * m) as f64 / s / 1e9,
                    (rows * cols) as f64 * 1.125 / s / 1e9
                );
            }
        }
    }
}

//! The crate's own matrix product for Q8_0 weights, used on x86-64 CPUs with AVX2 and FMA (other
//! CPUs and other weight types keep candle's product).
//!
//! A [`Q8Matrix`] holds the weights with their scales converted to f32 once, at load.
//! Activations are quantised once per input and shared by every product that takes it (see
//! [`Activations`]): as ggml's `Q8_0` does (per block of 32: scale = max |x| / 127, values
//! rounded to the nearest integer, halves to even), except that the scale stays f32. Up to four
//! activation rows are computed against each weight column while that column's blocks are in
//! registers, so a batch of rows reads the weights once; the columns are split in ranges over
//! candle's own thread pool (no second pool competes with it for the cores).
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
//! Design notes and measurements: see ARCHITECTURE.md in the repository.

#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};

type Result<T> = candle_core::Result<T>;

/// Values per quantised block.
const BLOCK: usize = 32;
/// Bytes per `Q8_0` block in a GGUF tensor: an f16 scale, then 32 signed bytes.
const BLOCK_BYTES: usize = 2 + BLOCK;
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

    /// The matrices' rows stacked in order (their products are the parts' products side by
    /// side).
    pub(crate) fn stack(parts: Vec<Q8Matrix>) -> Result<Q8Matrix> {
        let cols = parts.first().map_or(0, |m| m.cols);
        if parts.iter().any(|m| m.cols != cols) {
            candle_core::bail!("stacked matrices must have the same number of columns");
        }
        let mut all = Q8Matrix {
            rows: 0,
            cols,
            blocks: cols / BLOCK,
            scales: Vec::new(),
            quants: Vec::new(),
        };
        for m in parts {
            all.rows += m.rows;
            all.scales.extend(m.scales);
            all.quants.extend(m.quants);
        }
        Ok(all)
    }

    /// `x` (`m × cols`, row-major) times this matrix transposed: `m × rows`, row-major.
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation length");
        self.matmul_quantized(&Activations::quantize(x, m, self.cols))
    }

    /// [`matmul`](Self::matmul) of activations already quantised (several matrices with the
    /// same input, such as the query, key and value projections, share one quantisation).
    pub(crate) fn matmul_quantized(&self, acts: &Activations) -> Vec<f32> {
        assert_eq!(acts.blocks, self.blocks, "activation width");
        let (m, n) = (acts.rows, self.rows);
        let mut out = vec![0f32; m * n];
        let chunks = n.div_ceil(COLUMN_CHUNK);
        let dst = SharedOut(out.as_mut_ptr());
        let work = |range: std::ops::Range<usize>| {
            for chunk in range {
                let c0 = chunk * COLUMN_CHUNK;
                let c1 = n.min(c0 + COLUMN_CHUNK);
                self.columns(acts, c0..c1, &dst, n);
            }
        };
        if m * n * self.blocks < 4096 {
            work(0..chunks);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(chunks, work);
        }
        out
    }

    /// Computes every row's outputs for the columns `cols`, writing them through `dst`: up to
    /// [`ROW_TILE`] rows against one column at a time, rows outside (the chunk's weights stay
    /// in the first-level cache while every row tile passes over them).
    fn columns(&self, acts: &Activations, cols: std::ops::Range<usize>, dst: &SharedOut, n: usize) {
        let mut row = 0;
        while row < acts.rows {
            let tile_rows = ROW_TILE.min(acts.rows - row);
            for col in cols.clone() {
                let mut sums = [0f32; ROW_TILE];
                match tile_rows {
                    4 => sums = tile::<4>(self, acts, row, col),
                    3 => sums[..3].copy_from_slice(&tile::<3>(self, acts, row, col)),
                    2 => sums[..2].copy_from_slice(&tile::<2>(self, acts, row, col)),
                    _ => sums[..1].copy_from_slice(&tile::<1>(self, acts, row, col)),
                }
                for (r, sum) in sums.iter().take(tile_rows).enumerate() {
                    // SAFETY: (row + r, col) is in bounds (row + r < m, col < n) and is written
                    // by this call only: each unit of work owns a distinct range of columns.
                    unsafe { dst.0.add((row + r) * n + col).write(*sum) };
                }
            }
            row += tile_rows;
        }
    }
}

/// The output buffer, written by several threads at disjoint (row, column) places.
struct SharedOut(*mut f32);
// SAFETY: the threads write disjoint elements (see `Q8Matrix::columns`) and the buffer
// outlives the pool's call, which returns only when every unit of work is done.
unsafe impl Sync for SharedOut {}

/// Activation rows quantised as `Q8_0` with f32 scales, for [`Q8Matrix::matmul_quantized`].
pub(crate) struct Activations {
    rows: usize,
    blocks: usize,
    /// Each block's scale repeated 8 times (the kernel reads it as a vector).
    scales8: Vec<f32>,
    quants: Vec<i8>,
}

impl Activations {
    /// Quantises `rows` rows of `cols` values (`x`, row-major; `cols` a multiple of 32).
    pub(crate) fn quantize(x: &[f32], rows: usize, cols: usize) -> Activations {
        assert!(
            cols.is_multiple_of(BLOCK) && x.len() == rows * cols,
            "activation shape"
        );
        let blocks = cols / BLOCK;
        let mut scales = vec![0f32; rows * blocks];
        let mut quants = vec![0i8; rows * cols];
        let blocks_of = x
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .zip(&mut scales);
        for ((block, q), d) in blocks_of {
            #[cfg(target_arch = "x86_64")]
            if supported() {
                // SAFETY: AVX2 is present (`supported`); both blocks hold 32 values.
                *d = unsafe { avx2::quantize_block(block, q) };
                continue;
            }
            *d = quantize_block(block, q);
        }
        let scales8 = scales.iter().flat_map(|&d| [d; 8]).collect();
        Activations {
            rows,
            blocks,
            scales8,
            quants,
        }
    }
}

/// One block of 32 values as 8-bit integers and a scale (ggml's `Q8_0` rule: scale =
/// max |x| / 127, values rounded to the nearest integer, halves to even).
fn quantize_block(block: &[f32], q: &mut [i8]) -> f32 {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    for (q, v) in q.iter_mut().zip(block) {
        *q = (v * inv).round_ties_even() as i8;
    }
    d
}

/// Rows per tile: each weight block loaded is used by this many rows.
const ROW_TILE: usize = 4;

/// The dot products of rows `row..row + R` of `acts` with column `col` of `w`.
fn tile<const R: usize>(w: &Q8Matrix, acts: &Activations, row: usize, col: usize) -> [f32; R] {
    let b = w.blocks;
    assert!(row + R <= acts.rows && col < w.rows && acts.blocks == b);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a `Q8Matrix` exists only when `supported()` found AVX2 and FMA; rows
        // `row..row + R` and column `col` are in bounds (checked above), and each holds `b`
        // blocks of 32 values and `b` scales.
        unsafe {
            avx2::tile::<R>(
                w.quants.as_ptr().add(col * b * BLOCK),
                w.scales.as_ptr().add(col * b),
                acts.quants.as_ptr().add(row * b * BLOCK),
                acts.scales8.as_ptr().add(row * b * 8),
                b,
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        unreachable!("Q8Matrix is only built on x86-64")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_and_ps, _mm256_broadcast_ss, _mm256_castps256_ps128, _mm256_castsi256_ps,
        _mm256_cvtepi32_ps, _mm256_cvtps_epi32, _mm256_extractf128_ps, _mm256_fmadd_ps,
        _mm256_hadd_ps, _mm256_loadu_ps, _mm256_loadu_si256, _mm256_madd_epi16,
        _mm256_maddubs_epi16, _mm256_max_ps, _mm256_mul_ps, _mm256_packs_epi16, _mm256_packs_epi32,
        _mm256_permutevar8x32_epi32, _mm256_set1_epi16, _mm256_set1_epi32, _mm256_set1_ps,
        _mm256_setr_epi32, _mm256_setzero_ps, _mm256_sign_epi8, _mm256_storeu_si256, _mm_add_ss,
        _mm_cvtss_f32, _mm_max_ps, _mm_max_ss, _mm_movehl_ps, _mm_prefetch, _mm_shuffle_ps,
        _MM_HINT_T0,
    };

    use super::BLOCK;

    /// How far ahead of the block being read the kernel prefetches weights, in bytes.
    const PREFETCH_AHEAD: usize = 2048;

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

    /// `R` dot products: rows `x_q`/`x_s` (row `r` at `x_q + r * blocks * 32`, its scales, each
    /// repeated 8 times, at `x_s + r * blocks * 8`) against one weight column `w_q`/`w_s`.
    ///
    /// Every (row, column) output gets the same instructions in the same order whatever `R`
    /// is: per block, the 32 byte products summed in pairs then quads as integers, converted
    /// to f32 and added with one FMA (scale = weight scale × row scale) to an 8-lane
    /// accumulator, whose lanes are summed by [`hsum`] at the end. (Plain loops rather than
    /// array closures: closures here would not be inlined into this AVX2 function.)
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA; the pointers must address `R` rows and one column of
    /// `blocks` blocks each (values and scales, 8 floats per block for the rows). Activation values must lie in `-127..=127`
    /// (ours do; the weights may hold -128).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize>(
        w_q: *const i8,
        w_s: *const f32,
        x_q: *const i8,
        x_s: *const f32,
        blocks: usize,
    ) -> [f32; R] {
        let ones = _mm256_set1_epi16(1);
        let mut acc: [__m256; R] = [_mm256_setzero_ps(); R];
        for i in 0..blocks {
            // SAFETY (all loads): block `i` of each row and of the column is in bounds (the
            // caller's promise).
            let w = unsafe { _mm256_loadu_si256(w_q.add(i * BLOCK).cast()) };
            // The weights are read once per product, from memory: ask for the ones a few
            // columns ahead now (a prefetch never faults, even past the end).
            _mm_prefetch::<_MM_HINT_T0>(w_q.wrapping_add(i * BLOCK + PREFETCH_AHEAD).cast());
            // |w| as unsigned bytes (-128 gives 128, which is right for unsigned).
            let w_abs = _mm256_sign_epi8(w, w);
            let ws = _mm256_broadcast_ss(unsafe { &*w_s.add(i) });
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = unsafe { _mm256_loadu_si256(x_q.add((r * blocks + i) * BLOCK).cast()) };
                // The row's scale as 8 lanes, read from memory (a splat made here would be
                // multiplied as a scalar and broadcast again: one more instruction).
                let xs = unsafe { _mm256_loadu_ps(x_s.add((r * blocks + i) * 8)) };
                // x with w's sign, so that |w| * (x * sign w) = w * x; pairs of products as
                // i16 (at most 2 * 128 * 127, no saturation), then quads as i32.
                let p16 = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(x, w));
                let p32 = _mm256_madd_epi16(p16, ones);
                *acc = _mm256_fmadd_ps(_mm256_mul_ps(ws, xs), _mm256_cvtepi32_ps(p32), *acc);
            }
        }
        let mut out = [0f32; R];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
        }
        out
    }

    /// Quantises one block of 32 values (see [`super::quantize_block`], which gives the same
    /// result) and returns its scale.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2; `block` and `q` must hold 32 values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_block(block: &[f32], q: &mut [i8]) -> f32 {
        debug_assert!(block.len() == BLOCK && q.len() == BLOCK);
        let p = block.as_ptr();
        // SAFETY: 32 floats from `p`.
        let v = unsafe {
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        };
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
        );
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
        // Round to nearest, halves to even (the default rounding mode), as i32, then packed
        // to bytes; the packs interleave 128-bit lanes, which the permutation undoes.
        let i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv));
        let i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
        let i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv));
        let i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        let ordered =
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 bytes to `q`.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), ordered) };
        d
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

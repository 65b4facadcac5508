//! The crate's own forward pass over llama-architecture GGUF weights, for several sequences per
//! step.
//!
//! One decode step takes the current token of every active sequence and runs the per-token
//! matrix products (Q, K and V projections, the output projection, the MLP, the final head) on a
//! `[B, hidden]` batch, so the weights are read once for all `B` rows. Attention is not shared:
//! each sequence has its own [`KvCache`] (per layer, its keys and values as flat
//! `len × kv_heads × head_dim` vectors of 16-bit floats that grow in place), attends only to its
//! own keys and values, and gets the rotary embedding at its own position. A sequence joins and
//! leaves without moving anyone else's state, and dropping it frees its memory at once.
//!
//! # Row independence
//!
//! A request's text must not depend on what else is in the batch, to the last bit. Every
//! operation here is row-wise (embedding lookup, RMS norm, SiLU, sums) or per sequence
//! (attention), except the quantised matrix products, whose kernel candle picks by block type,
//! CPU features and row count. [`Llama::load`] checks that they give each row the same bits
//! in a batch of any size up to the largest batch as alone, and falls back to one product per
//! row when they do not (see [`Llama::rows_independent`]). The operations are those of
//! candle-transformers' `quantized_llama` in the same order (with attention written out as
//! loops, see [`Llama::attend`]), so a sequence gets the same logits up to rounding.
//!
//! Design notes (why per-sequence caches rather than a paged or padded one): see
//! ARCHITECTURE.md in the repository.

use std::io::{Read, Seek};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::f16;

use super::q8::{Activations, Q8Matrix};
use super::{attention, vmath};

type Result<T> = candle_core::Result<T>;

/// The longest sequence (prompt and answer, in tokens) a model is run with: the length of the
/// rotary tables, and the cap on a model's trained context (as candle-transformers' llama has).
pub(super) const MAX_SEQ_LEN: usize = 4096;

/// A weight matrix: `Q8_0` weights on a CPU with AVX2 and FMA go through our own kernel
/// ([`Q8Matrix`], much faster on batches), everything else through candle's product.
enum Weight {
    Q8(Q8Matrix),
    Candle(QMatMul),
}

impl Weight {
    fn new(t: QTensor) -> Result<Weight> {
        Ok(match Q8Matrix::from_qtensor(&t)? {
            Some(m) => Weight::Q8(m),
            None => Weight::Candle(QMatMul::from_qtensor(t)?),
        })
    }

    /// Input features.
    fn cols(&self) -> Result<usize> {
        Ok(match self {
            Weight::Q8(m) => m.cols(),
            Weight::Candle(QMatMul::QTensor(t)) => t.shape().dims2()?.1,
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims2()?.1,
        })
    }

    /// The input (`m × cols`) times the matrix transposed: `m × rows`, row-major.
    fn forward(&self, x: &Input<'_>) -> Result<Vec<f32>> {
        match self {
            Weight::Q8(w) => Ok(w.matmul_quantized(x.q8())),
            Weight::Candle(w) => {
                let t = Tensor::from_slice(x.values, (x.rows, x.cols), &Device::Cpu)?;
                w.forward(&t)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()
            }
        }
    }
}

/// The input of one or more matrix products: `rows × cols` values, row-major, and their `Q8_0`
/// quantisation, made once on first use and shared by the products that take this input (the
/// query, key and value projections; the MLP's gate and up projections).
struct Input<'a> {
    values: &'a [f32],
    rows: usize,
    cols: usize,
    q8: std::cell::OnceCell<Activations>,
}

impl<'a> Input<'a> {
    fn new(values: &'a [f32], rows: usize) -> Input<'a> {
        Input {
            values,
            rows,
            cols: values.len() / rows.max(1),
            q8: std::cell::OnceCell::new(),
        }
    }

    fn q8(&self) -> &Activations {
        self.q8
            .get_or_init(|| Activations::quantize(self.values, self.rows, self.cols))
    }

    /// Row `r` alone.
    fn row(&self, r: usize) -> Input<'a> {
        Input::new(&self.values[r * self.cols..(r + 1) * self.cols], 1)
    }
}

/// Matrices that take the same input (the query, key and value projections; the MLP's gate
/// and up projections): one product over their rows stacked when all are [`Q8Matrix`]es (one
/// pass of the thread pool instead of several; each output is computed by the same
/// instructions either way), else one product each.
enum Stack {
    Fused(Q8Matrix, Vec<usize>),
    Each(Vec<Weight>),
}

impl Stack {
    fn new(weights: Vec<Weight>) -> Result<Stack> {
        if !weights.iter().all(|w| matches!(w, Weight::Q8(_))) {
            return Ok(Stack::Each(weights));
        }
        let parts: Vec<Q8Matrix> = weights
            .into_iter()
            .map(|w| match w {
                Weight::Q8(m) => m,
                Weight::Candle(_) => unreachable!("checked above"),
            })
            .collect();
        let widths = parts.iter().map(Q8Matrix::rows).collect();
        Ok(Stack::Fused(Q8Matrix::stack(parts)?, widths))
    }

    /// Each matrix's product with `x` (`x.rows × its rows`, row-major), in order.
    fn forward(&self, x: &Input<'_>, per_row: bool) -> Result<Vec<Vec<f32>>> {
        match self {
            Stack::Each(ws) => ws.iter().map(|w| Llama::mm(w, x, per_row)).collect(),
            Stack::Fused(m, widths) => {
                let all = m.matmul_quantized(x.q8());
                let mut outs: Vec<Vec<f32>> = widths
                    .iter()
                    .map(|w| Vec::with_capacity(w * x.rows))
                    .collect();
                for row in all.chunks_exact(m.rows()) {
                    let mut at = 0;
                    for (out, w) in outs.iter_mut().zip(widths) {
                        out.extend_from_slice(&row[at..at + w]);
                        at += w;
                    }
                }
                Ok(outs)
            }
        }
    }

    /// Input features.
    fn cols(&self) -> Result<usize> {
        match self {
            Stack::Fused(m, _) => Ok(m.cols()),
            Stack::Each(ws) => ws.first().map_or(Ok(0), Weight::cols),
        }
    }
}

/// One transformer block's weights.
struct Layer {
    attn_norm: Vec<f32>,
    /// Query, key and value projections.
    qkv: Stack,
    wo: Weight,
    ffn_norm: Vec<f32>,
    /// The MLP's gate and up projections.
    gate_up: Stack,
    down: Weight,
}

/// The weights of a llama-architecture model, shared by all sequences.
pub(crate) struct Llama {
    /// `vocab × hidden`, row-major.
    embeddings: Vec<f32>,
    hidden: usize,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    head: Weight,
    eps: f32,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Rotary tables, `MAX_SEQ_LEN × head_dim / 2` each, position-major.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Whether a batched matrix product may be used (see [`Llama::rows_independent`]).
    batched_matmul: bool,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("layers", &self.layers.len())
            .field("n_head", &self.n_head)
            .field("n_kv_head", &self.n_kv_head)
            .field("head_dim", &self.head_dim)
            .field("batched_matmul", &self.batched_matmul)
            .finish_non_exhaustive()
    }
}

/// One sequence's keys and values, per layer: `len × kv_heads × head_dim` floats each,
/// token-major, grown in place (amortised O(1) per token, where a tensor concatenation copied
/// the whole cache at every token).
#[derive(Debug, Default)]
pub(crate) struct KvCache {
    /// Keys and values as 16-bit floats (see [`attention`]).
    layers: Vec<(Vec<f16>, Vec<f16>)>,
    /// Floats per token in one layer (`kv_heads × head_dim`), set by the first write.
    width: usize,
    len: usize,
}

impl KvCache {
    /// Tokens held (the position the next token is fed at).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Drops everything after the first `len` tokens in every layer (used to undo a step that
    /// failed half-way, when some layers already hold the step's tokens).
    pub(crate) fn truncate(&mut self, len: usize) -> Result<()> {
        for (k, v) in &mut self.layers {
            k.truncate(len * self.width);
            v.truncate(len * self.width);
        }
        self.len = self.len.min(len);
        Ok(())
    }
}

/// Tokens to feed to one sequence in a forward pass, at the end of its cache.
pub(crate) struct Feed<'a> {
    pub(crate) cache: &'a mut KvCache,
    pub(crate) tokens: &'a [u32],
}

fn md_u32(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v.to_u32()? as usize),
        None => candle_core::bail!("cannot find {key} in the GGUF metadata"),
    }
}

/// Whether `product` (of inputs `k` wide, giving one output per matrix) gives each row of
/// batches of 2..=`max_batch` rows the same bits as that row alone.
fn same_alone_and_together(
    k: usize,
    max_batch: usize,
    product: &dyn Fn(&Input<'_>) -> Result<Vec<Vec<f32>>>,
) -> Result<bool> {
    let rows = max_batch.max(1);
    let x = probe_input(rows, k);
    let all = Input::new(&x, rows);
    let alone: Vec<Vec<Vec<f32>>> = (0..rows)
        .map(|r| product(&all.row(r)))
        .collect::<Result<_>>()?;
    for n in 2..=rows {
        let together = product(&Input::new(&x[..n * k], n))?;
        for (part, out) in together.iter().enumerate() {
            let width = out.len() / n;
            let same = out.chunks_exact(width).zip(&alone).all(|(a, b)| {
                let b = &b[part];
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            });
            if !same {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Deterministic inputs in [-1, 1) for the row-independence check.
fn probe_input(rows: usize, cols: usize) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    data
}

impl Llama {
    /// Reads the weights of a llama-architecture GGUF (`general.architecture` checked by the
    /// caller) and checks that batched matrix products are row-independent for batches of up
    /// to `max_batch` rows.
    pub(crate) fn load<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        max_batch: usize,
    ) -> Result<Llama> {
        let n_head = md_u32(ct, "llama.attention.head_count")?;
        let n_kv_head = md_u32(ct, "llama.attention.head_count_kv")?;
        let n_layer = md_u32(ct, "llama.block_count")?;
        let hidden = md_u32(ct, "llama.embedding_length")?;
        let rope_dim = md_u32(ct, "llama.rope.dimension_count")?;
        let eps = match ct.metadata.get("llama.attention.layer_norm_rms_epsilon") {
            Some(v) => v.to_f32()?,
            None => candle_core::bail!("cannot find the RMS norm epsilon in the GGUF metadata"),
        };
        let freq_base = ct
            .metadata
            .get("llama.rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        if n_head == 0 || n_kv_head == 0 || hidden % n_head != 0 || n_head % n_kv_head != 0 {
            candle_core::bail!("inconsistent head counts: {n_head} heads, {n_kv_head} kv heads");
        }
        let head_dim = hidden / n_head;
        if rope_dim != head_dim {
            candle_core::bail!("partial rotary embeddings ({rope_dim} of {head_dim}) unsupported");
        }

        // Rotary tables: angle = position * base^(-i/d), as [MAX_SEQ_LEN, d/2] cos and sin.
        let inv_freq: Vec<f32> = (0..rope_dim)
            .step_by(2)
            .map(|i| 1f32 / freq_base.powf(i as f32 / rope_dim as f32))
            .collect();
        let inv_freq = Tensor::new(inv_freq.as_slice(), device)?;
        let angles = Tensor::arange(0, MAX_SEQ_LEN as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((MAX_SEQ_LEN, 1))?
            .matmul(&inv_freq.reshape((1, inv_freq.elem_count()))?)?;
        let cos = angles.cos()?.flatten_all()?.to_vec1::<f32>()?;
        let sin = angles.sin()?.flatten_all()?.to_vec1::<f32>()?;

        let mut get = |name: &str| ct.tensor(reader, name, device);
        let qmm = Weight::new;
        let embeddings_q = get("token_embd.weight")?;
        let embeddings = f32s(&embeddings_q.dequantize(device)?)?;
        if embeddings.len() % hidden != 0 {
            candle_core::bail!("token embeddings are not rows of {hidden} values");
        }
        let norm = f32s(&get("output_norm.weight")?.dequantize(device)?)?;
        // Models with tied embeddings have no separate output matrix.
        let head = match get("output.weight") {
            Ok(t) => qmm(t)?,
            Err(_) => qmm(embeddings_q)?,
        };
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let mut w = |what: &str| get(&format!("blk.{i}.{what}.weight"));
            layers.push(Layer {
                attn_norm: f32s(&w("attn_norm")?.dequantize(device)?)?,
                qkv: Stack::new(vec![
                    qmm(w("attn_q")?)?,
                    qmm(w("attn_k")?)?,
                    qmm(w("attn_v")?)?,
                ])?,
                wo: qmm(w("attn_output")?)?,
                ffn_norm: f32s(&w("ffn_norm")?.dequantize(device)?)?,
                gate_up: Stack::new(vec![qmm(w("ffn_gate")?)?, qmm(w("ffn_up")?)?])?,
                down: qmm(w("ffn_down")?)?,
            });
        }
        let mut model = Llama {
            embeddings,
            hidden,
            layers,
            norm,
            head,
            eps,
            n_head,
            n_kv_head,
            head_dim,
            cos,
            sin,
            batched_matmul: false,
        };
        model.batched_matmul = model.rows_independent(max_batch)?;
        if !model.batched_matmul {
            tracing::warn!(
                "this CPU's quantised matmul kernel rounds rows differently in batches; the \
                 local model runs its matrix products row by row (exact, slower)"
            );
        }
        Ok(model)
    }

    /// Whether every matrix product gives each row of a batch of 2..=`max_batch` rows the same
    /// bits as that row alone. candle chooses among several kernels (SIMD dot products,
    /// repacked tiles) by block type, CPU and row count, and a tiled kernel may sum in another
    /// order than a single-row one; where that happens, batching would make a request's text
    /// depend on its neighbours, so the products run row by row instead.
    pub(crate) fn rows_independent(&self, max_batch: usize) -> Result<bool> {
        let Some(first) = self.layers.first() else {
            return Ok(true);
        };
        let single = |w: &Weight| -> Result<bool> {
            same_alone_and_together(w.cols()?, max_batch, &|x| Ok(vec![w.forward(x)?]))
        };
        let stack = |st: &Stack| -> Result<bool> {
            same_alone_and_together(st.cols()?, max_batch, &|x| st.forward(x, false))
        };
        Ok(stack(&first.qkv)?
            && single(&first.wo)?
            && stack(&first.gate_up)?
            && single(&first.down)?
            && single(&self.head)?)
    }

    /// Whether batched matrix products are in use (see [`rows_independent`](Self::rows_independent)).
    pub(crate) fn batched_matmul(&self) -> bool {
        self.batched_matmul
    }

    /// A matrix product, in one go or row by row (see
    /// [`rows_independent`](Self::rows_independent)).
    fn mm(w: &Weight, x: &Input<'_>, per_row: bool) -> Result<Vec<f32>> {
        if !per_row || x.rows == 1 {
            return w.forward(x);
        }
        let mut out = Vec::new();
        for r in 0..x.rows {
            out.extend(w.forward(&x.row(r))?);
        }
        Ok(out)
    }

    /// Feeds each sequence its tokens (at the end of its own cache, which grows by that many)
    /// and returns the logits after each sequence's last token, one row per feed, in order.
    ///
    /// Every feed must hold at least one token, and each sequence must stay within
    /// [`MAX_SEQ_LEN`] tokens.
    pub(crate) fn forward(&self, feeds: &mut [Feed<'_>]) -> Result<Vec<Vec<f32>>> {
        if feeds.is_empty() {
            return Ok(Vec::new());
        }
        let hidden = self.hidden;
        let vocab = self.embeddings.len() / hidden;
        let mut x = Vec::new();
        for f in feeds.iter() {
            if f.tokens.is_empty() {
                candle_core::bail!("a feed without tokens");
            }
            if f.cache.len + f.tokens.len() > MAX_SEQ_LEN {
                candle_core::bail!("a sequence longer than {MAX_SEQ_LEN} tokens");
            }
            for &id in f.tokens {
                let id = id as usize;
                if id >= vocab {
                    candle_core::bail!("token {id} is outside the vocabulary of {vocab}");
                }
                x.extend_from_slice(&self.embeddings[id * hidden..][..hidden]);
            }
        }
        let n = x.len() / hidden;
        // A prompt's chunk (one feed) is a product over its rows either way; only rows of
        // different sequences must not share a product if the kernel is not row-independent.
        let per_row = !self.batched_matmul && feeds.len() > 1;
        let (hd, kvd) = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim);
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, self.eps);
            let input = Input::new(&h, n);
            let Ok([mut q, k, v]) = <[Vec<f32>; 3]>::try_from(layer.qkv.forward(&input, per_row)?)
            else {
                candle_core::bail!("three attention projections expected");
            };
            if q.len() != n * hd || k.len() != n * kvd || v.len() != n * kvd {
                candle_core::bail!("attention projections of unexpected widths");
            }
            // Each new row: its position in its sequence, and that sequence's cache.
            let mut rows = Vec::with_capacity(n);
            let mut row = 0;
            for (s, f) in feeds.iter_mut().enumerate() {
                let len = f.tokens.len();
                let pos = f.cache.len;
                self.append(
                    l,
                    f.cache,
                    &mut q[row * hd..(row + len) * hd],
                    &k[row * kvd..(row + len) * kvd],
                    &v[row * kvd..(row + len) * kvd],
                );
                rows.extend((0..len).map(|i| (s, pos + i)));
                row += len;
            }
            let caches: Vec<&KvCache> = feeds.iter().map(|f| &*f.cache).collect();
            let attn = self.attend(l, &caches, &q, &rows);
            add_to(
                &mut x,
                &Self::mm(&layer.wo, &Input::new(&attn, n), per_row)?,
            );
            let h = rms_norm(&x, &layer.ffn_norm, self.eps);
            let input = Input::new(&h, n);
            let Ok([mut gate, up]) =
                <[Vec<f32>; 2]>::try_from(layer.gate_up.forward(&input, per_row)?)
            else {
                candle_core::bail!("two MLP projections expected");
            };
            vmath::silu_times(&mut gate, &up);
            add_to(
                &mut x,
                &Self::mm(&layer.down, &Input::new(&gate, n), per_row)?,
            );
        }
        let mut last = Vec::with_capacity(feeds.len() * hidden);
        let mut end = 0;
        for f in feeds.iter_mut() {
            end += f.tokens.len();
            last.extend_from_slice(&x[(end - 1) * hidden..end * hidden]);
            f.cache.len += f.tokens.len();
        }
        let h = rms_norm(&last, &self.norm, self.eps);
        let logits = Self::mm(&self.head, &Input::new(&h, feeds.len()), per_row)?;
        let width = logits.len() / feeds.len();
        Ok(logits.chunks_exact(width).map(<[f32]>::to_vec).collect())
    }

    /// Turns one sequence's `n` new query rows (`q`: `n × heads × d`) and keys (`k`:
    /// `n × kv_heads × d`) by the rotary embedding at their positions, and appends the keys and
    /// values (`v`) to the sequence's cache for `layer`.
    fn append(&self, layer: usize, cache: &mut KvCache, q: &mut [f32], k: &[f32], v: &[f32]) {
        let (hd, kvd, d) = (
            self.n_head * self.head_dim,
            self.n_kv_head * self.head_dim,
            self.head_dim,
        );
        let pos = cache.len;
        if cache.layers.len() <= layer {
            cache.layers.resize_with(layer + 1, Default::default);
        }
        cache.width = kvd;
        let (keys, values) = &mut cache.layers[layer];
        // A step undone half-way was truncated back to `pos` tokens.
        debug_assert_eq!(keys.len(), pos * kvd);
        for i in 0..q.len() / hd {
            for head in q[i * hd..(i + 1) * hd].chunks_exact_mut(d) {
                self.rope(head, pos + i);
            }
            let mut turned = k[i * kvd..(i + 1) * kvd].to_vec();
            for head in turned.chunks_exact_mut(d) {
                self.rope(head, pos + i);
            }
            keys.extend(turned.iter().map(|&x| f16::from_f32(x)));
            values.extend(v[i * kvd..(i + 1) * kvd].iter().map(|&x| f16::from_f32(x)));
        }
    }

    /// Attention for `layer` of every new row: `rows[r] = (s, p)` says row `r` of `q`
    /// (`heads × d` values, already turned) is at position `p` of sequence `s`, whose cache
    /// (`caches[s]`, already holding the row's own key and value) it attends to up to and
    /// including `p` (causal). Returns `rows × heads × d` values.
    ///
    /// Loops over each sequence's own cache ([`attention::group`]) rather than tensor
    /// operations: per decode step that is a few dozen small products per layer and sequence,
    /// where candle's operations (with a rotary kernel, a key/value repeat per head group and a
    /// cache concatenation each) cost more in dispatch and copies than in arithmetic. The query
    /// heads that share a key/value head are computed together, reading its keys and values in
    /// place, once (grouped-query attention without copies). The (row, key/value head) pairs
    /// are shared out over candle's thread pool; each is computed by the same code wherever it
    /// runs and whatever else is in the batch.
    fn attend(
        &self,
        layer: usize,
        caches: &[&KvCache],
        q: &[f32],
        rows: &[(usize, usize)],
    ) -> Vec<f32> {
        let (h, kvh, d) = (self.n_head, self.n_kv_head, self.head_dim);
        let (hd, kvd) = (h * d, kvh * d);
        // Query heads per key/value head, and the values one item computes.
        let group = h / kvh;
        let width = group * d;
        let one = |item: usize, scores: &mut Vec<f32>, o: &mut [f32]| {
            let (r, g) = (item / kvh, item % kvh);
            let (s, p) = rows[r];
            let (keys, values) = &caches[s].layers[layer];
            let cache = attention::Cache {
                keys,
                values,
                stride: kvd,
                offset: g * d,
                n: p + 1,
            };
            attention::group(&q[r * hd + g * width..][..width], d, cache, scores, o);
        };
        let items = rows.len() * kvh;
        let out = std::sync::Mutex::new(vec![0f32; items * width]);
        let work = |range: std::ops::Range<usize>| {
            let mut scores = Vec::new();
            let mut local = vec![0f32; range.len() * width];
            for (item, o) in range.clone().zip(local.chunks_exact_mut(width)) {
                one(item, &mut scores, o);
            }
            let mut out = out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            out[range.start * width..range.end * width].copy_from_slice(&local);
        };
        if items < 2 {
            work(0..items);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(items, work);
        }
        out.into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The rotary embedding at `pos`, on one head's `d` values taken as interleaved pairs
    /// (`(x[2i], x[2i + 1])` turned by angle `pos × base^(-2i/d)`), as candle's `rope_i`.
    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = x.len() / 2;
        let (cos, sin) = (
            &self.cos[pos * half..][..half],
            &self.sin[pos * half..][..half],
        );
        for ((pair, c), s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * c - x1 * s;
            pair[1] = x0 * s + x1 * c;
        }
    }

    /// The quantised block type of the first layer's query projection, for logs.
    pub(crate) fn weight_dtype(&self) -> Option<GgmlDType> {
        match self.layers.first().map(|l| &l.qkv) {
            Some(Stack::Fused(..)) => Some(GgmlDType::Q8_0),
            Some(Stack::Each(ws)) => match ws.first() {
                Some(Weight::Q8(_)) => Some(GgmlDType::Q8_0),
                Some(Weight::Candle(QMatMul::QTensor(t))) => Some(t.dtype()),
                _ => None,
            },
            None => None,
        }
    }
}

/// A tensor's values, flattened, as f32.
fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// RMS norm of each row of `x` (rows as long as `weight`): `x / sqrt(mean(x²) + eps) * weight`,
/// as candle's `rms_norm`.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let mut acc = [0f32; 8];
        for c in row.chunks_exact(8) {
            for j in 0..8 {
                acc[j] += c[j] * c[j];
            }
        }
        let mut sum =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for v in row.chunks_exact(8).remainder() {
            sum += v * v;
        }
        let scale = 1.0 / (sum / d as f32 + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v * scale * w));
    }
    out
}

/// `x += y`, element by element.
fn add_to(x: &mut [f32], y: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

//! Our own forward pass over llama-architecture GGUF weights, for several sequences per step.
//!
//! Decoding one sequence reads every weight once per token, and on a CPU that read (not the
//! arithmetic) is what limits the speed. So one decode step takes the current token of every
//! active sequence and runs the per-token matrix products (Q, K and V projections, the output
//! projection, the MLP, the final head) on a `[B, hidden]` batch: the weights are read once
//! for all `B` rows. Attention is the one part that is not shared: each sequence has its own
//! [`KvCache`], attends only to its own keys and values, and gets the rotary embedding at its
//! own position.
//!
//! # Why per-sequence caches
//!
//! A cache per sequence (per layer, its keys and values as flat `len × kv_heads × head_dim`
//! vectors that grow in place) rather than a paged or padded shared cache: a sequence joins
//! and leaves without moving anyone else's state, dropping it frees its memory at once, and
//! its attention is computed by exactly the code a lone sequence would run. Padding sequences
//! to a common length would change what the attention sums over and with it, possibly, its
//! rounding.
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

use std::io::{Read, Seek};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::quantized_llama::MAX_SEQ_LEN;

use super::attention;
use super::q8::Q8Matrix;

type Result<T> = candle_core::Result<T>;

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

    /// `x` (`[m, cols]`) times the matrix transposed: `[m, rows]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Candle(w) => w.forward(x),
            Weight::Q8(w) => {
                let m = x.dim(0)?;
                let data = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                Tensor::from_vec(w.matmul(&data, m), (m, w.rows()), x.device())
            }
        }
    }
}

/// One transformer block's weights.
struct Layer {
    attn_norm: Tensor,
    wq: Weight,
    wk: Weight,
    wv: Weight,
    wo: Weight,
    ffn_norm: Tensor,
    gate: Weight,
    up: Weight,
    down: Weight,
}

/// The weights of a llama-architecture model, shared by all sequences.
pub(crate) struct Llama {
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Weight,
    eps: f32,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Rotary tables, `MAX_SEQ_LEN × head_dim / 2` each, position-major.
    cos: Vec<f32>,
    sin: Vec<f32>,
    device: Device,
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
    layers: Vec<(Vec<f32>, Vec<f32>)>,
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

/// Deterministic inputs in [-1, 1) for the row-independence check.
fn probe_input(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, (rows, cols), device)
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
        let embeddings = embeddings_q.dequantize(device)?;
        let norm = get("output_norm.weight")?.dequantize(device)?;
        // Models with tied embeddings have no separate output matrix.
        let head = match get("output.weight") {
            Ok(t) => qmm(t)?,
            Err(_) => qmm(embeddings_q)?,
        };
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let mut w = |what: &str| get(&format!("blk.{i}.{what}.weight"));
            layers.push(Layer {
                attn_norm: w("attn_norm")?.dequantize(device)?,
                wq: qmm(w("attn_q")?)?,
                wk: qmm(w("attn_k")?)?,
                wv: qmm(w("attn_v")?)?,
                wo: qmm(w("attn_output")?)?,
                ffn_norm: w("ffn_norm")?.dequantize(device)?,
                gate: qmm(w("ffn_gate")?)?,
                up: qmm(w("ffn_up")?)?,
                down: qmm(w("ffn_down")?)?,
            });
        }
        let mut model = Llama {
            embeddings,
            layers,
            norm,
            head,
            eps,
            n_head,
            n_kv_head,
            head_dim,
            cos,
            sin,
            device: device.clone(),
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
        let mats = [
            &first.wq,
            &first.wk,
            &first.wv,
            &first.wo,
            &first.gate,
            &first.up,
            &first.down,
            &self.head,
        ];
        for m in mats {
            let k = m.cols()?;
            let x = probe_input(max_batch.max(1), k, &self.device)?;
            let alone: Vec<Vec<f32>> = (0..max_batch)
                .map(|r| m.forward(&x.narrow(0, r, 1)?)?.squeeze(0)?.to_vec1::<f32>())
                .collect::<Result<_>>()?;
            for rows in 2..=max_batch {
                let together = m.forward(&x.narrow(0, 0, rows)?)?.to_vec2::<f32>()?;
                let same = together.iter().zip(&alone).all(|(a, b)| {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                });
                if !same {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Whether batched matrix products are in use (see [`rows_independent`](Self::rows_independent)).
    pub(crate) fn batched_matmul(&self) -> bool {
        self.batched_matmul
    }

    /// A matrix product, in one go or row by row (see
    /// [`rows_independent`](Self::rows_independent)).
    fn mm(w: &Weight, x: &Tensor, per_row: bool) -> Result<Tensor> {
        let rows = x.dim(0)?;
        if !per_row || rows == 1 {
            return w.forward(x);
        }
        let each: Vec<Tensor> = (0..rows)
            .map(|r| w.forward(&x.narrow(0, r, 1)?))
            .collect::<Result<_>>()?;
        Tensor::cat(&each, 0)
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
        let mut ids = Vec::new();
        for f in feeds.iter() {
            if f.tokens.is_empty() {
                candle_core::bail!("a feed without tokens");
            }
            if f.cache.len + f.tokens.len() > MAX_SEQ_LEN {
                candle_core::bail!("a sequence longer than {MAX_SEQ_LEN} tokens");
            }
            ids.extend_from_slice(f.tokens);
        }
        // A prompt's chunk (one feed) is a product over its rows either way; only rows of
        // different sequences must not share a product if the kernel is not row-independent.
        let per_row = !self.batched_matmul && feeds.len() > 1;
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self.embeddings.index_select(&ids, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.eps)?;
            let q = Self::mm(&layer.wq, &h, per_row)?;
            let k = Self::mm(&layer.wk, &h, per_row)?;
            let v = Self::mm(&layer.wv, &h, per_row)?;
            let (mut q, k, v) = (rows_of(&q)?, rows_of(&k)?, rows_of(&v)?);
            let (hd, kvd) = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim);
            // Each new row: its position in its sequence, and that sequence's cache.
            let mut rows = Vec::with_capacity(q.len() / hd);
            let mut row = 0;
            for (s, f) in feeds.iter_mut().enumerate() {
                let n = f.tokens.len();
                let pos = f.cache.len;
                self.append(
                    l,
                    f.cache,
                    &mut q[row * hd..(row + n) * hd],
                    &k[row * kvd..(row + n) * kvd],
                    &v[row * kvd..(row + n) * kvd],
                );
                rows.extend((0..n).map(|i| (s, pos + i)));
                row += n;
            }
            let caches: Vec<&KvCache> = feeds.iter().map(|f| &*f.cache).collect();
            let attn = self.attend(l, &caches, &q, &rows);
            let attn = Tensor::from_vec(attn, (row, hd), &self.device)?;
            let x1 = (Self::mm(&layer.wo, &attn, per_row)? + residual)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, self.eps)?;
            let gate = candle_nn::ops::silu(&Self::mm(&layer.gate, &h, per_row)?)?;
            let up = Self::mm(&layer.up, &h, per_row)?;
            x = (Self::mm(&layer.down, &(gate * up)?, per_row)? + &x1)?;
        }
        let mut last = Vec::with_capacity(feeds.len());
        let mut end = 0u32;
        for f in feeds.iter_mut() {
            end += f.tokens.len() as u32;
            last.push(end - 1);
            f.cache.len += f.tokens.len();
        }
        let x = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.eps)?;
        Self::mm(&self.head, &x, per_row)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()
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
            let start = keys.len();
            keys.extend_from_slice(&k[i * kvd..(i + 1) * kvd]);
            for head in keys[start..].chunks_exact_mut(d) {
                self.rope(head, pos + i);
            }
            values.extend_from_slice(&v[i * kvd..(i + 1) * kvd]);
        }
    }

    /// Attention for `layer` of every new row: `rows[r] = (s, p)` says row `r` of `q`
    /// (`heads × d` values, already turned) is at position `p` of sequence `s`, whose cache
    /// (`caches[s]`, already holding the row's own key and value) it attends to up to and
    /// including `p` (causal). Returns `rows × heads × d` values.
    ///
    /// Loops over each sequence's own cache ([`attention::head`]) rather than tensor operations: per decode
    /// step that is a few dozen small products per layer and sequence, where candle's
    /// operations (with a rotary kernel, a key/value repeat per head group and a cache
    /// concatenation each) cost more in dispatch and copies than in arithmetic. Each query
    /// head reads its group's keys and values in place (grouped-query attention without
    /// copies). The (row, head) pairs are shared out over candle's thread pool; each is
    /// computed by the same code wherever it runs and whatever else is in the batch.
    fn attend(
        &self,
        layer: usize,
        caches: &[&KvCache],
        q: &[f32],
        rows: &[(usize, usize)],
    ) -> Vec<f32> {
        let (h, kvh, d) = (self.n_head, self.n_kv_head, self.head_dim);
        let (hd, kvd) = (h * d, kvh * d);
        let group = h / kvh;
        let one = |item: usize, scores: &mut Vec<f32>, o: &mut [f32]| {
            let (r, head) = (item / h, item % h);
            let (s, p) = rows[r];
            let (keys, values) = &caches[s].layers[layer];
            let cache = attention::Cache {
                keys,
                values,
                stride: kvd,
                offset: (head / group) * d,
                n: p + 1,
            };
            attention::head(&q[r * hd + head * d..][..d], cache, scores, o);
        };
        let items = rows.len() * h;
        let out = std::sync::Mutex::new(vec![0f32; items * d]);
        let work = |range: std::ops::Range<usize>| {
            let mut scores = Vec::new();
            let mut local = vec![0f32; range.len() * d];
            for (item, o) in range.clone().zip(local.chunks_exact_mut(d)) {
                one(item, &mut scores, o);
            }
            let mut out = out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            out[range.start * d..range.end * d].copy_from_slice(&local);
        };
        if items < 2 * h {
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
        match self.layers.first().map(|l| &l.wq) {
            Some(Weight::Q8(_)) => Some(GgmlDType::Q8_0),
            Some(Weight::Candle(QMatMul::QTensor(t))) => Some(t.dtype()),
            _ => None,
        }
    }
}

/// A `[rows, cols]` tensor's values, row-major.
fn rows_of(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

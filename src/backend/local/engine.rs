//! The model itself: loading the GGUF, one generation from prompt to finish reason, sampling.
//!
//! Runs synchronously on the worker thread; nothing here is async.

use std::fs::File;
use std::io::{BufReader, Cursor};
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::chat::ChatTemplate;
use super::tokenizer::GgufTokenizer;
use crate::backend::{Completion, CompletionRequest, FinishReason, Message, Usage};
use crate::error::{BackendError, BackendErrorKind, BoxError};

/// The prompt is fed to the model in chunks of at most this many tokens, which bounds the size
/// of the attention scores during prefill.
const PREFILL_CHUNK: usize = 512;

/// Settings fixed at load time.
#[derive(Debug, Clone)]
pub(crate) struct EngineOptions {
    pub(crate) temperature: f32,
    pub(crate) top_p: f32,
    pub(crate) max_tokens: u32,
    pub(crate) context_length: Option<usize>,
    pub(crate) requantize: bool,
    pub(crate) repeat_penalty: f32,
    pub(crate) repeat_last_n: usize,
}

/// What the worker and the handles share: everything but the weights.
#[derive(Debug)]
pub(crate) struct Vocab {
    pub(crate) tokenizer: GgufTokenizer,
    pub(crate) template: ChatTemplate,
    pub(crate) context_length: usize,
}

impl Vocab {
    pub(crate) fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>, BackendError> {
        let prompt = self.template.render(messages).map_err(|e| {
            BackendError::new(
                BackendErrorKind::InvalidRequest,
                "the chat template cannot render these messages",
            )
            .with_source(e)
        })?;
        self.tokenizer.encode_prompt(&prompt).map_err(|e| {
            BackendError::new(BackendErrorKind::Backend, "tokenizing the prompt failed")
                .with_source(e)
        })
    }
}

/// The loaded weights plus the generation loop. Owned by the worker thread.
pub(crate) struct Engine {
    weights: ModelWeights,
    device: Device,
    options: EngineOptions,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// GGUF block types for which candle has no SIMD dot product on x86 and ARM: their matmuls run
/// a scalar loop and are several times slower than Q8_0's, which candle picks at run time for
/// the CPU it finds (AVX2/AVX-512/NEON). Re-encoding such weights as Q8_0 at load costs about a
/// second and loses almost nothing (8-bit steps are 16 times finer than the 4-bit ones).
fn slow_on_cpu(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    )
}

fn candle_err(what: &str, e: candle_core::Error) -> BackendError {
    BackendError::new(BackendErrorKind::Backend, what).with_source(e)
}

impl Engine {
    /// Reads the GGUF at `path`: tokenizer, chat template and weights.
    pub(crate) fn load(path: &Path, options: EngineOptions) -> Result<(Engine, Vocab), BoxError> {
        let device = Device::Cpu;
        let mut reader = BufReader::new(File::open(path)?);
        let content = gguf_file::Content::read(&mut reader)?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(format!(
                "unsupported model architecture {arch:?} (the local backend runs llama-architecture \
                 GGUF models such as SmolLM2, Llama and Mistral)"
            )
            .into());
        }
        let tokenizer = GgufTokenizer::from_gguf(&content)?;
        let template_src = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let template = ChatTemplate::new(
            template_src.as_deref(),
            tokenizer.bos_token.clone(),
            tokenizer.eos_token.clone(),
        )?;
        let trained = content
            .metadata
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .map_or(MAX_SEQ_LEN, |n| n as usize);
        let mut context_length = trained.min(MAX_SEQ_LEN);
        if let Some(n) = options.context_length {
            context_length = context_length.min(n);
        }

        let needs_requant = options.requantize
            && content
                .tensor_infos
                .values()
                .any(|t| slow_on_cpu(t.ggml_dtype));
        let weights = if needs_requant {
            let (content, bytes) = requantize(content, &mut reader, &device)?;
            ModelWeights::from_gguf(content, &mut Cursor::new(bytes), &device)?
        } else {
            ModelWeights::from_gguf(content, &mut reader, &device)?
        };
        Ok((
            Engine {
                weights,
                device,
                options,
            },
            Vocab {
                tokenizer,
                template,
                context_length,
            },
        ))
    }

    /// Runs one request to the end. `cancelled` is polled between tokens; when it says yes the
    /// generation stops and an error is returned (nobody is waiting for it).
    pub(crate) fn generate(
        &mut self,
        vocab: &Vocab,
        request: &CompletionRequest,
        model_name: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Completion, BackendError> {
        let prompt = vocab.prompt_ids(&request.messages)?;
        let ctx = vocab.context_length;
        if prompt.is_empty() {
            return Err(BackendError::new(
                BackendErrorKind::InvalidRequest,
                "the prompt is empty",
            ));
        }
        if prompt.len() >= ctx {
            return Err(BackendError::new(
                BackendErrorKind::InvalidRequest,
                format!(
                    "the prompt is {} tokens, the context holds {ctx}",
                    prompt.len()
                ),
            ));
        }
        let max_tokens = request.max_tokens.unwrap_or(self.options.max_tokens).max(1) as usize;
        let budget = max_tokens.min(ctx - prompt.len());
        let temperature = request.temperature.unwrap_or(self.options.temperature);
        let top_p = request.top_p.unwrap_or(self.options.top_p);
        let mut sampler = Sampler::new(temperature, top_p, request.seed)
            .with_repeat_penalty(self.options.repeat_penalty, self.options.repeat_last_n);
        let longest_stop = request.stop.iter().map(String::len).max().unwrap_or(0);

        // A new prompt starts at position 0, which drops the KV cache of the previous one.
        self.weights.clear_kv_cache();
        let mut logits = None;
        for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
            if cancelled() {
                return Err(cancelled_error());
            }
            logits = Some(self.forward(chunk, i * PREFILL_CHUNK)?);
        }
        let mut logits = logits.expect("prompt is not empty");

        let mut generated: Vec<u32> = Vec::with_capacity(budget);
        let mut sampled = 0u64;
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        loop {
            let next = sampler.sample_after(&mut logits, &generated);
            sampled += 1;
            if vocab.tokenizer.is_end_of_generation(next) {
                finish = FinishReason::Stop;
                break;
            }
            generated.push(next);
            let before = text.len();
            text = vocab.tokenizer.decode(&generated).map_err(|e| {
                BackendError::new(BackendErrorKind::Backend, "decoding tokens failed")
                    .with_source(e)
            })?;
            if longest_stop > 0 {
                // Only the new text (plus a stop sequence's length before it) can hold a stop
                // sequence that was not already there.
                let mut from = before.saturating_sub(longest_stop);
                while !text.is_char_boundary(from) {
                    from -= 1;
                }
                let hit = request
                    .stop
                    .iter()
                    .filter_map(|s| text[from..].find(s.as_str()).map(|p| from + p))
                    .min();
                if let Some(at) = hit {
                    text.truncate(at);
                    finish = FinishReason::Stop;
                    break;
                }
            }
            if generated.len() >= budget {
                break;
            }
            if cancelled() {
                return Err(cancelled_error());
            }
            logits = self.forward(&[next], prompt.len() + generated.len() - 1)?;
        }
        if finish == FinishReason::Length {
            // A token limit can cut a multi-byte character in half.
            while text.ends_with('\u{FFFD}') {
                text.pop();
            }
        }
        Ok(Completion::new(text)
            .with_finish_reason(finish)
            .with_usage(Usage::new(prompt.len() as u64, sampled))
            .with_model(model_name))
    }

    /// Logits of the last position after feeding `ids` at `pos`.
    fn forward(&mut self, ids: &[u32], pos: usize) -> Result<Vec<f32>, BackendError> {
        let input = Tensor::new(ids, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(|e| candle_err("building the input failed", e))?;
        self.weights
            .forward(&input, pos)
            .and_then(|l| l.squeeze(0))
            .and_then(|l| l.to_dtype(DType::F32))
            .and_then(|l| l.to_vec1::<f32>())
            .map_err(|e| candle_err("the model's forward pass failed", e))
    }
}

fn cancelled_error() -> BackendError {
    BackendError::new(BackendErrorKind::Other, "cancelled: the caller went away")
}

/// Rewrites the GGUF in memory with slow block types re-encoded as Q8_0.
fn requantize<R: std::io::Read + std::io::Seek>(
    content: gguf_file::Content,
    reader: &mut R,
    device: &Device,
) -> Result<(gguf_file::Content, Vec<u8>), BoxError> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let info = &content.tensor_infos[name];
        let t = content.tensor(reader, name, device)?;
        let last_dim = info.shape.dims().last().copied().unwrap_or(0);
        let t = if slow_on_cpu(info.ggml_dtype) && last_dim % GgmlDType::Q8_0.block_size() == 0 {
            QTensor::quantize(&t.dequantize(device)?, GgmlDType::Q8_0)?
        } else {
            t
        };
        tensors.push((name.as_str(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &refs)?;
    let bytes = out.into_inner();
    let content = gguf_file::Content::read(&mut Cursor::new(&bytes))?;
    Ok((content, bytes))
}

/// Temperature and nucleus (top-p) sampling with a seeded ChaCha8 generator, so a seed gives
/// the same tokens on every platform and rand release.
#[derive(Debug)]
pub(crate) struct Sampler {
    temperature: f32,
    top_p: f32,
    repeat_penalty: f32,
    repeat_last_n: usize,
    rng: ChaCha8Rng,
    scratch: Vec<(u32, f32)>,
    recent: Vec<u32>,
}

impl Sampler {
    pub(crate) fn new(temperature: f32, top_p: f32, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Sampler {
            temperature,
            top_p: if top_p.is_finite() && top_p > 0.0 {
                top_p.min(1.0)
            } else {
                1.0
            },
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            rng,
            scratch: Vec::new(),
            recent: Vec::new(),
        }
    }

    /// Penalises the tokens among the last `last_n` of the answer (see
    /// `LocalBackendBuilder::repeat_penalty`).
    pub(crate) fn with_repeat_penalty(mut self, penalty: f32, last_n: usize) -> Self {
        self.repeat_penalty = penalty;
        self.repeat_last_n = last_n;
        self
    }

    /// Applies the repetition penalty for the answer so far (`generated`) to `logits`, then
    /// picks the next token. Each distinct recent token is penalised once.
    pub(crate) fn sample_after(&mut self, logits: &mut [f32], generated: &[u32]) -> u32 {
        if self.repeat_penalty != 1.0 && self.repeat_last_n > 0 && !generated.is_empty() {
            let from = generated.len().saturating_sub(self.repeat_last_n);
            self.recent.clear();
            self.recent.extend_from_slice(&generated[from..]);
            self.recent.sort_unstable();
            self.recent.dedup();
            for &t in &self.recent {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / self.repeat_penalty
                    } else {
                        *l * self.repeat_penalty
                    };
                }
            }
        }
        self.sample(logits)
    }

    /// Picks the next token.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        let probs = &mut self.scratch;
        probs.clear();
        let mut total = 0.0f32;
        for (i, &l) in logits.iter().enumerate() {
            let p = ((l - max) * inv_t).exp();
            total += p;
            probs.push((i as u32, p));
        }
        let by_prob_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // The nucleus: the most likely tokens whose mass reaches top_p. Sorting the whole
        // vocabulary for every token is slow, so sort a top slice that grows until it is enough.
        let keep = if self.top_p < 1.0 {
            let target = self.top_p * total;
            let mut k = 64.min(probs.len());
            loop {
                if k < probs.len() {
                    probs.select_nth_unstable_by(k - 1, by_prob_desc);
                }
                probs[..k].sort_unstable_by(by_prob_desc);
                let mut cum = 0.0;
                let mut found = None;
                for (j, &(_, p)) in probs[..k].iter().enumerate() {
                    cum += p;
                    if cum >= target {
                        found = Some(j + 1);
                        break;
                    }
                }
                match found {
                    Some(n) => break n,
                    None if k == probs.len() => break k,
                    None => k = (k * 4).min(probs.len()),
                }
            }
        } else {
            probs.len()
        };
        let kept = &probs[..keep];
        let mass: f32 = kept.iter().map(|&(_, p)| p).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for &(id, p) in kept {
            if r < p {
                return id;
            }
            r -= p;
        }
        kept.last().map_or(0, |&(id, _)| id)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(0.0, 1.0, None);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn repeat_penalty_steers_away_from_recent_tokens() {
        // Token 1 leads by a little; once generated, the penalty lets token 2 win.
        let logits = [0.0f32, 2.1, 2.0, -1.0];
        let mut plain = Sampler::new(0.0, 1.0, None);
        assert_eq!(plain.sample_after(&mut logits.clone(), &[1]), 1);
        let mut s = Sampler::new(0.0, 1.0, None).with_repeat_penalty(1.1, 64);
        assert_eq!(s.sample_after(&mut logits.clone(), &[]), 1);
        assert_eq!(s.sample_after(&mut logits.clone(), &[1, 1, 1]), 2);
        // Only the last n tokens count; each distinct token is penalised once.
        let mut s = Sampler::new(0.0, 1.0, None).with_repeat_penalty(1.1, 2);
        assert_eq!(s.sample_after(&mut logits.clone(), &[1, 3, 3]), 1);
        let mut l = logits;
        s.sample_after(&mut l, &[3, 3]);
        assert_eq!(l[3], -1.1, "negative logits are multiplied, once");
    }

    #[test]
    fn seeded_sampling_repeats() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let draw = |seed| {
            let mut s = Sampler::new(0.9, 0.9, Some(seed));
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One token holds almost all the mass: with top_p 0.5 only it can be drawn.
        let mut logits = vec![0.0f32; 5000];
        logits[4321] = 20.0;
        let mut s = Sampler::new(1.0, 0.5, Some(1));
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), 4321);
        }
        // A flat distribution with top_p 0.01 keeps about 1% of the tokens, the lowest ids first
        // on ties.
        let flat = vec![0.0f32; 1000];
        let mut s = Sampler::new(1.0, 0.01, Some(2));
        for _ in 0..100 {
            assert!(s.sample(&flat) < 10);
        }
    }
}

//! The model itself: loading the GGUF, generations as step-by-step state machines, sampling.
//!
//! Runs synchronously on the worker thread; nothing here is async. A generation is a
//! [`Sequence`]: [`Engine::start`] checks and prefills its prompt (alone), then each
//! [`Engine::decode`] step feeds the last sampled token of every active sequence in one batch
//! and [`Sequence::accept`] samples the next one from that sequence's logits.

use std::fs::File;
use std::io::{BufReader, Cursor};
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::chat::ChatTemplate;
use super::llama::{Feed, KvCache, Llama, MAX_SEQ_LEN};
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
    pub(crate) max_batch: usize,
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
            BackendError::new(BackendErrorKind::Fatal, "tokenizing the prompt failed")
                .with_source(e)
        })
    }
}

/// The loaded weights. Owned by the worker thread.
pub(crate) struct Engine {
    model: Llama,
    options: EngineOptions,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model)
            .field("options", &self.options)
            .finish()
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
    BackendError::new(BackendErrorKind::Fatal, what).with_source(e)
}

/// One generation in progress: its cache, sampler and answer so far.
#[derive(Debug)]
pub(crate) struct Sequence {
    cache: KvCache,
    sampler: Sampler,
    prompt_len: usize,
    budget: usize,
    stop: Vec<String>,
    longest_stop: usize,
    generated: Vec<u32>,
    sampled: u64,
    text: String,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// The token the next decode step feeds (the last one sampled).
    fn last_token(&self) -> u32 {
        *self
            .generated
            .last()
            .expect("a running sequence has sampled a token")
    }

    /// Whether the generation is over (its completion is ready).
    pub(crate) fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Samples the next token from `logits` (the model's output after the last fed token) and
    /// checks end-of-turn tokens, stop sequences and the token budget.
    pub(crate) fn accept(&mut self, vocab: &Vocab, logits: &mut [f32]) -> Result<(), BackendError> {
        let next = self.sampler.sample_after(logits, &self.generated);
        self.sampled += 1;
        if vocab.tokenizer.is_end_of_generation(next) {
            self.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        self.generated.push(next);
        let before = self.text.len();
        self.text = vocab.tokenizer.decode(&self.generated).map_err(|e| {
            BackendError::new(BackendErrorKind::Fatal, "decoding tokens failed").with_source(e)
        })?;
        if self.longest_stop > 0 {
            // Only the new text (plus a stop sequence's length before it) can hold a stop
            // sequence that was not already there.
            let mut from = before.saturating_sub(self.longest_stop);
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            let hit = self
                .stop
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
                .min();
            if let Some(at) = hit {
                self.text.truncate(at);
                self.finish = Some(FinishReason::Stop);
                return Ok(());
            }
        }
        if self.generated.len() >= self.budget {
            self.finish = Some(FinishReason::Length);
        }
        Ok(())
    }

    /// The completion of a finished sequence.
    pub(crate) fn completion(mut self, model_name: &str) -> Completion {
        let finish = self.finish.unwrap_or(FinishReason::Length);
        if finish == FinishReason::Length {
            // A token limit can cut a multi-byte character in half.
            while self.text.ends_with('\u{FFFD}') {
                self.text.pop();
            }
        }
        Completion::new(self.text)
            .with_finish_reason(finish)
            .with_usage(Usage::new(self.prompt_len as u64, self.sampled))
            .with_model(model_name)
    }

    /// Tokens held in the KV cache.
    pub(crate) fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Undoes a decode step that failed half-way (drops anything after `len` tokens).
    pub(crate) fn rewind(&mut self, len: usize) -> Result<(), BackendError> {
        self.cache
            .truncate(len)
            .map_err(|e| candle_err("rewinding the KV cache failed", e))
    }
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
        let max_batch = options.max_batch;
        let model = if needs_requant {
            let (content, bytes) = requantize(content, &mut reader, &device)?;
            Llama::load(&content, &mut Cursor::new(bytes), &device, max_batch)?
        } else {
            Llama::load(&content, &mut reader, &device, max_batch)?
        };
        tracing::debug!(
            weights = ?model.weight_dtype(),
            batched_matmul = model.batched_matmul(),
            max_batch,
            "local model weights loaded"
        );
        Ok((
            Engine { model, options },
            Vocab {
                tokenizer,
                template,
                context_length,
            },
        ))
    }

    /// The most sequences one decode step runs.
    pub(crate) fn max_batch(&self) -> usize {
        self.options.max_batch
    }

    /// Checks a request, feeds its prompt (alone, in chunks) and samples its first token.
    /// `cancelled` is polled between chunks; when it says yes an error is returned (nobody is
    /// waiting for it).
    pub(crate) fn start(
        &self,
        vocab: &Vocab,
        request: &CompletionRequest,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Sequence, BackendError> {
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
        let temperature = request.temperature.unwrap_or(self.options.temperature);
        let top_p = request.top_p.unwrap_or(self.options.top_p);
        let mut seq = Sequence {
            cache: KvCache::default(),
            sampler: Sampler::new(temperature, top_p, request.seed)
                .with_repeat_penalty(self.options.repeat_penalty, self.options.repeat_last_n),
            prompt_len: prompt.len(),
            budget: max_tokens.min(ctx - prompt.len()),
            longest_stop: request.stop.iter().map(String::len).max().unwrap_or(0),
            stop: request.stop.clone(),
            generated: Vec::new(),
            sampled: 0,
            text: String::new(),
            finish: None,
        };
        let mut logits = Vec::new();
        for chunk in prompt.chunks(PREFILL_CHUNK) {
            if cancelled() {
                return Err(cancelled_error());
            }
            let mut feed = [Feed {
                cache: &mut seq.cache,
                tokens: chunk,
            }];
            logits = self
                .model
                .forward(&mut feed)
                .map_err(|e| candle_err("the model's forward pass failed", e))?
                .pop()
                .expect("one feed, one row");
        }
        seq.accept(vocab, &mut logits)?;
        Ok(seq)
    }

    /// One decode step for all `seqs` together: feeds each its last sampled token and returns
    /// each its logits, in order. On an error the caches may hold part of the step: undo it
    /// with [`Sequence::rewind`].
    pub(crate) fn decode(&self, seqs: &mut [&mut Sequence]) -> Result<Vec<Vec<f32>>, BackendError> {
        let tokens: Vec<[u32; 1]> = seqs.iter().map(|s| [s.last_token()]).collect();
        let mut feeds: Vec<Feed<'_>> = seqs
            .iter_mut()
            .zip(&tokens)
            .map(|(s, t)| Feed {
                cache: &mut s.cache,
                tokens: t,
            })
            .collect();
        self.model
            .forward(&mut feeds)
            .map_err(|e| candle_err("the model's forward pass failed", e))
    }
}

pub(crate) fn cancelled_error() -> BackendError {
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
    /// `exp((logit - max) / temperature)` for each token.
    weights: Vec<f32>,
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
            weights: Vec::new(),
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
        let weights = &mut self.weights;
        weights.clear();
        weights.extend_from_slice(logits);
        let total = super::vmath::exp_sum(weights, max, inv_t);
        let probs = &mut self.scratch;
        probs.clear();
        probs.extend(weights.iter().enumerate().map(|(i, &p)| (i as u32, p)));
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

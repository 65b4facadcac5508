//! The tokenizer, rebuilt from the GGUF metadata (there is no `tokenizer.json` beside a GGUF).
//!
//! GGUF files of byte-level BPE models (`tokenizer.ggml.model = "gpt2"`) carry the vocabulary
//! (`tokenizer.ggml.tokens`), the merges (`tokenizer.ggml.merges`), the token types (control
//! tokens such as `<|im_start|>` are type 3) and the name of the pre-tokenizer
//! (`tokenizer.ggml.pre`). candle-core builds a [`tokenizers::Tokenizer`] from these; this
//! module takes it and fixes the one pre-tokenizer candle does not know, SmolLM's (`"smollm"`:
//! every digit on its own, then GPT-2's byte-level split without a prefix space), so token ids
//! and counts match llama.cpp.

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::Tokenizer;

use crate::error::BoxError;

/// The tokenizer and the special token ids generation needs.
#[derive(Debug)]
pub(crate) struct GgufTokenizer {
    pub(crate) inner: Tokenizer,
    /// Tokens that end the assistant's turn.
    pub(crate) end_of_generation: Vec<u32>,
    /// Prepended to every prompt when the metadata asks for it.
    pub(crate) bos: Option<u32>,
    pub(crate) bos_token: String,
    pub(crate) eos_token: String,
}

/// Token texts that end a turn in the common chat formats (ChatML, Llama 3, Gemma, Phi).
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    // A model that opens a new turn has finished its own.
    "<|im_start|>",
];

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl GgufTokenizer {
    pub(crate) fn from_gguf(ct: &gguf_file::Content) -> Result<Self, BoxError> {
        let mut inner = Tokenizer::from_gguf(ct)?;
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("");
        match pre {
            "smollm" => {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            "gpt2" | "" | "default" => {
                // candle's fallback adds a prefix space, which GPT-2-style GGUFs do not.
                let add_prefix = ct
                    .metadata
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(|v| v.to_bool().ok())
                    .unwrap_or(false);
                inner.with_pre_tokenizer(Some(ByteLevel::new(add_prefix, true, true)));
            }
            _ => {}
        }

        let token_text =
            |id: Option<u32>| id.and_then(|id| inner.id_to_token(id)).unwrap_or_default();
        let eos = meta_u32(ct, "tokenizer.ggml.eos_token_id");
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let bos_id = meta_u32(ct, "tokenizer.ggml.bos_token_id");
        let bos_token = token_text(bos_id);
        let eos_token = token_text(eos);

        let mut end_of_generation: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = meta_u32(ct, key) {
                end_of_generation.push(id);
            }
        }
        for text in END_OF_TURN_TEXTS {
            if let Some(id) = inner.token_to_id(text) {
                end_of_generation.push(id);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        if end_of_generation.is_empty() {
            return Err("the GGUF names no end-of-sequence token".into());
        }
        Ok(GgufTokenizer {
            inner,
            end_of_generation,
            bos: if add_bos { bos_id } else { None },
            bos_token,
            eos_token,
        })
    }

    /// Token ids of a rendered prompt; special-token texts (`<|im_start|>`) become their ids.
    pub(crate) fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, BoxError> {
        let enc = self.inner.encode_fast(text, false)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let Some(bos) = self.bos {
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of generated ids, special tokens left out.
    pub(crate) fn decode(&self, ids: &[u32]) -> Result<String, BoxError> {
        self.inner.decode(ids, true)
    }

    pub(crate) fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }
}

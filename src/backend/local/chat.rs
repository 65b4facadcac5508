//! The chat template: turns messages into the prompt text the model was trained on.
//!
//! The model's own template (`tokenizer.chat_template` in the GGUF, a Jinja template) is
//! rendered with `minijinja` the way Hugging Face's `apply_chat_template` does (`trim_blocks`,
//! `lstrip_blocks`, `add_generation_prompt = true`, `bos_token`, `eos_token`,
//! `raise_exception`), so any default the template adds is kept (SmolLM2's inserts a system
//! prompt when the conversation has none) and other GGUF chat models work unchanged. Only a GGUF
//! without a template gets plain ChatML.

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::backend::Message;
use crate::error::BoxError;

const TEMPLATE_NAME: &str = "chat";

/// ChatML, used when the GGUF carries no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + \
                      message['content'] + '<|im_end|>' + '\n' }}{% endfor %}\
                      {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template.
#[derive(Debug)]
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the GGUF's own template is used (`false`: the ChatML fallback).
    pub(crate) from_model: bool,
}

#[derive(Serialize)]
struct Msg<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// Compiles `source`, or ChatML if `None`.
    pub(crate) fn new(
        source: Option<&str>,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, BoxError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let from_model = source.is_some();
        env.add_template_owned(TEMPLATE_NAME, source.unwrap_or(CHATML).to_string())?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            from_model,
        })
    }

    /// The prompt for `messages`, ending where the assistant's answer starts.
    pub(crate) fn render(&self, messages: &[Message]) -> Result<String, BoxError> {
        let msgs: Vec<Msg<'_>> = messages
            .iter()
            .map(|m| Msg {
                role: m.role.as_str(),
                content: &m.content,
            })
            .collect();
        let tmpl = self.env.get_template(TEMPLATE_NAME)?;
        Ok(tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None, String::new(), String::new()).unwrap();
        let got = t
            .render(&[Message::system("Be brief."), Message::user("Hi")])
            .unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(
            Some("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('bad') }}{% endif %}ok"),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(t.render(&[Message::assistant("x")]).is_err());
        assert_eq!(t.render(&[Message::user("x")]).unwrap(), "ok");
    }
}

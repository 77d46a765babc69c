//! Chat templates: the manifest's Jinja `chat_template` rendered with minijinja
//! under Hugging Face's conventions (`messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, `raise_exception`, Python string methods,
//! `trim_blocks` and `lstrip_blocks` on).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::RuntimeError;
use crate::tokenizer::Tokenizer;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.to_string(), content: content.to_string() }
    }
}

const TEMPLATE_NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; the token strings fill `bos_token` / `eos_token`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, RuntimeError> {
        let mut env = Environment::new();
        // transformers renders with these on (jinja2's defaults are off)
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| RuntimeError::Tokenizer(format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// The model's template, with its BOS and first EOS token strings; `None` when the manifest has none.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Result<Option<Self>, RuntimeError> {
        let Some(source) = &tokenizer.info().chat_template else { return Ok(None) };
        let text = |id: Option<u32>| id.and_then(|id| tokenizer.token_text(id)).unwrap_or_default();
        let bos = text(tokenizer.bos_token_id());
        let eos = text(tokenizer.eos_token_ids().first().copied());
        Self::new(source, &bos, &eos).map(Some)
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends
    /// where the assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, RuntimeError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| RuntimeError::Tokenizer(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template: ChatML with a default system prompt.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_with_default_system_prompt() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let got = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn chatml_with_own_system_prompt_and_history() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let msgs =
            [Message::new("system", "Be brief."), Message::new("user", "Hi"), Message::new("assistant", "Hello")];
        let got = t.render(&msgs, false).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        );
    }

    #[test]
    fn hugging_face_conventions() {
        // bos_token, python string methods, trim_blocks and raise_exception
        let src = "{{ bos_token }}{% for m in messages %}\n{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n[{{ m.role.upper() }}] {{ m.content.strip() }}{{ eos_token }}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let got = t.render(&[Message::new("user", "  padded  ")], false).unwrap();
        assert_eq!(got, "<s>[USER] padded</s>");
        let err = t.render(&[Message::new("tool", "x")], false).unwrap_err().to_string();
        assert!(err.contains("bad role tool"), "{err}");
    }

    #[test]
    fn bad_template_is_an_error() {
        let err = ChatTemplate::new("{% for %}", "", "").err().expect("does not compile").to_string();
        assert!(err.contains("chat template"), "{err}");
    }
}

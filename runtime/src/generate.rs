//! The generation loop: prefill the prompt, then decode token by token until
//! an EOS token or the token limit, streaming text as it completes.

use std::collections::VecDeque;
use std::time::Duration;

// std's Instant panics in the browser; this one reads `performance.now()` there.
use web_time::Instant;

use crate::backend::{Backend, Logits};
use crate::chat::{ChatTemplate, Message};
use crate::error::RuntimeError;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Prompt tokens per prefill forward call: bounds activation memory.
pub const PREFILL_CHUNK: usize = 256;

/// Most tokens a greedy run asks at once of a backend that chooses them on
/// the device: one submission and one small readback per chunk instead of per
/// token, at the cost of text arriving a chunk at a time and of the steps a
/// chunk runs past an end-of-sequence token.
pub const GREEDY_CHUNK: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past the context as a sliding window instead of failing or stopping.
    pub sliding_window: bool,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    /// The KV cache is full and no sliding window was requested.
    ContextFull,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Prompt tokens run through the model (after reusing a cached prefix).
    pub prefill_tokens: usize,
    pub prefill: Duration,
    /// Single-token forward calls.
    pub decode_tokens: usize,
    /// Time of those calls plus sampling and detokenizing.
    pub decode: Duration,
}

impl Timings {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    pub fn decode_ms_per_token(&self) -> f64 {
        if self.decode_tokens == 0 {
            return 0.0;
        }
        self.decode.as_secs_f64() * 1e3 / self.decode_tokens as f64
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated tokens, the stopping EOS included.
    pub tokens: Vec<u32>,
    /// Their text, special tokens skipped.
    pub text: String,
    pub stop: StopReason,
    pub timings: Timings,
}

/// Runs a backend with a tokenizer, remembering what its KV cache holds so a
/// follow-up prompt that extends the previous one (a chat turn) only runs the
/// new tokens.
pub struct Generator<'a> {
    backend: &'a mut dyn Backend,
    tokenizer: &'a Tokenizer,
    /// Tokens at positions `0..cached.len()` of the KV cache.
    cached: Vec<u32>,
    /// Whether positions past the context were ever written (the ring wrapped).
    wrapped: bool,
}

impl<'a> Generator<'a> {
    pub fn new(backend: &'a mut dyn Backend, tokenizer: &'a Tokenizer) -> Self {
        Generator { backend, tokenizer, cached: Vec::new(), wrapped: false }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Forgets the cached tokens; the next prompt runs from position 0.
    pub fn reset(&mut self) {
        self.cached.clear();
        self.wrapped = false;
    }

    /// Generates a continuation of `prompt`; `on_text` receives each completed
    /// piece of text as it is produced.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Result<(), RuntimeError>,
    ) -> Result<Generation, RuntimeError> {
        let ctx = self.backend.ctx();
        if prompt.is_empty() {
            return Err(RuntimeError::Other("the prompt has no tokens".into()));
        }
        if prompt.len() > ctx && !opts.sliding_window {
            return Err(RuntimeError::ContextOverflow { tokens: prompt.len(), ctx });
        }
        let mut sampler = Sampler::new(opts.sampling)?;
        let mut timings = Timings::default();

        // reuse the cached prefix (rewinding is sound only while the ring has
        // not wrapped), keeping at least one token to run for the logits
        let mut start = 0;
        if !self.wrapped {
            start = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        }
        self.cached.truncate(start);
        if start == 0 {
            self.wrapped = false;
        }

        // prefill
        let t0 = Instant::now();
        let mut logits = Vec::new();
        for chunk in prompt[start..].chunks(PREFILL_CHUNK) {
            logits = self.backend.forward(chunk, self.cached.len(), Logits::Last)?;
            self.cached.extend_from_slice(chunk);
        }
        timings.prefill_tokens = prompt.len() - start;
        timings.prefill = t0.elapsed();
        self.wrapped |= self.cached.len() > ctx;

        // decode; a backend that chooses tokens on the device (greedy or sampled
        // with the sampler's next draws) may return several per call (`ahead`)
        let t1 = Instant::now();
        let mut stream = self.tokenizer.stream();
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut stop = StopReason::MaxTokens;
        let mut ahead: VecDeque<u32> = VecDeque::new();
        // chunks grow from 2 to GREEDY_CHUNK, so a short answer wastes few
        // steps past its end-of-sequence token
        let mut chunk = 2;
        while tokens.len() < opts.max_tokens {
            let next = match ahead.pop_front() {
                Some(t) => t,
                None => sampler.sample(&logits),
            };
            tokens.push(next);
            if self.tokenizer.is_eos(next) {
                stop = StopReason::Eos;
                break;
            }
            if let Some(piece) = stream.push(next)? {
                on_text(&piece)?;
                text.push_str(&piece);
            }
            if tokens.len() == opts.max_tokens {
                break;
            }
            if self.cached.len() >= ctx && !opts.sliding_window {
                stop = StopReason::ContextFull;
                break;
            }
            if ahead.is_empty() {
                let room = if opts.sliding_window { usize::MAX } else { ctx - self.cached.len() };
                let k = chunk.min(opts.max_tokens - tokens.len()).min(room);
                chunk = (chunk * 2).min(GREEDY_CHUNK);
                let pos = self.cached.len();
                let on_device = if sampler.is_greedy() {
                    self.backend.greedy_steps(next, pos, k)
                } else {
                    let draws = sampler.preview(k);
                    let ids = self.backend.sampled_steps(next, pos, sampler.params(), &draws);
                    if ids.is_some() {
                        sampler.skip(k);
                    }
                    ids
                };
                match on_device {
                    Some(ids) => ahead.extend(ids?),
                    None => logits = self.backend.forward(&[next], pos, Logits::Last)?,
                }
            }
            // `next` is in the cache now: fed by forward, or by the device's greedy steps
            self.cached.push(next);
            self.wrapped |= self.cached.len() > ctx;
            timings.decode_tokens += 1;
        }
        if let Some(piece) = stream.finish()? {
            on_text(&piece)?;
            text.push_str(&piece);
        }
        timings.decode = t1.elapsed();
        Ok(Generation { tokens, text, stop, timings })
    }
}

/// A conversation: its messages so far, rendered through the chat template on
/// every turn.
pub struct Chat {
    template: ChatTemplate,
    pub messages: Vec<Message>,
}

impl Chat {
    pub fn new(template: ChatTemplate) -> Self {
        Chat { template, messages: Vec::new() }
    }

    /// The prompt tokens for the conversation plus `user`'s message.
    pub fn prompt(&self, tokenizer: &Tokenizer, user: &str) -> Result<Vec<u32>, RuntimeError> {
        let mut messages = self.messages.clone();
        messages.push(Message::new("user", user));
        let text = self.template.render(&messages, true)?;
        // the template writes any BOS itself
        tokenizer.encode(&text, false)
    }

    /// Runs one turn and records both messages.
    pub fn turn(
        &mut self,
        generator: &mut Generator<'_>,
        user: &str,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Result<(), RuntimeError>,
    ) -> Result<Generation, RuntimeError> {
        let prompt = self.prompt(generator.tokenizer(), user)?;
        let generation = generator.generate(&prompt, opts, on_text)?;
        self.messages.push(Message::new("user", user));
        self.messages.push(Message::new("assistant", &generation.text));
        Ok(generation)
    }

    pub fn reset(&mut self) {
        self.messages.clear();
    }
}

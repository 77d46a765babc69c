//! The generation loop: prefill the prompt, then decode token by token until
//! an EOS token or the token limit, streaming text as it completes.

use std::collections::VecDeque;
use std::future::Future;
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
/// the device: one small readback per chunk instead of per
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

/// What the generation loop needs of a backend, as futures: the loop is
/// written once against this, awaited on the web ([`AsyncGenerator`] over
/// [`crate::gpu::GpuBackend`]) and run to completion at once natively
/// ([`Generator`] over any blocking [`Backend`], whose futures are ready when
/// first polled).
// The futures are polled where they are made (no executor moves them across
// threads), and on the web they cannot be `Send`: no `Send` bound is promised.
#[allow(async_fn_in_trait)]
pub trait AsyncBackend {
    fn ctx(&self) -> usize;
    /// [`Backend::forward`].
    async fn forward(&mut self, tokens: &[u32], pos: usize, logits: Logits) -> Result<Vec<f32>, RuntimeError>;
    /// [`Backend::greedy_steps`].
    async fn greedy_steps(&mut self, first: u32, pos: usize, k: usize) -> Option<Result<Vec<u32>, RuntimeError>>;
    /// [`Backend::sampled_steps`].
    async fn sampled_steps(
        &mut self,
        first: u32,
        pos: usize,
        params: &SamplingParams,
        draws: &[f64],
    ) -> Option<Result<Vec<u32>, RuntimeError>>;
}

/// A blocking backend as an [`AsyncBackend`] whose futures never wait.
pub struct Ready<'a>(pub &'a mut dyn Backend);

impl AsyncBackend for Ready<'_> {
    fn ctx(&self) -> usize {
        self.0.ctx()
    }
    async fn forward(&mut self, tokens: &[u32], pos: usize, logits: Logits) -> Result<Vec<f32>, RuntimeError> {
        self.0.forward(tokens, pos, logits)
    }
    async fn greedy_steps(&mut self, first: u32, pos: usize, k: usize) -> Option<Result<Vec<u32>, RuntimeError>> {
        self.0.greedy_steps(first, pos, k)
    }
    async fn sampled_steps(
        &mut self,
        first: u32,
        pos: usize,
        params: &SamplingParams,
        draws: &[f64],
    ) -> Option<Result<Vec<u32>, RuntimeError>> {
        self.0.sampled_steps(first, pos, params, draws)
    }
}

/// What the generation loop reports as it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streamed<'a> {
    /// A generated token id (the stopping EOS included), as soon as it is chosen.
    Token(u32),
    /// A completed piece of text.
    Text(&'a str),
}

/// What the KV cache holds, so a follow-up prompt that extends the previous
/// one (a chat turn) only runs the new tokens.
#[derive(Debug, Default)]
struct CacheState {
    /// Tokens at positions `0..cached.len()` of the KV cache.
    cached: Vec<u32>,
    /// Whether positions past the context were ever written (the ring wrapped).
    wrapped: bool,
}

/// Runs a blocking backend with a tokenizer, remembering what its KV cache holds so a
/// follow-up prompt that extends the previous one (a chat turn) only runs the
/// new tokens.
pub struct Generator<'a> {
    backend: &'a mut dyn Backend,
    tokenizer: &'a Tokenizer,
    cache: CacheState,
}

impl<'a> Generator<'a> {
    pub fn new(backend: &'a mut dyn Backend, tokenizer: &'a Tokenizer) -> Self {
        Generator { backend, tokenizer, cache: CacheState::default() }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Forgets the cached tokens; the next prompt runs from position 0.
    pub fn reset(&mut self) {
        self.cache = CacheState::default();
    }

    /// Generates a continuation of `prompt`; `on_text` receives each completed
    /// piece of text as it is produced.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Result<(), RuntimeError>,
    ) -> Result<Generation, RuntimeError> {
        let mut on_event = |e: Streamed<'_>| match e {
            Streamed::Text(piece) => on_text(piece),
            Streamed::Token(_) => Ok(()),
        };
        let mut backend = Ready(&mut *self.backend);
        let run = generate_loop(&mut backend, self.tokenizer, &mut self.cache, prompt, opts, &mut on_event);
        // A blocking backend's futures complete when first polled.
        let mut run = std::pin::pin!(run);
        match run.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => Err(RuntimeError::Other("a blocking backend's step did not complete".into())),
        }
    }
}

/// [`Generator`] for a backend whose steps are awaited (the GPU backend in a
/// browser): owns the backend and tokenizer, so a page can keep one across turns.
pub struct AsyncGenerator<B> {
    backend: B,
    tokenizer: Tokenizer,
    cache: CacheState,
}

impl<B: AsyncBackend> AsyncGenerator<B> {
    pub fn new(backend: B, tokenizer: Tokenizer) -> Self {
        AsyncGenerator { backend, tokenizer, cache: CacheState::default() }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Forgets the cached tokens; the next prompt runs from position 0.
    pub fn reset(&mut self) {
        self.cache = CacheState::default();
    }

    /// [`Generator::generate`], reporting every token id as well as the text.
    pub async fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_event: &mut dyn FnMut(Streamed<'_>) -> Result<(), RuntimeError>,
    ) -> Result<Generation, RuntimeError> {
        generate_loop(&mut self.backend, &self.tokenizer, &mut self.cache, prompt, opts, on_event).await
    }
}

/// The prefill-then-decode loop both generators run.
async fn generate_loop<B: AsyncBackend + ?Sized>(
    backend: &mut B,
    tokenizer: &Tokenizer,
    cache: &mut CacheState,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_event: &mut dyn FnMut(Streamed<'_>) -> Result<(), RuntimeError>,
) -> Result<Generation, RuntimeError> {
    let ctx = backend.ctx();
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
    if !cache.wrapped {
        start = cache.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
    }
    cache.cached.truncate(start);
    if start == 0 {
        cache.wrapped = false;
    }

    // prefill
    let t0 = Instant::now();
    let mut logits = Vec::new();
    for chunk in prompt[start..].chunks(PREFILL_CHUNK) {
        logits = backend.forward(chunk, cache.cached.len(), Logits::Last).await?;
        cache.cached.extend_from_slice(chunk);
    }
    timings.prefill_tokens = prompt.len() - start;
    timings.prefill = t0.elapsed();
    cache.wrapped |= cache.cached.len() > ctx;

    // decode; a backend that chooses tokens on the device (greedy, or sampled
    // at the sampler's next draws) may return several per call (`ahead`)
    let t1 = Instant::now();
    let mut stream = tokenizer.stream();
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
        on_event(Streamed::Token(next))?;
        if tokenizer.is_eos(next) {
            stop = StopReason::Eos;
            break;
        }
        if let Some(piece) = stream.push(next)? {
            on_event(Streamed::Text(&piece))?;
            text.push_str(&piece);
        }
        if tokens.len() == opts.max_tokens {
            break;
        }
        if cache.cached.len() >= ctx && !opts.sliding_window {
            stop = StopReason::ContextFull;
            break;
        }
        if ahead.is_empty() {
            let room = if opts.sliding_window { usize::MAX } else { ctx - cache.cached.len() };
            let k = chunk.min(opts.max_tokens - tokens.len()).min(room);
            chunk = (chunk * 2).min(GREEDY_CHUNK);
            let pos = cache.cached.len();
            let on_device = if sampler.is_greedy() {
                backend.greedy_steps(next, pos, k).await
            } else {
                // the device samples at the sampler's next draws, taken only if it does
                let draws = sampler.preview(k);
                let ids = backend.sampled_steps(next, pos, sampler.params(), &draws).await;
                if ids.is_some() {
                    sampler.skip(k);
                }
                ids
            };
            match on_device {
                Some(ids) => ahead.extend(ids?),
                None => logits = backend.forward(&[next], cache.cached.len(), Logits::Last).await?,
            }
        }
        // `next` is in the cache now: fed by forward, or by the device's steps
        cache.cached.push(next);
        cache.wrapped |= cache.cached.len() > ctx;
        timings.decode_tokens += 1;
    }
    if let Some(piece) = stream.finish()? {
        on_event(Streamed::Text(&piece))?;
        text.push_str(&piece);
    }
    timings.decode = t1.elapsed();
    Ok(Generation { tokens, text, stop, timings })
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

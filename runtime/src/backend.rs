//! What every backend (CPU, GPU) offers the generation loop.

use crate::error::RuntimeError;
use crate::sampling::SamplingParams;

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's row (generation).
    Last,
    /// One row per input token (perplexity, tests).
    All,
}

/// Describes a backend for summaries and `info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// `cpu` or `gpu`.
    pub kind: &'static str,
    /// Adapter name for the GPU backend, thread count for the CPU one.
    pub device: String,
    /// Kernel target / precision notes.
    pub details: String,
}

/// A model bound to a device, with its KV cache.
///
/// The KV cache is a ring of `ctx` positions per layer: position `p` lives in
/// slot `p % ctx`, keys are stored after RoPE, and attention covers the last
/// `min(p + 1, ctx)` positions, so running past `ctx` is a sliding window.
pub trait Backend {
    fn info(&self) -> BackendInfo;
    /// Positions the KV cache holds.
    fn ctx(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Runs `tokens` at positions `pos .. pos + tokens.len()`, writing their keys
    /// and values into the cache; returns logits row-major `[rows, vocab]`.
    fn forward(&mut self, tokens: &[u32], pos: usize, logits: Logits) -> Result<Vec<f32>, RuntimeError>;

    /// Greedy decoding on the device, without reading logits back: feeds
    /// `first` at `pos`, then each step's argmax, for `k` steps, and returns
    /// the `k` chosen ids. The cache then holds `first` and every returned id
    /// but the last. `None` where the backend has no such path (the caller
    /// samples on the host).
    fn greedy_steps(&mut self, _first: u32, _pos: usize, _k: usize) -> Option<Result<Vec<u32>, RuntimeError>> {
        None
    }

    /// Like [`Backend::greedy_steps`], each step sampled on the device with
    /// `params` at the uniform draw `draws[i]`, for `draws.len()` steps: the
    /// token the host's [`crate::sampling::Sampler::choose`] picks from the same
    /// logits and draw.
    fn sampled_steps(
        &mut self,
        _first: u32,
        _pos: usize,
        _params: &SamplingParams,
        _draws: &[f64],
    ) -> Option<Result<Vec<u32>, RuntimeError>> {
        None
    }
}

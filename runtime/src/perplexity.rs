//! Perplexity the way llama.cpp's `llama-perplexity` measures it, so the
//! numbers compare: the text is cut into non-overlapping windows of `ctx`
//! tokens, each run from position 0 (its first token replaced by BOS where the
//! tokenizer adds one), and only the second half of each window is scored, so
//! every scored token sees at least `ctx / 2` tokens of context.

use serde::Serialize;

use crate::backend::{Backend, Logits};
use crate::error::RuntimeError;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowScore {
    pub index: usize,
    /// Index of the window's first token in the text.
    pub start: usize,
    /// Tokens scored in this window.
    pub scored: usize,
    /// Mean negative log-likelihood (nats per token) of the scored tokens.
    pub nll: f64,
    pub ppl: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PerplexityReport {
    pub ctx: usize,
    /// Tokens of the text that the windows cover.
    pub tokens: usize,
    pub scored: usize,
    /// Mean negative log-likelihood over all scored tokens.
    pub nll: f64,
    pub ppl: f64,
    pub windows: Vec<WindowScore>,
}

/// Scores `tokens` in windows of `ctx`; `bos` replaces each window's first
/// token. `on_window` sees each window's score as it completes.
pub fn perplexity(
    backend: &mut dyn Backend,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    on_window: &mut dyn FnMut(&WindowScore),
) -> Result<PerplexityReport, RuntimeError> {
    if ctx < 4 {
        return Err(RuntimeError::Other(format!("a perplexity window of {ctx} tokens is too short (at least 4)")));
    }
    if ctx > backend.ctx() {
        return Err(RuntimeError::ContextOverflow { tokens: ctx, ctx: backend.ctx() });
    }
    let n_windows = tokens.len() / ctx;
    if n_windows == 0 {
        return Err(RuntimeError::Other(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    let vocab = backend.vocab_size();
    // positions first..ctx-1 predict the token after them (llama.cpp's `first = n_ctx / 2`)
    let first = ctx / 2;
    let mut windows = Vec::with_capacity(n_windows);
    let (mut total_nll, mut total_scored) = (0.0f64, 0usize);
    for index in 0..n_windows {
        let start = index * ctx;
        let mut window = tokens[start..start + ctx].to_vec();
        if let Some(bos) = bos {
            window[0] = bos;
        }
        let logits = backend.forward(&window, 0, Logits::All)?;
        let mut nll = 0.0f64;
        for j in first..ctx - 1 {
            let row = &logits[j * vocab..(j + 1) * vocab];
            nll -= log_softmax_at(row, window[j + 1] as usize);
        }
        let scored = ctx - 1 - first;
        total_nll += nll;
        total_scored += scored;
        let mean = nll / scored as f64;
        let score = WindowScore { index, start, scored, nll: mean, ppl: mean.exp() };
        on_window(&score);
        windows.push(score);
    }
    let nll = total_nll / total_scored as f64;
    Ok(PerplexityReport { ctx, tokens: n_windows * ctx, scored: total_scored, nll, ppl: nll.exp(), windows })
}

/// `log softmax(row)[target]`, in f64.
pub fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[target] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendInfo;

    /// A backend whose logits depend only on the input token: the next token
    /// is predicted with probability `p` as `(t + 1) % vocab`, the rest uniform.
    struct Counter {
        vocab: usize,
        p: f64,
        calls: Vec<(Vec<u32>, usize)>,
    }

    impl Backend for Counter {
        fn info(&self) -> BackendInfo {
            BackendInfo { kind: "test", device: String::new(), details: String::new() }
        }
        fn ctx(&self) -> usize {
            64
        }
        fn vocab_size(&self) -> usize {
            self.vocab
        }
        fn forward(&mut self, tokens: &[u32], pos: usize, logits: Logits) -> Result<Vec<f32>, RuntimeError> {
            assert_eq!(logits, Logits::All);
            self.calls.push((tokens.to_vec(), pos));
            let rest = (1.0 - self.p) / (self.vocab - 1) as f64;
            let mut out = vec![rest.ln() as f32; tokens.len() * self.vocab];
            for (i, &t) in tokens.iter().enumerate() {
                out[i * self.vocab + (t as usize + 1) % self.vocab] = self.p.ln() as f32;
            }
            Ok(out)
        }
    }

    #[test]
    fn log_softmax_by_hand() {
        let v = log_softmax_at(&[0.0, 3f32.ln()], 1);
        assert!((v - 0.75f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn windows_score_their_second_half() {
        let mut b = Counter { vocab: 10, p: 0.5, calls: Vec::new() };
        // 2 full windows of 8 and a remainder of 3 that is dropped
        let tokens: Vec<u32> = (0..19).map(|i| i % 10).collect();
        let mut seen = Vec::new();
        let r = perplexity(&mut b, &tokens, 8, Some(9), &mut |w| seen.push(w.index)).unwrap();
        assert_eq!(seen, vec![0, 1]);
        assert_eq!(r.tokens, 16);
        assert_eq!(r.scored, 2 * 3, "positions 4, 5, 6 predict 5, 6, 7");
        assert_eq!(b.calls[1], (vec![9, 9, 0, 1, 2, 3, 4, 5], 0), "bos replaces the first token; runs from 0");
        // every scored token follows the counting rule: ppl = 1 / p
        assert!((r.ppl - 2.0).abs() < 1e-5, "{}", r.ppl);
        assert!((r.windows[1].nll - 2f64.ln()).abs() < 1e-5);
    }

    #[test]
    fn unpredictable_tokens_score_worse() {
        let mut b = Counter { vocab: 10, p: 0.5, calls: Vec::new() };
        let tokens: Vec<u32> = (0..16).map(|i| (i * 3) % 10).collect();
        let r = perplexity(&mut b, &tokens, 8, None, &mut |_| {}).unwrap();
        // each scored token has probability (1 - p) / 9
        assert!((r.ppl - 18.0).abs() < 1e-3, "{}", r.ppl);
    }

    #[test]
    fn too_short_text_is_an_error() {
        let mut b = Counter { vocab: 10, p: 0.5, calls: Vec::new() };
        assert!(perplexity(&mut b, &[1, 2, 3], 8, None, &mut |_| {}).is_err());
        assert!(matches!(
            perplexity(&mut b, &[1; 200], 128, None, &mut |_| {}),
            Err(RuntimeError::ContextOverflow { tokens: 128, ctx: 64 })
        ));
    }
}

//! Calibration: how much quantizing one unit of a model alone (a transformer
//! block, or the token embedding together with the LM head) changes what the
//! model predicts, measured on the CPU backend against a reference model.
//!
//! The reference run keeps the hidden state entering every block, so the run
//! for block `l` starts there: blocks before `l` are the reference's, and only
//! `l..` is recomputed. Units are measured in parallel.

use llama5_codegen::manifest::ModelConfig;
use rayon::prelude::*;

use crate::cpu::{block, embed, head, rope_inv_freq, KvCache, Weights};
use crate::error::RuntimeError;
use crate::model::Model;

/// What is quantized as one piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    /// The token embedding and the LM head (one matrix when tied).
    Embedding,
    /// Transformer block `N`: its seven matrices.
    Layer(usize),
}

impl Unit {
    /// Every unit of a model with `layers` blocks: the embedding, then the blocks in order.
    pub fn all(layers: usize) -> Vec<Unit> {
        std::iter::once(Unit::Embedding).chain((0..layers).map(Unit::Layer)).collect()
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Embedding => f.write_str("embed"),
            Unit::Layer(l) => write!(f, "layers.{l}"),
        }
    }
}

impl std::str::FromStr for Unit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "embed" {
            return Ok(Unit::Embedding);
        }
        s.strip_prefix("layers.")
            .and_then(|n| n.parse().ok())
            .map(Unit::Layer)
            .ok_or_else(|| format!("unit `{s}` is not `embed` or `layers.N`"))
    }
}

/// The effect of quantizing one unit alone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnitEffect {
    pub unit: Unit,
    /// Mean over positions of KL(reference ‖ quantized) of the next-token
    /// distribution, in nats.
    pub kl: f64,
    /// `‖y_q − y‖ / ‖y‖` of the unit's own output `y`: a block's contribution
    /// to the residual stream, or for the embedding the LM head's logits on the
    /// reference's final hidden states.
    pub rel_error: f64,
}

/// The reference model's run over the calibration tokens, kept for reuse.
pub struct Reference<'m> {
    cfg: ModelConfig,
    weights: Weights<'m>,
    inv_freq: Vec<f64>,
    tokens: Vec<u32>,
    /// `hidden[l]`: the hidden states `(n, hidden)` entering block `l`;
    /// `hidden[layers]` leaves the last block.
    hidden: Vec<Vec<f32>>,
    /// The reference logits `(n, vocab)`.
    logits: Vec<f32>,
}

impl<'m> Reference<'m> {
    /// Runs `model` over `tokens` (positions `0..n`, one window).
    pub fn new(model: &'m Model, tokens: &[u32]) -> Result<Self, RuntimeError> {
        let cfg = model.manifest.model.clone();
        if tokens.is_empty() {
            return Err(RuntimeError::Other("calibration needs at least one token".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(RuntimeError::Other(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                cfg.vocab_size
            )));
        }
        let weights = Weights::load(model)?;
        let inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta);
        let mut cache = KvCache::new(cfg.num_layers, tokens.len(), cfg.kv_dim());
        let mut x = embed(&weights.embed, tokens)?;
        let mut hidden = vec![x.clone()];
        for (l, layer) in weights.layers.iter().enumerate() {
            block(&cfg, layer, l, &mut x, 0, &mut cache, &inv_freq);
            hidden.push(x.clone());
        }
        let logits = head(&cfg, &weights.final_norm, &weights.lm_head, &x);
        Ok(Reference { cfg, weights, inv_freq, tokens: tokens.to_vec(), hidden, logits })
    }

    pub fn tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The effect of each unit of `candidate` (the same model at another
    /// precision) put alone into the reference, for every unit in order.
    pub fn measure(&self, candidate: &Model) -> Result<Vec<UnitEffect>, RuntimeError> {
        if candidate.manifest.model != self.cfg {
            return Err(RuntimeError::Model(format!(
                "{}: the candidate's model config differs from the reference's",
                candidate.dir.display()
            )));
        }
        let cand = Weights::load(candidate)?;
        Unit::all(self.cfg.num_layers).into_par_iter().map(|unit| self.measure_unit(&cand, unit)).collect()
    }

    fn measure_unit(&self, cand: &Weights, unit: Unit) -> Result<UnitEffect, RuntimeError> {
        let (cfg, n, layers) = (&self.cfg, self.tokens.len(), self.cfg.num_layers);
        let mut cache = KvCache::new(layers, n, cfg.kv_dim());
        let (first, mut x, lm_head) = match unit {
            Unit::Embedding => (0, embed(&cand.embed, &self.tokens)?, &cand.lm_head),
            Unit::Layer(l) => (l, self.hidden[l].clone(), &self.weights.lm_head),
        };
        let mut rel_error = 0.0;
        for l in first..layers {
            let weights = if unit == Unit::Layer(l) { &cand.layers[l] } else { &self.weights.layers[l] };
            block(cfg, weights, l, &mut x, 0, &mut cache, &self.inv_freq);
            if unit == Unit::Layer(l) {
                // the block's contribution to the residual stream, quantized vs reference
                let (input, want) = (&self.hidden[l], &self.hidden[l + 1]);
                let err = x.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
                let norm = want.iter().zip(input).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
                rel_error = (err / norm.max(f64::MIN_POSITIVE)).sqrt();
            }
        }
        let logits = head(cfg, &self.weights.final_norm, lm_head, &x);
        if unit == Unit::Embedding {
            let on_reference = head(cfg, &self.weights.final_norm, lm_head, &self.hidden[layers]);
            rel_error = relative_error(&on_reference, &self.logits);
        }
        let vocab = cfg.vocab_size;
        let kl = self
            .logits
            .chunks_exact(vocab)
            .zip(logits.chunks_exact(vocab))
            .map(|(p, q)| kl_divergence(p, q))
            .sum::<f64>()
            / n as f64;
        Ok(UnitEffect { unit, kl, rel_error })
    }
}

/// `‖a − b‖ / ‖b‖`.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let err = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
    let norm = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>();
    (err / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// `log softmax(row)`, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(softmax(p) ‖ softmax(q)) of two logit rows, in nats.
pub fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>().max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_by_hand() {
        // p = (1/4, 3/4), q = (1/2, 1/2)
        let p = [0.0, 3f32.ln()];
        let q = [0.0, 0.0];
        let want = 0.25 * (0.5f64).ln() + 0.75 * (1.5f64).ln();
        assert!((kl_divergence(&p, &q) - want).abs() < 1e-6);
        assert_eq!(kl_divergence(&p, &p), 0.0);
        // shifting logits changes nothing
        assert!((kl_divergence(&[5.0, 5.0 + 3f32.ln()], &[1.0, 1.0]) - want).abs() < 1e-6);
    }

    #[test]
    fn units_round_trip_their_names() {
        for u in Unit::all(3) {
            assert_eq!(u.to_string().parse::<Unit>(), Ok(u));
        }
        assert!("layer.1".parse::<Unit>().is_err());
    }
}

//! The CPU backend: a plain f32 forward pass over the packed weights.
//!
//! It is the reference every GPU kernel is tested against, so it is written to
//! be read: one section per concern, `forward` top to bottom with a comment per
//! step, and small `rmsnorm` / `softmax` / `matmul` / `rope` / `attention`
//! functions. Weights stay packed (borrowed from the model's shards) and are
//! decoded one stored row at a time, so memory stays proportional to the
//! packed size.

use std::ops::Range;

use llama5_codegen::format::{decode_stored_row, pack_factor, unpack_output};
use llama5_codegen::manifest::{names, ModelConfig};
use rayon::prelude::*;

use crate::backend::{Backend, BackendInfo, Logits};
use crate::error::RuntimeError;
use crate::model::{Model, PartView};

// ----------------------------------------------------------------------------
// Weights

/// A matrix of PyTorch shape `(out, in)`, still packed, possibly in several parts
/// split along `out`.
pub struct Matrix<'m> {
    pub name: String,
    pub out: usize,
    pub in_features: usize,
    pub parts: Vec<PartView<'m>>,
}

impl<'m> Matrix<'m> {
    fn load(model: &'m Model, name: &str) -> Result<Self, RuntimeError> {
        let entry = model.tensor(name)?;
        let parts = model.matrix(name)?;
        Ok(Matrix { name: name.to_string(), out: entry.out_features(), in_features: entry.in_features(), parts })
    }

    /// Row `o` of the matrix (one output channel), dequantized: the embedding lookup.
    fn row(&self, o: usize) -> Result<Vec<f32>, RuntimeError> {
        let part = self.parts.iter().find(|p| (p.rows[0]..p.rows[1]).contains(&o)).ok_or_else(|| {
            RuntimeError::Other(format!("token id {o} is outside `{}` of {} rows", self.name, self.out))
        })?;
        unpack_output(part.format, part.data, part.scales, part.out(), part.in_features, o - part.rows[0])
            .map_err(|e| RuntimeError::Model(format!("tensor `{}`: {e}", self.name)))
    }
}

pub(crate) struct LayerWeights<'m> {
    attn_norm: Vec<f32>, // (hidden)
    wq: Matrix<'m>,      // (num_heads * head_dim, hidden)
    wk: Matrix<'m>,      // (num_kv_heads * head_dim, hidden)
    wv: Matrix<'m>,      // (num_kv_heads * head_dim, hidden)
    wo: Matrix<'m>,      // (hidden, num_heads * head_dim)
    mlp_norm: Vec<f32>,  // (hidden)
    w_gate: Matrix<'m>,  // (intermediate, hidden)
    w_up: Matrix<'m>,    // (intermediate, hidden)
    w_down: Matrix<'m>,  // (hidden, intermediate)
}

pub(crate) struct Weights<'m> {
    pub(crate) embed: Matrix<'m>, // (vocab, hidden)
    pub(crate) layers: Vec<LayerWeights<'m>>,
    pub(crate) final_norm: Vec<f32>, // (hidden)
    pub(crate) lm_head: Matrix<'m>,  // (vocab, hidden); the embedding when tied
}

impl<'m> Weights<'m> {
    pub(crate) fn load(model: &'m Model) -> Result<Self, RuntimeError> {
        let cfg = &model.manifest.model;
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let m = |suffix: &str| Matrix::load(model, &names::layer(l, suffix));
                let v = |suffix: &str| model.vector(&names::layer(l, suffix));
                Ok(LayerWeights {
                    attn_norm: v("input_layernorm.weight")?,
                    wq: m("self_attn.q_proj.weight")?,
                    wk: m("self_attn.k_proj.weight")?,
                    wv: m("self_attn.v_proj.weight")?,
                    wo: m("self_attn.o_proj.weight")?,
                    mlp_norm: v("post_attention_layernorm.weight")?,
                    w_gate: m("mlp.gate_proj.weight")?,
                    w_up: m("mlp.up_proj.weight")?,
                    w_down: m("mlp.down_proj.weight")?,
                })
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        Ok(Weights {
            embed: Matrix::load(model, names::EMBED)?,
            layers,
            final_norm: model.vector(names::FINAL_NORM)?,
            lm_head: Matrix::load(model, cfg.lm_head_name())?,
        })
    }
}

// ----------------------------------------------------------------------------
// KV cache

/// A ring of `ctx` positions per layer: position `p` lives in slot `p % ctx`.
pub(crate) struct KvCache {
    ctx: usize,
    kv_dim: usize,
    keys: Vec<f32>,   // (layer, ctx, kv_dim), after RoPE
    values: Vec<f32>, // (layer, ctx, kv_dim)
}

impl KvCache {
    pub(crate) fn new(layers: usize, ctx: usize, kv_dim: usize) -> Self {
        KvCache { ctx, kv_dim, keys: vec![0.0; layers * ctx * kv_dim], values: vec![0.0; layers * ctx * kv_dim] }
    }

    fn offset(&self, layer: usize, pos: usize) -> usize {
        (layer * self.ctx + slot(pos, self.ctx)) * self.kv_dim
    }

    fn key(&self, layer: usize, pos: usize) -> &[f32] {
        let at = self.offset(layer, pos);
        &self.keys[at..at + self.kv_dim]
    }

    fn value(&self, layer: usize, pos: usize) -> &[f32] {
        let at = self.offset(layer, pos);
        &self.values[at..at + self.kv_dim]
    }

    fn store(&mut self, layer: usize, pos: usize, key: &[f32], value: &[f32]) {
        let at = self.offset(layer, pos);
        self.keys[at..at + self.kv_dim].copy_from_slice(key);
        self.values[at..at + self.kv_dim].copy_from_slice(value);
    }
}

/// The cache slot of position `pos`.
pub fn slot(pos: usize, ctx: usize) -> usize {
    pos % ctx
}

/// The positions a query at `pos` attends to: the last `min(pos + 1, ctx)`.
pub fn attention_span(pos: usize, ctx: usize) -> Range<usize> {
    (pos + 1).saturating_sub(ctx)..pos + 1
}

// ----------------------------------------------------------------------------
// Building blocks (each doubles as the reference for its GPU kernel)

/// `x * weight / sqrt(mean(x²) + eps)`.
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_square + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// In-place softmax, shifted by the maximum for stability.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Output channels per parallel task of [`matmul`].
const CHANNELS_PER_TASK: usize = 64;

/// `y = x · Wᵀ` for `n` input rows: `x` is `(n, in)`, the result `(n, out)`.
///
/// Walks the stored rows of each part in order; every task owns a range of
/// output channels and decodes only its words of each stored row, so weights
/// are decoded once per call whatever `n` is.
pub fn matmul(w: &Matrix, x: &[f32], n: usize) -> Vec<f32> {
    let (out_total, in_features) = (w.out, w.in_features);
    debug_assert_eq!(x.len(), n * in_features);
    let mut y = vec![0f32; n * out_total];
    for part in &w.parts {
        let pack = pack_factor(part.format);
        let out = part.out();
        let tasks: Vec<(Range<usize>, Vec<f32>)> = (0..out.div_ceil(CHANNELS_PER_TASK))
            .into_par_iter()
            .map(|task| {
                let channels = task * CHANNELS_PER_TASK..((task + 1) * CHANNELS_PER_TASK).min(out);
                let width = channels.len();
                let mut acc = vec![0f32; n * width]; // (n, width)
                let mut w_row = vec![0f32; width * pack]; // (width, pack)
                let mut w_t = vec![0f32; pack * width]; // (pack, width)
                for r in 0..in_features / pack {
                    decode_stored_row(
                        part.format,
                        part.data,
                        part.scales,
                        &part.sizes,
                        r,
                        channels.clone(),
                        &mut w_row,
                    );
                    if n == 1 {
                        let xs = &x[r * pack..(r + 1) * pack];
                        for (a, ws) in acc.iter_mut().zip(w_row.chunks_exact(pack)) {
                            *a += ws.iter().zip(xs).map(|(w, x)| w * x).sum::<f32>();
                        }
                        continue;
                    }
                    // several tokens: transpose once, then contiguous multiply-adds over channels
                    for (j, ws) in w_row.chunks_exact(pack).enumerate() {
                        for (k, w) in ws.iter().enumerate() {
                            w_t[k * width + j] = *w;
                        }
                    }
                    for (t, acc_t) in acc.chunks_exact_mut(width).enumerate() {
                        let xs = &x[t * in_features + r * pack..t * in_features + (r + 1) * pack];
                        for (xk, w_k) in xs.iter().zip(w_t.chunks_exact(width)) {
                            for (a, w) in acc_t.iter_mut().zip(w_k) {
                                *a += xk * w;
                            }
                        }
                    }
                }
                (channels, acc)
            })
            .collect();
        for (channels, acc) in tasks {
            let width = channels.len();
            for t in 0..n {
                let dst = t * out_total + part.rows[0] + channels.start;
                y[dst..dst + width].copy_from_slice(&acc[t * width..(t + 1) * width]);
            }
        }
    }
    y
}

/// Inverse frequencies `theta^(-2j / head_dim)` for `j < head_dim / 2`.
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f64> {
    (0..head_dim / 2).map(|j| (theta as f64).powf(-2.0 * j as f64 / head_dim as f64)).collect()
}

/// Rotates every head of `x` (`heads * head_dim`) to position `pos`, in the
/// Hugging Face `rotate_half` convention: pairs are `(j, j + head_dim / 2)`.
pub fn rope(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f64]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (j, f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (pos as f64 * f).sin_cos();
            let (a, b) = (head[j] as f64, head[j + half] as f64);
            head[j] = (a * cos - b * sin) as f32;
            head[j + half] = (b * cos + a * sin) as f32;
        }
    }
}

/// One head of attention for a query: softmax(q·k / sqrt(d)) · v over `keys`
/// and `values`, which yield the attended positions' vectors in order.
pub fn attention<'a>(
    out: &mut [f32],
    q: &[f32],
    keys: impl Iterator<Item = &'a [f32]>,
    values: impl Iterator<Item = &'a [f32]>,
) {
    let scale = 1.0 / (q.len() as f32).sqrt();
    let mut scores: Vec<f32> = keys.map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
    softmax(&mut scores);
    out.fill(0.0);
    for (p, v) in scores.iter().zip(values) {
        for (o, v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
}

// ----------------------------------------------------------------------------
// The backend

pub struct CpuBackend<'m> {
    cfg: ModelConfig,
    weights: Weights<'m>,
    cache: KvCache,
    inv_freq: Vec<f64>, // (head_dim / 2)
}

impl<'m> CpuBackend<'m> {
    /// Binds `model`'s packed weights (borrowed, not copied) and allocates a KV
    /// cache of `ctx` positions.
    pub fn new(model: &'m Model, ctx: usize) -> Result<Self, RuntimeError> {
        if ctx == 0 {
            return Err(RuntimeError::Other("a context of 0 positions holds nothing".into()));
        }
        let cfg = model.manifest.model.clone();
        let weights = Weights::load(model)?;
        let cache = KvCache::new(cfg.num_layers, ctx, cfg.kv_dim());
        let inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta);
        Ok(CpuBackend { cfg, weights, cache, inv_freq })
    }

    /// Hidden states `(n, hidden)` of `tokens` at positions `pos..`, after the
    /// last block (before the final norm); fills the KV cache.
    fn blocks(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, RuntimeError> {
        let mut x = embed(&self.weights.embed, tokens)?;
        for (l, layer) in self.weights.layers.iter().enumerate() {
            block(&self.cfg, layer, l, &mut x, pos, &mut self.cache, &self.inv_freq);
        }
        Ok(x)
    }
}

/// Token embeddings `(n, hidden)`.
pub(crate) fn embed(table: &Matrix, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
    let mut x = Vec::with_capacity(tokens.len() * table.in_features);
    for &t in tokens {
        x.extend(table.row(t as usize)?);
    }
    Ok(x)
}

/// Transformer block `l` on the hidden states `x` `(n, hidden)` of positions
/// `pos..`, in place; reads and writes layer `l` of `cache`.
pub(crate) fn block(
    cfg: &ModelConfig,
    layer: &LayerWeights,
    l: usize,
    x: &mut [f32],
    pos: usize,
    cache: &mut KvCache,
    inv_freq: &[f64],
) {
    let (hidden, head_dim) = (cfg.hidden_size, cfg.head_dim);
    let n = x.len() / hidden;
    let (q_dim, kv_dim, ctx) = (cfg.q_dim(), cfg.kv_dim(), cache.ctx);
    let group = cfg.num_heads / cfg.num_kv_heads;
    let mut xb = vec![0f32; n * hidden];

    // attention rmsnorm
    for (o, v) in xb.chunks_exact_mut(hidden).zip(x.chunks_exact(hidden)) {
        rmsnorm(o, v, &layer.attn_norm, cfg.rms_norm_eps);
    }

    // q, k, v projections: (n, q_dim), (n, kv_dim), (n, kv_dim)
    let mut q = matmul(&layer.wq, &xb, n);
    let mut k = matmul(&layer.wk, &xb, n);
    let v = matmul(&layer.wv, &xb, n);

    // RoPE on queries and keys, each at its own position
    for t in 0..n {
        rope(&mut q[t * q_dim..(t + 1) * q_dim], head_dim, pos + t, inv_freq);
        rope(&mut k[t * kv_dim..(t + 1) * kv_dim], head_dim, pos + t, inv_freq);
    }

    // causal attention per (token, head) over the last min(p + 1, ctx)
    // positions: this call's keys come from k/v, earlier ones from the
    // cache, which is written only afterwards so no slot is overwritten
    // while a query of this call still needs it
    let cache_ro = &*cache;
    let key_at = |p: usize| {
        if p >= pos {
            &k[(p - pos) * kv_dim..(p - pos + 1) * kv_dim]
        } else {
            cache_ro.key(l, p)
        }
    };
    let value_at = |p: usize| {
        if p >= pos {
            &v[(p - pos) * kv_dim..(p - pos + 1) * kv_dim]
        } else {
            cache_ro.value(l, p)
        }
    };
    let mut att = vec![0f32; n * q_dim];
    att.par_chunks_mut(head_dim).enumerate().for_each(|(i, out)| {
        let (t, h) = (i / cfg.num_heads, i % cfg.num_heads);
        let kv = (h / group) * head_dim..(h / group + 1) * head_dim;
        let span = attention_span(pos + t, ctx);
        let qh = &q[t * q_dim + h * head_dim..t * q_dim + (h + 1) * head_dim];
        let keys = span.clone().map(|p| &key_at(p)[kv.clone()]);
        let values = span.map(|p| &value_at(p)[kv.clone()]);
        attention(out, qh, keys, values);
    });

    // write this call's keys and values into the ring (later positions win)
    for t in n.saturating_sub(ctx)..n {
        cache.store(l, pos + t, &k[t * kv_dim..(t + 1) * kv_dim], &v[t * kv_dim..(t + 1) * kv_dim]);
    }

    // output projection and residual
    let o = matmul(&layer.wo, &att, n);
    x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

    // ffn rmsnorm
    for (o, v) in xb.chunks_exact_mut(hidden).zip(x.chunks_exact(hidden)) {
        rmsnorm(o, v, &layer.mlp_norm, cfg.rms_norm_eps);
    }

    // SwiGLU: down(silu(gate(x)) * up(x)), then residual
    let mut gate = matmul(&layer.w_gate, &xb, n);
    let up = matmul(&layer.w_up, &xb, n);
    gate.iter_mut().zip(&up).for_each(|(g, u)| *g = silu(*g) * u);
    let down = matmul(&layer.w_down, &gate, n);
    x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
}

/// Logits `(n, vocab)` of the hidden states `x` `(n, hidden)`: final rmsnorm, then the LM head.
pub(crate) fn head(cfg: &ModelConfig, final_norm: &[f32], lm_head: &Matrix, x: &[f32]) -> Vec<f32> {
    let hidden = cfg.hidden_size;
    let mut normed = vec![0f32; x.len()];
    for (o, v) in normed.chunks_exact_mut(hidden).zip(x.chunks_exact(hidden)) {
        rmsnorm(o, v, final_norm, cfg.rms_norm_eps);
    }
    matmul(lm_head, &normed, x.len() / hidden)
}

impl Backend for CpuBackend<'_> {
    fn info(&self) -> BackendInfo {
        let precision = self.weights.layers.first().and_then(|l| l.wq.parts.first()).and_then(|p| p.format.precision());
        BackendInfo {
            kind: "cpu",
            device: format!("{} threads", rayon::current_num_threads()),
            details: format!("f32 math over {} weights", precision.map_or("f32".to_string(), |p| p.to_string())),
        }
    }

    fn ctx(&self) -> usize {
        self.cache.ctx
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn forward(&mut self, tokens: &[u32], pos: usize, logits: Logits) -> Result<Vec<f32>, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::Other("forward needs at least one token".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(RuntimeError::Other(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        let hidden = self.cfg.hidden_size;
        let x = self.blocks(tokens, pos)?;

        // final rmsnorm of the rows asked for, then the logits
        let rows = match logits {
            Logits::All => &x[..],
            Logits::Last => &x[x.len() - hidden..],
        };
        Ok(head(&self.cfg, &self.weights.final_norm, &self.weights.lm_head, rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_by_hand() {
        // mean square of (3, 4) is 12.5
        let mut out = [0.0; 2];
        rmsnorm(&mut out, &[3.0, 4.0], &[1.0, 2.0], 0.0);
        let inv = 1.0 / 12.5f32.sqrt();
        assert!((out[0] - 3.0 * inv).abs() < 1e-6 && (out[1] - 8.0 * inv).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn softmax_by_hand() {
        let mut x = [0.0, (2.0f32).ln(), 1000.0];
        softmax(&mut x);
        assert!((x[2] - 1.0).abs() < 1e-6 && x[0] < 1e-30, "{x:?}");
        let mut y = [0.0, (3.0f32).ln()];
        softmax(&mut y);
        assert!((y[0] - 0.25).abs() < 1e-6 && (y[1] - 0.75).abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn rope_rotates_half_pairs() {
        // head_dim 4: pairs (0, 2) and (1, 3); inv_freq = [1, theta^-0.5]
        let inv_freq = rope_inv_freq(4, 100.0);
        assert_eq!(inv_freq, vec![1.0, 0.1]);
        let mut x = [1.0, 1.0, 0.0, 0.0];
        rope(&mut x, 4, 2, &inv_freq);
        let (a, b) = (2.0f64, 0.2f64);
        let want = [a.cos(), b.cos(), a.sin(), b.sin()];
        for (g, w) in x.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{x:?} vs {want:?}");
        }
        // position 0 is the identity
        let mut y = [0.5, -1.0, 2.0, 3.0];
        rope(&mut y, 4, 0, &inv_freq);
        assert_eq!(y, [0.5, -1.0, 2.0, 3.0]);
    }

    #[test]
    fn attention_by_hand() {
        // two keys, the second scoring ln(3) higher: weights 1/4 and 3/4
        let d = 4.0f32;
        let q = [d.sqrt() * 3f32.ln(), 0.0, 0.0, 0.0];
        let keys = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]];
        let values = [[4.0, 0.0, 8.0, 0.0], [0.0, 4.0, 0.0, 8.0]];
        let mut out = [0.0; 4];
        attention(&mut out, &q, keys.iter().map(|k| &k[..]), values.iter().map(|v| &v[..]));
        let want = [1.0, 3.0, 2.0, 6.0];
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn ring_slots_and_spans() {
        assert_eq!(attention_span(0, 4), 0..1);
        assert_eq!(attention_span(3, 4), 0..4);
        assert_eq!(attention_span(4, 4), 1..5);
        assert_eq!(attention_span(9, 4), 6..10);
        // the span's positions occupy distinct slots
        let slots: std::collections::BTreeSet<usize> = attention_span(9, 4).map(|p| slot(p, 4)).collect();
        assert_eq!(slots.len(), 4);
        let mut cache = KvCache::new(2, 4, 2);
        cache.store(1, 5, &[1.0, 2.0], &[3.0, 4.0]);
        assert_eq!(cache.key(1, 1), &[1.0, 2.0], "position 5 shares slot 1 with position 1");
        assert_eq!(cache.value(1, 9), &[3.0, 4.0]);
        assert_eq!(cache.key(0, 5), &[0.0, 0.0], "layers do not share slots");
    }
}

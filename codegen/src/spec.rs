//! Kernel specs (what to generate) and kernels (what the runtime dispatches).

use serde::{Deserialize, Serialize};

use crate::manifest::QuantFormat;
use crate::target::Target;

/// A buffer of activations the runtime owns, reused by every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The residual stream, `[tokens, hidden]` f32.
    Hidden,
    /// The residual stream rounded to f16, `[tokens, hidden / 2]` f16 pairs
    /// (u32 words): what the tiled kernels normalise on targets where
    /// `tiled::f16_pairs`, written beside [`Activation::Hidden`] there by the
    /// embedding and the tiled residual adds (see ARCHITECTURE.md).
    HiddenHalf,
    /// Queries after RoPE, `[tokens, num_heads * head_dim]` f32.
    Q,
    /// Attention output, `[tokens, num_heads * head_dim]` f32; for a step of
    /// one token split over positions, row `s` holds split `s`'s output.
    Attn,
    /// Log-sum-exp of each split's scores, `[MAX_ATTENTION_SPLITS, num_heads]` f32
    /// (steps of one token split over positions only).
    AttnLse,
    /// SiLU(gate) * up, `[tokens, intermediate]` f32.
    Ffn,
    /// SiLU(gate) * up rounded to f16, `[tokens, intermediate / 2]` f16 pairs:
    /// what the tiled kernels pass instead of [`Activation::Ffn`] where
    /// `tiled::f16_pairs`.
    FfnHalf,
    /// Logits, `[rows, vocab]` f32.
    Logits,
    /// Sums of squares of the residual stream by parts of
    /// [`SUM_SQUARES_PART`] values, `[tokens, hidden / SUM_SQUARES_PART]` f32
    /// (rounded up): written beside [`Activation::Hidden`] by the tiled output
    /// projection where the plain tiled gate/up stages f16 (`tiled::f16_products`),
    /// so that gate/up divides each token's inputs by its rms before staging
    /// them; and by the tiled down projection and the embedding's batch
    /// kernel where QKV does the same (a stream of 2048 or more).
    SumSquares,
    /// Sums of squares of [`Activation::Ffn`] by parts of
    /// [`SUM_SQUARES_PART`] values, `[tokens, intermediate / SUM_SQUARES_PART]`
    /// f32 (rounded up): written beside it by the plain tiled gate/up where
    /// the down projection stages f16 (shader-f16, and a residual stream of
    /// 2048 or more), so that down stages its inputs divided by their rms.
    FfnSumSquares,
    /// Sums of squares of [`Activation::Attn`] by parts of
    /// [`SUM_SQUARES_PART`] values, `[tokens, q_dim / SUM_SQUARES_PART]` f32:
    /// written beside it by the tiled attention where the output projection
    /// stages f16 (as the down projection, and heads of a multiple of
    /// [`SUM_SQUARES_PART`] dimensions, so each part lies in one head), so
    /// that the output projection stages its inputs divided by their rms.
    AttnSumSquares,
}

/// Values per part of [`Activation::SumSquares`],
/// [`Activation::FfnSumSquares`] and [`Activation::AttnSumSquares`]: a tiled
/// kernel's outputs per tile.
pub const SUM_SQUARES_PART: usize = crate::tiled::BO as usize;

impl Activation {
    pub const ALL: [Activation; 11] = [
        Activation::Hidden,
        Activation::HiddenHalf,
        Activation::Q,
        Activation::Attn,
        Activation::AttnLse,
        Activation::Ffn,
        Activation::FfnHalf,
        Activation::Logits,
        Activation::SumSquares,
        Activation::FfnSumSquares,
        Activation::AttnSumSquares,
    ];

    /// The WGSL name of its binding (a kernel reading sums of squares by
    /// parts to normalise its input binds them as `in_ssq`).
    pub fn ident(self) -> &'static str {
        match self {
            Activation::Hidden => "hidden",
            Activation::HiddenHalf => "hidden_half",
            Activation::Q => "q",
            Activation::Attn => "attn",
            Activation::AttnLse => "lse",
            Activation::Ffn => "ffn",
            Activation::FfnHalf => "ffn_half",
            Activation::Logits => "logits",
            Activation::SumSquares => "ssq_parts",
            Activation::FfnSumSquares => "ffn_ssq_parts",
            Activation::AttnSumSquares => "attn_ssq_parts",
        }
    }
}

/// Attended positions one attention workgroup takes before a single token's
/// attention is split over more workgroups (a head alone cannot fill a GPU).
pub const ATTENTION_SPLIT_LEN: u32 = 256;
/// Workgroups one head's attention is split over at most.
pub const MAX_ATTENTION_SPLITS: u32 = 32;
/// Attention workgroups of all heads together past which splitting further
/// costs more than it spreads, where the output projection combines splits
/// on every read of its input (rows too wide for workgroup memory).
pub const SPLIT_WORKGROUPS: u32 = 256;

/// Splits per head at most for `heads` heads of `head_dim`: measured on an
/// H100 at 4000 positions, capping Llama-2-7B's 32 x 128 at 8 splits took
/// decode from 9.5 to 8.7 ms/token, while Llama-3.2-1B's 32 x 64, whose
/// combine runs once per workgroup, went from 2.3 to 2.5 ms with the same cap.
/// Either way the split weights the output projection keeps in workgroup
/// memory stay within [`SPLIT_WEIGHT_BYTES`].
pub fn split_limit(heads: usize, head_dim: usize) -> u32 {
    let heads = heads.max(1) as u32;
    let by_memory = SPLIT_WEIGHT_BYTES / (4 * heads);
    let limit = if crate::tcal::input_cached(heads as usize * head_dim) {
        MAX_ATTENTION_SPLITS
    } else {
        SPLIT_WORKGROUPS / heads
    };
    limit.min(by_memory).clamp(1, MAX_ATTENTION_SPLITS)
}

/// Workgroup memory the output projection may give the split weights (one
/// f32 per split and head), beside its cached input row: the kernel stays
/// within WebGPU's default 16 KiB.
pub const SPLIT_WEIGHT_BYTES: u32 = 4096;

/// Workgroups each head's attention is split over in `step`, at most `limit`
/// ([`split_limit`]): one for a step of several tokens (its tokens spread the
/// work), else one per [`ATTENTION_SPLIT_LEN`] attended positions. The kernels
/// compute the same in WGSL from the step uniform.
pub fn attention_splits(step: &StepUniform, limit: u32) -> u32 {
    if step.n_tokens != 1 {
        return 1;
    }
    let attended = step.pos.wrapping_add(1).min(step.ctx);
    attended.div_ceil(ATTENTION_SPLIT_LEN).clamp(1, limit.max(1))
}

/// What a binding is bound to; the runtime resolves it per plan step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// The per-step uniform ([`StepUniform`]).
    Step,
    /// Token ids of the step, `[tokens]` u32.
    Tokens,
    Activation(Activation),
    /// The step's layer's key cache, `[ctx, kv_dim]` of [`crate::tcal::kv_bytes_per_element`] bytes.
    KeyCache,
    /// The step's layer's value cache, like the key cache.
    ValueCache,
    /// A tensor part (named by the plan step): its data region followed by its
    /// scale region (see [`crate::tcal::weight_buffer_words`]); f32 vectors as is.
    Tensor,
    /// The argmax result, one u32.
    Argmax,
    /// Each workgroup's largest logit of the argmax row and its index, as
    /// `[slots]` `vec2<u32>` (f32 bits, index): what the logits kernel of a
    /// whole vocabulary leaves [`KernelSpec::ArgmaxShares`], so the argmax
    /// reads a few thousand values instead of the whole row (on the H100 a
    /// single workgroup took 16 us over Llama-3.2-1B's 128256 logits).
    ArgmaxShares,
}

/// How a kernel accesses a binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    ReadOnly,
    ReadWrite,
    Uniform,
}

/// One entry of a kernel's bind group (group 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub index: u32,
    /// The WGSL variable name.
    pub name: String,
    pub access: Access,
    pub resource: Resource,
}

/// What the second dispatch dimension counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rows {
    /// `dispatch` as is.
    One,
    /// `dispatch[1]` times the step's token count.
    Tokens,
    /// `dispatch[1]` times the number of logits rows requested.
    LogitRows,
    /// `dispatch[1]` times the tiles of this many tokens the step's tokens need.
    TokenTiles(u32),
    /// `dispatch[1]` times the tiles of this many rows the logits rows need.
    LogitRowTiles(u32),
    /// `dispatch[1]` times the token count, and `dispatch[2]` times the
    /// step's [`attention_splits`] up to `limit`.
    TokensSplits { limit: u32 },
}

/// A generated, validated compute shader and what dispatching it needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub name: String,
    #[serde(skip)]
    pub wgsl: String,
    pub entry_point: &'static str,
    pub bindings: Vec<Binding>,
    pub workgroup_size: [u32; 3],
    /// Workgroups for one row (see [`Kernel::rows`]).
    pub dispatch: [u32; 3],
    pub rows: Rows,
}

impl Kernel {
    /// The workgroup counts for `step` with `logit_rows` logits rows.
    pub fn dispatch_for(&self, step: &StepUniform, logit_rows: u32) -> [u32; 3] {
        let [x, y, z] = self.dispatch;
        let tokens = step.n_tokens;
        match self.rows {
            Rows::TokensSplits { limit } => [x, y * tokens, z * attention_splits(step, limit)],
            Rows::One => [x, y, z],
            Rows::Tokens => [x, y * tokens, z],
            Rows::LogitRows => [x, y * logit_rows, z],
            Rows::TokenTiles(tile) => [x, y * tokens.div_ceil(tile), z],
            Rows::LogitRowTiles(tile) => [x, y * logit_rows.div_ceil(tile), z],
        }
    }
}

/// The per-step values every kernel reads from its uniform binding.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepUniform {
    /// Position of the step's first token.
    pub pos: u32,
    pub n_tokens: u32,
    /// Positions the KV cache holds (its ring size).
    pub ctx: u32,
    /// First token whose logits are computed.
    pub logits_from: u32,
    /// Logits row the argmax and the sampler read.
    pub argmax_row: u32,
    /// Sampling on the device: temperature (> 0), top-k (0: all), top-p (1: all)
    /// and this step's uniform draw in `[0, 1)`.
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub sample_u: f32,
}

impl StepUniform {
    pub const SIZE: usize = 48;

    /// The uniform buffer contents (little-endian 32-bit fields, padded to 48 bytes).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        let words = [
            self.pos,
            self.n_tokens,
            self.ctx,
            self.logits_from,
            self.argmax_row,
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.sample_u.to_bits(),
        ];
        for (i, v) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// One fused operation with every dimension, weight format and target: the
/// input of generation. Equal specs give identical WGSL.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum KernelSpec {
    /// Token id -> hidden row, for the embedding part holding vocabulary rows `rows`.
    Embed { hidden: usize, rows: [usize; 2], format: QuantFormat, target: Target },
    /// RMSNorm, Q/K/V projections, RoPE, and the K/V write into the cache.
    RmsQkvRope {
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        rope_theta: f32,
        eps: f32,
        q: QuantFormat,
        k: QuantFormat,
        v: QuantFormat,
        target: Target,
    },
    /// Causal grouped-query attention over the ring-buffer cache.
    Attention { heads: usize, kv_heads: usize, head_dim: usize, target: Target },
    /// o_proj: `hidden += W attn`, the attention's position splits combined first.
    AttnOutput { heads: usize, head_dim: usize, hidden: usize, format: QuantFormat, target: Target },
    /// `hidden += W x` for the input activation `input` (down_proj).
    MatvecAdd { input: Activation, in_features: usize, out_features: usize, format: QuantFormat, target: Target },
    /// RMSNorm, gate and up projections, SiLU(gate) * up.
    RmsGateUp { hidden: usize, ffn: usize, eps: f32, gate: QuantFormat, up: QuantFormat, target: Target },
    /// Final RMSNorm and the logits of vocabulary rows `rows` (one part of the output projection).
    RmsLogits { hidden: usize, vocab: usize, rows: [usize; 2], eps: f32, format: QuantFormat, target: Target },
    /// Index of the largest logit of one row (greedy sampling on the device).
    Argmax { vocab: usize, target: Target },
    /// [`KernelSpec::Argmax`] from the `slots` shares the logits kernel of a
    /// whole vocabulary left ([`Resource::ArgmaxShares`]).
    ArgmaxShares { vocab: usize, slots: usize, target: Target },
    /// Temperature, top-k and top-p sampling of one row on the device.
    Sample { vocab: usize, target: Target },
}

impl KernelSpec {
    pub fn target(&self) -> &Target {
        match self {
            KernelSpec::Embed { target, .. }
            | KernelSpec::RmsQkvRope { target, .. }
            | KernelSpec::Attention { target, .. }
            | KernelSpec::AttnOutput { target, .. }
            | KernelSpec::MatvecAdd { target, .. }
            | KernelSpec::RmsGateUp { target, .. }
            | KernelSpec::RmsLogits { target, .. }
            | KernelSpec::Argmax { target, .. }
            | KernelSpec::ArgmaxShares { target, .. }
            | KernelSpec::Sample { target, .. } => target,
        }
    }

    /// The same kernel for another target.
    pub fn with_target(&self, other: Target) -> KernelSpec {
        let mut spec = self.clone();
        match &mut spec {
            KernelSpec::Embed { target, .. }
            | KernelSpec::RmsQkvRope { target, .. }
            | KernelSpec::Attention { target, .. }
            | KernelSpec::AttnOutput { target, .. }
            | KernelSpec::MatvecAdd { target, .. }
            | KernelSpec::RmsGateUp { target, .. }
            | KernelSpec::RmsLogits { target, .. }
            | KernelSpec::Argmax { target, .. }
            | KernelSpec::ArgmaxShares { target, .. }
            | KernelSpec::Sample { target, .. } => *target = other,
        }
        spec
    }

    /// A unique, file-name-safe name: op, dimensions, formats, target.
    pub fn name(&self) -> String {
        use crate::tcal::format_tag as f;
        let t = self.target().name();
        match self {
            KernelSpec::Embed { hidden, rows, format, .. } => {
                format!("embed-h{hidden}-r{}-{}-{}-{t}", rows[0], rows[1], f(*format))
            }
            KernelSpec::RmsQkvRope { hidden, heads, kv_heads, head_dim, rope_theta, eps, q, k, v, .. } => {
                let formats = if q == k && k == v { f(*q) } else { format!("{}-{}-{}", f(*q), f(*k), f(*v)) };
                format!(
                    "rms-qkv-rope-h{hidden}-q{heads}-kv{kv_heads}-d{head_dim}-theta{rope_theta}-eps{eps}-{formats}-{t}"
                )
            }
            KernelSpec::Attention { heads, kv_heads, head_dim, .. } => {
                format!("attention-q{heads}-kv{kv_heads}-d{head_dim}-{t}")
            }
            KernelSpec::AttnOutput { heads, head_dim, hidden, format, .. } => {
                format!("attn-output-q{heads}-d{head_dim}-h{hidden}-{}-{t}", f(*format))
            }
            KernelSpec::MatvecAdd { input, in_features, out_features, format, .. } => {
                let input = input.ident();
                format!("matvec-add-{input}-{in_features}x{out_features}-{}-{t}", f(*format))
            }
            KernelSpec::RmsGateUp { hidden, ffn, eps, gate, up, .. } => {
                let formats = if gate == up { f(*gate) } else { format!("{}-{}", f(*gate), f(*up)) };
                format!("rms-gate-up-h{hidden}-f{ffn}-eps{eps}-{formats}-{t}")
            }
            KernelSpec::RmsLogits { hidden, vocab, rows, eps, format, .. } => {
                format!("rms-logits-h{hidden}-v{vocab}-r{}-{}-eps{eps}-{}-{t}", rows[0], rows[1], f(*format))
            }
            KernelSpec::Argmax { vocab, .. } => format!("argmax-v{vocab}-{t}"),
            KernelSpec::ArgmaxShares { vocab, slots, .. } => format!("argmax-shares-v{vocab}-s{slots}-{t}"),
            KernelSpec::Sample { vocab, .. } => format!("sample-v{vocab}-{t}"),
        }
    }
}

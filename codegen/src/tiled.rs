//! Tiled matrix-matrix products: the kernels for steps of many tokens (prefill).
//!
//! A workgroup computes a tile of `BT` tokens x `BO` outputs. It walks the
//! inputs `BK` at a time: the step's input rows and the weight words
//! (dequantised by [`crate::tcal`]) are staged in workgroup memory, and every
//! invocation accumulates its 4 tokens x 4 outputs from there, so each weight
//! word is read once per `BT` tokens instead of once per token.
//!
//! Workgroup memory is written and read in whole vec4s only: an invocation
//! stages one input of four tokens, and four outputs of one input.
//!
//! An RMSNorm on the input is folded in: the norm weights scale the inputs as
//! they are staged, their sums of squares are gathered on the way, and each
//! token's outputs are scaled by 1/rms at the end (a dot product is linear).

use crate::coop::{self, CoopTiling};
use crate::target::Target;
use crate::tcal::{fill, prev_power_of_two};

/// Outputs per tile.
pub(crate) const BO: u32 = 64;
/// Inputs staged per step: a multiple of every format's inputs per word.
pub(crate) const BK: u32 = 16;

/// How a tiled kernel is laid out on a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tiling {
    /// Invocations per workgroup: `BO / 4` across outputs times `bt / 4` across tokens.
    pub wg: u32,
    /// Tokens per tile.
    pub bt: u32,
}

impl Tiling {
    pub fn for_target(target: &Target) -> Tiling {
        let wg = prev_power_of_two(target.workgroup_limit());
        Tiling { wg, bt: wg * 4 / (BO / 4) }
    }

    /// Constants, the input tile, `stage_x(t0, n, k0)` and, with `norm`,
    /// `inv_rms(ty)`; `x` is the input binding (`array<f32>`, rows of `IN`).
    pub fn prelude(&self, x: &str, norm: bool) -> String {
        // stage_x gives each invocation one (input, token quad) of the tile
        debug_assert_eq!(BK * self.bt / 4, self.wg);
        let mut s = format!(
            r#"// Tiles of BT tokens x BO outputs, inputs staged BK at a time. Invocation
// (tx, ty) owns tokens 4 ty .. 4 ty + 4 and outputs 4 tx .. 4 tx + 4 of its tile.
const WG: u32 = {wg}u;
const BT: u32 = {bt}u;
const BO: u32 = {BO}u;
const BK: u32 = {BK}u;
const TX: u32 = BO / 4u;

var<private> lid: u32;

// Staged inputs: element (t, k) is xt[k * BT / 4 + t / 4][t % 4].
var<workgroup> xt: array<vec4<f32>, BK * BT / 4u>;
"#,
            wg = self.wg,
            bt = self.bt,
        );
        if norm {
            s += NORM_SUMS;
        }
        let (square, scale) =
            if norm { ("\n    ssq += v * v;", "\n    v *= norm[min(k, IN - 1u)];") } else { ("", "") };
        s += &fill(
            &format!(
                r#"
// Stages input k0 + lid % BK of tokens t0 + 4 (lid / BK) .. + 4; zeros past n
// tokens or IN inputs.
fn stage_x(t0: u32, n: u32, k0: u32) {{
    let k = k0 + lid % BK;
    let tq = lid / BK;
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {{
        let t = t0 + 4u * tq + j;
        if (t < n && k < IN) {{
            v[j] = $X[t * IN + k];
        }}
    }}{square}{scale}
    xt[(lid % BK) * (BT / 4u) + tq] = v;
}}
"#
            ),
            &[("X", x)],
        );
        if norm {
            s += &inv_rms_function("BK");
        }
        s
    }

    /// The entry point: `setup` (which defines `t0`, the tile's first token), the accumulators
    /// `acc_<name>[4]` for each of `accs`, the input loop (`stage` staging the
    /// weights of step `k0`), then `epilogue`.
    pub fn entry(&self, setup: &str, accs: &[(&str, &str)], stage: &str, epilogue: &str) -> String {
        let mut s = String::from(
            r#"@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid_in: u32) {
    lid = lid_in;
    let n = step.n_tokens;
    let tx = lid % TX;
    let ty = lid / TX;
"#,
        );
        s += setup;
        for (acc, _) in accs {
            s += &format!("    var acc_{acc}: array<vec4<f32>, 4>;\n");
        }
        s += "    for (var k0 = 0u; k0 < IN; k0 += BK) {\n        stage_x(t0, n, k0);\n";
        s += stage;
        s += "        workgroupBarrier();\n        for (var kk = 0u; kk < BK; kk++) {\n";
        s += "            let a = xt[kk * (BT / 4u) + ty];\n";
        for (acc, tile) in accs {
            s += &format!("            let b_{acc} = {tile}[kk * (BO / 4u) + tx];\n");
            for (i, c) in ["x", "y", "z", "w"].iter().enumerate() {
                s += &format!("            acc_{acc}[{i}] += a.{c} * b_{acc};\n");
            }
        }
        s += "        }\n        workgroupBarrier();\n    }\n";
        s += epilogue;
        s += "}\n";
        s
    }
}

/// The private sums of squares `stage_x` gathers for an RMSNorm on the input.
pub(crate) const NORM_SUMS: &str =
    "// Sums of squares of the inputs this invocation staged, for its 4 tokens.\nvar<private> ssq: vec4<f32>;\n";

/// `inv_rms(ty)` of a skeleton whose `lanes` invocations (a WGSL constant)
/// stage the inputs of each token quad and keep their sums in `ssq`.
pub(crate) fn inv_rms_function(lanes: &str) -> String {
    fill(
        r#"
// 1/rms of tokens 4 ty .. 4 ty + 4 of the tile, from the sums of squares
// stage_x gathered. Reuses xt: call after the last step, from every invocation.
fn inv_rms(ty: u32) -> vec4<f32> {
    workgroupBarrier();
    xt[(lid % $L) * (BT / 4u) + lid / $L] = ssq;
    workgroupBarrier();
    var ss = vec4<f32>(0.0);
    for (var kk = 0u; kk < $L; kk++) {
        ss += xt[kk * (BT / 4u) + ty];
    }
    return inverseSqrt(ss / f32(IN) + EPS);
}
"#,
        &[("L", lanes)],
    )
}

/// A weight tile in workgroup memory.
pub(crate) fn weight_tile(name: &str) -> String {
    format!("\n// A weight tile: element (k, c) is {name}[k * BO / 4 + c / 4][c % 4].\nvar<workgroup> {name}: array<vec4<f32>, BK * BO / 4u>;\n")
}

/// Stages step `k0` of matrix `w` (read by quads, [`crate::tcal::TileRead::Quad`])
/// into `tile`: column `c` holds output `o0 + c`.
pub(crate) fn stage_weights(w: &str, tile: &str) -> String {
    fill(
        r#"        for (var i = lid; i < (BO / 4u) * BK; i += WG) {
            let q = i % (BO / 4u);
            let kk = i / (BO / 4u);
            $T[kk * (BO / 4u) + q] = $W_at(o0 + 4u * q, k0 + kk);
        }
"#,
        &[("W", w), ("T", tile)],
    )
}

/// The epilogue run for each of the invocation's 4 tokens `t` (skipping tokens
/// past `n`), with `$I` its index; `body` reads `acc_<name>[$I]`.
pub(crate) fn per_token(token: &str, body: &str) -> String {
    (0..4)
        .map(|i| {
            let text = format!(
                "    {{\n        let t = {token} + 4u * ty + {i}u;\n        if (t < n) {{\n{body}        }}\n    }}\n"
            );
            text.replace("$I", &i.to_string())
        })
        .collect()
}

/// The skeleton a tiled kernel is built on: [`Tiling`], or the cooperative-matrix
/// one ([`crate::coop`]) where the target has them. The one place that picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Skeleton {
    Plain(Tiling),
    Coop(CoopTiling),
}

/// Outputs from which a tiled kernel keeps the plain skeleton on a target with
/// cooperative matrices. Measured on the H100 (prefill of 512 tokens): with
/// few output tiles the plain kernel leaves SMs idle and the coop one is faster
/// (SmolLM2, at most 1536 outputs: 22k to 27k tokens/s); with many, the plain
/// kernel's register tiles beat the coop kernel, whose f16 staging outweighs
/// its products (Llama-2-7B F16: 16.6 TFLOP/s plain, 13.7 coop).
pub(crate) const COOP_MAX_OUTPUTS: usize = 2048;

impl Skeleton {
    /// The skeleton of a tiled kernel of `outputs` outputs on `target`.
    pub fn for_kernel(target: &Target, outputs: usize) -> Skeleton {
        if target.uses_coop() && outputs < COOP_MAX_OUTPUTS {
            Skeleton::Coop(CoopTiling)
        } else {
            Skeleton::Plain(Tiling::for_target(target))
        }
    }

    /// Invocations per workgroup.
    pub fn wg(&self) -> u32 {
        match self {
            Skeleton::Plain(t) => t.wg,
            Skeleton::Coop(c) => c.wg(),
        }
    }

    /// Tokens per tile.
    pub fn bt(&self) -> u32 {
        match self {
            Skeleton::Plain(t) => t.bt,
            Skeleton::Coop(c) => c.bt(),
        }
    }

    /// See [`Tiling::prelude`].
    pub fn prelude(&self, x: &str, norm: bool) -> String {
        match self {
            Skeleton::Plain(t) => t.prelude(x, norm),
            Skeleton::Coop(c) => c.prelude(x, norm),
        }
    }

    /// See [`Tiling::entry`].
    pub fn entry(&self, setup: &str, accs: &[(&str, &str)], stage: &str, epilogue: &str) -> String {
        match self {
            Skeleton::Plain(t) => t.entry(setup, accs, stage, epilogue),
            Skeleton::Coop(c) => c.entry(setup, accs, stage, epilogue),
        }
    }

    /// A weight tile named `name` in workgroup memory.
    pub fn weight_tile(&self, name: &str) -> String {
        match self {
            Skeleton::Plain(_) => weight_tile(name),
            Skeleton::Coop(_) => coop::weight_tile(name),
        }
    }

    /// Stages step `k0` of matrix `w` (read by quads) into `tile`.
    pub fn stage_weights(&self, w: &str, tile: &str) -> String {
        match self {
            Skeleton::Plain(_) => stage_weights(w, tile),
            Skeleton::Coop(_) => coop::stage_weights(w, tile),
        }
    }

    /// The statement storing `v` (a vec4<f32>) as outputs 4 q .. 4 q + 4 of input
    /// `kk` of the step into `tile`.
    pub fn store(&self, tile: &str, kk: &str, q: &str, v: &str) -> String {
        match self {
            Skeleton::Plain(_) => format!("{tile}[{kk} * (BO / 4u) + {q}] = {v};"),
            Skeleton::Coop(_) => format!("store_{tile}({kk}, {q}, {v});"),
        }
    }
}

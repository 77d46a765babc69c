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
//! Both skeletons run the same pipelined input loop ([`pipelined_steps`]):
//! each step's loads from device memory go into registers before the
//! products of the step before, and into workgroup memory after them, so the
//! loads' latency is spent on products instead of waiting.
//!
//! An RMSNorm on the input is folded in: the norm weights scale the inputs as
//! they are staged, their sums of squares are gathered on the way, and each
//! token's outputs are scaled by 1/rms at the end (a dot product is linear).

use crate::coop::{self, CoopTiling};
use crate::target::Target;
use crate::tcal::{fill, indent, prev_power_of_two};

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

    /// Weight quads each invocation stages per tile.
    pub fn stage_iters(&self) -> u32 {
        (BO / 4) * BK / self.wg
    }

    /// Constants, the input tile, `load_x(t0, n, k0)`, `store_x()` and, with `norm`,
    /// `inv_rms(ty)`; `x` is the input binding (`array<f32>`, rows of `IN`).
    pub fn prelude(&self, x: &str, norm: bool) -> String {
        // load_x gives each invocation one (input, token quad) of the tile
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
        let (square, scale_load, scale) =
            if norm { ("\n    ssq += px * px;", "    nk = norm[min(k, IN - 1u)];\n", " * nk") } else { ("", "", "") };
        if norm {
            s += "// The norm weight of the input in flight.\nvar<private> nk: f32;\n";
        }
        // unrolled: a runtime index into px would move it out of registers
        let loads: String = ["x", "y", "z", "w"]
            .iter()
            .enumerate()
            .map(|(j, c)| {
                format!("    if (t0 + 4u * tq + {j}u < n && k < IN) {{\n        px.{c} = $X[(t0 + 4u * tq + {j}u) * IN + k];\n    }}\n")
            })
            .collect();
        s += &fill(
            &format!(
                r#"// The next step's inputs in flight: input lid % BK of 4 tokens.
var<private> px: vec4<f32>;

// Loads input k0 + lid % BK of tokens t0 + 4 (lid / BK) .. + 4 into px; zeros
// past n tokens or IN inputs.
fn load_x(t0: u32, n: u32, k0: u32) {{
    let k = k0 + lid % BK;
    let tq = lid / BK;
    px = vec4<f32>(0.0);
{loads}{scale_load}}}

// Stores px into the input tile (the loads' first use).
fn store_x() {{{square}
    xt[(lid % BK) * (BT / 4u) + lid / BK] = px{scale};
}}
"#
            ),
            &[("X", x)],
        );
        if norm {
            s += INV_RMS;
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
        let flush: String = accs
            .iter()
            .map(|(_, tile)| {
                stage_quads(self.stage_iters(), &format!("            {tile}[kk * (BO / 4u) + q] = pre_{tile}_$IT;\n"))
            })
            .collect();
        let mut products = String::from("        for (var kk = 0u; kk < BK; kk++) {\n");
        products += "            let a = xt[kk * (BT / 4u) + ty];\n";
        for (acc, tile) in accs {
            products += &format!("            let b_{acc} = {tile}[kk * (BO / 4u) + tx];\n");
            for (i, c) in ["x", "y", "z", "w"].iter().enumerate() {
                products += &format!("            acc_{acc}[{i}] += a.{c} * b_{acc};\n");
            }
        }
        products += "        }\n";
        s += &pipelined_steps(stage, &flush, &products);
        s += epilogue;
        s += "}\n";
        s
    }
}

/// The input loop of a tiled kernel: step 0 staged, then for each step the
/// next step's loads (`load_x` and `stage`, into registers) issued before
/// this step's `products`, and stored (`store_x` and `flush`) into workgroup
/// memory between two barriers after them.
pub(crate) fn pipelined_steps(stage: &str, flush: &str, products: &str) -> String {
    let mut s = String::from("    // step 0\n    {\n        let k0 = 0u;\n        load_x(t0, n, k0);\n");
    s += stage;
    s += "        store_x();\n";
    s += flush;
    s += "    }\n    workgroupBarrier();\n";
    s += "    for (var ks = 0u; ks < IN; ks += BK) {\n";
    s += "        let more = ks + BK < IN;\n";
    s += "        // the next step's loads, in flight during this step's products\n";
    s += "        if (more) {\n            let k0 = ks + BK;\n            load_x(t0, n, k0);\n";
    s += &indent(stage, 4);
    s += "        }\n";
    s += products;
    s += "        workgroupBarrier();\n        if (more) {\n            store_x();\n";
    s += &indent(flush, 4);
    s += "        }\n        workgroupBarrier();\n    }\n";
    s
}

/// The statement keeping `v` (a vec4<f32>, outputs 4 q .. 4 q + 4 of input kk
/// of the next step) in the registers of `tile` until it is stored; inside a
/// [`stage_quads`] body.
pub(crate) fn keep(tile: &str, v: &str) -> String {
    format!("pre_{tile}_$IT = {v};")
}

/// The private sums of squares `store_x` gathers for an RMSNorm on the input.
const NORM_SUMS: &str =
    "// Sums of squares of the inputs this invocation staged, for its 4 tokens.\nvar<private> ssq: vec4<f32>;\n";

/// `inv_rms(ty)` of the plain skeleton: the BK invocations staging each token
/// quad keep their sums in `ssq`.
const INV_RMS: &str = r#"
// 1/rms of tokens 4 ty .. 4 ty + 4 of the tile, from the sums of squares
// store_x gathered. Reuses xt: call after the last step, from every invocation.
fn inv_rms(ty: u32) -> vec4<f32> {
    workgroupBarrier();
    xt[(lid % BK) * (BT / 4u) + lid / BK] = ssq;
    workgroupBarrier();
    var ss = vec4<f32>(0.0);
    for (var kk = 0u; kk < BK; kk++) {
        ss += xt[kk * (BT / 4u) + ty];
    }
    return inverseSqrt(ss / f32(IN) + EPS);
}
"#;

/// A weight tile in workgroup memory, and the registers `pre_<name>_<it>`
/// the next step's `iters` quads wait in.
pub(crate) fn weight_tile(name: &str, iters: u32) -> String {
    format!(
        "\n// A weight tile: element (k, c) is {name}[k * BO / 4 + c / 4][c % 4].\nvar<workgroup> {name}: array<vec4<f32>, BK * BO / 4u>;\n{}",
        registers(name, iters)
    )
}

/// The registers `pre_<tile>_<it>` the next step's `iters` quads of a weight
/// tile wait in (separate variables: an indexed private array may live in
/// slow local memory).
pub(crate) fn registers(tile: &str, iters: u32) -> String {
    (0..iters).map(|it| format!("var<private> pre_{tile}_{it}: vec4<f32>;\n")).collect()
}

/// The `iters` weight quads an invocation stages per tile, unrolled: each a
/// block defining `i`, the quad `q` and the input `kk` of the step around
/// `body`, where `$IT` is the iteration (so registers named by it stay
/// registers).
pub(crate) fn stage_quads(iters: u32, body: &str) -> String {
    (0..iters)
        .map(|it| {
            format!(
                "        {{\n            let i = lid + {it}u * WG;\n            let q = i % (BO / 4u);\n            let kk = i / (BO / 4u);\n{}        }}\n",
                body.replace("$IT", &it.to_string())
            )
        })
        .collect()
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

impl Skeleton {
    /// The skeleton of a tiled kernel on `target`. Measured on the H100
    /// (prefill of 512 tokens), the coop kernels beat the plain ones at every
    /// model size: Llama-2-7B F16 53 TFLOP/s against 20, SmolLM2 INT4 51k
    /// tokens/s against 29k.
    pub fn for_target(target: &Target) -> Skeleton {
        if target.uses_coop() {
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

    /// Weight quads each invocation stages per tile.
    pub fn stage_iters(&self) -> u32 {
        match self {
            Skeleton::Plain(t) => t.stage_iters(),
            Skeleton::Coop(_) => coop::STAGE_ITERS,
        }
    }

    /// A weight tile named `name` in workgroup memory, with its registers.
    pub fn weight_tile(&self, name: &str) -> String {
        match self {
            Skeleton::Plain(t) => weight_tile(name, t.stage_iters()),
            Skeleton::Coop(_) => coop::weight_tile(name),
        }
    }

    /// Loads step `k0` of matrix `w` (read by quads, [`crate::tcal::TileRead::Quad`])
    /// into the registers of `tile`: column `c` holds output `o0 + c`.
    pub fn stage_weights(&self, w: &str, tile: &str) -> String {
        self.stage_quads(&format!("            {}\n", keep(tile, &format!("{w}_at(o0 + 4u * q, k0 + kk)"))))
    }

    /// The weight quads an invocation stages per tile around `body`: see [`stage_quads`].
    pub fn stage_quads(&self, body: &str) -> String {
        stage_quads(self.stage_iters(), body)
    }
}

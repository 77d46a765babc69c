//! Tiled matrix-matrix products on cooperative matrices (tensor cores): the
//! skeleton of [`crate::tiled`] with the inner product done by
//! `coopMultiplyAdd` over 16 x 16 sub-tiles.
//!
//! A workgroup of 256 invocations (8 subgroups of 32) computes the same tile
//! as the plain skeleton, 64 tokens x 64 outputs. The tile is a 4 x 4 grid
//! of 16 x 16 sub-tiles; subgroup `g` owns token block `g / 2` and output
//! blocks `2 (g % 2)` and `2 (g % 2) + 1` (one A sub-tile shared by two
//! products). It walks the inputs `BK` = 32 at a time: the input rows and the
//! dequantised weights (through [`crate::tcal`], every weight format) are
//! staged in workgroup memory as f16, and each subgroup accumulates its two
//! sub-tiles per matrix in f32 cooperative matrices.
//!
//! At the end the accumulators are stored to workgroup memory, half the tile
//! (32 tokens) at a time, and each invocation (tx, ty) loads its 4 tokens x 4
//! outputs into `acc_<name>: array<vec4<f32>, 4>`, the layout the plain
//! skeleton leaves, so the epilogues of [`crate::ops`] are shared.
//!
//! Precision: inputs and weights are rounded to f16 when staged (11-bit
//! significands; values past 65504 overflow), products are accumulated in f32.
//! The RMSNorm is folded in as in the plain skeleton: the f16 inputs are
//! `x * norm` before normalisation, the sums of squares are gathered in f32
//! from the unrounded inputs, and the outputs are scaled by 1/rms at the end.
//!
//! Measured on the H100 (prefill of 512 tokens), these kernels reach 11 to 19
//! TFLOP/s: staging, not the products, bounds them. Tiles of 128 tokens x 128
//! outputs (each subgroup a 2 x 4 block of sub-tiles) with weights staged a
//! packed word at a time were tried and were slower: Llama-2-7B F16 14.6
//! TFLOP/s against 16.7 for the plain kernels, and the word staging took
//! SmolLM2's 64-wide coop prefill from 27.5k to 23.4k tokens/s.
//!
//! The sub-tile ownership assumes subgroups of exactly
//! [`crate::target::COOP_SUBGROUP_SIZE`] invocations: the runtime enables
//! cooperative matrices only on such adapters.

use crate::tcal::fill;
use crate::tiled::{inv_rms_function, BO, NORM_SUMS};

/// Invocations per workgroup.
const WG: u32 = 256;
/// Tokens per tile.
const BT: u32 = 64;
/// Inputs staged per step: two 16-deep products per barrier pair, and a
/// multiple of every format's inputs per word.
const BK: u32 = 32;
/// Row strides (in elements) of the staged tiles, padded by 16 bytes so the
/// rows of a sub-tile fall in different banks; each a multiple of 16 bytes,
/// as cooperative loads and stores require.
const XS: u32 = BK + 8;
const WS: u32 = BO + 8;
const CS: u32 = BO + 4;

/// Workgroup memory of a coop kernel with `tiles` weight tiles, in bytes: the
/// f16 input tile, the f16 weight tiles, the f32 store of half the
/// accumulators, and `xt` (the vec4 scratch of the epilogues and `inv_rms`).
pub(crate) const fn workgroup_bytes(tiles: u32) -> u32 {
    BT * XS * 2 + tiles * BK * WS * 2 + (BT / 2) * CS * 4 + WG * 16
}

/// How a tiled kernel is laid out with cooperative matrices; the same
/// interface as [`crate::tiled::Tiling`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CoopTiling;

impl CoopTiling {
    pub fn wg(&self) -> u32 {
        WG
    }

    pub fn bt(&self) -> u32 {
        BT
    }

    /// Constants, the input tile, `stage_x(t0, n, k0)`, the accumulator store
    /// and, with `norm`, `inv_rms(ty)`; `x` is the input binding (`array<f32>`, rows of `IN`).
    pub fn prelude(&self, x: &str, norm: bool) -> String {
        let mut s = format!(
            r#"// Tiles of BT tokens x BO outputs, inputs staged BK at a time as f16 and
// multiplied on 16 x 16 cooperative matrices (f32 accumulators). Subgroup g
// owns token block g / 2 and output blocks 2 (g % 2) .. + 2 of the tile;
// invocation (tx, ty) then takes tokens 4 ty .. 4 ty + 4 and outputs
// 4 tx .. 4 tx + 4 of its tile out of the accumulators.
const WG: u32 = {WG}u;
const BT: u32 = {BT}u;
const BO: u32 = {BO}u;
const BK: u32 = {BK}u;
const TX: u32 = BO / 4u;
// Row strides of the staged tiles (padded against bank conflicts).
const XS: u32 = {XS}u;
const WS: u32 = {WS}u;
const CS: u32 = {CS}u;
// Invocations staging each token quad: 2 inputs each per step.
const KQ: u32 = WG / (BT / 4u);

var<private> lid: u32;

// Staged inputs, row-major by token: element (t, k) is xh[t * XS + k].
var<workgroup> xh: array<f16, BT * XS>;
// Half the tile's accumulators (32 tokens x BO outputs, row-major by token).
var<workgroup> cs: array<f32, (BT / 2u) * CS>;
// Scratch of vec4s, one per invocation: the epilogues' exchanges and inv_rms.
var<workgroup> xt: array<vec4<f32>, WG>;
"#
        );
        if norm {
            s += NORM_SUMS;
        }
        let (square, scale) =
            if norm { ("\n        ssq += v * v;", "\n        v *= norm[min(k, IN - 1u)];") } else { ("", "") };
        s += &fill(
            &format!(
                r#"
// Stages inputs k0 + 2 (lid % KQ) .. + 2 of tokens t0 + 4 (lid / KQ) .. + 4
// as f16; zeros past n tokens or IN inputs.
fn stage_x(t0: u32, n: u32, k0: u32) {{
    let tq = lid / KQ;
    for (var e = 0u; e < 2u; e++) {{
        let kl = 2u * (lid % KQ) + e;
        let k = k0 + kl;
        var v = vec4<f32>(0.0);
        for (var j = 0u; j < 4u; j++) {{
            let t = t0 + 4u * tq + j;
            if (t < n && k < IN) {{
                v[j] = $X[t * IN + k];
            }}
        }}{square}{scale}
        for (var j = 0u; j < 4u; j++) {{
            xh[(4u * tq + j) * XS + kl] = f16(v[j]);
        }}
    }}
}}

// Outputs 4 q .. 4 q + 4 of row r of the accumulator store.
fn c_quad(r: u32, q: u32) -> vec4<f32> {{
    let i = r * CS + 4u * q;
    return vec4<f32>(cs[i], cs[i + 1u], cs[i + 2u], cs[i + 3u]);
}}
"#
            ),
            &[("X", x)],
        );
        if norm {
            s += &inv_rms_function("KQ");
        }
        s
    }

    /// The entry point, as [`crate::tiled::Tiling::entry`]: `setup` defines `t0`,
    /// `accs` are (name, weight tile) pairs, `stage` stages the weights of
    /// step `k0`, and `epilogue` reads `acc_<name>[i][j]`.
    pub fn entry(&self, setup: &str, accs: &[(&str, &str)], stage: &str, epilogue: &str) -> String {
        let mut s = String::from(
            r#"@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid_in: u32,
    @builtin(subgroup_id) sg_in: u32
) {
    lid = lid_in;
    let n = step.n_tokens;
    let tx = lid % TX;
    let ty = lid / TX;
    // this subgroup's sub-tiles: tokens 16 tb .. 16 tb + 16, outputs 16 ob .. 16 ob + 32
    let tb = sg_in / 2u;
    let ob = 2u * (sg_in % 2u);
"#,
        );
        s += setup;
        for (acc, _) in accs {
            s += &format!("    var acc_{acc}: array<vec4<f32>, 4>;\n");
            for h in 0..2 {
                s += &format!("    var c_{acc}{h} = coop_mat16x16<f32, C>();\n");
            }
        }
        s += "    for (var k0 = 0u; k0 < IN; k0 += BK) {\n        stage_x(t0, n, k0);\n";
        s += stage;
        s += "        workgroupBarrier();\n        for (var kk = 0u; kk < BK; kk += 16u) {\n";
        s += "            let a = coopLoadT<coop_mat16x16<f16, A>>(&xh[16u * tb * XS + kk], XS);\n";
        for (acc, tile) in accs {
            for h in 0..2 {
                s += &format!(
                    "            c_{acc}{h} = coopMultiplyAdd(a, coopLoadT<coop_mat16x16<f16, B>>(&{tile}[kk * WS + 16u * (ob + {h}u)], WS), c_{acc}{h});\n"
                );
            }
        }
        s += "        }\n        workgroupBarrier();\n    }\n";
        s += "    // the accumulators to (tx, ty) order, through workgroup memory half a tile at a time\n";
        for (acc, _) in accs {
            for half in 0..2 {
                s += &format!("    if (tb / 2u == {half}u) {{\n");
                for h in 0..2 {
                    s += &format!(
                        "        coopStoreT(c_{acc}{h}, &cs[16u * (tb % 2u) * CS + 16u * (ob + {h}u)], CS);\n"
                    );
                }
                s += "    }\n    workgroupBarrier();\n";
                s += &format!("    if (ty / 8u == {half}u) {{\n");
                for i in 0..4 {
                    s += &format!("        acc_{acc}[{i}] = c_quad(4u * (ty % 8u) + {i}u, tx);\n");
                }
                s += "    }\n    workgroupBarrier();\n";
            }
        }
        s += epilogue;
        s += "}\n";
        s
    }
}

/// A weight tile in workgroup memory, f16, and `store_<name>(kk, q, v)`, which
/// writes outputs 4 q .. 4 q + 4 of input kk.
pub(crate) fn weight_tile(name: &str) -> String {
    fill(
        r#"
// A weight tile, row-major by input: element (k, c) is $T[k * WS + c].
var<workgroup> $T: array<f16, BK * WS>;

fn store_$T(kk: u32, q: u32, v: vec4<f32>) {
    let i = kk * WS + 4u * q;
    $T[i] = f16(v.x);
    $T[i + 1u] = f16(v.y);
    $T[i + 2u] = f16(v.z);
    $T[i + 3u] = f16(v.w);
}
"#,
        &[("T", name)],
    )
}

/// Stages step `k0` of matrix `w` (read by quads) into `tile`: column `c`
/// holds output `o0 + c`.
pub(crate) fn stage_weights(w: &str, tile: &str) -> String {
    fill(
        r#"        for (var i = lid; i < (BO / 4u) * BK; i += WG) {
            let q = i % (BO / 4u);
            let kk = i / (BO / 4u);
            store_$T(kk, q, $W_at(o0 + 4u * q, k0 + kk));
        }
"#,
        &[("W", w), ("T", tile)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_keep_cooperative_accesses_16_byte_aligned() {
        for (stride, bytes) in [(XS, 2), (WS, 2), (CS, 4)] {
            assert_eq!(stride * bytes % 16, 0);
        }
        // every sub-tile origin: 16 rows and 16 columns apart
        assert_eq!(16 * 2 % 16, 0);
        assert_eq!(BK % 16, 0);
        // 8 subgroups of 32 cover the 16 sub-tiles, two each
        assert_eq!(WG / crate::target::COOP_SUBGROUP_SIZE * 2, (BT / 16) * (BO / 16));
        // stage_x: KQ invocations per token quad, 2 inputs each
        assert_eq!(WG / (BT / 4) * 2, BK);
        assert_eq!(workgroup_bytes(2), crate::target::COOP_WORKGROUP_BYTES);
    }
}

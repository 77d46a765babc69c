//! Tiled matrix-matrix products on cooperative matrices (tensor cores): the
//! skeleton of [`crate::tiled`] with the inner product done by
//! `coopMultiplyAdd` over 16 x 16 sub-tiles.
//!
//! A workgroup of 512 invocations (16 subgroups of 32) computes a tile of 128
//! tokens x 64 outputs, twice the plain skeleton's tokens, so each staged
//! weight serves twice as many products. The tile is an 8 x 4 grid of
//! 16 x 16 sub-tiles; subgroup `g` owns token block `g / 2` and output
//! blocks `2 (g % 2)` and `2 (g % 2) + 1` (one A sub-tile shared by two
//! products). It walks the inputs `BK` = 64 at a time: the input rows and the
//! dequantised weights (through [`crate::tcal`], every weight format) are
//! staged in workgroup memory as f16, and each subgroup accumulates its two
//! sub-tiles per matrix in f32 cooperative matrices.
//!
//! At the end the accumulators are stored to workgroup memory, 32 tokens at a
//! time, and each invocation (tx, ty) loads its 4 tokens x 4 outputs into
//! `acc_<name>: array<vec4<f32>, 4>`, the accumulators of the plain skeleton
//! with one token quad (with `ty` over 32 token quads instead of 16), so the
//! epilogues of [`crate::ops`] are shared: they reach other invocations only
//! through `tile_lid(x, y)`, which each skeleton defines for its own layout.
//!
//! Precision: inputs and weights are rounded to f16 when staged (11-bit
//! significands; values past 65504 overflow), products are accumulated in f32.
//! The RMSNorm is folded in as in the plain skeleton: the f16 inputs are
//! `x * norm` before normalisation, the sums of squares are gathered in f32,
//! and the outputs are scaled by 1/rms at the end. The residual stream a kernel
//! normalises is read from its f16 copy ([`crate::tiled::f16_pairs`]): `x`
//! rounded once more (clamped to f16's range), and the sums of squares of the
//! rounded values. Read as
//! f32, its 16 inputs in flight and 16 sums per invocation left gate/up at 846
//! us a layer (Llama-2-7B F16 on the H100), 694 as pairs (QKV 558 to 485).
//!
//! The input loop is [`crate::tiled::pipelined_steps`]: each step's loads
//! from device memory wait in registers (separate variables, loops unrolled
//! here) while the subgroups multiply the step before, with one buffer of
//! each tile in workgroup memory. The weights wait as the packed words they
//! were loaded as ([`stage_words`]): dequantised at load time, they made each
//! step wait for its loads before the products. Each invocation stages one
//! input pair of each weight tile from a single load of its words.
//!
//! Measured on the H100 (prefill of 512 tokens, Llama-2-7B F16, GPU time a
//! layer), from 32 inputs a step with a quad per invocation dequantised at
//! load time: gate/up 1516 to 1025 us with pairs from one load of words,
//! to 952 with workgroups ordered token tile first, 874 with the words
//! dequantised only when stored and 855 with 64 inputs a step; QKV 904 to
//! 702 with one input loop per matrix (a choice of matrix inside each step
//! had cost 100 us) and 561 with 64 inputs a step (all told 106 to 72 ms,
//! 64 to 94 TFLOP/s). Earlier, with tiles of 64 tokens and 256 invocations:
//! 13.8 TFLOP/s with the loads exposed, 36.8 with them pipelined; two
//! buffers per tile (one barrier a step, 41 KB of workgroup memory) reached
//! only 21.6, and 64 inputs a step 22.4, both with fewer workgroups
//! resident; 16 inputs a step 33.8. Tiles of 128 tokens on 256 invocations
//! (four sub-tiles a subgroup) sped up the one-matrix kernels of Llama-2-7B
//! (down 42.6 to 69.2 TFLOP/s) but slowed gate/up (45.6 to 40.9) and every
//! kernel of Llama-3.2-1B.
//!
//! The residual projections and QKV of 4096 outputs or more take two tiles
//! of one matrix per workgroup (128 outputs), on both skeletons, where the
//! matrices divide into such pairs (`WIDE_TILES_MIN_OUT` in [`crate::ops`]).
//! Here QKV's epilogue trades RoPE partners through the accumulator store
//! ([`EXCHANGE`]) rather than scratch of its own, which two weight tiles
//! would not leave room for.
//!
//! The sub-tile ownership assumes subgroups of exactly
//! [`crate::target::COOP_SUBGROUP_SIZE`] invocations: the runtime enables
//! cooperative matrices only on such adapters.

use crate::tcal::fill;
use crate::tcal::indent;
use crate::tiled::{registers, select_chain, Staging, TileSource, BO, TILE_IDS};

/// Invocations per workgroup: two subgroups per 16 tokens.
pub(crate) const WG: u32 = 4 * BT;
/// Tokens per tile.
const BT: u32 = 128;
/// Inputs staged per step: a multiple of 32 (two 16-deep products, and of
/// every format's inputs per word), and one input pair of each weight tile
/// per invocation. `load_x` gives invocation `lid` input `lid % BK` of tokens
/// `lid / BK + (WG / BK) j` (f16 pairs: pair `lid % (BK / 2)` of tokens
/// `lid / (BK / 2) + (WG / (BK / 2)) j`), so a subgroup's loads of a token row
/// are one contiguous run.
pub(crate) const BK: u32 = 64;
/// Row strides (in elements) of the staged tiles, padded by 16 bytes so the
/// rows of a sub-tile fall in different banks; each a multiple of 16 bytes,
/// as cooperative loads and stores require.
const XS: u32 = BK + 8;
const WS: u32 = BO + 8;
const CS: u32 = BO + 4;
/// Tokens whose per-lane sums of squares `inv_rms` gathers in `cs` at a time.
const SSQ_TOKENS: u32 = 32;

/// Workgroup memory of a coop kernel with `tiles` weight tiles, in bytes: the
/// f16 input tile and weight tiles and the f32 store of 32 tokens of the
/// accumulators.
pub(crate) const fn workgroup_bytes(tiles: u32) -> u32 {
    BT * XS * 2 + tiles * BK * WS * 2 + 32 * CS * 4
}

/// [`crate::tiled::Skeleton::exchange`]: through the accumulator store, a
/// vec4 per invocation, component j of invocation i at `cs[j * WG + i]`.
pub(crate) const EXCHANGE: &str = r#"// Trades v with invocation `partner` through the accumulator store.
fn exchange(v: vec4<f32>, partner: u32) -> vec4<f32> {
    workgroupBarrier();
    for (var j = 0u; j < 4u; j++) {
        cs[j * WG + lid] = v[j];
    }
    workgroupBarrier();
    var o = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        o[j] = cs[j * WG + partner];
    }
    return o;
}

"#;

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

    /// Constants, the input tile, `load_x(t0, n, k0)` and `store_x()`, the
    /// accumulator store and, with `norm`, `inv_rms(ty)`; `x` is the input
    /// binding: rows of `IN` f32 (`array<f32>`), or with `half` rows of `IN / 2`
    /// f16 pairs (`array<u32>`, `IN` even).
    pub fn prelude(&self, x: &str, norm: bool, half: bool) -> String {
        let mut s = format!(
            r#"// Tiles of BT tokens x BO outputs, inputs staged BK at a time as f16 and
// multiplied on 16 x 16 cooperative matrices (f32 accumulators). Subgroup g
// owns token block g / 2 and output blocks 2 (g % 2) .. + 2 of the tile;
// invocation (tx, ty) then takes tokens 4 ty .. 4 ty + 4 and outputs
// 4 tx .. 4 tx + 4 of its tile out of the accumulators. Each step's loads
// from device memory are issued before the products of the step before and
// stored after them.
const WG: u32 = {WG}u;
const BT: u32 = {BT}u;
const BO: u32 = {BO}u;
const BK: u32 = {BK}u;
const TX: u32 = BO / 4u;
// Row strides of the staged tiles (padded against bank conflicts).
const XS: u32 = {XS}u;
const WS: u32 = {WS}u;
const CS: u32 = {CS}u;
var<private> lid: u32;

// The local index of invocation (x, y).
fn tile_lid(x: u32, y: u32) -> u32 {{
    return y * TX + x;
}}

// Staged inputs, row-major by token: element (t, k) is xh[t * XS + k].
var<workgroup> xh: array<f16, BT * XS>;
// 32 tokens of the tile's accumulators (x BO outputs, row-major by token).
var<workgroup> cs: array<f32, 32u * CS>;
"#
        );
        // Registers are separate variables and loops over them are unrolled
        // here: an indexed private array may live in slow local memory.
        // Invocation lid stages lane lid % lanes (an input, or an input pair
        // of one f16 word) of the token rows lid / lanes + (WG / lanes) j.
        let lanes = if half { BK / 2 } else { BK };
        let rows: Vec<u32> = (0..BT * lanes / WG).collect();
        let row = |j: u32| format!("lid / {lanes}u + {}u", j * (WG / lanes));
        let (reg, ty, zero, len, at) =
            if half { ("pw", "u32", "0u", "(IN / 2u)", "kw") } else { ("px", "f32", "0.0", "IN", "k") };
        s += &format!("// The next step's inputs in flight: {reg}_j holds token lid / {lanes} + {} j.\n", WG / lanes);
        for j in &rows {
            s += &format!("var<private> {reg}_{j}: {ty};\n");
        }
        if norm {
            s += "// Sums of squares of the inputs this invocation staged, per token row,\n// and the norm weights of its inputs in flight.\n";
            for j in &rows {
                s += &format!("var<private> ssq_{j}: f32;\n");
            }
            s += if half { "var<private> nk: vec2<f32>;\n" } else { "var<private> nk: f32;\n" };
        }
        let mut load =
            if half { "    let kw = k0 / 2u + lid % (BK / 2u);\n" } else { "    let k = k0 + lid % BK;\n" }.to_string();
        let mut store = if half { "    let c = 2u * (lid % (BK / 2u));\n" } else { "" }.to_string();
        for &j in &rows {
            let r = row(j);
            load += &format!(
                "    {reg}_{j} = {zero};\n    if (t0 + {r} < n && {at} < {len}) {{\n        {reg}_{j} = $X[(t0 + {r}) * {len} + {at}];\n    }}\n"
            );
            if half && norm {
                store += &format!(
                    "    {{\n        let v = unpack2x16float(pw_{j});\n        ssq_{j} += dot(v, v);\n        xh[({r}) * XS + c] = f16(v.x * nk.x);\n        xh[({r}) * XS + c + 1u] = f16(v.y * nk.y);\n    }}\n"
                );
            } else if half {
                store += &format!(
                    "    {{\n        let v = unpack2x16float(pw_{j});\n        xh[({r}) * XS + c] = f16(v.x);\n        xh[({r}) * XS + c + 1u] = f16(v.y);\n    }}\n"
                );
            } else if norm {
                store +=
                    &format!("    ssq_{j} += px_{j} * px_{j};\n    xh[({r}) * XS + lid % BK] = f16(px_{j} * nk);\n");
            } else {
                store += &format!("    xh[({r}) * XS + lid % BK] = f16(px_{j});\n");
            }
        }
        if half && norm {
            load += "    nk = vec2<f32>(norm[min(2u * kw, IN - 1u)], norm[min(2u * kw + 1u, IN - 1u)]);\n";
        } else if norm {
            load += "    nk = norm[min(k, IN - 1u)];\n";
        }
        let what = if half { "input pair k0 / 2 + lid % (BK / 2) (one f16 word)" } else { "input k0 + lid % BK" };
        s += &fill(
            &format!(
                r#"
// Loads {what} of the tile's tokens
// lid / {lanes} + {step} j into {reg}_j; zeros past n tokens or IN inputs.
fn load_x(t0: u32, n: u32, k0: u32) {{
{load}}}

// Stores the {reg}_j into the input tile as f16 (the loads' first use).
fn store_x() {{
{store}}}

// Outputs 4 q .. 4 q + 4 of row r of the accumulator store.
fn c_quad(r: u32, q: u32) -> vec4<f32> {{
    let i = r * CS + 4u * q;
    return vec4<f32>(cs[i], cs[i + 1u], cs[i + 2u], cs[i + 3u]);
}}
"#,
                step = WG / lanes,
            ),
            &[("X", x)],
        );
        if norm {
            let p = SSQ_TOKENS;
            let per_pass = rows.len() as u32 * p / BT;
            let mut passes = String::new();
            for pass in 0..BT / p {
                passes += "    workgroupBarrier();\n";
                for j in pass * per_pass..(pass + 1) * per_pass {
                    passes += &format!(
                        "    cs[(lid % {lanes}u) * {p}u + lid / {lanes}u + {}u] = ssq_{j};\n",
                        j * (WG / lanes) - p * pass
                    );
                }
                passes += &format!(
                    "    workgroupBarrier();\n    if (ty / {q}u == {pass}u) {{\n        for (var l = 0u; l < {lanes}u; l++) {{\n            let i = l * {p}u + 4u * (ty % {q}u);\n            ss += vec4<f32>(cs[i], cs[i + 1u], cs[i + 2u], cs[i + 3u]);\n        }}\n    }}\n",
                    q = p / 4
                );
            }
            s += &format!(
                r#"
// 1/rms of tokens 4 ty .. 4 ty + 4 of the tile, from the sums of squares
// store_x gathered. Reuses cs: call after the accumulators are handed back,
// from every invocation.
fn inv_rms(ty: u32) -> vec4<f32> {{
    var ss = vec4<f32>(0.0);
{passes}    return inverseSqrt(ss / f32(IN) + EPS);
}}
"#
            );
        }
        s
    }

    /// The entry point, as [`crate::tiled::Tiling::entry`]: `setup` defines `t0`,
    /// `accs` name the accumulators of `staging`'s weight tiles, and
    /// `epilogue` reads `acc_<name>[i][j]`.
    pub fn entry(&self, setup: &str, accs: &[&str], staging: &Staging, epilogue: &str) -> String {
        let mut s = staging.declarations();
        s += r#"@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid_in: u32,
    @builtin(subgroup_id) sg_in: u32,
    @builtin(num_workgroups) nwg: vec3<u32>
) {
    lid = lid_in;
    let n = step.n_tokens;
$TILES    let tx = lid % TX;
    let ty = lid / TX;
    // this subgroup's sub-tiles: tokens 16 tb .. 16 tb + 16, outputs 16 ob .. 16 ob + 32
    let tb = sg_in / 2u;
    let ob = 2u * (sg_in % 2u);
"#;
        s = s.replace("$TILES", TILE_IDS);
        s += setup;
        for acc in accs {
            for h in 0..2 {
                s += &format!("    var c_{acc}{h} = coop_mat16x16<f32, C>();\n");
            }
        }
        let mut products = String::from("        for (var kk = 0u; kk < BK; kk += 16u) {\n");
        products += "            let a = coopLoadT<coop_mat16x16<f16, A>>(&xh[16u * tb * XS + kk], XS);\n";
        for (acc, tile) in accs.iter().zip(&staging.tiles) {
            for h in 0..2 {
                products += &format!(
                    "            c_{acc}{h} = coopMultiplyAdd(a, coopLoadT<coop_mat16x16<f16, B>>(&{tile}[kk * WS + 16u * (ob + {h}u)], WS), c_{acc}{h});\n"
                );
            }
        }
        products += "        }\n";
        s += &staging.steps(&products);
        s += "    // the accumulators to (tx, ty) order, through workgroup memory 32 tokens at a time\n";
        for acc in accs {
            s += &format!("    var acc_{acc}: array<vec4<f32>, 4>;\n");
            for quarter in 0..BT / 32 {
                s += &format!("    if (tb / 2u == {quarter}u) {{\n");
                for h in 0..2 {
                    s += &format!(
                        "        coopStoreT(c_{acc}{h}, &cs[16u * (tb % 2u) * CS + 16u * (ob + {h}u)], CS);\n"
                    );
                }
                s += "    }\n    workgroupBarrier();\n";
                s += &format!("    if (ty / 8u == {quarter}u) {{\n");
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

/// A weight tile in workgroup memory (f16), and `store_<name>(kk, q, v)`,
/// which writes outputs 4 q .. 4 q + 4 of input kk.
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

/// See [`crate::tiled::Skeleton::stage_weights`]. The words (and scales)
/// wait in registers as loaded (`pre_<tile>_w`, `pre_<tile>_s`), since
/// dequantising them would wait for the load, and are dequantised into the
/// tile after the products.
pub(crate) fn stage_words(sources: &[TileSource<'_>]) -> Staging {
    let mut staging = Staging { tiles: sources.iter().map(|src| src.tile.to_string()).collect(), ..Staging::default() };
    for src in sources {
        let t = src.tile;
        let load = select_chain(src.sel, src.matrices, &|w| {
            format!("pre_{t}_w = {w}_words({o}, k0 + kk);\npre_{t}_s = {w}_scales({o}, k0 + kk);\n", o = src.o)
        });
        let dequant = select_chain(src.sel, src.matrices, &|w| {
            format!("lo = {w}_dequant(pre_{t}_w, pre_{t}_s, kk);\nhi = {w}_dequant(pre_{t}_w, pre_{t}_s, kk + 1u);\n")
        });
        let flush = format!(
            "var lo = vec4<f32>(0.0);\nvar hi = vec4<f32>(0.0);\n{dequant}store_{t}(kk, q, lo);\nstore_{t}(kk + 1u, q, hi);\n"
        );
        staging.registers += &registers([format!("pre_{t}_w"), format!("pre_{t}_s")], "vec4<u32>");
        staging.load += &stage_pair(&load);
        staging.flush += &stage_pair(&flush);
    }
    staging
}

/// See [`crate::tiled::Skeleton::stage_with`]: each input of the pair
/// dequantised on its own, into `pre_<tile>_lo` and `pre_<tile>_hi`.
pub(crate) fn stage_with(tile: &str, body: &str) -> Staging {
    let one = |k: &str, reg: &str| {
        format!("{{\n{}}}\n", indent(&body.replace("$KEEP", &format!("pre_{tile}_{reg} =")).replace("$K", k), 4))
    };
    Staging {
        tiles: vec![tile.to_string()],
        registers: registers([format!("pre_{tile}_lo"), format!("pre_{tile}_hi")], "vec4<f32>"),
        load: stage_pair(&(one("k0 + kk", "lo") + &one("k0 + kk + 1u", "hi"))),
        flush: stage_pair(&format!("store_{tile}(kk, q, pre_{tile}_lo);\nstore_{tile}(kk + 1u, q, pre_{tile}_hi);\n")),
        versions: None,
    }
}

/// `body` with the invocation's output quad `q` and input pair `kk`,
/// `kk + 1` of a weight tile's step.
fn stage_pair(body: &str) -> String {
    format!(
        "        {{\n            let q = lid % (BO / 4u);\n            let kk = 2u * (lid / (BO / 4u));\n{}        }}\n",
        indent(body, 12)
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
        assert_eq!(BK % 16, 0);
        // the subgroups of 32 cover the sub-tiles, two each
        assert_eq!(WG / crate::target::COOP_SUBGROUP_SIZE * 2, (BT / 16) * (BO / 16));
        // load_x: whole token rows of BK inputs (or BK / 2 pairs), the same rows per invocation
        for lanes in [BK, BK / 2] {
            assert_eq!(WG % lanes, 0);
            assert_eq!(BT % (WG / lanes), 0);
            // inv_rms: whole rows of a pass per invocation
            assert_eq!((BT * lanes / WG) * SSQ_TOKENS % BT, 0);
        }
        // stage_pair: one input pair of a tile per invocation, from one word
        assert_eq!((BO / 4) * BK / 2, WG);
        assert_eq!(BK % 8, 0);
        // inv_rms gathers BK sums per token in the accumulator store
        const { assert!(BK * SSQ_TOKENS <= 32 * CS) };
        assert_eq!(BT % SSQ_TOKENS, 0);
        // two weight tiles at most (gate/up, the wide kernels)
        assert_eq!(workgroup_bytes(2), crate::target::COOP_WORKGROUP_BYTES);
        // EXCHANGE: a vec4 per invocation in the accumulator store
        const { assert!(4 * WG <= 32 * CS) };
    }
}

//! Tiled matrix-matrix products: the kernels for steps of many tokens (prefill).
//!
//! A workgroup computes a tile of `BT` tokens x `BO` outputs. It walks the
//! inputs `BK` at a time: the step's input rows and the weight words
//! (dequantised by [`crate::tcal`]) are staged in workgroup memory, and every
//! invocation accumulates its 4 tokens x 4 outputs (or two such token quads,
//! [`Tiling::with_two_quads`]) from there, so each weight word is read once
//! per `BT` tokens instead of once per token.
//!
//! Workgroup memory is written and read in whole vec4s only: an invocation
//! stages inputs of four tokens, and four outputs of one input.
//!
//! Both skeletons run the same pipelined input loop ([`pipelined_steps`]):
//! each step's loads from device memory go into registers before the
//! products of the step before, and into workgroup memory after them, so the
//! loads' latency is spent on products instead of waiting.
//!
//! An RMSNorm on the input is folded in: the norm weights scale the inputs as
//! they are staged, their sums of squares are gathered on the way, and each
//! token's outputs are scaled by 1/rms at the end (a dot product is linear).
//!
//! The plain gate/up on targets with shader-f16 ([`f16_products`]), and the
//! down projection and QKV there where the residual stream is wide enough,
//! and the output projection where the attention output is, instead stage
//! f16 tiles and sum each step's products in f16 before their f32
//! accumulators. Their inputs are divided by their rms before they are
//! staged, so the f16 products keep their precision whatever the inputs'
//! scale: each token's rms comes from the sums of squares by parts the kernel
//! before leaves beside its output: the output projection, the down
//! projection and the embedding beside the residual stream
//! ([`crate::spec::Activation::SumSquares`]), gate/up beside SiLU(gate) * up
//! ([`crate::spec::Activation::FfnSumSquares`]), the tiled attention beside
//! its output ([`crate::spec::Activation::AttnSumSquares`]); the tiled
//! kernels through [`Tiling::keep`]. The RMSNorms of gate/up and QKV then need only the norm
//! weights; the down and output projections multiply their outputs back by
//! the rms ([`Tiling::prelude`]'s unit inputs).

use crate::coop::{self, CoopTiling};
use crate::manifest::QuantFormat;
use crate::target::Target;
use crate::tcal::{fill, indent, prev_power_of_two};

/// Outputs per tile.
pub(crate) const BO: u32 = 64;
/// Inputs staged per step: a multiple of every format's inputs per word.
pub(crate) const BK: u32 = 16;

/// How a tiled kernel is laid out on a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tiling {
    /// Invocations per workgroup: `BO / 4` across outputs times `bt / (4 quads)` across tokens.
    pub wg: u32,
    /// Tokens per tile.
    pub bt: u32,
    /// Token quads per invocation.
    pub quads: u32,
    /// f16 tiles and step sums ([`Tiling::with_f16_sums`], [`Tiling::with_f16_tiles`]).
    pub f16_tiles: bool,
}

impl Tiling {
    /// f32 tiles; [`Tiling::with_f16_sums`] for gate/up.
    pub fn for_target(target: &Target) -> Tiling {
        let wg = prev_power_of_two(target.workgroup_limit());
        Tiling { wg, bt: wg * 4 / (BO / 4), quads: 1, f16_tiles: false }
    }

    /// The same tile with half the invocations, each taking two token quads:
    /// twice the products per weight read from workgroup memory, and twice
    /// the staging per invocation. Where staging is cheap (16-bit weights,
    /// and gate/up's f16 tiles) that gains: on the H100, Llama-2-7B F16's
    /// prefill QKV took 1383 us a layer instead of 1493 and gate/up 2182
    /// instead of 2265; INT4's QKV 1872 instead of 1553, so it keeps one quad.
    pub fn with_two_quads(self) -> Tiling {
        if self.quads > 1 || self.wg < 128 {
            return self;
        }
        Tiling { wg: self.wg / 2, quads: 2, ..self }
    }

    /// The tiling of gate/up: f16 tiles and step sums where
    /// [`f16_products`], its inputs normalised first. Its inputs are then
    /// within sqrt(IN) times their norm weights, where f16 sums are safe.
    /// The logits keep f32 tiles for precision (see [`f16_products`]), and
    /// QKV of a narrower stream than the down projection's threshold.
    pub fn with_f16_sums(target: &Target) -> Tiling {
        if f16_products(target) {
            Tiling::with_f16_tiles(target).with_two_quads()
        } else {
            Tiling::for_target(target)
        }
    }

    /// f16 tiles and step sums on one token quad where [`f16_products`]
    /// ([`Tiling::with_f16_sums`] takes two). Unit inputs
    /// ([`Tiling::prelude`]) are each within sqrt(IN), whatever the row (a
    /// row of SiLU(gate) * up may hold values near f16's largest, whose sums
    /// of 16 products would overflow). The down projection keeps one quad:
    /// with two, its 256 workgroups (two tiles each) leave too few warps an
    /// SM (on the H100, Llama-2-7B F16 at 512 tokens, 1263 us a layer against
    /// 1175).
    pub fn with_f16_tiles(target: &Target) -> Tiling {
        debug_assert!(f16_products(target));
        Tiling { f16_tiles: true, ..Tiling::for_target(target) }
    }

    /// An epilogue's sums over each tile row of a value per token (its
    /// outputs' sums of squares, say) through workgroup memory the input loop
    /// is done with ([`Tiling::sums_tile`]): `keep(v)` (in
    /// [`Skeleton::per_token`]) leaves the token's `v`, then `row_sums(write)`
    /// (after it, from every invocation) runs `write` for each of the tile's
    /// tokens `t`, on one invocation of the row, with the sums of the token's
    /// quad in `s` (the token's is `s[j]`). Nothing stays in registers across
    /// the stores (a register array of the values, summed afterwards, cost
    /// Llama-2-7B's gate/up 108 us a layer on the H100, its output projection
    /// 20, its down projection 33). `keep` stores single components, against
    /// this module's rule: each vec4 has one writer, so a driver widening the
    /// store cannot race.
    pub fn keep(&self, v: &str) -> String {
        format!("            {}[lid + ($Iu / 4u) * WG][$Iu % 4u] = {v};\n", self.sums_tile())
    }

    /// Where [`Tiling::keep`] leaves its values, WG * QUADS vec4<f32>s: `red`
    /// with f16 tiles, else the input tile (BK * (BT / 4 + 1) = WG * QUADS +
    /// BK of them).
    fn sums_tile(&self) -> &'static str {
        if self.f16_tiles {
            "red"
        } else {
            "xt"
        }
    }

    /// See [`Tiling::keep`].
    pub fn row_sums(&self, write: &str) -> String {
        let mut quads = String::new();
        for r in 0..self.quads {
            quads += &format!(
                "        {{\n            var s = vec4<f32>(0.0);\n            for (var j = 0u; j < TX; j++) {{\n                s += {tile}[tile_lid(j, ty) + {r}u * WG];\n            }}\n            for (var j = 0u; j < 4u; j++) {{\n                let t = t0 + 4u * (ty + {r}u * TY) + j;\n                if (t < n) {{\n{}                }}\n            }}\n        }}\n",
                indent(write, 20),
                tile = self.sums_tile()
            );
        }
        format!("    workgroupBarrier();\n    if (tx == 0u) {{\n{quads}    }}\n")
    }

    /// The WGSL type of a tile's elements.
    fn element(&self) -> &'static str {
        if self.f16_tiles {
            "vec4<f16>"
        } else {
            "vec4<f32>"
        }
    }

    /// `v` (a `vec4<f32>`) as a tile element: rounded to f16 with f16 tiles
    /// (values past 65504 overflow, as on cooperative matrices).
    fn tile_value(&self, v: &str) -> String {
        if self.f16_tiles {
            format!("vec4<f16>({v})")
        } else {
            v.to_string()
        }
    }

    /// Weight quads each invocation stages per tile.
    pub fn stage_iters(&self) -> u32 {
        (BO / 4) * BK / self.wg
    }

    /// Constants, the input tile, `load_x(t0, n, k0)`, `store_x()` and, with `norm`,
    /// `inv_rms(ty)`; `x` is the input binding (`array<f32>`, rows of `IN`).
    /// With f16 tiles, also `begin_tile(t0, n)`, which the entry calls first,
    /// reading the input's sums of squares by parts (`IN_PARTS` of them a
    /// token, bound as `in_ssq`), and dividing the staged inputs by their rms.
    /// Without `norm` they are unit inputs, and `rms(ty)` gives the factor that
    /// restores the outputs' scale.
    pub fn prelude(&self, x: &str, norm: bool) -> String {
        // load_x gives each invocation `quads` (input, token quad)s of the
        // tile: as many as it owns, since BK = TX
        const { assert!(BK == BO / 4) };
        debug_assert_eq!(BK * self.bt / 4, self.wg * self.quads);
        debug_assert!(self.wg.is_multiple_of(64), "INVOCATIONS lays out 64 at a time");
        let mut s = format!(
            r#"// Tiles of BT tokens x BO outputs, inputs staged BK at a time. Invocation
// (tx, ty) owns the token quads ty + TY r (r < QUADS) and outputs 4 tx .. 4 tx + 4
// of its tile.
const WG: u32 = {wg}u;
const BT: u32 = {bt}u;
const BO: u32 = {BO}u;
const BK: u32 = {BK}u;
const TX: u32 = BO / 4u;
const TY: u32 = WG / TX;
const QUADS: u32 = {quads}u;
var<private> lid: u32;
{layout}
// Staged inputs: element (t, k) is xt[k * XS + t / 4][t % 4]. The row stride
// is one past the token quads so that store_x's invocations, one input row
// apart, write to different banks.
const XS: u32 = BT / 4u + 1u;
var<workgroup> xt: array<{element}, BK * XS>;
"#,
            wg = self.wg,
            bt = self.bt,
            quads = self.quads,
            layout = INVOCATIONS,
            element = self.element(),
        );
        if self.f16_tiles {
            // begin_tile's; then free, for an epilogue's sums by token and exchanges
            s += "// Each token quad's sums of squares, traded in f32.\nvar<workgroup> red: array<vec4<f32>, WG * QUADS>;\n";
        }
        if norm && !self.f16_tiles {
            s += "// Sums of squares of the inputs this invocation staged, for its token quads.\n";
            s += &registers((0..self.quads).map(|r| format!("ssq{r}")), "vec4<f32>");
        }
        if norm {
            s += "// The norm weight of the input in flight.\nvar<private> nk: f32;\n";
        }
        // unrolled: a runtime index into px would move it out of registers
        let mut loads = String::new();
        let mut stores = String::new();
        for r in 0..self.quads {
            loads += &format!("    px{r} = vec4<f32>(0.0);\n");
            for (j, c) in ["x", "y", "z", "w"].iter().enumerate() {
                let t = format!("t0 + 4u * (tq + {r}u * (WG / BK)) + {j}u");
                loads += &format!("    if ({t} < n && k < IN) {{\n        px{r}.{c} = $X[({t}) * IN + k];\n    }}\n");
            }
            let value = match (norm, self.f16_tiles) {
                (false, false) => format!("px{r}"),
                (true, false) => {
                    stores += &format!("    ssq{r} += px{r} * px{r};\n");
                    format!("px{r} * nk")
                }
                (true, true) => format!("px{r} * rs{r} * nk"),
                (false, true) => format!("px{r} * rs{r}"),
            };
            stores +=
                &format!("    xt[(lid % BK) * XS + lid / BK + {r}u * (WG / BK)] = {};\n", self.tile_value(&value));
        }
        if norm {
            loads += "    nk = norm[min(k, IN - 1u)];\n";
        }
        s += "// The next step's inputs in flight: input lid % BK of the token quads lid / BK + r WG / BK.\n";
        s += &registers((0..self.quads).map(|r| format!("px{r}")), "vec4<f32>");
        s += &fill(
            &format!(
                r#"
// Loads input k0 + lid % BK of the invocation's token quads of tokens t0 ..
// into px<r>; zeros past n tokens or IN inputs.
fn load_x(t0: u32, n: u32, k0: u32) {{
    let k = k0 + lid % BK;
    let tq = lid / BK;
{loads}}}

// Stores px into the input tile (the loads' first use).
fn store_x() {{
{stores}}}
"#
            ),
            &[("X", x)],
        );
        match (norm, self.f16_tiles) {
            (false, false) => {}
            (true, false) => s += &self.inv_rms(),
            (_, true) => s += &self.stage_rms(norm),
        }
        s
    }

    /// The entry point: `setup` (which defines `t0`, the tile's first token), the accumulators
    /// `acc_<name>[4 * quads]` for each of `accs` (one per weight tile of `staging`, in
    /// order), the input loop, then `epilogue`.
    pub fn entry(&self, setup: &str, accs: &[&str], staging: &Staging, epilogue: &str) -> String {
        let mut s = staging.declarations();
        s += r#"@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid_in: u32,
    @builtin(num_workgroups) nwg: vec3<u32>
) {
    lid = lid_in;
    let n = step.n_tokens;
    let tx = tile_x(lid);
    let ty = tile_y(lid);
"#;
        s += TILE_IDS;
        s += setup;
        if self.f16_tiles {
            s += "    begin_tile(t0, n);\n";
        }
        let n = 4 * self.quads;
        for acc in accs {
            s += &format!("    var acc_{acc}: array<vec4<f32>, {n}>;\n");
            if self.f16_tiles {
                s += &format!("    var s_{acc}: array<vec4<f16>, {n}>;\n");
            }
        }
        // With f16 tiles, each step's BK products are summed in f16 (twice
        // the rate of f32 where the GPU packs f16 pairs), then added to the
        // f32 accumulators: the error of a sum of BK f16 products, not of
        // the whole row. The inputs are normalised before they are staged
        // (`Tiling::stage_rms`), so the products' scale does not follow the residual
        // stream's.
        let sum = |acc: &str| if self.f16_tiles { format!("s_{acc}") } else { format!("acc_{acc}") };
        let mut body = String::new();
        for r in 0..self.quads {
            body += &format!("    let a{r} = xt[kk * XS + ty + {r}u * TY];\n");
        }
        for (acc, tile) in accs.iter().zip(&staging.tiles) {
            body += &format!("    let b_{acc} = {tile}[kk * (BO / 4u) + tx];\n");
            for r in 0..self.quads {
                for (i, c) in ["x", "y", "z", "w"].iter().enumerate() {
                    body += &format!("    {}[{}] += a{r}.{c} * b_{acc};\n", sum(acc), 4 * r + i as u32);
                }
            }
        }
        let mut products = format!("        for (var kk = 0u; kk < BK; kk++) {{\n{}        }}\n", indent(&body, 8));
        if self.f16_tiles {
            // the step sums are zeroed by hand: a `var` declared in the loop
            // would be zeroed only once by naga before the fix of wgpu #9489
            // (Firefox's, at least), and carry each step's sums into the next
            for acc in accs {
                for i in 0..n {
                    products += &format!(
                        "        acc_{acc}[{i}] += vec4<f32>(s_{acc}[{i}]);\n        s_{acc}[{i}] = vec4<f16>(0.0);\n"
                    );
                }
            }
        }
        s += &staging.steps(&products);
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

/// Which tile of tokens and of outputs a workgroup computes: token tiles vary
/// fastest, so the workgroups reading one weight tile run together and share
/// its loads in L2.
pub(crate) const TILE_IDS: &str = "    let tile_linear = wid.x + wid.y * nwg.x;\n    let tile_t = tile_linear % nwg.y;\n    let tile_o = tile_linear / nwg.y;\n";

/// How a tiled kernel stages its weight tiles each step: `load` issues the
/// next step's loads into registers (before the products), `flush` stores
/// them into the tiles (after); `tiles` names the tiles, in order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Staging {
    pub tiles: Vec<String>,
    /// Module-scope declarations of the registers the loads wait in.
    pub registers: String,
    pub load: String,
    pub flush: String,
    /// Instead of `load` and `flush`: a workgroup-uniform selector and the
    /// (load, flush) of each matrix it picks, one input loop each.
    pub versions: Option<(String, Vec<(String, String)>)>,
}

impl Staging {
    /// The registers' declarations, to precede the entry point.
    pub fn declarations(&self) -> String {
        format!("// The next step's weights in flight.\n{}\n", self.registers)
    }

    /// The input loop ([`pipelined_steps`]) with `products`, once per version.
    pub fn steps(&self, products: &str) -> String {
        let Some((sel, versions)) = &self.versions else {
            return pipelined_steps(&self.load, &self.flush, products);
        };
        let mut s = String::from("    // one input loop per matrix: a choice inside it costs every step\n");
        for (i, (load, flush)) in versions.iter().enumerate() {
            let head = if i == 0 { "    " } else { " else " };
            s += &format!("{head}if ({sel} == {i}u) {{\n{}    }}", indent(&pipelined_steps(load, flush, products), 4));
        }
        s + "\n"
    }
}

impl std::ops::Add for Staging {
    type Output = Staging;

    fn add(mut self, other: Staging) -> Staging {
        debug_assert!(self.versions.is_none() && other.versions.is_none(), "versions are staged whole");
        self.tiles.extend(other.tiles);
        self.registers += &other.registers;
        self.load += &other.load;
        self.flush += &other.flush;
        self
    }
}

/// Invocation (tx, ty) of the plain skeleton: each 32 consecutive
/// invocations (a subgroup on most GPUs) take 8 output quads x 4 token quads,
/// so that their reads of a step's weight tile are 128 bytes, not 256 (on
/// the H100, Llama-2-7B F16's prefill gate/up took 2265 us a layer instead
/// of 2316). Needs WG a multiple of 64.
const INVOCATIONS: &str = r#"
// The invocation (tile_x(l), tile_y(l)) of local index l, and back: each
// 32 invocations take 8 x 4 of them.
fn tile_x(l: u32) -> u32 {
    return l % 8u + 8u * ((l / 32u) % 2u);
}
fn tile_y(l: u32) -> u32 {
    return (l % 32u) / 8u + 4u * (l / 64u);
}
fn tile_lid(x: u32, y: u32) -> u32 {
    return x % 8u + 32u * (x / 8u) + 8u * (y % 4u) + 64u * (y / 4u);
}
"#;

/// See [`Skeleton::exchange`]: `$TILE` holds at least WG vec4<f32>s.
const PLAIN_EXCHANGE: &str = r#"// Trades v with invocation `partner` through $TILE.
fn exchange(v: vec4<f32>, partner: u32) -> vec4<f32> {
    workgroupBarrier();
    $TILE[lid] = v;
    workgroupBarrier();
    return $TILE[partner];
}

"#;

impl Tiling {
    /// `inv_rms(ty)` of the plain skeleton: each token quad's BK stagers keep
    /// their sums in `ssq<r>`. It returns 1/rms of the invocation's tokens,
    /// in accumulator order.
    fn inv_rms(&self) -> String {
        let n = 4 * self.quads;
        let mut writes = String::new();
        let mut reads = String::new();
        for r in 0..self.quads {
            writes += &format!("    xt[(lid % BK) * (BT / 4u) + lid / BK + {r}u * (WG / BK)] = ssq{r};\n");
        }
        for r in 0..self.quads {
            reads += &format!(
                "    {{\n        var ss = vec4<f32>(0.0);\n        for (var kk = 0u; kk < BK; kk++) {{\n            ss += xt[kk * (BT / 4u) + ty + {r}u * TY];\n        }}\n        let v = inverseSqrt(ss / f32(IN) + EPS);\n"
            );
            reads += &spread(r);
            reads += "    }\n";
        }
        format!(
            r#"
// 1/rms of the invocation's tokens (quads ty + TY r), from the sums of
// squares store_x gathered. Reuses xt: call after the last step, from every
// invocation.
fn inv_rms(ty: u32) -> array<f32, {n}> {{
    workgroupBarrier();
{writes}    workgroupBarrier();
    var out: array<f32, {n}>;
{reads}    return out;
}}
"#
        )
    }

    /// `begin_tile(t0, n)` of the plain skeleton with f16 tiles: each
    /// token's 1/rms, before the first step, from the sums of squares of its
    /// input row by parts that the kernel before leaves; store_x stages the
    /// inputs normalised. With `norm`, `inv_rms(ty)` (ones: the norm is
    /// applied already); without, `rms(ty)`, each token's rms in accumulator
    /// order, for the epilogue to restore the outputs' scale.
    fn stage_rms(&self, norm: bool) -> String {
        let n = 4 * self.quads;
        let keep =
            if norm { "" } else { "        if (lid % BK == 0u) {\n            tile_rs[tq] = rs$R;\n        }\n" };
        let mut quads = String::new();
        for r in 0..self.quads {
            quads += &format!(
                r#"    {{
        let tq = lid / BK + {r}u * (WG / BK);
        var s = vec4<f32>(0.0);
        for (var p = lid % BK; p < IN_PARTS; p += BK) {{
            for (var j = 0u; j < 4u; j++) {{
                let t = t0 + 4u * tq + j;
                if (t < n) {{
                    s[j] += in_ssq[t * IN_PARTS + p];
                }}
            }}
        }}
        red[lid] = s;
        workgroupBarrier();
        var ss = vec4<f32>(0.0);
        for (var kk = 0u; kk < BK; kk++) {{
            ss += red[(lid / BK) * BK + kk];
        }}
        rs{r} = inverseSqrt(min(ss / f32(IN), vec4<f32>(F32_MAX)) + EPS);
{keep}        workgroupBarrier();
    }}
"#,
                keep = keep.replace("$R", &r.to_string()),
            );
        }
        let scale = if norm {
            let ones = vec!["1.0"; n as usize].join(", ");
            format!("\n// The staged inputs are normalised already.\nfn inv_rms(ty: u32) -> array<f32, {n}> {{\n    return array<f32, {n}>({ones});\n}}\n")
        } else {
            let mut reads = String::new();
            for r in 0..self.quads {
                reads += &format!("    {{\n        let v = 1.0 / tile_rs[ty + {r}u * TY];\n");
                reads += &spread(r);
                reads += "    }\n";
            }
            format!(
                r#"
// The rms of the invocation's tokens (quads ty + TY r), which the staged
// unit inputs were divided by.
fn rms(ty: u32) -> array<f32, {n}> {{
    var out: array<f32, {n}>;
{reads}    return out;
}}
"#
            )
        };
        let unit = if norm {
            ""
        } else {
            "// Unit inputs: keeps a row of zeros at zero (not 0 * inf).\nconst EPS: f32 = 1e-30;\n// 1/rms of each token quad of the tile.\nvar<workgroup> tile_rs: array<vec4<f32>, BT / 4u>;\n"
        };
        format!(
            r#"
// The input's parts of BO per token.
const IN_PARTS: u32 = (IN + BO - 1u) / BO;
// A sum of squares past f32's range still gives a finite rms.
const F32_MAX: f32 = 3.4028235e38;
{unit}// 1/rms of the token quads whose inputs this invocation stages.
{registers}
// Sets rs<r> from the sums of squares by parts: the BK invocations staging a
// token quad take every BK-th part, then add up each other's sums.
fn begin_tile(t0: u32, n: u32) {{
{quads}}}
{scale}"#,
            registers = registers((0..self.quads).map(|r| format!("rs{r}")), "vec4<f32>"),
        )
    }
}

/// Sets token quad `r`'s values `out[4 r ..]` (an `array<f32, 4 * quads>`)
/// from the vec4 `v`.
fn spread(r: u32) -> String {
    let mut s = String::new();
    for (j, c) in ["x", "y", "z", "w"].iter().enumerate() {
        s += &format!("        out[{}] = v.{c};\n", 4 * r + j as u32);
    }
    s
}

/// A weight tile in workgroup memory, of `element`s.
fn weight_tile(name: &str, element: &str) -> String {
    format!("\n// A weight tile: element (k, c) is {name}[k * BO / 4 + c / 4][c % 4].\nvar<workgroup> {name}: array<{element}, BK * BO / 4u>;\n")
}

/// Declares the private registers `names` of type `ty` (separate variables:
/// an indexed private array may live in slow local memory).
pub(crate) fn registers(names: impl IntoIterator<Item = String>, ty: &str) -> String {
    names.into_iter().map(|name| format!("var<private> {name}: {ty};\n")).collect()
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

/// The epilogue run for each of `quads` token quads' 4 tokens `t` (skipping
/// tokens past `n`), with `$I` the token's accumulator index; `body` reads
/// `acc_<name>[$I]`. Quad r of invocation row ty is ty + TY r.
fn per_token(quads: u32, token: &str, body: &str) -> String {
    let mut s = String::new();
    for r in 0..quads {
        let quad = if r == 0 { "ty".to_string() } else { format!("(ty + {r}u * TY)") };
        for i in 0..4 {
            let text = format!(
                "    {{\n        let t = {token} + 4u * {quad} + {i}u;\n        if (t < n) {{\n{body}        }}\n    }}\n"
            );
            s += &text.replace("$I", &(4 * r + i).to_string());
        }
    }
    s
}

/// Whether the plain tiled gate/up of `target` stages f16 tiles and sums each
/// step's products in f16 (and the down projection and QKV of a residual
/// stream wide enough, `ops::unit_ffn` and `ops::unit_qkv`, and the output
/// projection of an attention output wide enough, `ops::unit_attn`): where
/// the target has shader-f16.
/// On the H100 (Llama-2-7B F16, prefill of 512 tokens) gate/up took 2319 us a layer
/// instead of 2759, the prefill 188 ms instead of 202. QKV in f16 too saved 4
/// ms more, but on the real SmolLM2 (256 positions, llvmpipe) the largest
/// logit difference from the CPU backend grew from 0.04-0.05 to 0.18-0.24
/// (0.11-0.12 with gate/up alone) and INT8's top-1 agreement fell to 0.992;
/// with the logits kernel in f16 as well, to 0.988.
pub(crate) fn f16_products(target: &Target) -> bool {
    target.shader_f16 && !target.uses_coop()
}

/// Whether the tiled kernels of `target` pass activations of `width` to each
/// other as f16 pairs: the residual stream's copy
/// ([`crate::spec::Activation::HiddenHalf`], which every kernel writing the
/// stream in a step of tiled kernels then writes too) and SiLU(gate) * up
/// ([`crate::spec::Activation::FfnHalf`]). The cooperative-matrix kernels do,
/// whose input tiles are f16 anyway: half the bytes and registers in flight
/// took Llama-2-7B F16's prefill gate/up from 846 to 694 us a layer on the H100.
pub(crate) fn f16_pairs(target: &Target, width: usize) -> bool {
    target.uses_coop() && width.is_multiple_of(2)
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

    /// The skeleton of QKV on `target` for weights of `formats`: the plain
    /// one [`Tiling::with_two_quads`] where they are all 16-bit floats, or
    /// with f16 tiles ([`Tiling::with_f16_tiles`], one quad) where it stages
    /// `unit` inputs: with two, Llama-2-7B F16's took 1456 us a layer instead
    /// of 1323 to 1333 on the H100 (512 tokens).
    pub fn for_qkv(target: &Target, formats: &[QuantFormat], unit: bool) -> Skeleton {
        match Skeleton::for_target(target) {
            Skeleton::Plain(t) => {
                let t = if unit { Tiling::with_f16_tiles(target) } else { t };
                let sixteen_bit = formats.iter().all(|f| matches!(f, QuantFormat::F16 | QuantFormat::Bf16));
                Skeleton::Plain(if sixteen_bit && !unit { t.with_two_quads() } else { t })
            }
            coop => coop,
        }
    }

    /// The skeleton of gate/up on `target` ([`Tiling::with_f16_sums`] for
    /// the plain one).
    pub fn with_f16_sums(target: &Target) -> Skeleton {
        match Skeleton::for_target(target) {
            Skeleton::Plain(_) => Skeleton::Plain(Tiling::with_f16_sums(target)),
            coop => coop,
        }
    }

    /// Tokens per tile.
    pub fn bt(&self) -> u32 {
        match self {
            Skeleton::Plain(t) => t.bt,
            Skeleton::Coop(c) => c.bt(),
        }
    }

    /// See [`Tiling::prelude`]; with `half`, `x` holds f16 pairs
    /// ([`f16_pairs`]: the cooperative-matrix skeleton only).
    pub fn prelude(&self, x: &str, norm: bool, half: bool) -> String {
        match self {
            Skeleton::Plain(t) => {
                assert!(!half, "the plain skeleton reads f32 inputs");
                t.prelude(x, norm)
            }
            Skeleton::Coop(c) => c.prelude(x, norm, half),
        }
    }

    /// See [`Tiling::entry`].
    pub fn entry(&self, setup: &str, accs: &[&str], staging: &Staging, epilogue: &str) -> String {
        debug_assert_eq!(accs.len(), staging.tiles.len());
        match self {
            Skeleton::Plain(t) => t.entry(setup, accs, staging, epilogue),
            Skeleton::Coop(c) => c.entry(setup, accs, staging, epilogue),
        }
    }

    /// Token quads per invocation: the accumulators `acc_<name>[0 .. 4 quads]`.
    pub fn quads(&self) -> u32 {
        match self {
            Skeleton::Plain(t) => t.quads,
            Skeleton::Coop(_) => 1,
        }
    }

    /// The epilogue run for each of the invocation's tokens `t` (skipping
    /// tokens past `n`), from `token` on, with `$I` the token's accumulator
    /// index; `body` reads `acc_<name>[$I]`, and `r[$I]` after
    /// `let r = inv_rms(ty);`.
    pub fn per_token(&self, token: &str, body: &str) -> String {
        per_token(self.quads(), token, body)
    }

    /// Inputs staged per step.
    pub fn bk(&self) -> u32 {
        match self {
            Skeleton::Plain(_) => BK,
            Skeleton::Coop(_) => coop::BK,
        }
    }

    /// `exchange(v, partner)`, for an epilogue: every invocation hands in its
    /// `v` and gets invocation `partner`'s, through workgroup memory the input
    /// loop is done with (the plain skeleton's input tile, or `red` with f16
    /// tiles; the coop one's accumulator store). Call it from every invocation.
    pub fn exchange(&self) -> String {
        match self {
            Skeleton::Plain(t) => PLAIN_EXCHANGE.replace("$TILE", if t.f16_tiles { "red" } else { "xt" }),
            Skeleton::Coop(_) => coop::EXCHANGE.to_string(),
        }
    }

    /// A weight tile named `name` in workgroup memory.
    pub fn weight_tile(&self, name: &str) -> String {
        match self {
            Skeleton::Plain(t) => weight_tile(name, t.element()),
            Skeleton::Coop(_) => coop::weight_tile(name),
        }
    }

    /// Stages step `k0` of each source's matrix into its weight tile (the
    /// tiles of `accs` in [`Skeleton::entry`], in order).
    pub fn stage_weights(&self, sources: &[TileSource<'_>]) -> Staging {
        if let Some(first @ TileSource { uniform: true, .. }) = sources.first() {
            debug_assert!(
                sources.iter().all(|s| s.uniform && s.sel == first.sel && s.matrices == first.matrices),
                "uniform tiles share their selector"
            );
            let stagings: Vec<Staging> = (0..first.matrices.len())
                .map(|i| {
                    let one: Vec<TileSource<'_>> = sources
                        .iter()
                        .map(|s| TileSource { sel: "", matrices: &s.matrices[i..=i], uniform: false, ..*s })
                        .collect();
                    self.stage_weights(&one)
                })
                .collect();
            // every version loads into the same registers
            let registers = stagings[0].registers.clone();
            let versions = stagings.into_iter().map(|one| (one.load, one.flush)).collect();
            return Staging {
                tiles: sources.iter().map(|s| s.tile.to_string()).collect(),
                registers,
                versions: Some((first.sel.to_string(), versions)),
                ..Staging::default()
            };
        }
        match self {
            Skeleton::Plain(t) => sources.iter().map(|src| plain_words(t, src)).fold(Staging::default(), |a, b| a + b),
            Skeleton::Coop(_) => coop::stage_words(sources),
        }
    }

    /// Stages a kernel's one weight tile `tile`: `body` sets `v` to the quad
    /// of outputs `4 q .. 4 q + 4` of the tile at input `$K`, and ends with
    /// `$KEEP v;`.
    pub fn stage_with(&self, tile: &str, body: &str) -> Staging {
        match self {
            Skeleton::Plain(t) => plain_staging(t, tile, body),
            Skeleton::Coop(_) => coop::stage_with(tile, body),
        }
    }
}

/// Where a weight tile's quads come from: outputs `o` (an expression in the
/// quad `q`) of `matrices[sel]`, read by quads
/// ([`crate::tcal::TileRead::Quad`]); `sel` may be empty with one matrix.
/// With `uniform`, `sel` is the same across the workgroup; several uniform
/// sources of one kernel share their `sel` and `matrices` (one input loop per
/// matrix stages them all).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileSource<'a> {
    pub tile: &'a str,
    pub o: &'a str,
    pub sel: &'a str,
    pub matrices: &'a [&'a str],
    pub uniform: bool,
}

impl<'a> TileSource<'a> {
    /// Matrix `w` into `tile`: column `c` holds output `o0 + c`.
    pub fn matrix(w: &'a [&'a str], tile: &'a str) -> TileSource<'a> {
        TileSource { tile, o: "o0 + 4u * q", sel: "", matrices: w, uniform: false }
    }
}

/// `then(matrix)` for `matrices[sel]`: an `if` chain on `sel`, or the one
/// matrix's statements.
pub(crate) fn select_chain(sel: &str, matrices: &[&str], then: &dyn Fn(&str) -> String) -> String {
    if let [w] = matrices {
        if sel.is_empty() {
            return then(w);
        }
    }
    let mut s = String::new();
    for (i, w) in matrices.iter().enumerate() {
        let head = if i == 0 { String::new() } else { " else ".to_string() };
        s += &format!("{head}if ({sel} == {i}u) {{\n{}}}", indent(&then(w), 4));
    }
    s + "\n"
}

/// The plain skeleton's staging of `src`: as the coop skeleton's
/// ([`coop::stage_words`]), the words wait in registers until stored, but a
/// quad per invocation.
fn plain_words(t: &Tiling, src: &TileSource<'_>) -> Staging {
    let tile = src.tile;
    let load = select_chain(src.sel, src.matrices, &|w| {
        format!("pre_{tile}_w$IT = {w}_words({o}, k0 + kk);\npre_{tile}_s$IT = {w}_scales({o}, k0 + kk);\n", o = src.o)
    });
    let dequant =
        select_chain(src.sel, src.matrices, &|w| format!("v = {w}_dequant(pre_{tile}_w$IT, pre_{tile}_s$IT, kk);\n"));
    let flush = format!("var v = vec4<f32>(0.0);\n{dequant}{tile}[kk * (BO / 4u) + q] = {};\n", t.tile_value("v"));
    let its = 0..t.stage_iters();
    Staging {
        tiles: vec![tile.to_string()],
        registers: registers(
            its.flat_map(|it| [format!("pre_{tile}_w{it}"), format!("pre_{tile}_s{it}")]),
            "vec4<u32>",
        ),
        load: stage_quads(t.stage_iters(), &indent(&load, 12)),
        flush: stage_quads(t.stage_iters(), &indent(&flush, 12)),
        versions: None,
    }
}

/// The plain skeleton's staging of `tile`: `body` as in [`Skeleton::stage_with`].
fn plain_staging(t: &Tiling, tile: &str, body: &str) -> Staging {
    let load = body.replace("$KEEP", &format!("pre_{tile}_$IT =")).replace("$K", "k0 + kk");
    Staging {
        tiles: vec![tile.to_string()],
        registers: registers((0..t.stage_iters()).map(|it| format!("pre_{tile}_{it}")), "vec4<f32>"),
        load: stage_quads(t.stage_iters(), &indent(&load, 12)),
        flush: stage_quads(
            t.stage_iters(),
            &format!("            {tile}[kk * (BO / 4u) + q] = {};\n", t.tile_value(&format!("pre_{tile}_$IT"))),
        ),
        versions: None,
    }
}

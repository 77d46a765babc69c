//! TCAL, the tensor compute abstraction layer: how a packed weight word is
//! decoded and how a reduction is done on a [`Target`]. Every op in
//! [`crate::ops`] is written once against these helpers; only this module
//! knows about precisions and subgroups.
//!
//! The WGSL decoders mirror [`crate::format`] exactly (word `o` of stored row
//! `r` packs inputs `r * pack ..`, low bits first).

use crate::format::{pack_factor, part_sizes, FormatError};
use crate::manifest::QuantFormat;
use crate::target::{Target, MIN_SUBGROUP_SIZE};

/// Replaces each `$KEY` in `template` (longest keys first, so `$WS` wins over `$W`).
pub(crate) fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut vars = vars.to_vec();
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("${k}"), v);
    }
    s
}

/// The largest power of two not above `n` (at least 1).
pub(crate) fn prev_power_of_two(n: u32) -> u32 {
    if n <= 1 {
        1
    } else {
        1 << (31 - n.leading_zeros())
    }
}

/// Lines that must open the module (`enable f16;`).
pub(crate) fn enables(target: &Target) -> &'static str {
    match (target.shader_f16, target.cooperative_matrix) {
        (true, true) => "enable f16;\nenable wgpu_cooperative_matrix;\n\n",
        (true, false) => "enable f16;\n\n",
        (false, true) => "enable wgpu_cooperative_matrix;\n\n",
        (false, false) => "",
    }
}

/// WGSL element type of the KV cache.
pub(crate) fn kv_type(target: &Target) -> &'static str {
    if target.shader_f16 {
        "f16"
    } else {
        "f32"
    }
}

/// Bytes per KV-cache element for `target`.
pub fn kv_bytes_per_element(target: &Target) -> u64 {
    if target.shader_f16 {
        2
    } else {
        4
    }
}

/// Extra entry-point parameters the reductions need.
pub(crate) fn entry_builtins(target: &Target) -> &'static str {
    if target.subgroups {
        ",\n    @builtin(subgroup_invocation_id) sg_lane_in: u32,\n    @builtin(subgroup_size) sg_size_in: u32,\n    @builtin(subgroup_id) sg_index_in: u32,\n    @builtin(num_subgroups) sg_count_in: u32"
    } else {
        ""
    }
}

/// First statements of an entry point: record builtins the reductions read.
pub(crate) fn entry_setup(target: &Target) -> &'static str {
    if target.subgroups {
        "    sg_lane = sg_lane_in;\n    sg_size = sg_size_in;\n    sg_index = sg_index_in;\n    sg_count = sg_count_in;\n    lid = lid_in;\n"
    } else {
        "    lid = lid_in;\n"
    }
}

/// Slots of the reductions' workgroup memory: one per subgroup, subgroups
/// being no smaller than the target's (or one per invocation without them).
fn red_slots(target: &Target, wg: u32) -> u32 {
    if target.subgroups {
        (wg / target.subgroup_size.max(MIN_SUBGROUP_SIZE)).max(1)
    } else {
        wg
    }
}

/// Bytes of workgroup memory [`reductions`] declares.
pub(crate) fn reduction_bytes(target: &Target, wg: u32) -> usize {
    red_slots(target, wg) as usize * 8
}

/// `wg_sum(v)`, `wg_max(v)`, `wg_top(v, i)` (the largest value's bits and
/// index) and `wg_argmax(v, i)` over a workgroup of `wg`
/// invocations (a power of two). Every invocation must call them (they hold
/// barriers) and every invocation gets the result.
pub(crate) fn reductions(target: &Target, wg: u32) -> String {
    debug_assert!(wg.is_power_of_two());
    if target.subgroups {
        let slots = red_slots(target, wg);
        fill(
            r#"// Reductions: subgroup operations, then one slot per subgroup in workgroup memory.
const RED_SLOTS: u32 = $SLOTSu;
var<workgroup> red_f32: array<f32, RED_SLOTS>;
var<workgroup> red_u32: array<u32, RED_SLOTS>;
var<private> lid: u32;
var<private> sg_lane: u32;
var<private> sg_size: u32;
var<private> sg_index: u32;
var<private> sg_count: u32;

fn wg_sum(v: f32) -> f32 {
    let s = subgroupAdd(v);
    workgroupBarrier();
    if (sg_lane == 0u) {
        red_f32[sg_index] = s;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < sg_count; i++) {
        total += red_f32[i];
    }
    return total;
}

fn wg_max(v: f32) -> f32 {
    let s = subgroupMax(v);
    workgroupBarrier();
    if (sg_lane == 0u) {
        red_f32[sg_index] = s;
    }
    workgroupBarrier();
    var m = red_f32[0];
    for (var i = 1u; i < sg_count; i++) {
        m = max(m, red_f32[i]);
    }
    return m;
}

// The largest value (its bits) and its index, the lowest index among equal
// values. The maximum first, then the lowest index holding it: one pass
// comparing (value, index) pairs per slot took the H100's argmax over 1002
// shares from 7.4 to 9.0 us.
fn wg_top(v: f32, i: u32) -> vec2<u32> {
    let m = wg_max(v);
    let cand = subgroupMin(select(0xffffffffu, i, v == m));
    workgroupBarrier();
    if (sg_lane == 0u) {
        red_u32[sg_index] = cand;
    }
    workgroupBarrier();
    var best = red_u32[0];
    for (var k = 1u; k < sg_count; k++) {
        best = min(best, red_u32[k]);
    }
    return vec2<u32>(bitcast<u32>(m), best);
}

// Index of the largest value; the lowest index among equal values.
fn wg_argmax(v: f32, i: u32) -> u32 {
    return wg_top(v, i).y;
}
"#,
            &[("SLOTS", &slots.to_string())],
        )
    } else {
        fill(
            r#"// Reductions: a tree in workgroup memory.
const RED_SLOTS: u32 = $WGu;
var<workgroup> red_f32: array<f32, RED_SLOTS>;
var<workgroup> red_u32: array<u32, RED_SLOTS>;
var<private> lid: u32;

fn wg_sum(v: f32) -> f32 {
    workgroupBarrier();
    red_f32[lid] = v;
    workgroupBarrier();
    for (var s = RED_SLOTS / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red_f32[lid] += red_f32[lid + s];
        }
        workgroupBarrier();
    }
    return red_f32[0];
}

fn wg_max(v: f32) -> f32 {
    workgroupBarrier();
    red_f32[lid] = v;
    workgroupBarrier();
    for (var s = RED_SLOTS / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red_f32[lid] = max(red_f32[lid], red_f32[lid + s]);
        }
        workgroupBarrier();
    }
    return red_f32[0];
}

// The largest value (its bits) and its index, the lowest index among equal values.
fn wg_top(v: f32, i: u32) -> vec2<u32> {
    workgroupBarrier();
    red_f32[lid] = v;
    red_u32[lid] = i;
    workgroupBarrier();
    for (var s = RED_SLOTS / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            let a = red_f32[lid];
            let b = red_f32[lid + s];
            if (b > a || (b == a && red_u32[lid + s] < red_u32[lid])) {
                red_f32[lid] = b;
                red_u32[lid] = red_u32[lid + s];
            }
        }
        workgroupBarrier();
    }
    return vec2<u32>(bitcast<u32>(red_f32[0]), red_u32[0]);
}

// Index of the largest value; the lowest index among equal values.
fn wg_argmax(v: f32, i: u32) -> u32 {
    return wg_top(v, i).y;
}
"#,
            &[("WG", &wg.to_string())],
        )
    }
}

/// How a matrix-vector kernel that reads four outputs at a load multiplies
/// INT4 and INT8 weights with its input.
///
/// Only the four-output path packs its products: there the input, converted
/// once, serves four outputs. Reading one output at a time, converting the
/// input costs as much as the products save (the H100's 7B INT4 QKV kernel went
/// from 45 to 51 us). And only kernels whose input is RMS-normalised pack them
/// (gate/up, logits): `hidden += W x` reads raw activations, which the residual
/// branches of large models can take past what f16 inputs hold ([`X16_SCALE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Products {
    /// Weights converted to f32 one at a time: exact products.
    Exact,
    /// Where the device opens with `shader-f16`, the targets that already trade
    /// exactness for speed (an f16 KV cache):
    /// - INT4: nibble pairs made f16 through the exponent of 1024 (one
    ///   f16 -> f32 -> f16 round trip per pair instead of a conversion per
    ///   nibble), multiplied with f16 input pairs; each f16 lane sums a word's
    ///   four products of its pair, the two lanes are added in f32. On the
    ///   H100 the 7B gate/up kernel went from 67 to 53 us. Inputs must stay
    ///   below about 17000 in magnitude ([`X16_SCALE`]). Where the input's
    ///   int8 groups fit in workgroup memory, [`Products::Int8Groups`] instead
    ///   (quantising each row of eight inputs on every read, with the exact
    ///   sum in the min term, had taken 47 us at 250 times this error).
    /// - INT8: each row's four inputs quantised to int8 at a scale of their own,
    ///   then one `dot4I8Packed` per output. On the H100 the 7B INT8 gate/up
    ///   kernel went from 80 to 55 us, Llama-3.2-1B's INT8 logits from 154 to 95.
    Packed,
    /// [`Products::Packed`], with INT8's quantised input rows computed once per
    /// workgroup into workgroup memory ([`int8_row_cache`]) instead of by every
    /// invocation that reads a row: for kernels that read the whole input
    /// before their weights anyway (the logits). INT4 as `Packed`.
    PackedRows,
    /// INT4 only: the input row quantised once per workgroup to int8, a scale
    /// per weight group, into workgroup memory ([`InputStaging::Int8Groups`]),
    /// then two `dot4I8Packed` per word (its low and high nibbles) summed in
    /// i32 over the group. A group contributes `scale * d * dot(q, xq) + min *
    /// d * sum(xq)`: the min term takes the sum of the quantised inputs, so
    /// their rounding meets weights centred on zero (normalised squared error
    /// about 3e-5 on Gaussian inputs, against 1.4e-4 with the exact sum; INT4's
    /// own rounding of the weights is about 6e-3). Unlike f16 inputs it has no
    /// overflow, so `hidden += W x` takes it too. Where [`int8_groups`] says.
    Int8Groups,
}

impl Products {
    pub fn for_target(target: &Target) -> Products {
        if target.shader_f16 {
            Products::Packed
        } else {
            Products::Exact
        }
    }
}

/// The input is scaled by this before it becomes f16, so that the four products
/// an f16 lane sums (nibbles up to 15) stay finite for inputs up to about 17000
/// (normalised inputs times the norm weights stay within a few thousand);
/// `X16_UNSCALE` undoes it. No guard checks larger inputs: they would give
/// infinities, which is why only normalised inputs are packed.
const X16_SCALE: &str = "0.0625";
const X16_UNSCALE: &str = "16.0";

/// `$W_xpairs(x0, x1)`: the inputs of a word as f16 pairs (k, k + 4), scaled;
/// `$W_qdot(word, pairs)`: the word's dot product with them, in f16.
fn int4_f16_helpers() -> String {
    format!(
        r#"// Inputs k and k + 4 of a word as f16 pairs, scaled by {X16_SCALE} (undone by the caller).
fn $W_xpairs(x0: vec4<f32>, x1: vec4<f32>) -> array<vec2<f16>, 4> {{
    let a = vec4<f16>(x0 * {X16_SCALE});
    let b = vec4<f16>(x1 * {X16_SCALE});
    return array<vec2<f16>, 4>(vec2<f16>(a.x, b.x), vec2<f16>(a.y, b.y), vec2<f16>(a.z, b.z), vec2<f16>(a.w, b.w));
}}

// Nibbles k and k + 4 of a word as f16: 1024 + q keeps q in the mantissa, exactly.
fn $W_qpair(word: u32, k: u32) -> vec2<f16> {{
    return vec2<f16>(unpack2x16float(((word >> (4u * k)) & 0x000f000fu) | 0x64006400u) - vec2<f32>(1024.0));
}}

// dot(q, x) of one word, eight products summed in f16.
fn $W_qdot(word: u32, x: array<vec2<f16>, 4>) -> f32 {{
    var a = $W_qpair(word, 0u) * x[0];
    a = fma($W_qpair(word, 1u), x[1], a);
    a = fma($W_qpair(word, 2u), x[2], a);
    a = fma($W_qpair(word, 3u), x[3], a);
    let f = vec2<f32>(a);
    return f.x + f.y;
}}

"#
    )
}

/// `$W_qdot4(w, x)`: dot(q, xq) of four words (four outputs) with one row's
/// int8 inputs of [`InputStaging::Int8Groups`].
const INT4_INT8_HELPERS: &str = r#"// dot(q, xq) of four words with a row's int8 inputs: the low nibbles of each
// byte meet the even inputs (x.x), the high ones the odd inputs (x.y).
fn $W_qdot4(w: vec4<u32>, x: vec2<u32>) -> vec4<i32> {
    let lo = w & vec4<u32>(0x0f0f0f0fu);
    let hi = (w >> vec4<u32>(4u)) & vec4<u32>(0x0f0f0f0fu);
    return vec4<i32>(
        dot4I8Packed(lo.x, x.x) + dot4I8Packed(hi.x, x.y),
        dot4I8Packed(lo.y, x.x) + dot4I8Packed(hi.y, x.y),
        dot4I8Packed(lo.z, x.x) + dot4I8Packed(hi.z, x.y),
        dot4I8Packed(lo.w, x.x) + dot4I8Packed(hi.w, x.y));
}

"#;

/// `<ident>_pair_dot4(oa, ob, ks)`: quads `oa` and `ob` of one INT4 matrix over
/// k-slice `ks`, against the input's int8 groups ([`Products::Int8Groups`]),
/// as gate/up reads its two matrices ([`int4_dot4_pair`]): QKV's RoPE
/// partners, four pairs at a time. `helpers` names the matrix whose `_qdot4`
/// it calls (one of the same format).
pub(crate) fn pair_dot4_int8_groups(w: &WeightMatrix<'_>, helpers: &str, streamed: bool) -> String {
    let head = format!("fn {}_pair_dot4(oa: u32, ob: u32, ks: u32) -> array<vec4<f32>, 2> {{\n", w.ident);
    match GroupStream::at(&[(w, "oa"), (w, "ob")]).filter(|_| streamed) {
        Some(stream) => head + &stream.pair_body(helpers, false),
        None => head + &int4_dot4_pair([(w, "oa"), (w, "ob")], helpers, Products::Int8Groups),
    }
}

/// `gate_up_dot4(o4, ks)`: outputs `4 o4 ..` of two matrices over k-slice `ks`,
/// for the fused gate/up kernel. Where both are INT4 or both INT8 of one format,
/// one loop reads each input once for both and loads both words of a row before
/// their products (on the H100, 7B's gate/up kernel: INT4 52.5 to 47.8 us, INT8
/// 54.5 to 47.5); else the two `_dot4` calls.
pub(crate) fn gate_up_dot4(gate: &WeightMatrix<'_>, up: &WeightMatrix<'_>, products: Products) -> String {
    let (g, u) = (gate.ident, up.ident);
    let (gp, up_) = (gate.prefix(), up.prefix());
    let fused = fuses_gate_up(gate, up);
    let head = "fn gate_up_dot4(o4: u32, ks: u32) -> array<vec4<f32>, 2> {\n".to_string();
    let stream = if products == Products::Int8Groups { GroupStream::new(&[gate, up]) } else { None };
    match gate.format {
        QuantFormat::Int4 { .. } if fused && stream.is_some() => {
            let stream = stream.expect("matched");
            head + &stream.pair_body(g, true) + "\n" + &stream.first_group()
        }
        QuantFormat::Int4 { .. } if fused => head + &int4_dot4_pair([(gate, "o4"), (up, "o4")], g, products),
        QuantFormat::Int8 { per_tensor } if fused => {
            let scale = |w: &str, p: &str| {
                if per_tensor { format!("bitcast<f32>({w}[{p}_SCALES4].x)") } else { format!("bitcast<vec4<f32>>({w}[{p}_SCALES4 + o4])") }
            };
            let shared = quad_shared_input(gate.format, products, g);
            let ga = quad_product(gate.format, products, g, "gw", "ga");
            let ua = quad_product(up.format, products, g, "uw", "ua");
            let (gs, us) = (scale(g, &gp), scale(u, &up_));
            head + &format!(
                r#"    let b0 = slice_begin({gp}_BLOCKS, ks);
    let b1 = slice_end({gp}_BLOCKS, ks);
    var ga = vec4<f32>(0.0);
    var ua = vec4<f32>(0.0);
    for (var r = b0; r < b1; r++) {{
        let gw = {g}[r * {gp}_STRIDE4 + o4];
        let uw = {u}[r * {up_}_STRIDE4 + o4];
        let x = xin4(r);
{shared}{ga}{ua}    }}
    return array<vec4<f32>, 2>(ga * {gs}, ua * {us});
}}
"#
            )
        }
        _ => head + &format!(
            "    let gate = {g}_dot4(o4, slice_begin({gp}_BLOCKS, ks), slice_end({gp}_BLOCKS, ks));\n    let up = {u}_dot4(o4, slice_begin({up_}_BLOCKS, ks), slice_end({up_}_BLOCKS, ks));\n    return array<vec4<f32>, 2>(gate, up);\n}}\n"
        ),
    }
}

/// The body of a function returning the quads of two INT4 matrices of one
/// group size, `(matrix, quad)` each, over k-slice `ks`: one loop reads each
/// input once for both and loads both words of a row before their products;
/// `helpers` names the matrix whose product helpers both use. Per group the
/// products are in i32 against the int8 groups, else in f32 (or f16 pairs)
/// against the input with its sum beside them.
fn int4_dot4_pair(
    [(gate, ga_at), (up, ua_at)]: [(&WeightMatrix<'_>, &str); 2],
    helpers: &str,
    products: Products,
) -> String {
    let (g, u, h) = (gate.ident, up.ident, helpers);
    let (gp, up_) = (gate.prefix(), up.prefix());
    let (zero, sums, row, combine) = if products == Products::Int8Groups {
        (
            "vec4<i32>(0)",
            "",
            format!("            let x = xq_groups[r];\n            gq += {h}_qdot4(gw, x);\n            uq += {h}_qdot4(uw, x);\n"),
            "        let xd = xd_groups[g];\n        ga += half_lo(gsm) * (vec4<f32>(gq) * xd.x) + half_hi(gsm) * xd.y;\n        ua += half_lo(usm) * (vec4<f32>(uq) * xd.x) + half_hi(usm) * xd.y;\n".to_string(),
        )
    } else {
        let shared = indent(&quad_shared_input(gate.format, products, h), 4);
        let gq = indent(&quad_product(gate.format, products, h, "gw", "gq"), 4);
        // the second matrix shares the first one's helpers (Dot4Use::Layout)
        let uq = indent(&quad_product(up.format, products, h, "uw", "uq"), 4);
        let unscale = if products != Products::Exact { format!(" * {X16_UNSCALE}") } else { String::new() };
        (
            "vec4<f32>(0.0)",
            "        var xsum = 0.0;\n",
            format!("            let x0 = xin4(2u * r);\n            let x1 = xin4(2u * r + 1u);\n{shared}{gq}{uq}            xsum += dot(x0 + x1, vec4<f32>(1.0));\n"),
            format!("        ga += half_lo(gsm) * gq{unscale} + half_hi(gsm) * xsum;\n        ua += half_lo(usm) * uq{unscale} + half_hi(usm) * xsum;\n"),
        )
    };
    format!(
        r#"    let b0 = slice_begin({gp}_BLOCKS, ks);
    let b1 = slice_end({gp}_BLOCKS, ks);
    var ga = vec4<f32>(0.0);
    var ua = vec4<f32>(0.0);
    for (var g = b0; g < b1; g++) {{
        let gsm = {g}[{gp}_SCALES4 + g * {gp}_SCALE_STRIDE4 + {ga_at}];
        let usm = {u}[{up_}_SCALES4 + g * {up_}_SCALE_STRIDE4 + {ua_at}];
        var gq = {zero};
        var uq = {zero};
{sums}        for (var k = 0u; k < {gp}_GROUP_ROWS; k++) {{
            let r = g * {gp}_GROUP_ROWS + k;
            let gw = {g}[r * {gp}_STRIDE4 + {ga_at}];
            let uw = {u}[r * {up_}_STRIDE4 + {ua_at}];
{row}        }}
{combine}    }}
    return array<vec4<f32>, 2>(ga, ua);
}}
"#
    )
}

/// Rows of a weight group up to which the int8-group loops stream their
/// weights ([`GroupStream`]): two groups' words of two matrices stay in
/// registers (20 vec4 at 4 rows); wider groups keep the plain loop.
const STREAMED_GROUP_ROWS: usize = 4;

/// The int8-group loop of a kernel reading quads of one or two INT4 matrices
/// (a projection, gate and up, or a QKV matrix at a quad and its RoPE
/// partner), its weights streamed: each iteration loads the next group's words
/// before the current group's products. Gate/up and the projections load the
/// first group's words in `first_group(o4, b0)`, which the entry calls before
/// it stages the input (the loads need not wait for the staging); QKV, whose
/// invocations pick their matrix, loads it in the loop's function. On the
/// H100, Llama-2-7B INT4 decode went from 2.82 to 2.73 ms a token (gate/up
/// 32.0 to 31.0 us, down 20.2 to 19.7, output projection 13.6 to 12.8),
/// Llama-3.2-1B INT4 from 0.79 to 0.76. Streamed gate/up and QKV take shapes
/// of their own ([`STREAMED_TARGET_WORKGROUPS`]); the projections keep those
/// of [`MatvecShape::int8_group_quads`].
pub(crate) struct GroupStream<'a> {
    mats: Vec<&'a WeightMatrix<'a>>,
    /// Each matrix's quad: an expression.
    quads: Vec<&'a str>,
    rows: usize,
}

impl<'a> GroupStream<'a> {
    /// The stream over `mats` (INT4 of one group size, read with
    /// [`Products::Int8Groups`]); `None` where their groups are too wide.
    pub fn new(mats: &[&'a WeightMatrix<'a>]) -> Option<GroupStream<'a>> {
        let QuantFormat::Int4 { group_size, .. } = mats.first()?.format else { return None };
        let rows = group_size as usize / 8;
        let same = mats.iter().all(|m| matches!(m.format, QuantFormat::Int4 { group_size: g, .. } if g == group_size));
        (same && rows <= STREAMED_GROUP_ROWS).then(|| GroupStream {
            mats: mats.to_vec(),
            quads: vec!["o4"; mats.len()],
            rows,
        })
    }

    /// The stream over `(matrix, quad)` pairs, each matrix read at its own quad.
    pub fn at(mats: &[(&'a WeightMatrix<'a>, &'a str)]) -> Option<GroupStream<'a>> {
        let ms: Vec<&'a WeightMatrix<'a>> = mats.iter().map(|(m, _)| *m).collect();
        let mut stream = GroupStream::new(&ms)?;
        stream.quads = mats.iter().map(|(_, q)| *q).collect();
        Some(stream)
    }

    /// `let` (or `var`) bindings `m<i>_s<suffix>` and `m<i>_w<k><suffix>`:
    /// each matrix's scales and words of group `g` at quad `o4`.
    fn loads(&self, g: &str, suffix: &str, decl: &str) -> String {
        let mut s = String::new();
        for (i, (m, o4)) in self.mats.iter().zip(&self.quads).enumerate() {
            let (w, p) = (m.ident, m.prefix());
            s += &format!("{decl}m{i}_s{suffix} = {w}[{p}_SCALES4 + {g} * {p}_SCALE_STRIDE4 + {o4}];\n");
            for k in 0..self.rows {
                s += &format!("{decl}m{i}_w{k}{suffix} = {w}[({g} * {p}_GROUP_ROWS + {k}u) * {p}_STRIDE4 + {o4}];\n");
            }
        }
        s
    }

    /// The registers of the first group and `first_group(o4, b0)`, which loads them.
    pub fn first_group(&self) -> String {
        let mut s = "// The first group's words, loaded before the input is staged.\n".to_string();
        for i in 0..self.mats.len() {
            s += &format!("var<private> m{i}_s_first: vec4<u32>;\n");
            for k in 0..self.rows {
                s += &format!("var<private> m{i}_w{k}_first: vec4<u32>;\n");
            }
        }
        let p = self.mats[0].prefix();
        s + &format!(
            "\nfn first_group(o4: u32, b0: u32) {{\n    let g = min(b0, {p}_BLOCKS - 1u);\n{}}}\n",
            indent(&self.loads("g", "_first", ""), 4)
        )
    }

    /// The body of a function of k-slice `ks` returning the sums of two
    /// matrices: [`GroupStream::group_loop`] over the slice's groups.
    pub fn pair_body(&self, helpers: &str, hoisted: bool) -> String {
        let p = self.mats[0].prefix();
        format!(
            "    let b0 = slice_begin({p}_BLOCKS, ks);\n    let b1 = slice_end({p}_BLOCKS, ks);\n{}    return array<vec4<f32>, 2>(acc0, acc1);\n}}\n",
            self.group_loop(helpers, hoisted)
        )
    }

    /// The loop over groups `[b0, b1)`, each matrix at its own quad, leaving
    /// their sums in `acc0`, `acc1`; `helpers` names the matrix whose `_qdot4`
    /// it calls. With `hoisted`, the first group's words come from
    /// [`GroupStream::first_group`]'s registers, else the loop loads them.
    pub fn group_loop(&self, helpers: &str, hoisted: bool) -> String {
        let p = self.mats[0].prefix();
        let mut s = String::new();
        for i in 0..self.mats.len() {
            s += &format!("    var acc{i} = vec4<f32>(0.0);\n");
            if hoisted {
                s += &format!("    var m{i}_s = m{i}_s_first;\n");
                for k in 0..self.rows {
                    s += &format!("    var m{i}_w{k} = m{i}_w{k}_first;\n");
                }
            }
        }
        if !hoisted {
            s += &format!("    let first = min(b0, {p}_BLOCKS - 1u);\n");
            s += &indent(&self.loads("first", "", "var "), 4);
        }
        s += "    for (var g = b0; g < b1; g++) {\n        // the last group loads itself again: cached\n        let next = min(g + 1u, b1 - 1u);\n";
        s += &indent(&self.loads("next", "_next", "let "), 8);
        for k in 0..self.rows {
            s += &format!("        let x{k} = xq_groups[g * {p}_GROUP_ROWS + {k}u];\n");
        }
        s += "        let xd = xd_groups[g];\n";
        for i in 0..self.mats.len() {
            let q: Vec<String> = (0..self.rows).map(|k| format!("{helpers}_qdot4(m{i}_w{k}, x{k})")).collect();
            s += &format!(
                "        let q{i} = {};\n        acc{i} += half_lo(m{i}_s) * (vec4<f32>(q{i}) * xd.x) + half_hi(m{i}_s) * xd.y;\n        m{i}_s = m{i}_s_next;\n",
                q.join(" + ")
            );
            for k in 0..self.rows {
                s += &format!("        m{i}_w{k} = m{i}_w{k}_next;\n");
            }
        }
        s + "    }\n"
    }
}

/// Per row of a four-output dot product, what all its matrices share: the
/// input made f16 pairs (INT4) or int8 (INT8) for packed products. `first` is
/// the matrix whose helper functions it calls. Indented for a loop body.
fn quad_shared_input(format: QuantFormat, products: Products, first: &str) -> String {
    match (format, products) {
        (QuantFormat::Int4 { .. }, Products::Packed | Products::PackedRows) => {
            format!("        let xp = {first}_xpairs(x0, x1);\n")
        }
        (QuantFormat::Int8 { .. }, Products::PackedRows) => {
            "        let xq = xq_rows[r];\n        let xd = xd_rows[r];\n".to_string()
        }
        (QuantFormat::Int8 { .. }, Products::Packed) => format!(
            "        // the row's four inputs as int8 at a scale of their own, then one\n        // dot4I8Packed per output\n{}",
            indent(INT8_ROW, 8)
        ),
        _ => String::new(),
    }
}

/// A row `x` of four inputs as int8 (`xq`) at a scale of its own (`xd`).
const INT8_ROW: &str = "let m = max(max(abs(x.x), abs(x.y)), max(abs(x.z), abs(x.w)));\nlet xq = pack4xI8Clamp(vec4<i32>(round(x * (127.0 / max(m, 1e-30)))));\nlet xd = m / 127.0;\n";

/// Workgroup memory an [`int8_row_cache`] may take.
const INT8_ROW_CACHE_BYTES: usize = 8192;

/// Whether [`int8_row_cache`] fits an input of `in_features`.
pub(crate) fn int8_row_cache_fits(in_features: usize) -> bool {
    in_features.is_multiple_of(4) && in_features / 4 * 8 <= INT8_ROW_CACHE_BYTES
}

/// `cache_input_rows()`: every row of four inputs quantised once for
/// [`Products::PackedRows`]; `load_input` calls it last
/// ([`InputStaging::Int8Rows`]; it holds a barrier). Each invocation had
/// quantised every row it read, as had its workgroup's other output quads: on
/// the H100, Llama-3.2-1B's INT8 logits kernel went
/// from 109 to 95 us (Llama-2-7B's from 62 to 61).
fn int8_row_cache() -> String {
    format!(
        r#"var<workgroup> xq_rows: array<u32, IN4>;
var<workgroup> xd_rows: array<f32, IN4>;

fn cache_input_rows() {{
    for (var r = lid; r < IN4; r += WG) {{
        let x = xin4(r);
{}        xq_rows[r] = xq;
        xd_rows[r] = xd;
    }}
    workgroupBarrier();
}}
"#,
        indent(INT8_ROW, 8)
    )
}

/// Per row of a four-output dot product, matrix `ident`'s products of its word
/// `w` with the input, added to `acc` (INT4: x0, x1; INT8: x).
fn quad_product(format: QuantFormat, products: Products, ident: &str, w: &str, acc: &str) -> String {
    match (format, products) {
        (QuantFormat::Int4 { .. }, Products::Exact) => format!(
            "        for (var e = 0u; e < 4u; e++) {{\n            {acc} += vec4<f32>(({w} >> vec4<u32>(4u * e)) & vec4<u32>(15u)) * x0[e];\n            {acc} += vec4<f32>(({w} >> vec4<u32>(4u * e + 16u)) & vec4<u32>(15u)) * x1[e];\n        }}\n"
        ),
        (QuantFormat::Int4 { .. }, Products::Packed | Products::PackedRows) => format!(
            "        {acc} += vec4<f32>({ident}_qdot({w}.x, xp), {ident}_qdot({w}.y, xp), {ident}_qdot({w}.z, xp), {ident}_qdot({w}.w, xp));\n"
        ),
        (QuantFormat::Int8 { .. }, Products::Exact) => format!(
            "        for (var e = 0u; e < 4u; e++) {{\n            {acc} += vec4<f32>(bitcast<vec4<i32>>({w} << vec4<u32>(24u - 8u * e)) >> vec4<u32>(24u)) * x[e];\n        }}\n"
        ),
        (QuantFormat::Int8 { .. }, Products::Packed | Products::PackedRows) => format!(
            "        {acc} += vec4<f32>(vec4<i32>(dot4I8Packed({w}.x, xq), dot4I8Packed({w}.y, xq), dot4I8Packed({w}.z, xq), dot4I8Packed({w}.w, xq))) * xd;\n"
        ),
        _ => unreachable!("four-output rows of {format:?} are written in dot4_functions"),
    }
}

/// `text` with every non-empty line indented by `n` more spaces.
pub(crate) fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("{pad}{l}\n") }).collect()
}

/// A packed weight matrix bound as `array<u32>`: its data region followed by
/// its scale region (see [`weight_buffer_words`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct WeightMatrix<'a> {
    /// WGSL identifier of the binding (`wq`); its constants use the upper-case prefix.
    pub ident: &'a str,
    pub format: QuantFormat,
    pub out: usize,
    pub in_features: usize,
}

/// Word offset of the scales within a weight buffer, and the buffer's total words.
///
/// A weight buffer holds one tensor part: its `data` region, then its `scales`
/// region (if any), both exactly as in the shard.
pub fn weight_buffer_words(format: QuantFormat, out: usize, in_features: usize) -> Result<(u64, u64), FormatError> {
    let s = part_sizes(format, out, in_features)?;
    Ok((s.data_bytes / 4, (s.data_bytes + s.scale_bytes) / 4))
}

impl WeightMatrix<'_> {
    fn prefix(&self) -> String {
        self.ident.to_ascii_uppercase()
    }

    /// Number of blocks the dot product walks: stored rows, or INT4 groups.
    pub fn blocks(&self) -> usize {
        match self.format {
            QuantFormat::Int4 { group_size, .. } => self.in_features / group_size as usize,
            QuantFormat::F32 | QuantFormat::F16 | QuantFormat::Bf16 | QuantFormat::Int8 { .. } => {
                self.in_features / pack_factor(self.format)
            }
        }
    }

    /// Layout constants plus the reads `dot` asks for: `<ident>_elem(o, i)`, or
    /// `<ident>_dot(o, b0, b1)` (the dot product of output `o` with inputs
    /// `xin(i)` over blocks `[b0, b1)`), or `<ident>_dot2(oa, ob, b0, b1)` for
    /// two outputs. The dot functions load runs of blocks before using any
    /// ([`WeightMatrix::loads_first_dot`]), and so assume what the k-slices of
    /// [`MatvecShape`] give: at most `slice` blocks a call, starting at a
    /// multiple of `slice`.
    pub fn functions(&self, dot: DotUse) -> Result<String, FormatError> {
        let sizes = part_sizes(self.format, self.out, self.in_features)?;
        let p = self.prefix();
        let mut s = format!(
            "// {ident}: {desc}, {out} outputs x {inp} inputs, column-major packed.\nconst {p}_STRIDE: u32 = {stride}u;\n",
            ident = self.ident,
            desc = describe(self.format),
            out = self.out,
            inp = self.in_features,
            stride = sizes.row_stride / 4
        );
        s += &format!("const {p}_BLOCKS: u32 = {}u;\n", self.blocks());
        if sizes.scale_bytes > 0 {
            s += &format!(
                "const {p}_SCALES: u32 = {}u;\nconst {p}_SCALE_STRIDE: u32 = {}u;\n",
                sizes.data_bytes / 4,
                sizes.scale_stride / 4
            );
        }
        let vars = [("W", self.ident), ("P", p.as_str())];
        let body = match self.format {
            QuantFormat::F32 => return Err(FormatError::NotMatrix),
            QuantFormat::F16 => {
                // unpack2x16float is exact; bitcast<vec2<f16>> of a word miscompiles on
                // some Vulkan drivers (llvmpipe), so every target unpacks the same way.
                let unpack = "unpack2x16float($W[r * $P_STRIDE + o])";
                fill(
                    &format!(
                        r#"fn $W_word(o: u32, r: u32) -> vec2<f32> {{
    return {unpack};
}}

// Word pairs (r even) meet the input four elements at a time.
fn $W_dot(o: u32, b0: u32, b1: u32) -> f32 {{
    var acc = 0.0;
    var r = b0;
    if ((r & 1u) == 1u && r < b1) {{
        let w = $W_word(o, r);
        acc += w.x * xin(2u * r) + w.y * xin(2u * r + 1u);
        r++;
    }}
    for (; r + 1u < b1; r += 2u) {{
        acc += dot(vec4<f32>($W_word(o, r), $W_word(o, r + 1u)), xin4(r / 2u));
    }}
    if (r < b1) {{
        let w = $W_word(o, r);
        acc += w.x * xin(2u * r) + w.y * xin(2u * r + 1u);
    }}
    return acc;
}}

fn $W_elem(o: u32, i: u32) -> f32 {{
    let r = i / 2u;
    let w = {unpack};
    return w[i % 2u];
}}
"#
                    ),
                    &vars,
                )
            }
            QuantFormat::Bf16 => fill(
                r#"fn $W_bf16(word: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
}

// Word pairs (r even) meet the input four elements at a time.
fn $W_dot(o: u32, b0: u32, b1: u32) -> f32 {
    var acc = 0.0;
    var r = b0;
    if ((r & 1u) == 1u && r < b1) {
        let w = $W_bf16($W[r * $P_STRIDE + o]);
        acc += w.x * xin(2u * r) + w.y * xin(2u * r + 1u);
        r++;
    }
    for (; r + 1u < b1; r += 2u) {
        let w = vec4<f32>($W_bf16($W[r * $P_STRIDE + o]), $W_bf16($W[(r + 1u) * $P_STRIDE + o]));
        acc += dot(w, xin4(r / 2u));
    }
    if (r < b1) {
        let w = $W_bf16($W[r * $P_STRIDE + o]);
        acc += w.x * xin(2u * r) + w.y * xin(2u * r + 1u);
    }
    return acc;
}

fn $W_elem(o: u32, i: u32) -> f32 {
    let w = $W_bf16($W[(i / 2u) * $P_STRIDE + o]);
    return w[i % 2u];
}
"#,
                &vars,
            ),
            QuantFormat::Int8 { per_tensor } => {
                let scale = if per_tensor { "bitcast<f32>($W[$P_SCALES])" } else { "bitcast<f32>($W[$P_SCALES + o])" };
                fill(
                    &format!(
                        r#"fn $W_dot(o: u32, b0: u32, b1: u32) -> f32 {{
    var acc = 0.0;
    for (var r = b0; r < b1; r++) {{
        let q = vec4<f32>(unpack4xI8($W[r * $P_STRIDE + o]));
        acc += dot(q, xin4(r));
    }}
    return acc * {scale};
}}

fn $W_elem(o: u32, i: u32) -> f32 {{
    let q = unpack4xI8($W[(i / 4u) * $P_STRIDE + o]);
    return f32(q[i % 4u]) * {scale};
}}
"#
                    ),
                    &vars,
                )
            }
            QuantFormat::Int4 { group_size, .. } => {
                s += &format!("const {p}_GROUP_ROWS: u32 = {}u;\n", group_size / 8);
                fill(
                    r#"// Nibbles k = 0..3 and 4..7 of a word, as f32.
fn $W_nibbles(word: u32) -> array<vec4<f32>, 2> {
    let lo = vec4<u32>(word, word >> 4u, word >> 8u, word >> 12u) & vec4<u32>(15u);
    let hi = vec4<u32>(word >> 16u, word >> 20u, word >> 24u, word >> 28u) & vec4<u32>(15u);
    return array<vec4<f32>, 2>(vec4<f32>(lo), vec4<f32>(hi));
}

// Blocks are groups: w = scale * q + min, so a group contributes
// scale * dot(q, x) + min * sum(x).
fn $W_dot(o: u32, b0: u32, b1: u32) -> f32 {
    var acc = 0.0;
    for (var g = b0; g < b1; g++) {
        let sm = unpack2x16float($W[$P_SCALES + g * $P_SCALE_STRIDE + o]);
        var qx = 0.0;
        var xsum = 0.0;
        for (var k = 0u; k < $P_GROUP_ROWS; k++) {
            let r = g * $P_GROUP_ROWS + k;
            let q = $W_nibbles($W[r * $P_STRIDE + o]);
            let x0 = xin4(2u * r);
            let x1 = xin4(2u * r + 1u);
            qx += dot(q[0], x0) + dot(q[1], x1);
            xsum += dot(x0 + x1, vec4<f32>(1.0));
        }
        acc += sm.x * qx + sm.y * xsum;
    }
    return acc;
}

fn $W_elem(o: u32, i: u32) -> f32 {
    let q = f32(($W[(i / 8u) * $P_STRIDE + o] >> (4u * (i % 8u))) & 15u);
    let sm = unpack2x16float($W[$P_SCALES + (i / ($P_GROUP_ROWS * 8u)) * $P_SCALE_STRIDE + o]);
    return sm.x * q + sm.y;
}
"#,
                    &vars,
                )
            }
        };
        let dot_signature = format!("fn {}_dot(", self.ident);
        let body = match dot {
            DotUse::Elem => body,
            DotUse::One { slice } => match self.loads_first_dot(slice, Outputs::One) {
                Some(f) => replace_function(&body, &dot_signature, &fill(&f, &vars)),
                None => body,
            },
            DotUse::Pair { slice } => match self.loads_first_dot(slice, Outputs::Pair) {
                Some(f) => replace_function(&body, &dot_signature, &fill(&f, &vars)),
                None => body + "\n" + &fill(PAIR_FROM_ONE, &vars),
            },
        };
        s.push('\n');
        s += &select_functions(&body, &format!("fn {}_", self.ident), dot != DotUse::Elem);
        Ok(s)
    }

    /// Words of the weight buffer one block takes (data and scale).
    fn words_per_block(&self) -> usize {
        match self.format {
            QuantFormat::Int4 { group_size, .. } => group_size as usize / 8 + 1,
            QuantFormat::F32 | QuantFormat::F16 | QuantFormat::Bf16 | QuantFormat::Int8 { .. } => 1,
        }
    }

    /// `$W_dot` (or `$W_dot2` for a pair of outputs) with every word of a run
    /// of blocks loaded (indices clamped into the matrix) before the first
    /// product, so that an invocation has them all in flight at once rather than
    /// one block's after another's: the whole slice as straight-line code where
    /// it takes at most [`SHORT_SLICE_WORDS`] words, else a loop over runs of
    /// [`RUN_WORDS`]. `None` for F32, and for slices of F16 or BF16 rows of odd
    /// length, whose rows could not be taken in pairs.
    fn loads_first_dot(&self, slice: usize, outs: Outputs) -> Option<String> {
        let pairs = matches!(self.format, QuantFormat::F16 | QuantFormat::Bf16);
        // rows of two inputs meet the input in pairs, so every run must start at an even row
        if slice == 0 || (pairs && slice % 2 == 1) || self.format == QuantFormat::F32 {
            return None;
        }
        let per_block = self.words_per_block();
        let (run, base, indent) = if slice * per_block <= SHORT_SLICE_WORDS {
            (slice, "b0", "    ")
        } else if pairs {
            (PAIR_RUN_WORDS, "bc", "        ")
        } else {
            ((RUN_WORDS / per_block).max(1), "bc", "        ")
        };
        let (loads, products) = self.run_code(run, base, indent, outs);
        let result = match self.format {
            QuantFormat::Int8 { per_tensor: true } => "acc * bitcast<f32>($W[$P_SCALES])".to_string(),
            QuantFormat::Int8 { per_tensor: false } => {
                format!("acc * {}", outs.join(|o, _| format!("bitcast<f32>($W[$P_SCALES + {o}])")))
            }
            _ => "acc".to_string(),
        };
        let signature = outs.signature();
        let acc = outs.zero();
        let body = if base == "b0" {
            format!(
                "// At most {slice} blocks, every word loaded before the first product (on the H100,\n// SmolLM2's gate/up kernel: 17.7 to 14.1 us in the bench).\n{signature} {{\n{loads}    var acc = {acc};\n{products}"
            )
        } else {
            format!(
                "// Runs of {run} blocks, each run's words loaded before its first product (on the H100,\n// Llama-2-7B's INT4 down projection: 40 to 30 us).\n{signature} {{\n    var acc = {acc};\n    for (var bc = b0; bc < b1; bc += {run}u) {{\n{loads}{products}    }}\n"
            )
        };
        Some(body + &format!("    return {result};\n}}\n"))
    }

    /// Loads, then products, of blocks `base + 0 .. base + n` (clamped loads,
    /// products only of blocks below `b1`), for each output of `outs`; the
    /// outputs share their input reads.
    fn run_code(&self, n: usize, base: &str, ind: &str, outs: Outputs) -> (String, String) {
        let mut loads = String::new();
        let mut products = String::new();
        let each = |f: &dyn Fn(&str, &str) -> String| outs.names().iter().map(|(o, s)| f(o, s)).collect::<String>();
        for i in 0..n {
            loads += &format!("{ind}let blk{i} = min({base} + {i}u, $P_BLOCKS - 1u);\n");
            let product = match self.format {
                QuantFormat::F32 => unreachable!("no loads-first dot for F32"),
                QuantFormat::F16 | QuantFormat::Bf16 => {
                    loads += &each(&|o, s| format!("{ind}let w{i}{s} = $W[blk{i} * $P_STRIDE + {o}];\n"));
                    if i % 2 == 1 {
                        continue;
                    }
                    let decode = if self.format == QuantFormat::F16 { "unpack2x16float" } else { "$W_bf16" };
                    let (a, b) = (i, i + 1);
                    let ind2 = format!("{ind}    ");
                    let whole = each(&|_, s| {
                        format!("{ind2}let wa{s} = {decode}(w{a}{s});\n{ind2}let wb{s} = {decode}(w{b}{s});\n")
                    });
                    let whole_sum =
                        outs.join(|_, s| format!("wa{s}.x * x.x + wa{s}.y * x.y + wb{s}.x * x.z + wb{s}.y * x.w"));
                    let single = each(&|_, s| format!("{ind2}let w{s} = {decode}(w{a}{s});\n"));
                    let single_sum = outs.join(|_, s| format!("w{s}.x * xa + w{s}.y * xb"));
                    // a whole pair (then unclamped, blk{a} even) at one input load, else row {a} alone
                    products += &format!(
                        "{ind}if ({base} + {b}u < b1) {{\n{ind2}let x = xin4(blk{a} / 2u);\n{whole}{ind2}acc += {whole_sum};\n{ind}}} else if ({base} + {a}u < b1) {{\n{ind2}let xa = xin(2u * blk{a});\n{ind2}let xb = xin(2u * blk{a} + 1u);\n{single}{ind2}acc += {single_sum};\n{ind}}}\n"
                    );
                    continue;
                }
                QuantFormat::Int8 { .. } => {
                    loads += &each(&|o, s| format!("{ind}let w{i}{s} = $W[blk{i} * $P_STRIDE + {o}];\n"));
                    let sum = outs.join(|_, s| format!("dot(vec4<f32>(unpack4xI8(w{i}{s})), x)"));
                    format!("let x = xin4(blk{i});\n{ind}    acc += {sum};")
                }
                QuantFormat::Int4 { group_size, .. } => {
                    loads +=
                        &each(&|o, s| format!("{ind}let s{i}{s} = $W[$P_SCALES + blk{i} * $P_SCALE_STRIDE + {o}];\n"));
                    let mut p = each(&|_, s| format!("var qx{s} = 0.0;\n{ind}    "));
                    p += "var xsum = 0.0;\n";
                    for k in 0..group_size / 8 {
                        loads += &each(&|o, s| {
                            format!("{ind}let w{i}_{k}{s} = $W[(blk{i} * $P_GROUP_ROWS + {k}u) * $P_STRIDE + {o}];\n")
                        });
                        let row = each(&|_, s| {
                            format!("{ind}        let q{s} = $W_nibbles(w{i}_{k}{s});\n{ind}        qx{s} += dot(q{s}[0], x0) + dot(q{s}[1], x1);\n")
                        });
                        p += &format!(
                            "{ind}    {{\n{ind}        let r = blk{i} * $P_GROUP_ROWS + {k}u;\n{ind}        let x0 = xin4(2u * r);\n{ind}        let x1 = xin4(2u * r + 1u);\n{row}{ind}        xsum += dot(x0 + x1, vec4<f32>(1.0));\n{ind}    }}\n"
                        );
                    }
                    p += &each(&|_, s| format!("{ind}    let sm{s} = unpack2x16float(s{i}{s});\n"));
                    p + &format!("{ind}    acc += {};", outs.join(|_, s| format!("sm{s}.x * qx{s} + sm{s}.y * xsum")))
                }
            };
            products += &format!("{ind}if ({base} + {i}u < b1) {{\n{ind}    {product}\n{ind}}}\n");
        }
        (loads, products)
    }
}

/// What reads of a weight matrix bound as `array<u32>` (outputs read one at a
/// time) a kernel wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DotUse {
    /// `<ident>_elem(o, i)` alone.
    Elem,
    /// `<ident>_dot(o, b0, b1)` over at most `slice` blocks a call.
    One { slice: usize },
    /// `<ident>_dot2(oa, ob, b0, b1)`: two outputs that share their input reads
    /// (RoPE's rotation partners). On the H100, Llama-2-7B's INT4 QKV kernel
    /// went from 42 to 35 us against two `_dot` calls.
    Pair { slice: usize },
}

/// The outputs a dot function computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outputs {
    One,
    Pair,
}

impl Outputs {
    /// (output index, suffix of its values) per output.
    fn names(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Outputs::One => &[("o", "")],
            Outputs::Pair => &[("oa", "a"), ("ob", "b")],
        }
    }

    fn signature(self) -> &'static str {
        match self {
            Outputs::One => "fn $W_dot(o: u32, b0: u32, b1: u32) -> f32",
            Outputs::Pair => "fn $W_dot2(oa: u32, ob: u32, b0: u32, b1: u32) -> vec2<f32>",
        }
    }

    fn zero(self) -> &'static str {
        match self {
            Outputs::One => "0.0",
            Outputs::Pair => "vec2<f32>(0.0)",
        }
    }

    /// One expression per output, made one value (a vec2 for a pair).
    fn join(self, f: impl Fn(&str, &str) -> String) -> String {
        let parts: Vec<String> = self.names().iter().map(|(o, s)| f(o, s)).collect();
        match self {
            Outputs::One => parts[0].clone(),
            Outputs::Pair => format!("vec2<f32>({}, {})", parts[0], parts[1]),
        }
    }
}

/// `$W_dot2` where `$W_dot` does not load first: two calls.
const PAIR_FROM_ONE: &str = "fn $W_dot2(oa: u32, ob: u32, b0: u32, b1: u32) -> vec2<f32> {\n    return vec2<f32>($W_dot(oa, b0, b1), $W_dot(ob, b0, b1));\n}\n";

/// Words of weights per output one invocation of a matrix-vector kernel loads
/// all at once before its products where its whole slice of the input is this
/// short (see [`WeightMatrix::loads_first_dot`]); a `_dot2` loads twice as many.
pub(crate) const SHORT_SLICE_WORDS: usize = 16;

/// Words per run of a longer slice: two INT4 groups of 32. On the H100, runs of
/// four groups made Llama-2-7B's output projection slower (22 to 31 us).
pub(crate) const RUN_WORDS: usize = 10;

/// Words per run for F16 and BF16 (an even count: rows meet the input in
/// pairs). Runs of ten made the H100's Llama-2-7B F16 one-output kernels
/// slower: QKV 48.9 against 50.2 us, down projection 56.5 against 57.4,
/// output projection 23.9 against 25.3 (runs of 20 and 30 slower still).
pub(crate) const PAIR_RUN_WORDS: usize = 6;

/// Whether [`gate_up_dot4`] reads both matrices in one loop (it calls their
/// `_dot4` functions otherwise).
pub(crate) fn fuses_gate_up(gate: &WeightMatrix<'_>, up: &WeightMatrix<'_>) -> bool {
    gate.format == up.format
        && gate.in_features == up.in_features
        && matches!(gate.format, QuantFormat::Int4 { .. } | QuantFormat::Int8 { .. })
}

/// Whether a blank-line-separated chunk of WGSL defines the function `signature` starts.
fn defines(chunk: &str, signature: &str) -> bool {
    chunk.lines().any(|l| l.starts_with(signature))
}

/// `body` without the blank-line-separated chunk that defines `signature`.
fn without_function(body: &str, signature: &str) -> String {
    body.split("\n\n").filter(|chunk| !defines(chunk, signature)).collect::<Vec<_>>().join("\n\n")
}

/// `body` with the blank-line-separated chunk that defines `signature` replaced by `function`.
fn replace_function(body: &str, signature: &str, function: &str) -> String {
    debug_assert_eq!(body.split("\n\n").filter(|c| defines(c, signature)).count(), 1, "one definition of {signature}");
    body.split("\n\n")
        .map(|chunk| if defines(chunk, signature) { function.trim_end() } else { chunk })
        .collect::<Vec<_>>()
        .join("\n\n")
}

impl WeightMatrix<'_> {
    /// For matrix-vector kernels that read four outputs at a load (binding
    /// `array<vec4<u32>>`, rows padded to 64 bytes): layout constants and
    /// `<ident>_dot4(o4, b0, b1)`, the dot products of outputs `4 o4 .. 4 o4 + 4`
    /// with the input over blocks `[b0, b1)` (the blocks of [`WeightMatrix::blocks`]).
    /// Each input is read once for four outputs. Needs `half_lo` / `half_hi`
    /// ([`TileRead::Quad`]) for F16 and INT4.
    ///
    /// `reads` may leave `<ident>_dot4` out, or its helpers too: see [`Dot4Use`].
    pub fn dot4_functions(&self, products: Products, reads: Dot4Use) -> Result<String, FormatError> {
        let sizes = part_sizes(self.format, self.out, self.in_features)?;
        let p = self.prefix();
        let mut s = format!(
            "// {ident}: {desc}, {out} outputs x {inp} inputs, column-major packed, read four outputs at a load.\nconst {p}_STRIDE4: u32 = {stride}u;\nconst {p}_BLOCKS: u32 = {blocks}u;\n",
            ident = self.ident,
            desc = describe(self.format),
            out = self.out,
            inp = self.in_features,
            stride = sizes.row_stride / 16,
            blocks = self.blocks(),
        );
        if sizes.scale_bytes > 0 {
            s += &format!(
                "const {p}_SCALES4: u32 = {}u;\nconst {p}_SCALE_STRIDE4: u32 = {}u;\n",
                sizes.data_bytes / 16,
                sizes.scale_stride / 16
            );
        }
        // F16 and BF16 meet the input four elements (two rows) at a time
        let pairs = |lo: &str, hi: &str| {
            format!(
                r#"fn $W_dot4(o4: u32, b0: u32, b1: u32) -> vec4<f32> {{
    var acc = vec4<f32>(0.0);
    var r = b0;
    if ((r & 1u) == 1u && r < b1) {{
        let w = $W[r * $P_STRIDE4 + o4];
        acc += {lo}(w) * xin(2u * r) + {hi}(w) * xin(2u * r + 1u);
        r++;
    }}
    for (; r + 1u < b1; r += 2u) {{
        let x = xin4(r / 2u);
        let w0 = $W[r * $P_STRIDE4 + o4];
        let w1 = $W[(r + 1u) * $P_STRIDE4 + o4];
        acc += {lo}(w0) * x.x + {hi}(w0) * x.y + {lo}(w1) * x.z + {hi}(w1) * x.w;
    }}
    if (r < b1) {{
        let w = $W[r * $P_STRIDE4 + o4];
        acc += {lo}(w) * xin(2u * r) + {hi}(w) * xin(2u * r + 1u);
    }}
    return acc;
}}
"#
            )
        };
        let body = match self.format {
            QuantFormat::F32 => return Err(FormatError::NotMatrix),
            QuantFormat::F16 => pairs("half_lo", "half_hi"),
            QuantFormat::Bf16 => {
                "fn $W_bf16_lo(w: vec4<u32>) -> vec4<f32> {\n    return bitcast<vec4<f32>>(w << vec4<u32>(16u));\n}\n\nfn $W_bf16_hi(w: vec4<u32>) -> vec4<f32> {\n    return bitcast<vec4<f32>>(w & vec4<u32>(0xffff0000u));\n}\n\n".to_string()
                    + &pairs("$W_bf16_lo", "$W_bf16_hi")
            }
            QuantFormat::Int8 { per_tensor } => {
                let scale = if per_tensor { "bitcast<f32>($W[$P_SCALES4].x)" } else { "bitcast<vec4<f32>>($W[$P_SCALES4 + o4])" };
                let shared = quad_shared_input(self.format, products, "$W");
                let product = quad_product(self.format, products, "$W", "w", "acc");
                let x = if products == Products::PackedRows { "" } else { "        let x = xin4(r);\n" };
                format!(
                    r#"fn $W_dot4(o4: u32, b0: u32, b1: u32) -> vec4<f32> {{
    var acc = vec4<f32>(0.0);
    for (var r = b0; r < b1; r++) {{
        let w = $W[r * $P_STRIDE4 + o4];
{x}{shared}{product}    }}
    return acc * {scale};
}}
"#
                )
            }
            QuantFormat::Int4 { group_size, .. }
                if products == Products::Int8Groups && reads == Dot4Use::Own && GroupStream::new(&[self]).is_some() =>
            {
                s += &format!("const {p}_GROUP_ROWS: u32 = {}u;\n", group_size / 8);
                let stream = GroupStream::new(&[self]).expect("matched");
                format!(
                    "{INT4_INT8_HELPERS}// Blocks are groups: w = scale * q + min; against the input's int8 groups\n// (x = d * xq) a group contributes scale * d * dot(q, xq) + min * d * sum(xq).\nfn $W_dot4(o4: u32, b0: u32, b1: u32) -> vec4<f32> {{\n{}    return acc0;\n}}\n\n{}",
                    stream.group_loop("$W", true),
                    stream.first_group()
                )
            }
            QuantFormat::Int4 { group_size, .. } if products == Products::Int8Groups => {
                s += &format!("const {p}_GROUP_ROWS: u32 = {}u;\n", group_size / 8);
                INT4_INT8_HELPERS.to_string()
                    + r#"// Blocks are groups: w = scale * q + min; against the input's int8 groups
// (x = d * xq) a group contributes scale * d * dot(q, xq) + min * d * sum(xq).
fn $W_dot4(o4: u32, b0: u32, b1: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var g = b0; g < b1; g++) {
        let sm = $W[$P_SCALES4 + g * $P_SCALE_STRIDE4 + o4];
        var qx = vec4<i32>(0);
        for (var k = 0u; k < $P_GROUP_ROWS; k++) {
            let r = g * $P_GROUP_ROWS + k;
            qx += $W_qdot4($W[r * $P_STRIDE4 + o4], xq_groups[r]);
        }
        let xd = xd_groups[g];
        acc += half_lo(sm) * (vec4<f32>(qx) * xd.x) + half_hi(sm) * xd.y;
    }
    return acc;
}
"#
            }
            QuantFormat::Int4 { group_size, .. } => {
                s += &format!("const {p}_GROUP_ROWS: u32 = {}u;\n", group_size / 8);
                let (helpers, qx) = match products {
                    Products::Exact => (String::new(), "qx".to_string()),
                    Products::Packed | Products::PackedRows => (int4_f16_helpers(), format!("qx * {X16_UNSCALE}")),
                    Products::Int8Groups => unreachable!("matched above"),
                };
                let shared = indent(&quad_shared_input(self.format, products, "$W"), 4);
                let word_dot = indent(&quad_product(self.format, products, "$W", "w", "qx"), 4);
                helpers
                    + &format!(
                        r#"// Blocks are groups: w = scale * q + min, so a group contributes
// scale * dot(q, x) + min * sum(x).
fn $W_dot4(o4: u32, b0: u32, b1: u32) -> vec4<f32> {{
    var acc = vec4<f32>(0.0);
    for (var g = b0; g < b1; g++) {{
        let sm = $W[$P_SCALES4 + g * $P_SCALE_STRIDE4 + o4];
        var qx = vec4<f32>(0.0);
        var xsum = 0.0;
        for (var k = 0u; k < $P_GROUP_ROWS; k++) {{
            let r = g * $P_GROUP_ROWS + k;
            let w = $W[r * $P_STRIDE4 + o4];
            let x0 = xin4(2u * r);
            let x1 = xin4(2u * r + 1u);
{shared}{word_dot}            xsum += dot(x0 + x1, vec4<f32>(1.0));
        }}
        acc += half_lo(sm) * {qx} + half_hi(sm) * xsum;
    }}
    return acc;
}}
"#
                    )
            }
        };
        let body = match reads {
            Dot4Use::Own => body,
            Dot4Use::Helpers => without_function(&body, "fn $W_dot4("),
            Dot4Use::Layout => return Ok(s),
        };
        s.push('\n');
        s += &fill(&body, &[("W", self.ident), ("P", p.as_str())]);
        Ok(s)
    }
}

/// What a kernel reading a matrix four outputs at a load takes of
/// [`WeightMatrix::dot4_functions`] besides the layout constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dot4Use {
    /// `<ident>_dot4` and its helpers.
    Own,
    /// The helpers alone: [`gate_up_dot4`] reads the matrix, calling them for
    /// both of its matrices (they share one format).
    Helpers,
    /// The constants alone: [`gate_up_dot4`] reads the matrix with the other
    /// one's helpers.
    Layout,
}

/// How a tiled kernel reads a weight matrix: one output at a time (`array<u32>`
/// binding), or four consecutive outputs at once (`array<vec4<u32>>`: rows are
/// padded to 64 bytes, so a quad starting at a multiple of 4 is one aligned load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TileRead {
    One,
    Quad,
}

impl TileRead {
    /// WGSL element type of the weight binding.
    pub fn binding_type(self) -> &'static str {
        match self {
            TileRead::One => "u32",
            TileRead::Quad => "vec4<u32>",
        }
    }

    /// The f16 halves of a word (or of each word of a quad) as f32.
    pub fn half_functions(self) -> &'static str {
        match self {
            TileRead::One => {
                "fn half_lo(x: u32) -> f32 {\n    return unpack2x16float(x).x;\n}\n\nfn half_hi(x: u32) -> f32 {\n    return unpack2x16float(x).y;\n}\n"
            }
            TileRead::Quad => {
                "fn half_lo(x: vec4<u32>) -> vec4<f32> {\n    return vec4<f32>(unpack2x16float(x.x).x, unpack2x16float(x.y).x, unpack2x16float(x.z).x, unpack2x16float(x.w).x);\n}\n\nfn half_hi(x: vec4<u32>) -> vec4<f32> {\n    return vec4<f32>(unpack2x16float(x.x).y, unpack2x16float(x.y).y, unpack2x16float(x.z).y, unpack2x16float(x.w).y);\n}\n"
            }
        }
    }
}

impl WeightMatrix<'_> {
    /// For tiled kernels: layout constants and `<ident>_at(o, k)`, input `k` of
    /// output `o` (with [`TileRead::Quad`], of outputs `o .. o + 4`, `o` a
    /// multiple of 4), dequantised; zero past the last output or input.
    pub fn tile_functions(&self, read: TileRead) -> Result<String, FormatError> {
        let sizes = part_sizes(self.format, self.out, self.in_features)?;
        let p = self.prefix();
        let mut s = format!(
            "// {ident}: {desc}, {out} outputs x {inp} inputs, column-major packed.\nconst {p}_STRIDE: u32 = {stride}u;\nconst {p}_OUT: u32 = {out}u;\nconst {p}_IN: u32 = {inp}u;\n",
            ident = self.ident,
            desc = describe(self.format),
            out = self.out,
            inp = self.in_features,
            stride = sizes.row_stride / 4,
        );
        if sizes.scale_bytes > 0 {
            s += &format!(
                "const {p}_SCALES: u32 = {}u;\nconst {p}_SCALE_STRIDE: u32 = {}u;\n",
                sizes.data_bytes / 4,
                sizes.scale_stride / 4
            );
        }
        let (u, f, i, word, outputs) = match read {
            TileRead::One => ("u32", "f32", "i32", "$W[$X]", "o"),
            TileRead::Quad => {
                ("vec4<u32>", "vec4<f32>", "vec4<i32>", "$W[($X) / 4u]", "vec4<u32>(o) + vec4<u32>(0u, 1u, 2u, 3u)")
            }
        };
        let load = |index: &str| word.replace("$X", index);
        let data = load("(k / $PACKu) * $P_STRIDE + o");
        let body = match self.format {
            QuantFormat::F32 => return Err(FormatError::NotMatrix),
            QuantFormat::F16 => format!("return half_lo({data} >> $U(16u * (k % 2u)));"),
            // the bf16 half, moved to the top of an f32
            QuantFormat::Bf16 => format!("return bitcast<$F>(({data} >> $U(16u * (k % 2u))) << $U(16u));"),
            QuantFormat::Int8 { per_tensor } => {
                let scale = if per_tensor {
                    match read {
                        TileRead::One => "bitcast<f32>($W[$P_SCALES])".to_string(),
                        TileRead::Quad => "bitcast<f32>($W[$P_SCALES / 4u].x)".to_string(),
                    }
                } else {
                    format!("bitcast<$F>({})", load("$P_SCALES + o"))
                };
                format!(
                    "let q = bitcast<$I>({data} << $U(24u - 8u * (k % 4u))) >> $U(24u);\n    return $F(q) * {scale};"
                )
            }
            QuantFormat::Int4 { group_size, .. } => {
                let sm = load(&format!("$P_SCALES + (k / {group_size}u) * $P_SCALE_STRIDE + o"));
                format!("let sm = {sm};\n    return $F(({data} >> $U(4u * (k % 8u))) & $U(15u)) * half_lo(sm) + half_hi(sm);")
            }
        };
        let pack = pack_factor(self.format).to_string();
        let body = fill(
            &format!(
                r#"
fn $W_raw(o: u32, k: u32) -> $F {{
    {body}
}}

// Input k of output o{plural}, dequantised; zero past the last output or input.
fn $W_at(o: u32, k: u32) -> $F {{
    if (k >= $P_IN) {{
        return $F(0.0);
    }}
    return select($F(0.0), $W_raw(o, k), {outputs} < $U($P_OUT));
}}
"#,
                plural = if read == TileRead::Quad { " .. o + 4" } else { "" },
            ),
            &[("PACK", &pack)],
        );
        s += &fill(&body, &[("W", self.ident), ("P", p.as_str()), ("U", u), ("F", f), ("I", i)]);
        Ok(s)
    }
}

impl WeightMatrix<'_> {
    /// For the tiled skeletons, which keep the next step's weights in
    /// registers as packed words until they stage them: the word
    /// quad `<ident>_words(o, k)` holding input `k` of outputs `o .. o + 4` and
    /// its scale quad `<ident>_scales(o, k)` (zero past the last output or
    /// input), and `<ident>_dequant(w, s, k)`, input `k` of such a pair,
    /// dequantised. Any input of the word dequantises from the one load.
    /// The bounds are checked only where a tile of `tile_in` inputs x
    /// `tile_out` outputs may cross them.
    pub fn word_functions(&self, tile_in: usize, tile_out: usize) -> Result<String, FormatError> {
        let word = "$W[((k / $PACKu) * $P_STRIDE + o) / 4u]";
        let (scales, dequant) = match self.format {
            QuantFormat::F32 => return Err(FormatError::NotMatrix),
            QuantFormat::F16 => (None, "half_lo(w >> vec4<u32>(16u * (k % 2u)))".to_string()),
            QuantFormat::Bf16 => (None, "bitcast<vec4<f32>>((w >> vec4<u32>(16u * (k % 2u))) << vec4<u32>(16u))".to_string()),
            QuantFormat::Int8 { per_tensor } => (
                Some(if per_tensor { "vec4<u32>($W[$P_SCALES / 4u].x)" } else { "$W[($P_SCALES + o) / 4u]" }.to_string()),
                "vec4<f32>(bitcast<vec4<i32>>(w << vec4<u32>(24u - 8u * (k % 4u))) >> vec4<u32>(24u)) * bitcast<vec4<f32>>(s)".to_string(),
            ),
            QuantFormat::Int4 { group_size, .. } => (
                Some(format!("$W[($P_SCALES + (k / {group_size}u) * $P_SCALE_STRIDE + o) / 4u]")),
                "vec4<f32>((w >> vec4<u32>(4u * (k % 8u))) & vec4<u32>(15u)) * half_lo(s) + half_hi(s)".to_string(),
            ),
        };
        let check_in = !self.in_features.is_multiple_of(tile_in);
        let check_out = !self.out.is_multiple_of(tile_out);
        let guarded = |load: &str| {
            let mut text = String::new();
            if check_in {
                text += "if (k >= $P_IN) {\n        return vec4<u32>(0u);\n    }\n    ";
            }
            if check_out {
                text += &format!("return select(vec4<u32>(0u), {load}, vec4<u32>(o) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>($P_OUT));");
            } else {
                text += &format!("return {load};");
            }
            text
        };
        let scales = match &scales {
            Some(load) => guarded(load),
            None => "return vec4<u32>(0u);".to_string(),
        };
        let text = format!(
            r#"
// The word quad holding input k of outputs o .. o + 4, and its scales{zero}.
fn $W_words(o: u32, k: u32) -> vec4<u32> {{
    {words}
}}

fn $W_scales(o: u32, k: u32) -> vec4<u32> {{
    {scales}
}}

// Input k of the outputs of word quad w (scales s), dequantised.
fn $W_dequant(w: vec4<u32>, s: vec4<u32>, k: u32) -> vec4<f32> {{
    return {dequant};
}}
"#,
            words = guarded(word),
            zero = if check_in || check_out { "; zero\n// past the last output or input" } else { "" },
        );
        let pack = pack_factor(self.format).to_string();
        Ok(fill(&text, &[("W", self.ident), ("P", self.prefix().as_str()), ("PACK", &pack)]))
    }
}

/// Human description of a format for header comments.
pub(crate) fn describe(format: QuantFormat) -> String {
    match format {
        QuantFormat::F32 => "f32".into(),
        QuantFormat::F16 => "f16 pairs".into(),
        QuantFormat::Bf16 => "bf16 pairs".into(),
        QuantFormat::Int8 { per_tensor: false } => "int8 x4 with an f32 scale per output".into(),
        QuantFormat::Int8 { per_tensor: true } => "int8 x4 with one f32 scale".into(),
        QuantFormat::Int4 { group_size, symmetric } => format!(
            "int4 x8, groups of {group_size} inputs with (scale, min) f16 pairs{}",
            if symmetric { " (symmetric)" } else { "" }
        ),
    }
}

/// Short name of a format for kernel names.
pub(crate) fn format_tag(format: QuantFormat) -> String {
    match format {
        QuantFormat::F32 => "f32".into(),
        QuantFormat::F16 => "f16".into(),
        QuantFormat::Bf16 => "bf16".into(),
        QuantFormat::Int8 { per_tensor: false } => "int8c".into(),
        QuantFormat::Int8 { per_tensor: true } => "int8t".into(),
        QuantFormat::Int4 { group_size, symmetric } => {
            format!("int4g{group_size}{}", if symmetric { "s" } else { "a" })
        }
    }
}

/// Outputs from which a matrix-vector kernel reads four outputs at a load: below,
/// a quarter as many workgroups leave a large GPU idle (on the H100, 4096-output
/// INT4 projections slowed from 40 to 59 us while 11008-output F16 ones sped up
/// from 93 to 79 us). With INT4 products in f16 the four-output path still lost
/// at 4096 outputs: Llama-2-7B's down projection 40 to 46 us, INT8's 55 to 78.
pub(crate) const QUAD_MIN_OUTPUTS: usize = 8192;

/// How a matrix-vector kernel splits its work: `tile` outputs per workgroup,
/// its invocations split the input blocks `ksplit` ways, partial sums combined
/// in workgroup memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MatvecShape {
    pub tile: u32,
    pub ksplit: u32,
}

/// Workgroups one matrix-vector dispatch aims for: a few per compute unit of a
/// large GPU, so that small matrices still keep every unit reading.
pub(crate) const TARGET_WORKGROUPS: usize = 512;

/// Workgroups the gate/up kernel aims for where it streams its int8 groups
/// ([`GroupStream`]), and QKV's quads take their tile from
/// ([`MatvecShape::rope_pair_quads`]): fewer, wider tiles with longer k-slices, whose next
/// group's loads overlap the current one's products, and fewer workgroups
/// staging the input row. On the H100, Llama-2-7B INT4 (2752 quads, 128
/// groups) in tiles of 16 quads and 16 k-slices: 30.2 us a call against 31.3
/// in [`MatvecShape::choose`]'s 8 and 32 (decode 2.77 to 2.69 ms a token, in
/// another device call than [`GroupStream`]'s figures); 32 and 16: 30.1; 32
/// and 8: 31.3; 16 and 8: 32.4; 16 and 32: 33.3; 4 and 64: 39.5. Llama-3.2-1B
/// INT4 (2048 quads, 64 groups) takes 16 and 16 too: 15.9 us a call against
/// 15.5, decode unchanged at 0.77 ms.
pub(crate) const STREAMED_TARGET_WORKGROUPS: usize = 128;

/// Fewest outputs per workgroup: 8 consecutive words of a packed row are one
/// 32-byte memory sector.
const MIN_TILE: u32 = 8;

const MAX_TILE: u32 = 64;

/// Invocations per workgroup of the kernels that read one output (or RoPE
/// pair) per invocation, where the device allows them, and the workgroups
/// those aim for: fewer, larger workgroups with as many k-slices each. On the
/// H100, Llama-3.2-1B INT4's down projection went from 19.6 to 14.8 us and its
/// QKV from 15.1 to 12.9; Llama-2-7B F16's QKV from 54.1 to 50.0 and its down
/// projection from 62.3 to 58.5. The four-output kernels (gate/up) slowed
/// (Llama-2-7B INT4 41.3 to 47.6 us), so they keep [`MatvecShape::choose`].
pub(crate) const WIDE_INVOCATIONS: u32 = 512;
pub(crate) const WIDE_TARGET_WORKGROUPS: usize = 256;

/// Outputs from which a residual projection (`hidden += W x`: the down and
/// attention output projections) of F16, BF16 or INT8 weights reads four
/// outputs at a load in workgroups of [`WIDE_INVOCATIONS`] where the device
/// allows them and has subgroups of 8 or more: tiles of [`WIDE_QUAD_TILE`]
/// quads, the rest of the workgroup splitting the input. Each invocation then
/// loads 16 bytes at a time instead of 4. On the H100, us per call (down,
/// output projection): Llama-2-7B F16 56.4 -> 42.5 and 23.8 -> 22.6, INT8
/// 47.4 -> 29.1 and 23.2 -> 16.8;
/// Llama-3.2-1B F16 27.3 -> 21.9 and 12.4 -> 11.9, INT8 22.5 -> 17.6 and 11.2
/// -> 10.0. Tiles of 2 or 8 quads were slower (1B F16 down 31.3 and 27.0).
pub(crate) const WIDE_QUAD_MIN_OUTPUTS: usize = 2048;

/// INT4 reads wide quads only from this many outputs, and where each k-slice
/// has [`WIDE_QUAD_MIN_SLICE`] groups: Llama-2-7B's down projection went from
/// 26.6 to 23.1 us, but its output projection (one group a slice) from 13.7 to
/// 14.3 and Llama-3.2-1B's down projection from 13.7 to 14.5.
pub(crate) const WIDE_QUAD_MIN_OUTPUTS_INT4: usize = 4096;
pub(crate) const WIDE_QUAD_MIN_SLICE: usize = 2;

/// Quads per workgroup of a wide-quad kernel: 64 bytes of each row.
pub(crate) const WIDE_QUAD_TILE: u32 = 4;

/// Invocations of the QKV kernel on quads of RoPE pairs at least
/// ([`MatvecShape::rope_pair_quads`]): a 32-wide subgroup, so that the int8
/// staging finds a group's word rows (up to 32, for groups of 256) within
/// the workgroup, as its shuffles need.
pub(crate) const ROPE_PAIR_QUADS_MIN_INVOCATIONS: u32 = 32;

/// Quads per workgroup of a wide-quad INT4 kernel on int8 input groups
/// ([`MatvecShape::int8_group_quads`]) from [`WIDE_QUAD_MIN_OUTPUTS_INT4`]
/// outputs: 128 bytes of each row. Below, tiles of [`WIDE_QUAD_TILE`]: on the
/// H100, Llama-3.2-1B's INT4 down projection (2048 outputs) took 13.8 us
/// reading one output at a time, 13.1 in tiles of 4 quads, 14.1 in tiles of 8.
pub(crate) const INT8_GROUP_QUAD_TILE: u32 = 8;

impl MatvecShape {
    /// The shape of a residual projection that reads four outputs at a load in
    /// wide workgroups, where that pays (see [`WIDE_QUAD_MIN_OUTPUTS`]), over
    /// `outputs` outputs and `blocks` input blocks; `None` where it does not.
    pub fn wide_quads(format: QuantFormat, outputs: usize, blocks: usize, target: &Target) -> Option<MatvecShape> {
        let shape = Self::wide(WIDE_QUAD_TILE, outputs, blocks, target)?;
        let pays = match format {
            QuantFormat::F32 => false,
            QuantFormat::F16 | QuantFormat::Bf16 | QuantFormat::Int8 { .. } => outputs >= WIDE_QUAD_MIN_OUTPUTS,
            QuantFormat::Int4 { .. } => {
                outputs >= WIDE_QUAD_MIN_OUTPUTS_INT4 && shape.slice(blocks) >= WIDE_QUAD_MIN_SLICE
            }
        };
        pays.then_some(shape)
    }

    /// The shape of an INT4 residual projection over `outputs` outputs and an
    /// input of `in_features` whose products go through int8 input groups
    /// ([`int8_groups`]; the input's own workgroup memory is `other_bytes`),
    /// with their group size: in wide workgroups from [`WIDE_QUAD_MIN_OUTPUTS`]
    /// outputs, tiles of [`INT8_GROUP_QUAD_TILE`] quads (or fewer below
    /// [`WIDE_QUAD_MIN_OUTPUTS_INT4`]), each k-slice [`WIDE_QUAD_MIN_SLICE`]
    /// groups or more. On the H100,
    /// Llama-2-7B's down projection took 22.8 us with exact products in tiles of
    /// 4 quads, 22.7 with int8 groups in them, 19.8 in tiles of 8 (and 25.5 with
    /// exact products in tiles of 8); its output projection (two groups a
    /// k-slice here, one in tiles of 4) went from 13.9 to 13.5, and at 4000
    /// positions (its input combined from 16 splits) from 17.1 to 15.8.
    pub fn int8_group_quads(
        format: QuantFormat,
        outputs: usize,
        in_features: usize,
        other_bytes: usize,
        target: &Target,
    ) -> Option<(MatvecShape, usize)> {
        let QuantFormat::Int4 { group_size, .. } = format else { return None };
        if outputs < WIDE_QUAD_MIN_OUTPUTS {
            return None;
        }
        let blocks = in_features.div_ceil(group_size as usize);
        let tile = if outputs >= WIDE_QUAD_MIN_OUTPUTS_INT4 { INT8_GROUP_QUAD_TILE } else { WIDE_QUAD_TILE };
        let shape = Self::wide(tile, outputs, blocks, target)?;
        if shape.slice(blocks) < WIDE_QUAD_MIN_SLICE {
            return None;
        }
        int8_groups(&[format], in_features, &shape, other_bytes, target).map(|group| (shape, group))
    }

    /// The shape of the QKV decode kernel that reads `quads` quads of RoPE
    /// pairs against int8 input groups, over `blocks` input groups: tiles of
    /// [`WIDE_QUAD_TILE`] quads, or where it streams its groups
    /// ([`GroupStream`]) [`MatvecShape::streamed`]'s; then k-slices of
    /// [`WIDE_QUAD_MIN_SLICE`] groups as the workgroup limit allows, and at
    /// least [`ROPE_PAIR_QUADS_MIN_INVOCATIONS`] invocations however short the
    /// input. On the H100, Llama-2-7B INT4 (1536 quads, 128 groups), us a call
    /// from the profile and decode ms a token:
    /// - plain loop: 22.9 us (2.69 ms) in tiles of 4 quads and 64 k-slices,
    ///   23.0 in 8 and 64, 24.4 in 8 and 32, 24.1 in 4 and 128, 28.9 in 2 and
    ///   128, 31.9 (2.94 ms) in 16 and 16;
    /// - streamed: 23.2 us (2.65 ms) in 8 and 32, 23.6 (2.64) in 16 and 16,
    ///   24.1 (2.72) in 4 and 64, 24.3 (2.68) in 8 and 16, 27.2 (2.77) in 16
    ///   and 8. The profile's timestamps favour the plain loop; the tokens do not.
    pub fn rope_pair_quads(quads: usize, blocks: usize, streamed: bool, target: &Target) -> MatvecShape {
        let tile = if streamed { Self::streamed(quads, blocks, target).tile } else { WIDE_QUAD_TILE };
        let most = prev_power_of_two(target.workgroup_limit()) / tile;
        let fewest = (ROPE_PAIR_QUADS_MIN_INVOCATIONS / tile).max(1);
        // (the workgroup limit is 64 or more, so most >= fewest)
        let slices = (blocks / WIDE_QUAD_MIN_SLICE).clamp(fewest as usize, most as usize);
        MatvecShape { tile, ksplit: prev_power_of_two(slices as u32) }
    }

    /// Tiles of `tile` quads in workgroups of [`WIDE_INVOCATIONS`], the rest
    /// splitting `blocks`, where the device allows such workgroups and the
    /// outputs are too few for [`MatvecShape::choose`]'s quads.
    fn wide(tile: u32, outputs: usize, blocks: usize, target: &Target) -> Option<MatvecShape> {
        if !target.subgroups || target.max_workgroup_size < WIDE_INVOCATIONS || outputs >= QUAD_MIN_OUTPUTS {
            return None;
        }
        let slices = blocks.clamp(1, (WIDE_INVOCATIONS / tile) as usize) as u32;
        let shape = MatvecShape { tile, ksplit: prev_power_of_two(slices) };
        // a slot per k-slice would take 8 KiB of workgroup memory, too much
        // beside an input row staged there
        (shape.slices_per_subgroup(target) >= 2).then_some(shape)
    }

    /// [`MatvecShape::choose`] for kernels that stream their int8 groups
    /// ([`GroupStream`]): aiming for [`STREAMED_TARGET_WORKGROUPS`]. Gate/up
    /// takes it whole, QKV's quads its tile ([`MatvecShape::rope_pair_quads`]).
    pub fn streamed(outputs: usize, blocks: usize, target: &Target) -> MatvecShape {
        Self::fit(outputs, blocks, target.workgroup_limit(), STREAMED_TARGET_WORKGROUPS)
    }

    /// The shape for `outputs` outputs (or output units) over `blocks` input blocks:
    /// the widest tile that still gives [`TARGET_WORKGROUPS`], then as many
    /// k-slices as the workgroup limit and the blocks allow.
    pub fn choose(outputs: usize, blocks: usize, target: &Target) -> MatvecShape {
        Self::fit(outputs, blocks, target.workgroup_limit(), TARGET_WORKGROUPS)
    }

    /// [`MatvecShape::choose`] for a kernel reading one output per invocation:
    /// workgroups of up to [`WIDE_INVOCATIONS`] aiming for
    /// [`WIDE_TARGET_WORKGROUPS`] where the device allows them, else the same.
    pub fn choose_one_output(outputs: usize, blocks: usize, target: &Target) -> MatvecShape {
        if target.max_workgroup_size >= WIDE_INVOCATIONS {
            Self::fit(outputs, blocks, WIDE_INVOCATIONS, WIDE_TARGET_WORKGROUPS)
        } else {
            Self::choose(outputs, blocks, target)
        }
    }

    fn fit(outputs: usize, blocks: usize, limit: u32, workgroups: usize) -> MatvecShape {
        let limit = prev_power_of_two(limit);
        let mut tile = MAX_TILE.min(limit);
        while tile > MIN_TILE && outputs.div_ceil(tile as usize) < workgroups {
            tile /= 2;
        }
        let slices = blocks.clamp(1, (limit / tile) as usize) as u32;
        MatvecShape { tile, ksplit: prev_power_of_two(slices) }
    }

    /// The fewest k-slices one subgroup holds: what its shuffles add up
    /// before workgroup memory (1 without subgroups). Subgroups run no smaller
    /// than `target.subgroup_size`, so the kernel needs `KSPLIT / this` slots.
    pub fn slices_per_subgroup(&self, target: &Target) -> u32 {
        if target.subgroups {
            (target.subgroup_size / self.tile).clamp(1, self.ksplit)
        } else {
            1
        }
    }

    pub fn invocations(&self) -> u32 {
        self.tile * self.ksplit
    }

    /// Bytes of the k-slice sums' workgroup memory ([`MatvecShape::functions`]).
    pub(crate) fn scratch_bytes(&self, target: &Target, sum: SliceSum) -> usize {
        let slots = self.ksplit / self.slices_per_subgroup(target);
        (self.tile * slots) as usize * sum.bytes()
    }

    /// The most of `blocks` input blocks one k-slice takes (`slice_end - slice_begin`).
    pub fn slice(&self, blocks: usize) -> usize {
        blocks.div_ceil(self.ksplit as usize)
    }

    /// Constants, scratch, `tile_place()` (this invocation's output `lo` in
    /// the tile and its k-slice `ks`) and `ksplit_sum(v, lo, ks)`: the sum of
    /// `v` over the k-slices of output `lo`; every invocation must call it.
    pub fn functions(&self, target: &Target, sum: SliceSum) -> String {
        let unit = match sum {
            SliceSum::Quad => "quads of outputs",
            SliceSum::One | SliceSum::Pair => "outputs",
        };
        let mut s = format!(
            "// Each workgroup owns TILE {unit}; its invocations split the input blocks KSPLIT ways.\nconst TILE: u32 = {}u;\nconst KSPLIT: u32 = {}u;\nconst KSPLIT_SLOTS: u32 = {}u;\n",
            self.tile,
            self.ksplit,
            self.ksplit / self.slices_per_subgroup(target)
        );
        let body = if target.subgroups {
            r#"// An invocation's place in the tile, counted through its subgroup: the
// invocations TILE lanes apart in a subgroup hold one output's k-slices.
fn tile_place() -> vec2<u32> {
    let flat = sg_index * sg_size + sg_lane;
    return vec2<u32>(flat % TILE, flat / TILE);
}

// Shuffles add up a subgroup's k-slices first, so workgroup memory holds one
// slot per subgroup and output (on the H100, GPU time per token: Llama-2-7B
// INT4 4.94 -> 4.50 ms, SmolLM2 INT4 1.71 -> 1.62 ms).
fn ksplit_sum(v: $T, lo: u32, ks: u32) -> $T {
    let per_sg = clamp(sg_size / TILE, 1u, KSPLIT);
    var p = v;
    for (var d = TILE; d < TILE * per_sg; d = d << 1u) {
        p += subgroupShuffleXor(p, d);
    }
    workgroupBarrier();
    if (ks % per_sg == 0u) {
        ksplit_buf[(ks / per_sg) * TILE + lo] = p;
    }
    workgroupBarrier();
    var s = $T(0.0);
    for (var k = 0u; k < KSPLIT / per_sg; k++) {
        s += ksplit_buf[k * TILE + lo];
    }
    return s;
}
"#
        } else {
            r#"// An invocation's place in the tile: output lo, k-slice ks.
fn tile_place() -> vec2<u32> {
    return vec2<u32>(lid % TILE, lid / TILE);
}

fn ksplit_sum(v: $T, lo: u32, ks: u32) -> $T {
    workgroupBarrier();
    ksplit_buf[ks * TILE + lo] = v;
    workgroupBarrier();
    var s = $T(0.0);
    for (var k = 0u; k < KSPLIT; k++) {
        s += ksplit_buf[k * TILE + lo];
    }
    return s;
}
"#
        };
        s += &fill(
            &(String::from(
                r#"// One slot per output and subgroup (or k-slice, without subgroups).
var<workgroup> ksplit_buf: array<$T, TILE * KSPLIT_SLOTS>;

// Blocks [b0, b1) of slice ks out of n blocks.
fn slice_begin(n: u32, ks: u32) -> u32 {
    return min(ks * ((n + KSPLIT - 1u) / KSPLIT), n);
}

fn slice_end(n: u32, ks: u32) -> u32 {
    return min((ks + 1u) * ((n + KSPLIT - 1u) / KSPLIT), n);
}

"#,
            ) + body),
            &[("T", sum.wgsl_type())],
        );
        s
    }
}

/// What one invocation's k-slice sums: one output, a pair of outputs (a RoPE
/// pair, or gate and up) or a quad of outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SliceSum {
    One,
    Pair,
    Quad,
}

impl SliceSum {
    fn bytes(self) -> usize {
        match self {
            SliceSum::One => 4,
            SliceSum::Pair => 8,
            SliceSum::Quad => 16,
        }
    }

    fn wgsl_type(self) -> &'static str {
        match self {
            SliceSum::One => "f32",
            SliceSum::Pair => "vec2<f32>",
            SliceSum::Quad => "vec4<f32>",
        }
    }
}

/// Bytes of workgroup memory the attention output may take before the output
/// projection reads it, combining its splits, from storage instead.
pub(crate) const INPUT_CACHE_BYTES: usize = 8192;

/// WGSL element type of the input and norm bindings of a kernel with
/// `in_features` inputs: `vec4<f32>` where rows split into whole vec4s.
pub(crate) fn input_type(in_features: usize) -> &'static str {
    if in_features.is_multiple_of(4) {
        "vec4<f32>"
    } else {
        "f32"
    }
}

/// `xin` over `xin4`, for inputs read four at a time.
const XIN_FROM_XIN4: &str = "fn xin(i: u32) -> f32 {\n    return xin4(i / 4u)[i % 4u];\n}\n";
/// `xin4` over `xin`, for scalar inputs.
const XIN4_FROM_XIN: &str =
    "fn xin4(j: u32) -> vec4<f32> {\n    return vec4<f32>(xin(4u * j), xin(4u * j + 1u), xin(4u * j + 2u), xin(4u * j + 3u));\n}\n";

/// Whether the output projection caches its combined input row of
/// `in_features` as f32 in workgroup memory (else it combines on every read,
/// or caches f16, [`input_cache`]). The attention's split limit follows this,
/// the same on every target.
pub(crate) fn input_cached(in_features: usize) -> bool {
    in_features * 4 <= INPUT_CACHE_BYTES
}

/// The element type the output projection caches its combined input row in,
/// if any: f32 where it fits [`INPUT_CACHE_BYTES`], else f16 where that fits
/// and the target has `shader-f16` (its KV cache is f16, so the values a row
/// combines are f16 already). On the H100, caching Llama-2-7B's 4096-wide row
/// as f16 took its output projection from 21.4 to 15.9 us.
fn input_cache(in_features: usize, target: &Target) -> Option<&'static str> {
    if input_cached(in_features) {
        Some("f32")
    } else if target.shader_f16 && in_features * 2 <= INPUT_CACHE_BYTES {
        Some("f16")
    } else {
        None
    }
}

/// Where a matrix-vector kernel applies an RMSNorm of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Norm {
    /// No norm.
    None,
    /// `load_input` computes the 1/rms scale first and every input read is
    /// scaled by it (and by the `norm` weights).
    Inputs,
    /// Input reads are scaled by the `norm` weights only; the kernel calls
    /// `norm_scale(t)` after its dot products and scales their sums, as the
    /// tiled kernels do, so the first weight loads do not wait on the norm's
    /// reduction.
    Outputs,
}

/// Whether a matrix-vector kernel over matrices of `formats` stages its input
/// row in workgroup memory ([`input_functions`]): INT4 weights only, rows of a
/// multiple of 4 inputs up to [`INPUT_CACHE_BYTES`]. An INT4 word meets eight
/// inputs, so the kernel waits on input reads more than on weights: on the
/// H100, SmolLM2 INT4's gate/up kernel went from 13.4 to 8.9 us, QKV from 11.0
/// to 10.0, the down projection from 8.5 to 7.5, and Llama-3.2-1B's gate/up
/// (its norm applied to the staged row) from 20.6 to 19.6. F16 and INT8 kernels got
/// slower (SmolLM2 F16 gate/up 12.1 to 12.6 us, QKV 10.7 to 11.5; Llama-3.2-1B
/// INT8 QKV 12.4 to 12.7), as did staging Llama-2-7B's 16 KiB rows (INT4 QKV
/// 25.4 to 30.2 us).
pub(crate) fn stages_input(formats: &[QuantFormat], in_features: usize) -> bool {
    formats.iter().all(|f| matches!(f, QuantFormat::Int4 { .. }))
        && in_features.is_multiple_of(4)
        && input_cached(in_features)
}

/// [`stages_input`] as the staging [`input_functions`] takes.
pub(crate) fn staging(formats: &[QuantFormat], in_features: usize) -> InputStaging {
    if stages_input(formats, in_features) {
        InputStaging::Rows
    } else {
        InputStaging::Storage
    }
}

/// Where a matrix-vector kernel keeps its input row between reads
/// ([`input_functions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InputStaging {
    /// Read from storage on every use.
    Storage,
    /// Copied to workgroup memory by `load_input`, the norm applied
    /// ([`stages_input`] says where).
    Rows,
    /// Read from storage, and quantised to int8 once per row of four for
    /// [`Products::PackedRows`] ([`int8_row_cache_fits`] says where).
    Int8Rows,
    /// Quantised to int8 by `load_input` into workgroup memory, a scale per
    /// `group` inputs, for [`Products::Int8Groups`] ([`int8_groups`] says where);
    /// with `lanes`, each word row on a lane of its own ([`int8_group_stage`]).
    Int8Groups { group: usize, lanes: bool },
}

impl InputStaging {
    /// [`InputStaging::Int8Groups`] of `group` inputs on `target`: a group's
    /// word rows on lanes of one subgroup where it has that many (and they
    /// are a power of two, for the shuffles).
    pub(crate) fn int8_groups(group: usize, target: &Target) -> InputStaging {
        let rows = group / 8;
        let lanes =
            target.subgroups && rows.is_power_of_two() && rows <= target.subgroup_size.max(MIN_SUBGROUP_SIZE) as usize;
        InputStaging::Int8Groups { group, lanes }
    }
}

/// How a matrix-vector kernel reads its input vector `x` (one token's row of a
/// storage array): `load_input(t)` prepares it, `xin(i)` returns element `i` and
/// `xin4(j)` elements `4j .. 4j + 4`, RMS-normalised as `norm` says. The input
/// and norm bindings are declared with [`input_type`].
///
/// `staging` says where the row waits between reads: with
/// [`InputStaging::Rows`], `load_input` copies it to workgroup memory first,
/// the norm weights applied, and every read comes from there (rows too wide
/// for [`INPUT_CACHE_BYTES`], or not of quads, stay in storage); with
/// [`InputStaging::Int8Rows`], `load_input` ends by quantising it
/// ([`int8_row_cache`]).
pub(crate) fn input_functions(x_ident: &str, in_features: usize, norm: Norm, staging: InputStaging) -> String {
    let vars = [("X", x_ident)];
    let vec = in_features.is_multiple_of(4);
    let staged = staging == InputStaging::Rows && vec && input_cached(in_features);
    let mut s = String::from("var<private> x_base: u32;\n");
    if norm == Norm::Inputs {
        s += "var<private> x_scale: f32;\n";
    }
    s.push('\n');
    let scaled = match norm {
        Norm::None => "",
        Norm::Inputs => " * x_scale * norm[$I]",
        Norm::Outputs => " * norm[$I]",
    };
    let (count, ssq) = if vec {
        let read = format!("$X[x_base + j]{}", scaled.replace("$I", "j"));
        s += "const IN4: u32 = IN / 4u;\n\n";
        if staged {
            s += "// The input row, staged by load_input (norm weights applied).\nvar<workgroup> xs: array<vec4<f32>, IN4>;\n\n";
        }
        s += &format!("fn xin4(j: u32) -> vec4<f32> {{\n    return {};\n}}\n\n", if staged { "xs[j]" } else { &read });
        // (load_input stages a row it normalises while summing its squares)
        if staged && norm != Norm::Inputs {
            s += &format!(
                "fn stage_input() {{\n    for (var j = lid; j < IN4; j += WG) {{\n        xs[j] = {read};\n    }}\n    workgroupBarrier();\n}}\n\n"
            );
        }
        s += XIN_FROM_XIN4;
        s.push('\n');
        ("IN4", "dot(v, v)")
    } else {
        s += &format!("fn xin(i: u32) -> f32 {{\n    return $X[x_base + i]{};\n}}\n\n", scaled.replace("$I", "i"));
        s += XIN4_FROM_XIN;
        s.push('\n');
        ("IN", "v * v")
    };
    let sum_of_squares = |stage_raw: bool| {
        let raw = if stage_raw { "        xs[j] = v * norm[j];\n" } else { "" };
        format!(
            r#"    var ss = 0.0;
    for (var j = lid; j < {count}; j += WG) {{
        let v = $X[t * {count} + j];
        ss += {ssq};
{raw}    }}
"#
        )
    };
    // what load_input does last: stage the row (a normalised row takes 1/rms
    // once the reduction is done), or quantise its rows of four
    let tail = match staging {
        _ if staged && norm == Norm::Inputs => {
            "    for (var j = lid; j < IN4; j += WG) {\n        xs[j] = xs[j] * x_scale;\n    }\n    workgroupBarrier();\n"
        }
        _ if staged => "    stage_input();\n",
        InputStaging::Int8Rows => "    cache_input_rows();\n",
        InputStaging::Int8Groups { .. } => "    stage_int8_groups();\n",
        InputStaging::Storage | InputStaging::Rows => "",
    };
    match norm {
        Norm::None => s += &format!("fn load_input(t: u32) {{\n    x_base = t * {count};\n{tail}}}\n"),
        Norm::Inputs => {
            s += &format!(
                "fn load_input(t: u32) {{\n{}    x_scale = inverseSqrt(wg_sum(ss) / f32(IN) + EPS);\n    x_base = t * {count};\n{tail}}}\n",
                sum_of_squares(staged)
            )
        }
        Norm::Outputs => {
            s += &format!("fn load_input(t: u32) {{\n    x_base = t * {count};\n{tail}}}\n\n");
            s += "// The RMSNorm's 1/rms of row t; every invocation must call it (it holds barriers).\n";
            s += &format!(
                "fn norm_scale(t: u32) -> f32 {{\n{}    return inverseSqrt(wg_sum(ss) / f32(IN) + EPS);\n}}\n",
                sum_of_squares(false)
            );
        }
    }
    fill(&s, &vars) + &staging_functions(staging)
}

/// What `load_input` calls last for `staging` (the functions that quantise
/// the row), after a blank line; nothing where the row is read as it is.
fn staging_functions(staging: InputStaging) -> String {
    match staging {
        InputStaging::Int8Rows => format!("\n{}", int8_row_cache()),
        InputStaging::Int8Groups { group, lanes } => format!("\n{}", int8_group_stage(group, lanes)),
        InputStaging::Storage | InputStaging::Rows => String::new(),
    }
}

/// `stage_int8_groups()` for [`InputStaging::Int8Groups`]: `load_input` calls
/// it last (it holds a barrier). A group's inputs (`xin4`, normalised as the
/// kernel says) are scaled so the largest becomes 127 and rounded. With
/// `lanes`, each invocation takes one word row (eight inputs) and shuffles
/// find its group's largest input and sum; else each takes a whole group, its
/// loads unrolled into separate variables (an indexed private array may live
/// in slow local memory). On the H100, us a call, from a loop over a private
/// array: Llama-3.2-1B INT4 gate/up 17.9 -> 15.7 on lanes (17.6 unrolled),
/// Llama-2-7B gate/up 32.7 -> 31.9; 7B down 20.0 either way. Unrolling the
/// shuffle loops changed nothing.
fn int8_group_stage(group: usize, lanes: bool) -> String {
    let rows = group / 8;
    let mut s = format!(
        r#"// The input row as int8, a scale per group of XG inputs (the weights'
// groups). Per word row: its even inputs, then its odd ones.
const XG: u32 = {group}u;
var<workgroup> xq_groups: array<vec2<u32>, IN / 8u>;
// Per group: its scale d, and d times the sum of its int8 inputs.
var<workgroup> xd_groups: array<vec2<f32>, IN / XG>;

"#
    );
    // a word row's int8 pair from its inputs x0, x1 (as i32 q0, q1)
    let pack = |q0: &str, q1: &str| {
        format!("vec2<u32>(pack4xI8Clamp(vec4<i32>({q0}.x, {q0}.z, {q1}.x, {q1}.z)), pack4xI8Clamp(vec4<i32>({q0}.y, {q0}.w, {q1}.y, {q1}.w)))")
    };
    if lanes {
        s += &format!(
            r#"// Lanes of a subgroup take a group's XG / 8 word rows: the rows of a
// group are consecutive lanes (the loop's trip count is uniform, so every lane
// shuffles; lanes past the row read the last one and store nothing).
fn stage_int8_groups() {{
    let flat = sg_index * sg_size + sg_lane;
    for (var r0 = 0u; r0 < IN / 8u; r0 += WG) {{
        let r = min(r0 + flat, IN / 8u - 1u);
        let x0 = xin4(2u * r);
        let x1 = xin4(2u * r + 1u);
        let a = max(abs(x0), abs(x1));
        var m = max(max(a.x, a.y), max(a.z, a.w));
        for (var l = 1u; l < XG / 8u; l = l << 1u) {{
            m = max(m, subgroupShuffleXor(m, l));
        }}
        let inv = 127.0 / max(m, 1e-30);
        let q0 = vec4<i32>(round(x0 * inv));
        let q1 = vec4<i32>(round(x1 * inv));
        let q = q0 + q1;
        var sum = q.x + q.y + q.z + q.w;
        for (var l = 1u; l < XG / 8u; l = l << 1u) {{
            sum += subgroupShuffleXor(sum, l);
        }}
        if (r0 + flat < IN / 8u) {{
            xq_groups[r] = {};
            if (r % (XG / 8u) == 0u) {{
                let d = m / 127.0;
                xd_groups[r / (XG / 8u)] = vec2<f32>(d, f32(sum) * d);
            }}
        }}
    }}
    workgroupBarrier();
}}
"#,
            pack("q0", "q1")
        );
        return s;
    }
    let quads = 2 * rows;
    let mut body = String::from(
        "        let b = g * (XG / 4u);
",
    );
    for j in 0..quads {
        body += &format!(
            "        let x{j} = xin4(b + {j}u);
"
        );
    }
    let abs: Vec<String> = (0..quads).map(|j| format!("abs(x{j})")).collect();
    body += &format!(
        "        var a = {};
",
        abs[0]
    );
    for a in &abs[1..] {
        body += &format!(
            "        a = max(a, {a});
"
        );
    }
    body += "        let m = max(max(a.x, a.y), max(a.z, a.w));
        let inv = 127.0 / max(m, 1e-30);
        var q = vec4<i32>(0);
";
    for r in 0..rows {
        let (j0, j1) = (2 * r, 2 * r + 1);
        body += &format!(
            "        let q{j0} = vec4<i32>(round(x{j0} * inv));
        let q{j1} = vec4<i32>(round(x{j1} * inv));
        xq_groups[g * (XG / 8u) + {r}u] = {};
        q += q{j0} + q{j1};
",
            pack(&format!("q{j0}"), &format!("q{j1}"))
        );
    }
    s += &format!(
        r#"// One invocation per group.
fn stage_int8_groups() {{
    for (var g = lid; g < IN / XG; g += WG) {{
{body}        let d = m / 127.0;
        xd_groups[g] = vec2<f32>(d, f32(q.x + q.y + q.z + q.w) * d);
    }}
    workgroupBarrier();
}}
"#
    );
    s
}

/// Workgroup memory every WebGPU device grants: kernels that stage int8 input
/// groups stay within it.
pub(crate) const WORKGROUP_BYTES: usize = 16384;

/// Bytes of the int8 groups of an input of `in_features` ([`int8_group_stage`]).
fn int8_group_bytes(in_features: usize, group: usize) -> usize {
    in_features + in_features / group * 8
}

/// The group size by which a four-output kernel over matrices of `formats`
/// stages its input of `in_features` as int8 ([`Products::Int8Groups`]), if it
/// does: on targets with packed products, where every matrix is INT4 of one
/// group size (which divides the input: [`part_sizes`]), and the groups fit in
/// [`WORKGROUP_BYTES`] beside the kernel's k-slice sums (`shape`) and
/// reductions. On the H100, us per call, against f16 products in the same
/// run: Llama-2-7B INT4 gate/up 38.9 -> 32.7, Llama-3.2-1B 19.6 -> 17.9
/// (then 31.9 and 15.7 with the norm on the sums and the groups staged on
/// subgroup lanes; the down projection in [`MatvecShape::int8_group_quads`]).
pub(crate) fn int8_groups(
    formats: &[QuantFormat],
    in_features: usize,
    shape: &MatvecShape,
    other_bytes: usize,
    target: &Target,
) -> Option<usize> {
    if Products::for_target(target) != Products::Packed {
        return None;
    }
    let group = match formats.first()? {
        QuantFormat::Int4 { group_size, .. } => *group_size as usize,
        _ => return None,
    };
    let same =
        formats.iter().all(|f| matches!(f, QuantFormat::Int4 { group_size, .. } if *group_size as usize == group));
    let bytes = int8_group_bytes(in_features, group)
        + shape.scratch_bytes(target, SliceSum::Quad)
        + reduction_bytes(target, shape.invocations())
        + other_bytes;
    (same && bytes <= WORKGROUP_BYTES).then_some(group)
}

/// [`input_functions`] for the attention output `attn` (no norm): a step of one
/// token split over positions ([`crate::spec::attention_splits`], WGSL
/// `attention_splits()`) left one partial row per split, each normalised by its
/// own softmax sum, and the log-sum-exp of each split's scores in `lse`
/// (`[MAX_SPLITS, HEADS]`). Loading combines them: split `s` of head `h` weighs
/// `exp(lse[s, h] - M) / sum_s' exp(lse[s', h] - M)`, `M` the largest. Needs the
/// bindings `attn` and `lse`, the constants `IN`, `HEADS`, `HEAD_DIM`,
/// `SPLIT_LIMIT`, `BIG` and `WG`, `lid` and `attention_splits()`.
pub(crate) fn split_input_functions(
    in_features: usize,
    head_dim: usize,
    target: &Target,
    staging: InputStaging,
) -> String {
    let int8 = matches!(staging, InputStaging::Int8Groups { .. });
    let cache = if int8 { None } else { input_cache(in_features, target) };
    let vec = in_features.is_multiple_of(4);
    let mut s = String::from(
        r#"// Weight of split s for head h: split_w[s * HEADS + h]; the largest
// log-sum-exp of head h and its softmax sum: split_norm[h].
var<workgroup> split_w: array<f32, SPLIT_LIMIT * HEADS>;
var<workgroup> split_norm: array<vec2<f32>, HEADS>;

// Every (split, head) pair is loaded at once: a loop per head over splits in
// storage would wait on each load in turn.
fn split_weights(splits: u32) {
    let count = splits * HEADS;
    for (var i = lid; i < count; i += WG) {
        split_w[i] = lse[i];
    }
    workgroupBarrier();
    for (var h = lid; h < HEADS; h += WG) {
        var m = -BIG;
        for (var s = 0u; s < splits; s++) {
            m = max(m, split_w[s * HEADS + h]);
        }
        var sum = 0.0;
        for (var s = 0u; s < splits; s++) {
            sum += exp(split_w[s * HEADS + h] - m);
        }
        split_norm[h] = vec2<f32>(m, sum);
    }
    workgroupBarrier();
    for (var i = lid; i < count; i += WG) {
        let n = split_norm[i % HEADS];
        split_w[i] = exp(split_w[i] - n.x) / n.y;
    }
    workgroupBarrier();
}

"#,
    );
    // `combined(j, splits)`: element j (a vec4 of elements with vec rows) of the
    // combined row, four splits per iteration so their loads are in flight together
    // (past the last split, the last row is read again with weight 0)
    let (ty, index, weight) = if !vec {
        ("f32", "s * IN + i", "split_w[s * HEADS + i / HEAD_DIM]")
    } else if head_dim.is_multiple_of(4) {
        ("vec4<f32>", "s * IN4 + j", "split_w[s * HEADS + 4u * j / HEAD_DIM]")
    } else {
        ("vec4<f32>", "s * IN4 + j", "vec4<f32>(split_w[s * HEADS + h.x], split_w[s * HEADS + h.y], split_w[s * HEADS + h.z], split_w[s * HEADS + h.w])")
    };
    if vec {
        s += "const IN4: u32 = IN / 4u;\n\n";
    }
    let arg = if vec { "j" } else { "i" };
    s += &format!("fn combined({arg}: u32, splits: u32) -> {ty} {{\n");
    if vec && !head_dim.is_multiple_of(4) {
        s += "    let h = (4u * j + vec4<u32>(0u, 1u, 2u, 3u)) / HEAD_DIM;\n";
    }
    s += &format!("    var v = {ty}(0.0);\n    for (var s0 = 0u; s0 < splits; s0 += 4u) {{\n");
    s += "        let s1 = min(s0 + 1u, splits - 1u);\n        let s2 = min(s0 + 2u, splits - 1u);\n        let s3 = min(s0 + 3u, splits - 1u);\n";
    for u in 0..4 {
        let w = weight.replace("s * HEADS", &format!("s{u} * HEADS"));
        let at = index.replace("s * ", &format!("s{u} * "));
        let keep = if u == 0 { String::new() } else { format!(" * f32(s0 + {u}u < splits)") };
        s += &format!("        v += attn[{at}] * {w}{keep};\n");
    }
    s += "    }\n    return v;\n}\n\n";
    let (count, row) = if vec { ("IN4", "IN4") } else { ("IN", "IN") };
    if let Some(elem) = cache {
        let ty = if vec { format!("vec4<{elem}>") } else { elem.to_string() };
        let half = elem == "f16";
        let store = |v: &str| if half { format!("{ty}({v})") } else { v.to_string() };
        let load = |v: &str, t: &str| if half { format!("{t}({v})") } else { v.to_string() };
        let what = if half {
            "cached as f16 in workgroup memory (the f32 row would not fit)"
        } else {
            "cached in workgroup memory"
        };
        s += &format!("// The input row, its splits combined, {what}.\nvar<workgroup> xs: array<{ty}, {count}>;\n\n");
        s += &format!(
            r#"fn load_input(t: u32) {{
    let splits = attention_splits();
    if (splits == 1u) {{
        for (var j = lid; j < {count}; j += WG) {{
            xs[j] = {from_attn};
        }}
    }} else {{
        split_weights(splits);
        for (var j = lid; j < {count}; j += WG) {{
            xs[j] = {from_splits};
        }}
    }}
    workgroupBarrier();
}}

"#,
            from_attn = store(&format!("attn[t * {row} + j]")),
            from_splits = store("combined(j, splits)"),
        );
        if vec {
            s += &format!(
                "fn xin(i: u32) -> f32 {{\n    return {};\n}}\n\nfn xin4(j: u32) -> vec4<f32> {{\n    return {};\n}}\n",
                load("xs[i / 4u][i % 4u]", "f32"),
                load("xs[j]", "vec4<f32>")
            );
        } else {
            s += &format!("fn xin(i: u32) -> f32 {{\n    return {};\n}}\n\n", load("xs[i]", "f32"));
            s += XIN4_FROM_XIN;
        }
    } else {
        s += &format!(
            r#"// {why}: read from storage,
// combining the splits on every read.
var<private> x_base: u32;
var<private> x_splits: u32;

fn load_input(t: u32) {{
    let splits = attention_splits();
    x_base = t * {row};
    x_splits = splits;
    if (splits > 1u) {{
        split_weights(splits);
    }}
{stage}}}

"#,
            stage = if int8 { "    stage_int8_groups();\n" } else { "" },
            why = if int8 {
                "The input row is staged as int8 groups, once"
            } else {
                "The input row is too large for workgroup memory"
            }
        );
        if vec {
            s += "fn xin4(j: u32) -> vec4<f32> {\n    if (x_splits == 1u) {\n        return attn[x_base + j];\n    }\n    return combined(j, x_splits);\n}\n\n";
            s += XIN_FROM_XIN4;
        } else {
            s += "fn xin(i: u32) -> f32 {\n    if (x_splits == 1u) {\n        return attn[x_base + i];\n    }\n    return combined(i, x_splits);\n}\n\n";
            s += XIN4_FROM_XIN;
        }
    }
    s + &staging_functions(staging)
}

/// Keeps the `_dot` functions (`use_dot`) or the `_elem` ones: a module that has
/// no `xin` must not contain a function that calls it. Functions are separated
/// by blank lines; helpers without either suffix are always kept.
fn select_functions(body: &str, fn_prefix: &str, use_dot: bool) -> String {
    let drop = if use_dot { "elem(" } else { "dot(" };
    body.split("\n\n")
        .filter(|chunk| {
            let sig = chunk.lines().find(|l| l.starts_with(fn_prefix)).unwrap_or("");
            !sig.starts_with(&format!("{fn_prefix}{drop}"))
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_projection_caches_f16_rows_only_where_f32_would_not_fit() {
        let portable = Target::portable();
        let half = Target { shader_f16: true, ..portable };
        let cache = |in_features: usize, t: &Target| {
            let s = split_input_functions(in_features, 128, t, InputStaging::Storage);
            ["vec4<f32>", "vec4<f16>"]
                .into_iter()
                .find(|ty| s.contains(&format!("var<workgroup> xs: array<{ty}, IN4>")))
        };
        assert_eq!(cache(2048, &half), Some("vec4<f32>"));
        assert_eq!(cache(4096, &half), Some("vec4<f16>"));
        assert_eq!(cache(4096, &portable), None);
        assert_eq!(cache(8192, &half), None);
    }

    #[test]
    fn f16_input_scale_is_undone_exactly() {
        let scale: f64 = X16_SCALE.parse().unwrap();
        let unscale: f64 = X16_UNSCALE.parse().unwrap();
        assert_eq!(scale * unscale, 1.0);
        assert_eq!(scale.log2().fract(), 0.0, "a power of two scales f16 inputs without rounding");
    }

    #[test]
    fn matvec_shapes_fill_the_device_within_the_workgroup_limit() {
        let target = Target::portable();
        // (outputs, blocks): SmolLM2 q/o projections, its FFN, a 7B FFN, a 128k vocabulary, one tiny block
        for (outputs, blocks) in [(576, 18), (1536, 18), (11008, 128), (128_256, 128), (5, 1)] {
            let s = MatvecShape::choose(outputs, blocks, &target);
            assert!(s.tile.is_power_of_two() && s.ksplit.is_power_of_two(), "{s:?}");
            assert!(s.invocations() <= target.workgroup_limit(), "{outputs}x{blocks}: {s:?}");
            assert!(s.ksplit as usize <= blocks, "{outputs}x{blocks}: {s:?}");
            assert!((MIN_TILE..=MAX_TILE).contains(&s.tile), "{s:?}");
            let workgroups = outputs.div_ceil(s.tile as usize);
            assert!(workgroups >= TARGET_WORKGROUPS || s.tile == MIN_TILE, "{outputs}x{blocks}: {s:?}");
        }
        assert_eq!(MatvecShape::choose(576, 18, &target), MatvecShape { tile: 8, ksplit: 16 });
        assert_eq!(MatvecShape::choose(128_256, 128, &target), MatvecShape { tile: 64, ksplit: 4 });
        let small = Target { max_workgroup_size: 64, ..target };
        assert_eq!(MatvecShape::choose(576, 18, &small), MatvecShape { tile: 8, ksplit: 8 });
    }

    #[test]
    fn one_output_shapes_widen_only_where_the_device_allows() {
        let portable = Target::portable();
        let large = Target { max_workgroup_size: 1024, ..portable };
        for (outputs, blocks) in [(576, 18), (2048, 1024), (4096, 1376), (12288, 512), (5, 1)] {
            assert_eq!(
                MatvecShape::choose_one_output(outputs, blocks, &portable),
                MatvecShape::choose(outputs, blocks, &portable)
            );
            let s = MatvecShape::choose_one_output(outputs, blocks, &large);
            assert!(s.invocations() <= WIDE_INVOCATIONS, "{outputs}x{blocks}: {s:?}");
            assert!(s.ksplit as usize <= blocks, "{outputs}x{blocks}: {s:?}");
            let workgroups = outputs.div_ceil(s.tile as usize);
            assert!(workgroups >= WIDE_TARGET_WORKGROUPS || s.tile == MIN_TILE, "{outputs}x{blocks}: {s:?}");
        }
        // Llama-2-7B's down projection: 16 outputs a workgroup, 32 k-slices
        assert_eq!(MatvecShape::choose_one_output(4096, 1376, &large), MatvecShape { tile: 16, ksplit: 32 });
    }

    #[test]
    fn int4_kernels_stage_short_input_rows() {
        let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
        let int8 = QuantFormat::Int8 { per_tensor: false };
        // SmolLM2's QKV, gate/up and down projection, Llama-3.2-1B's gate/up
        assert!(stages_input(&[int4, int4, int4], 576));
        assert!(stages_input(&[int4], 1536));
        assert!(stages_input(&[int4, int4], 2048));
        // other formats, rows too wide or not of quads
        assert!(!stages_input(&[int4, int8], 576));
        assert!(!stages_input(&[QuantFormat::F16], 576));
        assert!(!stages_input(&[int4], 4096));
        assert!(!stages_input(&[int4], 578));
        let staged = input_functions("hidden", 576, Norm::Outputs, InputStaging::Rows);
        assert!(staged.contains("var<workgroup> xs") && staged.contains("stage_input();"));
        // a row normalised on every read is staged as it is summed, then scaled
        let normalised = input_functions("hidden", 576, Norm::Inputs, InputStaging::Rows);
        assert!(normalised.contains("xs[j] = v * norm[j];") && normalised.contains("xs[j] = xs[j] * x_scale;"));
        assert!(!normalised.contains("stage_input"));
    }

    #[test]
    fn residual_projections_read_wide_quads_where_measured_to_pay() {
        let large = Target { max_workgroup_size: 1024, subgroups: true, subgroup_size: 32, ..Target::portable() };
        let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
        let int8 = QuantFormat::Int8 { per_tensor: false };
        let wide = |format, outputs, blocks| MatvecShape::wide_quads(format, outputs, blocks, &large);
        // Llama-2-7B's down projection (F16 rows of two inputs, INT8 of four, INT4 groups)
        let f16_down = wide(QuantFormat::F16, 4096, 5504).unwrap();
        assert_eq!(f16_down, MatvecShape { tile: WIDE_QUAD_TILE, ksplit: 128 });
        assert_eq!(f16_down.invocations(), WIDE_INVOCATIONS);
        assert!(wide(int8, 4096, 2752).is_some());
        assert_eq!(wide(int4, 4096, 344), Some(MatvecShape { tile: WIDE_QUAD_TILE, ksplit: 128 }));
        // its INT4 output projection has one group a k-slice; the 1B's INT4 is too narrow
        assert_eq!(wide(int4, 4096, 128), None);
        assert_eq!(wide(int4, 2048, 256), None);
        // Llama-3.2-1B F16 and INT8 read wide quads; SmolLM2 does not, nor F32 weights
        assert!(wide(QuantFormat::F16, 2048, 4096).is_some());
        assert!(wide(int8, 2048, 2048).is_some());
        assert_eq!(wide(QuantFormat::F16, 576, 768), None);
        assert_eq!(wide(QuantFormat::F32, 4096, 11008), None);
        // matrices the quad path already reads, and devices without wide workgroups
        assert_eq!(wide(QuantFormat::F16, QUAD_MIN_OUTPUTS, 2048), None);
        assert_eq!(MatvecShape::wide_quads(QuantFormat::F16, 4096, 5504, &Target::portable()), None);
        for narrow in [Target { subgroups: false, ..large }, Target { subgroup_size: 4, ..large }] {
            assert_eq!(MatvecShape::wide_quads(QuantFormat::F16, 4096, 5504, &narrow), None);
        }
        // a short input: no more k-slices than blocks
        assert_eq!(wide(QuantFormat::F16, 4096, 40), Some(MatvecShape { tile: WIDE_QUAD_TILE, ksplit: 32 }));
    }

    #[test]
    fn int4_stages_int8_groups_where_they_fit_in_workgroup_memory() {
        let large = Target {
            shader_f16: true,
            subgroups: true,
            subgroup_size: 32,
            max_workgroup_size: 1024,
            ..Target::portable()
        };
        let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
        // Llama-2-7B's down projection: 11008 + 344 * 8 bytes of groups, 2 KiB of
        // k-slice sums and 128 bytes of reductions
        let (shape, group) = MatvecShape::int8_group_quads(int4, 4096, 11008, 0, &large).unwrap();
        assert_eq!((shape, group), (MatvecShape { tile: INT8_GROUP_QUAD_TILE, ksplit: 64 }, 32));
        assert_eq!(
            int8_group_bytes(11008, 32) + shape.scratch_bytes(&large, SliceSum::Quad) + reduction_bytes(&large, 512),
            15936
        );
        // its output projection too, two groups a k-slice, beside 4 KiB of split weights
        let (shape, _) = MatvecShape::int8_group_quads(int4, 4096, 4096, 4096 + 32 * 8, &large).unwrap();
        assert_eq!(shape.slice(128), 2);
        // Llama-3.2-1B's down projection in tiles of 4 quads, two groups a k-slice
        let (shape, _) = MatvecShape::int8_group_quads(int4, 2048, 8192, 0, &large).unwrap();
        assert_eq!(shape, MatvecShape { tile: WIDE_QUAD_TILE, ksplit: 128 });
        // exact products: without f16, with other formats, with one group a k-slice
        // (Llama-3.2-1B's output projection), below 2048 outputs, and with 16 KiB of groups
        assert_eq!(MatvecShape::int8_group_quads(int4, 4096, 11008, 0, &Target { shader_f16: false, ..large }), None);
        assert_eq!(MatvecShape::int8_group_quads(QuantFormat::F16, 4096, 11008, 0, &large), None);
        assert_eq!(MatvecShape::int8_group_quads(int4, 2048, 2048, 4096 + 32 * 8, &large), None);
        assert_eq!(MatvecShape::int8_group_quads(int4, 4096, 2048, 0, &large), None);
        assert_eq!(MatvecShape::int8_group_quads(int4, 1536, 8192, 0, &large), None);
        assert_eq!(MatvecShape::int8_group_quads(int4, 5120, 13824, 0, &large), None);
        assert_eq!(MatvecShape::int8_group_quads(int4, 4096, 11008, 1024, &large), None);
        // gate/up of mixed group sizes, or beside 16-wide subgroups' scratch
        let gate_up = MatvecShape { tile: 8, ksplit: 32 };
        let int4_64 = QuantFormat::Int4 { group_size: 64, symmetric: true };
        assert_eq!(int8_groups(&[int4, int4], 4096, &gate_up, 0, &large), Some(32));
        assert_eq!(int8_groups(&[int4_64, int4_64], 4096, &gate_up, 0, &large), Some(64));
        assert_eq!(int8_groups(&[int4, int4_64], 4096, &gate_up, 0, &large), None);
        assert_eq!(int8_groups(&[int4, int4], 16384, &gate_up, 0, &large), None);
    }
}

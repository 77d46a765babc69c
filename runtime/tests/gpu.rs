//! The GPU backend on a real adapter (llvmpipe where there is no GPU): each
//! kernel family against a plain CPU implementation for every weight format
//! and kernel target, then whole models against the CPU backend. A machine
//! without an adapter fails these tests; it does not skip them.

use std::sync::OnceLock;

use llama5_codegen::format;
use llama5_codegen::manifest::{Precision, QuantFormat};
use llama5_codegen::target::{COOP_SUBGROUP_SIZE, DEFAULT_WORKGROUP_STORAGE};
use llama5_codegen::{
    attention_splits, generate, generate_batch, split_limit, Access, Activation, Kernel, KernelSpec, Resource,
    StepUniform, Target, ATTENTION_SPLIT_LEN, MAX_ATTENTION_SPLITS, SUM_SQUARES_PART,
};
use llama5_runtime::cpu;
use llama5_runtime::gpu::harness::KernelRunner;
use llama5_runtime::gpu::{GpuBackend, GpuOptions};
use llama5_runtime::{Backend, CpuBackend, Logits, Model};

// Normalised mean squared error, sum((gpu - cpu)^2) / sum(cpu^2), allowed per
// precision. Kernels decode the same packed words the CPU decodes, so only the
// f32 summation order differs; INT4 also regroups as scale * sum(q x) + min * sum(x).
const NMSE_F16: f64 = 1e-10;
const NMSE_BF16: f64 = 1e-10;
const NMSE_INT8: f64 = 1e-10;
const NMSE_INT4: f64 = 1e-9;
/// Results that pass through an f16 KV cache (targets with shader-f16): 2^-11 relative rounding.
const NMSE_KV_F16: f64 = 1e-5;
/// Whole-model logits, f32 KV cache: summation order over two layers.
const NMSE_MODEL_F32: f64 = 1e-7;
/// Whole-model logits with the f16 KV cache.
const NMSE_MODEL_F16_KV: f64 = 1e-4;
/// Tiled kernels on cooperative matrices stage inputs and dequantised weights
/// as f16 (2^-11 relative rounding of each, f32 accumulation): about 2e-7 on
/// these random values, allowed with margin on top of the precision's own limit.
const NMSE_COOP_F16_INPUTS: f64 = 1e-5;
/// The plain tiled gate/up (and down projection of a wide enough residual
/// stream) on targets with shader-f16 stages its inputs (normalised) and
/// dequantised weights as f16 and sums each step's 16 products in f16 before
/// adding them to f32: 4e-7 to 1e-6 on these random values, at every input
/// scale.
const NMSE_F16_TILES: f64 = 1e-5;
/// Whole-model logits when the prefill ran on cooperative matrices.
const NMSE_MODEL_COOP: f64 = 1e-3;
/// INT4 matrix-vector products in f16 (targets with shader-f16): the input
/// rounded to f16 and a word's eight products summed in f16, about 5e-7 on
/// these random values.
const NMSE_F16_PRODUCTS: f64 = 1e-5;
/// Matrix-vector products through dot4I8Packed (targets with shader-f16): INT8
/// with each row's four inputs quantised to int8, 2e-6 to 2e-5 on these
/// values; INT4 with each group of 32 inputs quantised, about 1.4e-5.
const NMSE_INT8_INPUTS: f64 = 1e-4;
/// An output projection's input row cached as f16 (rounding error alone: 3e-8
/// seen).
const NMSE_F16_INPUT_ROW: f64 = 1e-6;

/// The limit for `kernel`: `limit`, plus [`NMSE_COOP_F16_INPUTS`] for a
/// cooperative-matrix kernel, [`NMSE_F16_TILES`] for a plain tiled kernel
/// with f16 tiles, [`NMSE_F16_PRODUCTS`] for f16 products and
/// [`NMSE_INT8_INPUTS`] for int8 inputs.
fn kernel_limit(kernel: &Kernel, limit: f64) -> f64 {
    let mut limit = limit;
    if kernel.wgsl.contains("coopMultiplyAdd") || kernel.wgsl.contains("emu_mma_") {
        limit += NMSE_COOP_F16_INPUTS;
    }
    if kernel.wgsl.contains("fn begin_tile(") {
        limit += NMSE_F16_TILES;
    }
    if kernel.wgsl.contains("_qdot(") {
        limit += NMSE_F16_PRODUCTS;
    }
    if kernel.wgsl.contains("dot4I8Packed(") {
        limit += NMSE_INT8_INPUTS;
    }
    if kernel.wgsl.contains("cached as f16 in workgroup memory") {
        limit += NMSE_F16_INPUT_ROW;
    }
    limit
}

fn nmse_for(format: QuantFormat) -> f64 {
    match format {
        QuantFormat::F32 | QuantFormat::F16 => NMSE_F16,
        QuantFormat::Bf16 => NMSE_BF16,
        QuantFormat::Int8 { .. } => NMSE_INT8,
        QuantFormat::Int4 { .. } => NMSE_INT4,
    }
}

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let err: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    err / norm.max(1e-30)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], limit: f64) {
    let e = nmse(got, want);
    assert!(
        e <= limit,
        "{what}: nmse {e:.3e} above {limit:.0e}\n got[..8] {:?}\nwant[..8] {:?}",
        &got[..got.len().min(8)],
        &want[..want.len().min(8)]
    );
}

const FORMATS: [QuantFormat; 6] = [
    QuantFormat::F16,
    QuantFormat::Bf16,
    QuantFormat::Int8 { per_tensor: false },
    QuantFormat::Int8 { per_tensor: true },
    QuantFormat::Int4 { group_size: 32, symmetric: false },
    QuantFormat::Int4 { group_size: 16, symmetric: true },
];

/// Tests take turns on the GPU: on the H100 the binary hung with tests on
/// several threads at once while a device with cooperative matrices was open
/// (each test passed alone, and all of them in turn), and the turns cost
/// llvmpipe little (its own threads do the work).
fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // a failed test must not fail the ones after it
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adapter features that give each variant of [`Target::all_with_coop`].
fn features_for(t: &Target) -> wgpu::Features {
    let mut f = wgpu::Features::empty();
    if t.shader_f16 {
        f |= wgpu::Features::SHADER_F16;
    }
    if t.subgroups {
        f |= wgpu::Features::SUBGROUP;
    }
    if t.cooperative_matrix {
        f |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
    }
    f
}

/// The adapter the kernel tests open (a substring of its name; default: the first).
const TEST_ADAPTER_ENV: &str = "LLAMA5_TEST_ADAPTER";
/// The subgroup size the adapter must run the subgroup variants with, where set:
/// `cargo xtask test` runs the kernel families again on llvmpipe with 16-wide
/// subgroups, where two k-slices of a tile of 8 share a subgroup (its default
/// 8-wide subgroups never take the shuffle path of `ksplit_sum`).
const TEST_SUBGROUP_SIZE_ENV: &str = "LLAMA5_TEST_SUBGROUP_SIZE";

/// One runner per target variant, opened once for the whole binary: the four
/// of [`Target::all`], which every adapter must run, and the cooperative-matrix
/// one where the adapter has them (where it has not, that is printed: those
/// kernels were not checked).
fn runners() -> &'static [KernelRunner] {
    static RUNNERS: OnceLock<Vec<KernelRunner>> = OnceLock::new();
    RUNNERS.get_or_init(|| {
        let adapter = std::env::var(TEST_ADAPTER_ENV).ok();
        let subgroup_size: Option<u32> = std::env::var(TEST_SUBGROUP_SIZE_ENV)
            .ok()
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{TEST_SUBGROUP_SIZE_ENV}={v}: not a number")));
        let mut runners: Vec<KernelRunner> = Target::all()
            .iter()
            .map(|t| {
                let r = KernelRunner::new(adapter.as_deref(), features_for(t))
                    .unwrap_or_else(|e| panic!("no GPU adapter for the {} kernels: {e}", t.name()));
                assert_eq!(
                    (r.target().shader_f16, r.target().subgroups, r.target().cooperative_matrix),
                    (t.shader_f16, t.subgroups, false),
                    "adapter {} lacks what the {} kernels need",
                    r.adapter_name(),
                    t.name()
                );
                if let (Some(n), true) = (subgroup_size, t.subgroups) {
                    assert_eq!(r.target().subgroup_size, n, "adapter {}: subgroup size", r.adapter_name());
                }
                r
            })
            .collect();
        let coop = Target::coop();
        let r = KernelRunner::new(adapter.as_deref(), features_for(&coop))
            .unwrap_or_else(|e| panic!("no GPU adapter for the {} kernels: {e}", coop.name()));
        if r.target().cooperative_matrix {
            assert_eq!(r.target().name(), coop.name());
            runners.push(r);
        } else {
            // written past the test harness's capture, so it shows in every run
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "NOTE: the {} kernels (cooperative matrices) were NOT run: adapter {} does not offer them \
                 (or {} is set); only {} variants ran, the coop kernels' data layout only in scalar emulation",
                coop.name(),
                r.adapter_name(),
                llama5_runtime::gpu::NO_COOP_ENV,
                runners.len()
            );
        }
        runners
    })
}

/// The targets of [`runners`].
fn targets() -> Vec<Target> {
    runners().iter().map(|r| *r.target()).collect()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A KV cache's bytes for `target` (f16 with shader-f16) and back.
fn kv_bytes(v: &[f32], target: &Target) -> Vec<u8> {
    if target.shader_f16 {
        v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()
    } else {
        f32_bytes(v)
    }
}

fn kv_values(b: &[u8], target: &Target) -> Vec<f32> {
    if target.shader_f16 {
        b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
    } else {
        to_f32(b)
    }
}

/// A random `[out, in]` matrix packed in `format`: the buffer contents
/// (data then scales) and the dequantized values the CPU sees.
fn packed(rng: &mut Rng, format: QuantFormat, out: usize, in_features: usize) -> (Vec<u8>, Vec<f32>) {
    let w = rng.vec(out * in_features, 0.5);
    let p = format::pack(format, &w, out, in_features).unwrap();
    let deq = format::unpack(format, &p.data, &p.scales, out, in_features).unwrap();
    let mut bytes = p.data;
    bytes.extend_from_slice(&p.scales);
    (bytes, deq)
}

fn matvec(w: &[f32], x: &[f32], out: usize) -> Vec<f32> {
    let n = x.len();
    (0..out).map(|o| w[o * n..(o + 1) * n].iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn step(pos: usize, n_tokens: usize, ctx: usize, logits_from: usize, argmax_row: usize) -> Vec<u8> {
    StepUniform {
        pos: pos as u32,
        n_tokens: n_tokens as u32,
        ctx: ctx as u32,
        logits_from: logits_from as u32,
        argmax_row: argmax_row as u32,
        ..StepUniform::default()
    }
    .to_bytes()
    .to_vec()
}

/// The step a kernel's contents hold in binding 0 (the fields dispatch sizes depend on).
fn step_of(contents: &[Vec<u8>]) -> StepUniform {
    let word = |i: usize| u32::from_le_bytes(contents[0][4 * i..4 * i + 4].try_into().unwrap());
    StepUniform { pos: word(0), n_tokens: word(1), ctx: word(2), ..StepUniform::default() }
}

/// Runs the kernel of `spec` on `contents`, one per binding; a logits kernel
/// that leaves argmax shares (bound last) gets a zeroed buffer for them when
/// `contents` has none.
fn run(runner: &KernelRunner, spec: &KernelSpec, contents: &[Vec<u8>], rows: u32) -> (Kernel, Vec<Vec<u8>>) {
    let kernel = generate(spec).unwrap();
    let mut contents = contents.to_vec();
    if kernel.bindings.len() == contents.len() + 1 && kernel.bindings.last().unwrap().resource == Resource::ArgmaxShares
    {
        contents.push(vec![0; kernel.dispatch[0] as usize * 8]);
    }
    let out = run_kernel(runner, &kernel, &contents, rows);
    (kernel, out)
}

const RESIDUAL_COPY: Resource = Resource::Activation(Activation::HiddenHalf);
const FFN_PAIRS: Resource = Resource::Activation(Activation::FfnHalf);
/// 2^-24, the spacing of f16's subnormals.
const F16_SUBNORMAL_STEP: f32 = 5.960_464_5e-8;

/// Runs `kernel` on the first of `contents` it binds, with the f16 pairs where
/// it binds them: the f32 contents rounded, in the f32 activation's place
/// (SiLU(gate) * up, and the residual stream's copy where it is read), or
/// after the others for the stream's copy written beside the stream. Pairs
/// written in place come back as f32; a copy written beside the stream must
/// hold the written stream, rounded.
///
/// Sums of squares by parts (of the residual stream, of SiLU(gate) * up, of
/// the attention output), bound last where a kernel binds them, are likewise computed from their
/// activation where read, and where written must hold the written
/// activation's for every token of the step.
fn run_kernel(runner: &KernelRunner, kernel: &Kernel, contents: &[Vec<u8>], rows: u32) -> Vec<Vec<u8>> {
    let written = |b: &&llama5_codegen::Binding| b.resource == RESIDUAL_COPY && b.access == Access::ReadWrite;
    // each sums binding, with that of the activation it sums
    let sums: Vec<_> = kernel
        .bindings
        .iter()
        .filter_map(|b| {
            let of = summed(&b.resource)?;
            let of = kernel.bindings.iter().find(|a| a.resource == Resource::Activation(of));
            Some((b, of.unwrap_or_else(|| panic!("{}: {} without its activation", kernel.name, b.name))))
        })
        .collect();
    let derived = kernel.bindings.iter().filter(written).count() + sums.len();
    let mut contents = contents[..kernel.bindings.len() - derived].to_vec();
    let stream = kernel.bindings.iter().find(|b| b.resource == Resource::Activation(Activation::Hidden));
    let in_place =
        |b: &&llama5_codegen::Binding| b.resource == FFN_PAIRS || (b.resource == RESIDUAL_COPY && !written(b));
    for b in &kernel.bindings {
        if in_place(&b) {
            contents[b.index as usize] = f16_pairs(&to_f32(&contents[b.index as usize]));
        } else if written(&b) {
            assert_eq!(b.index as usize, contents.len(), "{}: the copy's binding comes last", kernel.name);
            contents.push(f16_pairs(&to_f32(&contents[stream.unwrap().index as usize])));
        }
    }
    for &(b, of) in &sums {
        assert_eq!(b.index as usize, contents.len(), "{}: the sums' bindings come last", kernel.name);
        let values = part_sums(&to_f32(&contents[of.index as usize]), width(kernel, of));
        // NaN where the kernel must write them, so a part it skips fails below
        let values = if b.access == Access::ReadWrite { vec![f32::NAN; values.len()] } else { values };
        contents.push(f32_bytes(&values));
    }
    let grid = kernel.dispatch_for(&step_of(&contents), rows);
    let mut out = runner.run(kernel, &contents, grid).unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
    for &(b, of) in sums.iter().filter(|(b, _)| b.access == Access::ReadWrite) {
        // the step's tokens, whose rows the kernel wrote
        let n = step_of(&contents).n_tokens as usize;
        let width = width(kernel, of);
        let parts = width.div_ceil(SUM_SQUARES_PART);
        let want = part_sums(&to_f32(&out[of.index as usize]), width);
        let got = to_f32(&out[b.index as usize]);
        for (i, (w, g)) in want.iter().zip(&got).take(n * parts).enumerate() {
            assert!(
                (w - g).abs() <= w.abs() * 1e-5 + 1e-30,
                "{}: sum of squares {i} of {}: {g}, the activation's {w}",
                kernel.name,
                of.name
            );
        }
    }
    for b in kernel.bindings.iter().filter(in_place) {
        out[b.index as usize] = f32_bytes(&from_f16_pairs(&out[b.index as usize]));
    }
    if let Some(copy) = kernel.bindings.iter().find(written) {
        let (want, got) = (to_f32(&out[stream.unwrap().index as usize]), from_f16_pairs(&out[copy.index as usize]));
        assert_eq!(want.len(), got.len());
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            // within f16's rounding (subnormals: its smallest step); past its
            // range, clamped to it
            let close = (w - g).abs() <= w.abs() / 1024.0 + F16_SUBNORMAL_STEP
                || (w.abs() > 65504.0 && *g == w.signum() * 65504.0);
            assert!(close, "{}: copy element {i}: {g}, the stream {w}", kernel.name);
        }
    }
    out
}

/// The activation whose sums of squares by parts `resource` holds.
fn summed(resource: &Resource) -> Option<Activation> {
    match resource {
        Resource::Activation(Activation::SumSquares) => Some(Activation::Hidden),
        Resource::Activation(Activation::FfnSumSquares) => Some(Activation::Ffn),
        Resource::Activation(Activation::AttnSumSquares) => Some(Activation::Attn),
        _ => None,
    }
}

/// The width of the activation `binding` of a kernel: its `OUT` where it
/// writes it, else its `IN` (the embedding's `HIDDEN` either way).
fn width(kernel: &Kernel, binding: &llama5_codegen::Binding) -> usize {
    let name = if binding.access == Access::ReadWrite { "OUT" } else { "IN" };
    let value = wgsl_const_opt(&kernel.wgsl, name).or_else(|| wgsl_const_opt(&kernel.wgsl, "HIDDEN"));
    value.unwrap_or_else(|| panic!("{}: no {name}", kernel.name)) as usize
}

/// Sums of squares of each row of `stream` (rows of `width`) by parts of
/// [`SUM_SQUARES_PART`].
fn part_sums(stream: &[f32], width: usize) -> Vec<f32> {
    stream.chunks(width).flat_map(|row| row.chunks(SUM_SQUARES_PART).map(|p| p.iter().map(|v| v * v).sum())).collect()
}

fn f16_pairs(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()
}

fn from_f16_pairs(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

/// Runs the kernel of `spec` and, where it has one, its batch variant on the
/// same contents (those of the bindings it shares).
fn run_all(runner: &KernelRunner, spec: &KernelSpec, contents: &[Vec<u8>], rows: u32) -> Vec<(Kernel, Vec<Vec<u8>>)> {
    let mut out = vec![run(runner, spec, contents, rows)];
    if let Some(kernel) = generate_batch(spec).unwrap() {
        let result = run_kernel(runner, &kernel, contents, rows);
        out.push((kernel, result));
    }
    assert_eq!(out.len(), 2, "{} has a batch variant", spec.name());
    // the cooperative-matrix kernel's data layout, with its three operations
    // done in scalar code: runs on the f16-sg runner of any adapter
    let t = *runner.target();
    if t.shader_f16 && t.subgroups && !t.cooperative_matrix {
        let coop_target = Target { cooperative_matrix: true, subgroup_size: COOP_SUBGROUP_SIZE, ..t };
        let coop = generate_batch(&spec.with_target(coop_target)).unwrap().unwrap();
        assert!(coop.wgsl.contains("coopMultiplyAdd"), "{}: a tiled kernel on cooperative matrices", coop.name);
        let kernel = emulated_coop(&coop);
        let result = run_kernel(runner, &kernel, contents, rows);
        out.push((kernel, result));
    }
    out
}

/// `kernel` (a cooperative-matrix kernel) with `coopLoadT`, `coopMultiplyAdd`
/// and `coopStoreT` done by scalar code that follows their definition
/// (row-major, element (r, c) at base + r * stride + c), subgroups of 32
/// taken as consecutive invocations: checks the staging, the sub-tile
/// ownership and the hand-back to the epilogues on adapters without
/// cooperative matrices (it cannot check the driver's own operations).
fn emulated_coop(kernel: &Kernel) -> Kernel {
    let mut w = kernel.wgsl.replace("enable wgpu_cooperative_matrix;\n", "");
    let sg = ",\n    @builtin(subgroup_id) sg_in: u32,\n    @builtin(num_workgroups) nwg: vec3<u32>\n) {\n    lid = lid_in;\n";
    assert!(w.contains(sg), "{}: entry point", kernel.name);
    w = w.replace(
        sg,
        ",\n    @builtin(num_workgroups) nwg: vec3<u32>\n) {\n    lid = lid_in;\n    let sg_in = lid_in / 32u;\n",
    );
    w = w.replace("coop_mat16x16<f32, C>()", "array<f32, 8>()");
    // A: the base index of the sub-tile in xh
    w = w.replace("coopLoadT<coop_mat16x16<f16, A>>(&xh[", "(").replace("], XS)", ")");
    let mut tiles = Vec::new();
    for line in kernel.wgsl.lines() {
        if let Some(rest) = line.strip_prefix("var<workgroup> ") {
            if let Some((name, ty)) = rest.split_once(": ") {
                if ty.starts_with("array<f16") && name != "xh" {
                    tiles.push(name.to_string());
                }
            }
        }
    }
    assert!(!tiles.is_empty(), "{}: weight tiles", kernel.name);
    w = w.replace("coopMultiplyAdd(a, coopLoadT<coop_mat16x16<f16, B>>(&", "emu_mma_");
    for t in &tiles {
        w = w.replace(&format!("emu_mma_{t}["), &format!("emu_mma_{t}(a, "));
    }
    w = w.replace("], WS), ", ", WS, ");
    w = w.replace("coopStoreT(", "emu_store(").replace(", &cs[", ", ").replace("], CS);", ", CS);");
    assert!(
        ["coopLoad", "coopStore", "coopMultiplyAdd", "coop_mat"].iter().all(|op| !w.contains(op)),
        "{}: left unemulated:\n{w}",
        kernel.name
    );
    // each invocation holds elements lane + 32 e of a 16 x 16 accumulator
    for t in &tiles {
        w += &format!(
            r#"
fn emu_mma_{t}(a: u32, b: u32, stride: u32, c: array<f32, 8>) -> array<f32, 8> {{
    var r = c;
    for (var e = 0u; e < 8u; e++) {{
        let i = lid % 32u + 32u * e;
        var s = 0.0;
        for (var k = 0u; k < 16u; k++) {{
            s += f32(xh[a + (i / 16u) * XS + k]) * f32({t}[b + k * stride + i % 16u]);
        }}
        r[e] += s;
    }}
    return r;
}}
"#
        );
    }
    w += r#"
fn emu_store(c: array<f32, 8>, base: u32, stride: u32) {
    for (var e = 0u; e < 8u; e++) {
        let i = lid % 32u + 32u * e;
        cs[base + (i / 16u) * stride + i % 16u] = c[e];
    }
}
"#;
    Kernel { name: format!("{} (emulated)", kernel.name), wgsl: w, ..kernel.clone() }
}

/// Input sizes suiting a format: a multiple of its pack and INT4 group, and odd otherwise.
fn input_size(format: QuantFormat, base: usize) -> usize {
    match format {
        QuantFormat::Int4 { group_size, .. } => base.div_ceil(group_size as usize) * group_size as usize,
        QuantFormat::Int8 { .. } => base.div_ceil(4) * 4 + 4,
        _ => base.div_ceil(2) * 2 + 2,
    }
}

#[test]
fn adapter_report_lists_an_adapter() {
    let _gpu = gpu_lock();
    let report = llama5_runtime::gpu::adapters_report();
    assert!(!report.starts_with("no adapters"), "{report}");
    assert!(report.contains("kernel target"), "{report}");
    println!("{report}");
}

#[test]
fn matvec_add_matches_cpu() {
    let _gpu = gpu_lock();
    for runner in runners() {
        for format in FORMATS {
            // a short input (cached in workgroup memory), a long one (read from storage),
            // one long enough for runs of blocks to end inside a slice, enough outputs
            // for the widest tile, more tokens than one batch tile, and enough outputs for
            // four at a load in wide workgroups (the last quad part padding; INT4 in
            // tiles of 4 or 8 quads); and enough for two tiles a workgroup (4096 or more);
            // and a residual stream wide enough for f16 tiles in the tiled kernel (2048
            // or more), over two token tiles
            for (in_base, out, tokens) in [
                (90, 77, 3),
                (2300, 33, 2),
                (9000, 40, 1),
                (40, 40_000, 1),
                (90, 77, 70),
                (300, 4098, 2),
                (300, 2050, 1),
                (90, 4224, 3),
                (90, 2050, 70),
            ] {
                check_down(runner, format, input_size(format, in_base), out, tokens, 1.0, None, false, "");
            }
        }
    }
}

/// Runs every variant of the down projection (and residual add) over `tokens`
/// rows of `in_features` inputs scaled by `x_scale` against the CPU, the
/// residual stream at the same scale (so the products weigh in the error);
/// with `heads_of` (a head's dimensions), the output projection instead, of
/// an attention output of that many inputs. `what` names the case. With
/// `unit_only`, only the variants staging unit inputs (f16 tiles of inputs
/// divided by their rms) are held to the tolerance, and the runner must have
/// one.
#[allow(clippy::too_many_arguments)]
fn check_down(
    runner: &KernelRunner,
    format: QuantFormat,
    in_features: usize,
    out: usize,
    tokens: usize,
    x_scale: f32,
    heads_of: Option<usize>,
    unit_only: bool,
    what: &str,
) {
    let mut rng = Rng(in_features as u64 * 31 + out as u64);
    let (w_bytes, w) = packed(&mut rng, format, out, in_features);
    let x = rng.vec(tokens * in_features, x_scale);
    let hidden = rng.vec(tokens * out, x_scale);
    let target = *runner.target();
    let st = step(0, tokens, 1, 0, 0);
    let (spec, contents) = match heads_of {
        None => (
            KernelSpec::MatvecAdd { input: Activation::Ffn, in_features, out_features: out, format, target },
            vec![st, f32_bytes(&x), w_bytes, f32_bytes(&hidden)],
        ),
        Some(head_dim) => {
            let heads = in_features / head_dim;
            // a step of several tokens is never split: the log-sum-exps go unread
            let lse = vec![0; MAX_ATTENTION_SPLITS as usize * heads * 4];
            (
                KernelSpec::AttnOutput { heads, head_dim, hidden: out, format, target },
                vec![st, f32_bytes(&x), w_bytes, f32_bytes(&hidden), lse],
            )
        }
    };
    let mut want = hidden.clone();
    for t in 0..tokens {
        let y = matvec(&w, &x[t * in_features..(t + 1) * in_features], out);
        for o in 0..out {
            want[t * out + o] += y[o];
        }
    }
    let mut checked = 0;
    for (kernel, result) in run_all(runner, &spec, &contents, 0) {
        if unit_only && !kernel.wgsl.contains("let r = rms(ty);") {
            continue;
        }
        let got = to_f32(&result[3]);
        assert!(got.iter().all(|v| v.is_finite()), "{}{what}: non-finite output", kernel.name);
        assert_close(&format!("{}{what}", kernel.name), &got, &want, kernel_limit(&kernel, nmse_for(format)));
        checked += 1;
    }
    let target = runner.target();
    assert!(checked > 0 || !target.shader_f16 || target.cooperative_matrix, "no unit-input kernel{what}");
}

/// Normalised inputs of a few thousand (norm weights that large), and rows of
/// zeros: packed products (INT4 in f16, INT8 through dot4I8Packed) must
/// stay finite and within their tolerance. (INT8's per-row scale rounds the
/// small inputs of a row beside a large one away; the error measure, dominated
/// by the large inputs, does not see that.)
#[test]
fn packed_products_hold_large_and_zero_inputs() {
    let _gpu = gpu_lock();
    let eps = 1e-5;
    for runner in runners() {
        let target = *runner.target();
        for format in [QuantFormat::Int4 { group_size: 32, symmetric: false }, QuantFormat::Int8 { per_tensor: false }]
        {
            // the logits kernel packs its products where the target has shader-f16,
            // reading four outputs at a load (8200 outputs); one output at a time (77)
            for out in [77, 8200] {
                let mut rng = Rng(out as u64);
                let hidden = 256;
                let (w_bytes, w) = packed(&mut rng, format, out, hidden);
                let x = rng.vec(hidden, 1.0);
                // norm weights that make normalised inputs of thousands: a whole
                // group of them, and single ones among small values; and zeros
                let mut norm = rng.vec(hidden, 1.0);
                for v in &mut norm[32..64] {
                    *v = 3000.0 * v.signum();
                }
                norm[100] = -4000.0;
                norm[200] = 2500.0;
                norm[64..72].fill(0.0);
                let spec = KernelSpec::RmsLogits { hidden, vocab: out, rows: [0, out], eps, format, target };
                let contents =
                    vec![step(0, 1, 1, 0, 0), f32_bytes(&x), f32_bytes(&norm), w_bytes, f32_bytes(&vec![0.0; out])];
                let mut xn = vec![0.0; hidden];
                cpu::rmsnorm(&mut xn, &x, &norm, eps);
                assert!(xn.iter().any(|v| v.abs() > 2000.0), "the inputs are large");
                let want = matvec(&w, &xn, out);
                for (kernel, result) in run_all(runner, &spec, &contents, 1) {
                    let got = to_f32(&result[4]);
                    assert!(got.iter().all(|v| v.is_finite()), "{}: non-finite output", kernel.name);
                    assert_close(&kernel.name, &got, &want, kernel_limit(&kernel, nmse_for(format)));
                }
            }
        }
    }
}

/// Inputs past what packed f16 products hold (about 17000): the residual
/// projections keep exact products, or (wide INT4 ones) quantise their input
/// to int8 at a scale per group.
#[test]
fn residual_projections_hold_unnormalised_inputs() {
    let _gpu = gpu_lock();
    for runner in runners() {
        let target = *runner.target();
        let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
        // four outputs at a load; and in wide workgroups, with two groups a k-slice
        for (format, in_features, out) in
            [(int4, 256, 8200), (QuantFormat::Int8 { per_tensor: false }, 256, 8200), (int4, 2112, 4100)]
        {
            let mut rng = Rng(5);
            let (w_bytes, w) = packed(&mut rng, format, out, in_features);
            let mut x = rng.vec(in_features, 1.0);
            for v in &mut x[32..64] {
                *v = 60000.0 * v.signum();
            }
            let hidden = rng.vec(out, 1.0);
            let spec = KernelSpec::MatvecAdd { input: Activation::Ffn, in_features, out_features: out, format, target };
            let contents = vec![step(0, 1, 1, 0, 0), f32_bytes(&x), w_bytes, f32_bytes(&hidden)];
            let mut want = hidden.clone();
            for (o, y) in matvec(&w, &x, out).into_iter().enumerate() {
                want[o] += y;
            }
            for (kernel, result) in run_all(runner, &spec, &contents, 0) {
                let got = to_f32(&result[3]);
                assert!(got.iter().all(|v| v.is_finite()), "{}: non-finite output", kernel.name);
                assert_close(&kernel.name, &got, &want, kernel_limit(&kernel, nmse_for(format)));
            }
        }
    }
}

/// Runs every variant of the gate/up kernel over `tokens` rows of `hidden`
/// inputs (scaled by `x_scale`, norm weights by `norm_scale`) and checks
/// SiLU(gate) * up against the CPU; `what` names the case.
#[allow(clippy::too_many_arguments)]
fn check_gate_up(
    runner: &KernelRunner,
    format: QuantFormat,
    hidden: usize,
    ffn: usize,
    tokens: usize,
    x_scale: f32,
    norm_scale: f32,
    what: &str,
) {
    let eps = 1e-5;
    let mut rng = Rng(7);
    let (g_bytes, g) = packed(&mut rng, format, ffn, hidden);
    let (u_bytes, u) = packed(&mut rng, format, ffn, hidden);
    let x = rng.vec(tokens * hidden, x_scale);
    let norm = rng.vec(hidden, norm_scale);
    let spec = KernelSpec::RmsGateUp { hidden, ffn, eps, gate: format, up: format, target: *runner.target() };
    let contents =
        vec![step(0, tokens, 1, 0, 0), f32_bytes(&x), f32_bytes(&norm), g_bytes, u_bytes, vec![0; tokens * ffn * 4]];
    let mut want = Vec::new();
    for t in 0..tokens {
        let mut xn = vec![0.0; hidden];
        cpu::rmsnorm(&mut xn, &x[t * hidden..(t + 1) * hidden], &norm, eps);
        let (gv, uv) = (matvec(&g, &xn, ffn), matvec(&u, &xn, ffn));
        want.extend(gv.iter().zip(&uv).map(|(a, b)| cpu::silu(*a) * b));
    }
    for (kernel, result) in run_all(runner, &spec, &contents, 0) {
        let name = format!("{}{what}", kernel.name);
        assert_close(&name, &to_f32(&result[5]), &want, kernel_limit(&kernel, nmse_for(format)));
    }
}

#[test]
fn rms_gate_up_matches_cpu() {
    let _gpu = gpu_lock();
    for runner in runners() {
        // a batch tile's worth of tokens; and outputs enough to be read four at a load
        for (format, tokens, ffn) in FORMATS.iter().flat_map(|&f| [(f, 2, 70), (f, 66, 70), (f, 2, 8198)]) {
            check_gate_up(runner, format, input_size(format, 90), ffn, tokens, 3.0, 1.0, "");
        }
    }
}

/// Residual streams far from unit scale (tiny rows with small norm weights,
/// as in a first layer, and large ones). Most gate/up variants stage the
/// input times the norm weights and divide by the rms at the end, where
/// products kept in f16 would leave its range (staged so, the plain tiled
/// kernel's f16 sums gave 2e-5 at the smallest scale here); the plain tiled
/// one with f16 tiles divides by the rms before staging, and must hold too.
/// Its residual stream is wide enough that it writes the sums of squares of
/// its outputs, for the down projection's f16 tiles: that one divides its
/// inputs by their rms too, and must hold at any scale of SiLU(gate) * up
/// (f16 would hold neither scale here as it is: the small ones in its
/// subnormals, the large ones' step sums past its largest value); so must the
/// output projection of an attention output 2048 wide, and QKV, which stages
/// unit inputs of a stream that wide as gate/up does. The
/// cooperative-matrix down projection stages its inputs as f16 as they are,
/// so the small scale holds only the unit-input kernels (the emulated coop
/// one gave 7.5e-4 there).
#[test]
fn normalising_kernels_hold_any_input_scale() {
    let _gpu = gpu_lock();
    for runner in runners() {
        let format = QuantFormat::F16;
        for (x_scale, norm_scale) in [(0.003, 0.02), (0.01, 0.05), (300.0, 1.0)] {
            let what = format!(" at input scale {x_scale}, norm {norm_scale}");
            check_gate_up(runner, format, 2048, 70, 66, x_scale, norm_scale, &what);
            let (heads, kv_heads, head_dim, hidden, tokens) = (4, 2, 16, 2048, 66);
            let mut rng = Rng(7);
            let weights = [heads, kv_heads, kv_heads].map(|h| packed(&mut rng, format, h * head_dim, hidden));
            let x = rng.vec(tokens * hidden, x_scale);
            let norm = rng.vec(hidden, norm_scale);
            let spec = KernelSpec::RmsQkvRope {
                hidden,
                heads,
                kv_heads,
                head_dim,
                rope_theta: 10000.0,
                eps: 1e-5,
                q: format,
                k: format,
                v: format,
                target: *runner.target(),
            };
            let cache = vec![0.0; tokens * kv_heads * head_dim];
            check_qkv(runner, &spec, (0, tokens), (&x, &norm), weights, &cache, nmse_for(format));
        }
        for (x_scale, unit_only) in [(1e-6, true), (3e4, false)] {
            let what = format!(" at input scale {x_scale}");
            check_down(runner, format, 70, 2050, 66, x_scale, None, unit_only, &what);
            // the output projection of 16 heads of 128
            check_down(runner, format, 2048, 70, 66, x_scale, Some(128), unit_only, &what);
        }
    }
}

/// The queries (binding 6) and the cache rows written (7, 8) of a QKV kernel
/// against `want`; cache values within the KV cache's rounding.
fn assert_qkv_close(kernel: &Kernel, result: &[Vec<u8>], want: [&[f32]; 3], limit: f64, target: &Target) {
    let kv_limit = if target.shader_f16 { NMSE_KV_F16 } else { limit };
    let name = &kernel.name;
    assert_close(&format!("{name} q"), &to_f32(&result[6]), want[0], kernel_limit(kernel, limit));
    assert_close(&format!("{name} k"), &kv_values(&result[7], target), want[1], kernel_limit(kernel, kv_limit));
    assert_close(&format!("{name} v"), &kv_values(&result[8], target), want[2], kernel_limit(kernel, kv_limit));
}

#[test]
fn rms_qkv_rope_matches_cpu() {
    let _gpu = gpu_lock();
    let (theta, eps) = (10000.0f32, 1e-5);
    // the second case wraps around the ring: positions 6, 7, 8 go to slots 6, 7, 0;
    // the third spans two batch tiles
    let steps = [(5, 3, 16), (6, 3, 8), (2, 67, 80)];
    // heads of 10 dimensions (the batch kernel stages a column at a time), and
    // of 16 (quads of one matrix) where every batch tile holds units of one
    // matrix (an input loop per matrix) or tiles straddle two; 8192 outputs
    // (4096 or more) take two tiles of one matrix per workgroup, and in INT4
    // the decode kernel reads quads of RoPE pairs against int8 input groups on
    // f16 targets; from a residual stream of 2048, the batch kernel on f16
    // targets stages unit inputs, by the sums of squares by parts (two tiles
    // of one matrix a workgroup in the wide shape, and heads of 10, a column
    // at a time, in the other)
    let shapes = [
        (6, 2, 10, 60, &steps[..]),
        (8, 4, 16, 60, &steps[2..]),
        (6, 2, 16, 60, &steps[2..]),
        (32, 16, 128, 60, &steps[1..]),
        (16, 8, 128, 2048, &steps[2..]),
        (6, 2, 10, 2048, &steps[2..]),
    ];
    for runner in runners() {
        let target = *runner.target();
        for format in FORMATS {
            for &(heads, kv_heads, head_dim, hidden, steps) in &shapes {
                // the aligned shapes stage alike in every format, and unit inputs too
                if (head_dim >= 16 || hidden >= 2048) && !matches!(format, QuantFormat::F16 | QuantFormat::Int4 { .. })
                {
                    continue;
                }
                let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
                for &(pos, tokens, ctx) in steps {
                    let mut rng = Rng(pos as u64 + 100);
                    let hidden = input_size(format, hidden);
                    let (wq_b, wq) = packed(&mut rng, format, q_dim, hidden);
                    let (wk_b, wk) = packed(&mut rng, format, kv_dim, hidden);
                    let (wv_b, wv) = packed(&mut rng, format, kv_dim, hidden);
                    let x = rng.vec(tokens * hidden, 2.0);
                    let norm = rng.vec(hidden, 1.0);
                    let cache_init = rng.vec(ctx * kv_dim, 1.0);
                    let spec = KernelSpec::RmsQkvRope {
                        hidden,
                        heads,
                        kv_heads,
                        head_dim,
                        rope_theta: theta,
                        eps,
                        q: format,
                        k: format,
                        v: format,
                        target,
                    };
                    let weights = [(wq_b, wq), (wk_b, wk), (wv_b, wv)];
                    check_qkv(runner, &spec, (pos, ctx), (&x, &norm), weights, &cache_init, nmse_for(format));
                }
            }
        }
    }
}

/// Runs the QKV kernels of `spec` on tokens `x` (RMSNorm weights `norm`) at
/// position `pos` over a KV cache of `ctx` rows holding `cache`, and checks
/// the queries and the cache, the tokens' rows written, against the CPU.
fn check_qkv(
    runner: &KernelRunner,
    spec: &KernelSpec,
    (pos, ctx): (usize, usize),
    (x, norm): (&[f32], &[f32]),
    [(wq_b, wq), (wk_b, wk), (wv_b, wv)]: [(Vec<u8>, Vec<f32>); 3],
    cache: &[f32],
    limit: f64,
) {
    let KernelSpec::RmsQkvRope { hidden, heads, kv_heads, head_dim, rope_theta, eps, target, .. } = *spec else {
        unreachable!("a QKV spec")
    };
    let (q_dim, kv_dim, tokens) = (heads * head_dim, kv_heads * head_dim, x.len() / hidden);
    let contents = vec![
        step(pos, tokens, ctx, 0, 0),
        f32_bytes(x),
        f32_bytes(norm),
        wq_b,
        wk_b,
        wv_b,
        vec![0; tokens * q_dim * 4],
        kv_bytes(cache, &target),
        kv_bytes(cache, &target),
    ];
    let inv_freq = cpu::rope_inv_freq(head_dim, rope_theta);
    let mut want_q = Vec::new();
    let mut want_k = kv_values(&kv_bytes(cache, &target), &target);
    let mut want_v = want_k.clone();
    for t in 0..tokens {
        let mut xn = vec![0.0; hidden];
        cpu::rmsnorm(&mut xn, &x[t * hidden..(t + 1) * hidden], norm, eps);
        let mut q = matvec(&wq, &xn, q_dim);
        let mut k = matvec(&wk, &xn, kv_dim);
        let v = matvec(&wv, &xn, kv_dim);
        cpu::rope(&mut q, head_dim, pos + t, &inv_freq);
        cpu::rope(&mut k, head_dim, pos + t, &inv_freq);
        want_q.extend(q);
        let slot = cpu::slot(pos + t, ctx);
        want_k[slot * kv_dim..(slot + 1) * kv_dim].copy_from_slice(&k);
        want_v[slot * kv_dim..(slot + 1) * kv_dim].copy_from_slice(&v);
    }
    for (kernel, result) in run_all(runner, spec, &contents, 0) {
        assert_qkv_close(&kernel, &result, [&want_q, &want_k, &want_v], limit, &target);
    }
}

#[test]
fn rms_qkv_rope_with_mixed_formats_matches_cpu() {
    let _gpu = gpu_lock();
    // q, k and v of different packs share one tile in the batch kernel
    let (heads, kv_heads, head_dim, theta, eps) = (4, 2, 16, 10000.0f32, 1e-5);
    let (q_dim, kv_dim, hidden) = (heads * head_dim, kv_heads * head_dim, 96);
    let (pos, tokens, ctx) = (0, 70, 70);
    let formats = [
        QuantFormat::Int4 { group_size: 32, symmetric: false },
        QuantFormat::Int8 { per_tensor: false },
        QuantFormat::F16,
    ];
    for runner in runners() {
        let target = *runner.target();
        let mut rng = Rng(42);
        let weights = [
            packed(&mut rng, formats[0], q_dim, hidden),
            packed(&mut rng, formats[1], kv_dim, hidden),
            packed(&mut rng, formats[2], kv_dim, hidden),
        ];
        let x = rng.vec(tokens * hidden, 2.0);
        let norm = rng.vec(hidden, 1.0);
        let spec = KernelSpec::RmsQkvRope {
            hidden,
            heads,
            kv_heads,
            head_dim,
            rope_theta: theta,
            eps,
            q: formats[0],
            k: formats[1],
            v: formats[2],
            target,
        };
        let zeros = vec![0.0; ctx * kv_dim];
        check_qkv(runner, &spec, (pos, ctx), (&x, &norm), weights, &zeros, nmse_for(formats[0]));
    }
}

#[test]
fn attention_matches_cpu() {
    let _gpu = gpu_lock();
    let (mut one_query, mut few_keys) = (false, false);
    // heads of 10 and 34 dimensions are read one at a time, of 16 four at a time; 32
    // heads of 80 split fewer ways (split_limit); 34 ends its key rows past the last
    // full run of loads (ATTENTION_KEY_LOADS lanes); 16 heads of 128 and 32 of 64,
    // outputs 2048 wide, for which the batch kernel on f16 leaves sums of squares by
    // parts (two a head, one)
    for (runner, head_dim, heads, kv_heads) in runners()
        .iter()
        .flat_map(|r| [(r, 10, 6, 2), (r, 34, 6, 2), (r, 16, 6, 2), (r, 80, 32, 8), (r, 128, 16, 4), (r, 64, 32, 8)])
    {
        let (q_dim, kv_dim, group) = (heads * head_dim, kv_heads * head_dim, heads / kv_heads);
        let target = *runner.target();
        // short, wrapped (sliding window), longer than one tile of positions; single
        // tokens split over positions (wrapped, and more splits than allowed); blocks
        // of many tokens for the batch kernel (from position 0, and in a sliding window)
        for (pos, tokens, ctx) in [
            (3, 2, 8),
            (20, 1, 8),
            (130, 3, 150),
            (0, 1, 4),
            (600, 2, 700),
            (600, 1, 700),
            (1000, 1, 300),
            (9000, 1, 9001),
            (0, 37, 64),
            (100, 21, 48),
        ] {
            let mut rng = Rng(pos as u64 * 7 + ctx as u64);
            let q = rng.vec(tokens * q_dim, 2.0);
            let k_cache = kv_values(&kv_bytes(&rng.vec(ctx * kv_dim, 1.0), &target), &target);
            let v_cache = kv_values(&kv_bytes(&rng.vec(ctx * kv_dim, 1.0), &target), &target);
            let spec = KernelSpec::Attention { heads, kv_heads, head_dim, target };
            let contents = vec![
                step(pos, tokens, ctx, 0, 0),
                f32_bytes(&q),
                kv_bytes(&k_cache, &target),
                kv_bytes(&v_cache, &target),
                vec![0; tokens.max(MAX_ATTENTION_SPLITS as usize) * q_dim * 4],
                vec![0; MAX_ATTENTION_SPLITS as usize * heads * 4],
            ];
            let (kernel, result) = run(runner, &spec, &contents, 0);
            let splits = attention_splits(&step_of(&contents), split_limit(heads, head_dim)) as usize;
            assert_eq!(
                splits > 1,
                tokens == 1 && pos >= ATTENTION_SPLIT_LEN as usize && ctx > ATTENTION_SPLIT_LEN as usize
            );
            let got = combine_splits(&to_f32(&result[4]), &to_f32(&result[5]), splits, heads, head_dim);
            let mut want = vec![0.0; tokens * q_dim];
            for t in 0..tokens {
                for h in 0..heads {
                    let kvh = h / group;
                    let span = cpu::attention_span(pos + t, ctx);
                    let k_row = |p: usize| &k_cache[cpu::slot(p, ctx) * kv_dim + kvh * head_dim..][..head_dim];
                    let v_row = |p: usize| &v_cache[cpu::slot(p, ctx) * kv_dim + kvh * head_dim..][..head_dim];
                    cpu::attention(
                        &mut want[t * q_dim + h * head_dim..][..head_dim],
                        &q[t * q_dim + h * head_dim..][..head_dim],
                        span.clone().map(k_row),
                        span.map(v_row),
                    );
                }
            }
            let what = format!("{} pos {pos} ctx {ctx}, {splits} splits", kernel.name);
            assert_close(&what, &got[..tokens * q_dim], &want, NMSE_F16);
            if tokens > 1 {
                // the batch kernel for the adapter, then as for adapters of less workgroup
                // memory (WebGPU's default, and less): smaller tiles, a query an invocation,
                // tiles of fewer keys than a group has invocations
                let mut seen: Vec<String> = Vec::new();
                for limit in [target.max_workgroup_storage, DEFAULT_WORKGROUP_STORAGE, 8192, 2048] {
                    let target = Target { max_workgroup_storage: limit, ..target };
                    let batch = match generate_batch(&KernelSpec::Attention { heads, kv_heads, head_dim, target }) {
                        Ok(batch) => batch.expect("attention has a batch variant"),
                        // the queries alone may not fit the smallest
                        Err(e) if limit < DEFAULT_WORKGROUP_STORAGE => {
                            assert!(e.to_string().contains("do not fit workgroup memory"), "{e}");
                            continue;
                        }
                        Err(e) => panic!("{e}"),
                    };
                    if seen.contains(&batch.wgsl) {
                        continue;
                    }
                    let sums = batch.bindings.iter().any(|b| summed(&b.resource) == Some(Activation::Attn));
                    let plain_f16 = target.shader_f16 && !target.cooperative_matrix;
                    assert_eq!(sums, plain_f16 && q_dim == 2048, "{}: sums of squares", batch.name);
                    one_query |= wgsl_const(&batch.wgsl, "QR") == 1;
                    few_keys |= wgsl_const(&batch.wgsl, "BKV") < wgsl_const(&batch.wgsl, "ROW_LANES");
                    let result = run_kernel(runner, &batch, &contents, 0);
                    let what = format!("{} in {limit} bytes, pos {pos} ctx {ctx}", batch.name);
                    assert_close(&what, &to_f32(&result[4])[..tokens * q_dim], &want, NMSE_F16);
                    seen.push(batch.wgsl);
                }
            }
        }
    }
    assert!(one_query && few_keys, "no shape took one query an invocation ({one_query}) or a tile of few keys");
}

/// The value of `const NAME: u32 = ..u;` in `wgsl`.
fn wgsl_const(wgsl: &str, name: &str) -> u32 {
    wgsl_const_opt(wgsl, name).unwrap_or_else(|| panic!("no const {name}"))
}

/// [`wgsl_const`], where `wgsl` may not declare it.
fn wgsl_const_opt(wgsl: &str, name: &str) -> Option<u32> {
    let line = wgsl.lines().find_map(|l| l.strip_prefix(&format!("const {name}: u32 = ")));
    line.and_then(|v| v.strip_suffix("u;")).and_then(|v| v.parse().ok())
}

/// The attention output a step split over positions stands for: each head's
/// split rows weighed by the softmax of their log-sum-exps (as is, unsplit).
fn combine_splits(rows: &[f32], lse: &[f32], splits: usize, heads: usize, head_dim: usize) -> Vec<f32> {
    if splits == 1 {
        return rows.to_vec();
    }
    let q_dim = heads * head_dim;
    let mut out = vec![0.0; q_dim];
    for h in 0..heads {
        let l: Vec<f32> = (0..splits).map(|s| lse[s * heads + h]).collect();
        let m = l.iter().copied().fold(f32::MIN, f32::max);
        let total: f32 = l.iter().map(|x| (x - m).exp()).sum();
        for s in 0..splits {
            let w = (l[s] - m).exp() / total;
            for d in 0..head_dim {
                out[h * head_dim + d] += w * rows[s * q_dim + h * head_dim + d];
            }
        }
    }
    out
}

#[test]
fn attn_output_combines_splits_then_matches_cpu() {
    let _gpu = gpu_lock();
    for runner in runners() {
        let target = *runner.target();
        for format in FORMATS {
            // the input cached in workgroup memory or read from storage (combined on every
            // read), each with heads of a multiple of 4 dimensions and not (a vec4 spans two
            // heads); scalar rows (18 inputs); and enough outputs for four at a load in
            // wide workgroups (INT4's input then staged as int8 groups where two of
            // them make a k-slice: tiles of 4 quads at 2050 outputs, of 8 at 4100);
            // 4096 outputs, where the tiled kernel takes two tiles a workgroup
            // (and writes two parts of the stream's sums of squares); 16 heads of
            // 128, whose tiled kernel on f16 stages unit inputs
            let shapes: &[(usize, usize, usize)] = match format {
                QuantFormat::F16 | QuantFormat::Bf16 => &[
                    (6, 16, 50),
                    (6, 352, 50),
                    (32, 80, 50),
                    (6, 10, 50),
                    (2, 1030, 50),
                    (3, 6, 50),
                    (32, 80, 2050),
                    (16, 128, 4096),
                ],
                QuantFormat::Int4 { .. } => &[
                    (6, 16, 50),
                    (6, 352, 50),
                    (32, 80, 50),
                    (32, 80, 2050),
                    (26, 80, 4100),
                    (2, 64, 4096),
                    (16, 128, 70),
                ],
                _ => &[(6, 16, 50), (6, 352, 50), (32, 80, 50), (32, 80, 2050), (16, 128, 70)],
            };
            for &(heads, head_dim, hidden_base) in shapes {
                let in_features = heads * head_dim;
                let hidden_size = input_size(format, hidden_base);
                // steps of several tokens (never split), of one short token, and split 2 and 32 ways
                for (pos, tokens, ctx) in [(0, 3, 64), (5, 1, 64), (300, 1, 400), (9000, 1, 9001)] {
                    // the unit-input shapes are for the tiled kernel, which splits no step
                    if in_features == 2048 && tokens == 1 {
                        continue;
                    }
                    let st = step(pos, tokens, ctx, 0, 0);
                    let splits =
                        attention_splits(&step_of(std::slice::from_ref(&st)), split_limit(heads, head_dim)) as usize;
                    let mut rng = Rng(pos as u64 + in_features as u64);
                    let (w_bytes, w) = packed(&mut rng, format, hidden_size, in_features);
                    let rows = rng.vec(tokens.max(splits) * in_features, 1.0);
                    let lse = rng.vec(MAX_ATTENTION_SPLITS as usize * heads, 3.0);
                    let hidden = rng.vec(tokens * hidden_size, 1.0);
                    let x =
                        if splits > 1 { combine_splits(&rows, &lse, splits, heads, head_dim) } else { rows.clone() };
                    let mut want = hidden.clone();
                    for t in 0..tokens {
                        let y = matvec(&w, &x[t * in_features..(t + 1) * in_features], hidden_size);
                        for (o, y) in y.iter().enumerate() {
                            want[t * hidden_size + o] += y;
                        }
                    }
                    let spec = KernelSpec::AttnOutput { heads, head_dim, hidden: hidden_size, format, target };
                    let contents = vec![st, f32_bytes(&rows), w_bytes, f32_bytes(&hidden), f32_bytes(&lse)];
                    let results = if tokens > 1 {
                        run_all(runner, &spec, &contents, 0)
                    } else {
                        vec![run(runner, &spec, &contents, 0)]
                    };
                    let unit = results.iter().any(|(k, _)| k.wgsl.contains("let r = rms(ty);"));
                    let plain_f16 = target.shader_f16 && !target.cooperative_matrix;
                    assert_eq!(unit, tokens > 1 && plain_f16 && in_features == 2048, "{heads} heads of {head_dim}");
                    for (kernel, result) in results {
                        let what = format!("{} pos {pos}, {tokens} tokens, {splits} splits", kernel.name);
                        assert_close(&what, &to_f32(&result[3]), &want, kernel_limit(&kernel, nmse_for(format)));
                    }
                }
            }
        }
    }
}

#[test]
fn logits_part_matches_cpu() {
    let _gpu = gpu_lock();
    let eps = 1e-5;
    for runner in runners() {
        let target = *runner.target();
        // a part of a small vocabulary, and one wide enough to be read four outputs at a load
        for (format, vocab, rows) in FORMATS.iter().flat_map(|&f| [(f, 300, [100, 300]), (f, 9000, [10, 8211])]) {
            let mut rng = Rng(11);
            let (hidden, tokens) = (input_size(format, 60), 3);
            let (w_bytes, w) = packed(&mut rng, format, rows[1] - rows[0], hidden);
            let x = rng.vec(tokens * hidden, 2.0);
            let norm = rng.vec(hidden, 1.0);
            let sentinel = vec![-7.0f32; 2 * vocab];
            let spec = KernelSpec::RmsLogits { hidden, vocab, rows, eps, format, target };
            // logits for tokens 1 and 2 only
            let contents =
                vec![step(0, tokens, 1, 1, 0), f32_bytes(&x), f32_bytes(&norm), w_bytes, f32_bytes(&sentinel)];
            let mut want = sentinel.clone();
            for r in 0..2 {
                let t = 1 + r;
                let mut xn = vec![0.0; hidden];
                cpu::rmsnorm(&mut xn, &x[t * hidden..(t + 1) * hidden], &norm, eps);
                let y = matvec(&w, &xn, rows[1] - rows[0]);
                want[r * vocab + rows[0]..r * vocab + rows[1]].copy_from_slice(&y);
            }
            for (kernel, result) in run_all(runner, &spec, &contents, 2) {
                assert_close(&kernel.name, &to_f32(&result[4]), &want, kernel_limit(&kernel, nmse_for(format)));
            }
        }
    }
}

/// The logits kernel of a whole vocabulary leaves the argmax each
/// workgroup's largest logit of the argmax row (the first among equals), and
/// the argmax over those shares picks the first largest logit of the row.
#[test]
fn argmax_over_logits_shares_picks_the_first_largest_logit() {
    let _gpu = gpu_lock();
    let eps = 1e-5;
    for runner in runners() {
        let target = *runner.target();
        // one output at a time (300), and four at a load in tiles of 32 quads, the
        // ones of a workgroup's first k-slice in several subgroups (100000)
        for (format, vocab) in FORMATS.iter().flat_map(|&f| [(f, 300), (f, 100_000)]) {
            let mut rng = Rng(vocab as u64 + 5);
            let (hidden, tokens) = (input_size(format, 60), 2);
            let x = rng.vec(tokens * hidden, 2.0);
            let norm = rng.vec(hidden, 1.0);
            let mut xn = vec![0.0; hidden];
            cpu::rmsnorm(&mut xn, &x[hidden..], &norm, eps);
            let spec = KernelSpec::RmsLogits { hidden, vocab, rows: [0, vocab], eps, format, target };
            let logits_kernel = generate(&spec).unwrap();
            let slots = logits_kernel.dispatch[0] as usize;
            let wgsl = &logits_kernel.wgsl;
            let tile = wgsl_const(wgsl, "TILE") as usize;
            let outputs = if wgsl.contains("const OUT4:") { 4 * tile } else { tile };
            assert_eq!(slots, vocab.div_ceil(outputs), "{}", logits_kernel.name);
            // rows a < b < c, the same weights along token 1's normalised input: equal
            // largest logits, a and b half a workgroup's outputs apart (other invocations,
            // other subgroups), c in a later workgroup
            let mut w = rng.vec(vocab * hidden, 0.5);
            let a = outputs + 1;
            let (b, c) = (a + outputs / 2, vocab - 2);
            for row in [a, b, c] {
                for (j, v) in xn.iter().enumerate() {
                    w[row * hidden + j] = 0.9 * v.signum();
                }
            }
            let p = format::pack(format, &w, vocab, hidden).unwrap();
            let mut w_bytes = p.data;
            w_bytes.extend_from_slice(&p.scales);
            // logits rows for tokens 0 and 1; the argmax takes row 1
            let contents = vec![
                step(0, tokens, 1, 0, 1),
                f32_bytes(&x),
                f32_bytes(&norm),
                w_bytes,
                vec![0; tokens * vocab * 4],
                vec![0xff; slots * 8],
            ];
            let (kernel, result) = run(runner, &spec, &contents, 2);
            let row = &to_f32(&result[4])[vocab..];
            assert_eq!((row[a], row[b]), (row[c], row[c]), "{}: planted ties", kernel.name);
            assert!(row.iter().all(|&v| v <= row[a]), "{}: planted ties are the largest", kernel.name);
            let shares: Vec<(f32, u32)> = result[5]
                .chunks(8)
                .map(|s| {
                    (f32::from_le_bytes(s[..4].try_into().unwrap()), u32::from_le_bytes(s[4..].try_into().unwrap()))
                })
                .collect();
            // share i: the first largest logit of workgroup i's outputs
            assert_eq!(shares[1].1 as usize, a, "{}", kernel.name);
            for (i, &(v, at)) in shares.iter().enumerate() {
                let range = &row[i * outputs..((i + 1) * outputs).min(vocab)];
                let top = range.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let first = i * outputs + range.iter().position(|&u| u == top).unwrap();
                assert_eq!((v, at as usize), (top, first), "{}: share {i}", kernel.name);
            }
            let argmax = KernelSpec::ArgmaxShares { vocab, slots, target };
            let contents = vec![step(0, tokens, 1, 0, 1), result[5].clone(), vec![0xff; 4]];
            let (kernel, result) = run(runner, &argmax, &contents, 1);
            assert_eq!(u32::from_le_bytes(result[2][..4].try_into().unwrap()) as usize, a, "{}", kernel.name);
        }
    }
}

#[test]
fn embed_part_matches_cpu() {
    let _gpu = gpu_lock();
    for runner in runners() {
        let target = *runner.target();
        for format in FORMATS {
            let mut rng = Rng(13);
            let (hidden, rows) = (input_size(format, 60), [100, 300]);
            let (w_bytes, w) = packed(&mut rng, format, rows[1] - rows[0], hidden);
            let tokens = [5u32, 150, 299, 100];
            let sentinel = vec![-3.0f32; tokens.len() * hidden];
            let spec = KernelSpec::Embed { hidden, rows, format, target };
            let contents = vec![step(0, tokens.len(), 1, 0, 0), u32_bytes(&tokens), w_bytes, f32_bytes(&sentinel)];
            let (kernel, result) = run(runner, &spec, &contents, 0);
            let mut want = sentinel.clone();
            for (t, &tok) in tokens.iter().enumerate() {
                let tok = tok as usize;
                if (rows[0]..rows[1]).contains(&tok) {
                    let o = tok - rows[0];
                    want[t * hidden..(t + 1) * hidden].copy_from_slice(&w[o * hidden..(o + 1) * hidden]);
                }
            }
            // decoding one element is exact
            assert_eq!(to_f32(&result[3]), want, "{}", kernel.name);
            // a cooperative-matrix target's embedding writes the stream's f16 copy too (run_kernel checks it)
            if target.shader_f16 && target.subgroups && !target.cooperative_matrix {
                let coop = Target { cooperative_matrix: true, subgroup_size: COOP_SUBGROUP_SIZE, ..target };
                let mut kernel = generate(&KernelSpec::Embed { hidden, rows, format, target: coop }).unwrap();
                assert!(kernel.bindings.iter().any(|b| b.resource == RESIDUAL_COPY), "{}", kernel.name);
                kernel.wgsl = kernel.wgsl.replace("enable wgpu_cooperative_matrix;\n", "");
                assert_eq!(to_f32(&run_kernel(runner, &kernel, &contents, 0)[3]), want, "{}", kernel.name);
            }
        }
        // a stream of 2048 or more on an f16 target: the batch kernel writes
        // its sums of squares by parts too (run_kernel checks them; the last
        // part here is half full), for QKV's unit inputs
        let (hidden, rows, format) = (2080, [100, 300], QuantFormat::F16);
        let spec = KernelSpec::Embed { hidden, rows, format, target };
        let batch = generate_batch(&spec).unwrap();
        assert_eq!(batch.is_some(), target.shader_f16 && !target.uses_coop(), "{}", spec.name());
        if let Some(kernel) = batch {
            let mut rng = Rng(14);
            let (w_bytes, w) = packed(&mut rng, format, rows[1] - rows[0], hidden);
            let tokens = [150u32, 299, 100, 150, 200];
            let contents = vec![
                step(0, tokens.len(), 1, 0, 0),
                u32_bytes(&tokens),
                w_bytes,
                f32_bytes(&vec![-3.0; tokens.len() * hidden]),
            ];
            let result = run_kernel(runner, &kernel, &contents, 0);
            let want: Vec<f32> =
                tokens.iter().flat_map(|&t| &w[(t as usize - rows[0]) * hidden..][..hidden]).copied().collect();
            assert_eq!(to_f32(&result[3]), want, "{}", kernel.name);
            // a token of another part (the first) keeps its row and its sums
            let parts = hidden.div_ceil(SUM_SQUARES_PART);
            let mut contents = contents;
            contents[0] = step(0, 2, 1, 0, 0);
            contents[1] = u32_bytes(&[5, 150]);
            contents[3] = f32_bytes(&vec![-3.0; 2 * hidden]);
            contents.push(f32_bytes(&vec![-1.0; 2 * parts]));
            let grid = kernel.dispatch_for(&step_of(&contents), 0);
            let out = runner.run(&kernel, &contents, grid).unwrap();
            let (stream, sums) = (to_f32(&out[3]), to_f32(&out[4]));
            assert!(stream[..hidden].iter().all(|&v| v == -3.0), "{}: another part's row", kernel.name);
            assert!(sums[..parts].iter().all(|&v| v == -1.0), "{}: another part's sums", kernel.name);
            let want = part_sums(&stream[hidden..], hidden);
            assert!(sums[parts..].iter().zip(&want).all(|(g, w)| (g - w).abs() <= w * 1e-5), "{}", kernel.name);
        }
    }
}

#[test]
fn argmax_picks_the_first_largest_logit() {
    let _gpu = gpu_lock();
    for runner in runners() {
        let target = *runner.target();
        for vocab in [1000usize, 37, 49152] {
            let mut rng = Rng(vocab as u64);
            let mut logits = rng.vec(2 * vocab, 10.0);
            let (a, b) = (vocab / 3, vocab - 1);
            logits[vocab + a] = 50.0;
            logits[vocab + b] = 50.0;
            // ties an invocation meets later in its own stride (workgroups of up to 256)
            for later in [a + 256, a + 2048] {
                if later < vocab {
                    logits[vocab + later] = 50.0;
                }
            }
            logits[vocab / 2] = 99.0; // row 0 must not be read
            let spec = KernelSpec::Argmax { vocab, target };
            let contents = vec![step(0, 1, 1, 0, 1), f32_bytes(&logits), vec![0xff; 4]];
            let (kernel, result) = run(runner, &spec, &contents, 1);
            let got = u32::from_le_bytes(result[2][..4].try_into().unwrap());
            assert_eq!(got as usize, a, "{}", kernel.name);
        }
        // a single largest logit in each of the loads an invocation has in flight, and
        // past them (workgroups of up to 1024 invocations, 16 loads each)
        let vocab = 49152;
        for at in [0, 1023, 15 * 1024 + 7, 16 * 1024 - 1, 2 * 16 * 1024 + 9 * 1024 + 3, vocab - 1] {
            let mut logits = Rng(at as u64).vec(2 * vocab, 10.0);
            logits[vocab + at] = 50.0;
            let spec = KernelSpec::Argmax { vocab, target };
            let contents = vec![step(0, 1, 1, 0, 1), f32_bytes(&logits), vec![0xff; 4]];
            let (kernel, result) = run(runner, &spec, &contents, 1);
            let got = u32::from_le_bytes(result[2][..4].try_into().unwrap());
            assert_eq!(got as usize, at, "{}", kernel.name);
        }
    }
}

#[test]
fn sampler_kernel_chooses_what_the_host_sampler_chooses() {
    let _gpu = gpu_lock();
    let runner = &runners()[0];
    let target = *runner.target();
    // a short row, and one longer than a workgroup's loads in flight (16 of up to 1024 invocations)
    for (vocab, grid) in [(1000, 4.0), (40000, 64.0)] {
        sampler_matches_host(runner, target, vocab, grid);
    }
}

fn sampler_matches_host(runner: &KernelRunner, target: Target, vocab: usize, grid: f32) {
    use llama5_runtime::sampling::{Sampler, SamplingParams};
    let mut rng = Rng(5);
    // a spread of logits with ties (values on a grid) and a NaN; the top-p
    // values keep off exact sums of tied weights, where the device's f32 and the
    // host's f64 may round a cut differently
    let mut logits: Vec<f32> = rng.vec(vocab, 6.0).iter().map(|v| (v * grid).round() / grid).collect();
    logits[17] = f32::NAN;
    let params = [
        (1.0, None, None),
        (0.7, None, None),
        (1.3, Some(40), None),
        (0.9, None, Some(0.9)),
        (2.0, Some(5), Some(0.55)),
        (0.5, Some(3), None),
    ];
    let spec = KernelSpec::Sample { vocab, target };
    let kernel = generate(&spec).unwrap();
    let mut checked = 0;
    for (temperature, top_k, top_p) in params {
        let host = Sampler::new(SamplingParams { temperature, top_k, top_p, seed: 0 }).unwrap();
        for i in 0..12 {
            let u = (i as f64 + 0.37) / 12.0;
            let step = StepUniform {
                pos: 0,
                n_tokens: 1,
                ctx: 1,
                logits_from: 0,
                argmax_row: 1,
                temperature,
                top_k: top_k.unwrap_or(0) as u32,
                top_p: top_p.unwrap_or(1.0),
                sample_u: u as f32,
            };
            // row 1 is sampled; row 0 is a decoy
            let mut rows = vec![99.0f32; vocab];
            rows.extend_from_slice(&logits);
            let contents = vec![step.to_bytes().to_vec(), f32_bytes(&rows), vec![0xff; 4]];
            let out = runner.run(&kernel, &contents, [1, 1, 1]).unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
            let got = u32::from_le_bytes(out[2][..4].try_into().unwrap());
            let want = host.choose(&logits, step.sample_u as f64);
            assert_eq!(got, want, "T {temperature} top-k {top_k:?} top-p {top_p:?} u {u}");
            checked += 1;
        }
    }
    println!("{checked} device choices match the host sampler on {} ({vocab} logits)", runner.adapter_name());
}

// ----------------------------------------------------------------------------
// Whole models: the tiny fixture converted at each precision, GPU against CPU.

fn convert_tiny(precision: Precision, symmetric: bool, per_tensor: bool) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    llama5_fixtures::tiny::write_hf_dir(&hf).unwrap();
    let out = dir.path().join("model");
    let options = llama5_convert::ConvertOptions {
        precision: llama5_convert::PrecisionSpec::uniform(precision),
        symmetric,
        int8_per_tensor: per_tensor,
        ..Default::default()
    };
    llama5_convert::convert(&hf, &out, &options).unwrap();
    let model = Model::open(&out, true).unwrap();
    (dir, model)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn compare_model(model: &Model, ctx: usize, prompt: &[u32], decode_steps: usize) {
    for target in targets() {
        let opts = GpuOptions { adapter: None, ctx, pipeline_cache_dir: None };
        let mut gpu = GpuBackend::with_features(model, &opts, features_for(&target))
            .unwrap_or_else(|e| panic!("{}: {e}", target.name()));
        assert_eq!(gpu.target().name(), target.name());
        let mut cpu = CpuBackend::new(model, ctx).unwrap();
        let limit = match (target.cooperative_matrix, target.shader_f16) {
            (true, _) => NMSE_MODEL_COOP,
            (false, true) => NMSE_MODEL_F16_KV,
            (false, false) => NMSE_MODEL_F32,
        };
        let what = format!("{} {:?} ctx {ctx}", target.name(), model.manifest.precision);

        let g = gpu.forward(prompt, 0, Logits::All).unwrap();
        let c = cpu.forward(prompt, 0, Logits::All).unwrap();
        assert_eq!(g.len(), prompt.len() * gpu.vocab_size());
        for (t, (gr, cr)) in g.chunks(gpu.vocab_size()).zip(c.chunks(cpu.vocab_size())).enumerate() {
            assert_close(&format!("{what} prompt token {t}"), gr, cr, limit);
        }
        let mut next = argmax(&c[c.len() - cpu.vocab_size()..]);
        for i in 0..decode_steps {
            let pos = prompt.len() + i;
            let on_device = gpu.forward_argmax(&[next], pos).unwrap();
            let c = cpu.forward(&[next], pos, Logits::Last).unwrap();
            assert_eq!(on_device, argmax(&c), "{what}: greedy token at position {pos}");
            next = on_device;
        }
        println!("{what}: {}", gpu.load_report());
    }
}

#[test]
fn tiny_model_matches_cpu_backend_at_every_precision() {
    let _gpu = gpu_lock();
    let prompt = llama5_fixtures::tiny::golden_input_ids();
    for (precision, symmetric, per_tensor) in [
        (Precision::F16, false, false),
        (Precision::Bf16, false, false),
        (Precision::Int8, false, false),
        (Precision::Int8, false, true),
        (Precision::Int4, false, false),
        (Precision::Int4, true, false),
    ] {
        let (_dir, model) = convert_tiny(precision, symmetric, per_tensor);
        compare_model(&model, 64, &prompt, 4);
    }
}

#[test]
fn sliding_window_and_chunked_prompt_match_cpu_backend() {
    let _gpu = gpu_lock();
    let (_dir, model) = convert_tiny(Precision::F16, false, false);
    // 80 tokens through a ring of 24: chunks up to the wrap, then single tokens
    let prompt: Vec<u32> = (0..80u32).map(|i| (i * 37 + 11) % 256).collect();
    compare_model(&model, 24, &prompt, 3);
    // a prompt longer than one submission's batch
    let prompt: Vec<u32> = (0..150u32).map(|i| (i * 53 + 5) % 259).collect();
    compare_model(&model, 256, &prompt, 1);
}

#[test]
fn attention_split_over_positions_matches_cpu_backend() {
    let _gpu = gpu_lock();
    let (_dir, model) = convert_tiny(Precision::Int8, false, false);
    // single tokens past ATTENTION_SPLIT_LEN positions split their attention (one
    // submission of greedy steps goes from one split to two), up to the ring's wrap and past it
    let prompt: Vec<u32> = (0..250u32).map(|i| (i * 29 + 3) % 259).collect();
    let ctx = 280;
    let decode = 40;
    let last = StepUniform { pos: (prompt.len() + decode - 1) as u32, n_tokens: 1, ctx, ..StepUniform::default() };
    let first = StepUniform { pos: prompt.len() as u32, ..last };
    let cfg = &model.manifest.model;
    let limit = split_limit(cfg.num_heads, cfg.head_dim);
    assert_eq!((attention_splits(&first, limit), attention_splits(&last, limit)), (1, 2));
    for target in Target::all() {
        let opts = GpuOptions { adapter: None, ctx: ctx as usize, pipeline_cache_dir: None };
        let mut gpu = GpuBackend::with_features(&model, &opts, features_for(&target)).unwrap();
        let mut cpu = CpuBackend::new(&model, ctx as usize).unwrap();
        let limit = if target.shader_f16 { NMSE_MODEL_F16_KV } else { NMSE_MODEL_F32 };
        gpu.forward(&prompt, 0, Logits::Last).unwrap();
        let mut next = argmax(&cpu.forward(&prompt, 0, Logits::Last).unwrap());
        for pos in prompt.len()..prompt.len() + decode {
            let g = gpu.forward(&[next], pos, Logits::Last).unwrap();
            let c = cpu.forward(&[next], pos, Logits::Last).unwrap();
            assert_close(&format!("{} position {pos}", target.name()), &g, &c, limit);
            next = argmax(&c);
        }
    }
    compare_greedy(&model, ctx as usize, &prompt, decode, &[Target::portable()]);
}

/// Runs of greedy steps in one submission choose what single steps choose.
fn compare_greedy(model: &Model, ctx: usize, prompt: &[u32], k: usize, targets: &[Target]) {
    for target in targets {
        let opts = GpuOptions { adapter: None, ctx, pipeline_cache_dir: None };
        let mut gpu = GpuBackend::with_features(model, &opts, features_for(target)).unwrap();
        let first = gpu.forward_argmax(prompt, 0).unwrap();
        let mut want = Vec::with_capacity(k);
        let mut next = first;
        for i in 0..k {
            next = gpu.forward_argmax(&[next], prompt.len() + i).unwrap();
            want.push(next);
        }
        // the cache holds what the single steps wrote; the greedy run rewrites the same slots
        gpu.forward_argmax(prompt, 0).unwrap();
        let got = gpu.generate_greedy(first, prompt.len(), k).unwrap();
        assert_eq!(got, want, "{} ctx {ctx}: {k} greedy steps in one submission", target.name());
    }
}

#[test]
fn multi_step_greedy_matches_single_steps() {
    let _gpu = gpu_lock();
    let (_dir, model) = convert_tiny(Precision::Int4, false, false);
    let prompt = llama5_fixtures::tiny::golden_input_ids();
    compare_greedy(&model, 64, &prompt, 12, &Target::all());
    // past the ring's wrap, and more steps than one submission records
    let steps = llama5_runtime::gpu::MAX_DEVICE_STEPS + 5;
    compare_greedy(&model, 24, &prompt, steps, &[Target::portable()]);
    let opts = GpuOptions { adapter: None, ctx: 16, pipeline_cache_dir: None };
    let mut gpu = GpuBackend::with_features(&model, &opts, wgpu::Features::empty()).unwrap();
    assert!(gpu.generate_greedy(259, 0, 3).is_err());
    assert!(gpu.generate_greedy(1, 0, 0).unwrap().is_empty());
}

#[test]
fn logits_buffers_grow_only_when_a_step_wants_every_row() {
    let _gpu = gpu_lock();
    let (_dir, model) = convert_tiny(Precision::F16, false, false);
    let vocab = model.manifest.model.vocab_size;
    let opts = GpuOptions { adapter: None, ctx: 64, pipeline_cache_dir: None };
    let mut gpu = GpuBackend::with_features(&model, &opts, wgpu::Features::empty()).unwrap();
    let mut cpu = CpuBackend::new(&model, 64).unwrap();
    let prompt = llama5_fixtures::tiny::golden_input_ids();
    let before = gpu.memory_use().other;
    let c = cpu.forward(&prompt, 0, Logits::Last).unwrap();
    assert_eq!(gpu.forward_argmax(&prompt, 0).unwrap(), argmax(&c));
    assert_eq!(gpu.memory_use().other, before, "one row of logits is held from the start");

    let all = gpu.forward(&prompt, 0, Logits::All).unwrap();
    let grown = gpu.memory_use().other;
    // the logits buffer and the readback buffer grow by the same rows
    assert!(grown >= before + 2 * ((prompt.len() - 1) * vocab * 4) as u64, "{before} -> {grown}");
    assert_close("every row after growing", &all, &cpu.forward(&prompt, 0, Logits::All).unwrap(), NMSE_MODEL_F32);
    // the argmax and the logits kernels were rebound to the grown buffer: a new prompt's choice is right
    let other: Vec<u32> = prompt.iter().map(|t| (t * 7 + 1) % vocab as u32).collect();
    let c = cpu.forward(&other, 0, Logits::Last).unwrap();
    assert_eq!(gpu.forward_argmax(&other, 0).unwrap(), argmax(&c));
    assert_close("last row after growing", &gpu.forward(&other, 0, Logits::Last).unwrap(), &c, NMSE_MODEL_F32);
    assert_eq!(gpu.memory_use().other, grown);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let _gpu = gpu_lock();
    let (_dir, model) = convert_tiny(Precision::Int8, false, false);
    let opts = GpuOptions { adapter: None, ctx: 16, pipeline_cache_dir: None };
    let mut gpu = GpuBackend::new(&model, &opts).unwrap();
    assert!(gpu.forward(&[], 0, Logits::Last).is_err());
    assert!(gpu.forward(&[259], 0, Logits::Last).is_err());
    let zero_ctx = GpuOptions { ctx: 0, ..opts.clone() };
    assert!(GpuBackend::new(&model, &zero_ctx).is_err());
    let missing = GpuOptions { adapter: Some("no such adapter anywhere".into()), ..opts };
    assert!(matches!(GpuBackend::new(&model, &missing), Err(llama5_runtime::RuntimeError::NoAdapter(_))));
}

#[test]
fn pipeline_cache_is_written_then_read_back() {
    let _gpu = gpu_lock();
    let (_dir, model) = convert_tiny(Precision::Int4, false, false);
    let cache = tempfile::tempdir().unwrap();
    let opts = GpuOptions { adapter: None, ctx: 16, pipeline_cache_dir: Some(cache.path().join("pipelines")) };
    let cold = GpuBackend::new(&model, &opts).unwrap();
    // llvmpipe and NVIDIA's Vulkan driver both offer wgpu's pipeline cache
    assert_eq!(cold.load_times().pipeline_cache_bytes, Some(0), "{}", cold.load_report());
    drop(cold);
    let files: Vec<_> = std::fs::read_dir(cache.path().join("pipelines")).unwrap().collect();
    assert_eq!(files.len(), 1, "one cache file per adapter, no temporary files left");
    let warm = GpuBackend::new(&model, &opts).unwrap();
    assert!(warm.load_times().pipeline_cache_bytes.is_some_and(|n| n > 0), "{}", warm.load_report());
    assert!(warm.load_report().contains("pipeline cache warm"));
}

#[test]
fn generator_greedy_on_the_device_matches_the_cpu_backend() {
    let _gpu = gpu_lock();
    use llama5_runtime::generate::{GenerateOptions, Generator, StopReason};
    use llama5_runtime::sampling::SamplingParams;
    use llama5_runtime::tokenizer::Tokenizer;
    let (_dir, model) = convert_tiny(Precision::Int4, false, false);
    let tok = Tokenizer::for_model(&model).unwrap();
    let prompt = llama5_fixtures::tiny::golden_input_ids();
    // more tokens than one greedy chunk; a context that fills up; a sliding window past it
    for (ctx, max_tokens, sliding_window) in [(64, 40, false), (24, 40, false), (24, 40, true)] {
        let opts = GenerateOptions { max_tokens, sampling: SamplingParams::greedy(), sliding_window };
        let mut cpu = CpuBackend::new(&model, ctx).unwrap();
        let want = Generator::new(&mut cpu, &tok).generate(&prompt, &opts, &mut |_| Ok(())).unwrap();
        let gpu_opts = GpuOptions { adapter: None, ctx, pipeline_cache_dir: None };
        let mut gpu = GpuBackend::with_features(&model, &gpu_opts, features_for(&Target::portable())).unwrap();
        let mut streamed = String::new();
        let got = Generator::new(&mut gpu, &tok)
            .generate(&prompt, &opts, &mut |piece| {
                streamed.push_str(piece);
                Ok(())
            })
            .unwrap();
        assert_eq!(got.tokens, want.tokens, "ctx {ctx}, sliding window {sliding_window}");
        assert_eq!((got.stop, &got.text), (want.stop, &want.text));
        assert_eq!(streamed, got.text);
        if ctx == 24 && !sliding_window {
            assert_eq!(got.stop, StopReason::ContextFull);
        }
    }
}

#[test]
fn generator_sampling_on_the_device_matches_the_cpu_backend() {
    let _gpu = gpu_lock();
    use llama5_runtime::generate::{GenerateOptions, Generator};
    use llama5_runtime::sampling::SamplingParams;
    use llama5_runtime::tokenizer::Tokenizer;
    let (_dir, model) = convert_tiny(Precision::F16, false, false);
    let tok = Tokenizer::for_model(&model).unwrap();
    let prompt = llama5_fixtures::tiny::golden_input_ids();
    for (seed, top_k, top_p) in [(1, None, None), (2, Some(20), None), (3, None, Some(0.8))] {
        let sampling = SamplingParams { temperature: 3.0, top_k, top_p, seed };
        let opts = GenerateOptions { max_tokens: 40, sampling, sliding_window: false };
        let mut cpu = CpuBackend::new(&model, 64).unwrap();
        let want = Generator::new(&mut cpu, &tok).generate(&prompt, &opts, &mut |_| Ok(())).unwrap();
        let gpu_opts = GpuOptions { adapter: None, ctx: 64, pipeline_cache_dir: None };
        let mut gpu = GpuBackend::with_features(&model, &gpu_opts, features_for(&Target::portable())).unwrap();
        let got = Generator::new(&mut gpu, &tok).generate(&prompt, &opts, &mut |_| Ok(())).unwrap();
        assert_eq!(got.tokens, want.tokens, "seed {seed}, top-k {top_k:?}, top-p {top_p:?}");
        let distinct: std::collections::BTreeSet<&u32> = got.tokens.iter().collect();
        assert!(distinct.len() > 3, "sampling varies the tokens: {:?}", got.tokens);
    }
}

#[test]
fn check_fits_names_what_exceeds_the_adapters_limits() {
    let _gpu = gpu_lock();
    use llama5_runtime::gpu::{check_fits, probe};
    let (_dir, model) = convert_tiny(Precision::F16, false, false);
    let mut adapter = pollster::block_on(probe(None)).unwrap();
    check_fits(&model.manifest, &adapter, 64).unwrap();
    // the error names the largest buffer over the limit: a batch of logits
    // (64 rows of the 259-token vocabulary), above the F16 embedding
    adapter.limits.max_storage_buffer_binding_size = 4096;
    let err = check_fits(&model.manifest, &adapter, 64).unwrap_err();
    assert!(llama5_runtime::tiers::does_not_fit(&err), "{err}");
    let e = err.to_string();
    let logits = 64 * llama5_fixtures::tiny::VOCAB_SIZE * 4;
    assert!(e.contains(&format!("the logits of one batch needs a {logits}-byte buffer")), "{e}");
    assert!(e.contains(&format!("{} allows 4096", adapter.info.name)), "{e}");
    adapter.limits.max_storage_buffer_binding_size = 1 << 30;
    // a context whose KV cache alone is over the limit: 4M positions * 32 kv dims * 2 or 4 bytes
    adapter.limits.max_buffer_size = 64 << 20;
    let e = check_fits(&model.manifest, &adapter, 1 << 22).unwrap_err().to_string();
    assert!(e.contains("KV cache"), "{e}");
}

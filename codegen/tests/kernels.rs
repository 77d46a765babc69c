//! Every kernel of every variant validates with naga; plans stay within the
//! dispatch budget; representative kernels are snapshotted.

mod common;

use std::collections::BTreeSet;

use llama5_codegen::manifest::{ModelConfig, QuantFormat};
use llama5_codegen::target::{COOP_WORKGROUP_BYTES, DEFAULT_WORKGROUP_STORAGE};
use llama5_codegen::{
    generate, generate_batch, generated_files, kernel_names_for_layer, validate, workgroup_bytes, Access, Activation,
    Binding, KernelSpec, Plan, Resource, Rows, Stage, Target,
};
use proptest::prelude::*;

/// Kernels stay within their target's workgroup memory, and within WebGPU's
/// default 16 KiB whatever the target offers, but for the cooperative-matrix
/// ones (what the runtime checks the device for) and the tiled attention
/// (larger tiles where the adapter offers more).
fn within_workgroup_memory(kernel: &llama5_codegen::Kernel, module: &naga::Module, target: &Target) {
    let bytes = workgroup_bytes(kernel, module).unwrap();
    let limit = target.max_workgroup_storage;
    assert!(bytes <= limit, "{}: {bytes} bytes of workgroup memory, more than {limit}", kernel.name);
    if kernel.wgsl.contains("coopMultiplyAdd") {
        assert!(bytes <= COOP_WORKGROUP_BYTES, "{}: {bytes} bytes of workgroup memory", kernel.name);
    } else if !(kernel.name.starts_with("attention-") && kernel.name.ends_with("-batch")) {
        assert!(bytes <= DEFAULT_WORKGROUP_STORAGE, "{}: {bytes} bytes of workgroup memory", kernel.name);
    }
}

/// `bindings` of a tiled kernel as the decode kernel binds them: the f16
/// pairs tiled kernels pass as the f32 activations (the residual stream where
/// its copy is read, nothing where the copy is written beside it, and
/// SiLU(gate) * up), and without sums of squares by parts.
fn as_decode_bindings(bindings: &[Binding]) -> Vec<Binding> {
    let copy = Resource::Activation(Activation::HiddenHalf);
    let f32_binding =
        |b: &Binding, a: Activation| Binding { name: a.ident().into(), resource: Resource::Activation(a), ..b.clone() };
    bindings
        .iter()
        .filter(|b| !(b.resource == copy && b.access == Access::ReadWrite))
        .filter(|b| !SUMS.iter().any(|&a| b.resource == Resource::Activation(a)))
        .map(|b| match b.resource {
            Resource::Activation(Activation::HiddenHalf) => f32_binding(b, Activation::Hidden),
            Resource::Activation(Activation::FfnHalf) => f32_binding(b, Activation::Ffn),
            _ => b.clone(),
        })
        .collect()
}

/// The tiled kernels read f16 pairs exactly where they run on cooperative
/// matrices, and the pairs are current there: the embedding and every tiled
/// kernel adding to the residual stream (all of a step's layer kernels run
/// tiled, or none) write the stream's copy beside it, and the tiled gate/up
/// writes the pairs the tiled down projection reads.
fn f16_pairs_are_current_where_read(plan: &Plan, coop: bool) {
    let binds = |k: &llama5_codegen::Kernel, a: Activation, access: Access| {
        k.bindings.iter().any(|b| b.resource == Resource::Activation(a) && b.access == access)
    };
    let reads = plan.kernels.iter().filter(|k| binds(k, Activation::HiddenHalf, Access::ReadOnly)).count();
    // QKV, gate/up and the logits, tiled
    assert_eq!(reads, if coop { 3 } else { 0 });
    let ffn = |access| plan.kernels.iter().filter(|k| binds(k, Activation::FfnHalf, access)).count();
    // down reads what gate/up writes
    assert_eq!((ffn(Access::ReadOnly), ffn(Access::ReadWrite)), if coop { (1, 1) } else { (0, 0) });
    for step in &plan.steps {
        let decode = &plan.kernels[step.kernel];
        assert!(!binds(decode, Activation::HiddenHalf, Access::ReadOnly), "{}", decode.name);
        assert!(!decode.bindings.iter().any(|b| b.resource == Resource::Activation(Activation::FfnHalf)));
        if step.stage == Stage::Embed {
            assert_eq!(binds(decode, Activation::HiddenHalf, Access::ReadWrite), coop, "{}", decode.name);
        }
        if let Some(batch) = step.batch_kernel.map(|b| &plan.kernels[b]) {
            if binds(batch, Activation::Hidden, Access::ReadWrite) {
                assert_eq!(binds(batch, Activation::HiddenHalf, Access::ReadWrite), coop, "{}", batch.name);
            }
        }
    }
}

/// The activations' sums of squares by parts.
const SUMS: [Activation; 3] = [Activation::SumSquares, Activation::FfnSumSquares, Activation::AttnSumSquares];

/// The plain tiled kernels staging f16 read sums of squares by parts exactly
/// where expected (`[residual for gate/up, ffn, attn, residual for QKV]`:
/// the plain kernels stage f16, and the down and output projections and QKV
/// of a residual stream and an attention output that wide too, of heads of a
/// multiple of 64 dimensions), and they are current there: the kernel before
/// writes them (all of a step's layer kernels and its embedding run their
/// batch kernels, or none), and no other kernel binds them. Gate/up reads
/// the residual stream's, which the output projection writes; the down
/// projection reads SiLU(gate) * up's, which gate/up writes; the output
/// projection reads the attention output's, which the attention writes; QKV
/// reads the residual stream's, which the embedding or the down projection
/// before writes.
fn sum_squares_are_current_where_read(plan: &Plan, expected: [bool; 4]) {
    let binds = |k: &llama5_codegen::Kernel, a: Activation, access: Access| {
        k.bindings.iter().any(|b| b.resource == Resource::Activation(a) && b.access == access)
    };
    // (sums, the kernels writing them, the kernel reading them next, whether bound)
    let pairs: [(Activation, &[&str], &str, bool); 4] = [
        (Activation::SumSquares, &["attn-output-"], "rms-gate-up-", expected[0]),
        (Activation::FfnSumSquares, &["rms-gate-up-"], "matvec-add-ffn-", expected[1]),
        (Activation::AttnSumSquares, &["attention-"], "attn-output-", expected[2]),
        (Activation::SumSquares, &["embed-", "matvec-add-ffn-"], "rms-qkv-", expected[3]),
    ];
    for step in &plan.steps {
        let decode = &plan.kernels[step.kernel];
        for a in SUMS {
            assert!(!binds(decode, a, Access::ReadOnly) && !binds(decode, a, Access::ReadWrite), "{}", decode.name);
        }
        if let Some(batch) = step.batch_kernel.map(|b| &plan.kernels[b]) {
            for a in SUMS {
                let of_a = || pairs.iter().filter(|p| p.0 == a && p.3);
                let reads = of_a().any(|p| batch.name.starts_with(p.2));
                let writes = of_a().any(|p| p.1.iter().any(|w| batch.name.starts_with(w)));
                assert_eq!(binds(batch, a, Access::ReadOnly), reads, "{} {a:?}", batch.name);
                assert_eq!(binds(batch, a, Access::ReadWrite), writes, "{} {a:?}", batch.name);
            }
        } else if step.stage == Stage::Embed {
            assert!(!expected[3], "{}: no batch kernel writes the sums QKV reads", decode.name);
        }
        // the embedding's batch kernel and QKV's count the step's tokens
        // alike, so the runtime runs both or neither
        if let Some(batch) = step.batch_kernel.map(|b| &plan.kernels[b]) {
            if step.stage == Stage::Embed {
                assert_eq!(batch.rows, Rows::Tokens, "{}", batch.name);
            } else if batch.name.starts_with("rms-qkv-") {
                assert!(matches!(batch.rows, Rows::TokenTiles(_)), "{}", batch.name);
            }
        }
    }
    // the writer runs right before the reader
    for pair in plan.steps.windows(2) {
        let name = |s: &llama5_codegen::PlanStep| plan.kernels[s.kernel].name.clone();
        for (_, writers, reader, _) in pairs {
            if name(&pair[1]).starts_with(reader) {
                let before = name(&pair[0]);
                assert!(writers.iter().any(|w| before.starts_with(w)), "{before} before {}", name(&pair[1]));
            }
        }
    }
}

#[test]
fn real_model_shape_validates_for_every_precision_and_target() {
    let cfg = common::smollm2_config();
    let mut validated = BTreeSet::new();
    let mut shares = BTreeSet::new();
    for format in common::all_formats(32) {
        let manifest = common::manifest(&cfg, format, 1);
        for target in Target::all_with_coop() {
            let plan =
                Plan::from_manifest(&manifest, &target).unwrap_or_else(|e| panic!("{format:?} {}: {e}", target.name()));
            for k in &plan.kernels {
                assert!(k.wgsl.starts_with("// generated by llama5-codegen; do not edit\n"), "{}", k.name);
                within_workgroup_memory(k, &validate(k, &target).unwrap(), &target);
                validated.insert(k.name.clone());
            }
            // one pipeline per distinct spec: 5 layer kernels + embed + logits + argmax + sampler,
            // plus batch variants of the 5 layer kernels and the logits, and the argmax over
            // the shares the logits kernel of a whole vocabulary leaves (one per logits workgroup)
            assert_eq!(plan.kernels.len(), 10 + 6, "{format:?} {}", target.name());
            let logits = plan.steps.iter().find(|s| s.stage == Stage::Logits).unwrap();
            let argmax = plan.steps.iter().find(|s| s.stage == Stage::Argmax).unwrap();
            assert_eq!(plan.argmax_shares, plan.kernels[logits.kernel].dispatch[0] as usize);
            assert!(plan.kernels[argmax.kernel].name.starts_with("argmax-shares-"));
            // the row's argmax runs exactly when the tiled logits kernel does
            assert_eq!(argmax.batch_with.map(|j| &plan.steps[j]), Some(logits));
            assert!(plan.steps.iter().filter(|s| s.batch_with.is_some()).count() == 1);
            shares.insert(plan.kernels[argmax.kernel].name.clone());
            for step in &plan.steps {
                let Some(batch) = step.batch_kernel else {
                    assert!(matches!(step.stage, Stage::Embed | Stage::Sample) || step.layer.is_some());
                    continue;
                };
                let (decode, batch) = (&plan.kernels[step.kernel], &plan.kernels[batch]);
                if step.stage == Stage::Argmax {
                    // the row's argmax, for steps whose logits the tiled kernel computed
                    assert!(batch.name.starts_with("argmax-v"), "{}", batch.name);
                    continue;
                }
                if step.stage == Stage::Logits {
                    // the tiled logits kernel leaves no shares
                    let shares = |b: &Binding| b.resource == Resource::ArgmaxShares;
                    assert_eq!(decode.bindings.iter().filter(|b| shares(b)).count(), 1, "{}", decode.name);
                    let bindings = as_decode_bindings(&batch.bindings);
                    assert!(bindings.iter().all(|b| !shares(b) && decode.bindings.contains(b)), "{}", batch.name);
                    assert_eq!(bindings.len() + 1, decode.bindings.len(), "{}", batch.name);
                }
                assert_eq!(batch.name, format!("{}-batch", decode.name));
                if step.stage != Stage::Logits {
                    assert_eq!(as_decode_bindings(&batch.bindings), decode.bindings, "{}", batch.name);
                }
                let tiled = match decode.rows {
                    // the embedding's adds the stream's sums of squares (a stream of 2048 or more)
                    _ if step.stage == Stage::Embed => batch.rows == decode.rows,
                    Rows::Tokens | Rows::TokensSplits { .. } => matches!(batch.rows, Rows::TokenTiles(t) if t > 1),
                    Rows::LogitRows => matches!(batch.rows, Rows::LogitRowTiles(t) if t > 1),
                    Rows::One | Rows::TokenTiles(_) | Rows::LogitRowTiles(_) => false,
                };
                assert!(tiled, "{}: {:?} for {:?}", batch.name, batch.rows, decode.rows);
            }
            let batched = plan.steps.iter().filter(|s| s.batch_kernel.is_some()).count();
            assert_eq!(batched, 5 * cfg.num_layers + 2, "{format:?} {}", target.name());
            f16_pairs_are_current_where_read(&plan, target.cooperative_matrix);
            // SmolLM2's residual stream and attention output are too narrow
            // for f16 tiles in QKV, down and the output projection
            let plain_f16 = target.shader_f16 && !target.cooperative_matrix;
            sum_squares_are_current_where_read(&plan, [plain_f16, false, false, false]);
        }
    }
    // attention (and its batch variant), argmax and the sampler do not depend on the weight format;
    // five matrix kernels have batch variants (four variants and the cooperative-matrix one)
    assert_eq!(validated.len(), 5 * (6 * 6 + 5 * 6 + 4) + shares.len());
    println!("validated {} kernel variants for the SmolLM2-135M shape", validated.len());
}

/// Llama-2-7B's shape reads inputs too wide for workgroup memory from storage
/// (the attention output combining its splits as it is read): those paths validate too.
#[test]
fn large_model_shape_validates_for_every_target() {
    let cfg = ModelConfig {
        name: Some("Llama-2-7B".into()),
        hidden_size: 4096,
        intermediate_size: 11008,
        num_layers: 1,
        num_heads: 32,
        num_kv_heads: 32,
        head_dim: 128,
        vocab_size: 32000,
        tie_word_embeddings: false,
        ..common::smollm2_config()
    };
    let mut validated = 0;
    // and on devices of 1024-invocation workgroups, where the one-output kernels widen
    let targets: Vec<Target> =
        Target::all_with_coop().into_iter().flat_map(|t| [t, Target { max_workgroup_size: 1024, ..t }]).collect();
    // groups of 32 stream their int8 groups, groups of 64 keep the plain loops
    let int4 = |group_size| QuantFormat::Int4 { group_size, symmetric: false };
    for format in [QuantFormat::F16, int4(32), int4(64)] {
        let manifest = common::manifest(&cfg, format, 1);
        for &target in &targets {
            let plan = Plan::from_manifest(&manifest, &target).unwrap();
            let plain_f16 = target.shader_f16 && !target.cooperative_matrix;
            sum_squares_are_current_where_read(&plan, [plain_f16; 4]);
            assert_eq!(plan.workgroup_bytes.len(), plan.kernels.len());
            for (k, &bytes) in plan.kernels.iter().zip(&plan.workgroup_bytes) {
                let module = validate(k, &target).unwrap_or_else(|e| panic!("{}: {e}", k.name));
                // the plan's figure is what the runtime checks against the adapter's limit
                assert_eq!(bytes, llama5_codegen::workgroup_bytes(k, &module).unwrap(), "{}", k.name);
                within_workgroup_memory(k, &module, &target);
                // registers first_group fills are read as the first group: a
                // kernel defining it must call it
                let entry = &k.wgsl[k.wgsl.find("fn main(").unwrap()..];
                assert_eq!(k.wgsl.contains("fn first_group("), entry.contains("first_group("), "{}", k.name);
                validated += 1;
            }
        }
    }
    println!("validated {validated} kernel variants for the Llama-2-7B shape");
}

#[test]
fn dispatches_per_token_within_budget() {
    let cfg = common::smollm2_config();
    let manifest = common::manifest(&cfg, QuantFormat::Int4 { group_size: 32, symmetric: false }, 1);
    let plan = Plan::from_manifest(&manifest, &Target::portable()).unwrap();
    let n = plan.dispatches_per_token();
    println!("dispatches per decoded token: {n} (budget {})", 5 * cfg.num_layers + 3);
    assert_eq!(n, 5 * cfg.num_layers + 3);
    assert_eq!(plan.steps.iter().filter(|s| s.stage == Stage::Layer).count(), 5 * cfg.num_layers);

    // a split embedding adds one embed and one logits dispatch per extra part
    let manifest = common::manifest(&cfg, QuantFormat::F16, 3);
    let plan = Plan::from_manifest(&manifest, &Target::portable()).unwrap();
    assert_eq!(plan.dispatches_per_token(), 5 * cfg.num_layers + 3 + 4);
    let logits: Vec<_> = plan.steps.iter().filter(|s| s.stage == Stage::Logits).collect();
    assert_eq!(logits.len(), 3);
    assert_eq!(logits.iter().map(|s| s.tensors[1].part).collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn plan_binds_each_layer_its_own_tensors() {
    let cfg = common::smollm2_config();
    let manifest = common::manifest(&cfg, QuantFormat::Bf16, 1);
    let plan = Plan::from_manifest(&manifest, &Target::portable()).unwrap();
    for step in &plan.steps {
        let kernel = &plan.kernels[step.kernel];
        for t in &step.tensors {
            assert!(manifest.tensors.contains_key(&t.tensor), "{}", t.tensor);
            if let Some(layer) = step.layer {
                assert!(t.tensor.starts_with(&format!("model.layers.{layer}.")), "{} in layer {layer}", t.tensor);
            }
            let b = &kernel.bindings[t.binding as usize];
            assert_eq!(b.resource, llama5_codegen::Resource::Tensor, "{} binding {}", kernel.name, b.name);
        }
        // every tensor binding of the kernel is given a tensor
        let tensor_bindings = kernel.bindings.iter().filter(|b| b.resource == llama5_codegen::Resource::Tensor).count();
        assert_eq!(step.tensors.len(), tensor_bindings, "{}", kernel.name);
    }
    let names = kernel_names_for_layer(&manifest, 7, &Target::portable()).unwrap();
    let layer7: Vec<String> =
        plan.steps.iter().filter(|s| s.layer == Some(7)).map(|s| plan.kernels[s.kernel].name.clone()).collect();
    assert_eq!(names, layer7);
}

#[test]
fn generated_files_cover_every_kernel_with_an_index() {
    let cfg = tiny_config(64, 160, 4, 2, 16, 300);
    let manifest = common::manifest(&cfg, QuantFormat::Int8 { per_tensor: false }, 2);
    let files = generated_files(&manifest, &Target::all()).unwrap();
    let index: serde_json::Value = serde_json::from_str(&files["index.json"]).unwrap();
    let kernels = index["kernels"].as_object().unwrap();
    assert_eq!(files.len(), kernels.len() + 1);
    for (name, entry) in kernels {
        let file = entry["file"].as_str().unwrap();
        assert_eq!(file, format!("{name}.wgsl"));
        assert!(files[file].starts_with("// generated by llama5-codegen; do not edit"));
        assert!(!entry["bindings"].as_array().unwrap().is_empty());
    }
    for target in Target::all() {
        let steps = index["plans"][target.name()].as_array().unwrap();
        // the embedding has two parts; the untied lm_head one
        // plus the argmax and the sampler
        assert_eq!(steps.len(), 5 * cfg.num_layers + 2 + 1 + 2);
    }
    // deterministic
    assert_eq!(files, generated_files(&manifest, &Target::all()).unwrap());
}

fn tiny_config(hidden: usize, ffn: usize, heads: usize, kv_heads: usize, head_dim: usize, vocab: usize) -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        name: None,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_layers: 2,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        max_position_embeddings: 256,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
    }
}

fn format_strategy() -> impl Strategy<Value = QuantFormat> {
    prop_oneof![
        Just(QuantFormat::F16),
        Just(QuantFormat::Bf16),
        any::<bool>().prop_map(|per_tensor| QuantFormat::Int8 { per_tensor }),
        (1u32..=4, any::<bool>()).prop_map(|(g, symmetric)| QuantFormat::Int4 { group_size: 8 * g, symmetric }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Odd shapes (not multiples of any workgroup size) generate valid WGSL for every op.
    #[test]
    fn odd_shapes_validate(
        format in format_strategy(),
        target_index in 0usize..5,
        hidden_units in 1usize..40,
        ffn_units in 1usize..40,
        kv_heads in 1usize..4,
        group in 1usize..4,
        half_dim in 1usize..40,
        vocab in 1usize..700,
    ) {
        let target = Target::all_with_coop()[target_index];
        // inputs must be a multiple of the format's pack (and INT4 group)
        let multiple = match format {
            QuantFormat::Int4 { group_size, .. } => group_size as usize,
            QuantFormat::Int8 { .. } => 4,
            _ => 2,
        };
        let hidden = hidden_units * multiple;
        let ffn = ffn_units * multiple;
        let (heads, head_dim) = (kv_heads * group, 2 * half_dim);
        let q_dim = heads * head_dim;
        prop_assume!(q_dim % multiple == 0);
        let specs = [
            KernelSpec::Embed { hidden, rows: [vocab / 3, vocab], format, target },
            KernelSpec::RmsQkvRope { hidden, heads, kv_heads, head_dim, rope_theta: 10000.0, eps: 1e-6, q: format, k: format, v: format, target },
            KernelSpec::Attention { heads, kv_heads, head_dim, target },
            KernelSpec::AttnOutput { heads, head_dim, hidden, format, target },
            KernelSpec::RmsGateUp { hidden, ffn, eps: 1e-6, gate: format, up: format, target },
            KernelSpec::MatvecAdd { input: Activation::Ffn, in_features: ffn, out_features: hidden, format, target },
            KernelSpec::RmsLogits { hidden, vocab, rows: [0, vocab], eps: 1e-6, format, target },
            KernelSpec::Argmax { vocab, target },
        ];
        for spec in &specs {
            let kernel = generate(spec).unwrap();
            match validate(&kernel, &target) {
                Ok(module) => within_workgroup_memory(&kernel, &module, &target),
                Err(e) => panic!("{e}"),
            }
            prop_assert!(kernel.dispatch.iter().all(|&d| d >= 1));
        }
    }
}

fn snapshot_spec(spec: KernelSpec) -> String {
    let kernel = generate(&spec).unwrap();
    validate(&kernel, spec.target()).unwrap();
    kernel.wgsl
}

fn snapshot_batch(spec: KernelSpec) -> String {
    let kernel = generate_batch(&spec).unwrap().expect("a batch variant");
    validate(&kernel, spec.target()).unwrap();
    kernel.wgsl
}

fn f16_sg() -> Target {
    Target { shader_f16: true, subgroups: true, ..Target::portable() }
}

/// Llama-2-7B's QKV kernel in formats `[q, k, v]`.
fn llama2_7b_qkv([q, k, v]: [QuantFormat; 3], target: Target) -> KernelSpec {
    KernelSpec::RmsQkvRope {
        hidden: 4096,
        heads: 32,
        kv_heads: 32,
        head_dim: 128,
        rope_theta: 10000.0,
        eps: 1e-5,
        q,
        k,
        v,
        target,
    }
}

/// A device of 32-wide subgroups and workgroups of up to 1024, with f16.
fn wide_f16_sg() -> Target {
    Target { subgroup_size: 32, max_workgroup_size: 1024, ..f16_sg() }
}

#[test]
fn snapshot_int4_qkv_portable() {
    let cfg = common::smollm2_config();
    let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
    let spec =
        llama5_codegen::plan::layer_specs(&cfg, &llama5_codegen::LayerFormats::uniform(int4), &Target::portable())[0]
            .clone();
    insta::assert_snapshot!("int4_qkv_f32", snapshot_spec(spec));
}

#[test]
fn snapshot_int4_qkv_f16_subgroups() {
    let cfg = common::smollm2_config();
    let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
    let spec =
        llama5_codegen::plan::layer_specs(&cfg, &llama5_codegen::LayerFormats::uniform(int4), &f16_sg())[0].clone();
    insta::assert_snapshot!("int4_qkv_f16_sg", snapshot_spec(spec));
}

/// The tiled attention sizes its tiles by the target's workgroup memory:
/// Llama-2-7B's heads take tiles of 16 keys in WebGPU's default 16 KiB, 32
/// where the adapter offers more (32 KiB as llvmpipe, 48 as the H100); with
/// an f32 cache, a query an invocation in 16 KiB; heads of 256, tiles of
/// a few keys. Each stays within its target's limit.
#[test]
fn attention_tiles_follow_workgroup_memory() {
    let attention_of = |head_dim: usize, target: Target| {
        let spec = KernelSpec::Attention { heads: 32, kv_heads: 32, head_dim, target };
        let kernel = generate_batch(&spec).unwrap().expect("a batch variant");
        let module = validate(&kernel, &target).unwrap();
        within_workgroup_memory(&kernel, &module, &target);
        kernel.wgsl
    };
    let attention = |target: Target| attention_of(128, target);
    let has = |wgsl: &str, line: &str| wgsl.contains(line);
    // heads of 256 in 16 KiB: tiles of fewer keys than a group has invocations
    assert!(has(&attention_of(256, f16_sg()), "const BKV: u32 = 8u;"));
    assert!(has(&attention_of(256, Target::portable()), "const BKV: u32 = 4u;"));
    // WebGPU counts each array rounded up to 16 bytes: heads of 34 with four keys
    // a tile take 1632 bytes so, 1624 without; in 1630 the tiles shrink to two keys
    assert!(has(&attention_of(34, Target { max_workgroup_storage: 1632, ..f16_sg() }), "const BKV: u32 = 4u;"));
    assert!(has(&attention_of(34, Target { max_workgroup_storage: 1630, ..f16_sg() }), "const BKV: u32 = 2u;"));
    let small = attention(f16_sg());
    assert!(has(&small, "const QR: u32 = 2u;") && has(&small, "const BKV: u32 = 16u;"));
    for storage in [32768, 49152] {
        let large = attention(Target { max_workgroup_storage: storage, ..f16_sg() });
        assert!(has(&large, "const QR: u32 = 2u;") && has(&large, "const BKV: u32 = 32u;"));
    }
    let f32_cache = attention(Target::portable());
    assert!(has(&f32_cache, "const QR: u32 = 1u;") && has(&f32_cache, "const BKV: u32 = 16u;"));
}

/// Llama-2-7B's INT4 QKV reads four RoPE pairs an invocation against the
/// input's int8 groups; with a matrix of another format, one pair.
#[test]
fn int4_qkv_reads_quads_of_rope_pairs_against_int8_groups() {
    let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
    let qkv = |k: QuantFormat, target: Target| llama2_7b_qkv([int4, k, int4], target);
    let kernel = generate(&qkv(int4, wide_f16_sg())).unwrap();
    let module = validate(&kernel, &wide_f16_sg()).unwrap();
    assert!(llama5_codegen::workgroup_bytes(&kernel, &module).unwrap() <= 16384);
    assert!(kernel.wgsl.contains("parts = wk_pair_dot4(oa, ob, ks);"));
    assert!(kernel.wgsl.contains("    stage_int8_groups();\n"));
    // 6144 RoPE pairs, four an invocation, groups streamed: 8 quads a
    // workgroup x 32 k-slices, each quad and its partner loading the next group
    // before the current one's products
    assert_eq!((kernel.workgroup_size, kernel.dispatch), ([256, 1, 1], [192, 1, 1]));
    let wgsl = &kernel.wgsl;
    let wk = &wgsl[wgsl.find("fn wk_pair_dot4(").unwrap()..wgsl.find("fn wv_pair_dot4(").unwrap()];
    let at = |what: &str| wk.find(what).unwrap_or_else(|| panic!("no {what:?}"));
    assert!(at("var m0_s = wk[WK_SCALES4 + first * WK_SCALE_STRIDE4 + oa];") < at("for (var g = b0; g < b1; g++)"));
    assert!(at("let m1_w3_next = wk[(next * WK_GROUP_ROWS + 3u) * WK_STRIDE4 + ob];") < at("wq_qdot4(m0_w0, x0)"));
    insta::assert_snapshot!("qkv_int4_pair_quads_f16_sg", kernel.wgsl);
    // groups of 64 keep the plain loop, in tiles of 4 quads x 64 k-slices
    let int4_64 = QuantFormat::Int4 { group_size: 64, symmetric: false };
    let wide_groups = generate(&llama2_7b_qkv([int4_64; 3], wide_f16_sg())).unwrap();
    assert_eq!(wide_groups.dispatch, [384, 1, 1]);
    assert!(wide_groups.wgsl.contains("_pair_dot4(") && !wide_groups.wgsl.contains("_next"));
    let mixed = generate(&qkv(QuantFormat::Int8 { per_tensor: false }, wide_f16_sg())).unwrap();
    assert!(!mixed.wgsl.contains("_pair_dot4") && mixed.wgsl.contains("ab = wk_dot2(o1, o2, b0, b1);"));
    // mixed formats take two tiles in prefill too, an input loop per matrix
    for target in Target::all_with_coop() {
        let batch = generate_batch(&qkv(QuantFormat::F16, target)).unwrap().unwrap();
        within_workgroup_memory(
            &batch,
            &validate(&batch, &target).unwrap_or_else(|e| panic!("{}: {e}", batch.name)),
            &target,
        );
        assert_eq!(batch.dispatch, [96, 1, 1], "{}: two tiles of 32 RoPE pairs a workgroup", batch.name);
        assert!(batch.wgsl.contains("wk_words(stage_o_wt1, k0 + kk)"), "{}", batch.name);
    }
}

/// Asserts that an int8-group kernel streams the groups of its `mats`
/// matrices: the entry calls `first_group` (as `call`) before it stages the
/// input, and each iteration loads the next group's words (4 rows of a group
/// of 32) before the current group's products.
fn streams_groups(wgsl: &str, mats: usize, call: &str) {
    let at = |what: &str| wgsl.find(what).unwrap_or_else(|| panic!("no {what:?}"));
    assert!(at(call) < at("    load_input(t);\n"), "the first group's loads come before the input's");
    for i in 0..mats {
        assert!(wgsl.contains(&format!("    m{i}_s_first = ")), "first_group loads matrix {i}");
        assert!(
            wgsl.contains(&format!("    var m{i}_s = m{i}_s_first;")),
            "the loop starts from matrix {i}'s first group"
        );
        for k in 0..4 {
            let next = format!("let m{i}_w{k}_next = ");
            assert!(at(&next) < at("_qdot4(m0_w0, x0)"), "{next} before the products");
            assert!(wgsl.contains(&format!("_qdot4(m{i}_w{k}, x{k})")), "matrix {i} row {k}");
            assert!(wgsl.contains(&format!("m{i}_w{k} = m{i}_w{k}_next;")), "matrix {i} row {k} moves on");
        }
    }
    assert!(!wgsl.contains("m2_"), "no third matrix");
}

/// Wide enough to read four outputs at a load, where INT4 products meet the
/// input's int8 groups through dot4I8Packed.
#[test]
fn snapshot_int4_gate_up_quads_f16() {
    let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
    let spec = KernelSpec::RmsGateUp { hidden: 4096, ffn: 11008, eps: 1e-5, gate: int4, up: int4, target: f16_sg() };
    // streamed groups: tiles of 16 quads, 16 k-slices of 8 groups
    let kernel = generate(&spec).unwrap();
    assert_eq!((kernel.workgroup_size, kernel.dispatch), ([256, 1, 1], [172, 1, 1]));
    // groups of 64 keep the plain loop, in MatvecShape::choose's 8 quads x 32 k-slices
    let int4_64 = QuantFormat::Int4 { group_size: 64, symmetric: false };
    let plain = generate(&KernelSpec::RmsGateUp {
        hidden: 4096,
        ffn: 11008,
        eps: 1e-5,
        gate: int4_64,
        up: int4_64,
        target: f16_sg(),
    })
    .unwrap();
    validate(&plain, &f16_sg()).unwrap();
    assert_eq!((plain.workgroup_size, plain.dispatch), ([256, 1, 1], [344, 1, 1]));
    assert!(plain.wgsl.contains("w_gate_qdot4(gw, x)") && !plain.wgsl.contains("first_group"));
    let text = snapshot_spec(spec);
    assert!(text.contains("w_gate_qdot4(m0_w0, x0)"), "int8 products in the fused four-output path");
    assert!(text.contains("w_gate_qdot4(m1_w3, x3)"), "up's words meet the same input rows");
    assert!(text.contains("    stage_int8_groups();\n}"), "load_input ends by staging the int8 groups");
    streams_groups(&text, 2, "first_group(oc, slice_begin(W_GATE_BLOCKS, ks));");
    assert!(!text.contains("fn w_gate_dot4("), "no per-matrix dot4 beside the fused one");
    assert!(!text.contains("fn w_up_qdot4("), "the up matrix uses the gate matrix's helpers");
    insta::assert_snapshot!("int4_gate_up_quads_f16_sg", text);
}

/// Without subgroups each invocation quantises a whole group of the input.
#[test]
fn snapshot_int4_gate_up_int8_groups_without_subgroups() {
    let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
    let target = Target { shader_f16: true, ..Target::portable() };
    let spec = KernelSpec::RmsGateUp { hidden: 4096, ffn: 11008, eps: 1e-5, gate: int4, up: int4, target };
    let text = snapshot_spec(spec);
    assert!(text.contains("        let x7 = xin4(b + 7u);\n"), "a group's loads unrolled");
    assert!(!text.contains("subgroupShuffleXor"));
    insta::assert_snapshot!("int4_gate_up_int8_groups_f16", text);
}

/// INT4 keeps f16 products where the int8 groups would not fit in workgroup memory.
#[test]
fn int4_gate_up_quads_too_wide_for_int8_groups_keep_f16_products() {
    let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
    let spec = KernelSpec::RmsGateUp { hidden: 16384, ffn: 11008, eps: 1e-5, gate: int4, up: int4, target: f16_sg() };
    let text = snapshot_spec(spec);
    assert!(text.contains("w_gate_qdot(gw.x, xp)"), "f16 products in the fused four-output path");
    assert!(!text.contains("dot4I8Packed"));
}

#[test]
fn snapshot_attention() {
    let spec = KernelSpec::Attention { heads: 9, kv_heads: 3, head_dim: 64, target: f16_sg() };
    insta::assert_snapshot!("attention_f16_sg", snapshot_spec(spec));
    // its splits are combined as the output projection reads them
    let spec =
        KernelSpec::AttnOutput { heads: 9, head_dim: 64, hidden: 576, format: QuantFormat::F16, target: f16_sg() };
    insta::assert_snapshot!("attn_output_f16_sg", snapshot_spec(spec));
}

/// Exact products on a portable target; on an f16 one the vocabulary is wide
/// enough to read four outputs at a load, where INT8 products go through dot4I8Packed.
#[test]
fn snapshot_logits_int8() {
    let spec = |target| KernelSpec::RmsLogits {
        hidden: 576,
        vocab: 49152,
        rows: [0, 49152],
        eps: 1e-5,
        format: QuantFormat::Int8 { per_tensor: false },
        target,
    };
    insta::assert_snapshot!("logits_int8_f32", snapshot_spec(spec(Target::portable())));
    let packed = snapshot_spec(spec(f16_sg()));
    assert!(packed.contains("dot4I8Packed(w.x, xq)"), "int8 products in the four-output path");
    insta::assert_snapshot!("int8_logits_quads_f16_sg", packed);
}

#[test]
fn snapshot_bf16_down_and_argmax() {
    let spec = KernelSpec::MatvecAdd {
        input: Activation::Ffn,
        in_features: 1536,
        out_features: 576,
        format: QuantFormat::Bf16,
        target: Target::portable(),
    };
    insta::assert_snapshot!("down_bf16_f32", snapshot_spec(spec));
    let target = Target { subgroups: true, ..Target::portable() };
    insta::assert_snapshot!("argmax_f32_sg", snapshot_spec(KernelSpec::Argmax { vocab: 49152, target }));
    insta::assert_snapshot!(
        "argmax_shares_f32_sg",
        snapshot_spec(KernelSpec::ArgmaxShares { vocab: 49152, slots: 1536, target })
    );
}

/// A large model's down projection on a device of wide workgroups and 32-wide
/// subgroups: four outputs at a load, 128 k-slices.
#[test]
fn snapshot_int8_down_wide_quads() {
    let target = Target { subgroups: true, subgroup_size: 32, max_workgroup_size: 1024, ..Target::portable() };
    let spec = KernelSpec::MatvecAdd {
        input: Activation::Ffn,
        in_features: 11008,
        out_features: 4096,
        format: QuantFormat::Int8 { per_tensor: false },
        target,
    };
    insta::assert_snapshot!("down_int8_wide_quads_f32_sg", snapshot_spec(spec));
}

/// Llama-2-7B's INT4 down projection on a device of wide workgroups, 32-wide
/// subgroups and f16: int8 input groups, tiles of 8 quads, within 16 KiB of
/// workgroup memory.
#[test]
fn snapshot_int4_down_wide_int8_groups() {
    let target = wide_f16_sg();
    let spec = KernelSpec::MatvecAdd {
        input: Activation::Ffn,
        in_features: 11008,
        out_features: 4096,
        format: QuantFormat::Int4 { group_size: 32, symmetric: false },
        target,
    };
    let kernel = generate(&spec).unwrap();
    let module = validate(&kernel, &target).unwrap();
    assert!(llama5_codegen::workgroup_bytes(&kernel, &module).unwrap() <= 16384);
    streams_groups(&kernel.wgsl, 1, "first_group(min(o4, OUT4 - 1u), slice_begin(W_BLOCKS, ks));");
    assert_eq!(kernel.workgroup_size, [512, 1, 1]);
    // groups of 64 keep the plain loop, the input staged first
    let plain = generate(&KernelSpec::MatvecAdd {
        input: Activation::Ffn,
        in_features: 11008,
        out_features: 4096,
        format: QuantFormat::Int4 { group_size: 64, symmetric: false },
        target,
    })
    .unwrap();
    validate(&plain, &target).unwrap();
    assert!(
        plain.wgsl.contains("    load_input(t);\n    let place = tile_place();") && !plain.wgsl.contains("first_group")
    );
    insta::assert_snapshot!("down_int4_wide_int8_groups_f16_sg", snapshot_spec(spec));
}

/// Its output projection stages the combined attention row as int8 groups.
#[test]
fn int4_output_projection_stages_int8_groups_of_the_combined_row() {
    let target = wide_f16_sg();
    let int4 = QuantFormat::Int4 { group_size: 32, symmetric: false };
    let spec = KernelSpec::AttnOutput { heads: 32, head_dim: 128, hidden: 4096, format: int4, target };
    let kernel = generate(&spec).unwrap();
    let module = validate(&kernel, &target).unwrap();
    assert!(llama5_codegen::workgroup_bytes(&kernel, &module).unwrap() <= 16384);
    assert!(kernel.wgsl.contains("        split_weights(splits);\n    }\n    stage_int8_groups();\n}"));
    assert!(kernel.wgsl.contains("return combined(j, x_splits);"), "the stage reads the combined row");
    assert!(!kernel.wgsl.contains("var<workgroup> xs:"), "no f16 row beside the groups");
    insta::assert_snapshot!("attn_output_int4_int8_groups_f16_sg", kernel.wgsl);
}

#[test]
fn snapshot_tiled_prefill_kernels() {
    let cfg = common::smollm2_config();
    let mixed = llama5_codegen::LayerFormats {
        q: QuantFormat::Int4 { group_size: 32, symmetric: false },
        k: QuantFormat::Int8 { per_tensor: false },
        v: QuantFormat::F16,
        ..llama5_codegen::LayerFormats::uniform(QuantFormat::Int4 { group_size: 32, symmetric: true })
    };
    let specs = llama5_codegen::plan::layer_specs(&cfg, &mixed, &Target::portable());
    insta::assert_snapshot!("qkv_mixed_batch_f32", snapshot_batch(specs[0].clone()));
    insta::assert_snapshot!("gate_up_int4_batch_f32", snapshot_batch(specs[3].clone()));
    assert!(matches!(specs[1], KernelSpec::Attention { .. }));
    insta::assert_snapshot!("attention_batch_f32", snapshot_batch(specs[1].clone()));
}

/// With shader-f16, the plain tiled gate/up stages f16 inputs divided by each
/// token's rms, from the sums of squares by parts the output projection
/// leaves; so does Llama-2-7B's down projection, from those gate/up leaves,
/// and multiplies its outputs back by the rms.
#[test]
fn snapshot_tiled_prefill_f16() {
    let cfg = common::smollm2_config();
    let formats = llama5_codegen::LayerFormats::uniform(QuantFormat::F16);
    let target = Target { shader_f16: true, ..Target::portable() };
    let specs = llama5_codegen::plan::layer_specs(&cfg, &formats, &target);
    assert!(matches!(specs[2], KernelSpec::AttnOutput { .. }));
    insta::assert_snapshot!("attn_output_f16_batch_f16", snapshot_batch(specs[2].clone()));
    let gate_up = snapshot_batch(specs[3].clone());
    // the step sums are declared outside the input loop and zeroed by hand:
    // naga before wgpu #9489's fix (Firefox's) zeroes a loop's `var` only once
    let entry = &gate_up[gate_up.find("fn main(").unwrap()..];
    let first_loop = entry.find("for (").unwrap();
    for sums in ["var s_g:", "var s_u:"] {
        assert!(entry.find(sums).is_some_and(|i| i < first_loop), "{sums} inside the loop");
    }
    // two accumulators of two token quads x 4 tokens
    assert!(gate_up.contains("const QUADS: u32 = 2u;"));
    assert_eq!(entry.matches("] = vec4<f16>(0.0);").count(), 16);
    insta::assert_snapshot!("gate_up_f16_batch_f16", gate_up);
    assert!(!gate_up.contains("ffn_ssq_parts"), "SmolLM2's down stages f32");
    let gate_up = KernelSpec::RmsGateUp {
        hidden: 4096,
        ffn: 11008,
        eps: 1e-5,
        gate: QuantFormat::F16,
        up: QuantFormat::F16,
        target,
    };
    let gate_up = snapshot_batch(gate_up);
    assert!(gate_up.contains("ffn_ssq_parts[t * OUT_PARTS + o0 / BO] = s[j];"));
    insta::assert_snapshot!("gate_up_sums_batch_f16", gate_up);
    let down = KernelSpec::MatvecAdd {
        input: Activation::Ffn,
        in_features: 11008,
        out_features: 4096,
        format: QuantFormat::F16,
        target,
    };
    let down = snapshot_batch(down);
    assert!(down.contains("vec4<f16>(px0 * rs0)") && down.contains("let r = rms(ty);"));
    // two tiles' accumulators of one token quad
    assert_eq!(down.matches("] = vec4<f16>(0.0);").count(), 8);
    // and leaves the residual stream's sums, for the next layer's QKV
    assert!(down.contains("ssq_parts[t * OUT_PARTS + o1 / BO] = s[j];"));
    insta::assert_snapshot!("down_f16_wide_batch_f16", down);
    // (the first layer's from the embedding's batch kernel, a part a workgroup)
    let embed = KernelSpec::Embed { hidden: 4096, rows: [0, 32000], format: QuantFormat::F16, target };
    let embed = snapshot_batch(embed);
    assert!(embed.contains("ssq_parts[t * PARTS + wid.x] = s;"));
    insta::assert_snapshot!("embed_sums_batch_f16", embed);
    // Llama-2-7B's attention leaves its output's sums of squares, which its
    // output projection stages unit inputs by (and it leaves the residual
    // stream's, through red)
    let attention = snapshot_batch(KernelSpec::Attention { heads: 32, kv_heads: 32, head_dim: 128, target });
    assert!(attention.contains("attn_ssq_parts[tok0 * OUT_PARTS + h * HEAD_PARTS + c] = s;"));
    insta::assert_snapshot!("attention_sums_batch_f16", attention);
    let o_proj = snapshot_batch(KernelSpec::AttnOutput {
        heads: 32,
        head_dim: 128,
        hidden: 4096,
        format: QuantFormat::F16,
        target,
    });
    assert!(
        o_proj.contains("vec4<f16>(px0 * rs0)") && o_proj.contains("red[lid + (0u / 4u) * WG][0u % 4u] = dot(h, h);")
    );
    insta::assert_snapshot!("attn_output_f16_wide_batch_f16", o_proj);
    // Llama-2-7B's QKV of F16 weights: two tiles of one matrix per
    // workgroup, one token quad per invocation, staging unit inputs times
    // the norm weights as gate/up does, by the sums the down projection or
    // the embedding leaves
    let spec = llama2_7b_qkv([QuantFormat::F16; 3], target);
    let qkv = snapshot_batch(spec);
    assert!(qkv.contains("const QUADS: u32 = 1u;") && qkv.contains("const WG: u32 = 256u;"));
    assert!(qkv.contains("vec4<f16>(px0 * rs0 * nk)") && qkv.contains("in_ssq[t * IN_PARTS + p]"));
    insta::assert_snapshot!("qkv_f16_wide_batch_f16", qkv);
}

#[test]
fn snapshot_tiled_prefill_coop() {
    let cfg = common::smollm2_config();
    let formats = llama5_codegen::LayerFormats::uniform(QuantFormat::Int4 { group_size: 32, symmetric: true });
    let specs = llama5_codegen::plan::layer_specs(&cfg, &formats, &Target::coop());
    insta::assert_snapshot!("gate_up_int4_batch_f16_sg_coop", snapshot_batch(specs[3].clone()));
    // Llama-2-7B's QKV: two tiles of one matrix per workgroup
    let spec = llama2_7b_qkv([QuantFormat::F16; 3], Target::coop());
    let kernel = generate_batch(&spec).unwrap().unwrap();
    assert_eq!(kernel.dispatch, [96, 1, 1], "6144 RoPE pairs, 64 a workgroup");
    insta::assert_snapshot!("qkv_f16_wide_batch_f16_sg_coop", snapshot_batch(spec));
}

#[test]
fn copy_kernel_validates_for_every_target() {
    for target in Target::all_with_coop() {
        let k = llama5_codegen::copy_kernel(&target);
        validate(&k, &target).unwrap_or_else(|e| panic!("{}: {e}", k.name));
        assert_eq!(k.bindings.len(), 3);
    }
    assert_eq!(llama5_codegen::copy_dispatch(1 << 30), [65535, 1, 1]);
    assert_eq!(llama5_codegen::copy_dispatch(16 * 1024 * 10), [10, 1, 1]);
}

#[test]
fn snapshot_sampler() {
    insta::assert_snapshot!(
        "sample_f32",
        snapshot_spec(KernelSpec::Sample { vocab: 49152, target: Target::portable() })
    );
}

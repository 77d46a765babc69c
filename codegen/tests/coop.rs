//! The cooperative-matrix kernels translate to SPIR-V the way wgpu's Vulkan
//! backend translates them at pipeline creation (same writer, same
//! capabilities), so a kernel that fails there fails here first. Where
//! `spirv-val` is on the PATH and knows SPV_KHR_cooperative_matrix, each
//! module is also checked by it.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use llama5_codegen::target::COOP_WORKGROUP_SIZE;
use llama5_codegen::{capabilities, validate, Kernel, Plan, Target};
use naga::back::spv;
use naga::valid::{ValidationFlags, Validator};

/// The capabilities wgpu-hal's Vulkan backend declares for a device with
/// `shader-f16`, subgroups and cooperative matrices.
fn vulkan_capabilities() -> naga::FastHashSet<spv::Capability> {
    use spv::Capability as C;
    [
        C::Shader,
        C::Matrix,
        C::Sampled1D,
        C::Image1D,
        C::ImageQuery,
        C::DerivativeControl,
        C::StorageImageExtendedFormats,
        C::GroupNonUniform,
        C::GroupNonUniformVote,
        C::GroupNonUniformArithmetic,
        C::GroupNonUniformBallot,
        C::GroupNonUniformShuffle,
        C::GroupNonUniformShuffleRelative,
        C::GroupNonUniformQuad,
        C::Float16,
        C::CooperativeMatrixKHR,
        C::VulkanMemoryModel,
    ]
    .into_iter()
    .collect()
}

/// SPIR-V 1.6 (a Vulkan 1.3 device) with wgpu's default runtime checks.
fn spirv(kernel: &Kernel, target: &Target) -> Vec<u32> {
    let module = validate(kernel, target).unwrap_or_else(|e| panic!("{e}"));
    let info = Validator::new(ValidationFlags::all(), capabilities(target)).validate(&module).unwrap();
    let options = spv::Options {
        lang_version: (1, 6),
        capabilities: Some(vulkan_capabilities()),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: naga::proc::BoundsCheckPolicy::Restrict,
            buffer: naga::proc::BoundsCheckPolicy::Restrict,
            image_load: naga::proc::BoundsCheckPolicy::Restrict,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::Polyfill,
        force_loop_bounding: true,
        ..spv::Options::default()
    };
    let pipeline = spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: "main".into() };
    spv::write_vec(&module, &info, &options, Some(&pipeline)).unwrap_or_else(|e| panic!("{}: {e}", kernel.name))
}

/// Runs `spirv-val` on `words` where it is installed and knows cooperative
/// matrices; false where it is not.
fn spirv_val(name: &str, words: &[u32]) -> bool {
    let path = std::env::temp_dir().join(format!("llama5-{}-{name}.spv", std::process::id()));
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    // LLAMA5_SPV_DUMP=<dir> keeps the modules (for spirv-dis)
    if let Some(dir) = std::env::var_os("LLAMA5_SPV_DUMP") {
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.spv")), &bytes).unwrap();
    }
    std::fs::write(&path, bytes).unwrap();
    // the core SPIR-V 1.6 rules, SPV_KHR_cooperative_matrix's among them. The
    // Vulkan environment also rejects (VUID-StandaloneSpirv-None-10684) the
    // ArrayStride naga puts on every workgroup and private array, the plain
    // kernels' too, which drivers accept.
    let out = Command::new("spirv-val").arg("--target-env").arg("spv1.6").arg(&path).output();
    let _ = std::fs::remove_file(&path);
    let Ok(out) = out else { return false };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // releases before SPV_KHR_cooperative_matrix (SPIRV-Tools 2023.1) reject its capability
    if text.contains("Invalid capability operand: 6022") {
        return false;
    }
    assert!(out.status.success(), "{name}: spirv-val: {text}");
    true
}

#[test]
fn coop_kernels_translate_to_spirv() {
    let target = Target::coop();
    let cfg = common::smollm2_config();
    let mut seen = BTreeSet::new();
    let mut checked = 0;
    let mut spirv_val_ran = false;
    for format in common::all_formats(32) {
        let plan = Plan::from_manifest(&common::manifest(&cfg, format, 1), &target).unwrap();
        for k in &plan.kernels {
            if !seen.insert(k.name.clone()) {
                continue;
            }
            // every tiled matrix kernel, and only those
            let coop = k.wgsl.contains("coopMultiplyAdd");
            let tiled_matrix = k.name.ends_with("-batch") && !k.name.starts_with("attention");
            assert_eq!(coop, tiled_matrix, "{}: which kernels use cooperative matrices", k.name);
            if !coop {
                continue;
            }
            assert_eq!(k.workgroup_size, [COOP_WORKGROUP_SIZE, 1, 1], "{}", k.name);
            let words = spirv(k, &target);
            spirv_val_ran |= spirv_val(&k.name, &words);
            checked += 1;
        }
    }
    // five tiled kernels per format (qkv, o, gate/up, down, logits), six formats
    assert_eq!(checked, 5 * 6);
    println!(
        "{checked} cooperative-matrix kernels translated to SPIR-V{}",
        if spirv_val_ran {
            " and passed spirv-val"
        } else {
            " (spirv-val missing or without SPV_KHR_cooperative_matrix: not run)"
        }
    );
}

#[test]
fn coop_is_an_extra_variant_and_needs_its_capability() {
    let all = Target::all_with_coop();
    assert_eq!(all[..4], Target::all());
    assert_eq!(all[4].name(), "f16-sg-coop");
    assert!(capabilities(&all[4]).contains(naga::valid::Capabilities::COOPERATIVE_MATRIX));
    assert!(Target::all().iter().all(|t| !capabilities(t).contains(naga::valid::Capabilities::COOPERATIVE_MATRIX)));
    // a coop kernel does not validate without the capability
    let cfg = common::smollm2_config();
    let plan =
        Plan::from_manifest(&common::manifest(&cfg, llama5_codegen::manifest::QuantFormat::F16, 1), &all[4]).unwrap();
    let batch = plan.kernels.iter().find(|k| k.name.ends_with("-batch")).unwrap();
    let without = Target { cooperative_matrix: false, ..all[4] };
    assert!(validate(batch, &without).is_err());
    // subgroups of another size would miss sub-tiles: those targets keep the plain kernels
    assert!(batch.wgsl.contains("coopMultiplyAdd"), "{}", batch.name);
    let other_size = Target { subgroup_size: 16, ..all[4] };
    let plan = Plan::from_manifest(&common::manifest(&cfg, llama5_codegen::manifest::QuantFormat::F16, 1), &other_size)
        .unwrap();
    assert!(plan.kernels.iter().all(|k| !k.wgsl.contains("coopMultiplyAdd")));
}

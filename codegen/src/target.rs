//! What a kernel may assume about the adapter that runs it.

use naga::valid::Capabilities;
use serde::{Deserialize, Serialize};

/// The smallest subgroup size WebGPU allows; reductions size their scratch for it.
pub const MIN_SUBGROUP_SIZE: u32 = 4;

/// The adapter capabilities a kernel variant is generated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Target {
    /// `shader-f16`: f16 types in shaders (the KV cache is stored as f16).
    pub shader_f16: bool,
    /// Subgroup operations (reductions use `subgroupAdd` / `subgroupMax`).
    pub subgroups: bool,
    /// Smallest subgroup size the adapter may run: the k-slice sums of the
    /// matrix-vector kernels size their workgroup memory by it (the variants
    /// written into model directories assume [`MIN_SUBGROUP_SIZE`]).
    pub subgroup_size: u32,
    /// Largest number of invocations in one workgroup.
    pub max_workgroup_size: u32,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
    /// Workgroup memory a kernel may use, in bytes (the tiled attention takes
    /// larger tiles where the adapter offers more than WebGPU's default).
    #[serde(default = "default_workgroup_storage")]
    pub max_workgroup_storage: u32,
    /// Cooperative matrices (tensor cores) of 16 x 16 f16 inputs and f32
    /// accumulators at subgroup scope, for the tiled prefill kernels
    /// ([`crate::coop`]). Only used together with `shader_f16` and `subgroups`,
    /// and with subgroups of exactly [`COOP_SUBGROUP_SIZE`] invocations.
    #[serde(default)]
    pub cooperative_matrix: bool,
}

/// WebGPU's default workgroup memory limit, in bytes: what a [`Target`]
/// that does not say assumes.
pub const DEFAULT_WORKGROUP_STORAGE: u32 = 16384;

fn default_workgroup_storage() -> u32 {
    DEFAULT_WORKGROUP_STORAGE
}

/// The subgroup size the cooperative-matrix kernels are laid out for: a
/// workgroup of [`COOP_WORKGROUP_SIZE`] invocations is 16 subgroups, each
/// owning its sub-tiles.
pub const COOP_SUBGROUP_SIZE: u32 = 32;

/// Invocations per workgroup of the cooperative-matrix kernels (above
/// WebGPU's default 256: the runtime checks the adapter's limit).
pub const COOP_WORKGROUP_SIZE: u32 = crate::coop::WG;

/// Workgroup memory the cooperative-matrix kernels use at most, in bytes (more
/// than WebGPU's default 16 KiB: the runtime checks the adapter's limit).
pub const COOP_WORKGROUP_BYTES: u32 = crate::coop::workgroup_bytes(2);

impl Target {
    /// The WebGPU baseline: no f16, no subgroups, default limits.
    pub fn portable() -> Target {
        Target {
            shader_f16: false,
            subgroups: false,
            subgroup_size: MIN_SUBGROUP_SIZE,
            max_workgroup_size: 256,
            max_storage_binding: 128 << 20,
            max_workgroup_storage: DEFAULT_WORKGROUP_STORAGE,
            cooperative_matrix: false,
        }
    }

    /// One target per kernel variant (f16 on/off x subgroups on/off).
    pub fn all() -> [Target; 4] {
        let base = Target::portable();
        [
            base,
            Target { shader_f16: true, ..base },
            Target { subgroups: true, ..base },
            Target { shader_f16: true, subgroups: true, ..base },
        ]
    }

    /// [`Target::all`] and the cooperative-matrix variant (native only, so
    /// never written into a model directory: the runtime generates its kernels).
    pub fn all_with_coop() -> [Target; 5] {
        let [a, b, c, d] = Target::all();
        [a, b, c, d, Target::coop()]
    }

    /// f16, subgroups and cooperative matrices.
    pub fn coop() -> Target {
        Target {
            shader_f16: true,
            subgroups: true,
            subgroup_size: COOP_SUBGROUP_SIZE,
            max_workgroup_storage: COOP_WORKGROUP_BYTES,
            cooperative_matrix: true,
            ..Target::portable()
        }
    }

    /// `f32`, `f16`, `f32-sg`, `f16-sg` or `f16-sg-coop`: the variant part of kernel names.
    pub fn name(&self) -> &'static str {
        match (self.shader_f16, self.subgroups, self.cooperative_matrix) {
            (false, false, false) => "f32",
            (true, false, false) => "f16",
            (false, true, false) => "f32-sg",
            (true, true, false) => "f16-sg",
            (true, true, true) => "f16-sg-coop",
            (false, false, true) => "f32-coop",
            (true, false, true) => "f16-coop",
            (false, true, true) => "f32-sg-coop",
        }
    }

    /// Whether the tiled kernels use cooperative matrices: they need f16,
    /// subgroups of exactly [`COOP_SUBGROUP_SIZE`] (each owns its sub-tiles)
    /// and a full workgroup of 256 invocations.
    pub fn uses_coop(&self) -> bool {
        self.cooperative_matrix
            && self.shader_f16
            && self.subgroups
            && self.subgroup_size == COOP_SUBGROUP_SIZE
            && self.workgroup_limit() >= 256
    }

    /// Workgroup size limit the generator designs for (kernels use at most 256 invocations).
    pub(crate) fn workgroup_limit(&self) -> u32 {
        self.max_workgroup_size.clamp(64, 256)
    }
}

/// The naga capabilities a kernel for `target` needs: the single place adapter
/// features map to validation capabilities.
pub fn capabilities(target: &Target) -> Capabilities {
    // unpack2x16float / pack2x16float are core WebGPU.
    let mut caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    caps.set(Capabilities::SHADER_FLOAT16, target.shader_f16);
    caps.set(Capabilities::SUBGROUP, target.subgroups);
    caps.set(Capabilities::COOPERATIVE_MATRIX, target.cooperative_matrix);
    caps
}

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
    /// Smallest subgroup size the adapter may run (informational; kernels only assume [`MIN_SUBGROUP_SIZE`]).
    pub subgroup_size: u32,
    /// Largest number of invocations in one workgroup.
    pub max_workgroup_size: u32,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
}

impl Target {
    /// The WebGPU baseline: no f16, no subgroups, default limits.
    pub fn portable() -> Target {
        Target {
            shader_f16: false,
            subgroups: false,
            subgroup_size: MIN_SUBGROUP_SIZE,
            max_workgroup_size: 256,
            max_storage_binding: 128 << 20,
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

    /// `f32`, `f16`, `f32-sg` or `f16-sg`: the variant part of kernel names.
    pub fn name(&self) -> &'static str {
        match (self.shader_f16, self.subgroups) {
            (false, false) => "f32",
            (true, false) => "f16",
            (false, true) => "f32-sg",
            (true, true) => "f16-sg",
        }
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
    caps
}

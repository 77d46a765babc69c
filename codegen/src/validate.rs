//! naga validation of generated kernels: the same front end and validator
//! wgpu runs at pipeline creation, so a kernel that passes here compiles there.

use naga::valid::{ValidationFlags, Validator};

use crate::error::CodegenError;
use crate::spec::Kernel;
use crate::target::{capabilities, Target};

/// Parses and validates `kernel` for `target`; errors carry the offending WGSL line.
pub fn validate(kernel: &Kernel, target: &Target) -> Result<naga::Module, CodegenError> {
    let module = naga::front::wgsl::parse_str(&kernel.wgsl)
        .map_err(|e| CodegenError::Parse { kernel: kernel.name.clone(), message: e.emit_to_string(&kernel.wgsl) })?;
    Validator::new(ValidationFlags::all(), capabilities(target)).validate(&module).map_err(|e| {
        CodegenError::Validation { kernel: kernel.name.clone(), message: e.emit_to_string(&kernel.wgsl) }
    })?;
    Ok(module)
}

/// Bytes of workgroup memory `kernel` declares once validated into `module`
/// (the sum of its `var<workgroup>` sizes, each rounded up to 16 bytes as
/// WebGPU counts them): what the device's `max_compute_workgroup_storage_size`
/// must cover.
pub fn workgroup_bytes(kernel: &Kernel, module: &naga::Module) -> Result<u32, CodegenError> {
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| CodegenError::Validation { kernel: kernel.name.clone(), message: format!("layout: {e}") })?;
    Ok(module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
        .map(|(_, g)| workgroup_array_bytes(layouter[g.ty].size as usize) as u32)
        .sum())
}

/// What WebGPU counts against the workgroup-memory limit for an array of
/// `size` bytes: its size rounded up to 16.
pub(crate) fn workgroup_array_bytes(size: usize) -> usize {
    size.next_multiple_of(16)
}

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

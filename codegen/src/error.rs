//! Errors of kernel generation and validation.

use crate::format::FormatError;
use crate::manifest::ManifestError;

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("tensor `{tensor}`: {source}")]
    Format { tensor: String, source: FormatError },
    #[error("tensor `{tensor}`: {reason}")]
    Unsupported { tensor: String, reason: String },
    #[error("kernel {kernel}: wgsl parse error:\n{message}")]
    Parse { kernel: String, message: String },
    #[error("kernel {kernel}: validation error:\n{message}")]
    Validation { kernel: String, message: String },
    #[error("{0}")]
    Shape(String),
}

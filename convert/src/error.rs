//! The converter's errors: each names the file and the tensor or field at fault.

use std::path::PathBuf;

use llama5_codegen::format::FormatError;
use llama5_codegen::manifest::ManifestError;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: truncated: {what} needs bytes {offset}..{end} but the file has {len}", path.display())]
    Truncated { path: PathBuf, what: String, offset: u64, end: u64, len: u64 },
    #[error("{}: header of {header} bytes is larger than the file ({len} bytes)", path.display())]
    HeaderTooLarge { path: PathBuf, header: u64, len: u64 },
    #[error("{}: tensor `{tensor}`: data {start}..{end} overlaps tensor `{other}`", path.display())]
    OverlappingTensors { path: PathBuf, tensor: String, other: String, start: u64, end: u64 },
    #[error("{}: tensor `{tensor}`: data {start}..{end} lies outside the data section ({len} bytes)", path.display())]
    OffsetOutOfRange { path: PathBuf, tensor: String, start: u64, end: u64, len: u64 },
    #[error("{}: tensor `{tensor}`: unsupported dtype {dtype}", path.display())]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
    #[error("{}: unsupported {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("{}: tensor `{tensor}` has shape {found:?}, expected {expected:?}", path.display())]
    ShapeMismatch { path: PathBuf, tensor: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("{}: tensor `{tensor}` is missing", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{}: tensor `{tensor}` holds a non-finite value ({value}) at index {index}", path.display())]
    NonFinite { path: PathBuf, tensor: String, index: usize, value: f32 },
    #[error("{}: unknown architecture `{found}` (expected {expected})", path.display())]
    Architecture { path: PathBuf, found: String, expected: &'static str },
    #[error("{}: {field}: {reason}", path.display())]
    Invalid { path: PathBuf, field: String, reason: String },
    #[error("tensor `{tensor}`: {source}")]
    Format { tensor: String, source: FormatError },
    #[error("tensor `{tensor}`: one part of {bytes} bytes does not fit a shard of {shard_size} bytes")]
    ShardTooSmall { tensor: String, bytes: u64, shard_size: u64 },
    #[error("output {}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
    #[error("{}: tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("options: {0}")]
    Options(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Runtime(#[from] llama5_runtime::RuntimeError),
}

impl ConvertError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ConvertError::Io { path: path.into(), source }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConvertError::Invalid { path: path.into(), field: field.into(), reason: reason.into() }
    }
}

/// Extension for attaching a path to `std::io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T, ConvertError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T, ConvertError> {
        self.map_err(|e| ConvertError::io(path, e))
    }
}

//! The runtime's errors: each names the file, tensor or device condition at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Manifest(#[from] llama5_codegen::manifest::ManifestError),
    #[error("model: {0}")]
    Model(String),
    #[error("shard {file}: {reason}")]
    Shard { file: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("prompt of {tokens} tokens does not fit a context of {ctx} (use a larger --ctx or --sliding-window)")]
    ContextOverflow { tokens: usize, ctx: usize },
    #[error("gpu: {0}")]
    Gpu(String),
    #[error("gpu: device lost: {0}")]
    DeviceLost(String),
    #[error("gpu: out of memory: {0}")]
    OutOfMemory(String),
    /// A buffer of the model is larger than the device allows: a smaller tier may fit.
    #[error(
        "gpu: the model does not fit {adapter}: {what} needs a {bytes}-byte buffer and {adapter} allows {limit} \
         (convert with smaller shards so tensors are split into parts, or use a smaller context)"
    )]
    TooLarge { what: String, bytes: u64, limit: u64, adapter: String },
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),
    #[error("kernel {name}: {message}")]
    Kernel { name: String, message: String },
    #[error("{0}")]
    Other(String),
}

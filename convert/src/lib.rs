//! llama5-convert: turns Hugging Face safetensors checkpoints and GGUF files
//! into llama5 model directories (`manifest.json`, `shard_NNNNN.bin`,
//! `tokenizer.json`), exports GGUF files back to Hugging Face form, and
//! inspects either.
//!
//! The entry points are [`convert`], [`export_hf`] and [`inspect::inspect`];
//! [`source::Source`] is the reader seam shared by all three.

pub mod calibrate;
pub mod error;
pub mod export;
pub mod gguf;
pub mod gguf_model;
pub mod gguf_tokenizer;
pub mod hf;
pub mod inspect;
pub mod options;
pub mod quants;
pub mod route;
pub mod source;
pub mod writer;

pub use error::ConvertError;
pub use export::export_hf;
pub use options::{parse_size, ConvertOptions, PrecisionSpec, RoutingNotes};
pub use writer::{convert, convert_source, convert_tiers, kernel_names};

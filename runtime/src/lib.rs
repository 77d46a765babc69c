//! llama5 runtime: loads a converted model and generates tokens on a WebGPU
//! adapter (wgpu) or on the CPU.
//!
//! Architecture invariants: the runtime never writes WGSL itself (it asks
//! `llama5_codegen`); the CPU backend is the reference the GPU backend is tested
//! against; everything but [`model::Model::open`] and the CLI compiles for wasm32.

pub mod backend;
#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod cpu;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod model;
pub mod perplexity;
pub mod sampling;
pub mod synthetic;
#[cfg(not(target_arch = "wasm32"))]
pub mod tiers;
pub mod tokenizer;

pub use backend::{Backend, BackendInfo, Logits};
pub use cpu::CpuBackend;
pub use error::RuntimeError;
pub use model::Model;

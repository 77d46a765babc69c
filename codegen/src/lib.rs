//! llama5 codegen: the manifest schema, the packed weight formats, and the
//! generator of every WGSL compute shader the runtime dispatches.
//!
//! Architecture invariant: this crate never touches a GPU. It turns a
//! [`manifest::Manifest`] and a [`target::Target`] into validated WGSL text plus
//! the binding and dispatch data the runtime needs.

mod coop;
pub mod error;
pub mod format;
pub mod manifest;
pub mod ops;
pub mod plan;
pub mod spec;
pub mod target;
pub mod tcal;
mod tiled;
pub mod validate;

pub use error::CodegenError;
pub use ops::{copy_dispatch, copy_kernel, generate, generate_batch};
pub use plan::{
    generated_files, kernel_names_for_layer, layer_kernel_names, LayerFormats, Plan, PlanStep, Stage, TensorLayout,
    TensorRef,
};
pub use spec::{
    attention_splits, split_limit, Access, Activation, Binding, Kernel, KernelSpec, Resource, Rows, StepUniform,
    ATTENTION_SPLIT_LEN, MAX_ATTENTION_SPLITS, SUM_SQUARES_PART,
};
pub use target::{capabilities, Target};
pub use validate::{validate, workgroup_bytes};

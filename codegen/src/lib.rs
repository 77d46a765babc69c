//! llama5 codegen: the manifest schema, the packed weight formats, and the
//! generator of every WGSL compute shader the runtime dispatches.
//!
//! Architecture invariant: this crate never touches a GPU. It turns a
//! [`manifest::Manifest`] and a [`spec::Target`] into validated WGSL text plus
//! the binding and dispatch data the runtime needs.

pub mod format;
pub mod manifest;

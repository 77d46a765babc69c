//! Whether a model fits a device's limits, decided from its manifest alone: by
//! the backend before it allocates anything, and by a browser before it
//! downloads any shard.

use llama5_codegen::manifest::Manifest;
use llama5_codegen::{Activation, Target};

use super::{activation_bytes, AdapterProbe};
use crate::error::RuntimeError;

/// Checks that the kernel plan exists for the adapter's target, then every
/// buffer the backend would bind against the adapter's limits.
pub fn check_fits(manifest: &Manifest, adapter: &AdapterProbe, ctx: usize) -> Result<(), RuntimeError> {
    llama5_codegen::Plan::from_manifest(manifest, &adapter.target)
        .map_err(|e| RuntimeError::Gpu(format!("the model cannot run on this adapter: {e}")))?;
    check_buffers(manifest, &adapter.target, ctx, &adapter.limits, &adapter.info.name)
}

/// Every buffer the backend binds (each tensor part, one layer's KV cache,
/// the activations of a full batch) against the storage-binding and buffer
/// size limits; the error names the largest offender.
pub(crate) fn check_buffers(
    manifest: &Manifest,
    target: &Target,
    ctx: usize,
    limits: &wgpu::Limits,
    adapter: &str,
) -> Result<(), RuntimeError> {
    let cfg = &manifest.model;
    let limit = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    let mut needs: Vec<(String, u64)> = Vec::new();
    for (name, t) in &manifest.tensors {
        for (i, p) in t.parts.iter().enumerate() {
            let bytes = p.data.bytes + p.scales.as_ref().map_or(0, |s| s.bytes);
            needs.push((format!("tensor `{name}` part {i}"), bytes));
        }
    }
    let kv = ctx as u64 * cfg.kv_dim() as u64 * llama5_codegen::tcal::kv_bytes_per_element(target);
    needs.push((format!("one layer's KV cache at {ctx} positions"), kv));
    for a in Activation::ALL {
        let what = if a == Activation::Logits { "the logits of one batch".into() } else { format!("activation {a:?}") };
        needs.push((what, activation_bytes(cfg, a, ctx)));
    }
    match needs.into_iter().filter(|(_, b)| *b > limit).max_by_key(|(_, b)| *b) {
        Some((what, bytes)) => Err(RuntimeError::TooLarge { what, bytes, limit, adapter: adapter.to_string() }),
        None => Ok(()),
    }
}

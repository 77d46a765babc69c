//! Whether a model fits an adapter's limits, decided from its manifest alone,
//! so a browser can say so before downloading any shard.

use llama5_codegen::manifest::Manifest;

use llama5_codegen::Activation;

use super::{activation_bytes, AdapterProbe};
use crate::error::RuntimeError;

/// Checks that the kernel plan exists for the adapter's target, then every
/// buffer the backend would bind (each tensor part, one layer's KV cache, the
/// activations of a full batch) against the adapter's storage binding and buffer
/// size limits; the error names the largest offender and the limit.
pub fn check_fits(manifest: &Manifest, adapter: &AdapterProbe, ctx: usize) -> Result<(), RuntimeError> {
    llama5_codegen::Plan::from_manifest(manifest, &adapter.target)
        .map_err(|e| RuntimeError::Gpu(format!("the model cannot run on this adapter: {e}")))?;
    let cfg = &manifest.model;
    let limit = adapter.limits.max_storage_buffer_binding_size.min(adapter.limits.max_buffer_size);
    let mut needs: Vec<(String, u64)> = Vec::new();
    for (name, t) in &manifest.tensors {
        for (i, p) in t.parts.iter().enumerate() {
            let bytes = p.data.bytes + p.scales.as_ref().map_or(0, |s| s.bytes);
            needs.push((format!("tensor `{name}` part {i}"), bytes));
        }
    }
    let kv = ctx as u64 * cfg.kv_dim() as u64 * llama5_codegen::tcal::kv_bytes_per_element(&adapter.target);
    needs.push((format!("one layer's KV cache at {ctx} positions"), kv));
    for a in [Activation::Hidden, Activation::Q, Activation::Attn, Activation::Ffn, Activation::Logits] {
        let what = if a == Activation::Logits { "the logits of one batch".into() } else { format!("activation {a:?}") };
        needs.push((what, activation_bytes(cfg, a, ctx)));
    }
    let Some((what, bytes)) = needs.into_iter().filter(|(_, b)| *b > limit).max_by_key(|(_, b)| *b) else {
        return Ok(());
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Err(RuntimeError::Gpu(format!(
        "the model does not fit this adapter: {what} needs a {:.1} MiB buffer and {} allows {:.1} MiB \
         (convert with smaller shards so tensors are split into parts, or use a smaller context)",
        mib(bytes),
        adapter.info.name,
        mib(limit)
    )))
}

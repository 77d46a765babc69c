//! `llama5 bench --profile`: GPU time per kernel of one decode step and of the
//! prefill, from timestamp queries, with each kernel's share of the step and
//! the bandwidth (weights read) or FLOP/s (matrix products) it achieved.

use llama5_codegen::manifest::Manifest;
use llama5_codegen::Stage;
use serde::Serialize;

use super::{median, tokens, BenchOptions, GB};
use crate::backend::{Backend, Logits};
use crate::error::RuntimeError;
use crate::gpu::profile::DispatchTime;
use crate::gpu::GpuBackend;

/// Profiled repetitions of each step; each dispatch's median is kept.
const REPS: usize = 5;

/// Kernel times of one profiled forward step.
#[derive(Clone, Debug, Serialize)]
pub struct StepProfile {
    /// `decode` or `prefill`.
    pub step: String,
    pub tokens: usize,
    /// Position of the step's first token.
    pub position: usize,
    pub dispatches: usize,
    /// Sum of the dispatches' GPU times (gaps between dispatches excluded).
    pub gpu_ms: f64,
    /// By kernel, most time first.
    pub kernels: Vec<KernelTime>,
}

/// One kernel's dispatches within a step.
#[derive(Clone, Debug, Serialize)]
pub struct KernelTime {
    pub kernel: String,
    pub calls: usize,
    pub gpu_ms: f64,
    pub share_percent: f64,
    /// Weight bytes (and, for attention, KV-cache bytes) the calls read.
    pub bytes: u64,
    pub gb_per_s: f64,
    /// Multiply-add work of the calls, 2 FLOPs each.
    pub flops: f64,
    pub tflops: f64,
}

/// Profiles a decode step after a prompt of `opts.prompt_tokens`, and a
/// prefill of `opts.prefill_tokens` (at most one submission's worth) from position 0.
pub(super) fn profile(
    gpu: &mut GpuBackend,
    manifest: &Manifest,
    opts: &BenchOptions,
) -> Result<Vec<StepProfile>, RuntimeError> {
    let vocab = manifest.model.vocab_size;
    let prompt = tokens(opts.prompt_tokens, vocab, 7);
    gpu.forward(&prompt, 0, Logits::Last)?;
    let decode = profile_step(gpu, manifest, "decode", &prompt[..1], opts.prompt_tokens)?;
    let long = tokens(opts.prefill_tokens.min(gpu.max_batch()), vocab, 8);
    let prefill = profile_step(gpu, manifest, "prefill", &long, 0)?;
    Ok(vec![decode, prefill])
}

fn profile_step(
    gpu: &mut GpuBackend,
    manifest: &Manifest,
    name: &str,
    tokens: &[u32],
    pos: usize,
) -> Result<StepProfile, RuntimeError> {
    let runs: Vec<Vec<DispatchTime>> = (0..REPS).map(|_| gpu.profile_step(tokens, pos, 1)).collect::<Result<_, _>>()?;
    let first = &runs[0];
    let mut kernels: Vec<KernelTime> = Vec::new();
    for (i, d) in first.iter().enumerate() {
        let ns = median(&runs.iter().map(|r| r[i].ns).collect::<Vec<_>>());
        let (bytes, flops) = work(gpu, manifest, d, tokens.len(), pos);
        let k = match kernels.iter_mut().find(|k| k.kernel == d.kernel) {
            Some(k) => k,
            None => {
                kernels.push(KernelTime {
                    kernel: d.kernel.clone(),
                    calls: 0,
                    gpu_ms: 0.0,
                    share_percent: 0.0,
                    bytes: 0,
                    gb_per_s: 0.0,
                    flops: 0.0,
                    tflops: 0.0,
                });
                kernels.last_mut().expect("just pushed")
            }
        };
        k.calls += 1;
        k.gpu_ms += ns / 1e6;
        k.bytes += bytes;
        k.flops += flops;
    }
    let total: f64 = kernels.iter().map(|k| k.gpu_ms).sum();
    for k in &mut kernels {
        let secs = k.gpu_ms / 1e3;
        k.share_percent = 100.0 * k.gpu_ms / total;
        k.gb_per_s = if secs > 0.0 { k.bytes as f64 / secs / GB } else { 0.0 };
        k.tflops = if secs > 0.0 { k.flops / secs / 1e12 } else { 0.0 };
    }
    kernels.sort_by(|a, b| b.gpu_ms.total_cmp(&a.gpu_ms));
    Ok(StepProfile {
        step: name.into(),
        tokens: tokens.len(),
        position: pos,
        dispatches: first.len(),
        gpu_ms: total,
        kernels,
    })
}

/// Bytes read and FLOPs of one dispatch of a step of `n` tokens at `pos`.
fn work(gpu: &GpuBackend, manifest: &Manifest, d: &DispatchTime, n: usize, pos: usize) -> (u64, f64) {
    let cfg = &manifest.model;
    match d.stage {
        Stage::Layer | Stage::Logits => {
            let rows = if d.stage == Stage::Logits { 1.0 } else { n as f64 };
            let mut bytes = 0;
            let mut flops = 0.0;
            for t in &gpu.plan().steps[d.step].tensors {
                let Some(entry) = manifest.tensors.get(&t.tensor) else { continue };
                let Some(part) = entry.parts.get(t.part) else { continue };
                bytes += part.data.bytes + part.scales.map_or(0, |s| s.bytes);
                if entry.shape.len() == 2 {
                    flops += 2.0 * ((part.rows[1] - part.rows[0]) * entry.in_features()) as f64 * rows;
                }
            }
            if d.kernel.starts_with("attention") {
                // every token attends to the positions up to its own
                let positions: f64 = (0..n).map(|t| (pos + t + 1).min(gpu.ctx()) as f64).sum();
                let per_position = (cfg.num_heads * cfg.head_dim) as f64;
                flops = 4.0 * per_position * positions;
                let kv_elem = llama5_codegen::tcal::kv_bytes_per_element(gpu.target());
                bytes = (2.0 * (cfg.kv_dim() as u64 * kv_elem) as f64 * positions) as u64;
            }
            (bytes, flops)
        }
        Stage::Embed | Stage::Argmax | Stage::Sample => (0, 0.0),
    }
}

/// The profile as text: one table per step.
pub(super) fn table(profiles: &[StepProfile]) -> String {
    let mut s = String::new();
    for p in profiles {
        s += &format!(
            "\nprofile: {} ({} tokens at position {}), {} dispatches, {:.3} ms of GPU time\n",
            p.step, p.tokens, p.position, p.dispatches, p.gpu_ms
        );
        s += &format!(
            "  {:>7} {:>6} {:>9} {:>6} {:>9} {:>8}  kernel\n",
            "share", "calls", "ms", "us/call", "GB/s", "TFLOP/s"
        );
        for k in &p.kernels {
            s += &format!(
                "  {:>6.1}% {:>6} {:>9.3} {:>6.1} {:>9.1} {:>8.2}  {}\n",
                k.share_percent,
                k.calls,
                k.gpu_ms,
                1e3 * k.gpu_ms / k.calls as f64,
                k.gb_per_s,
                k.tflops,
                k.kernel
            );
        }
    }
    s
}

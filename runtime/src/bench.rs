//! `llama5 bench`: how fast a model decodes and prefills on a backend, and how
//! that compares with the device's memory bandwidth.
//!
//! Measured in one process, on one device: a buffer-to-buffer copy (the
//! bandwidth yardstick), time to first token, greedy decode after a prompt,
//! prefill of a long prompt, the bytes a decoded token reads, and the device
//! memory the backend allocated. Conventions are spelled out in
//! [`BenchReport::conventions`] and travel with the JSON.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llama5_codegen::manifest::{names, Manifest, Precision, QuantFormat, TensorEntry};
use rayon::prelude::*;
use serde::Serialize;

use crate::backend::{Backend, Logits};
use crate::cpu::CpuBackend;
use crate::error::RuntimeError;
use crate::gpu::{GpuBackend, GpuOptions, MemoryUse};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::synthetic::{synthetic_model, SyntheticShape};
use crate::tiers;

mod kernel_profile;

/// GB as used in every rate: 10^9 bytes.
const GB: f64 = 1e9;
/// Copy-test buffer on a discrete or integrated GPU (capped by the device's buffer limit).
const GPU_COPY_BYTES: u64 = 1 << 30;
/// Copy-test buffer on software adapters and the CPU, which copy far slower.
const SOFTWARE_COPY_BYTES: u64 = 64 << 20;
/// Timed repetitions of the copy test (after one warm-up).
const COPY_REPS: usize = 5;
/// Bytes copied per repetition, split over several copies in one submission so
/// submission overhead does not count.
const COPY_BYTES_PER_REP: u64 = 8 << 30;
const MAX_COPIES_PER_REP: u64 = 16;
/// Timed repetitions of the dispatch floor (after one warm-up).
const FLOOR_REPS: usize = 5;
/// Workgroups of each dispatch of the floor: as many as a small decode kernel
/// starts, about one for each SM of a large GPU.
const FLOOR_WORKGROUPS: u32 = 128;
/// Dispatches of one timed repetition of the floor: a decode call's worth
/// (tokens per call x dispatches per token), at most this many.
const FLOOR_MAX_DISPATCHES: usize = 2048;
/// Bytes of each buffer the floor's dispatches copy: next to nothing.
const FLOOR_BUFFER_BYTES: u64 = 4096;

/// Which backend the benchmark runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BenchBackend {
    /// The wgpu backend; `adapter` is a case-insensitive substring of the adapter's name.
    Gpu {
        adapter: Option<String>,
    },
    Cpu,
}

/// Where the model comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A converted model directory or a directory of precision tiers; `None` takes the highest tier.
    Dir { path: PathBuf, precision: Option<Precision> },
    /// Random weights of a real shape, built in memory.
    Synthetic { shape: SyntheticShape, precision: Precision, seed: u64 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct BenchOptions {
    pub backend: BenchBackend,
    /// Repetitions of the prompt + decode + prefill sequence.
    pub runs: usize,
    /// Prompt tokens prefilled before decoding.
    pub prompt_tokens: usize,
    /// Decode steps timed after the prompt.
    pub gen_tokens: usize,
    /// Tokens of the long prompt whose prefill is timed (from position 0).
    pub prefill_tokens: usize,
    /// Bytes of each buffer of the copy test; `None` picks by device.
    pub copy_bytes: Option<u64>,
    /// Also time each kernel of a decode step and of the prefill with timestamp queries.
    pub profile: bool,
    /// Decode by sampling at this temperature (no top-k or top-p); 0 is greedy.
    pub temperature: f32,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            backend: BenchBackend::Gpu { adapter: None },
            runs: 3,
            prompt_tokens: 32,
            gen_tokens: 100,
            prefill_tokens: 512,
            copy_bytes: None,
            profile: false,
            temperature: 0.0,
        }
    }
}

/// Everything `llama5 bench` reports; serialised as its `--json` output.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: ModelSummary,
    pub backend: BackendSummary,
    pub settings: Settings,
    /// The bandwidth yardstick: the faster of the device's copies (each timed
    /// before and after decode, the faster run kept).
    pub copy: CopyBandwidth,
    /// The other copies measured.
    pub other_copies: Vec<CopyBandwidth>,
    /// The fixed cost of a dependent dispatch (GPU only).
    pub dispatch_floor: Option<DispatchFloor>,
    pub time_to_first_token: FirstToken,
    pub decode: Decode,
    pub prefill: Prefill,
    pub traffic: Traffic,
    pub memory: MemoryReport,
    /// GPU time per kernel (`--profile`): a decode step and the prefill.
    pub profile: Option<Vec<kernel_profile::StepProfile>>,
    /// How each figure is computed.
    pub conventions: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    /// The model directory, or `synthetic:<shape>`.
    pub source: String,
    pub synthetic: bool,
    pub name: Option<String>,
    /// The manifest's precision tier (`int4`, `f16`, ..., `mixed`).
    pub precision: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    /// Weights of the matrices a token multiplies by: every layer matrix and the LM head.
    pub matmul_params: u64,
    /// Bytes of every tensor as stored (data and scales).
    pub weight_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendSummary {
    /// `gpu` or `cpu`.
    pub kind: String,
    /// Adapter name, or the CPU thread count.
    pub device: String,
    pub details: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `Cpu` (software adapters), ... for the GPU backend.
    pub device_type: Option<String>,
    pub driver: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub runs: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub prefill_tokens: usize,
    /// KV-cache positions the backend was built with.
    pub ctx: usize,
    /// Decode sampling temperature; 0 is greedy.
    pub temperature: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct CopyBandwidth {
    /// Size of the source (and destination) buffer.
    pub buffer_bytes: u64,
    /// Copies per timed repetition.
    pub copies_per_rep: u64,
    pub reps: usize,
    /// Median over the repetitions, counting read + write (2 x buffer bytes per copy).
    pub gb_per_s: f64,
    pub min_gb_per_s: f64,
    pub max_gb_per_s: f64,
    /// `device buffer-to-buffer copy` or `parallel memcpy`.
    pub method: String,
}

/// What a dispatch costs that does next to nothing but wait for the one
/// before: the part of a decode step's time no kernel can win back while the
/// step takes that many dispatches.
#[derive(Clone, Debug, Serialize)]
pub struct DispatchFloor {
    /// Dispatches of a decode step (the plan's).
    pub dispatches_per_token: usize,
    /// Workgroups of each timed dispatch.
    pub workgroups: u32,
    /// Dispatches of one timed repetition, in one compute pass.
    pub dispatches_per_rep: usize,
    pub reps: usize,
    /// Median over the repetitions of wall time per dispatch.
    pub us_per_dispatch: f64,
    /// us_per_dispatch x dispatches_per_token.
    pub ms_per_token: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FirstToken {
    /// Building synthetic weights in host memory (not part of the time to first token).
    pub host_build_ms: Option<f64>,
    /// Opening the model directory (manifest and shard maps); 0 for synthetic models.
    pub open_ms: f64,
    /// Creating the backend: for the GPU, upload and pipeline creation.
    pub backend_ms: f64,
    pub upload_ms: Option<f64>,
    pub pipeline_ms: Option<f64>,
    /// Prefill of the prompt up to the first sampled token (the first run's).
    pub prompt_ms: f64,
    /// open + backend + prompt.
    pub ttft_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Decode {
    /// Per-token statistics over every decode step of every run.
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub tokens_per_s: f64,
    /// The median of each run.
    pub run_median_ms: Vec<f64>,
    /// Whether the next token is chosen on the device (only 4 bytes read back).
    pub argmax_on_device: bool,
    /// Decode steps of one timed call (each step's time is its call's share).
    pub tokens_per_call: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Prefill {
    pub tokens: usize,
    /// Median over the runs.
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub tokens_per_s: f64,
    /// 2 x matmul weights x tokens (LM head for the last token only) per second, at the median.
    pub matmul_tflops: f64,
    /// As above plus causal attention (4 x heads x head_dim per attended position).
    pub total_tflops: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Traffic {
    /// Weight bytes a decoded token reads: every layer matrix and norm, one embedding row, the whole LM head.
    pub weight_bytes_per_token: u64,
    /// KV-cache bytes read at the mean context of the decode steps.
    pub kv_bytes_per_token: u64,
    /// Positions attended, averaged over the decode steps.
    pub mean_context: f64,
    pub bytes_per_token: u64,
    /// bytes_per_token / median decode time.
    pub effective_gb_per_s: f64,
    /// effective_gb_per_s as a percentage of the copy bandwidth.
    pub copy_share_percent: f64,
    /// The fastest decode the dispatch floor allows: bytes per token at the
    /// copy bandwidth, plus the floor (GPU only).
    pub ceiling_ms_per_token: Option<f64>,
    /// The copy share at that ceiling: the most a decode step of this many
    /// dispatches can reach on this device.
    pub ceiling_share_percent: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    /// Whether the figures are the backend's own allocation counts (GPU) or computed (CPU).
    pub counted: bool,
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    /// Activations, staging and readback buffers.
    pub other_bytes: u64,
    pub total_bytes: u64,
    /// What the model's tensors take as stored.
    pub model_weight_bytes: u64,
    /// What a KV cache of `ctx` positions takes at the backend's element size.
    pub expected_kv_cache_bytes: u64,
}

/// What one backend offers the measurements.
trait Subject {
    /// Runs `tokens` from `pos` and returns the greedy next token.
    fn next_token(&mut self, tokens: &[u32], pos: usize) -> Result<u32, RuntimeError>;
    /// `k` decode steps from token `first` at `pos`, each feeding the previous
    /// choice: greedy, or drawn by `sampler`.
    fn decode(
        &mut self,
        first: u32,
        pos: usize,
        k: usize,
        sampler: Option<&mut Sampler>,
    ) -> Result<Vec<u32>, RuntimeError>;
    /// Steps the decode measurement gives one call of [`Subject::decode`].
    fn tokens_per_call(&self) -> usize;
}

/// Decode steps the GPU takes per call (recorded and submitted as it goes).
const GPU_DECODE_CALL: usize = 32;

impl Subject for GpuBackend {
    fn next_token(&mut self, tokens: &[u32], pos: usize) -> Result<u32, RuntimeError> {
        self.forward_argmax(tokens, pos)
    }
    fn decode(
        &mut self,
        first: u32,
        pos: usize,
        k: usize,
        sampler: Option<&mut Sampler>,
    ) -> Result<Vec<u32>, RuntimeError> {
        match sampler {
            None => self.generate_greedy(first, pos, k),
            Some(s) => {
                let draws = s.preview(k);
                s.skip(k);
                self.generate_sampled(first, pos, s.params(), &draws)
            }
        }
    }
    fn tokens_per_call(&self) -> usize {
        GPU_DECODE_CALL
    }
}

impl Subject for CpuBackend<'_> {
    fn next_token(&mut self, tokens: &[u32], pos: usize) -> Result<u32, RuntimeError> {
        let logits = self.forward(tokens, pos, Logits::Last)?;
        Ok(argmax(&logits))
    }
    fn decode(
        &mut self,
        first: u32,
        pos: usize,
        k: usize,
        mut sampler: Option<&mut Sampler>,
    ) -> Result<Vec<u32>, RuntimeError> {
        let mut out = Vec::with_capacity(k);
        let mut next = first;
        for i in 0..k {
            let logits = self.forward(&[next], pos + i, Logits::Last)?;
            next = match sampler.as_deref_mut() {
                None => argmax(&logits),
                Some(s) => s.sample(&logits),
            };
            out.push(next);
        }
        Ok(out)
    }
    fn tokens_per_call(&self) -> usize {
        1
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Timings of the runs, before any statistics.
struct Samples {
    prompt_ms: Vec<f64>,
    decode_ms: Vec<Vec<f64>>,
    prefill_ms: Vec<f64>,
}

/// Deterministic token ids spread over the vocabulary (values do not change the work done).
fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab) as u32).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Each run: the prompt from position 0 (its first token), `gen_tokens` single-token
/// steps fed back greedily, then the long prompt from position 0.
fn measure(subject: &mut dyn Subject, opts: &BenchOptions, vocab: usize) -> Result<Samples, RuntimeError> {
    let mut s = Samples { prompt_ms: Vec::new(), decode_ms: Vec::new(), prefill_ms: Vec::new() };
    for run in 0..opts.runs {
        let prompt = tokens(opts.prompt_tokens, vocab, run);
        let t0 = Instant::now();
        let mut next = subject.next_token(&prompt, 0)?;
        s.prompt_ms.push(ms(t0.elapsed()));
        let mut steps = Vec::with_capacity(opts.gen_tokens);
        let mut sampler = (opts.temperature > 0.0)
            .then(|| {
                Sampler::new(SamplingParams {
                    temperature: opts.temperature,
                    top_k: None,
                    top_p: None,
                    seed: run as u64,
                })
            })
            .transpose()?;
        while steps.len() < opts.gen_tokens {
            let k = (opts.gen_tokens - steps.len()).min(subject.tokens_per_call());
            let t = Instant::now();
            let chosen = subject.decode(next, opts.prompt_tokens + steps.len(), k, sampler.as_mut())?;
            let each = ms(t.elapsed()) / k as f64;
            next = *chosen.last().ok_or_else(|| RuntimeError::Other("decoding returned no token".into()))?;
            steps.extend(std::iter::repeat_n(each, k));
        }
        s.decode_ms.push(steps);
        let long = tokens(opts.prefill_tokens, vocab, run + 1);
        let t = Instant::now();
        subject.next_token(&long, 0)?;
        s.prefill_ms.push(ms(t.elapsed()));
    }
    Ok(s)
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1); the median averages the middle pair.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    if q == 0.5 {
        let n = sorted.len();
        return if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn median(v: &[f64]) -> f64 {
    percentile(&sorted(v), 0.5)
}

/// Bytes of one part's data and scales.
fn part_bytes(t: &TensorEntry) -> u64 {
    t.parts.iter().map(|p| p.data.bytes + p.scales.map_or(0, |s| s.bytes)).sum()
}

/// Bytes of one output channel of a matrix (one token's embedding row): its
/// values at the format's width plus the scales it needs.
fn row_bytes(format: QuantFormat, in_features: usize) -> u64 {
    let n = in_features as u64;
    match format {
        QuantFormat::F32 => n * 4,
        QuantFormat::F16 | QuantFormat::Bf16 => n * 2,
        QuantFormat::Int8 { .. } => n + 4,
        QuantFormat::Int4 { group_size, .. } => n / 2 + n / group_size as u64 * 4,
    }
}

/// Weight bytes one decoded token reads.
fn weight_bytes_per_token(m: &Manifest) -> Result<u64, RuntimeError> {
    let cfg = &m.model;
    let mut bytes = 0;
    for l in 0..cfg.num_layers {
        for (suffix, _) in names::LAYER_TENSORS {
            bytes += part_bytes(m.layer_tensor(l, suffix)?);
        }
    }
    bytes += part_bytes(m.tensor(names::FINAL_NORM)?);
    let embed = m.tensor(names::EMBED)?;
    bytes += row_bytes(embed.format, embed.in_features());
    bytes += part_bytes(m.tensor(cfg.lm_head_name())?);
    Ok(bytes)
}

/// Weights of every layer matrix, and of the LM head.
fn matmul_params(m: &Manifest) -> (u64, u64) {
    let c = &m.model;
    let (h, q, kv, f) = (c.hidden_size as u64, c.q_dim() as u64, c.kv_dim() as u64, c.intermediate_size as u64);
    let layer = h * q + 2 * h * kv + q * h + 3 * h * f;
    (layer * c.num_layers as u64, c.vocab_size as u64 * h)
}

/// FLOPs of a prefill of `t` tokens from position 0 with logits for the last
/// token: (matmuls, attention).
fn prefill_flops(m: &Manifest, t: usize) -> (f64, f64) {
    let c = &m.model;
    let (layers, head) = matmul_params(m);
    let matmul = 2.0 * layers as f64 * t as f64 + 2.0 * head as f64;
    let positions = t as f64 * (t as f64 + 1.0) / 2.0;
    let attention = 4.0 * (c.num_layers * c.num_heads * c.head_dim) as f64 * positions;
    (matmul, attention)
}

/// How the device copies in [`gpu_copy_bandwidth`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GpuCopy {
    /// `copy_buffer_to_buffer`.
    Api,
    /// A compute shader's loads and stores ([`llama5_codegen::copy_kernel`]).
    Shader,
}

/// Copies `size`-byte buffers on the device; GB/s count read + write.
fn gpu_copy_bandwidth(gpu: &GpuBackend, requested: Option<u64>, how: GpuCopy) -> Result<CopyBandwidth, RuntimeError> {
    let device = gpu.device();
    let limits = gpu.limits();
    let mut limit = limits.max_buffer_size;
    if how == GpuCopy::Shader {
        limit = limit.min(limits.max_storage_buffer_binding_size);
    }
    let default = match gpu.adapter_info().device_type {
        wgpu::DeviceType::Cpu => SOFTWARE_COPY_BYTES,
        _ => GPU_COPY_BYTES.min(limit / 2),
    };
    let size = requested.unwrap_or(default).min(limit) / 16 * 16;
    if size == 0 {
        return Err(RuntimeError::Other("the copy test needs a buffer of at least 16 bytes".into()));
    }
    let copies = (COPY_BYTES_PER_REP / size).clamp(1, MAX_COPIES_PER_REP);
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let usage = match how {
        GpuCopy::Api => wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        GpuCopy::Shader => wgpu::BufferUsages::STORAGE,
    };
    let (src, dst) = (buffer(device, "copy source", size, usage), buffer(device, "copy destination", size, usage));
    let shader = (how == GpuCopy::Shader).then(|| {
        let kernel = CopyKernel::new(gpu);
        let bind_group = kernel.bind(device, &src, &dst);
        (kernel.pipeline, bind_group)
    });
    let rep = |n: u64| -> Result<f64, RuntimeError> {
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("copy") });
        match &shader {
            None => {
                for _ in 0..n {
                    encoder.copy_buffer_to_buffer(&src, 0, &dst, 0, size);
                }
            }
            Some((pipeline, bind_group)) => {
                let mut pass = encoder
                    .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("copy"), timestamp_writes: None });
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, bind_group, &[]);
                let [x, y, z] = llama5_codegen::copy_dispatch(size);
                for _ in 0..n {
                    pass.dispatch_workgroups(x, y, z);
                }
            }
        }
        let elapsed = submit_timed(gpu, encoder, "copy test")?;
        Ok(2.0 * (size * n) as f64 / elapsed.as_secs_f64() / GB)
    };
    // the warm-up also clears the buffers wgpu zero-initialises lazily
    let warm = rep(1);
    let validation_error = pollster::block_on(validation.pop());
    let oom_error = pollster::block_on(oom.pop());
    if oom_error.is_some() {
        return Err(RuntimeError::OutOfMemory(format!("copy test buffers of {size} bytes")));
    }
    if let Some(e) = validation_error {
        return Err(RuntimeError::Gpu(format!("copy test: {e}")));
    }
    warm?;
    let rates = (0..COPY_REPS).map(|_| rep(copies)).collect::<Result<Vec<_>, _>>()?;
    let method = match how {
        GpuCopy::Api => "device buffer-to-buffer copy",
        GpuCopy::Shader => "compute shader copy (16-byte loads and stores)",
    };
    Ok(copy_stats(size, copies, &rates, method))
}

/// Times chains of `per_token x tokens` dispatches (at most
/// [`FLOOR_MAX_DISPATCHES`]) of the copy kernel on two tiny buffers, in one
/// compute pass: each reads what the one before wrote, so each waits on a
/// barrier, as a decode step's dispatches do.
fn gpu_dispatch_floor(gpu: &GpuBackend, per_token: usize, tokens: usize) -> Result<DispatchFloor, RuntimeError> {
    let device = gpu.device();
    let kernel = CopyKernel::new(gpu);
    let [a, b] = ["floor a", "floor b"].map(|l| buffer(device, l, FLOOR_BUFFER_BYTES, wgpu::BufferUsages::STORAGE));
    let groups = [kernel.bind(device, &a, &b), kernel.bind(device, &b, &a)];
    let n = (per_token * tokens).clamp(1, FLOOR_MAX_DISPATCHES);
    let rep = || -> Result<f64, RuntimeError> {
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("floor") });
        {
            let mut pass = encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("floor"), timestamp_writes: None });
            pass.set_pipeline(&kernel.pipeline);
            for i in 0..n {
                pass.set_bind_group(0, &groups[i % 2], &[]);
                pass.dispatch_workgroups(FLOOR_WORKGROUPS, 1, 1);
            }
        }
        Ok(submit_timed(gpu, encoder, "dispatch floor")?.as_secs_f64() * 1e6 / n as f64)
    };
    rep()?;
    let us = (0..FLOOR_REPS).map(|_| rep()).collect::<Result<Vec<_>, _>>()?;
    let us_per_dispatch = median(&us);
    Ok(DispatchFloor {
        dispatches_per_token: per_token,
        workgroups: FLOOR_WORKGROUPS,
        dispatches_per_rep: n,
        reps: FLOOR_REPS,
        us_per_dispatch,
        ms_per_token: us_per_dispatch * per_token as f64 / 1e3,
    })
}

/// The copy kernel ([`llama5_codegen::copy_kernel`]) built for the device,
/// with its step uniform (which it does not read): the copy test's shader and
/// the dispatch floor's.
struct CopyKernel {
    name: String,
    layout: wgpu::BindGroupLayout,
    pipeline: wgpu::ComputePipeline,
    step: wgpu::Buffer,
}

impl CopyKernel {
    fn new(gpu: &GpuBackend) -> CopyKernel {
        let kernel = llama5_codegen::copy_kernel(gpu.target());
        let (layout, pipeline) = crate::gpu::create_pipeline(gpu.device(), &kernel, None);
        let size = llama5_codegen::StepUniform::SIZE as u64;
        let step = buffer(gpu.device(), "copy step", size, wgpu::BufferUsages::UNIFORM);
        CopyKernel { name: kernel.name, layout, pipeline, step }
    }

    /// Bindings that copy `src` into `dst`.
    fn bind(&self, device: &wgpu::Device, src: &wgpu::Buffer, dst: &wgpu::Buffer) -> wgpu::BindGroup {
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.name),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: self.step.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: src.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 2, resource: dst.as_entire_binding() },
            ],
        })
    }
}

/// A buffer of the bench's own measurements.
fn buffer(device: &wgpu::Device, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: false })
}

/// Submits `encoder` and waits for the device: the wall time from submission
/// to completion.
fn submit_timed(gpu: &GpuBackend, encoder: wgpu::CommandEncoder, what: &str) -> Result<Duration, RuntimeError> {
    let t = Instant::now();
    gpu.queue().submit([encoder.finish()]);
    gpu.device()
        .poll(wgpu::PollType::Wait { submission_index: None, timeout: Some(Duration::from_secs(120)) })
        .map_err(|e| RuntimeError::Gpu(format!("{what}: waiting for the device: {e}")))?;
    Ok(t.elapsed())
}

/// Copies a `size`-byte host buffer with every rayon thread.
fn cpu_copy_bandwidth(requested: Option<u64>) -> CopyBandwidth {
    let size = requested.unwrap_or(4 * SOFTWARE_COPY_BYTES).max(8) as usize;
    let copies = (COPY_BYTES_PER_REP / size as u64).clamp(1, MAX_COPIES_PER_REP);
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    let chunk = (size / (4 * rayon::current_num_threads())).clamp(1, 4 << 20);
    let mut rep = |n: u64| {
        let t = Instant::now();
        for _ in 0..n {
            dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        }
        2.0 * (size as u64 * n) as f64 / t.elapsed().as_secs_f64() / GB
    };
    rep(1);
    let rates: Vec<f64> = (0..COPY_REPS).map(|_| rep(copies)).collect();
    std::hint::black_box(&dst);
    copy_stats(size as u64, copies, &rates, "parallel memcpy")
}

/// The run of the same copy test with the higher median.
fn faster(a: CopyBandwidth, b: CopyBandwidth) -> CopyBandwidth {
    if b.gb_per_s > a.gb_per_s {
        b
    } else {
        a
    }
}

fn copy_stats(size: u64, copies: u64, rates: &[f64], method: &str) -> CopyBandwidth {
    let s = sorted(rates);
    CopyBandwidth {
        buffer_bytes: size,
        copies_per_rep: copies,
        reps: rates.len(),
        gb_per_s: percentile(&s, 0.5),
        min_gb_per_s: s[0],
        max_gb_per_s: s[s.len() - 1],
        method: method.into(),
    }
}

/// Loads the model and measures it on the chosen backend.
pub fn run(source: &ModelSource, opts: &BenchOptions) -> Result<BenchReport, RuntimeError> {
    for (flag, n) in [
        ("runs", opts.runs),
        ("prompt tokens", opts.prompt_tokens),
        ("gen tokens", opts.gen_tokens),
        ("prefill tokens", opts.prefill_tokens),
    ] {
        if n == 0 {
            return Err(RuntimeError::Other(format!("bench needs at least one of {flag}")));
        }
    }
    if opts.profile && opts.backend == BenchBackend::Cpu {
        return Err(RuntimeError::Other("--profile times GPU kernels; the CPU backend has none".into()));
    }
    let mut host_build_ms = None;
    let mut open_ms = 0.0;
    let (model, label) = match source {
        ModelSource::Dir { path, precision } => {
            let tier = tiers::select(&tiers::discover(path)?, *precision)?
                .into_iter()
                .next()
                .ok_or_else(|| RuntimeError::Model(format!("no model under {}", path.display())))?;
            let t = Instant::now();
            let model = Model::open(&tier.dir, false)?;
            open_ms = ms(t.elapsed());
            (model, tier.dir.display().to_string())
        }
        ModelSource::Synthetic { shape, precision, seed } => {
            let t = Instant::now();
            let model = synthetic_model(shape.clone(), *precision, *seed)?;
            host_build_ms = Some(ms(t.elapsed()));
            (model, format!("synthetic:{}", shape.name()))
        }
    };
    let cfg = model.manifest.model.clone();
    let ctx = opts.prefill_tokens.max(opts.prompt_tokens + opts.gen_tokens);
    if ctx > cfg.max_position_embeddings {
        return Err(RuntimeError::Other(format!(
            "bench needs {ctx} positions; the model allows {} (use fewer prompt, gen or prefill tokens)",
            cfg.max_position_embeddings
        )));
    }

    let t = Instant::now();
    let measured = match &opts.backend {
        BenchBackend::Gpu { adapter } => {
            let gpu_opts = GpuOptions { adapter: adapter.clone(), ctx, pipeline_cache_dir: None };
            let mut gpu = GpuBackend::new(&model, &gpu_opts)?;
            let backend_ms = ms(t.elapsed());
            let api = gpu_copy_bandwidth(&gpu, opts.copy_bytes, GpuCopy::Api)?;
            let shader = gpu_copy_bandwidth(&gpu, opts.copy_bytes, GpuCopy::Shader)?;
            let samples = measure(&mut gpu, opts, cfg.vocab_size)?;
            // each copy again after decode, the faster run kept: right after a load the
            // H100 copied at 1897 GB/s in all five repetitions, 2889 in the next process
            let api = faster(api, gpu_copy_bandwidth(&gpu, opts.copy_bytes, GpuCopy::Api)?);
            let shader = faster(shader, gpu_copy_bandwidth(&gpu, opts.copy_bytes, GpuCopy::Shader)?);
            // the faster of the two is the yardstick
            let (copy, other) = if shader.gb_per_s >= api.gb_per_s { (shader, api) } else { (api, shader) };
            let floor = gpu_dispatch_floor(&gpu, gpu.plan().dispatches_per_token(), gpu.tokens_per_call())?;
            let profile =
                if opts.profile { Some(kernel_profile::profile(&mut gpu, &model.manifest, opts)?) } else { None };
            let info = gpu.info();
            let adapter = gpu.adapter_info();
            let kv_elem = llama5_codegen::tcal::kv_bytes_per_element(gpu.target());
            Measured {
                backend: BackendSummary {
                    kind: info.kind.into(),
                    device: info.device,
                    details: info.details,
                    device_type: Some(format!("{:?}", adapter.device_type)),
                    driver: Some(format!("{} {}", adapter.driver, adapter.driver_info).trim().to_string()),
                },
                backend_ms,
                upload_ms: Some(gpu.load_times().upload_ms),
                pipeline_ms: Some(gpu.load_times().pipeline_ms),
                copy,
                other_copies: vec![other],
                dispatch_floor: Some(floor),
                samples,
                profile,
                kv_elem,
                memory: gpu.memory_use(),
                memory_counted: true,
                argmax_on_device: true,
                tokens_per_call: gpu.tokens_per_call(),
            }
        }
        BenchBackend::Cpu => {
            let mut cpu = CpuBackend::new(&model, ctx)?;
            let backend_ms = ms(t.elapsed());
            let copy = cpu_copy_bandwidth(opts.copy_bytes);
            let samples = measure(&mut cpu, opts, cfg.vocab_size)?;
            let info = cpu.info();
            // weights stay packed in the shards; the cache is f32
            let weights: u64 = (0..model.manifest.shards.len()).map(|i| model.shard(i).len() as u64).sum();
            let kv_cache = 2 * (cfg.num_layers * ctx * cfg.kv_dim() * 4) as u64;
            Measured {
                backend: BackendSummary {
                    kind: info.kind.into(),
                    device: info.device,
                    details: info.details,
                    device_type: None,
                    driver: None,
                },
                backend_ms,
                upload_ms: None,
                pipeline_ms: None,
                copy,
                other_copies: Vec::new(),
                dispatch_floor: None,
                samples,
                profile: None,
                kv_elem: 4,
                memory: MemoryUse { weights, kv_cache, other: 0 },
                memory_counted: false,
                argmax_on_device: false,
                tokens_per_call: cpu.tokens_per_call(),
            }
        }
    };
    Ok(report(&model, label, source, opts, ctx, host_build_ms, open_ms, measured))
}

/// What one backend's measurement produced.
struct Measured {
    backend: BackendSummary,
    backend_ms: f64,
    upload_ms: Option<f64>,
    pipeline_ms: Option<f64>,
    copy: CopyBandwidth,
    other_copies: Vec<CopyBandwidth>,
    dispatch_floor: Option<DispatchFloor>,
    samples: Samples,
    profile: Option<Vec<kernel_profile::StepProfile>>,
    /// Bytes per KV-cache element.
    kv_elem: u64,
    memory: MemoryUse,
    /// Whether `memory` is the backend's own count of its buffers (else computed).
    memory_counted: bool,
    argmax_on_device: bool,
    tokens_per_call: usize,
}

#[allow(clippy::too_many_arguments)]
fn report(
    model: &Model,
    label: String,
    source: &ModelSource,
    opts: &BenchOptions,
    ctx: usize,
    host_build_ms: Option<f64>,
    open_ms: f64,
    m: Measured,
) -> BenchReport {
    let manifest = &model.manifest;
    let cfg = &manifest.model;
    let (layer_params, head_params) = matmul_params(manifest);
    let model_weight_bytes: u64 = manifest.tensors.values().map(part_bytes).sum();

    let all_steps: Vec<f64> = m.samples.decode_ms.iter().flatten().copied().collect();
    let steps = sorted(&all_steps);
    let decode_median = percentile(&steps, 0.5);
    let decode = Decode {
        median_ms: decode_median,
        p10_ms: percentile(&steps, 0.1),
        p90_ms: percentile(&steps, 0.9),
        min_ms: steps[0],
        max_ms: steps[steps.len() - 1],
        tokens_per_s: 1e3 / decode_median,
        run_median_ms: m.samples.decode_ms.iter().map(|r| median(r)).collect(),
        argmax_on_device: m.argmax_on_device,
        tokens_per_call: m.tokens_per_call,
    };

    let prefill_sorted = sorted(&m.samples.prefill_ms);
    let prefill_median = percentile(&prefill_sorted, 0.5);
    let (matmul_flops, attention_flops) = prefill_flops(manifest, opts.prefill_tokens);
    let secs = prefill_median / 1e3;
    let prefill = Prefill {
        tokens: opts.prefill_tokens,
        median_ms: prefill_median,
        min_ms: prefill_sorted[0],
        max_ms: prefill_sorted[prefill_sorted.len() - 1],
        tokens_per_s: opts.prefill_tokens as f64 / secs,
        matmul_tflops: matmul_flops / secs / 1e12,
        total_tflops: (matmul_flops + attention_flops) / secs / 1e12,
    };

    // decode step i runs at position prompt + i and attends prompt + i + 1 positions
    let mean_context = opts.prompt_tokens as f64 + (opts.gen_tokens as f64 + 1.0) / 2.0;
    let weight_bytes = weight_bytes_per_token(manifest).unwrap_or(model_weight_bytes);
    let kv_row = 2 * (cfg.num_layers * cfg.kv_dim()) as u64 * m.kv_elem;
    let kv_bytes = (kv_row as f64 * mean_context).round() as u64;
    let bytes_per_token = weight_bytes + kv_bytes;
    let effective = bytes_per_token as f64 / (decode_median / 1e3) / GB;
    // GB/s are bytes per ns: bytes / (GB/s) / 1e6 is ms
    let at_copy_ms = bytes_per_token as f64 / m.copy.gb_per_s / 1e6;
    let ceiling_ms = m.dispatch_floor.as_ref().map(|f| at_copy_ms + f.ms_per_token);
    let traffic = Traffic {
        weight_bytes_per_token: weight_bytes,
        kv_bytes_per_token: kv_bytes,
        mean_context,
        bytes_per_token,
        effective_gb_per_s: effective,
        copy_share_percent: 100.0 * effective / m.copy.gb_per_s,
        ceiling_ms_per_token: ceiling_ms,
        ceiling_share_percent: ceiling_ms.map(|c| 100.0 * at_copy_ms / c),
    };

    let memory = MemoryReport {
        counted: m.memory_counted,
        weights_bytes: m.memory.weights,
        kv_cache_bytes: m.memory.kv_cache,
        other_bytes: m.memory.other,
        total_bytes: m.memory.total(),
        model_weight_bytes,
        expected_kv_cache_bytes: kv_row * ctx as u64,
    };

    let prompt_ms = m.samples.prompt_ms[0];
    let time_to_first_token = FirstToken {
        host_build_ms,
        open_ms,
        backend_ms: m.backend_ms,
        upload_ms: m.upload_ms,
        pipeline_ms: m.pipeline_ms,
        prompt_ms,
        ttft_ms: open_ms + m.backend_ms + prompt_ms,
    };

    BenchReport {
        model: ModelSummary {
            source: label,
            synthetic: matches!(source, ModelSource::Synthetic { .. }),
            name: cfg.name.clone(),
            precision: serde_json::to_value(manifest.precision)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            layers: cfg.num_layers,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            tied_embeddings: cfg.tie_word_embeddings,
            matmul_params: layer_params + head_params,
            weight_bytes: model_weight_bytes,
        },
        backend: m.backend,
        settings: Settings {
            runs: opts.runs,
            prompt_tokens: opts.prompt_tokens,
            gen_tokens: opts.gen_tokens,
            prefill_tokens: opts.prefill_tokens,
            ctx,
            temperature: opts.temperature,
        },
        copy: m.copy,
        other_copies: m.other_copies,
        dispatch_floor: m.dispatch_floor,
        time_to_first_token,
        decode,
        prefill,
        traffic,
        memory,
        profile: m.profile,
        conventions: conventions(),
    }
}

fn conventions() -> Vec<String> {
    [
        "GB = 1e9 bytes; rates are medians unless named min / max / p10 / p90",
        "copy bandwidth counts read + write: 2 x buffer bytes per copy, several copies per submission, wall time to a blocking wait; on a GPU both the API's buffer copy (which a driver may run on a slower copy engine) and a compute-shader copy run, and the faster is the yardstick",
        "decode: wall time per single-token forward step including the choice of the next token (greedy, or sampled at the settings' temperature), after a prefilled prompt; a call of several steps (tokens per call; a GPU submits them to its queue a few at a time as it records them) counts its time evenly over its steps",
        "prefill: one forward over prefill_tokens from position 0, up to the first sampled token",
        "time to first token: open (directory models) + backend creation (upload, pipelines) + prompt prefill; synthetic weights are built in host memory first, which is not counted",
        "bytes per token: stored bytes of every layer matrix (data and scales) and norm, one embedding row, the whole LM head, plus K and V of every layer at the mean decode context; activations are not counted",
        "effective bandwidth: bytes per token / median decode time; share: that over the copy bandwidth",
        "dispatch floor (GPU): wall time per dispatch of chains of near-empty dispatches in one compute pass, each reading what the one before wrote; decode ceiling: bytes per token at the copy bandwidth plus the floor times a decode step's dispatches",
        "prefill TFLOP/s: matmul = 2 x layer weights x tokens + 2 x LM head weights (last token only); total adds 4 x heads x head_dim per attended position and layer",
        "memory: GPU figures are the sizes of the buffers the backend allocated (the copy-test buffers excluded); CPU figures are the shard bytes and an f32 KV cache",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

impl BenchReport {
    /// A human-readable table of every figure.
    pub fn to_table(&self) -> String {
        let m = &self.model;
        let b = &self.backend;
        let s = &self.settings;
        let c = &self.copy;
        let f = &self.time_to_first_token;
        let d = &self.decode;
        let p = &self.prefill;
        let t = &self.traffic;
        let mem = &self.memory;
        let mut rows: Vec<(String, String)> = vec![
            ("model".into(), format!("{} ({}, {})", m.source, m.name.as_deref().unwrap_or("unnamed"), m.precision)),
            (
                "shape".into(),
                format!(
                    "{} layers, hidden {}, ffn {}, {}/{} heads of {}, vocab {}{}",
                    m.layers,
                    m.hidden_size,
                    m.intermediate_size,
                    m.heads,
                    m.kv_heads,
                    m.head_dim,
                    m.vocab_size,
                    if m.tied_embeddings { ", tied" } else { "" }
                ),
            ),
            ("backend".into(), format!("{} {} ({})", b.kind, b.device, b.details)),
            (
                "settings".into(),
                format!(
                    "{} runs, prompt {}, decode {}, prefill {}, ctx {}",
                    s.runs, s.prompt_tokens, s.gen_tokens, s.prefill_tokens, s.ctx
                ),
            ),
            (
                "copy bandwidth".into(),
                format!(
                    "{:.1} GB/s read+write ({:.1}..{:.1}; {} x {} per rep, {})",
                    c.gb_per_s,
                    c.min_gb_per_s,
                    c.max_gb_per_s,
                    c.copies_per_rep,
                    mib(c.buffer_bytes),
                    c.method
                ),
            ),
        ];
        for o in &self.other_copies {
            rows.push(("other copy".into(), format!("{:.1} GB/s read+write ({})", o.gb_per_s, o.method)));
        }
        if let Some(fl) = &self.dispatch_floor {
            rows.push((
                "dispatch floor".into(),
                format!(
                    "{:.2} us a dependent dispatch ({} of {} workgroups in one pass): {:.3} ms for a token's {}",
                    fl.us_per_dispatch, fl.dispatches_per_rep, fl.workgroups, fl.ms_per_token, fl.dispatches_per_token
                ),
            ));
        }
        let mut ttft = format!("{:.1} ms (open {:.1} + backend {:.1}", f.ttft_ms, f.open_ms, f.backend_ms);
        if let (Some(u), Some(pl)) = (f.upload_ms, f.pipeline_ms) {
            ttft += &format!(" [upload {u:.1}, pipelines {pl:.1}]");
        }
        ttft += &format!(" + prompt {:.1})", f.prompt_ms);
        if let Some(h) = f.host_build_ms {
            ttft += &format!("; synthetic weights built in {h:.0} ms");
        }
        rows.push(("time to first token".into(), ttft));
        rows.push((
            "decode".into(),
            format!(
                "{:.2} ms/token, {:.1} tok/s (p10 {:.2}, p90 {:.2}, min {:.2}, max {:.2}; {} per call)",
                d.median_ms, d.tokens_per_s, d.p10_ms, d.p90_ms, d.min_ms, d.max_ms, d.tokens_per_call
            ),
        ));
        rows.push((
            "prefill".into(),
            format!(
                "{} tokens in {:.1} ms: {:.1} tok/s, {:.3} TFLOP/s matmul, {:.3} with attention",
                p.tokens, p.median_ms, p.tokens_per_s, p.matmul_tflops, p.total_tflops
            ),
        ));
        rows.push((
            "bytes per token".into(),
            format!(
                "{} (weights {} + KV {} at mean context {:.1})",
                mib(t.bytes_per_token),
                mib(t.weight_bytes_per_token),
                mib(t.kv_bytes_per_token),
                t.mean_context
            ),
        ));
        rows.push((
            "effective bandwidth".into(),
            format!("{:.2} GB/s, {:.1}% of copy bandwidth", t.effective_gb_per_s, t.copy_share_percent),
        ));
        if let (Some(ms), Some(share)) = (t.ceiling_ms_per_token, t.ceiling_share_percent) {
            rows.push((
                "decode ceiling".into(),
                format!("{ms:.3} ms/token, {share:.1}% of copy bandwidth (bytes at copy bandwidth + dispatch floor)"),
            ));
        }
        rows.push((
            "memory".into(),
            format!(
                "{} {} (weights {}, KV cache {}, other {}); model weights {}, KV cache of ctx {}",
                mib(mem.total_bytes),
                if mem.counted { "allocated" } else { "computed" },
                mib(mem.weights_bytes),
                mib(mem.kv_cache_bytes),
                mib(mem.other_bytes),
                mib(mem.model_weight_bytes),
                mib(mem.expected_kv_cache_bytes)
            ),
        ));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut text: String = rows.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect();
        if let Some(profile) = &self.profile {
            text += &kernel_profile::table(profile);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank_and_a_true_median() {
        let v = sorted(&[5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        assert_eq!(percentile(&v, 0.5), 5.5);
        assert_eq!(percentile(&v, 0.1), 1.0);
        assert_eq!(percentile(&v, 0.9), 9.0);
        assert_eq!(percentile(&[3.0], 0.9), 3.0);
        assert_eq!(median(&[2.0, 1.0, 3.0]), 2.0);
    }

    #[test]
    fn embedding_rows_count_values_and_scales() {
        assert_eq!(row_bytes(QuantFormat::F16, 576), 1152);
        assert_eq!(row_bytes(QuantFormat::Int8 { per_tensor: false }, 576), 580);
        // 288 bytes of nibbles, 18 groups of 32 with one (scale, min) word each
        assert_eq!(row_bytes(QuantFormat::Int4 { group_size: 32, symmetric: false }, 576), 288 + 72);
    }

    #[test]
    fn smollm2_counts_match_its_published_size() {
        let model = synthetic_model(SyntheticShape::SmolLM2_135M, Precision::F16, 0).unwrap();
        let (layers, head) = matmul_params(&model.manifest);
        // 134.5M parameters: the layer matrices, the tied embedding, and the norms
        let norms = (30 * 2 + 1) * 576;
        assert_eq!(layers + head + norms, 134_515_008);
        // f16 decode reads every matrix at 2 bytes, so about twice the matmul weights
        let w = weight_bytes_per_token(&model.manifest).unwrap();
        assert_eq!(w, 2 * (layers + head) + 4 * norms + 2 * 576);
        let (matmul, attention) = prefill_flops(&model.manifest, 1);
        assert_eq!(matmul, 2.0 * (layers + head) as f64);
        assert_eq!(attention, 4.0 * (30 * 9 * 64) as f64);
    }
}

//! The wgpu backend: every weight and the KV cache live on the device, every
//! pipeline and bind group is built at load, and a forward step is one
//! compute pass in one command buffer.
//!
//! The kernels, their binding tables and the dispatch order come from
//! `llama5_codegen::Plan`; this module only resolves each binding to a buffer.

mod device;
mod fit;
pub mod harness;
mod pipeline_cache;
pub mod profile;
mod wait;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;

use llama5_codegen::{
    Access, Activation, Binding, Kernel, Plan, PlanStep, Resource, Rows, Stage, StepUniform, Target,
    MAX_ATTENTION_SPLITS, SUM_SQUARES_PART,
};

use crate::backend::{Backend, BackendInfo, Logits};
use crate::error::RuntimeError;
use crate::model::Model;
use crate::sampling::SamplingParams;
use device::{convert_error, take_error, ErrorScopes, Gpu};
pub use device::{has_coop_config, probe, AdapterProbe, NO_COOP_ENV};
pub use fit::check_fits;

/// Tokens one submission processes at most (prompts are split into chunks of this many):
/// the tiled batch kernels read each weight once per chunk.
pub const MAX_BATCH: usize = 512;

/// Logits rows one submission computes at most (a step wanting every row's logits
/// runs in chunks of this many tokens); sizes the logits buffer.
pub const MAX_LOGIT_ROWS: usize = 64;

/// Tokens (or logits rows) from which a step runs its batch kernel, where it has
/// one: below it, the matrix-vector kernels' wider spread over the GPU wins.
/// At least 2: the tiled output projection never sees a step split over
/// positions, which only single tokens are.
pub const BATCH_MIN_ROWS: u32 = 8;
const _: () = assert!(BATCH_MIN_ROWS >= 2);
// a single token's attention splits are rows of the attention activation
const _: () = assert!(MAX_BATCH >= MAX_ATTENTION_SPLITS as usize);

/// Decode steps one call records and reads back at most when the device
/// chooses the tokens (greedy or sampled; longer runs are split).
pub const MAX_DEVICE_STEPS: usize = 256;

/// Device steps recorded into one submission. Submitting as it goes lets the
/// device run a call's first steps while the host records the rest: on the
/// H100, recording and submitting cost the host about 0.25 ms per step of
/// Llama-3.2-1B, which one submission of 32 steps added to the device's 0.8 ms
/// (1.08 against 0.80 ms a token with 4 steps a submission, 0.79 with 1 or 2).
const STEPS_PER_SUBMISSION: usize = 2;

/// Tokens and logits rows one submission holds at most with a cache of `ctx`
/// positions: a step never holds more tokens than the cache has positions.
pub(crate) fn capacity(ctx: usize) -> (usize, usize) {
    (MAX_BATCH.min(ctx), MAX_LOGIT_ROWS.min(ctx))
}

/// Bytes of the activation buffer `a` with a cache of `ctx` positions.
pub(crate) fn activation_bytes(cfg: &llama5_codegen::manifest::ModelConfig, a: Activation, ctx: usize) -> u64 {
    let (batch, logit_rows) = capacity(ctx);
    let (rows, per_row) = match a {
        Activation::Hidden => (batch, cfg.hidden_size),
        Activation::HiddenHalf => (batch, cfg.hidden_size.div_ceil(2)),
        // a step of one token split over positions holds a row per split: no more than the batch
        Activation::Q | Activation::Attn => (batch, cfg.q_dim()),
        Activation::AttnLse => (MAX_ATTENTION_SPLITS as usize, cfg.num_heads),
        Activation::Ffn => (batch, cfg.intermediate_size),
        Activation::FfnHalf => (batch, cfg.intermediate_size.div_ceil(2)),
        Activation::Logits => (logit_rows, cfg.vocab_size),
        Activation::SumSquares => (batch, cfg.hidden_size.div_ceil(SUM_SQUARES_PART)),
        Activation::FfnSumSquares => (batch, cfg.intermediate_size.div_ceil(SUM_SQUARES_PART)),
        Activation::AttnSumSquares => (batch, cfg.q_dim().div_ceil(SUM_SQUARES_PART)),
    };
    (rows * per_row * 4) as u64
}

/// How the GPU backend is set up.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Case-insensitive substring of the adapter name to use; `None` picks the high-performance adapter.
    pub adapter: Option<String>,
    /// KV-cache positions.
    pub ctx: usize,
    /// Directory for wgpu's on-disk pipeline cache, where the backend supports one.
    pub pipeline_cache_dir: Option<PathBuf>,
}

/// What loading took, for [`GpuBackend::load_report`].
#[derive(Clone, Debug, Default)]
pub struct LoadTimes {
    pub upload_bytes: u64,
    pub upload_ms: f64,
    pub pipelines: usize,
    pub pipeline_ms: f64,
    /// Bytes of on-disk pipeline cache found at load (`None`: no cache in use).
    pub pipeline_cache_bytes: Option<usize>,
}

/// Bytes of the device buffers the backend allocated, by use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Weight buffers (data and scales of every tensor part, norm vectors).
    pub weights: u64,
    pub kv_cache: u64,
    /// Activation arena, token and step buffers, argmax and the readback buffer.
    pub other: u64,
}

impl MemoryUse {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.other
    }
}

/// How a forward step chooses its next token on the device, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    None,
    Argmax,
    Sample,
}

/// One dispatch of a forward step.
struct Dispatch<'a> {
    /// Index into the plan's steps (for the profile, which is native only).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    step: usize,
    /// Index into the plan's kernels (and the pipelines).
    kernel: usize,
    bind_group: &'a wgpu::BindGroup,
    grid: [u32; 3],
}

/// The buffers the bind groups refer to, kept so a grown buffer can be rebound.
struct Buffers {
    /// One per tensor part: its data then its scales.
    weights: BTreeMap<(String, usize), wgpu::Buffer>,
    /// Key and value cache of each layer.
    caches: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    activations: BTreeMap<Activation, wgpu::Buffer>,
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    argmax: wgpu::Buffer,
    /// The logits kernel's shares of the argmax ([`Resource::ArgmaxShares`]).
    argmax_shares: wgpu::Buffer,
}

pub struct GpuBackend {
    gpu: Gpu,
    plan: Plan,
    pipelines: Vec<wgpu::ComputePipeline>,
    layouts: Vec<wgpu::BindGroupLayout>,
    buffers: Buffers,
    /// One per plan step, in plan order.
    bind_groups: Vec<wgpu::BindGroup>,
    /// The bind group of each plan step's batch kernel, if it has one.
    batch_bind_groups: Vec<Option<wgpu::BindGroup>>,
    readback: wgpu::Buffer,
    /// One [`StepUniform`] per device step, copied into `step` before each step runs.
    step_records: wgpu::Buffer,
    /// The token chosen by each device step.
    chosen_tokens: wgpu::Buffer,
    ctx: usize,
    /// Tokens one submission takes at most: [`MAX_BATCH`], or fewer for a small cache.
    batch: usize,
    /// Logits rows one submission computes at most: [`MAX_LOGIT_ROWS`], or fewer.
    logit_rows: usize,
    /// Logits rows the logits and readback buffers hold now: one until a step
    /// wants more (most generation never does, and they are most of the
    /// activation memory of a small model).
    logit_rows_held: usize,
    vocab: usize,
    load: LoadTimes,
    memory: MemoryUse,
    /// Whether a call has completed since load (the first runs inside error scopes).
    warmed_up: bool,
}

fn storage_buffer(device: &wgpu::Device, label: &str, size: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.max(4).next_multiple_of(4),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

#[cfg(not(target_arch = "wasm32"))]
use wait::block_on;
use wait::{blocking, oneshot, settle};

impl GpuBackend {
    /// Picks an adapter, uploads the model and builds every pipeline.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(model: &Model, opts: &GpuOptions) -> Result<Self, RuntimeError> {
        block_on(Self::new_async(model, opts, wgpu::Features::all()))
    }

    /// Like [`GpuBackend::new`], but never uses device features outside
    /// `features_allowed` (tests use it to run the portable kernels on any adapter).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn with_features(
        model: &Model,
        opts: &GpuOptions,
        features_allowed: wgpu::Features,
    ) -> Result<Self, RuntimeError> {
        block_on(Self::new_async(model, opts, features_allowed))
    }

    /// The asynchronous constructor (the only one on the web).
    pub async fn new_async(
        model: &Model,
        opts: &GpuOptions,
        features_allowed: wgpu::Features,
    ) -> Result<Self, RuntimeError> {
        if opts.ctx == 0 {
            return Err(RuntimeError::Other("the KV cache needs at least one position (ctx 0)".into()));
        }
        let adapter = device::pick_adapter(opts.adapter.as_deref()).await?;
        let gpu = device::open(adapter, features_allowed).await?;
        let plan = Plan::from_manifest(&model.manifest, &gpu.target)
            .map_err(|e| RuntimeError::Kernel { name: "plan".into(), message: e.to_string() })?;

        let scopes = ErrorScopes::push(&gpu.device);
        let built = Self::build(gpu, plan, model, opts.ctx, opts.pipeline_cache_dir.as_deref());
        let scoped = scopes.pop("loading the model").await;
        let backend = built?;
        scoped?;
        take_error(&backend.gpu.errors)?;
        Ok(backend)
    }

    fn build(
        gpu: Gpu,
        plan: Plan,
        model: &Model,
        ctx: usize,
        pipeline_cache_dir: Option<&std::path::Path>,
    ) -> Result<Self, RuntimeError> {
        let cfg = &model.manifest.model;
        let device = &gpu.device;
        fit::check_buffers(&model.manifest, &gpu.target, ctx, &gpu.limits, &gpu.info.name)?;

        // Weights: one buffer per tensor part holding its data then its scales.
        let upload_start = web_time_now();
        let mut weights: BTreeMap<(String, usize), wgpu::Buffer> = BTreeMap::new();
        let mut upload_bytes = 0u64;
        for step in &plan.steps {
            for t in &step.tensors {
                let key = (t.tensor.clone(), t.part);
                if weights.contains_key(&key) {
                    continue;
                }
                let entry = model.tensor(&t.tensor)?;
                let part = entry
                    .parts
                    .get(t.part)
                    .ok_or_else(|| RuntimeError::Model(format!("tensor `{}` has no part {}", t.tensor, t.part)))?;
                let data = model.region(&part.data);
                let scales = part.scales.as_ref().map(|r| model.region(r)).unwrap_or(&[]);
                let bytes = (data.len() + scales.len()) as u64;
                let buffer = storage_buffer(device, &t.tensor, bytes);
                gpu.queue.write_buffer(&buffer, 0, data);
                if !scales.is_empty() {
                    gpu.queue.write_buffer(&buffer, data.len() as u64, scales);
                }
                upload_bytes += bytes;
                weights.insert(key, buffer);
            }
        }

        // KV cache: a ring of ctx positions per layer.
        let kv_bytes = ctx as u64 * cfg.kv_dim() as u64 * llama5_codegen::tcal::kv_bytes_per_element(&gpu.target);
        let caches: Vec<(wgpu::Buffer, wgpu::Buffer)> = (0..cfg.num_layers)
            .map(|l| {
                (
                    storage_buffer(device, &format!("k_cache.{l}"), kv_bytes),
                    storage_buffer(device, &format!("v_cache.{l}"), kv_bytes),
                )
            })
            .collect();

        // Activations, reused by every layer.
        let (batch, logit_rows) = capacity(ctx);
        let b = batch as u64;
        let act = |a: Activation| activation_bytes(cfg, a, ctx);
        let mut activations = BTreeMap::new();
        // those some kernel binds (the residual stream's f16 copy only where tiled kernels read it)
        let bound = |a: Activation| {
            plan.kernels.iter().any(|k| k.bindings.iter().any(|b| b.resource == Resource::Activation(a)))
        };
        for a in Activation::ALL.into_iter().filter(|&a| bound(a)) {
            let bytes = if a == Activation::Logits { logits_bytes(cfg.vocab_size, 1) } else { act(a) };
            activations.insert(a, storage_buffer(device, &format!("{a:?}"), bytes));
        }
        let step_buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("step"),
            size: StepUniform::SIZE as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let tokens = storage_buffer(device, "tokens", b * 4);
        let argmax = storage_buffer(device, "argmax", 4);
        let argmax_shares = storage_buffer(device, "argmax shares", plan.argmax_shares as u64 * 8);
        let step_records = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("step records"),
            size: (MAX_DEVICE_STEPS * StepUniform::SIZE) as u64,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let chosen_tokens = storage_buffer(device, "chosen tokens", (MAX_DEVICE_STEPS * 4) as u64);
        let readback = readback_buffer(device, cfg.vocab_size, 1);
        let upload_ms = web_time_now() - upload_start;

        // Pipelines, one per distinct kernel (the plan validated each).
        let pipeline_start = web_time_now();
        let disk_cache = pipeline_cache_dir.and_then(|dir| pipeline_cache::DiskCache::open(device, &gpu.info, dir));
        let cache = disk_cache.as_ref().map(|c| &c.cache);
        let build_one = |(k, &shared): (&llama5_codegen::Kernel, &u32)| {
            if shared > gpu.limits.max_compute_workgroup_storage_size {
                return Err(RuntimeError::Kernel {
                    name: k.name.clone(),
                    message: format!(
                        "needs {shared} bytes of workgroup memory; {} allows {}",
                        gpu.info.name, gpu.limits.max_compute_workgroup_storage_size
                    ),
                });
            }
            Ok(create_pipeline(device, k, cache))
        };
        // natively, in parallel: each pipeline is translated (and, with a cold
        // cache, compiled) on the thread that creates it
        #[cfg(not(target_arch = "wasm32"))]
        let built: Vec<_> = {
            use rayon::prelude::*;
            // wgpu's error scopes belong to the thread that pushed them: each
            // pipeline's thread opens its own, so its errors reach this load
            plan.kernels
                .par_iter()
                .zip(&plan.workgroup_bytes)
                .map(|(k, shared)| {
                    let scopes = ErrorScopes::push(device);
                    let built = build_one((k, shared));
                    block_on(scopes.pop(&format!("loading the model (kernel {})", k.name))).and(built)
                })
                .collect()
        };
        #[cfg(target_arch = "wasm32")]
        let built: Vec<_> = plan.kernels.iter().zip(&plan.workgroup_bytes).map(build_one).collect();
        let (layouts, pipelines): (Vec<_>, Vec<_>) =
            built.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        let pipeline_ms = web_time_now() - pipeline_start;
        if let Some(cache) = &disk_cache {
            cache.save();
        }

        let buffers = Buffers { weights, caches, activations, step: step_buf, tokens, argmax, argmax_shares };
        // Bind groups, one per plan step (and one for its batch kernel, which has the same bindings).
        let mut bind_groups = Vec::with_capacity(plan.steps.len());
        let mut batch_bind_groups = Vec::with_capacity(plan.steps.len());
        for i in 0..plan.steps.len() {
            let (group, batch) = step_bind_groups(device, &plan, &layouts, &buffers, i)?;
            bind_groups.push(group);
            batch_bind_groups.push(batch);
        }

        let load = LoadTimes {
            upload_bytes,
            upload_ms,
            pipelines: pipelines.len(),
            pipeline_ms,
            pipeline_cache_bytes: disk_cache.as_ref().map(|c| c.loaded_bytes),
        };
        let b = &buffers;
        let memory = MemoryUse {
            weights: b.weights.values().map(wgpu::Buffer::size).sum(),
            kv_cache: b.caches.iter().map(|(k, v)| k.size() + v.size()).sum(),
            other: b.activations.values().map(wgpu::Buffer::size).sum::<u64>()
                + [&b.step, &b.tokens, &b.argmax, &b.argmax_shares, &readback, &step_records, &chosen_tokens]
                    .iter()
                    .map(|b| b.size())
                    .sum::<u64>(),
        };
        Ok(GpuBackend {
            plan,
            pipelines,
            layouts,
            buffers,
            bind_groups,
            batch_bind_groups,
            readback,
            step_records,
            chosen_tokens,
            ctx,
            batch,
            logit_rows,
            logit_rows_held: 1,
            vocab: cfg.vocab_size,
            load,
            memory,
            warmed_up: false,
            gpu,
        })
    }

    /// Tokens one submission takes at most.
    pub fn max_batch(&self) -> usize {
        self.batch
    }

    /// The kernel plan the backend runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// One line on what loading took (upload, pipeline creation).
    pub fn load_report(&self) -> String {
        let l = &self.load;
        format!(
            "{} ({:?}), kernels {}: uploaded {:.1} MiB in {:.0} ms, built {} pipelines in {:.0} ms ({}), {} dispatches per token",
            self.gpu.info.name,
            self.gpu.info.backend,
            self.gpu.target.name(),
            l.upload_bytes as f64 / (1 << 20) as f64,
            l.upload_ms,
            l.pipelines,
            l.pipeline_ms,
            match l.pipeline_cache_bytes {
                None => "no pipeline cache".to_string(),
                Some(0) => "pipeline cache cold".to_string(),
                Some(n) => format!("pipeline cache warm, {n} bytes"),
            },
            self.plan.dispatches_per_token()
        )
    }

    /// The kernel target the device granted.
    pub fn target(&self) -> &Target {
        &self.gpu.target
    }

    /// What loading took.
    pub fn load_times(&self) -> &LoadTimes {
        &self.load
    }

    /// Bytes of the device buffers this backend allocated.
    pub fn memory_use(&self) -> MemoryUse {
        self.memory
    }

    /// The device the model lives on (for measurements beside the model, such as copy bandwidth).
    pub fn device(&self) -> &wgpu::Device {
        &self.gpu.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.gpu.queue
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.gpu.info
    }

    /// The limits the device was opened with.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.gpu.limits
    }

    /// Runs `tokens` like [`Backend::forward`] and returns the greedy next
    /// token, chosen on the device (only 4 bytes come back).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_argmax(&mut self, tokens: &[u32], pos: usize) -> Result<u32, RuntimeError> {
        block_on(self.forward_argmax_async(tokens, pos))
    }

    /// [`GpuBackend::forward_argmax`] without blocking (the form the web uses).
    pub async fn forward_argmax_async(&mut self, tokens: &[u32], pos: usize) -> Result<u32, RuntimeError> {
        let bytes = self.run(tokens, pos, Logits::Last, true).await?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// [`Backend::forward`] without blocking (the form the web uses).
    pub async fn forward_async(
        &mut self,
        tokens: &[u32],
        pos: usize,
        logits: Logits,
    ) -> Result<Vec<f32>, RuntimeError> {
        let bytes = self.run(tokens, pos, logits, false).await?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Greedy decoding of `k` tokens with one readback per [`MAX_DEVICE_STEPS`]:
    /// step `i` feeds the previous step's choice (`first` for step 0) at position
    /// `pos + i`, and the device writes its argmax where the next step's embedding
    /// reads its token. Returns the `k` chosen tokens, exactly what `k` calls of
    /// [`GpuBackend::forward_argmax`] return; the caller discards any after an end
    /// of sequence token.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate_greedy(&mut self, first: u32, pos: usize, k: usize) -> Result<Vec<u32>, RuntimeError> {
        block_on(self.generate_greedy_async(first, pos, k))
    }

    /// [`GpuBackend::generate_greedy`] without blocking (the form the web uses).
    pub async fn generate_greedy_async(&mut self, first: u32, pos: usize, k: usize) -> Result<Vec<u32>, RuntimeError> {
        self.device_steps(first, pos, k, None).await
    }

    /// Like [`GpuBackend::generate_greedy`], with each step sampled on the device
    /// (temperature, top-k, top-p of `params`) at the uniform draw `draws[i]`:
    /// the host [`crate::sampling::Sampler`]'s choice for the same logits and draw.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate_sampled(
        &mut self,
        first: u32,
        pos: usize,
        params: &SamplingParams,
        draws: &[f64],
    ) -> Result<Vec<u32>, RuntimeError> {
        block_on(self.generate_sampled_async(first, pos, params, draws))
    }

    /// [`GpuBackend::generate_sampled`] without blocking (the form the web uses).
    pub async fn generate_sampled_async(
        &mut self,
        first: u32,
        pos: usize,
        params: &SamplingParams,
        draws: &[f64],
    ) -> Result<Vec<u32>, RuntimeError> {
        if !(params.temperature > 0.0 && params.temperature.is_finite()) {
            return Err(RuntimeError::Other(format!(
                "sampling on the device needs a temperature > 0, not {}",
                params.temperature
            )));
        }
        self.device_steps(first, pos, draws.len(), Some((params, draws))).await
    }

    async fn device_steps(
        &mut self,
        first: u32,
        pos: usize,
        k: usize,
        sampling: Option<(&SamplingParams, &[f64])>,
    ) -> Result<Vec<u32>, RuntimeError> {
        if first as usize >= self.vocab {
            return Err(RuntimeError::Other(format!("token id {first} is outside the vocabulary of {}", self.vocab)));
        }
        let mut out = Vec::with_capacity(k);
        let mut next = first;
        while out.len() < k {
            let n = (k - out.len()).min(MAX_DEVICE_STEPS);
            let sampling = sampling.map(|(p, d)| (p, &d[out.len()..out.len() + n]));
            let chosen = self.submit_steps(next, pos + out.len(), n, sampling).await?;
            next = *chosen.last().expect("at least one step");
            out.extend(chosen);
        }
        Ok(out)
    }

    async fn submit_steps(
        &mut self,
        first: u32,
        pos: usize,
        n: usize,
        sampling: Option<(&SamplingParams, &[f64])>,
    ) -> Result<Vec<u32>, RuntimeError> {
        let mut steps = Vec::with_capacity(n);
        for i in 0..n {
            let p = pos + i;
            let mut step = StepUniform {
                pos: u32::try_from(p).map_err(|_| RuntimeError::Other(format!("position {p} does not fit in u32")))?,
                n_tokens: 1,
                ctx: self.ctx as u32,
                ..StepUniform::default()
            };
            if let Some((params, draws)) = sampling {
                step.temperature = params.temperature;
                step.top_k = params.top_k.map_or(0, |k| u32::try_from(k).unwrap_or(u32::MAX));
                step.top_p = params.top_p.unwrap_or(1.0);
                step.sample_u = draws[i] as f32;
            }
            steps.push(step);
        }
        let records: Vec<u8> = steps.iter().flat_map(|s| s.to_bytes()).collect();
        let choice = if sampling.is_some() { Choice::Sample } else { Choice::Argmax };
        let q = &self.gpu.queue;
        q.write_buffer(&self.step_records, 0, &records);
        q.write_buffer(&self.buffers.tokens, 0, &first.to_le_bytes());
        let scopes = self.first_call_scopes();
        let mut encoder = self.encoder("device steps");
        let size = StepUniform::SIZE as u64;
        for (i, step) in steps.iter().enumerate() {
            let at = i as u64;
            encoder.copy_buffer_to_buffer(&self.step_records, at * size, &self.buffers.step, 0, size);
            self.encode_pass(&mut encoder, step, 1, choice);
            encoder.copy_buffer_to_buffer(&self.buffers.argmax, 0, &self.buffers.tokens, 0, 4);
            encoder.copy_buffer_to_buffer(&self.buffers.argmax, 0, &self.chosen_tokens, at * 4, 4);
            // the device runs these steps while the host records the next ones
            if (i + 1) % STEPS_PER_SUBMISSION == 0 && i + 1 < n {
                let recorded = std::mem::replace(&mut encoder, self.encoder("device steps"));
                self.gpu.queue.submit([recorded.finish()]);
            }
        }
        let read_bytes = n as u64 * 4;
        encoder.copy_buffer_to_buffer(&self.chosen_tokens, 0, &self.readback, 0, read_bytes);
        let bytes = self.submit_and_read(scopes, encoder, read_bytes).await?;
        Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Records one forward step as a compute pass.
    fn encode_pass(&self, encoder: &mut wgpu::CommandEncoder, step: &StepUniform, rows: usize, choice: Choice) {
        let mut pass =
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("forward"), timestamp_writes: None });
        for d in self.dispatches(step, rows, choice) {
            pass.set_pipeline(&self.pipelines[d.kernel]);
            pass.set_bind_group(0, d.bind_group, &[]);
            let [x, y, z] = d.grid;
            pass.dispatch_workgroups(x, y, z);
        }
    }

    /// The dispatches of one forward step with `rows` logits rows, in order:
    /// each plan step's batch kernel where the step repeats often enough, else
    /// its kernel.
    fn dispatches<'a>(
        &'a self,
        step: &'a StepUniform,
        rows: usize,
        choice: Choice,
    ) -> impl Iterator<Item = Dispatch<'a>> + 'a {
        let n = step.n_tokens;
        // an iterator, not a list: this runs for every step of every submission
        self.plan.steps.iter().enumerate().filter_map(move |(i, s)| {
            let run = match s.stage {
                Stage::Logits => rows > 0,
                Stage::Argmax => choice == Choice::Argmax,
                Stage::Sample => choice == Choice::Sample,
                Stage::Embed | Stage::Layer => true,
            };
            if !run {
                return None;
            }
            let mut kernel = s.kernel;
            let mut bind_group = &self.bind_groups[i];
            if let (Some(bk), Some(bg)) = (s.batch_kernel, &self.batch_bind_groups[i]) {
                // the batch kernel whose rows decide: this step's, or the one of the step it follows
                let chooser = s.batch_with.map_or(Some(bk), |j| self.plan.steps[j].batch_kernel);
                let repeats = chooser.map_or(0, |c| match self.plan.kernels[c].rows {
                    Rows::Tokens | Rows::TokensSplits { .. } | Rows::TokenTiles(_) => n,
                    Rows::LogitRows | Rows::LogitRowTiles(_) => rows as u32,
                    Rows::One => 1,
                });
                if repeats >= BATCH_MIN_ROWS {
                    kernel = bk;
                    bind_group = bg;
                }
            }
            let grid = self.plan.kernels[kernel].dispatch_for(step, rows as u32);
            Some(Dispatch { step: i, kernel, bind_group, grid })
        })
    }

    /// Runs every chunk; returns the bytes read back (logits rows, or the argmax).
    async fn run(&mut self, tokens: &[u32], pos: usize, logits: Logits, argmax: bool) -> Result<Vec<u8>, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::Other("forward needs at least one token".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(RuntimeError::Other(format!("token id {bad} is outside the vocabulary of {}", self.vocab)));
        }
        if logits == Logits::All {
            self.hold_logit_rows(tokens.len().min(self.logit_rows)).await?;
        }
        let mut out = Vec::new();
        let mut done = 0;
        while done < tokens.len() {
            let p = pos + done;
            // A chunk may not write a slot a token of the same chunk still attends to:
            // only whole chunks before the ring wraps, single tokens after.
            let most = if logits == Logits::All { self.logit_rows } else { self.batch };
            let mut n = (tokens.len() - done).min(most);
            if p + n > self.ctx {
                n = self.ctx.saturating_sub(p).max(1).min(n);
            }
            let last = done + n == tokens.len();
            let rows = match logits {
                Logits::All => n,
                Logits::Last if last => 1,
                Logits::Last => 0,
            };
            let bytes = self.submit_chunk(&tokens[done..done + n], p, rows, argmax && last).await?;
            out.extend_from_slice(&bytes);
            done += n;
        }
        Ok(out)
    }

    /// Writes the step uniform and the token ids of a step of `tokens` at `pos`
    /// whose last `rows` tokens want logits; returns the uniform.
    fn write_step(&self, tokens: &[u32], pos: usize, rows: usize) -> Result<StepUniform, RuntimeError> {
        let n = tokens.len() as u32;
        let step = StepUniform {
            pos: u32::try_from(pos).map_err(|_| RuntimeError::Other(format!("position {pos} does not fit in u32")))?,
            n_tokens: n,
            ctx: self.ctx as u32,
            logits_from: n - rows.max(1) as u32,
            argmax_row: rows.saturating_sub(1) as u32,
            ..StepUniform::default()
        };
        let q = &self.gpu.queue;
        q.write_buffer(&self.buffers.step, 0, &step.to_bytes());
        let token_bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        q.write_buffer(&self.buffers.tokens, 0, &token_bytes);
        Ok(step)
    }

    async fn submit_chunk(
        &mut self,
        tokens: &[u32],
        pos: usize,
        rows: usize,
        argmax: bool,
    ) -> Result<Vec<u8>, RuntimeError> {
        let step = self.write_step(tokens, pos, rows)?;
        let scopes = self.first_call_scopes();
        let mut encoder = self.encoder("forward");
        self.encode_pass(&mut encoder, &step, rows, if argmax { Choice::Argmax } else { Choice::None });
        let read_bytes = if argmax { 4 } else { (rows * self.vocab * 4) as u64 };
        if read_bytes > 0 {
            let src = if argmax { &self.buffers.argmax } else { &self.buffers.activations[&Activation::Logits] };
            encoder.copy_buffer_to_buffer(src, 0, &self.readback, 0, read_bytes);
        }
        self.submit_and_read(scopes, encoder, read_bytes).await
    }

    fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// The error scopes the backend's first call runs in (validation and out
    /// of memory), so that its errors come back as errors of that call.
    fn first_call_scopes(&self) -> Option<ErrorScopes> {
        (!self.warmed_up).then(|| ErrorScopes::push(&self.gpu.device))
    }

    /// Submits `encoder`, closes the first call's error `scopes`, and returns
    /// the first `read_bytes` of the readback buffer, or waits when there are none.
    async fn submit_and_read(
        &mut self,
        scopes: Option<ErrorScopes>,
        encoder: wgpu::CommandEncoder,
        read_bytes: u64,
    ) -> Result<Vec<u8>, RuntimeError> {
        self.gpu.queue.submit([encoder.finish()]);
        if let Some(scopes) = scopes {
            scopes.pop("first forward step").await?;
        }
        let bytes = if read_bytes > 0 {
            self.read_back(read_bytes).await?
        } else {
            self.wait().await?;
            Vec::new()
        };
        take_error(&self.gpu.errors)?;
        self.warmed_up = true;
        Ok(bytes)
    }

    /// Waits until the device has finished everything submitted.
    async fn wait(&self) -> Result<(), RuntimeError> {
        let (tx, rx) = oneshot();
        self.gpu.queue.on_submitted_work_done(move || tx.send(()));
        settle(&self.gpu.device, rx, "waiting for the device").await?;
        take_error(&self.gpu.errors)
    }

    async fn read_back(&self, bytes: u64) -> Result<Vec<u8>, RuntimeError> {
        self.gpu.read_mapped(&self.readback, bytes, "reading back results").await
    }
}

impl GpuBackend {
    /// Grows the logits and readback buffers to hold `rows` rows (never shrinks
    /// them) and rebinds the steps that bind the logits. A device out of
    /// memory leaves the backend as it was.
    async fn hold_logit_rows(&mut self, rows: usize) -> Result<(), RuntimeError> {
        if rows <= self.logit_rows_held {
            return Ok(());
        }
        let device = &self.gpu.device;
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let logits = storage_buffer(device, "Logits", logits_bytes(self.vocab, rows));
        let readback = readback_buffer(device, self.vocab, rows);
        if let Some(e) = oom.pop().await {
            return Err(convert_error(&format!("growing the logits to {rows} rows"), e));
        }
        let old = self.buffers.activations.insert(Activation::Logits, logits).expect("allocated at load");
        self.memory.other = self.memory.other - old.size() - self.readback.size()
            + self.buffers.activations[&Activation::Logits].size()
            + readback.size();
        self.readback = readback;
        for i in 0..self.plan.steps.len() {
            let k = &self.plan.kernels[self.plan.steps[i].kernel];
            if k.bindings.iter().any(|b| b.resource == Resource::Activation(Activation::Logits)) {
                let (group, batch) = step_bind_groups(device, &self.plan, &self.layouts, &self.buffers, i)?;
                self.bind_groups[i] = group;
                self.batch_bind_groups[i] = batch;
            }
        }
        self.logit_rows_held = rows;
        Ok(())
    }
}

/// Bytes of `rows` logits rows of a vocabulary of `vocab`.
fn logits_bytes(vocab: usize, rows: usize) -> u64 {
    (rows * vocab * 4) as u64
}

/// The buffer results come back through: `rows` logits rows, or the tokens of
/// [`MAX_DEVICE_STEPS`] steps.
fn readback_buffer(device: &wgpu::Device, vocab: usize, rows: usize) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: logits_bytes(vocab, rows).max((MAX_DEVICE_STEPS * 4) as u64),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// The bind group of plan step `i`, and of its batch kernel if it has one
/// (the step's buffers, each kernel taking those its bindings name; a batch
/// kernel binds the step's tensors at the same indices).
fn step_bind_groups(
    device: &wgpu::Device,
    plan: &Plan,
    layouts: &[wgpu::BindGroupLayout],
    buffers: &Buffers,
    i: usize,
) -> Result<(wgpu::BindGroup, Option<wgpu::BindGroup>), RuntimeError> {
    let step = &plan.steps[i];
    let k = &plan.kernels[step.kernel];
    let group = |kernel: usize| -> Result<wgpu::BindGroup, RuntimeError> {
        let k = &plan.kernels[kernel];
        let mut entries = Vec::with_capacity(k.bindings.len());
        for b in &k.bindings {
            let buffer = step_buffer(step, k, b, buffers)?;
            entries.push(wgpu::BindGroupEntry { binding: b.index, resource: buffer.as_entire_binding() });
        }
        Ok(device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&k.name),
            layout: &layouts[kernel],
            entries: &entries,
        }))
    };
    let batch = match step.batch_kernel {
        Some(bk)
            if plan.kernels[bk].bindings.iter().any(|b| b.resource == Resource::Tensor && !k.bindings.contains(b)) =>
        {
            return Err(RuntimeError::Kernel {
                name: plan.kernels[bk].name.clone(),
                message: format!("binds tensors at other indices than {}", k.name),
            });
        }
        Some(bk) => Some(group(bk)?),
        None => None,
    };
    Ok((group(step.kernel)?, batch))
}

/// The buffer binding `b` of kernel `k` takes in plan step `step`.
fn step_buffer<'a>(
    step: &PlanStep,
    k: &Kernel,
    b: &Binding,
    buffers: &'a Buffers,
) -> Result<&'a wgpu::Buffer, RuntimeError> {
    let layer_cache = |which: usize| -> Result<&wgpu::Buffer, RuntimeError> {
        let l = step.layer.ok_or_else(|| RuntimeError::Kernel {
            name: k.name.clone(),
            message: "cache binding outside a layer".into(),
        })?;
        Ok(if which == 0 { &buffers.caches[l].0 } else { &buffers.caches[l].1 })
    };
    Ok(match &b.resource {
        Resource::Step => &buffers.step,
        Resource::Tokens => &buffers.tokens,
        Resource::Activation(a) => &buffers.activations[a],
        Resource::KeyCache => layer_cache(0)?,
        Resource::ValueCache => layer_cache(1)?,
        Resource::Argmax => &buffers.argmax,
        Resource::ArgmaxShares => &buffers.argmax_shares,
        Resource::Tensor => {
            let t = step.tensors.iter().find(|t| t.binding == b.index).ok_or_else(|| RuntimeError::Kernel {
                name: k.name.clone(),
                message: format!("no tensor for binding {}", b.name),
            })?;
            &buffers.weights[&(t.tensor.clone(), t.part)]
        }
    })
}

/// Milliseconds from an arbitrary origin (timing only; `performance.now()` on the web).
fn web_time_now() -> f64 {
    use std::sync::OnceLock;
    static START: OnceLock<web_time::Instant> = OnceLock::new();
    START.get_or_init(web_time::Instant::now).elapsed().as_secs_f64() * 1000.0
}

impl Backend for GpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: "gpu",
            device: self.gpu.info.name.clone(),
            details: format!(
                "{:?}, kernels {}, {} pipelines, {} dispatches per token",
                self.gpu.info.backend,
                self.gpu.target.name(),
                self.pipelines.len(),
                self.plan.dispatches_per_token()
            ),
        }
    }
    fn ctx(&self) -> usize {
        self.ctx
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn forward(&mut self, tokens: &[u32], pos: usize, logits: Logits) -> Result<Vec<f32>, RuntimeError> {
        blocking(self.forward_async(tokens, pos, logits))?
    }

    fn greedy_steps(&mut self, first: u32, pos: usize, k: usize) -> Option<Result<Vec<u32>, RuntimeError>> {
        Some(blocking(self.generate_greedy_async(first, pos, k)).and_then(|r| r))
    }

    fn sampled_steps(
        &mut self,
        first: u32,
        pos: usize,
        params: &SamplingParams,
        draws: &[f64],
    ) -> Option<Result<Vec<u32>, RuntimeError>> {
        Some(blocking(self.generate_sampled_async(first, pos, params, draws)).and_then(|r| r))
    }
}

/// A human-readable list of adapters, backends, features and limits (`llama5 info`).
#[cfg(not(target_arch = "wasm32"))]
pub fn adapters_report() -> String {
    block_on(device::report())
}

/// The bind group layout (from the kernel's binding table) and the compute
/// pipeline of a generated kernel: the one place the runtime turns a
/// [`llama5_codegen::Kernel`] into wgpu objects.
pub(crate) fn create_pipeline(
    device: &wgpu::Device,
    k: &llama5_codegen::Kernel,
    cache: Option<&wgpu::PipelineCache>,
) -> (wgpu::BindGroupLayout, wgpu::ComputePipeline) {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = k
        .bindings
        .iter()
        .map(|b| wgpu::BindGroupLayoutEntry {
            binding: b.index,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match b.access {
                    Access::Uniform => wgpu::BufferBindingType::Uniform,
                    Access::ReadOnly => wgpu::BufferBindingType::Storage { read_only: true },
                    Access::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let bgl =
        device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(&k.name), entries: &entries });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&k.name),
        bind_group_layouts: &[Some(&bgl)],
        immediate_size: 0,
    });
    let desc =
        wgpu::ShaderModuleDescriptor { label: Some(&k.name), source: wgpu::ShaderSource::Wgsl(Cow::Borrowed(&k.wgsl)) };
    let module = if shader_checks() {
        device.create_shader_module(desc)
    } else {
        // SAFETY: the runtime compiles only kernels it generated; naga validates
        // them, and they keep every index in range by construction (reads that
        // could run past an end are clamped in the kernel). Storage buffers keep
        // the driver's robust access where the device has it.
        unsafe { device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
    };
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&k.name),
        layout: Some(&layout),
        module: &module,
        entry_point: Some(k.entry_point),
        compilation_options: Default::default(),
        cache,
    });
    (bgl, pipeline)
}

/// Whether kernels are compiled with wgpu's run-time checks: a clamp on every
/// index into a workgroup or private array, a counter in every loop, guarded
/// integer division. Off unless `LLAMA5_CHECKED_SHADERS=1` (for chasing a
/// kernel fault): on the H100, Llama-2-7B F16 prefill went from 53.6 to 63.1
/// TFLOP/s without them, its INT4 decode from 4.15 to 3.90 ms of GPU time a token.
fn shader_checks() -> bool {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::env::var_os("LLAMA5_CHECKED_SHADERS").is_some_and(|v| v == "1")
    }
    #[cfg(target_arch = "wasm32")]
    {
        false
    }
}

impl crate::generate::AsyncBackend for GpuBackend {
    fn ctx(&self) -> usize {
        self.ctx
    }
    async fn forward(&mut self, tokens: &[u32], pos: usize, logits: Logits) -> Result<Vec<f32>, RuntimeError> {
        self.forward_async(tokens, pos, logits).await
    }
    async fn greedy_steps(&mut self, first: u32, pos: usize, k: usize) -> Option<Result<Vec<u32>, RuntimeError>> {
        Some(self.generate_greedy_async(first, pos, k).await)
    }
    async fn sampled_steps(
        &mut self,
        first: u32,
        pos: usize,
        params: &SamplingParams,
        draws: &[f64],
    ) -> Option<Result<Vec<u32>, RuntimeError>> {
        Some(self.generate_sampled_async(first, pos, params, draws).await)
    }
}

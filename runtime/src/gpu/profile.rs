//! GPU time per dispatch from timestamp queries (`llama5 bench --profile`).
//!
//! Each dispatch of a step runs in a compute pass of its own with a timestamp
//! at its start and end, so the times exclude the gaps between dispatches; the
//! step's wall time minus their sum is that overhead.
#![cfg(not(target_arch = "wasm32"))]

use llama5_codegen::Stage;

use super::GpuBackend;
use crate::error::RuntimeError;

/// The GPU time of one dispatch of a profiled step.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchTime {
    /// Index into the plan's steps.
    pub step: usize,
    pub kernel: String,
    pub stage: Stage,
    pub layer: Option<usize>,
    pub grid: [u32; 3],
    pub ns: f64,
}

impl GpuBackend {
    /// Whether the device writes timestamps (what [`GpuBackend::profile_step`] needs).
    pub fn has_timestamps(&self) -> bool {
        self.gpu.device.features().contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Runs one forward step of `tokens` at `pos` (logits for the last `rows`,
    /// argmax included when `rows > 0`) and returns each dispatch's GPU time, in
    /// order. The step writes the KV cache like any other.
    pub fn profile_step(&mut self, tokens: &[u32], pos: usize, rows: usize) -> Result<Vec<DispatchTime>, RuntimeError> {
        if !self.has_timestamps() {
            return Err(RuntimeError::Gpu(format!("{} offers no timestamp queries", self.gpu.info.name)));
        }
        if tokens.is_empty() || tokens.len() > self.batch || rows > tokens.len().min(self.logit_rows) {
            return Err(RuntimeError::Other(format!(
                "a profiled step takes 1 to {} tokens and at most {} logits rows",
                self.batch, self.logit_rows
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(RuntimeError::Other(format!("token id {bad} is outside the vocabulary of {}", self.vocab)));
        }
        super::wait::block_on(self.hold_logit_rows(rows))?;
        let step = self.write_step(tokens, pos, rows)?;
        let device = &self.gpu.device;
        let choice = if rows > 0 { super::Choice::Argmax } else { super::Choice::None };
        let list: Vec<_> = self.dispatches(&step, rows, choice).collect();
        let count = 2 * list.len() as u32;
        let queries = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let bytes = 8 * count as u64;
        let buffer = |label: &str, usage: wgpu::BufferUsages| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        let resolved = buffer("profile resolve", wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
        let read = buffer("profile read", wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("profile") });
        for (j, d) in list.iter().enumerate() {
            let writes = wgpu::ComputePassTimestampWrites {
                query_set: &queries,
                beginning_of_pass_write_index: Some(2 * j as u32),
                end_of_pass_write_index: Some(2 * j as u32 + 1),
            };
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&self.plan.kernels[d.kernel].name),
                timestamp_writes: Some(writes),
            });
            pass.set_pipeline(&self.pipelines[d.kernel]);
            pass.set_bind_group(0, d.bind_group, &[]);
            let [x, y, z] = d.grid;
            pass.dispatch_workgroups(x, y, z);
        }
        encoder.resolve_query_set(&queries, 0..count, &resolved, 0);
        encoder.copy_buffer_to_buffer(&resolved, 0, &read, 0, bytes);
        self.gpu.queue.submit([encoder.finish()]);

        let raw = super::wait::block_on(self.gpu.read_mapped(&read, bytes, "reading timestamps"))?;
        let ticks: Vec<u64> =
            raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunks"))).collect();
        let period = f64::from(self.gpu.queue.get_timestamp_period());
        Ok(list
            .iter()
            .enumerate()
            .map(|(j, d)| {
                let s = &self.plan.steps[d.step];
                DispatchTime {
                    step: d.step,
                    kernel: self.plan.kernels[d.kernel].name.clone(),
                    stage: s.stage,
                    layer: s.layer,
                    grid: d.grid,
                    ns: ticks[2 * j + 1].saturating_sub(ticks[2 * j]) as f64 * period,
                }
            })
            .collect())
    }
}

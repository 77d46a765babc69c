//! Runs one generated kernel on buffers the caller fills: how each kernel is
//! tested against a plain CPU implementation, and how it can be timed alone.
//! Async at its core like the backend (the browser tests await it); the
//! blocking forms are native only.

use llama5_codegen::{Access, Kernel, Target};

use super::device::{self, convert_error, Gpu};
use crate::error::RuntimeError;

pub struct KernelRunner {
    gpu: Gpu,
}

impl KernelRunner {
    /// Opens a device like [`super::GpuBackend::new`], restricted to `features_allowed`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(adapter: Option<&str>, features_allowed: wgpu::Features) -> Result<Self, RuntimeError> {
        super::wait::block_on(Self::new_async(adapter, features_allowed))
    }

    pub async fn new_async(adapter: Option<&str>, features_allowed: wgpu::Features) -> Result<Self, RuntimeError> {
        let a = device::pick_adapter(adapter).await?;
        Ok(KernelRunner { gpu: device::open(a, features_allowed).await? })
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.gpu.info
    }

    pub fn target(&self) -> &Target {
        &self.gpu.target
    }

    pub fn adapter_name(&self) -> &str {
        &self.gpu.info.name
    }

    /// Dispatches `kernel` once with `grid` workgroups; `contents[i]` is the
    /// initial content of binding `i` (uniform included). Returns the contents
    /// of every binding afterwards.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run(&self, kernel: &Kernel, contents: &[Vec<u8>], grid: [u32; 3]) -> Result<Vec<Vec<u8>>, RuntimeError> {
        super::wait::block_on(self.run_async(kernel, contents, grid))
    }

    pub async fn run_async(
        &self,
        kernel: &Kernel,
        contents: &[Vec<u8>],
        grid: [u32; 3],
    ) -> Result<Vec<Vec<u8>>, RuntimeError> {
        let device = &self.gpu.device;
        if contents.len() != kernel.bindings.len() {
            return Err(RuntimeError::Other(format!(
                "{}: {} buffers for {} bindings",
                kernel.name,
                contents.len(),
                kernel.bindings.len()
            )));
        }
        llama5_codegen::validate(kernel, &self.gpu.target)
            .map_err(|e| RuntimeError::Kernel { name: kernel.name.clone(), message: e.to_string() })?;
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffers: Vec<(wgpu::Buffer, u64)> = kernel
            .bindings
            .iter()
            .zip(contents)
            .map(|(b, data)| {
                let size = (data.len() as u64).max(16).next_multiple_of(16);
                let usage = match b.access {
                    Access::Uniform => wgpu::BufferUsages::UNIFORM,
                    _ => wgpu::BufferUsages::STORAGE,
                } | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC;
                let buf = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&b.name),
                    size,
                    usage,
                    mapped_at_creation: false,
                });
                self.gpu.queue.write_buffer(&buf, 0, data);
                (buf, size)
            })
            .collect();
        let (bgl, pipeline) = super::create_pipeline(device, kernel, None);
        let bind_entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .zip(&kernel.bindings)
            .map(|((buf, _), b)| wgpu::BindGroupEntry { binding: b.index, resource: buf.as_entire_binding() })
            .collect();
        let group =
            device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &bgl, entries: &bind_entries });
        let total: u64 = buffers.iter().map(|(_, s)| s).sum();
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: total,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        }
        let mut offset = 0;
        for (buf, size) in &buffers {
            encoder.copy_buffer_to_buffer(buf, 0, &readback, offset, *size);
            offset += size;
        }
        self.gpu.queue.submit([encoder.finish()]);
        if let Some(e) = validation.pop().await {
            return Err(convert_error(&kernel.name, e));
        }
        let view = self.gpu.read_mapped(&readback, readback.size(), &format!("{}: reading back", kernel.name)).await?;
        let mut out = Vec::new();
        let mut offset = 0usize;
        for ((_, size), data) in buffers.iter().zip(contents) {
            out.push(view[offset..offset + data.len()].to_vec());
            offset += *size as usize;
        }
        Ok(out)
    }
}

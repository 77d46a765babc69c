//! wgpu's on-disk pipeline cache: compiled pipelines survive a restart, so a
//! second start skips the driver's shader compilation. Only backends with
//! `Features::PIPELINE_CACHE` (Vulkan) have one; elsewhere this is a no-op.

use std::path::{Path, PathBuf};

pub(crate) struct DiskCache {
    pub cache: wgpu::PipelineCache,
    path: PathBuf,
    /// Bytes read from disk (0: a cold start).
    pub loaded_bytes: usize,
}

impl DiskCache {
    /// The cache file for this adapter in `dir`, or `None` where the device has no pipeline cache.
    pub fn open(device: &wgpu::Device, info: &wgpu::AdapterInfo, dir: &Path) -> Option<Self> {
        if !device.features().contains(wgpu::Features::PIPELINE_CACHE) {
            return None;
        }
        let path = dir.join(wgpu::util::pipeline_cache_key(info)?);
        let data = std::fs::read(&path).ok();
        // SAFETY: the file holds what `save` wrote from `PipelineCache::get_data`;
        // the driver checks its header against this device and driver version,
        // and with `fallback` an unusable file gives an empty cache.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("llama5"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        Some(DiskCache { cache, path, loaded_bytes: data.map_or(0, |d| d.len()) })
    }

    /// Writes the cache back (to a temporary file renamed into place, so a
    /// concurrent start never reads half a file). Failing to save only costs
    /// the next start some time, so errors are reported, not fatal.
    pub fn save(&self) {
        let Some(data) = self.cache.get_data() else { return };
        let tmp = self.path.with_extension(format!("tmp-{}", std::process::id()));
        let written = self
            .path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, &data))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            std::fs::remove_file(&tmp).ok();
            eprintln!("llama5: could not save the pipeline cache to {}: {e}", self.path.display());
        }
    }
}

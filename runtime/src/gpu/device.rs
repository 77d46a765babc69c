//! Adapter choice, device creation, the kernel [`Target`] the device grants,
//! and the translation of wgpu's asynchronous errors into [`RuntimeError`]s.

use std::sync::{Arc, Mutex};

use llama5_codegen::Target;

use crate::error::RuntimeError;

/// Errors wgpu reports outside any error scope, and device loss.
#[derive(Default)]
pub(crate) struct DeviceErrors {
    lost: Option<String>,
    uncaptured: Option<RuntimeError>,
}

pub(crate) type SharedErrors = Arc<Mutex<DeviceErrors>>;

/// Takes the first error wgpu reported since the last check.
pub(crate) fn take_error(errors: &SharedErrors) -> Result<(), RuntimeError> {
    let mut e = errors.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(reason) = &e.lost {
        return Err(RuntimeError::DeviceLost(reason.clone()));
    }
    match e.uncaptured.take() {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// A validation and an out-of-memory error scope, pushed together on the
/// calling thread (wgpu's scopes belong to it) and closed together.
pub(crate) struct ErrorScopes {
    validation: wgpu::ErrorScopeGuard,
    oom: wgpu::ErrorScopeGuard,
}

impl ErrorScopes {
    pub fn push(device: &wgpu::Device) -> ErrorScopes {
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        ErrorScopes { validation, oom }
    }

    /// Closes both scopes; an error caught in either, out of memory first,
    /// becomes the error of `context`.
    pub async fn pop(self, context: &str) -> Result<(), RuntimeError> {
        let oom = self.oom.pop().await;
        let validation = self.validation.pop().await;
        match oom.or(validation) {
            Some(e) => Err(convert_error(context, e)),
            None => Ok(()),
        }
    }
}

pub(crate) fn convert_error(context: &str, e: wgpu::Error) -> RuntimeError {
    match e {
        wgpu::Error::OutOfMemory { .. } => RuntimeError::OutOfMemory(context.to_string()),
        other => RuntimeError::Gpu(format!("{context}: {other}")),
    }
}

pub(crate) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub target: Target,
    pub limits: wgpu::Limits,
    pub errors: SharedErrors,
}

impl Gpu {
    /// Maps the first `bytes` of `buffer` (a `MAP_READ` buffer the submitted
    /// work writes), copies them out and unmaps it; `what` names the read in errors.
    pub(crate) async fn read_mapped(
        &self,
        buffer: &wgpu::Buffer,
        bytes: u64,
        what: &str,
    ) -> Result<Vec<u8>, RuntimeError> {
        let slice = buffer.slice(..bytes);
        let (tx, rx) = super::wait::oneshot();
        slice.map_async(wgpu::MapMode::Read, move |r| tx.send(r));
        super::wait::settle(&self.device, rx, what).await?.map_err(|e| RuntimeError::Gpu(format!("{what}: {e}")))?;
        take_error(&self.errors)?;
        let data = slice.get_mapped_range().map_err(|e| RuntimeError::Gpu(format!("{what}: {e}")))?.to_vec();
        buffer.unmap();
        Ok(data)
    }
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::all();
    // WGPU_BACKEND and friends override the defaults
    wgpu::Instance::new(desc.with_env())
}

fn adapter_line(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
}

/// Picks an adapter: the first whose name contains `name` (case-insensitive),
/// else the high-performance one.
pub(crate) async fn pick_adapter(name: Option<&str>) -> Result<wgpu::Adapter, RuntimeError> {
    let instance = instance();
    match name {
        Some(wanted) => {
            let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
            let names: Vec<String> = adapters.iter().map(|a| adapter_line(&a.get_info())).collect();
            let wanted_lower = wanted.to_lowercase();
            adapters.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&wanted_lower)).ok_or_else(|| {
                RuntimeError::NoAdapter(format!("no adapter name contains `{wanted}` (found: {})", names.join("; ")))
            })
        }
        None => instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                ..Default::default()
            })
            .await
            .map_err(|e| RuntimeError::NoAdapter(e.to_string())),
    }
}

/// What an adapter offers, before any model is loaded (the web page shows it
/// and checks a manifest against it before downloading shards).
#[derive(Clone, Debug)]
pub struct AdapterProbe {
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    /// The kernels a device opened on it would run.
    pub target: Target,
}

/// Finds the adapter [`super::GpuBackend::new_async`] would pick and reports it.
pub async fn probe(name: Option<&str>) -> Result<AdapterProbe, RuntimeError> {
    let adapter = pick_adapter(name).await?;
    let (info, features, limits) = (adapter.get_info(), adapter.features(), granted_limits(&adapter));
    let coop = coop_usable(&adapter, &limits, wgpu::Features::all());
    let target = target_for(features, &limits, &info, coop);
    Ok(AdapterProbe { info, features, limits, target })
}

/// The kernel target a device with these features and limits supports;
/// `coop`: whether it was opened with cooperative matrices ([`coop_usable`]).
pub(crate) fn target_for(
    features: wgpu::Features,
    limits: &wgpu::Limits,
    info: &wgpu::AdapterInfo,
    coop: bool,
) -> Target {
    let shader_f16 = features.contains(wgpu::Features::SHADER_F16);
    let subgroups = features.contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size >= llama5_codegen::target::MIN_SUBGROUP_SIZE;
    Target {
        shader_f16,
        subgroups,
        subgroup_size: info.subgroup_min_size,
        max_workgroup_size: limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x),
        max_storage_binding: limits.max_storage_buffer_binding_size,
        max_workgroup_storage: limits.max_compute_workgroup_storage_size,
        cooperative_matrix: coop && shader_f16 && subgroups,
    }
}

/// Set to `1` to keep the tiled kernels off cooperative matrices (to compare
/// them with the plain ones on the same adapter).
pub const NO_COOP_ENV: &str = "LLAMA5_NO_COOP";

/// Whether `configs` include the one the cooperative-matrix kernels use:
/// 16 x 16 x 16, f16 inputs, f32 accumulators.
pub fn has_coop_config(configs: &[wgpu::CooperativeMatrixProperties]) -> bool {
    configs.iter().any(|c| {
        (c.m_size, c.n_size, c.k_size) == (16, 16, 16)
            && c.ab_type == wgpu::CooperativeScalarType::F16
            && c.cr_type == wgpu::CooperativeScalarType::F32
    })
}

/// Whether a device opened on `adapter` (with `limits`, restricted to
/// `features_allowed`) runs the cooperative-matrix kernels: the feature, its
/// 16 x 16 f16 -> f32 configuration, f16 and subgroups, subgroups of exactly
/// [`llama5_codegen::target::COOP_SUBGROUP_SIZE`] (the kernels give each
/// subgroup of their workgroup its own sub-tiles), workgroups of
/// [`llama5_codegen::target::COOP_WORKGROUP_SIZE`] invocations, enough
/// workgroup memory, and [`NO_COOP_ENV`] unset.
pub(crate) fn coop_usable(adapter: &wgpu::Adapter, limits: &wgpu::Limits, features_allowed: wgpu::Features) -> bool {
    use llama5_codegen::target::{COOP_SUBGROUP_SIZE, COOP_WORKGROUP_BYTES, COOP_WORKGROUP_SIZE};
    let needed =
        wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
    let info = adapter.get_info();
    features_allowed.contains(needed)
        && adapter.features().contains(needed)
        && std::env::var(NO_COOP_ENV).map_or(true, |v| v.is_empty() || v == "0")
        && info.subgroup_min_size == COOP_SUBGROUP_SIZE
        && info.subgroup_max_size == COOP_SUBGROUP_SIZE
        && limits.max_compute_workgroup_storage_size >= COOP_WORKGROUP_BYTES
        && limits.max_compute_invocations_per_workgroup >= COOP_WORKGROUP_SIZE
        && limits.max_compute_workgroup_size_x >= COOP_WORKGROUP_SIZE
        && has_coop_config(&adapter.cooperative_matrix_properties())
}

/// Lowers the device's largest storage binding and buffer to this many bytes.
pub const MAX_BINDING_ENV: &str = "LLAMA5_MAX_BINDING_BYTES";

/// The limits a device opened on `adapter` gets: the adapter's own, lowered
/// by [`MAX_BINDING_ENV`] (a smaller device on demand: how the tier fallback
/// is tested on any GPU). [`probe`] reports the same.
fn granted_limits(adapter: &wgpu::Adapter) -> wgpu::Limits {
    let mut limits = adapter.limits();
    if let Some(max) = std::env::var(MAX_BINDING_ENV).ok().and_then(|v| v.parse::<u64>().ok()) {
        limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(max);
        limits.max_buffer_size = limits.max_buffer_size.min(max);
    }
    limits
}

/// Opens a device with `shader-f16` and subgroups where offered and the
/// adapter's own limits (lowered by [`MAX_BINDING_ENV`]).
pub(crate) async fn open(adapter: wgpu::Adapter, features_allowed: wgpu::Features) -> Result<Gpu, RuntimeError> {
    let info = adapter.get_info();
    // The pipeline cache and timestamp queries change no kernel, so they are not subject to `features_allowed`.
    let mut wanted = (wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP) & features_allowed
        | wgpu::Features::PIPELINE_CACHE
        | wgpu::Features::TIMESTAMP_QUERY;
    let limits = granted_limits(&adapter);
    let coop = coop_usable(&adapter, &limits, features_allowed);
    if coop {
        wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
    }
    let features = adapter.features() & wanted;
    let experimental_features = if coop {
        // SAFETY: wgpu asks callers of its experimental features to accept that
        // they may still have bugs; the only one requested is cooperative
        // matrices, used by the tiled kernels alone, and NO_COOP_ENV turns it off.
        unsafe { wgpu::ExperimentalFeatures::enabled() }
    } else {
        wgpu::ExperimentalFeatures::disabled()
    };
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: Some("llama5"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        })
        .await
        .map_err(|e| RuntimeError::NoAdapter(format!("{}: {e}", adapter_line(&info))))?;
    let errors: SharedErrors = Arc::default();
    let lost = errors.clone();
    device.set_device_lost_callback(move |reason, message| {
        if reason != wgpu::DeviceLostReason::Destroyed {
            lost.lock().unwrap_or_else(|p| p.into_inner()).lost = Some(format!("{reason:?}: {message}"));
        }
    });
    let uncaptured = errors.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        let mut slot = uncaptured.lock().unwrap_or_else(|p| p.into_inner());
        if slot.uncaptured.is_none() {
            slot.uncaptured = Some(convert_error("uncaptured", e));
        }
    }));
    let granted = device.features();
    let limits = device.limits();
    let coop = granted.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
    let target = target_for(granted, &limits, &info, coop);
    Ok(Gpu { device, queue, info, target, limits, errors })
}

/// Every adapter with backend, type, driver, features and key limits.
// Only the native `adapter_report` calls it.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) async fn report() -> String {
    let adapters = instance().enumerate_adapters(wgpu::Backends::all()).await;
    if adapters.is_empty() {
        return "no adapters found\n".to_string();
    }
    let mut s = String::new();
    for a in adapters {
        let info = a.get_info();
        let f = a.features();
        let l = a.limits();
        let t = target_for(f, &l, &info, coop_usable(&a, &l, wgpu::Features::all()));
        let configs = a.cooperative_matrix_properties();
        s += &format!("{}\n", adapter_line(&info));
        s += &format!("  driver: {} {}\n", info.driver, info.driver_info);
        s += &format!(
            "  shader-f16: {}, subgroups: {} (sizes {}..={}), timestamp queries: {}\n",
            f.contains(wgpu::Features::SHADER_F16),
            f.contains(wgpu::Features::SUBGROUP),
            info.subgroup_min_size,
            info.subgroup_max_size,
            f.contains(wgpu::Features::TIMESTAMP_QUERY)
        );
        s += &format!(
            "  max storage binding: {} MiB, max buffer: {} MiB, storage buffers per stage: {}, workgroup invocations: {}, workgroup memory: {} B\n",
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20,
            l.max_storage_buffers_per_shader_stage,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroup_storage_size
        );
        s += &format!(
            "  cooperative matrices: {} ({} configs{}{})\n",
            // the f16 kernels, and with them coop, run with `--kv-cache f16` (the target printed above)
            if t.cooperative_matrix { "usable (with --kv-cache f16)" } else { "not used" },
            configs.len(),
            if configs.is_empty() { "" } else { ": " },
            configs
                .iter()
                .map(|c| format!("{}x{}x{} {:?}->{:?}", c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !t.cooperative_matrix && has_coop_config(&configs) {
            s += &format!(
                "    (needs subgroups of exactly {} (adapter: {}..={}), {} B of workgroup memory, and {NO_COOP_ENV} unset)\n",
                llama5_codegen::target::COOP_SUBGROUP_SIZE,
                info.subgroup_min_size,
                info.subgroup_max_size,
                llama5_codegen::target::COOP_WORKGROUP_BYTES
            );
        }
        s += &format!("  kernel target: {}\n", t.name());
    }
    s
}

//! The llama5 runtime in a web page. Natively this crate is empty; built for
//! `wasm32-unknown-unknown` it holds what only the browser needs:
//!
//! - [`load`]: the manifest and shards by `fetch`, streamed with progress,
//!   sha256-verified and kept in Cache Storage, handed to the runtime as a
//!   [`llama5_runtime::Model`] (the same seam `Model::open` fills natively);
//! - [`session`]: the page's API through wasm-bindgen: the adapter, loading,
//!   and chat turns streamed token by token from the GPU backend's async path.
//!
//! The forward pass, kernels, sampling and tokenizer are the runtime's own.

#[cfg(target_arch = "wasm32")]
pub mod load;
#[cfg(target_arch = "wasm32")]
pub mod session;

/// What the browser says of its WebGPU adapter (`GPUAdapterInfo`: vendor,
/// architecture, device, description), which wgpu's web backend leaves out of
/// its `AdapterInfo`; empty where the browser tells nothing.
#[cfg(target_arch = "wasm32")]
pub async fn browser_adapter_info() -> String {
    use js_sys::{Function, Promise, Reflect};
    use wasm_bindgen::{JsCast, JsValue};
    let get = |o: &JsValue, k: &str| Reflect::get(o, &k.into()).unwrap_or(JsValue::UNDEFINED);
    let Some(window) = web_sys::window() else { return String::new() };
    let gpu = get(&window.navigator().into(), "gpu");
    let Ok(request) = get(&gpu, "requestAdapter").dyn_into::<Function>() else { return String::new() };
    let Ok(promise) = request.call0(&gpu).and_then(|p| p.dyn_into::<Promise>()) else { return String::new() };
    let Ok(adapter) = wasm_bindgen_futures::JsFuture::from(promise).await else { return String::new() };
    let info = get(&adapter, "info");
    let mut parts: Vec<String> = ["vendor", "architecture", "device", "description"]
        .iter()
        .filter_map(|k| get(&info, k).as_string())
        .filter(|s| !s.is_empty())
        .collect();
    parts.dedup();
    if get(&info, "isFallbackAdapter").is_truthy() || get(&adapter, "isFallbackAdapter").is_truthy() {
        parts.push("fallback adapter".into());
    }
    parts.join(", ")
}

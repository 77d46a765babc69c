//! What the page calls (through wasm-bindgen): [`probe`] for the adapter,
//! [`Session::load`] for a model directory URL, [`Session::chat`] for a turn.

use std::cell::RefCell;
use std::rc::Rc;

use llama5_runtime::chat::{ChatTemplate, Message};
use llama5_runtime::generate::{AsyncGenerator, GenerateOptions, Streamed};
use llama5_runtime::gpu::{GpuBackend, GpuOptions};
use llama5_runtime::sampling::SamplingParams;
use llama5_runtime::tokenizer::Tokenizer;
use wasm_bindgen::prelude::*;

use crate::load::{self, Progress, Source};

/// KV-cache positions the page's sessions hold.
pub const PAGE_CTX: usize = 1024;

fn err(e: impl std::fmt::Display) -> JsValue {
    js_sys::Error::new(&e.to_string()).into()
}

fn adapter_json(p: &llama5_runtime::gpu::AdapterProbe, browser_info: &str) -> String {
    let name = if p.info.name.is_empty() { browser_info } else { p.info.name.as_str() };
    serde_json::json!({
        "name": name,
        "backend": format!("{:?}", p.info.backend),
        "shader_f16": p.features.contains(wgpu::Features::SHADER_F16),
        "subgroups": p.features.contains(wgpu::Features::SUBGROUP),
        "kernels": p.target.name(),
        "max_storage_binding": p.limits.max_storage_buffer_binding_size,
        "max_buffer": p.limits.max_buffer_size,
    })
    .to_string()
}

/// The adapter the runtime would use, as JSON (`name` (from the browser's
/// adapter info where wgpu has none), `backend`,
/// `shader_f16`, `subgroups`, `kernels`, limits); rejects without WebGPU.
#[wasm_bindgen]
pub async fn probe() -> Result<String, JsValue> {
    let p = llama5_runtime::gpu::probe(None).await.map_err(err)?;
    Ok(adapter_json(&p, &crate::browser_adapter_info().await))
}

struct Inner {
    generator: AsyncGenerator<GpuBackend>,
    template: Option<ChatTemplate>,
    messages: Vec<Message>,
}

/// A model on the GPU with its tokenizer and conversation.
#[wasm_bindgen]
pub struct Session {
    inner: Rc<RefCell<Inner>>,
    backend: String,
}

#[wasm_bindgen]
impl Session {
    /// Loads the model directory at `url`. `on_progress(file, done, total, fromCache)`
    /// is called as shards arrive; fails, before downloading, with a sentence
    /// saying why when the model does not fit the adapter.
    pub async fn load(url: String, on_progress: js_sys::Function) -> Result<Session, JsValue> {
        let adapter = llama5_runtime::gpu::probe(None).await.map_err(err)?;
        let manifest = load::fetch_manifest(&url).await.map_err(err)?;
        let ctx = PAGE_CTX.min(manifest.model.max_position_embeddings);
        llama5_runtime::gpu::check_fits(&manifest, &adapter, ctx).map_err(err)?;
        // the tokenizer before the shards: a bad one fails before the download
        let tokenizer_bytes = load::fetch_bytes(&load::join(&url, &manifest.tokenizer.file)).await.map_err(err)?;
        let tokenizer = Tokenizer::from_bytes(&tokenizer_bytes, &manifest.tokenizer).map_err(err)?;
        let template = ChatTemplate::for_tokenizer(&tokenizer).map_err(err)?;
        let mut report = |p: &Progress<'_>| {
            let args = js_sys::Array::of4(
                &p.file.into(),
                &(p.done as f64).into(),
                &(p.total as f64).into(),
                &(p.source == Source::Cache).into(),
            );
            let _ = on_progress.apply(&JsValue::NULL, &args);
        };
        let model = load::fetch_model(&url, manifest, &mut report).await.map_err(err)?;
        let opts = GpuOptions { adapter: None, ctx, pipeline_cache_dir: None };
        let backend = GpuBackend::new_async(&model, &opts, wgpu::Features::all()).await.map_err(|e| match e {
            llama5_runtime::RuntimeError::OutOfMemory(_) => {
                err(format!("the model does not fit this adapter's memory ({e})"))
            }
            other => err(other),
        })?;
        let backend_line = backend.load_report();
        // the shard bytes now live on the device
        drop(model);
        Ok(Session {
            inner: Rc::new(RefCell::new(Inner {
                generator: AsyncGenerator::new(backend, tokenizer),
                template,
                messages: Vec::new(),
            })),
            backend: backend_line,
        })
    }

    /// One line on the backend: adapter, kernel variant, upload and pipelines.
    pub fn backend(&self) -> String {
        self.backend.clone()
    }

    /// One chat turn, greedy: `on_token(id, text)` is called for each token as
    /// it is chosen (`text` is the text it completed, possibly empty). Resolves
    /// to JSON: `tokens`, `text`, `stop`, `prefill_tokens`, `prefill_ms`,
    /// `decode_tokens`, `decode_ms`.
    pub fn chat(&self, user: String, max_tokens: u32, on_token: js_sys::Function) -> js_sys::Promise {
        let inner = self.inner.clone();
        // The borrow lasts the whole turn on purpose: a second turn started
        // meanwhile gets an error from `try_borrow_mut` instead of interleaving.
        #[allow(clippy::await_holding_refcell_ref)]
        wasm_bindgen_futures::future_to_promise(async move {
            let mut guard = inner.try_borrow_mut().map_err(|_| err("a turn is already running"))?;
            let s = &mut *guard;
            let text = match &s.template {
                Some(t) => {
                    let mut messages = s.messages.clone();
                    messages.push(Message::new("user", &user));
                    t.render(&messages, true).map_err(err)?
                }
                None => user.clone(),
            };
            let prompt = s.generator.tokenizer().encode(&text, s.template.is_none()).map_err(err)?;
            let opts = GenerateOptions {
                max_tokens: max_tokens as usize,
                sampling: SamplingParams::greedy(),
                sliding_window: false,
            };
            let mut pending: Option<u32> = None;
            let mut on_event = |e: Streamed<'_>| {
                let call = |id: u32, piece: &str| {
                    let _ = on_token.call2(&JsValue::NULL, &id.into(), &piece.into());
                };
                match e {
                    Streamed::Token(id) => {
                        if let Some(prev) = pending.replace(id) {
                            call(prev, "");
                        }
                    }
                    Streamed::Text(piece) => match pending.take() {
                        Some(id) => call(id, piece),
                        None => call(u32::MAX, piece),
                    },
                }
                Ok(())
            };
            let g = s.generator.generate(&prompt, &opts, &mut on_event).await.map_err(err)?;
            if let Some(id) = pending {
                let _ = on_token.call2(&JsValue::NULL, &id.into(), &"".into());
            }
            s.messages.push(Message::new("user", &user));
            s.messages.push(Message::new("assistant", &g.text));
            let t = &g.timings;
            Ok(serde_json::json!({
                "tokens": g.tokens,
                "text": g.text,
                "stop": format!("{:?}", g.stop),
                "prefill_tokens": t.prefill_tokens,
                "prefill_ms": t.prefill.as_secs_f64() * 1e3,
                "decode_tokens": t.decode_tokens,
                "decode_ms": t.decode.as_secs_f64() * 1e3,
            })
            .to_string()
            .into())
        })
    }

    /// Forgets the conversation and the KV cache's contents.
    pub fn reset(&self) -> Result<(), JsValue> {
        let mut s = self.inner.try_borrow_mut().map_err(|_| err("a turn is running"))?;
        s.messages.clear();
        s.generator.reset();
        Ok(())
    }
}

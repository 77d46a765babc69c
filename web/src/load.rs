//! A model directory over HTTP: `manifest.json`, then each shard streamed with
//! progress, checked against the manifest's length and sha256 (the runtime's
//! `check_shard`), kept in Cache Storage so the next visit reads it from there
//! (and checks it again).

use std::sync::Arc;

use js_sys::{Reflect, Uint8Array};
use llama5_codegen::manifest::Manifest;
use llama5_runtime::model::{check_shard, ShardBytes};
use llama5_runtime::Model;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, Response};

/// The Cache Storage bucket; bump it when the stored layout changes.
pub const CACHE_NAME: &str = "llama5-shards-v1";

/// Where a file came from, for the progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Network,
    Cache,
}

/// Progress of one file.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    pub file: &'a str,
    pub done: u64,
    pub total: u64,
    pub source: Source,
}

/// A JS exception or rejected promise as a message.
pub fn js_error(context: &str, e: JsValue) -> String {
    let text = e
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"));
    format!("{context}: {text}")
}

/// `base` with a trailing slash, then `file`.
pub fn join(base: &str, file: &str) -> String {
    if base.ends_with('/') {
        format!("{base}{file}")
    } else {
        format!("{base}/{file}")
    }
}

async fn fetch(url: &str) -> Result<Response, String> {
    let window = web_sys::window().ok_or("fetch: no window")?;
    let resp = JsFuture::from(window.fetch_with_str(url)).await.map_err(|e| js_error(&format!("fetching {url}"), e))?;
    let resp: Response = resp.dyn_into().map_err(|e| js_error(&format!("fetching {url}"), e))?;
    if !resp.ok() {
        return Err(format!("fetching {url}: HTTP {} {}", resp.status(), resp.status_text()));
    }
    Ok(resp)
}

/// The whole body of `url` (small files: the manifest and tokenizer).
pub async fn fetch_bytes(url: &str) -> Result<Vec<u8>, String> {
    let resp = fetch(url).await?;
    let buf = JsFuture::from(resp.array_buffer().map_err(|e| js_error(url, e))?)
        .await
        .map_err(|e| js_error(&format!("reading {url}"), e))?;
    Ok(Uint8Array::new(&buf).to_vec())
}

/// Cache Storage, or `None` where the page may not use it (an insecure origin).
async fn open_cache() -> Option<Cache> {
    let caches = web_sys::window()?.caches().ok()?;
    JsFuture::from(caches.open(CACHE_NAME)).await.ok()?.dyn_into().ok()
}

async fn cached(cache: &Cache, url: &str) -> Option<Vec<u8>> {
    let hit = JsFuture::from(cache.match_with_str(url)).await.ok()?;
    let resp: Response = hit.dyn_into().ok()?;
    let buf = JsFuture::from(resp.array_buffer().ok()?).await.ok()?;
    Some(Uint8Array::new(&buf).to_vec())
}

/// Streams `url`'s body, reporting progress; at most `total` bytes.
async fn download(
    url: &str,
    file: &str,
    total: u64,
    on_progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<Vec<u8>, String> {
    let resp = fetch(url).await?;
    let body = resp.body().ok_or_else(|| format!("fetching {url}: no body"))?;
    let reader: web_sys::ReadableStreamDefaultReader =
        body.get_reader().dyn_into().map_err(|e| js_error(&format!("reading {url}"), e.into()))?;
    let mut bytes = Vec::with_capacity(total as usize);
    loop {
        let chunk = JsFuture::from(reader.read()).await.map_err(|e| js_error(&format!("reading {url}"), e))?;
        let done = Reflect::get(&chunk, &"done".into()).map(|d| d.is_truthy()).unwrap_or(true);
        if done {
            break;
        }
        let value: Uint8Array = Reflect::get(&chunk, &"value".into())
            .and_then(|v| v.dyn_into())
            .map_err(|e| js_error(&format!("reading {url}"), e))?;
        let start = bytes.len();
        bytes.resize(start + value.length() as usize, 0);
        value.copy_to(&mut bytes[start..]);
        if bytes.len() as u64 > total {
            return Err(format!("{file}: more than the {total} bytes the manifest lists"));
        }
        on_progress(&Progress { file, done: bytes.len() as u64, total, source: Source::Network });
    }
    Ok(bytes)
}

/// Fetches and parses `base/manifest.json`.
pub async fn fetch_manifest(base: &str) -> Result<Manifest, String> {
    let url = join(base, "manifest.json");
    let bytes = fetch_bytes(&url).await?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{url}: not UTF-8"))?;
    let manifest = Manifest::from_json(&text).map_err(|e| format!("{url}: {e}"))?;
    manifest.validate().map_err(|e| format!("{url}: {e}"))?;
    Ok(manifest)
}

/// Every shard of `manifest` from `base`: from Cache Storage when there and
/// intact, else downloaded, checked against the manifest's sha256 and stored.
pub async fn fetch_model(
    base: &str,
    manifest: Manifest,
    on_progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<Model, String> {
    let cache = open_cache().await;
    let mut shards: Vec<ShardBytes> = Vec::with_capacity(manifest.shards.len());
    for entry in &manifest.shards {
        let url = join(base, &entry.file);
        // resolved so the cache key does not depend on how the page spelled the URL
        let key = web_sys::Url::new_with_base(&url, &page_url()).map(|u| u.href()).unwrap_or_else(|_| url.clone());
        let mut bytes = None;
        if let Some(cache) = &cache {
            if let Some(b) = cached(cache, &key).await {
                if check_shard(entry, &b).is_ok() {
                    on_progress(&Progress {
                        file: &entry.file,
                        done: entry.bytes,
                        total: entry.bytes,
                        source: Source::Cache,
                    });
                    bytes = Some(b);
                } else {
                    // stale or damaged: fetch it again
                    let _ = JsFuture::from(cache.delete_with_str(&key)).await;
                }
            }
        }
        let bytes = match bytes {
            Some(b) => b,
            None => {
                let b = download(&url, &entry.file, entry.bytes, on_progress).await?;
                check_shard(entry, &b).map_err(|e| e.to_string())?;
                if let Some(cache) = &cache {
                    store(cache, &key, &b).await.map_err(|e| format!("{}: {e}", entry.file))?;
                }
                b
            }
        };
        shards.push(Arc::new(bytes) as ShardBytes);
    }
    Model::from_parts(manifest, std::path::PathBuf::new(), shards).map_err(|e| e.to_string())
}

async fn store(cache: &Cache, key: &str, bytes: &[u8]) -> Result<(), String> {
    let body = Uint8Array::from(bytes);
    let resp = Response::new_with_opt_buffer_source(Some(&body)).map_err(|e| js_error("caching", e))?;
    JsFuture::from(cache.put_with_str(key, &resp)).await.map_err(|e| js_error("storing in Cache Storage", e))?;
    Ok(())
}

fn page_url() -> String {
    web_sys::window().and_then(|w| w.location().href().ok()).unwrap_or_default()
}

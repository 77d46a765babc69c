//! Helpers shared by the integration tests: the real model's path, small
//! hand-built GGUF files, reading tensors back out of a model directory.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llama5_codegen::format;
use llama5_codegen::manifest::{Manifest, QuantFormat};

/// The real SmolLM2 GGUF. Fails (never skips) when the harness did not provide it.
pub fn real_model() -> PathBuf {
    let Some(path) = std::env::var_os("LLAMA5_MODEL_GGUF") else {
        panic!("LLAMA5_MODEL_GGUF is not set: run `cargo xtask fetch-model` and set it to the .gguf it prints (`cargo xtask test` does both)");
    };
    let path = PathBuf::from(path);
    assert!(path.is_file(), "LLAMA5_MODEL_GGUF={} is not a file: run `cargo xtask fetch-model`", path.display());
    path
}

/// Every file under a directory by relative path, with its bytes.
pub fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    collect_files(dir, "", &mut files);
    files
}

fn collect_files(dir: &Path, prefix: &str, files: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.file_type().unwrap().is_dir() {
            collect_files(&e.path(), &format!("{name}/"), files);
        } else {
            files.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
}

/// Names in a directory's parent that look like the converter's temporary or backup directories.
pub fn leftovers(out: &Path) -> Vec<String> {
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

/// A converted model directory, loaded for checking.
pub struct Converted {
    pub manifest: Manifest,
    pub shards: Vec<Vec<u8>>,
}

impl Converted {
    pub fn load(dir: &Path) -> Converted {
        let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        let manifest = Manifest::from_json(&text).unwrap();
        let shards = manifest.shards.iter().map(|s| std::fs::read(dir.join(&s.file)).unwrap()).collect();
        Converted { manifest, shards }
    }

    fn region(&self, r: &llama5_codegen::manifest::Region) -> &[u8] {
        &self.shards[r.shard][r.offset as usize..(r.offset + r.bytes) as usize]
    }

    /// A tensor dequantized to row-major f32, all parts joined.
    pub fn values(&self, name: &str) -> Vec<f32> {
        let t = &self.manifest.tensors[name];
        if t.format == QuantFormat::F32 {
            return self
                .region(&t.parts[0].data)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
        }
        let mut out = Vec::new();
        for p in &t.parts {
            let scales = p.scales.as_ref().map(|r| self.region(r)).unwrap_or(&[]);
            out.extend(format::unpack(t.format, self.region(&p.data), scales, p.len(), t.in_features()).unwrap());
        }
        out
    }
}

fn gguf_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A GGUF file assembled field by field, so tests can write what no honest writer would.
pub struct RawGguf {
    pub version: u32,
    pub kv_count: Option<u64>,
    pub tensor_count: Option<u64>,
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    pub data: Vec<u8>,
}

impl RawGguf {
    pub fn new() -> Self {
        RawGguf {
            version: 3,
            kv_count: None,
            tensor_count: None,
            kv: Vec::new(),
            n_kv: 0,
            infos: Vec::new(),
            n_tensors: 0,
            data: Vec::new(),
        }
    }

    pub fn kv_str(mut self, key: &str, value: &str) -> Self {
        gguf_str(&mut self.kv, key);
        self.kv.extend(8u32.to_le_bytes());
        gguf_str(&mut self.kv, value);
        self.n_kv += 1;
        self
    }

    pub fn kv_u32(mut self, key: &str, value: u32) -> Self {
        gguf_str(&mut self.kv, key);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(value.to_le_bytes());
        self.n_kv += 1;
        self
    }

    /// Raw bytes for one key: its type id and value encoding as given.
    pub fn kv_raw(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
        gguf_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        gguf_str(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    pub fn data(mut self, data: Vec<u8>) -> Self {
        self.data = data;
        self
    }

    /// The header alone (through the tensor infos, unpadded).
    pub fn header(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.tensor_count.unwrap_or(self.n_tensors).to_le_bytes());
        out.extend(self.kv_count.unwrap_or(self.n_kv).to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        out
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = self.header();
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(&self.data);
        out
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.bytes()).unwrap();
        path.to_path_buf()
    }
}

/// f32 values as little-endian bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

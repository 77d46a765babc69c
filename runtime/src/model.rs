//! A converted model in memory: its manifest and the bytes of its shards.
//!
//! This is the platform seam for weights: natively the shards are memory
//! mapped ([`Model::open`]); on the web they arrive by `fetch` and are handed
//! over as owned buffers ([`Model::from_parts`]). Everything above this module
//! sees only `&[u8]`.

use std::sync::Arc;

use llama5_codegen::format::{part_sizes, PartSizes};
use llama5_codegen::manifest::{Manifest, QuantFormat, Region, ShardEntry, TensorEntry, TensorPart};
use sha2::{Digest, Sha256};

use crate::error::RuntimeError;

/// The bytes of one shard file.
pub type ShardBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A manifest plus its shards, checked against each other.
pub struct Model {
    pub manifest: Manifest,
    /// Directory the model was loaded from (empty on the web).
    pub dir: std::path::PathBuf,
    shards: Vec<ShardBytes>,
}

/// One part of a matrix, borrowed from its shard.
#[derive(Clone, Copy)]
pub struct PartView<'a> {
    pub format: QuantFormat,
    /// Output channels `[start, end)` of the whole tensor this part holds.
    pub rows: [usize; 2],
    pub in_features: usize,
    pub data: &'a [u8],
    pub scales: &'a [u8],
    pub sizes: PartSizes,
    pub entry: &'a TensorPart,
}

impl PartView<'_> {
    pub fn out(&self) -> usize {
        self.rows[1] - self.rows[0]
    }
}

impl Model {
    /// Builds a model from a manifest and already-read shard bytes.
    pub fn from_parts(
        manifest: Manifest,
        dir: std::path::PathBuf,
        shards: Vec<ShardBytes>,
    ) -> Result<Self, RuntimeError> {
        manifest.validate()?;
        if shards.len() != manifest.shards.len() {
            return Err(RuntimeError::Model(format!(
                "{} shards given for {} in the manifest",
                shards.len(),
                manifest.shards.len()
            )));
        }
        for (entry, bytes) in manifest.shards.iter().zip(&shards) {
            check_shard_length(entry, (**bytes).as_ref())?;
        }
        Ok(Model { manifest, dir, shards })
    }

    /// Opens `dir/manifest.json` and memory-maps its shards; with `verify`,
    /// checks every shard's sha256 (in parallel).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(dir: &std::path::Path, verify: bool) -> Result<Self, RuntimeError> {
        use rayon::prelude::*;
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| RuntimeError::Io { path: manifest_path.clone(), source: e })?;
        let manifest =
            Manifest::from_json(&text).map_err(|e| RuntimeError::Model(format!("{}: {e}", manifest_path.display())))?;
        let shards = manifest
            .shards
            .iter()
            .map(|s| {
                let path = dir.join(&s.file);
                let file =
                    std::fs::File::open(&path).map_err(|e| RuntimeError::Io { path: path.clone(), source: e })?;
                // SAFETY: the file is opened read-only and the converter never
                // rewrites a finished model directory in place (it renames a new one over it).
                let map = unsafe { memmap2::Mmap::map(&file) }
                    .map_err(|e| RuntimeError::Io { path: path.clone(), source: e })?;
                Ok(Arc::new(map) as ShardBytes)
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let model = Model::from_parts(manifest, dir.to_path_buf(), shards)?;
        if verify {
            (0..model.shards.len()).into_par_iter().try_for_each(|i| model.verify_shard(i))?;
        }
        Ok(model)
    }

    /// Checks shard `i` against the manifest's sha256.
    pub fn verify_shard(&self, i: usize) -> Result<(), RuntimeError> {
        check_shard(&self.manifest.shards[i], self.shard(i))
    }

    pub fn shard(&self, i: usize) -> &[u8] {
        (*self.shards[i]).as_ref()
    }

    /// The bytes of a region (validated against the shard when the manifest was checked).
    pub fn region(&self, r: &Region) -> &[u8] {
        &self.shard(r.shard)[r.offset as usize..(r.offset + r.bytes) as usize]
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorEntry, RuntimeError> {
        Ok(self.manifest.tensor(name)?)
    }

    /// A 1-D f32 tensor (norm weights).
    pub fn vector(&self, name: &str) -> Result<Vec<f32>, RuntimeError> {
        let t = self.tensor(name)?;
        if t.format != QuantFormat::F32 || t.parts.len() != 1 {
            return Err(RuntimeError::Model(format!("tensor `{name}` is not an f32 vector")));
        }
        let bytes = self.region(&t.parts[0].data);
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// The parts of a matrix tensor.
    pub fn matrix(&self, name: &str) -> Result<Vec<PartView<'_>>, RuntimeError> {
        let t = self.tensor(name)?;
        t.parts
            .iter()
            .map(|p| {
                let sizes = part_sizes(t.format, p.len(), t.in_features())
                    .map_err(|e| RuntimeError::Model(format!("tensor `{name}`: {e}")))?;
                Ok(PartView {
                    format: t.format,
                    rows: p.rows,
                    in_features: t.in_features(),
                    data: self.region(&p.data),
                    scales: p.scales.as_ref().map(|r| self.region(r)).unwrap_or(&[]),
                    sizes,
                    entry: p,
                })
            })
            .collect()
    }
}

/// Checks that `bytes` have the length the manifest lists for `entry`.
pub fn check_shard_length(entry: &ShardEntry, bytes: &[u8]) -> Result<(), RuntimeError> {
    let len = bytes.len() as u64;
    if len != entry.bytes {
        return Err(RuntimeError::Shard {
            file: entry.file.clone(),
            reason: format!("{len} bytes, the manifest says {}", entry.bytes),
        });
    }
    Ok(())
}

/// Checks `bytes` against the length and sha256 the manifest lists for `entry`.
pub fn check_shard(entry: &ShardEntry, bytes: &[u8]) -> Result<(), RuntimeError> {
    check_shard_length(entry, bytes)?;
    let digest = hex::encode(Sha256::digest(bytes));
    if digest != entry.sha256 {
        return Err(RuntimeError::Shard {
            file: entry.file.clone(),
            reason: format!("sha256 {digest} does not match the manifest's {}", entry.sha256),
        });
    }
    Ok(())
}

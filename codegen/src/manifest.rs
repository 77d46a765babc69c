//! The converted model's manifest (`manifest.json`), version 1.
//!
//! This is the contract between the converter, the runtimes and any third-party
//! loader; `docs/manifest.md` is its prose and `docs/manifest.schema.json` its
//! JSON schema. Field order is the serialised order; maps are `BTreeMap` so the
//! file is byte-identical for identical input.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Value of [`Manifest::format`].
pub const MANIFEST_FORMAT: &str = "llama5";
/// Value of [`Manifest::version`]; bumped on any incompatible change.
pub const MANIFEST_VERSION: u32 = 1;
/// Every region starts at a multiple of this many bytes within its shard.
pub const REGION_ALIGN: u64 = 256;
/// Every stored row (and every scale row) is padded to a multiple of this many bytes.
pub const ROW_ALIGN: u64 = 64;
/// Default largest shard: browsers and many devices cap one storage binding near this.
pub const DEFAULT_SHARD_BYTES: u64 = 256 * 1024 * 1024;
/// Default INT4 group size along the input dimension.
pub const DEFAULT_GROUP_SIZE: u32 = 32;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Always [`MANIFEST_VERSION`] for this schema.
    pub version: u32,
    pub model: ModelConfig,
    /// The model's precision tier: the uniform precision of its layers, or `mixed`.
    pub precision: PrecisionTier,
    /// One entry per transformer block, in order.
    pub layers: Vec<LayerEntry>,
    /// Every tensor, by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Shard files in index order; [`Region::shard`] indexes this list.
    pub shards: Vec<ShardEntry>,
    pub tokenizer: TokenizerInfo,
    /// Generated WGSL written beside the manifest, for runtimes that do not link codegen.
    #[serde(default)]
    pub kernels: Vec<KernelFile>,
    pub converter: ConverterInfo,
}

/// Llama hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Always `llama` for now.
    pub architecture: String,
    #[serde(default)]
    pub name: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    /// When true there is no `lm_head.weight`: logits use `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Name of the tensor holding the output (logits) projection.
    pub fn lm_head_name(&self) -> &'static str {
        if self.tie_word_embeddings {
            names::EMBED
        } else {
            names::LM_HEAD
        }
    }
}

/// Canonical tensor names (Hugging Face Llama naming).
pub mod names {
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const FINAL_NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";

    /// The per-layer tensors, as `(suffix, is_matrix)`.
    pub const LAYER_TENSORS: [(&str, bool); 9] = [
        ("input_layernorm.weight", false),
        ("self_attn.q_proj.weight", true),
        ("self_attn.k_proj.weight", true),
        ("self_attn.v_proj.weight", true),
        ("self_attn.o_proj.weight", true),
        ("post_attention_layernorm.weight", false),
        ("mlp.gate_proj.weight", true),
        ("mlp.up_proj.weight", true),
        ("mlp.down_proj.weight", true),
    ];

    pub fn layer(index: usize, suffix: &str) -> String {
        format!("model.layers.{index}.{suffix}")
    }
}

/// A weight precision tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F16,
    Bf16,
    Int8,
    Int4,
}

impl Precision {
    pub const ALL: [Precision; 4] = [Precision::F16, Precision::Bf16, Precision::Int8, Precision::Int4];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
        }
    }

    /// Rank for "highest precision first" choices: larger is more accurate.
    pub fn fidelity(self) -> u8 {
        match self {
            Precision::F16 => 3,
            Precision::Bf16 => 2,
            Precision::Int8 => 1,
            Precision::Int4 => 0,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" => Ok(Precision::F16),
            "bf16" => Ok(Precision::Bf16),
            "int8" | "i8" | "q8" => Ok(Precision::Int8),
            "int4" | "i4" | "q4" => Ok(Precision::Int4),
            other => Err(format!("unknown precision `{other}` (expected f16, bf16, int8 or int4)")),
        }
    }
}

/// [`Manifest::precision`]: uniform or mixed across layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionTier {
    F16,
    Bf16,
    Int8,
    Int4,
    Mixed,
}

impl From<Precision> for PrecisionTier {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F16 => PrecisionTier::F16,
            Precision::Bf16 => PrecisionTier::Bf16,
            Precision::Int8 => PrecisionTier::Int8,
            Precision::Int4 => PrecisionTier::Int4,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    pub index: usize,
    /// Precision of this layer's matrices.
    pub precision: Precision,
    /// Names of the kernels (see `KernelSpec::name`) that run this layer at decode time.
    pub kernels: Vec<String>,
    /// Why this precision was chosen (`uniform`, `per-layer option`, or a calibration note).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How a tensor's values are encoded.
///
/// Matrices are stored in the packed column-major layout described in
/// [`crate::format`]; vectors (norm weights) are plain little-endian f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum QuantFormat {
    /// Plain f32 (norm weights).
    F32,
    F16,
    /// bfloat16, stored as raw u16 and widened in-shader.
    Bf16,
    /// Signed 8-bit values with an f32 scale per output channel (or one per tensor).
    Int8 {
        per_tensor: bool,
    },
    /// Unsigned 4-bit values in groups of `group_size` along the input dimension,
    /// each group with an f16 scale and f16 minimum: `w = scale * q + min`.
    /// Symmetric quantization stores `min = -8 * scale`.
    Int4 {
        group_size: u32,
        symmetric: bool,
    },
}

impl QuantFormat {
    pub fn for_precision(p: Precision, group_size: u32, symmetric: bool, per_tensor: bool) -> Self {
        match p {
            Precision::F16 => QuantFormat::F16,
            Precision::Bf16 => QuantFormat::Bf16,
            Precision::Int8 => QuantFormat::Int8 { per_tensor },
            Precision::Int4 => QuantFormat::Int4 { group_size, symmetric },
        }
    }

    /// The precision tier this format belongs to (`None` for f32 vectors).
    pub fn precision(&self) -> Option<Precision> {
        match self {
            QuantFormat::F32 => None,
            QuantFormat::F16 => Some(Precision::F16),
            QuantFormat::Bf16 => Some(Precision::Bf16),
            QuantFormat::Int8 { .. } => Some(Precision::Int8),
            QuantFormat::Int4 { .. } => Some(Precision::Int4),
        }
    }
}

/// Where a tensor's bytes are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// A 1-D f32 vector.
    Vector,
    /// The packed column-major matrix layout of [`crate::format`].
    PackedColumnMajor,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Logical shape in PyTorch order: `[out, in]` for a matrix, `[n]` for a vector.
    pub shape: Vec<usize>,
    pub format: QuantFormat,
    pub layout: Layout,
    /// Parts split along the output dimension (PyTorch rows); one part unless the
    /// tensor is larger than a shard.
    pub parts: Vec<TensorPart>,
}

impl TensorEntry {
    pub fn out_features(&self) -> usize {
        self.shape[0]
    }
    pub fn in_features(&self) -> usize {
        *self.shape.last().unwrap_or(&0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorPart {
    /// Output channels `[start, end)` held by this part.
    pub rows: [usize; 2],
    /// Packed values.
    pub data: Region,
    /// Bytes from one stored row of `data` to the next (a multiple of [`ROW_ALIGN`]).
    pub row_stride: u64,
    /// INT8: f32 scales; INT4: `pack2x16float(scale, min)` words. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scales: Option<Region>,
    /// Bytes from one stored row of `scales` to the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_stride: Option<u64>,
}

impl TensorPart {
    pub fn len(&self) -> usize {
        self.rows[1] - self.rows[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A byte range inside one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub shard: usize,
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// File name relative to the manifest (`shard_00000.bin`).
    pub file: String,
    pub bytes: u64,
    /// Lower-case hex sha256 of the whole file.
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    /// A Hugging Face `tokenizer.json`, relative to the manifest.
    pub file: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Generation stops on any of these.
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    /// Whether a BOS token is prepended to plain prompts.
    #[serde(default)]
    pub add_bos: bool,
    /// A Jinja chat template (Hugging Face conventions: `messages`, `add_generation_prompt`).
    #[serde(default)]
    pub chat_template: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelFile {
    /// Kernel name (see `KernelSpec::name`).
    pub name: String,
    /// The target it was generated for (`Target::name`).
    pub target: String,
    /// WGSL file relative to the manifest.
    pub file: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConverterInfo {
    pub name: String,
    pub version: String,
    /// The source the model was converted from (file name only, no directories).
    pub source: String,
    /// The options the converter ran with, as given.
    pub options: BTreeMap<String, String>,
}

/// A manifest that is self-consistent: every region inside its shard, every
/// tensor the model needs present with the right shape.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest: unsupported format `{0}` (expected `llama5`)")]
    Format(String),
    #[error("manifest: unsupported version {0} (this build reads version {MANIFEST_VERSION})")]
    Version(u32),
    #[error("manifest: unknown architecture `{0}` (expected `llama`)")]
    Architecture(String),
    #[error("manifest: tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("manifest: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("manifest: tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("manifest: {0}")]
    Other(String),
}

impl Manifest {
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| ManifestError::Other(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serialises");
        s.push('\n');
        s
    }

    /// The shape each tensor of this model must have, by name.
    pub fn expected_shapes(cfg: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let mut m = BTreeMap::new();
        m.insert(names::EMBED.to_string(), vec![cfg.vocab_size, h]);
        m.insert(names::FINAL_NORM.to_string(), vec![h]);
        if !cfg.tie_word_embeddings {
            m.insert(names::LM_HEAD.to_string(), vec![cfg.vocab_size, h]);
        }
        for l in 0..cfg.num_layers {
            for (suffix, _) in names::LAYER_TENSORS {
                let shape = match suffix {
                    "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
                    "self_attn.q_proj.weight" => vec![cfg.q_dim(), h],
                    "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![cfg.kv_dim(), h],
                    "self_attn.o_proj.weight" => vec![h, cfg.q_dim()],
                    "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![f, h],
                    "mlp.down_proj.weight" => vec![h, f],
                    _ => unreachable!("names::LAYER_TENSORS and this match agree"),
                };
                m.insert(names::layer(l, suffix), shape);
            }
        }
        m
    }

    /// Checks everything a loader relies on before it touches a shard.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format(self.format.clone()));
        }
        if self.version != MANIFEST_VERSION {
            return Err(ManifestError::Version(self.version));
        }
        let cfg = &self.model;
        if cfg.architecture != "llama" {
            return Err(ManifestError::Architecture(cfg.architecture.clone()));
        }
        if cfg.num_heads == 0 || cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            return Err(ManifestError::Other(format!(
                "num_heads {} must be a positive multiple of num_kv_heads {}",
                cfg.num_heads, cfg.num_kv_heads
            )));
        }
        if cfg.head_dim == 0 || !cfg.head_dim.is_multiple_of(2) {
            return Err(ManifestError::Other(format!("head_dim {} must be even and positive", cfg.head_dim)));
        }
        if self.layers.len() != cfg.num_layers {
            return Err(ManifestError::Other(format!(
                "{} layer entries for num_layers {}",
                self.layers.len(),
                cfg.num_layers
            )));
        }
        for (name, expected) in Self::expected_shapes(cfg) {
            let t = self.tensors.get(&name).ok_or_else(|| ManifestError::MissingTensor(name.clone()))?;
            if t.shape != expected {
                return Err(ManifestError::Shape { name, found: t.shape.clone(), expected });
            }
        }
        for (name, t) in &self.tensors {
            self.validate_tensor(name, t)?;
        }
        Ok(())
    }

    fn validate_tensor(&self, name: &str, t: &TensorEntry) -> Result<(), ManifestError> {
        let bad = |reason: String| ManifestError::Tensor { name: name.to_string(), reason };
        let expected_layout = match t.shape.len() {
            1 => Layout::Vector,
            2 => Layout::PackedColumnMajor,
            n => return Err(bad(format!("{n}-D tensors are not supported"))),
        };
        if t.layout != expected_layout {
            return Err(bad(format!("layout {:?} does not suit shape {:?}", t.layout, t.shape)));
        }
        if (t.layout == Layout::Vector) != (t.format == QuantFormat::F32) {
            return Err(bad("vectors are f32 and matrices are never f32".into()));
        }
        let mut next_row = 0;
        for part in &t.parts {
            if part.rows[0] != next_row || part.rows[1] <= part.rows[0] {
                return Err(bad(format!("part rows {:?} do not continue from {next_row}", part.rows)));
            }
            next_row = part.rows[1];
            let expected = crate::format::part_sizes(t.format, part.len(), t.in_features());
            let expected = expected.map_err(|e| bad(e.to_string()))?;
            if part.data.bytes != expected.data_bytes || part.row_stride != expected.row_stride {
                return Err(bad(format!(
                    "data region of {} bytes with stride {}, expected {} bytes with stride {}",
                    part.data.bytes, part.row_stride, expected.data_bytes, expected.row_stride
                )));
            }
            self.validate_region(name, &part.data)?;
            match (&part.scales, expected.scale_bytes) {
                (None, 0) => {}
                (Some(r), n) if r.bytes == n && part.scale_stride == Some(expected.scale_stride) => {
                    self.validate_region(name, r)?
                }
                _ => return Err(bad("scale region missing or of the wrong size".into())),
            }
        }
        if next_row != t.out_features() {
            return Err(bad(format!("parts cover {next_row} of {} rows", t.out_features())));
        }
        Ok(())
    }

    fn validate_region(&self, name: &str, r: &Region) -> Result<(), ManifestError> {
        let bad = |reason: String| ManifestError::Tensor { name: name.to_string(), reason };
        let shard = self.shards.get(r.shard).ok_or_else(|| bad(format!("shard index {} out of range", r.shard)))?;
        if !r.offset.is_multiple_of(REGION_ALIGN) {
            return Err(bad(format!("offset {} is not {REGION_ALIGN}-byte aligned", r.offset)));
        }
        let end = r.offset.checked_add(r.bytes).ok_or_else(|| bad("region end overflows".into()))?;
        if end > shard.bytes {
            return Err(bad(format!("region {}..{end} lies outside {} ({} bytes)", r.offset, shard.file, shard.bytes)));
        }
        Ok(())
    }

    /// All matrices a layer owns, by suffix.
    pub fn layer_tensor(&self, layer: usize, suffix: &str) -> Result<&TensorEntry, ManifestError> {
        let name = names::layer(layer, suffix);
        self.tensors.get(&name).ok_or(ManifestError::MissingTensor(name))
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorEntry, ManifestError> {
        self.tensors.get(name).ok_or_else(|| ManifestError::MissingTensor(name.to_string()))
    }

    /// Bytes of all shards.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

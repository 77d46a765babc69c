//! `llama5-convert inspect`: what a converted model directory or an input holds.

use std::collections::BTreeMap;
use std::path::Path;

use llama5_codegen::manifest::{Manifest, ModelConfig, QuantFormat, ShardEntry};
use serde::Serialize;

use crate::error::{ConvertError, IoContext};
use crate::source::Source;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorSummary {
    pub shape: Vec<usize>,
    /// Stored encoding: a source dtype (`BF16`, `Q4_1`) or a manifest format (`int4`).
    pub dtype: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Inspection {
    /// `model` (a converted directory), `safetensors` or `gguf`.
    pub kind: String,
    pub path: String,
    pub config: ModelConfig,
    /// Model precision tier (converted directories only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    pub parameters: u64,
    /// Stored bytes by encoding.
    pub bytes_by_type: BTreeMap<String, u64>,
    pub tensors: BTreeMap<String, TensorSummary>,
    /// Converted directories only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardEntry>,
    /// Source tensors with no Hugging Face name (the converter ignores them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unmapped: Vec<String>,
}

fn format_name(f: &QuantFormat) -> String {
    match f {
        QuantFormat::F32 => "f32".into(),
        QuantFormat::F16 => "f16".into(),
        QuantFormat::Bf16 => "bf16".into(),
        QuantFormat::Int8 { per_tensor: false } => "int8".into(),
        QuantFormat::Int8 { per_tensor: true } => "int8 (per tensor)".into(),
        QuantFormat::Int4 { group_size, symmetric } => {
            format!("int4 g{group_size} {}", if *symmetric { "symmetric" } else { "asymmetric" })
        }
    }
}

/// Describes a model directory (one holding `manifest.json`) or any input [`Source::open`] accepts.
pub fn inspect(path: &Path) -> Result<Inspection, ConvertError> {
    let manifest_path = path.join("manifest.json");
    if path.is_dir() && manifest_path.is_file() {
        let text = std::fs::read_to_string(&manifest_path).at(&manifest_path)?;
        let m = Manifest::from_json(&text)?;
        return Ok(from_manifest(path, m));
    }
    let source = Source::open(path)?;
    let tensors: BTreeMap<String, TensorSummary> = source
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, TensorSummary { shape: t.shape, dtype: t.dtype, bytes: t.bytes }))
        .collect();
    Ok(summarise(source.kind(), path, source.config().clone(), None, tensors, Vec::new(), source.unmapped()))
}

fn from_manifest(path: &Path, m: Manifest) -> Inspection {
    let tensors = m
        .tensors
        .iter()
        .map(|(name, t)| {
            let bytes = t.parts.iter().map(|p| p.data.bytes + p.scales.map_or(0, |s| s.bytes)).sum();
            (name.clone(), TensorSummary { shape: t.shape.clone(), dtype: format_name(&t.format), bytes })
        })
        .collect();
    let precision = serde_json::to_value(m.precision).ok().and_then(|v| v.as_str().map(str::to_string));
    summarise("model", path, m.model, precision, tensors, m.shards, Vec::new())
}

fn summarise(
    kind: &str,
    path: &Path,
    config: ModelConfig,
    precision: Option<String>,
    tensors: BTreeMap<String, TensorSummary>,
    shards: Vec<ShardEntry>,
    unmapped: Vec<String>,
) -> Inspection {
    let mut bytes_by_type = BTreeMap::new();
    for t in tensors.values() {
        *bytes_by_type.entry(t.dtype.clone()).or_insert(0) += t.bytes;
    }
    let parameters = tensors.values().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    Inspection {
        kind: kind.into(),
        path: path.display().to_string(),
        config,
        precision,
        parameters,
        bytes_by_type,
        tensors,
        shards,
        unmapped,
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        writeln!(f, "{} ({})", self.path, self.kind)?;
        if let Some(name) = &c.name {
            writeln!(f, "  name:          {name}")?;
        }
        writeln!(f, "  architecture:  {}", c.architecture)?;
        writeln!(f, "  layers:        {}", c.num_layers)?;
        writeln!(f, "  hidden:        {} (intermediate {})", c.hidden_size, c.intermediate_size)?;
        writeln!(f, "  heads:         {} query, {} key/value, head dim {}", c.num_heads, c.num_kv_heads, c.head_dim)?;
        writeln!(f, "  vocab:         {}", c.vocab_size)?;
        writeln!(f, "  context:       {}", c.max_position_embeddings)?;
        writeln!(f, "  rope theta:    {}, rms eps {}", c.rope_theta, c.rms_norm_eps)?;
        writeln!(f, "  tied lm head:  {}", c.tie_word_embeddings)?;
        if let Some(p) = &self.precision {
            writeln!(f, "  precision:     {p}")?;
        }
        writeln!(f, "  parameters:    {} ({:.1} M)", self.parameters, self.parameters as f64 / 1e6)?;
        writeln!(f, "  bytes by type:")?;
        for (ty, bytes) in &self.bytes_by_type {
            writeln!(f, "    {ty:<24} {}", human(*bytes))?;
        }
        writeln!(f, "  tensors:       {}", self.tensors.len())?;
        let first_layer =
            self.tensors.iter().filter(|(n, _)| !n.starts_with("model.layers.") || n.starts_with("model.layers.0."));
        for (name, t) in first_layer {
            writeln!(f, "    {name:<48} {:<14} {:<24} {}", format!("{:?}", t.shape), t.dtype, human(t.bytes))?;
        }
        if c.num_layers > 1 {
            writeln!(f, "    (layers 1..{} not listed; --json lists every tensor)", c.num_layers - 1)?;
        }
        if !self.shards.is_empty() {
            writeln!(f, "  shards:")?;
            for s in &self.shards {
                writeln!(f, "    {} {:>10} sha256 {}", s.file, human(s.bytes), s.sha256)?;
            }
        }
        if !self.unmapped.is_empty() {
            writeln!(f, "  ignored tensors: {}", self.unmapped.join(", "))?;
        }
        Ok(())
    }
}

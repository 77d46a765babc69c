//! `llama5-convert calibrate`: measures, per unit (each transformer block, and
//! the embedding with the LM head) and per candidate precision, how much
//! quantizing that unit alone changes the model's predictions, and writes it
//! to a reviewable JSON file that `--calibration` later routes with.
//!
//! The candidates are real conversions (this crate's writer, into a temporary
//! directory), so a measured unit holds exactly the bytes a converted model
//! would; the forward pass is the runtime's CPU backend, the project's
//! reference, through `llama5_runtime::calibrate`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use llama5_codegen::format::align_up;
use llama5_codegen::manifest::{names, ModelConfig, Precision, QuantFormat, REGION_ALIGN};
use llama5_runtime::calibrate::{Reference, Unit};
use llama5_runtime::tokenizer::Tokenizer;
use llama5_runtime::Model;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ConvertError, IoContext};
use crate::options::{ConvertOptions, PrecisionSpec};
use crate::source::Source;
use crate::writer::{convert_source, matrix_bytes, TempDir};

/// Value of [`Calibration::format`].
pub const CALIBRATION_FORMAT: &str = "llama5-calibration";
/// Value of [`Calibration::version`]; bumped on any incompatible change.
pub const CALIBRATION_VERSION: u32 = 1;
/// The precision every measurement is against.
pub const REFERENCE: Precision = Precision::F16;

/// A calibration file (`calibration.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Always [`CALIBRATION_FORMAT`].
    pub format: String,
    /// Always [`CALIBRATION_VERSION`].
    pub version: u32,
    pub model: ModelConfig,
    pub source: Fingerprint,
    pub text: Fingerprint,
    /// Tokens of the text the measurements ran over (one window from position 0).
    pub tokens: usize,
    pub options: CalibrationOptions,
    /// One entry per unit: `embed`, then `layers.0`, `layers.1`, ...
    pub units: Vec<UnitCalibration>,
}

/// A file by name and content hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    pub file: String,
    pub sha256: String,
}

/// The quantization options the measurements hold for; routing with other
/// options is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationOptions {
    /// The precision of the unquantized run the effects are measured against.
    pub reference: Precision,
    /// The precisions measured.
    pub precisions: Vec<Precision>,
    pub group_size: u32,
    pub symmetric: bool,
    pub int8_per_tensor: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitCalibration {
    /// `embed` or `layers.N`.
    pub unit: String,
    /// Bytes the unit's matrices add to the model at each precision (the
    /// reference's included).
    pub bytes: BTreeMap<Precision, u64>,
    /// The effect of quantizing this unit alone, per measured precision.
    pub effects: BTreeMap<Precision, Effect>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Effect {
    /// Mean KL divergence of the next-token distribution from the reference's, nats per position.
    pub kl: f64,
    /// Relative error of the unit's own output (see `llama5_runtime::calibrate::UnitEffect`).
    pub rel_error: f64,
}

/// What `calibrate` measures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalibrateOptions {
    /// At most this many tokens of the text are used.
    pub tokens: usize,
    pub precisions: Vec<Precision>,
    pub group_size: u32,
    pub symmetric: bool,
    pub int8_per_tensor: bool,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        let d = ConvertOptions::default();
        CalibrateOptions {
            tokens: 256,
            precisions: vec![Precision::Int8, Precision::Int4],
            group_size: d.group_size,
            symmetric: d.symmetric,
            int8_per_tensor: d.int8_per_tensor,
        }
    }
}

impl CalibrateOptions {
    /// Conversion options of a uniform model at `p`, embedding included.
    fn convert_options(&self, p: Precision) -> ConvertOptions {
        let spec: PrecisionSpec = format!("embed={p},*={p}").parse().expect("a valid spec");
        ConvertOptions {
            precision: spec,
            group_size: self.group_size,
            symmetric: self.symmetric,
            int8_per_tensor: self.int8_per_tensor,
            ..ConvertOptions::default()
        }
    }
}

/// The names of a unit's matrices.
pub fn unit_matrices(cfg: &ModelConfig, unit: Unit) -> Vec<String> {
    match unit {
        Unit::Embedding if cfg.tie_word_embeddings => vec![names::EMBED.into()],
        Unit::Embedding => vec![names::EMBED.into(), names::LM_HEAD.into()],
        Unit::Layer(l) => {
            names::LAYER_TENSORS.iter().filter(|(_, matrix)| *matrix).map(|(s, _)| names::layer(l, s)).collect()
        }
    }
}

/// Bytes `unit`'s matrices take at `p` under `options`: each part's block
/// rounded up to the region alignment, so sums bound the shards from above.
pub fn unit_bytes(cfg: &ModelConfig, unit: Unit, p: Precision, options: &ConvertOptions) -> Result<u64, ConvertError> {
    let format = QuantFormat::for_precision(p, options.group_size, options.symmetric, options.int8_per_tensor);
    let shapes = llama5_codegen::manifest::Manifest::expected_shapes(cfg);
    let mut total = 0;
    for name in unit_matrices(cfg, unit) {
        let shape = &shapes[&name];
        total += matrix_bytes(&name, format, shape[0], shape[1], options.shard_size)?;
    }
    Ok(total)
}

/// Bytes of everything that is not a unit (the f32 norm vectors), aligned.
pub fn fixed_bytes(cfg: &ModelConfig) -> u64 {
    let vector = align_up(cfg.hidden_size as u64 * 4, REGION_ALIGN);
    vector * (2 * cfg.num_layers as u64 + 1)
}

/// sha256 of a file, or of a directory's `.json` and `.safetensors` files (names and bytes, sorted).
pub fn fingerprint(path: &Path) -> Result<Fingerprint, ConvertError> {
    let mut hash = Sha256::new();
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).at(path)? {
            let p = entry.at(path)?.path();
            if p.extension().is_some_and(|e| e == "json" || e == "safetensors") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        if path.is_dir() {
            hash.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        }
        let mut file = std::fs::File::open(f).at(f)?;
        loop {
            let n = file.read(&mut buf).at(f)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
    }
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Fingerprint { file, sha256: hex::encode(hash.finalize()) })
}

/// Measures every unit of `input` at every precision of `options` over the
/// first `options.tokens` tokens of `text`.
pub fn calibrate(input: &Path, text: &Path, options: &CalibrateOptions) -> Result<Calibration, ConvertError> {
    // the reference is measured against, not as a candidate
    let mut precisions = options.precisions.clone();
    precisions.retain(|&p| p != REFERENCE);
    precisions.sort_by_key(|p| std::cmp::Reverse(p.fidelity()));
    precisions.dedup();
    if precisions.is_empty() {
        return Err(ConvertError::Options(format!(
            "calibration needs at least one precision other than the {REFERENCE} reference"
        )));
    }
    if options.tokens < 2 {
        return Err(ConvertError::Options(format!("--tokens {} is below 2", options.tokens)));
    }
    let source = Source::open(input)?;
    let cfg = source.config().clone();
    let text_str = std::fs::read_to_string(text).at(text)?;

    // unique per call: calibrations may run side by side in one process
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = TempDir::create(std::env::temp_dir().join(format!("llama5-calibrate-{}-{call}", std::process::id())))?;
    let dir_of = |p: Precision| work.path().join(p.as_str());
    for &p in std::iter::once(&REFERENCE).chain(&precisions) {
        convert_source(&source, &dir_of(p), &options.convert_options(p))?;
    }
    let reference = Model::open(&dir_of(REFERENCE), false)?;
    let tokenizer = Tokenizer::for_model(&reference)?;
    let mut tokens = tokenizer.encode(&text_str, true)?;
    tokens.truncate(options.tokens);
    if tokens.len() < 2 {
        return Err(ConvertError::invalid(
            text,
            "text",
            format!("{} tokens; calibration needs at least 2", tokens.len()),
        ));
    }
    let run = Reference::new(&reference, &tokens)?;
    let mut effects: BTreeMap<Precision, Vec<_>> = BTreeMap::new();
    for &p in &precisions {
        let candidate = Model::open(&dir_of(p), false)?;
        effects.insert(p, run.measure(&candidate)?);
    }

    let recorded = options.convert_options(REFERENCE);
    let mut units = Vec::new();
    for (i, unit) in Unit::all(cfg.num_layers).into_iter().enumerate() {
        let mut bytes = BTreeMap::new();
        for &p in std::iter::once(&REFERENCE).chain(&precisions) {
            bytes.insert(p, unit_bytes(&cfg, unit, p, &recorded)?);
        }
        let effects = effects.iter().map(|(&p, e)| (p, Effect { kl: e[i].kl, rel_error: e[i].rel_error })).collect();
        units.push(UnitCalibration { unit: unit.to_string(), bytes, effects });
    }
    Ok(Calibration {
        format: CALIBRATION_FORMAT.into(),
        version: CALIBRATION_VERSION,
        model: cfg,
        source: fingerprint(source.path())?,
        text: fingerprint(text)?,
        tokens: tokens.len(),
        options: CalibrationOptions {
            reference: REFERENCE,
            precisions,
            group_size: options.group_size,
            symmetric: options.symmetric,
            int8_per_tensor: options.int8_per_tensor,
        },
        units,
    })
}

impl Calibration {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a calibration serialises");
        s.push('\n');
        s
    }

    /// Parses and validates a calibration file; errors name `path` and the field.
    pub fn read(path: &Path) -> Result<Calibration, ConvertError> {
        let text = std::fs::read_to_string(path).at(path)?;
        let cal: Calibration = serde_json::from_str(&text).map_err(|e| {
            let line = format!("line {} column {}", e.line(), e.column());
            ConvertError::invalid(path, line, e.to_string())
        })?;
        cal.validate(path)?;
        Ok(cal)
    }

    /// Checks what routing relies on: the format, one entry per unit in
    /// order, a finite measurement for every precision and a size for each.
    pub fn validate(&self, path: &Path) -> Result<(), ConvertError> {
        let bad = |field: String, reason: String| Err(ConvertError::invalid(path, field, reason));
        if self.format != CALIBRATION_FORMAT {
            return bad("format".into(), format!("`{}` is not `{CALIBRATION_FORMAT}`", self.format));
        }
        if self.version != CALIBRATION_VERSION {
            return bad("version".into(), format!("{} is not {CALIBRATION_VERSION}", self.version));
        }
        if self.options.precisions.is_empty() {
            return bad("options.precisions".into(), "is empty".into());
        }
        let want = Unit::all(self.model.num_layers);
        if self.units.len() != want.len() {
            return bad(
                "units".into(),
                format!(
                    "{} entries for a model of {} layers (expected {})",
                    self.units.len(),
                    self.model.num_layers,
                    want.len()
                ),
            );
        }
        for (i, (u, w)) in self.units.iter().zip(&want).enumerate() {
            if u.unit != w.to_string() {
                return bad(format!("units[{i}].unit"), format!("`{}` where `{w}` belongs", u.unit));
            }
            for p in std::iter::once(&self.options.reference).chain(&self.options.precisions) {
                if !u.bytes.contains_key(p) {
                    return bad(format!("units[{i}].bytes"), format!("has no {p} entry"));
                }
            }
            for p in &self.options.precisions {
                let Some(e) = u.effects.get(p) else {
                    return bad(format!("units[{i}].effects"), format!("has no {p} entry"));
                };
                for (name, v) in [("kl", e.kl), ("rel_error", e.rel_error)] {
                    if !v.is_finite() || v < 0.0 {
                        return bad(
                            format!("units[{i}].effects.{p}.{name}"),
                            format!("{v} is not a finite number >= 0"),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The unit entries with their [`Unit`]s (validated names).
    pub fn unit_entries(&self) -> impl Iterator<Item = (Unit, &UnitCalibration)> {
        Unit::all(self.model.num_layers).into_iter().zip(&self.units)
    }
}

//! The model directory writer: plans every region, then streams tensors one at
//! a time from the source through the packers into shard files.
//!
//! Output is built in a hidden sibling directory (`.<name>.tmp-<pid>`) and
//! renamed into place only once the manifest validates, so a failed run never
//! leaves a half-written model and never touches the previous one.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use half::f16;
use llama5_codegen::format::{self, align_up, PackedMatrix};
use llama5_codegen::manifest::{
    names, ConverterInfo, KernelFile, LayerEntry, Layout, Manifest, ModelConfig, Precision, PrecisionTier, QuantFormat,
    Region, ShardEntry, TensorEntry, TensorPart, MANIFEST_FORMAT, MANIFEST_VERSION, REGION_ALIGN,
};
use llama5_codegen::{generated_files, layer_kernel_names, LayerFormats, Target};
use sha2::{Digest, Sha256};

use crate::error::{ConvertError, IoContext};
use crate::options::ConvertOptions;
use crate::source::{Source, SourceTokenizer, Weights, GGML_GROUP};

/// Converts `input` (HF directory, `.safetensors` or `.gguf`) into a model directory at `out_dir`.
pub fn convert(input: &Path, out_dir: &Path, options: &ConvertOptions) -> Result<Manifest, ConvertError> {
    check_options(options)?;
    let state = output_state(out_dir, options.force, "manifest.json")?;
    let source = Source::open(input)?;
    convert_source_checked(&source, out_dir, options, state)
}

/// [`convert`] for an already opened source.
pub fn convert_source(source: &Source, out_dir: &Path, options: &ConvertOptions) -> Result<Manifest, ConvertError> {
    check_options(options)?;
    let state = output_state(out_dir, options.force, "manifest.json")?;
    convert_source_checked(source, out_dir, options, state)
}

/// Names of the kernels that run layer `layer` at decode time, recorded in
/// [`LayerEntry::kernels`], for the portable target.
pub fn kernel_names(config: &ModelConfig, layer: usize, formats: &BTreeMap<String, QuantFormat>) -> Vec<String> {
    let lf = LayerFormats::lookup(layer, |name| formats.get(name).copied())
        .expect("the plan holds every tensor of every layer");
    layer_kernel_names(config, &lf, &Target::portable())
}

/// Writes the portable target's WGSL beside the manifest (`kernels/`), so a
/// runtime that does not link codegen can load the model from files alone.
fn write_kernels(dir: &Path, manifest: &Manifest) -> Result<Vec<KernelFile>, ConvertError> {
    let target = Target::portable();
    let files = match generated_files(manifest, &[target]) {
        Ok(files) => files,
        // The CPU backend runs any valid manifest; the GPU kernels need, for
        // example, every layer matrix in one part. Say so rather than fail.
        Err(e) => {
            eprintln!("llama5-convert: no kernels written beside the manifest: {e}");
            return Ok(Vec::new());
        }
    };
    let kernels_dir = dir.join("kernels");
    std::fs::create_dir_all(&kernels_dir).at(&kernels_dir)?;
    let mut entries = Vec::new();
    for (file, text) in &files {
        let path = kernels_dir.join(file);
        std::fs::write(&path, text).at(&path)?;
        if let Some(name) = file.strip_suffix(".wgsl") {
            entries.push(KernelFile {
                name: name.into(),
                target: target.name().into(),
                file: format!("kernels/{file}"),
            });
        }
    }
    Ok(entries)
}

/// Converts `input` once per precision into `out_dir/<precision>/` (the
/// runtime's tier directory), all or nothing: the tiers are built together in
/// one temporary sibling and renamed into place at once. A file byte-identical
/// to the same file of an earlier tier (the tokenizer, shared kernels) becomes
/// a hard link to it.
pub fn convert_tiers(
    input: &Path,
    out_dir: &Path,
    precisions: &[Precision],
    options: &ConvertOptions,
) -> Result<Vec<Manifest>, ConvertError> {
    check_options(options)?;
    if precisions.is_empty() {
        return Err(ConvertError::Options("no tier precision given".into()));
    }
    for (i, p) in precisions.iter().enumerate() {
        if precisions[..i].contains(p) {
            return Err(ConvertError::Options(format!("tier {p} is named twice")));
        }
    }
    let state = tiers_output_state(out_dir, options.force)?;
    let source = Source::open(input)?;
    if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).at(parent)?;
    }
    let tmp = TempDir::create(sibling(out_dir, "tmp"))?;
    let mut manifests = Vec::new();
    let mut written: Vec<PathBuf> = Vec::new();
    for &p in precisions {
        let opts = ConvertOptions { precision: crate::PrecisionSpec::uniform(p), ..options.clone() };
        let plan = plan(&source, &opts)?;
        let tokenizer = source.tokenizer()?;
        let dir = tmp.path().join(p.as_str());
        std::fs::create_dir_all(&dir).at(&dir)?;
        manifests.push(write_model(&source, &plan, tokenizer, &dir, &opts)?);
        link_duplicates(&dir, &written)?;
        written.push(dir);
    }
    install(tmp, out_dir, state == OutputState::Replace)?;
    Ok(manifests)
}

/// Like [`output_state`] for a directory of tiers: an earlier output is one
/// whose immediate subdirectories hold a `manifest.json`.
fn tiers_output_state(out: &Path, force: bool) -> Result<OutputState, ConvertError> {
    let is_tiers = std::fs::read_dir(out)
        .map(|entries| entries.flatten().any(|e| e.path().join("manifest.json").is_file()))
        .unwrap_or(false);
    if !is_tiers {
        return output_state(out, force, "manifest.json");
    }
    if force {
        Ok(OutputState::Replace)
    } else {
        Err(ConvertError::Output {
            path: out.into(),
            reason: "already holds model tiers; pass --force to replace them".into(),
        })
    }
}

/// Every file under `dir`, as paths relative to it, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, ConvertError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for entry in std::fs::read_dir(&abs).at(&abs)? {
            let entry = entry.at(&abs)?;
            let rel = rel.join(entry.file_name());
            if entry.file_type().at(&entry.path())?.is_dir() {
                stack.push(rel);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Replaces each file of `dir` that is byte-identical to the same file of an
/// earlier tier by a hard link to that file.
fn link_duplicates(dir: &Path, earlier: &[PathBuf]) -> Result<(), ConvertError> {
    for rel in files_under(dir)? {
        let path = dir.join(&rel);
        let len = std::fs::metadata(&path).at(&path)?.len();
        for other in earlier.iter().map(|e| e.join(&rel)) {
            if std::fs::metadata(&other).is_ok_and(|m| m.len() == len)
                && std::fs::read(&other).at(&other)? == std::fs::read(&path).at(&path)?
            {
                std::fs::remove_file(&path).at(&path)?;
                std::fs::hard_link(&other, &path).at(&path)?;
                break;
            }
        }
    }
    Ok(())
}

fn check_options(o: &ConvertOptions) -> Result<(), ConvertError> {
    if o.group_size == 0 || !o.group_size.is_multiple_of(8) {
        return Err(ConvertError::Options(format!("group size {} must be a positive multiple of 8", o.group_size)));
    }
    if o.shard_size < REGION_ALIGN {
        return Err(ConvertError::Options(format!("shard size {} is below {REGION_ALIGN} bytes", o.shard_size)));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutputState {
    Absent,
    EmptyDir,
    /// An earlier output (holding `marker`), to be replaced.
    Replace,
}

/// What is at `out` now; an error unless it is absent, empty, or an earlier
/// output (holding `marker`) that `force` allows replacing.
pub(crate) fn output_state(out: &Path, force: bool, marker: &str) -> Result<OutputState, ConvertError> {
    let bad = |reason: String| ConvertError::Output { path: out.into(), reason };
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(OutputState::Absent);
    };
    if !meta.is_dir() {
        return Err(bad("exists and is not a directory".into()));
    }
    if out.join(marker).is_file() {
        return if force {
            Ok(OutputState::Replace)
        } else {
            Err(bad(format!("already holds an output ({marker}); pass --force to replace it")))
        };
    }
    if std::fs::read_dir(out).at(out)?.next().is_none() {
        return Ok(OutputState::EmptyDir);
    }
    Err(bad(format!("exists, is not empty and has no {marker}; refusing to replace it")))
}

/// A sibling of `out` named `.<name>.<tag>-<pid>`.
pub(crate) fn sibling(out: &Path, tag: &str) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    out.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Removes its directory when dropped, unless [`TempDir::keep`] was called.
pub(crate) struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub(crate) fn create(path: PathBuf) -> Result<Self, ConvertError> {
        if path.exists() {
            std::fs::remove_dir_all(&path).at(&path)?;
        }
        std::fs::create_dir_all(&path).at(&path)?;
        Ok(TempDir { path, keep: false })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Renames the finished `tmp` directory to `out`, replacing an old model directory.
pub(crate) fn install(tmp: TempDir, out: &Path, replace: bool) -> Result<(), ConvertError> {
    if out.exists() {
        if !replace {
            // an empty directory (checked before converting)
            std::fs::remove_dir(out).at(out)?;
        } else {
            let old = sibling(out, "old");
            std::fs::rename(out, &old).at(out)?;
            if let Err(e) = std::fs::rename(tmp.path(), out) {
                let _ = std::fs::rename(&old, out);
                return Err(ConvertError::io(out, e));
            }
            tmp.keep();
            std::fs::remove_dir_all(&old).at(&old)?;
            return Ok(());
        }
    }
    std::fs::rename(tmp.path(), out).at(out)?;
    tmp.keep();
    Ok(())
}

fn convert_source_checked(
    source: &Source,
    out_dir: &Path,
    options: &ConvertOptions,
    state: OutputState,
) -> Result<Manifest, ConvertError> {
    let plan = plan(source, options)?;
    // built before any weight is read, so an unsupported tokenizer fails fast
    let tokenizer = source.tokenizer()?;
    if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).at(parent)?;
    }
    let tmp = TempDir::create(sibling(out_dir, "tmp"))?;
    let manifest = write_model(source, &plan, tokenizer, tmp.path(), options)?;
    install(tmp, out_dir, state == OutputState::Replace)?;
    Ok(manifest)
}

/// One tensor's place in the output.
struct PlannedTensor {
    name: String,
    entry: TensorEntry,
}

struct Plan {
    tensors: Vec<PlannedTensor>,
    layers: Vec<LayerEntry>,
    shard_bytes: Vec<u64>,
}

/// Hands out 256-byte-aligned places in shards, opening a new shard when a block does not fit.
struct Allocator {
    shard_size: u64,
    /// Bytes used in each shard so far.
    used: Vec<u64>,
}

impl Allocator {
    fn alloc(&mut self, bytes: u64) -> (usize, u64) {
        let last = self.used.len() - 1;
        let at = align_up(self.used[last], REGION_ALIGN);
        if self.used[last] == 0 || at + bytes <= self.shard_size {
            self.used[last] = at + bytes;
            (last, at)
        } else {
            self.used.push(bytes);
            (last + 1, 0)
        }
    }
}

/// Bytes one part takes in a shard: data, then scales at the next aligned offset.
fn part_block(format: QuantFormat, rows: usize, in_features: usize) -> Result<u64, format::FormatError> {
    let s = format::part_sizes(format, rows, in_features)?;
    Ok(if s.scale_bytes > 0 { align_up(s.data_bytes, REGION_ALIGN) + s.scale_bytes } else { s.data_bytes })
}

/// Splits `out` rows into parts that each fit a shard (multiples of 16 rows where possible).
fn split_rows(
    name: &str,
    format: QuantFormat,
    out: usize,
    in_features: usize,
    shard_size: u64,
) -> Result<Vec<[usize; 2]>, ConvertError> {
    let fmt_err = |source| ConvertError::Format { tensor: name.into(), source };
    let fits = |rows: usize| part_block(format, rows, in_features).map(|b| b <= shard_size).map_err(fmt_err);
    if fits(out)? {
        return Ok(vec![[0, out]]);
    }
    // largest r (a multiple of `step`) that fits, by binary search: blocks grow with rows
    let largest = |step: usize| -> Result<usize, ConvertError> {
        let (mut lo, mut hi) = (0usize, out / step);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid * step)? {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Ok(lo * step)
    };
    let mut rows = largest(16)?;
    if rows == 0 {
        rows = largest(1)?;
    }
    if rows == 0 {
        let bytes = part_block(format, 1, in_features).map_err(fmt_err)?;
        return Err(ConvertError::ShardTooSmall { tensor: name.into(), bytes, shard_size });
    }
    Ok((0..out).step_by(rows).map(|a| [a, (a + rows).min(out)]).collect())
}

/// Bytes a matrix takes in the shards at `format`: every part's block, rounded
/// up to the region alignment (an upper bound: the last region of a shard is
/// not padded).
pub(crate) fn matrix_bytes(
    name: &str,
    format: QuantFormat,
    out: usize,
    in_features: usize,
    shard_size: u64,
) -> Result<u64, ConvertError> {
    let mut total = 0;
    for rows in split_rows(name, format, out, in_features, shard_size)? {
        let block = part_block(format, rows[1] - rows[0], in_features)
            .map_err(|source| ConvertError::Format { tensor: name.into(), source })?;
        total += align_up(block, REGION_ALIGN);
    }
    Ok(total)
}

/// Tensor names in writing order: embedding, each layer, final norm, LM head.
fn ordered_names(cfg: &ModelConfig) -> Vec<String> {
    let mut v = vec![names::EMBED.to_string()];
    for l in 0..cfg.num_layers {
        v.extend(names::LAYER_TENSORS.iter().map(|(suffix, _)| names::layer(l, suffix)));
    }
    v.push(names::FINAL_NORM.to_string());
    if !cfg.tie_word_embeddings {
        v.push(names::LM_HEAD.to_string());
    }
    v
}

/// Checks every tensor against the config and places every region.
fn plan(source: &Source, options: &ConvertOptions) -> Result<Plan, ConvertError> {
    let cfg = source.config();
    if let Some(max) = options.precision.max_layer().filter(|&m| m >= cfg.num_layers) {
        return Err(ConvertError::Options(format!(
            "precision spec `{}` names layer {max}, but the model has {} layers",
            options.precision, cfg.num_layers
        )));
    }
    let expected = Manifest::expected_shapes(cfg);
    let available = source.tensors();
    let mut alloc = Allocator { shard_size: options.shard_size, used: vec![0] };
    let mut tensors = Vec::new();
    // the vectors (norms, kept in f32 at every precision) first, in a shard of
    // their own: it is byte-identical across precision tiers, which share it
    let mut names = ordered_names(cfg);
    names.sort_by_key(|n| expected.get(n).is_none_or(|s| s.len() != 1));
    let mut in_vector_shard = true;
    for name in names {
        let want = &expected[&name];
        if in_vector_shard && want.len() != 1 {
            in_vector_shard = false;
            if alloc.used.last().is_some_and(|&u| u > 0) {
                alloc.used.push(0);
            }
        }
        let found = available
            .get(&name)
            .ok_or_else(|| ConvertError::MissingTensor { path: source.path().into(), tensor: name.clone() })?;
        if &found.shape != want {
            return Err(ConvertError::ShapeMismatch {
                path: source.tensor_path(&name),
                tensor: name,
                found: found.shape.clone(),
                expected: want.clone(),
            });
        }
        let entry = if want.len() == 1 {
            if want[0] as u64 * 4 > options.shard_size {
                return Err(ConvertError::ShardTooSmall {
                    tensor: name,
                    bytes: want[0] as u64 * 4,
                    shard_size: options.shard_size,
                });
            }
            let (shard, offset) = alloc.alloc(want[0] as u64 * 4);
            let data = Region { shard, offset, bytes: want[0] as u64 * 4 };
            TensorEntry {
                shape: want.clone(),
                format: QuantFormat::F32,
                layout: Layout::Vector,
                parts: vec![TensorPart {
                    rows: [0, want[0]],
                    data,
                    row_stride: data.bytes,
                    scales: None,
                    scale_stride: None,
                }],
            }
        } else {
            let precision = match layer_of(&name) {
                Some(l) => options.precision.for_layer(l).0,
                None => options.precision.embedding_precision(),
            };
            let format =
                QuantFormat::for_precision(precision, options.group_size, options.symmetric, options.int8_per_tensor);
            let (out, in_features) = (want[0], want[1]);
            let mut parts = Vec::new();
            for rows in split_rows(&name, format, out, in_features, options.shard_size)? {
                let sizes = format::part_sizes(format, rows[1] - rows[0], in_features)
                    .map_err(|source| ConvertError::Format { tensor: name.clone(), source })?;
                let block = part_block(format, rows[1] - rows[0], in_features)
                    .map_err(|source| ConvertError::Format { tensor: name.clone(), source })?;
                let (shard, offset) = alloc.alloc(block);
                let data = Region { shard, offset, bytes: sizes.data_bytes };
                let scales = (sizes.scale_bytes > 0).then(|| Region {
                    shard,
                    offset: offset + align_up(sizes.data_bytes, REGION_ALIGN),
                    bytes: sizes.scale_bytes,
                });
                parts.push(TensorPart {
                    rows,
                    data,
                    row_stride: sizes.row_stride,
                    scale_stride: scales.map(|_| sizes.scale_stride),
                    scales,
                });
            }
            TensorEntry { shape: want.clone(), format, layout: Layout::PackedColumnMajor, parts }
        };
        tensors.push(PlannedTensor { name, entry });
    }
    let formats: BTreeMap<String, QuantFormat> = tensors.iter().map(|t| (t.name.clone(), t.entry.format)).collect();
    let layers = (0..cfg.num_layers)
        .map(|l| {
            let precision = options.precision.for_layer(l).0;
            let reason = match &options.routing {
                Some(r) => r.layer_reasons.get(l).cloned().unwrap_or_default(),
                None if options.precision.is_uniform() => "uniform".into(),
                None => "per-layer option".into(),
            };
            LayerEntry { index: l, precision, kernels: kernel_names(cfg, l, &formats), reason: Some(reason) }
        })
        .collect();
    Ok(Plan { tensors, layers, shard_bytes: alloc.used })
}

/// The layer index of `model.layers.N.*`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Writes shard files sequentially, hashing as it goes.
struct ShardWriter {
    dir: PathBuf,
    done: Vec<ShardEntry>,
    current: Option<OpenShard>,
}

struct OpenShard {
    index: usize,
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    hash: Sha256,
    pos: u64,
}

pub(crate) fn shard_file_name(index: usize) -> String {
    format!("shard_{index:05}.bin")
}

impl ShardWriter {
    fn write_at(&mut self, region: &Region, bytes: &[u8]) -> Result<(), ConvertError> {
        debug_assert_eq!(region.bytes, bytes.len() as u64);
        if self.current.as_ref().is_none_or(|s| s.index != region.shard) {
            self.finish_current()?;
            debug_assert_eq!(self.done.len(), region.shard, "regions are written in shard order");
            let name = shard_file_name(region.shard);
            let path = self.dir.join(&name);
            let file = std::fs::File::create(&path).at(&path)?;
            self.current = Some(OpenShard {
                index: region.shard,
                path,
                file: std::io::BufWriter::new(file),
                hash: Sha256::new(),
                pos: 0,
            });
        }
        let s = self.current.as_mut().expect("opened above");
        assert!(region.offset >= s.pos, "regions are written in offset order");
        let pad = vec![0u8; (region.offset - s.pos) as usize];
        for chunk in [&pad[..], bytes] {
            s.file.write_all(chunk).at(&s.path)?;
            s.hash.update(chunk);
        }
        s.pos = region.offset + region.bytes;
        Ok(())
    }

    fn finish_current(&mut self) -> Result<(), ConvertError> {
        if let Some(mut s) = self.current.take() {
            s.file.flush().at(&s.path)?;
            s.file.get_ref().sync_all().at(&s.path)?;
            self.done.push(ShardEntry {
                file: shard_file_name(s.index),
                bytes: s.pos,
                sha256: hex::encode(s.hash.finalize()),
            });
        }
        Ok(())
    }
}

fn write_model(
    source: &Source,
    plan: &Plan,
    tok: SourceTokenizer,
    dir: &Path,
    options: &ConvertOptions,
) -> Result<Manifest, ConvertError> {
    let cfg = source.config();
    let progress = (options.progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(plan.tensors.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").expect("a valid progress template"),
        );
        bar
    });
    let mut shards = ShardWriter { dir: dir.to_path_buf(), done: Vec::new(), current: None };
    for t in &plan.tensors {
        if let Some(bar) = &progress {
            bar.set_message(t.name.clone());
        }
        write_tensor(source, t, &mut shards)?;
        if let Some(bar) = &progress {
            bar.inc(1);
        }
    }
    shards.finish_current()?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    debug_assert_eq!(shards.done.iter().map(|s| s.bytes).collect::<Vec<_>>(), plan.shard_bytes);

    let tok_path = dir.join(&tok.info.file);
    std::fs::write(&tok_path, &tok.json).at(&tok_path)?;

    let precisions: Vec<Precision> = plan.layers.iter().map(|l| l.precision).collect();
    let precision = match precisions.first() {
        Some(&p) if precisions.iter().all(|&q| q == p) => PrecisionTier::from(p),
        Some(_) => PrecisionTier::Mixed,
        None => PrecisionTier::from(options.precision.default_precision()),
    };
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        model: cfg.clone(),
        precision,
        layers: plan.layers.clone(),
        tensors: plan.tensors.iter().map(|t| (t.name.clone(), t.entry.clone())).collect(),
        shards: shards.done,
        tokenizer: tok.info,
        kernels: Vec::new(),
        converter: ConverterInfo {
            name: "llama5-convert".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            source: source.file_name(),
            options: options.recorded(),
        },
    };
    manifest.validate()?;
    manifest.kernels = write_kernels(dir, &manifest)?;
    let path = dir.join("manifest.json");
    std::fs::write(&path, manifest.to_json()).at(&path)?;
    Ok(manifest)
}

/// Reads, checks, packs and writes one tensor.
fn write_tensor(source: &Source, t: &PlannedTensor, shards: &mut ShardWriter) -> Result<(), ConvertError> {
    let name = &t.name;
    let weights = source.read(name)?;
    let n: usize = t.entry.shape.iter().product();
    assert_eq!(weights.len(), n, "source returned {} values for `{name}`", weights.len());
    if let Some((index, value)) = weights.first_non_finite() {
        return Err(ConvertError::NonFinite { path: source.tensor_path(name), tensor: name.clone(), index, value });
    }
    if t.entry.layout == Layout::Vector {
        let bytes: Vec<u8> = weights.into_f32().iter().flat_map(|v| v.to_le_bytes()).collect();
        return shards.write_at(&t.entry.parts[0].data, &bytes);
    }
    let format = t.entry.format;
    let in_features = t.entry.shape[1];
    let fmt_err = |source| ConvertError::Format { tensor: name.clone(), source };
    // GGUF 4-bit blocks go in unchanged when the target can hold them exactly.
    let exact = match (&weights, format) {
        (Weights::Int4Groups { params, .. }, QuantFormat::Int4 { group_size, symmetric })
            if group_size as usize == GGML_GROUP =>
        {
            !symmetric || params.iter().all(|(s, m)| *m == f16::from_f32(-8.0 * s.to_f32()))
        }
        _ => false,
    };
    let weights = if exact { weights } else { Weights::F32(weights.into_f32()) };
    for part in &t.entry.parts {
        let [a, b] = part.rows;
        let packed: PackedMatrix = match (&weights, format) {
            (Weights::Int4Groups { q, params }, QuantFormat::Int4 { group_size, symmetric }) => {
                let groups = in_features / GGML_GROUP;
                format::pack_int4_groups(
                    &q[a * in_features..b * in_features],
                    &params[a * groups..b * groups],
                    b - a,
                    in_features,
                    group_size,
                    symmetric,
                )
                .map_err(fmt_err)?
            }
            (Weights::F32(w), _) => {
                format::pack(format, &w[a * in_features..b * in_features], b - a, in_features).map_err(fmt_err)?
            }
            (Weights::Int4Groups { .. }, _) => unreachable!("4-bit groups are kept only for an INT4 target"),
        };
        shards.write_at(&part.data, &packed.data)?;
        if let Some(scales) = &part.scales {
            shards.write_at(scales, &packed.scales)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rows_fits_every_part() {
        let f = QuantFormat::Int4 { group_size: 32, symmetric: false };
        let (out, inf) = (1000, 256);
        let whole = part_block(f, out, inf).unwrap();
        assert_eq!(split_rows("t", f, out, inf, whole).unwrap(), vec![[0, out]]);
        let parts = split_rows("t", f, out, inf, whole / 3).unwrap();
        assert!(parts.len() >= 3);
        assert_eq!(parts.first().unwrap()[0], 0);
        assert_eq!(parts.last().unwrap()[1], out);
        for p in &parts {
            assert!(part_block(f, p[1] - p[0], inf).unwrap() <= whole / 3);
        }
        for w in parts.windows(2) {
            assert_eq!(w[0][1], w[1][0]);
        }
        assert!(matches!(split_rows("t", f, out, inf, 300), Err(ConvertError::ShardTooSmall { .. })));
    }

    #[test]
    fn allocator_aligns_and_opens_new_shards() {
        let mut a = Allocator { shard_size: 1024, used: vec![0] };
        assert_eq!(a.alloc(100), (0, 0));
        assert_eq!(a.alloc(100), (0, 256));
        assert_eq!(a.alloc(600), (1, 0), "512 + 600 > 1024");
        assert_eq!(a.alloc(10), (1, 768));
        assert_eq!(a.used, vec![356, 778]);
    }
}

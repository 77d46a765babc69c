//! Models with random weights of real shapes, built in memory: decode speed
//! does not depend on the weights' values, so benchmarks of shapes whose
//! checkpoints are not at hand (1B, 7B) run on these.
//!
//! The layout is the converter's: tensors in writing order, parts split to fit
//! 256 MiB shards, INT4 models keep the embedding (and LM head) at INT8. The
//! packed words are written directly as random bits with fixed, small scales,
//! so every weight lies within about ±0.05 and activations stay finite.

use std::collections::BTreeMap;
use std::sync::Arc;

use half::{bf16, f16};
use llama5_codegen::format::{align_up, part_sizes};
use llama5_codegen::manifest::{
    names, ConverterInfo, LayerEntry, Layout, Manifest, ModelConfig, Precision, PrecisionTier, QuantFormat, Region,
    ShardEntry, TensorEntry, TensorPart, TokenizerInfo, DEFAULT_GROUP_SIZE, DEFAULT_SHARD_BYTES, MANIFEST_FORMAT,
    MANIFEST_VERSION, REGION_ALIGN,
};
use llama5_codegen::{layer_kernel_names, LayerFormats, Target};
use rayon::prelude::*;

use crate::error::RuntimeError;
use crate::model::{Model, ShardBytes};

/// Largest magnitude of a synthetic weight.
const WEIGHT_RANGE: f32 = 0.05;
/// Value of [`ShardEntry::sha256`] for in-memory shards, which no file backs.
pub const SYNTHETIC_SHA256: &str = "synthetic";

/// The shape of a synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub enum SyntheticShape {
    /// SmolLM2-135M: hidden 576, 30 layers, 9 / 3 heads, vocab 49152, tied.
    SmolLM2_135M,
    /// Llama 3.2 1B: hidden 2048, 16 layers, 32 / 8 heads, vocab 128256, tied.
    Llama1B,
    /// Llama 2 7B: hidden 4096, 32 layers, 32 / 32 heads, vocab 32000, untied.
    Llama7B,
    /// Any Llama shape (tests use tiny ones).
    Custom(ModelConfig),
}

impl SyntheticShape {
    /// The named shapes, smallest first.
    pub const NAMED: [SyntheticShape; 3] =
        [SyntheticShape::SmolLM2_135M, SyntheticShape::Llama1B, SyntheticShape::Llama7B];

    pub fn name(&self) -> String {
        match self {
            SyntheticShape::SmolLM2_135M => "smollm2-135m".into(),
            SyntheticShape::Llama1B => "llama-1b".into(),
            SyntheticShape::Llama7B => "llama-7b".into(),
            SyntheticShape::Custom(cfg) => cfg.name.clone().unwrap_or_else(|| "custom".into()),
        }
    }

    pub fn config(&self) -> ModelConfig {
        #[allow(clippy::too_many_arguments)]
        fn llama(
            name: &str,
            hidden: usize,
            ffn: usize,
            layers: usize,
            heads: usize,
            kv_heads: usize,
            head_dim: usize,
            vocab: usize,
            positions: usize,
            theta: f32,
            tied: bool,
        ) -> ModelConfig {
            ModelConfig {
                architecture: "llama".into(),
                name: Some(name.into()),
                hidden_size: hidden,
                intermediate_size: ffn,
                num_layers: layers,
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim,
                vocab_size: vocab,
                max_position_embeddings: positions,
                rope_theta: theta,
                rms_norm_eps: 1e-5,
                tie_word_embeddings: tied,
            }
        }
        match self {
            SyntheticShape::SmolLM2_135M => {
                llama("smollm2-135m", 576, 1536, 30, 9, 3, 64, 49152, 8192, 100_000.0, true)
            }
            SyntheticShape::Llama1B => llama("llama-1b", 2048, 8192, 16, 32, 8, 64, 128_256, 131_072, 500_000.0, true),
            SyntheticShape::Llama7B => llama("llama-7b", 4096, 11008, 32, 32, 32, 128, 32000, 4096, 10_000.0, false),
            SyntheticShape::Custom(cfg) => cfg.clone(),
        }
    }
}

impl std::str::FromStr for SyntheticShape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let wanted = s.to_ascii_lowercase();
        Self::NAMED.into_iter().find(|shape| shape.name() == wanted).ok_or_else(|| {
            let known: Vec<String> = Self::NAMED.iter().map(SyntheticShape::name).collect();
            format!("unknown synthetic shape `{s}` (expected one of {})", known.join(", "))
        })
    }
}

/// How the bytes of one region are produced.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// f32 ones (norm weights).
    Ones,
    /// Random packed values in the first `row_bytes` of every `stride`-byte stored row.
    Random { values: Values, row_bytes: usize, stride: usize },
    /// The word `word` repeated over the first `row_bytes` of every `stride`-byte row (scales).
    Repeat { word: u32, row_bytes: usize, stride: usize },
}

#[derive(Clone, Copy, Debug)]
enum Values {
    /// 16-bit floats of this format drawn from a table of 256 values in ±[`WEIGHT_RANGE`].
    Halves(QuantFormat),
    /// Uniform random bits (INT8 and INT4 codes; the scales bound the values).
    Bits,
}

struct PlannedRegion {
    region: Region,
    fill: Fill,
}

/// Hands out 256-byte-aligned places in shards of at most `shard_size` bytes,
/// opening a new shard when a block does not fit (the converter's rule).
struct Allocator {
    shard_size: u64,
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

fn half_table(format: QuantFormat) -> [u16; 256] {
    let mut table = [0u16; 256];
    for (i, v) in table.iter_mut().enumerate() {
        let x = (i as f32 / 255.0 * 2.0 - 1.0) * WEIGHT_RANGE;
        *v = match format {
            QuantFormat::Bf16 => bf16::from_f32(x).to_bits(),
            _ => f16::from_f32(x).to_bits(),
        };
    }
    table
}

/// The fills of a part's data and (for INT8 / INT4) scales.
fn part_fills(format: QuantFormat, out: usize) -> (Values, Option<u32>) {
    match format {
        QuantFormat::F16 | QuantFormat::Bf16 => (Values::Halves(format), None),
        // codes -128..=127 times this scale lie within ±WEIGHT_RANGE (about)
        QuantFormat::Int8 { .. } => (Values::Bits, Some((WEIGHT_RANGE / 127.0).to_bits())),
        // w = scale * q + min with q in 0..=15 spans [-WEIGHT_RANGE, WEIGHT_RANGE]
        QuantFormat::Int4 { .. } => {
            let scale = f16::from_f32(2.0 * WEIGHT_RANGE / 15.0).to_bits() as u32;
            let min = f16::from_f32(-WEIGHT_RANGE).to_bits() as u32;
            (Values::Bits, Some(scale | (min << 16)))
        }
        QuantFormat::F32 => unreachable!("matrices are never f32 (out {out})"),
    }
}

/// Rows per part so that each part's block fits a shard: all rows when they
/// fit, else the largest multiple of 16 that does.
fn split_rows(
    name: &str,
    format: QuantFormat,
    out: usize,
    in_features: usize,
) -> Result<Vec<[usize; 2]>, RuntimeError> {
    let block = |rows: usize| -> Result<u64, RuntimeError> {
        let s =
            part_sizes(format, rows, in_features).map_err(|e| RuntimeError::Model(format!("tensor `{name}`: {e}")))?;
        Ok(if s.scale_bytes > 0 { align_up(s.data_bytes, REGION_ALIGN) + s.scale_bytes } else { s.data_bytes })
    };
    if block(out)? <= DEFAULT_SHARD_BYTES {
        return Ok(vec![[0, out]]);
    }
    let per_row = block(16)?.div_ceil(16);
    let rows = ((DEFAULT_SHARD_BYTES / per_row.max(1)) as usize / 16 * 16).max(16);
    let mut rows = rows.min(out);
    while rows > 16 && block(rows)? > DEFAULT_SHARD_BYTES {
        rows -= 16;
    }
    Ok((0..out).step_by(rows).map(|a| [a, (a + rows).min(out)]).collect())
}

/// Builds a model of `shape` whose matrices are stored at `precision` (INT4
/// models keep the embedding and LM head at INT8, as the converter does), with
/// weights drawn from `seed`. Shards live in memory; their `sha256` is
/// [`SYNTHETIC_SHA256`].
pub fn synthetic_model(shape: SyntheticShape, precision: Precision, seed: u64) -> Result<Model, RuntimeError> {
    let cfg = shape.config();
    let layer_format = QuantFormat::for_precision(precision, DEFAULT_GROUP_SIZE, false, false);
    let embed_precision = if precision == Precision::Int4 { Precision::Int8 } else { precision };
    let embed_format = QuantFormat::for_precision(embed_precision, DEFAULT_GROUP_SIZE, false, false);

    let expected = Manifest::expected_shapes(&cfg);
    let mut order = vec![names::EMBED.to_string()];
    for l in 0..cfg.num_layers {
        order.extend(names::LAYER_TENSORS.iter().map(|(suffix, _)| names::layer(l, suffix)));
    }
    order.push(names::FINAL_NORM.to_string());
    if !cfg.tie_word_embeddings {
        order.push(names::LM_HEAD.to_string());
    }

    let mut alloc = Allocator { shard_size: DEFAULT_SHARD_BYTES, used: vec![0] };
    let mut regions = Vec::new();
    let mut tensors = BTreeMap::new();
    for name in order {
        let shape =
            expected.get(&name).cloned().ok_or_else(|| RuntimeError::Model(format!("no shape for `{name}`")))?;
        let entry = if let [n] = shape[..] {
            let (shard, offset) = alloc.alloc(n as u64 * 4);
            let data = Region { shard, offset, bytes: n as u64 * 4 };
            regions.push(PlannedRegion { region: data, fill: Fill::Ones });
            let part = TensorPart { rows: [0, n], data, row_stride: data.bytes, scales: None, scale_stride: None };
            TensorEntry { shape, format: QuantFormat::F32, layout: Layout::Vector, parts: vec![part] }
        } else {
            let format = if name.starts_with("model.layers.") { layer_format } else { embed_format };
            let (out, in_features) = (shape[0], shape[1]);
            let mut parts = Vec::new();
            for rows in split_rows(&name, format, out, in_features)? {
                let n = rows[1] - rows[0];
                let sizes = part_sizes(format, n, in_features)
                    .map_err(|e| RuntimeError::Model(format!("tensor `{name}`: {e}")))?;
                let block = align_up(sizes.data_bytes, REGION_ALIGN) + sizes.scale_bytes;
                let (shard, offset) = alloc.alloc(block);
                let data = Region { shard, offset, bytes: sizes.data_bytes };
                let stride = sizes.row_stride as usize;
                let (values, scale_word) = part_fills(format, n);
                regions.push(PlannedRegion { region: data, fill: Fill::Random { values, row_bytes: n * 4, stride } });
                let scales = scale_word.map(|word| {
                    let region = Region {
                        shard,
                        offset: offset + align_up(sizes.data_bytes, REGION_ALIGN),
                        bytes: sizes.scale_bytes,
                    };
                    let per_tensor = matches!(format, QuantFormat::Int8 { per_tensor: true });
                    let row_bytes = if per_tensor { 4 } else { n * 4 };
                    let stride = sizes.scale_stride as usize;
                    regions.push(PlannedRegion { region, fill: Fill::Repeat { word, row_bytes, stride } });
                    region
                });
                parts.push(TensorPart {
                    rows,
                    data,
                    row_stride: sizes.row_stride,
                    scale_stride: scales.map(|_| sizes.scale_stride),
                    scales,
                });
            }
            TensorEntry { shape, format, layout: Layout::PackedColumnMajor, parts }
        };
        tensors.insert(name, entry);
    }

    let formats = LayerFormats::uniform(layer_format);
    let kernels = layer_kernel_names(&cfg, &formats, &Target::portable());
    let layers = (0..cfg.num_layers)
        .map(|index| LayerEntry { index, precision, kernels: kernels.clone(), reason: Some("synthetic".into()) })
        .collect();
    let shards: Vec<ShardEntry> = alloc
        .used
        .iter()
        .enumerate()
        .map(|(i, &bytes)| ShardEntry { file: format!("synthetic_{i:05}.bin"), bytes, sha256: SYNTHETIC_SHA256.into() })
        .collect();
    let options = [("precision".to_string(), precision.to_string()), ("seed".to_string(), seed.to_string())];
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        model: cfg,
        precision: PrecisionTier::from(precision),
        layers,
        tensors,
        shards,
        tokenizer: TokenizerInfo {
            file: "tokenizer.json".into(),
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            add_bos: false,
            chat_template: None,
        },
        kernels: Vec::new(),
        converter: ConverterInfo {
            name: "llama5 synthetic".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            source: format!("synthetic:{}", shape.name()),
            options: options.into_iter().collect(),
        },
    };
    manifest.validate()?;

    let bytes = fill_shards(&alloc.used, &regions, seed);
    let shards = bytes.into_iter().map(|b| Arc::new(b) as ShardBytes).collect();
    Model::from_parts(manifest, std::path::PathBuf::new(), shards)
}

/// Allocates every shard and fills its regions in parallel.
fn fill_shards(sizes: &[u64], regions: &[PlannedRegion], seed: u64) -> Vec<Vec<u8>> {
    let mut shards: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n as usize]).collect();
    // split every shard into the disjoint slices of its regions
    let mut jobs: Vec<(&mut [u8], Fill, u64)> = Vec::with_capacity(regions.len());
    let mut by_shard: Vec<Vec<(usize, &PlannedRegion)>> = vec![Vec::new(); shards.len()];
    for (i, r) in regions.iter().enumerate() {
        by_shard[r.region.shard].push((i, r));
    }
    for (shard, mut list) in shards.iter_mut().zip(by_shard) {
        list.sort_by_key(|(_, r)| r.region.offset);
        let mut rest: &mut [u8] = shard;
        let mut at = 0u64;
        for (i, r) in list {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((r.region.offset - at) as usize);
            let (slice, tail) = tail.split_at_mut(r.region.bytes as usize);
            rest = tail;
            at = r.region.offset + r.region.bytes;
            jobs.push((slice, r.fill, splitmix64(seed ^ splitmix64(i as u64))));
        }
    }
    jobs.into_par_iter().for_each(|(slice, fill, region_seed)| fill_region(slice, fill, region_seed));
    shards
}

fn fill_region(slice: &mut [u8], fill: Fill, seed: u64) {
    match fill {
        Fill::Ones => slice.chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&1f32.to_le_bytes())),
        Fill::Repeat { word, row_bytes, stride } => slice.par_chunks_mut(stride).for_each(|row| {
            let n = row_bytes.min(row.len());
            row[..n].chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&word.to_le_bytes()))
        }),
        Fill::Random { values, row_bytes, stride } => {
            let table = match values {
                Values::Halves(format) => Some(half_table(format)),
                Values::Bits => None,
            };
            // chunks of whole rows, about 256 KiB each, each with its own stream
            let rows_per_chunk = ((256 << 10) / stride).max(1);
            slice.par_chunks_mut(rows_per_chunk * stride).enumerate().for_each(|(c, chunk)| {
                let mut state = splitmix64(seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                for row in chunk.chunks_mut(stride) {
                    let n = row_bytes.min(row.len());
                    let row = &mut row[..n];
                    for word in row.chunks_mut(8) {
                        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                        let r = splitmix64(state).to_le_bytes();
                        match &table {
                            None => word.copy_from_slice(&r[..word.len()]),
                            Some(table) => {
                                for (k, h) in word.chunks_exact_mut(2).enumerate() {
                                    h.copy_from_slice(&table[r[k] as usize].to_le_bytes());
                                }
                            }
                        }
                    }
                }
            });
        }
    }
}

/// The splitmix64 finaliser: a well-mixed 64-bit hash of `x`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use llama5_codegen::format::unpack;

    use super::*;

    fn tiny() -> SyntheticShape {
        SyntheticShape::Custom(ModelConfig {
            architecture: "llama".into(),
            name: Some("tiny".into()),
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 256,
            max_position_embeddings: 512,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
        })
    }

    #[test]
    fn named_shapes_parse_and_validate_their_manifests() {
        for shape in SyntheticShape::NAMED {
            assert_eq!(shape.name().parse::<SyntheticShape>().unwrap(), shape);
        }
        assert!("llama-70b".parse::<SyntheticShape>().unwrap_err().contains("smollm2-135m"));
        let cfg = SyntheticShape::Llama7B.config();
        assert_eq!((cfg.q_dim(), cfg.kv_dim(), cfg.tie_word_embeddings), (4096, 4096, false));
    }

    #[test]
    fn weights_are_small_and_deterministic() {
        for precision in Precision::ALL {
            let a = synthetic_model(tiny(), precision, 7).unwrap();
            let b = synthetic_model(tiny(), precision, 7).unwrap();
            let c = synthetic_model(tiny(), precision, 8).unwrap();
            assert_eq!(a.shard(0), b.shard(0), "{precision}: same seed, same bytes");
            assert_ne!(a.shard(0), c.shard(0), "{precision}: another seed, other bytes");
            for name in [names::EMBED, "model.layers.1.mlp.down_proj.weight", names::LM_HEAD] {
                let t = a.tensor(name).unwrap();
                let p = &a.matrix(name).unwrap()[0];
                let w = unpack(t.format, p.data, p.scales, p.out(), p.in_features).unwrap();
                let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(max <= WEIGHT_RANGE * 1.02 && max > WEIGHT_RANGE * 0.5, "{precision} {name}: max {max}");
                let mean = w.iter().sum::<f32>() / w.len() as f32;
                assert!(mean.abs() < 0.01, "{precision} {name}: mean {mean}");
            }
            assert_eq!(a.vector(names::FINAL_NORM).unwrap(), vec![1.0; 64]);
        }
        let m = synthetic_model(tiny(), Precision::Int4, 0).unwrap();
        assert_eq!(m.tensor(names::EMBED).unwrap().format, QuantFormat::Int8 { per_tensor: false });
        assert_eq!(m.manifest.precision, PrecisionTier::Int4);
    }

    #[test]
    fn large_matrices_split_into_parts_that_fit_a_shard() {
        // the 1B embedding at f16 is 525 MB
        let parts = split_rows("embed", QuantFormat::F16, 128_256, 2048).unwrap();
        assert!(parts.len() >= 2);
        assert_eq!(parts.last().unwrap()[1], 128_256);
        for p in &parts {
            let s = part_sizes(QuantFormat::F16, p[1] - p[0], 2048).unwrap();
            assert!(s.data_bytes <= DEFAULT_SHARD_BYTES);
        }
        assert_eq!(split_rows("small", QuantFormat::F16, 576, 576).unwrap(), vec![[0, 576]]);
    }
}

//! Manifests of a given shape without weights: regions laid out one after the
//! other in fake shards, sized exactly as the converter would size them.

#![allow(dead_code)]

use std::collections::BTreeMap;

use llama5_codegen::format::{align_up, part_sizes};
use llama5_codegen::manifest::*;

pub fn smollm2_config() -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        name: Some("SmolLM2-135M-Instruct".into()),
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        max_position_embeddings: 8192,
        rope_theta: 100000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
    }
}

/// Every matrix in `format`, every tensor in one part except the embedding,
/// which is split into `embed_parts` parts of (nearly) equal rows.
pub fn manifest(cfg: &ModelConfig, format: QuantFormat, embed_parts: usize) -> Manifest {
    let mut offset = 0u64;
    let mut region = |bytes: u64| {
        let r = Region { shard: 0, offset, bytes };
        offset = align_up(offset + bytes, REGION_ALIGN);
        r
    };
    let mut tensors = BTreeMap::new();
    for (name, shape) in Manifest::expected_shapes(cfg) {
        let (fmt, layout) =
            if shape.len() == 1 { (QuantFormat::F32, Layout::Vector) } else { (format, Layout::PackedColumnMajor) };
        let in_features = *shape.last().unwrap();
        let n_parts = if name == names::EMBED { embed_parts } else { 1 };
        let mut parts = Vec::new();
        for i in 0..n_parts {
            let rows = [shape[0] * i / n_parts, shape[0] * (i + 1) / n_parts];
            let s = part_sizes(fmt, rows[1] - rows[0], in_features).unwrap();
            let data = region(s.data_bytes);
            let scales = (s.scale_bytes > 0).then(|| region(s.scale_bytes));
            parts.push(TensorPart {
                rows,
                data,
                row_stride: s.row_stride,
                scale_stride: scales.map(|_| s.scale_stride),
                scales,
            });
        }
        tensors.insert(name, TensorEntry { shape, format: fmt, layout, parts });
    }
    let precision = format.precision().unwrap();
    let m = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        model: cfg.clone(),
        precision: precision.into(),
        layers: (0..cfg.num_layers)
            .map(|index| LayerEntry { index, precision, kernels: Vec::new(), reason: None })
            .collect(),
        tensors,
        shards: vec![ShardEntry { file: "shard_00000.bin".into(), bytes: offset, sha256: String::new() }],
        tokenizer: TokenizerInfo {
            file: "tokenizer.json".into(),
            bos_token_id: None,
            eos_token_ids: vec![],
            add_bos: false,
            chat_template: None,
        },
        kernels: vec![],
        converter: ConverterInfo {
            name: "test".into(),
            version: "0".into(),
            source: "none".into(),
            options: BTreeMap::new(),
        },
    };
    m.validate().expect("test manifest is valid");
    m
}

/// One format per precision variant the converter can write.
pub fn all_formats(group_size: u32) -> Vec<QuantFormat> {
    vec![
        QuantFormat::F16,
        QuantFormat::Bf16,
        QuantFormat::Int8 { per_tensor: false },
        QuantFormat::Int8 { per_tensor: true },
        QuantFormat::Int4 { group_size, symmetric: false },
        QuantFormat::Int4 { group_size, symmetric: true },
    ]
}

//! The GGUF and safetensors readers against malformed files, and the ggml
//! dequantizers against blocks built by hand and against gguf-py.

mod common;

use common::{f32_bytes, RawGguf};
use half::f16;
use llama5_convert::gguf::{GgmlType, GgufFile};
use llama5_convert::quants;
use llama5_convert::source::{Source, Weights};
use llama5_convert::ConvertError;
use llama5_fixtures::tiny;
use llama5_fixtures::GgufType;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A minimal valid GGUF: one F32 tensor of 8 values.
fn one_tensor() -> RawGguf {
    RawGguf::new()
        .kv_str("general.architecture", "llama")
        .tensor("output_norm.weight", &[8], 0, 0)
        .data(f32_bytes(&[1.0; 8]))
}

#[test]
fn gguf_minimal_file_parses() {
    let dir = tmp();
    let path = one_tensor().write(&dir.path().join("ok.gguf"));
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.tensors.len(), 1);
    assert_eq!(f.tensors[0].ty, GgmlType::F32);
    assert_eq!(f.data(&f.tensors[0]), &f32_bytes(&[1.0; 8])[..]);
    assert_eq!(f.get("general.architecture").and_then(|v| v.as_str()), Some("llama"));
}

#[test]
fn gguf_every_truncation_is_an_error_never_a_panic() {
    let dir = tmp();
    let bytes = tiny::gguf_bytes(GgufType::Q4_1, GgufType::Q8_0);
    let path = dir.path().join("cut.gguf");
    let mut truncated = 0;
    for cut in (0..bytes.len()).step_by(61) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = GgufFile::open(&path).expect_err("a truncated file must not parse");
        if matches!(err, ConvertError::Truncated { .. }) {
            truncated += 1;
        }
        assert!(err.to_string().contains("cut.gguf"), "error names the file: {err}");
    }
    assert!(truncated > 10, "cuts inside the header report truncation");
}

#[test]
fn gguf_truncated_header_names_the_field() {
    let dir = tmp();
    let raw = one_tensor();
    let header = raw.header();
    let path = dir.path().join("t.gguf");
    std::fs::write(&path, &header[..header.len() - 3]).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    let ConvertError::Truncated { what, .. } = &err else { panic!("{err}") };
    assert!(what.contains("output_norm.weight") && what.contains("offset"), "{what}");
}

#[test]
fn gguf_header_larger_than_the_file() {
    let dir = tmp();
    // infos end mid-alignment and the file stops there: the data section would start past the end
    let raw = RawGguf::new().kv_str("general.architecture", "llama").kv_str("x", "yz");
    let path = dir.path().join("h.gguf");
    std::fs::write(&path, raw.header()).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(matches!(err, ConvertError::HeaderTooLarge { .. }), "{err}");
}

#[test]
fn gguf_counts_and_lengths_are_capped_by_the_file() {
    let dir = tmp();
    let mut raw = one_tensor();
    raw.kv_count = Some(u64::MAX / 2);
    let err = GgufFile::open(&raw.write(&dir.path().join("kv.gguf"))).unwrap_err();
    assert!(err.to_string().contains("metadata count"), "{err}");

    let mut raw = one_tensor();
    raw.tensor_count = Some(1 << 40);
    let err = GgufFile::open(&raw.write(&dir.path().join("tc.gguf"))).unwrap_err();
    assert!(err.to_string().contains("tensor count"), "{err}");

    // a string claiming 2^60 bytes
    let mut value = (1u64 << 60).to_le_bytes().to_vec();
    value.extend(b"abc");
    let raw = RawGguf::new().kv_raw("general.name", 8, &value);
    let err = GgufFile::open(&raw.write(&dir.path().join("s.gguf"))).unwrap_err();
    assert!(err.to_string().contains("general.name"), "{err}");

    // an array of 2^50 u32
    let mut value = 4u32.to_le_bytes().to_vec();
    value.extend((1u64 << 50).to_le_bytes());
    let raw = RawGguf::new().kv_raw("tokenizer.ggml.token_type", 9, &value);
    let err = GgufFile::open(&raw.write(&dir.path().join("a.gguf"))).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.token_type") && err.to_string().contains("count"), "{err}");
}

#[test]
fn gguf_overlapping_tensors() {
    let dir = tmp();
    let raw = RawGguf::new()
        .kv_str("general.architecture", "llama")
        .tensor("blk.0.attn_norm.weight", &[16], 0, 0)
        .tensor("blk.0.ffn_norm.weight", &[16], 0, 32)
        .data(vec![0; 128]);
    let err = GgufFile::open(&raw.write(&dir.path().join("o.gguf"))).unwrap_err();
    let ConvertError::OverlappingTensors { tensor, other, .. } = &err else { panic!("{err}") };
    assert_eq!((tensor.as_str(), other.as_str()), ("blk.0.ffn_norm.weight", "blk.0.attn_norm.weight"));
}

#[test]
fn gguf_out_of_range_offsets() {
    let dir = tmp();
    let raw = one_tensor().tensor("blk.0.attn_norm.weight", &[8], 0, 64);
    let err = GgufFile::open(&raw.write(&dir.path().join("r.gguf"))).unwrap_err();
    let ConvertError::OffsetOutOfRange { tensor, start, end, len, .. } = &err else { panic!("{err}") };
    assert_eq!((tensor.as_str(), *start, *end, *len), ("blk.0.attn_norm.weight", 64, 96, 32));

    let raw = one_tensor().tensor("huge", &[u64::MAX / 2, 4], 0, 0);
    let err = GgufFile::open(&raw.write(&dir.path().join("big.gguf"))).unwrap_err();
    assert!(err.to_string().contains("huge") && err.to_string().contains("overflow"), "{err}");

    let raw = one_tensor().tensor("far", &[8], 0, u64::MAX - 8);
    let err = GgufFile::open(&raw.write(&dir.path().join("far.gguf"))).unwrap_err();
    assert!(matches!(err, ConvertError::OffsetOutOfRange { .. }), "{err}");
}

#[test]
fn gguf_unsupported_types_and_versions() {
    let dir = tmp();
    // IQ2_XXS (16): not even its block size is known
    let raw = one_tensor().tensor("blk.0.attn_q.weight", &[256, 1], 16, 32);
    let err = GgufFile::open(&raw.write(&dir.path().join("iq.gguf"))).unwrap_err();
    let ConvertError::UnsupportedDtype { tensor, dtype, .. } = &err else { panic!("{err}") };
    assert_eq!((tensor.as_str(), dtype.as_str()), ("blk.0.attn_q.weight", "ggml type 16"));

    let mut raw = one_tensor();
    raw.version = 1;
    let err = GgufFile::open(&raw.write(&dir.path().join("v1.gguf"))).unwrap_err();
    assert!(matches!(err, ConvertError::Unsupported { .. }) && err.to_string().contains("version 1"), "{err}");

    let mut bytes = one_tensor().bytes();
    bytes[..4].copy_from_slice(b"GGML");
    std::fs::write(dir.path().join("magic.gguf"), bytes).unwrap();
    let err = GgufFile::open(&dir.path().join("magic.gguf")).unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
}

#[test]
fn gguf_known_but_undecodable_type_fails_on_read_naming_the_tensor() {
    let dir = tmp();
    let path = dir.path().join("q2k.gguf");
    let mut raw = RawGguf::new().kv_str("general.architecture", "llama");
    for (k, v) in [
        ("llama.embedding_length", 256u32),
        ("llama.attention.head_count", 4),
        ("llama.feed_forward_length", 256),
        ("llama.block_count", 0),
        ("llama.vocab_size", 1),
    ] {
        raw = raw.kv_u32(k, v);
    }
    // Q2_K (10): 84 bytes per 256 values
    let raw = raw.tensor("token_embd.weight", &[256, 1], 10, 0).data(vec![0; 84]);
    raw.write(&path);
    let source = Source::open(&path).unwrap();
    let err = source.read("model.embed_tokens.weight").unwrap_err();
    let ConvertError::UnsupportedDtype { tensor, dtype, .. } = &err else { panic!("{err}") };
    assert_eq!((tensor.as_str(), dtype.as_str()), ("token_embd.weight", "Q2_K"));
}

#[test]
fn gguf_unknown_architecture() {
    let dir = tmp();
    let raw = RawGguf::new().kv_str("general.architecture", "gpt2").tensor("x", &[8], 0, 0).data(f32_bytes(&[0.0; 8]));
    let err = Source::open(&raw.write(&dir.path().join("arch.gguf"))).err().unwrap();
    let ConvertError::Architecture { found, .. } = &err else { panic!("{err}") };
    assert_eq!(found, "gpt2");
}

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn q8_0_block_by_hand() {
    let mut b = f16_bytes(0.5).to_vec();
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let v = quants::dequantize(GgmlType::Q8_0, &b).unwrap();
    let want: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
    assert_eq!(v, want);
}

#[test]
fn q4_0_block_by_hand() {
    // byte j holds element j (low nibble) and element j + 16 (high nibble)
    let mut b = f16_bytes(-0.25).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let v = quants::dequantize(GgmlType::Q4_0, &b).unwrap();
    for j in 0..16 {
        assert_eq!(v[j], -0.25 * (j as f32 - 8.0));
        assert_eq!(v[j + 16], -0.25 * ((15 - j) as f32 - 8.0));
    }
    let (q, params) = quants::q4_groups(GgmlType::Q4_0, &b).unwrap();
    assert_eq!(params, vec![(f16::from_f32(-0.25), f16::from_f32(2.0))]);
    let w = Weights::Int4Groups { q, params }.into_f32();
    assert_eq!(w, v, "4-bit groups decode to the dequantized values");
}

#[test]
fn q4_1_block_by_hand() {
    let mut b = f16_bytes(0.125).to_vec();
    b.extend(f16_bytes(-1.0));
    b.extend((0..16u8).map(|j| (j % 16) | (((j * 3) % 16) << 4)));
    let v = quants::dequantize(GgmlType::Q4_1, &b).unwrap();
    for j in 0..16 {
        assert_eq!(v[j], 0.125 * j as f32 - 1.0);
        assert_eq!(v[j + 16], 0.125 * ((j * 3) % 16) as f32 - 1.0);
    }
    let (q, params) = quants::q4_groups(GgmlType::Q4_1, &b).unwrap();
    assert_eq!(params, vec![(f16::from_f32(0.125), f16::from_f32(-1.0))]);
    assert_eq!(&q[..4], &[0, 1, 2, 3]);
    assert_eq!(Weights::Int4Groups { q, params }.into_f32(), v);
}

#[test]
fn every_decodable_type_matches_gguf_py() {
    let reference: serde_json::Value = serde_json::from_str(include_str!("reference/ggml_blocks.json")).unwrap();
    let types = [
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q5_0", GgmlType::Q5_0),
        ("Q5_1", GgmlType::Q5_1),
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_K", GgmlType::Q4K),
        ("Q6_K", GgmlType::Q6K),
    ];
    for (name, ty) in types {
        let case = &reference[name];
        let bytes = hex::decode(case["bytes"].as_str().unwrap()).unwrap();
        let want: Vec<f32> = case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = quants::dequantize(ty, &bytes).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // gguf-py multiplies in a different order for the K types: allow an ulp or two
            assert!((g - w).abs() <= w.abs() * 1e-6 + 1e-9, "{name}[{i}]: {g} vs {w}");
        }
    }
}

// ---- safetensors ----

fn st_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A directory with the tiny model's config.json and the given model.safetensors bytes.
fn hf_dir_with(dir: &std::path::Path, safetensors: &[u8]) -> std::path::PathBuf {
    tiny::write_hf_dir(dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors).unwrap();
    dir.to_path_buf()
}

#[test]
fn safetensors_shorter_than_its_length_prefix() {
    let dir = tmp();
    let path = hf_dir_with(dir.path(), &[1, 2, 3]);
    let err = Source::open(&path).err().unwrap();
    assert!(matches!(err, ConvertError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn safetensors_header_larger_than_the_file() {
    let dir = tmp();
    let mut bytes = st_file("{}", &[]);
    bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
    let err = Source::open(&hf_dir_with(dir.path(), &bytes)).err().unwrap();
    let ConvertError::HeaderTooLarge { header, len, .. } = err else { panic!("{err}") };
    assert_eq!((header, len), (1000, 10));
}

#[test]
fn safetensors_overlapping_and_out_of_range_offsets() {
    let dir = tmp();
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    let err = Source::open(&hf_dir_with(dir.path(), &st_file(header, &[0; 24]))).err().unwrap();
    let ConvertError::OverlappingTensors { tensor, other, .. } = &err else { panic!("{err}") };
    assert_eq!((tensor.as_str(), other.as_str()), ("b", "a"));

    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let err = Source::open(&hf_dir_with(dir.path(), &st_file(header, &[0; 12]))).err().unwrap();
    let ConvertError::Truncated { what, .. } = &err else { panic!("{err}") };
    assert!(what.contains("`a`"), "{what}");

    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}"#;
    let err = Source::open(&hf_dir_with(dir.path(), &st_file(header, &[0; 16]))).err().unwrap();
    assert!(matches!(err, ConvertError::OffsetOutOfRange { .. }), "{err}");

    // sizes that disagree with shape x dtype are left to the safetensors crate's own checks
    let header = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#;
    let err = Source::open(&hf_dir_with(dir.path(), &st_file(header, &[0; 16]))).err().unwrap();
    assert!(err.to_string().contains("does not match its shape"), "{err}");
}

#[test]
fn safetensors_unsupported_dtype_names_the_tensor() {
    let dir = tmp();
    let header = r#"{"model.norm.weight":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}}"#;
    let source = Source::open(&hf_dir_with(dir.path(), &st_file(header, &[0; 16]))).unwrap();
    let err = source.read("model.norm.weight").unwrap_err();
    let ConvertError::UnsupportedDtype { tensor, dtype, .. } = &err else { panic!("{err}") };
    assert_eq!((tensor.as_str(), dtype.as_str()), ("model.norm.weight", "I32"));
}

#[test]
fn hf_config_must_be_llama() {
    let dir = tmp();
    tiny::write_hf_dir(dir.path()).unwrap();
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Source::open(dir.path()).err().unwrap();
    let ConvertError::Architecture { found, .. } = &err else { panic!("{err}") };
    assert_eq!(found, "MistralForCausalLM");
    assert!(err.to_string().contains("config.json"), "{err}");
}

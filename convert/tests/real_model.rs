//! The real SmolLM2-135M-Instruct GGUF (path in `LLAMA5_MODEL_GGUF`; these
//! tests fail, never skip, without it).

mod common;

use common::{real_model, Converted};
use llama5_codegen::manifest::{names, Precision, PrecisionTier, QuantFormat, DEFAULT_SHARD_BYTES};
use llama5_convert::gguf::{GgmlType, GgufFile};
use llama5_convert::gguf_model::unpermute_rows;
use llama5_convert::source::Source;
use llama5_convert::{convert, export_hf, inspect::inspect, ConvertOptions};

#[test]
fn tokenizer_matches_the_independent_reference_token_for_token() {
    let source = Source::open(&real_model()).unwrap();
    let tok = source.tokenizer().unwrap();
    let tokenizer: tokenizers::Tokenizer = tok.json.parse().unwrap();
    let reference: serde_json::Value = serde_json::from_str(include_str!("reference/smollm2_tokens.json")).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "tokens of {:?}", &text[..text.len().min(40)]);
        assert_eq!(tokenizer.decode(&got, false).unwrap(), text, "decoding round trips");
    }
    assert_eq!(tok.info.bos_token_id, Some(1));
    assert_eq!(tok.info.eos_token_ids, vec![2]);
    assert!(!tok.info.add_bos);
    assert!(tok.info.chat_template.as_deref().unwrap().contains("<|im_start|>"));
}

#[test]
fn inspect_reports_the_smollm2_shape() {
    let info = inspect(&real_model()).unwrap();
    let c = &info.config;
    assert_eq!((c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size), (30, 576, 9, 3, 49152));
    assert_eq!((c.intermediate_size, c.head_dim, c.max_position_embeddings), (1536, 64, 8192));
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tie_word_embeddings);
    assert_eq!(info.tensors.len(), 272);
    assert_eq!(info.parameters, 134_515_008);
    assert_eq!(info.tensors[names::EMBED].dtype, "Q8_0");
    assert!(info.unmapped.is_empty());
}

#[test]
fn converts_to_every_precision() {
    let root = tempfile::tempdir().unwrap();
    let model = real_model();
    for p in Precision::ALL {
        let out = root.path().join(p.as_str());
        let m = convert(&model, &out, &ConvertOptions::with_precision(p)).unwrap();
        assert_eq!(m.precision, PrecisionTier::from(p));
        assert_eq!(m.layers.len(), 30);
        assert!(m.shards.iter().all(|s| s.bytes <= DEFAULT_SHARD_BYTES));
        let dir = inspect(&out).unwrap();
        assert_eq!((dir.config.num_layers, dir.config.hidden_size, dir.config.vocab_size), (30, 576, 49152));
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn int4_reproduces_the_q4_1_values_exactly_and_is_deterministic() {
    let root = tempfile::tempdir().unwrap();
    let model = real_model();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let o = ConvertOptions::with_precision(Precision::Int4);
    let ma = convert(&model, &a, &o).unwrap();
    let mb = convert(&model, &b, &o).unwrap();
    assert_eq!(common::dir_files(&a), common::dir_files(&b), "two runs are byte-identical");
    assert_eq!(ma, mb);

    // the source values, straight from the file: ggml dequantization, rows un-permuted by hand
    let gguf = GgufFile::open(&model).unwrap();
    let c = Converted::load(&a);
    let mut checked = 0;
    for t in gguf.tensors.iter().filter(|t| t.ty == GgmlType::Q4_1) {
        let name = llama5_convert::gguf_model::hf_name(&t.name).unwrap();
        let (inf, out) = (t.dims[0] as usize, t.dims[1] as usize);
        let mut want = quants_dequantize(&gguf, t);
        let heads = if t.name.ends_with("attn_q.weight") {
            Some(9)
        } else if t.name.ends_with("attn_k.weight") {
            Some(3)
        } else {
            None
        };
        if let Some(h) = heads {
            let from = unpermute_rows(h, 64);
            want = (0..out).flat_map(|r| want[from[r] * inf..(from[r] + 1) * inf].to_vec()).collect();
        }
        assert_eq!(ma.tensors[&name].format, QuantFormat::Int4 { group_size: 32, symmetric: false });
        let got = c.values(&name);
        let max_diff = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        assert_eq!(max_diff, 0.0, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 210);
}

fn quants_dequantize(gguf: &GgufFile, t: &llama5_convert::gguf::GgufTensor) -> Vec<f32> {
    llama5_convert::quants::dequantize(t.ty, gguf.data(t)).unwrap()
}

#[test]
fn export_then_convert_equals_converting_the_gguf() {
    let root = tempfile::tempdir().unwrap();
    let model = real_model();
    let exported = root.path().join("hf");
    export_hf(&model, &exported, false).unwrap();
    for p in [Precision::Int4, Precision::F16] {
        let o = ConvertOptions::with_precision(p);
        let a = convert(&model, &root.path().join(format!("direct-{p}")), &o).unwrap();
        let b = convert(&exported, &root.path().join(format!("via-{p}")), &o).unwrap();
        assert_eq!(a.shards, b.shards, "{p}: identical shard bytes");
        assert_eq!(a.tensors, b.tensors, "{p}");
        assert_eq!(a.tokenizer, b.tokenizer, "{p}");
        assert_eq!(a.model, b.model, "{p}");
    }
}

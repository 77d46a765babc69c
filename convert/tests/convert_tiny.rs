//! End-to-end conversions of the tiny fixture model (HF directory and GGUF).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{dir_files, leftovers, Converted};
use llama5_codegen::format::error_bound;
use llama5_codegen::manifest::{names, Layout, Precision, PrecisionTier, QuantFormat};
use llama5_convert::{convert, export_hf, inspect::inspect, ConvertError, ConvertOptions, PrecisionSpec};
use llama5_fixtures::{tiny, GgufType};

type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn hf_dir(root: &Path) -> PathBuf {
    let dir = root.join("hf");
    tiny::write_hf_dir(&dir).unwrap();
    dir
}

/// The tiny HF directory with its weights changed by `edit`.
fn hf_dir_with(root: &Path, edit: impl FnOnce(&mut Weights)) -> PathBuf {
    let dir = root.join("hf-edited");
    tiny::write_hf_dir(&dir).unwrap();
    let mut w = tiny::weights();
    edit(&mut w);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        w.into_iter().map(|(n, (s, v))| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, d)| {
            (n.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    dir
}

fn gguf(root: &Path, ty: GgufType) -> PathBuf {
    let path = root.join(format!("tiny-{ty}.gguf"));
    tiny::write_gguf(&path, ty).unwrap();
    path
}

fn opts(p: Precision) -> ConvertOptions {
    ConvertOptions::with_precision(p)
}

/// Largest error the packer may make at `(o, i)` of a matrix `w` `[out, in]`.
fn bound(format: QuantFormat, w: &[f32], out: usize, inf: usize, o: usize, i: usize) -> f32 {
    let stats = |vals: &mut dyn Iterator<Item = f32>| {
        let v: Vec<f32> = vals.collect();
        let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (amax, hi - lo)
    };
    let (amax, range) = match format {
        QuantFormat::F16 | QuantFormat::Bf16 | QuantFormat::F32 => (w[o * inf + i].abs(), 0.0),
        QuantFormat::Int8 { per_tensor: true } => stats(&mut w[..out * inf].iter().copied()),
        QuantFormat::Int8 { per_tensor: false } => stats(&mut w[o * inf..(o + 1) * inf].iter().copied()),
        QuantFormat::Int4 { group_size, .. } => {
            let g = group_size as usize;
            let start = o * inf + i / g * g;
            stats(&mut w[start..start + g].iter().copied())
        }
    };
    error_bound(format, amax, range)
}

#[test]
fn hf_to_every_precision_within_the_error_bound() {
    let root = tempfile::tempdir().unwrap();
    let input = hf_dir(root.path());
    let weights = tiny::weights();
    for p in Precision::ALL {
        let out = root.path().join(format!("out-{p}"));
        let m = convert(&input, &out, &opts(p)).unwrap();
        assert_eq!(m.precision, PrecisionTier::from(p));
        assert!(m.layers.iter().all(|l| l.precision == p && l.reason.as_deref() == Some("uniform")));
        let c = Converted::load(&out);
        assert_eq!(c.manifest, m, "manifest.json is what convert returned");
        for (name, (shape, want)) in &weights {
            let t = &m.tensors[name];
            assert_eq!(&t.shape, shape, "{name}");
            let got = c.values(name);
            if shape.len() == 1 {
                assert_eq!(t.layout, Layout::Vector);
                assert_eq!(&got, want, "{name}: norms are stored exactly");
                continue;
            }
            for o in 0..shape[0] {
                for i in 0..shape[1] {
                    let (g, w) = (got[o * shape[1] + i], want[o * shape[1] + i]);
                    let b = bound(t.format, want, shape[0], shape[1], o, i);
                    assert!((g - w).abs() <= b, "{p} {name}[{o},{i}]: {g} vs {w} (bound {b})");
                }
            }
        }
        assert_eq!(
            std::fs::read(out.join("tokenizer.json")).unwrap(),
            std::fs::read(input.join("tokenizer.json")).unwrap()
        );
        assert_eq!(m.tokenizer.bos_token_id, Some(tiny::BOS_TOKEN_ID));
        assert_eq!(m.tokenizer.eos_token_ids, vec![tiny::EOS_TOKEN_ID]);
        assert_eq!(m.tokenizer.chat_template.as_deref(), Some(tiny::CHAT_TEMPLATE));
        assert_eq!(m.converter.source, "hf");
        assert_eq!(m.converter.options["precision"], p.as_str());
        assert!(leftovers(&out).is_empty());
    }
}

#[test]
fn gguf_f32_converts_to_the_same_shards_as_the_hf_directory() {
    // GGUF stores Q and K rows permuted for llama.cpp's rotary layout: only a
    // correct un-permutation gives identical shards
    let root = tempfile::tempdir().unwrap();
    for p in [Precision::F16, Precision::Int4] {
        let a = convert(&hf_dir(root.path()), &root.path().join(format!("a-{p}")), &opts(p)).unwrap();
        let b = convert(&gguf(root.path(), GgufType::F32), &root.path().join(format!("b-{p}")), &opts(p)).unwrap();
        assert_eq!(a.shards, b.shards, "{p}");
        assert_eq!(a.tensors, b.tensors, "{p}");
        assert_eq!(a.model.hidden_size, b.model.hidden_size);
        assert_eq!(b.tokenizer.eos_token_ids, vec![tiny::EOS_TOKEN_ID]);
        assert_eq!(b.tokenizer.chat_template.as_deref(), Some(tiny::CHAT_TEMPLATE));
    }
}

#[test]
fn gguf_4bit_blocks_go_into_int4_exactly() {
    let root = tempfile::tempdir().unwrap();
    for (ty, symmetric) in [(GgufType::Q4_1, false), (GgufType::Q4_0, false), (GgufType::Q4_0, true)] {
        let out = root.path().join(format!("{ty}-{symmetric}"));
        // the embedding too: by default INT4 models keep it at INT8
        let o = ConvertOptions { symmetric, precision: "embed=int4,*=int4".parse().unwrap(), ..opts(Precision::Int4) };
        let m = convert(&gguf(root.path(), ty), &out, &o).unwrap();
        let c = Converted::load(&out);
        for (name, (shape, want)) in tiny::gguf_weights(ty, ty) {
            if shape.len() == 2 {
                assert_eq!(m.tensors[&name].format, QuantFormat::Int4 { group_size: 32, symmetric });
            }
            assert_eq!(c.values(&name), want, "{ty} symmetric={symmetric}: {name} reproduced exactly");
        }
    }
}

#[test]
fn gguf_q4_1_into_symmetric_int4_requantizes_within_the_bound() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("sym");
    let o = ConvertOptions { symmetric: true, ..opts(Precision::Int4) };
    convert(&gguf(root.path(), GgufType::Q4_1), &out, &o).unwrap();
    let c = Converted::load(&out);
    let name = names::layer(1, "mlp.down_proj.weight");
    let (shape, want) = &tiny::gguf_weights(GgufType::Q4_1, GgufType::Q4_1)[&name];
    let got = c.values(&name);
    let f = QuantFormat::Int4 { group_size: 32, symmetric: true };
    assert_ne!(&got, want, "asymmetric groups cannot all be symmetric");
    for o in 0..shape[0] {
        for i in 0..shape[1] {
            let k = o * shape[1] + i;
            assert!((got[k] - want[k]).abs() <= bound(f, want, shape[0], shape[1], o, i), "[{o},{i}]");
        }
    }
}

#[test]
fn gguf_q8_0_into_f16_keeps_the_dequantized_values() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("q8");
    convert(&gguf(root.path(), GgufType::Q8_0), &out, &opts(Precision::F16)).unwrap();
    let c = Converted::load(&out);
    for (name, (shape, want)) in tiny::gguf_weights(GgufType::Q8_0, GgufType::Q8_0) {
        let to_f16 = |v: f32| if shape.len() == 2 { half::f16::from_f32(v).to_f32() } else { v };
        let want: Vec<f32> = want.iter().map(|&v| to_f16(v)).collect();
        assert_eq!(c.values(&name), want, "{name}");
    }
}

#[test]
fn conversion_is_deterministic() {
    let root = tempfile::tempdir().unwrap();
    let input = gguf(root.path(), GgufType::Q4_1);
    for p in Precision::ALL {
        let o = ConvertOptions { shard_size: 64 << 10, ..opts(p) };
        convert(&input, &root.path().join("one"), &o).unwrap();
        convert(&input, &root.path().join("two"), &o).unwrap();
        assert_eq!(dir_files(&root.path().join("one")), dir_files(&root.path().join("two")), "{p}");
        std::fs::remove_dir_all(root.path().join("one")).unwrap();
        std::fs::remove_dir_all(root.path().join("two")).unwrap();
    }
}

#[test]
fn small_shards_split_large_tensors_into_row_parts() {
    let root = tempfile::tempdir().unwrap();
    let input = hf_dir(root.path());
    for p in [Precision::F16, Precision::Int8, Precision::Int4] {
        let whole = convert(&input, &root.path().join(format!("whole-{p}")), &opts(p)).unwrap();
        // the norms' shard and one for the matrices
        assert_eq!(whole.shards.len(), 2);
        let shard_size = 8 << 10;
        let out = root.path().join(format!("split-{p}"));
        let m = convert(&input, &out, &ConvertOptions { shard_size, ..opts(p) }).unwrap();
        assert!(m.shards.len() > 2, "{p}: {} shards", m.shards.len());
        assert!(m.shards.iter().all(|s| s.bytes <= shard_size), "{p}: every shard fits");
        let embed = &m.tensors[names::EMBED];
        assert!(embed.parts.len() > 1, "{p}: the embedding is split");
        assert!(embed.parts.iter().all(|part| part.rows[1] - part.rows[0] <= tiny::VOCAB_SIZE));
        for (name, t) in &m.tensors {
            for part in &t.parts {
                let scales_shard = part.scales.map(|s| s.shard).unwrap_or(part.data.shard);
                assert_eq!(scales_shard, part.data.shard, "{name}: a part's scales share its shard");
            }
        }
        let (a, b) = (Converted::load(&root.path().join(format!("whole-{p}"))), Converted::load(&out));
        for name in whole.tensors.keys() {
            assert_eq!(a.values(name), b.values(name), "{p} {name}: parts hold the same values");
        }
    }
}

#[test]
fn shards_too_small_for_one_row_are_an_error() {
    let root = tempfile::tempdir().unwrap();
    let err = convert(
        &hf_dir(root.path()),
        &root.path().join("o"),
        &ConvertOptions { shard_size: 256, ..opts(Precision::F16) },
    )
    .unwrap_err();
    assert!(matches!(err, ConvertError::ShardTooSmall { .. }), "{err}");
    assert!(leftovers(&root.path().join("o")).is_empty());
    assert!(!root.path().join("o").exists());
}

#[test]
fn per_layer_precision() {
    let root = tempfile::tempdir().unwrap();
    let spec: PrecisionSpec = "layers.0=f16,*=int4".parse().unwrap();
    let o = ConvertOptions { precision: spec, ..Default::default() };
    let m = convert(&hf_dir(root.path()), &root.path().join("mixed"), &o).unwrap();
    assert_eq!(m.precision, PrecisionTier::Mixed);
    assert_eq!((m.layers[0].precision, m.layers[1].precision), (Precision::F16, Precision::Int4));
    assert!(m.layers.iter().all(|l| l.reason.as_deref() == Some("per-layer option") && l.kernels.len() == 5));
    assert!(
        m.layers[0].kernels.iter().any(|k| k.contains("-f16-"))
            && m.layers[1].kernels.iter().all(|k| !k.contains("-f16-"))
    );
    assert_eq!(m.tensors[&names::layer(0, "self_attn.q_proj.weight")].format, QuantFormat::F16);
    assert_eq!(m.tensors[&names::layer(1, "self_attn.q_proj.weight")].format.precision(), Some(Precision::Int4));
    assert_eq!(m.tensors[names::EMBED].format.precision(), Some(Precision::Int8), "INT4 keeps the embedding at INT8");
    assert_eq!(m.converter.options["precision"], "layers.0=f16,*=int4");
    let o = ConvertOptions { precision: "embed=int4,*=int4".parse().unwrap(), ..Default::default() };
    let m = convert(&hf_dir(root.path()), &root.path().join("embed4"), &o).unwrap();
    assert_eq!(m.tensors[names::EMBED].format.precision(), Some(Precision::Int4), "an embed rule overrides");

    let o = ConvertOptions { precision: "layers.2-5=f16,*=int4".parse().unwrap(), ..Default::default() };
    let err = convert(&hf_dir(root.path()), &root.path().join("bad"), &o).unwrap_err();
    assert!(err.to_string().contains("names layer 5") && err.to_string().contains("2 layers"), "{err}");
}

#[test]
fn bad_weights_fail_naming_the_tensor_and_leave_the_old_output_untouched() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    convert(&hf_dir(root.path()), &out, &opts(Precision::F16)).unwrap();
    let before = dir_files(&out);
    let forced = ConvertOptions { force: true, ..opts(Precision::Int4) };
    let bad = names::layer(1, "mlp.up_proj.weight");

    let input = hf_dir_with(root.path(), |w| w.get_mut(&bad).unwrap().1[77] = f32::NAN);
    let err = convert(&input, &out, &forced).unwrap_err();
    let ConvertError::NonFinite { tensor, index, .. } = &err else { panic!("{err}") };
    assert_eq!((tensor.as_str(), *index), (bad.as_str(), 77));
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    assert_eq!(dir_files(&out), before);
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));

    let input = hf_dir_with(root.path(), |w| w.get_mut(names::FINAL_NORM).unwrap().1[3] = f32::INFINITY);
    let err = convert(&input, &out, &forced).unwrap_err();
    assert!(matches!(&err, ConvertError::NonFinite { tensor, .. } if tensor == names::FINAL_NORM), "{err}");

    let input = hf_dir_with(root.path(), |w| {
        w.remove(&bad);
    });
    let err = convert(&input, &out, &forced).unwrap_err();
    assert!(matches!(&err, ConvertError::MissingTensor { tensor, .. } if *tensor == bad), "{err}");

    let input = hf_dir_with(root.path(), |w| {
        let (shape, values) = w.get_mut(&bad).unwrap();
        shape[0] -= 1;
        values.truncate(shape[0] * shape[1]);
    });
    let err = convert(&input, &out, &forced).unwrap_err();
    let ConvertError::ShapeMismatch { tensor, found, expected, .. } = &err else { panic!("{err}") };
    assert_eq!((tensor, found, expected), (&bad, &vec![127, 64], &vec![128, 64]));

    assert_eq!(dir_files(&out), before, "every failure left the old model as it was");
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}

#[test]
fn existing_outputs() {
    let root = tempfile::tempdir().unwrap();
    let input = hf_dir(root.path());
    let out = root.path().join("model");
    convert(&input, &out, &opts(Precision::F16)).unwrap();
    let err = convert(&input, &out, &opts(Precision::Int8)).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    let m = convert(&input, &out, &ConvertOptions { force: true, ..opts(Precision::Int8) }).unwrap();
    assert_eq!(Converted::load(&out).manifest, m, "--force replaced the model");
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));

    let stranger = root.path().join("notes");
    std::fs::create_dir(&stranger).unwrap();
    std::fs::write(stranger.join("todo.txt"), "keep me").unwrap();
    let err = convert(&input, &stranger, &ConvertOptions { force: true, ..opts(Precision::F16) }).unwrap_err();
    assert!(matches!(err, ConvertError::Output { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(stranger.join("todo.txt")).unwrap(), "keep me");

    let file = root.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert!(matches!(convert(&input, &file, &opts(Precision::F16)), Err(ConvertError::Output { .. })));

    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    convert(&input, &empty, &opts(Precision::F16)).unwrap();
    assert!(empty.join("manifest.json").is_file());

    let nested = root.path().join("a/b/c");
    convert(&input, &nested, &opts(Precision::F16)).unwrap();
    assert!(nested.join("manifest.json").is_file());
}

#[test]
fn export_then_convert_equals_converting_the_gguf() {
    let root = tempfile::tempdir().unwrap();
    for ty in [GgufType::Q4_1, GgufType::Q8_0] {
        let input = gguf(root.path(), ty);
        let exported = root.path().join(format!("export-{ty}"));
        export_hf(&input, &exported, false).unwrap();
        assert!(matches!(export_hf(&input, &exported, false), Err(ConvertError::Output { .. })));
        export_hf(&input, &exported, true).unwrap();
        for p in Precision::ALL {
            let a = convert(&input, &root.path().join(format!("direct-{ty}-{p}")), &opts(p)).unwrap();
            let b = convert(&exported, &root.path().join(format!("via-{ty}-{p}")), &opts(p)).unwrap();
            assert_eq!(a.tensors, b.tensors, "{ty} {p}");
            assert_eq!(a.shards, b.shards, "{ty} {p}: identical shard bytes");
            assert_eq!(a.model, b.model, "{ty} {p}");
            assert_eq!(a.tokenizer, b.tokenizer, "{ty} {p}");
        }
    }
}

#[test]
fn manifests_match_the_json_schema() {
    let schema: serde_json::Value = serde_json::from_str(include_str!("../../docs/manifest.schema.json")).unwrap();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let root = tempfile::tempdir().unwrap();
    let input = gguf(root.path(), GgufType::Q4_1);
    let cases = [
        opts(Precision::F16),
        ConvertOptions { int8_per_tensor: true, shard_size: 8 << 10, ..opts(Precision::Int8) },
        ConvertOptions { symmetric: true, group_size: 64, ..opts(Precision::Int4) },
        ConvertOptions { precision: "layers.1=bf16,*=int4".parse().unwrap(), ..Default::default() },
    ];
    for (i, o) in cases.iter().enumerate() {
        let out = root.path().join(format!("m{i}"));
        convert(&input, &out, o).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        let errors: Vec<String> =
            validator.iter_errors(&json).map(|e| format!("{} at {}", e, e.instance_path)).collect();
        assert!(errors.is_empty(), "case {i}: {errors:#?}");
    }
    // and the schema is not vacuous
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.path().join("m0/manifest.json")).unwrap()).unwrap();
    json["shards"][0]["sha256"] = "XYZ".into();
    json["tensors"][names::EMBED]["parts"][0]["data"]["offset"] = 13.into();
    assert_eq!(validator.iter_errors(&json).count(), 2);
}

#[test]
fn gguf_tokenizer_of_the_fixture() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("tok");
    let m = convert(&gguf(root.path(), GgufType::F32), &out, &opts(Precision::F16)).unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = tok.encode("<|im_start|>Hi!<|im_end|>", false).unwrap().get_ids().to_vec();
    assert_eq!(ids, vec![tiny::IM_START_ID, b'H' as u32, b'i' as u32, b'!' as u32, tiny::IM_END_ID]);
    assert_eq!(tok.decode(&ids[1..4], false).unwrap(), "Hi!");
    assert_eq!(m.tokenizer.bos_token_id, Some(tiny::BOS_TOKEN_ID));
    assert!(!m.tokenizer.add_bos);
}

#[test]
fn inspect_a_model_directory_and_inputs() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    convert(&hf_dir(root.path()), &out, &opts(Precision::Int4)).unwrap();
    let dir = inspect(&out).unwrap();
    assert_eq!(dir.kind, "model");
    assert_eq!(dir.precision.as_deref(), Some("int4"));
    assert_eq!(dir.shards.len(), 2);
    let params: usize = tiny::weights().values().map(|(s, _)| s.iter().product::<usize>()).sum();
    assert_eq!(dir.parameters, params as u64);
    assert!(dir.bytes_by_type.contains_key("int4 g32 asymmetric") && dir.bytes_by_type.contains_key("f32"));
    assert!(dir.to_string().contains("layers:        2"));

    let g = inspect(&gguf(root.path(), GgufType::Q4_1)).unwrap();
    assert_eq!(
        (g.kind.as_str(), g.config.num_heads, g.config.num_kv_heads),
        ("gguf", tiny::NUM_HEADS, tiny::NUM_KV_HEADS)
    );
    assert_eq!(g.parameters, params as u64);
    assert_eq!(g.tensors[names::EMBED].dtype, "Q4_1");
    let h = inspect(&hf_dir(root.path())).unwrap();
    assert_eq!((h.kind.as_str(), h.config.hidden_size), ("safetensors", tiny::HIDDEN_SIZE));
    assert_eq!(h.bytes_by_type["F32"], params as u64 * 4);
}

#[test]
fn the_binary_converts_by_default_and_fails_with_a_message() {
    let root = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_llama5-convert");
    let input = gguf(root.path(), GgufType::Q4_0);
    let out = root.path().join("cli");
    let run = |args: &[&std::ffi::OsStr]| std::process::Command::new(bin).args(args).output().unwrap();
    let ok = run(&[
        input.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--precision".as_ref(),
        "int8".as_ref(),
        "--shard-size".as_ref(),
        "64KiB".as_ref(),
    ]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let m = Converted::load(&out).manifest;
    assert_eq!((m.precision, m.converter.options["shard_size"].as_str()), (PrecisionTier::Int8, "65536"));

    let again = run(&["convert".as_ref(), input.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let shown = run(&["inspect".as_ref(), out.as_os_str(), "--json".as_ref()]);
    assert!(shown.status.success());
    let json: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(json["config"]["num_layers"], tiny::NUM_LAYERS);

    let bad = run(&["inspect".as_ref(), root.path().join("missing.gguf").as_os_str()]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing.gguf"));
}

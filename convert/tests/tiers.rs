//! Multi-tier output (`--precision int4,int8,f16`) of the tiny fixture.

use std::os::unix::fs::MetadataExt;

use llama5_codegen::manifest::{Precision, PrecisionTier};
use llama5_convert::{convert_tiers, ConvertOptions};
use llama5_fixtures::tiny;

#[test]
fn tiers_are_written_together_and_share_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    tiny::write_hf_dir(&hf).unwrap();
    let out = dir.path().join("tiers");
    let all = [Precision::Int4, Precision::Int8, Precision::F16];
    let ms = convert_tiers(&hf, &out, &all, &ConvertOptions::default()).unwrap();
    for (p, m) in all.iter().zip(&ms) {
        assert_eq!(m.precision, PrecisionTier::from(*p));
        let on_disk = std::fs::read_to_string(out.join(p.as_str()).join("manifest.json")).unwrap();
        assert_eq!(on_disk, m.to_json());
    }
    let ino = |p: &str| std::fs::metadata(out.join(p).join("tokenizer.json")).unwrap().ino();
    assert!(ino("int4") == ino("int8") && ino("int8") == ino("f16"), "one tokenizer file, hard-linked");
    // the norms' shard is shared; the matrices' shards are not
    let shard = |p: &str, i: usize| std::fs::metadata(out.join(p).join(format!("shard_{i:05}.bin"))).unwrap().ino();
    assert!(shard("int4", 0) == shard("int8", 0) && shard("int8", 0) == shard("f16", 0), "one norms shard");
    assert_ne!(shard("int4", 1), shard("f16", 1));
    let norms = &ms[0].tensors[llama5_codegen::manifest::names::FINAL_NORM].parts[0].data;
    assert_eq!(norms.shard, 0);

    // an existing output is kept unless --force
    let err = convert_tiers(&hf, &out, &all, &ConvertOptions::default()).unwrap_err().to_string();
    assert!(err.contains("already holds model tiers"), "{err}");
    let err = convert_tiers(&hf, &out, &[Precision::Int8, Precision::Int8], &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("int8 is named twice"), "{err}");

    // a failure part-way leaves the previous tiers as they were, and no temporary directory
    let bad = dir.path().join("bad");
    tiny::write_hf_dir(&bad).unwrap();
    let mut w = tiny::weights();
    w.get_mut("model.layers.1.mlp.down_proj.weight").unwrap().1[5] = f32::NAN;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        w.into_iter().map(|(n, (s, v))| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, d)| {
            (n.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    std::fs::write(bad.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let forced = ConvertOptions { force: true, ..Default::default() };
    let err = convert_tiers(&bad, &out, &all, &forced).unwrap_err().to_string();
    assert!(err.contains("non-finite"), "{err}");
    let f16 = std::fs::read_to_string(out.join("f16").join("manifest.json")).unwrap();
    assert_eq!(f16, ms[2].to_json(), "the previous output is untouched");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "leftovers: {names:?}");
    // and --force replaces them
    let ms2 = convert_tiers(&hf, &out, &all[..2], &forced).unwrap();
    assert_eq!(ms2.len(), 2);
    assert!(!out.join("f16").exists(), "the replaced output is gone as a whole");
}

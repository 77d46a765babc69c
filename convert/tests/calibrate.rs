//! Calibration and precision routing on the tiny fixture model.

use std::path::{Path, PathBuf};

use llama5_codegen::manifest::{Manifest, Precision};
use llama5_convert::calibrate::{calibrate, CalibrateOptions, Calibration};
use llama5_convert::route::{convert_routed, route, LossLimit, Objective};
use llama5_convert::{ConvertError, ConvertOptions};
use llama5_fixtures::{tiny, GgufType};

const TEXT: &str = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! \
                    How vexingly quick daft zebras jump; the five boxing wizards jump quickly.";

struct Fixture {
    dir: tempfile::TempDir,
    hf: PathBuf,
    cal_path: PathBuf,
    cal: Calibration,
}

fn fixture(options: &CalibrateOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    tiny::write_hf_dir(&hf).unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT).unwrap();
    let cal = calibrate(&hf, &text, options).unwrap();
    let cal_path = dir.path().join("calibration.json");
    std::fs::write(&cal_path, cal.to_json()).unwrap();
    Fixture { dir, hf, cal_path, cal }
}

fn default_fixture() -> Fixture {
    fixture(&CalibrateOptions { tokens: 64, ..Default::default() })
}

fn out(fx: &Fixture, name: &str) -> PathBuf {
    fx.dir.path().join(name)
}

#[test]
fn measurements_are_sane_and_int4_costs_more_than_int8() {
    let fx = default_fixture();
    let cal = &fx.cal;
    assert_eq!(cal.tokens, 64);
    assert_eq!(cal.units.len(), tiny::NUM_LAYERS + 1, "embed plus one per layer");
    assert_eq!(cal.units[0].unit, "embed");
    assert_eq!(cal.units[2].unit, "layers.1");
    assert_eq!(cal.options.precisions, vec![Precision::Int8, Precision::Int4]);
    let (mut int8, mut int4) = (0.0, 0.0);
    for u in &cal.units {
        for (p, e) in &u.effects {
            assert!(e.kl.is_finite() && e.kl >= 0.0, "{} {p}: kl {}", u.unit, e.kl);
            assert!(e.rel_error.is_finite() && e.rel_error > 0.0, "{} {p}: rel_error {}", u.unit, e.rel_error);
        }
        int8 += u.effects[&Precision::Int8].kl;
        int4 += u.effects[&Precision::Int4].kl;
        let b = &u.bytes;
        assert!(b[&Precision::Int4] < b[&Precision::Int8] && b[&Precision::Int8] < b[&Precision::F16], "{b:?}");
        assert!(u.effects[&Precision::Int4].rel_error > u.effects[&Precision::Int8].rel_error, "{}", u.unit);
    }
    assert!(int4 > 4.0 * int8, "int4 {int4} vs int8 {int8}");
    // the file reads back as written
    let back = Calibration::read(&fx.cal_path).unwrap();
    assert_eq!(
        (&back.model, &back.source, &back.text, &back.options),
        (&cal.model, &cal.source, &cal.text, &cal.options)
    );
    for (a, b) in back.units.iter().zip(&cal.units) {
        assert_eq!((&a.unit, &a.bytes), (&b.unit, &b.bytes));
        for (p, e) in &a.effects {
            let (x, y) = (e.kl, b.effects[p].kl);
            assert!((x - y).abs() <= 1e-12 * y.abs(), "{} {p}: {x} vs {y}", a.unit);
        }
    }
    // and the same text gives the same file
    let again =
        calibrate(&fx.hf, &fx.dir.path().join("text.txt"), &CalibrateOptions { tokens: 64, ..Default::default() })
            .unwrap();
    assert_eq!(again.to_json(), cal.to_json());
}

/// The calibration file with `edit` applied to its JSON, read back.
fn read_edited(fx: &Fixture, edit: impl FnOnce(&mut serde_json::Value)) -> Result<Calibration, ConvertError> {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&fx.cal_path).unwrap()).unwrap();
    edit(&mut v);
    let path = fx.dir.path().join("edited.json");
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    Calibration::read(&path)
}

#[test]
fn bad_files_name_the_field() {
    let fx = default_fixture();
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|v| v["units"][1]["effects"]["int4"]["kl"] = (-1.0).into()), "units[1].effects.int4.kl"),
        (Box::new(|v| v["units"][2]["unit"] = "layers.7".into()), "units[2].unit"),
        (Box::new(|v| v["units"].as_array_mut().unwrap().truncate(2)), "units"),
        (Box::new(|v| v["format"] = "gguf".into()), "format"),
        (Box::new(|v| v["version"] = 9.into()), "version"),
        (Box::new(|v| drop(v.as_object_mut().unwrap().remove("tokens"))), "missing field `tokens`"),
        (Box::new(|v| v["options"]["colour"] = "red".into()), "unknown field `colour`"),
        (
            Box::new(|v| drop(v["units"][0]["effects"].as_object_mut().unwrap().remove("int8"))),
            "units[0].effects: has no int8 entry",
        ),
    ];
    for (edit, want) in cases {
        let err = read_edited(&fx, edit).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("edited.json"), "want `{want}` in: {err}");
    }
}

/// Bytes of every shard of a converted model.
fn model_bytes(m: &Manifest) -> u64 {
    m.total_bytes()
}

#[test]
fn routing_honours_the_budget_and_is_deterministic() {
    let fx = default_fixture();
    let options = ConvertOptions::default();
    let all_at = |p: Precision| -> u64 {
        let o = ConvertOptions { precision: format!("embed={p},*={p}").parse().unwrap(), ..options.clone() };
        let m = llama5_convert::convert(&fx.hf, &out(&fx, &format!("uniform-{p}")), &o).unwrap();
        model_bytes(&m)
    };
    let (smallest, largest) = (all_at(Precision::Int4), all_at(Precision::F16));
    let mut last_kl = f64::INFINITY;
    for (i, budget) in
        [smallest, (smallest * 2 + largest) / 3, (smallest + largest * 2) / 3, largest].into_iter().enumerate()
    {
        let dir = out(&fx, &format!("budget-{i}"));
        let (m, r) = convert_routed(&fx.hf, &dir, &options, &fx.cal_path, Objective::Budget(budget)).unwrap();
        assert!(model_bytes(&m) <= budget, "{} > budget {budget}", model_bytes(&m));
        assert!(r.planned_bytes <= budget && model_bytes(&m) <= r.planned_bytes);
        assert!(r.predicted_kl <= last_kl, "a larger budget never predicts more loss");
        last_kl = r.predicted_kl;
        // every layer records its precision and why
        for (l, c) in m.layers.iter().zip(r.choices.iter().skip(1)) {
            assert_eq!(l.precision, c.precision);
            let reason = l.reason.as_deref().unwrap();
            assert!(reason.starts_with("calibrated (budget") && reason.contains("int4"), "{reason}");
        }
        assert!(m.converter.options["calibration"].contains("text.txt sha256"));
        if i == 0 {
            assert!(r.choices.iter().all(|c| c.precision == Precision::Int4), "the smallest budget: int4 everywhere");
        }
        // the same file and budget give the same directory
        let again = out(&fx, &format!("budget-{i}-again"));
        let (m2, r2) = convert_routed(&fx.hf, &again, &options, &fx.cal_path, Objective::Budget(budget)).unwrap();
        assert_eq!(r2, r);
        assert_eq!(m2.to_json(), m.to_json());
    }
    assert_eq!(last_kl, 0.0, "the f16 budget keeps every unit at f16");

    let err = convert_routed(&fx.hf, &out(&fx, "tiny"), &options, &fx.cal_path, Objective::Budget(smallest - 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("smallest possible model: {smallest} bytes")), "{err}");
    assert!(!out(&fx, "tiny").exists());
}

#[test]
fn routing_honours_the_loss_limit() {
    let fx = default_fixture();
    let options = ConvertOptions::default();
    let int4_total: f64 = fx.cal.units.iter().map(|u| u.effects[&Precision::Int4].kl).sum();
    let mut last_bytes = 0;
    for frac in [1.5, 0.5, 0.1, 0.0] {
        let limit = LossLimit::Nats(int4_total * frac);
        let r = route(&fx.cal, &options, Objective::MaxLoss(limit)).unwrap();
        assert!(r.predicted_kl <= limit.nats(), "{} > {}", r.predicted_kl, limit.nats());
        assert!(r.planned_bytes >= last_bytes, "a tighter limit never gives a smaller model");
        last_bytes = r.planned_bytes;
        if frac > 1.0 {
            assert!(r.choices.iter().all(|c| c.precision == Precision::Int4));
        }
    }
    // a perplexity percentage is ln(1 + x/100) nats
    assert!((LossLimit::PplPercent(5.0).nats() - 1.05f64.ln()).abs() < 1e-12);
    assert_eq!("2%".parse::<LossLimit>(), Ok(LossLimit::PplPercent(2.0)));
    assert_eq!("0.02".parse::<LossLimit>(), Ok(LossLimit::Nats(0.02)));
    assert!("-1".parse::<LossLimit>().is_err() && "much".parse::<LossLimit>().is_err());
    let dir = out(&fx, "loss");
    let (m, _) =
        convert_routed(&fx.hf, &dir, &options, &fx.cal_path, Objective::MaxLoss(LossLimit::Nats(int4_total * 0.3)))
            .unwrap();
    assert!(m.layers[0].reason.as_deref().unwrap().starts_with("calibrated (max loss"));
}

#[test]
fn mismatched_calibrations_are_refused() {
    let fx = default_fixture();
    let try_convert = |input: &Path, options: &ConvertOptions, name: &str| {
        convert_routed(input, &out(&fx, name), options, &fx.cal_path, Objective::Budget(u64::MAX))
            .unwrap_err()
            .to_string()
    };
    // other quantization options than measured
    let err = try_convert(&fx.hf, &ConvertOptions { symmetric: true, ..Default::default() }, "sym");
    assert!(err.contains("options.symmetric") && err.contains("calibration.json"), "{err}");
    let err = try_convert(&fx.hf, &ConvertOptions { group_size: 16, ..Default::default() }, "g16");
    assert!(err.contains("options.group_size"), "{err}");
    // the same architecture from another file: other weights
    let gguf = fx.dir.path().join("tiny.gguf");
    tiny::write_gguf(&gguf, GgufType::Q8_0).unwrap();
    let err = try_convert(&gguf, &ConvertOptions::default(), "gguf");
    assert!(err.contains("source.sha256") && err.contains("not on this input"), "{err}");
    // another layer count
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&fx.cal_path).unwrap()).unwrap();
    v["model"]["num_layers"] = 1.into();
    v["units"].as_array_mut().unwrap().truncate(2);
    std::fs::write(&fx.cal_path, serde_json::to_string(&v).unwrap()).unwrap();
    let err = try_convert(&fx.hf, &ConvertOptions::default(), "layers");
    assert!(err.contains("model.num_layers") && err.contains("1 layers"), "{err}");
    for name in ["sym", "g16", "gguf", "layers"] {
        assert!(!out(&fx, name).exists(), "{name}: nothing written on error");
    }
}

#[test]
fn the_binary_calibrates_routes_and_writes_tiers() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    tiny::write_hf_dir(&hf).unwrap();
    let text = root.path().join("text.txt");
    std::fs::write(&text, TEXT).unwrap();
    let cal = root.path().join("cal.json");
    let run =
        |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_llama5-convert")).args(args).output().unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let (hf_s, text_s, cal_s) = (p(&hf), p(&text), p(&cal));
    let out = run(&["calibrate", &hf_s, "--text", &text_s, "-o", &cal_s, "--tokens", "32", "--precisions", "int4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = Calibration::read(&cal).unwrap();
    assert_eq!((c.tokens, c.options.precisions.clone()), (32, vec![Precision::Int4]));

    let routed = p(&root.path().join("routed"));
    let out = run(&[&hf_s, "-o", &routed, "--calibration", &cal_s, "--max-loss", "1%"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && err.contains("routed for max loss 1%ppl"), "{err}");
    // the routed manifest still matches the published schema
    let schema: serde_json::Value = serde_json::from_str(include_str!("../../docs/manifest.schema.json")).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.path().join("routed/manifest.json")).unwrap()).unwrap();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    assert!(validator.is_valid(&manifest));
    assert!(manifest["converter"]["options"]["objective"].as_str().unwrap().starts_with("max loss"));

    // --calibration needs an objective; an objective needs --calibration
    let out = run(&[&hf_s, "-o", &p(&root.path().join("x")), "--calibration", &cal_s]);
    assert!(!out.status.success());
    let out = run(&[&hf_s, "-o", &p(&root.path().join("x")), "--budget", "1MiB"]);
    assert!(!out.status.success());
    let out = run(&[&hf_s, "-o", &p(&root.path().join("x")), "--calibration", &cal_s, "--max-loss", "lots"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is not a loss"));
    let out = run(&[&hf_s, "-o", &p(&root.path().join("x")), "--calibration", &cal_s, "--budget", "1KiB"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("smallest possible model"), "{err}");
    assert!(!root.path().join("x").exists());

    let tiers = root.path().join("tiers");
    let out = run(&[&hf_s, "-o", &p(&tiers), "--precision", "int4,f16"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tiers.join("int4/manifest.json").is_file() && tiers.join("f16/manifest.json").is_file());
}

#[test]
fn the_reference_named_as_a_candidate_is_measured_against_not_measured() {
    let fx = fixture(&CalibrateOptions {
        tokens: 16,
        precisions: vec![Precision::F16, Precision::Int8],
        ..Default::default()
    });
    assert_eq!(fx.cal.options.precisions, vec![Precision::Int8]);
    assert!(fx.cal.units.iter().all(|u| u.effects.keys().eq([&Precision::Int8])));
    let text = fx.dir.path().join("text.txt");
    let only_reference = CalibrateOptions { precisions: vec![Precision::F16], ..Default::default() };
    let e = calibrate(&fx.hf, &text, &only_reference).unwrap_err().to_string();
    assert!(e.contains("other than the f16 reference"), "{e}");
}

//! The `llama5` binary on the fixture model converted by `llama5_convert`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use llama5_codegen::manifest::Precision;
use llama5_convert::ConvertOptions;
use llama5_fixtures::tiny;
use llama5_runtime::generate::{GenerateOptions, Generator};
use llama5_runtime::sampling::SamplingParams;
use llama5_runtime::tokenizer::Tokenizer;
use llama5_runtime::{CpuBackend, Model};

/// A temporary directory holding `<precision>/` tiers of the converted fixture.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(precisions: &[Precision]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hf = dir.path().join("hf");
        tiny::write_hf_dir(&hf).unwrap();
        for &p in precisions {
            let out = dir.path().join("tiers").join(p.as_str());
            llama5_convert::convert(&hf, &out, &ConvertOptions::with_precision(p)).unwrap();
        }
        Fixture { dir }
    }

    fn tiers(&self) -> PathBuf {
        self.dir.path().join("tiers")
    }

    fn tier(&self, p: Precision) -> PathBuf {
        self.tiers().join(p.as_str())
    }
}

fn llama5(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llama5")).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

const PROMPT: &str = "Hello, llama5!";

#[test]
fn greedy_generate_is_deterministic_and_matches_the_library() {
    let fx = Fixture::new(&[Precision::F16]);
    let model_dir = fx.tier(Precision::F16);
    let args = [
        "generate",
        path(&model_dir),
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--backend",
        "cpu",
    ];
    let first = llama5(&args);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let second = llama5(&args);
    assert_eq!(first.stdout, second.stdout);
    let stderr = text(&first.stderr);
    assert!(stderr.contains("prefill: ") && stderr.contains("ms/token") && stderr.contains("backend: cpu"), "{stderr}");

    // the same greedy run through the library
    let model = Model::open(&model_dir, true).unwrap();
    let tok = Tokenizer::for_model(&model).unwrap();
    let mut cpu = CpuBackend::new(&model, 256).unwrap();
    let opts = GenerateOptions { max_tokens: 12, sampling: SamplingParams::greedy(), sliding_window: false };
    let g =
        Generator::new(&mut cpu, &tok).generate(&tok.encode(PROMPT, true).unwrap(), &opts, &mut |_| Ok(())).unwrap();
    assert_eq!(text(&first.stdout), format!("{}\n", g.text));

    // the GPU backend, with its default f32 KV cache and with an f16 one
    for kv in ["f32", "f16"] {
        let mut gpu_args = args.to_vec();
        *gpu_args.last_mut().unwrap() = "gpu";
        gpu_args.extend(["--kv-cache", kv]);
        let gpu = llama5(&gpu_args);
        let stderr = text(&gpu.stderr);
        assert!(gpu.status.success() && stderr.contains("backend: gpu"), "{stderr}");
        if kv == "f32" {
            assert_eq!(gpu.stdout, first.stdout, "the f32 KV cache gives the CPU backend's tokens");
            assert!(!stderr.contains("kernels f16"), "{stderr}");
        }
    }
}

#[test]
fn seeded_sampling_repeats() {
    let fx = Fixture::new(&[Precision::Int8]);
    let dir = fx.tier(Precision::Int8);
    let run = |seed: &str| {
        let out = llama5(&[
            "generate",
            path(&dir),
            "--prompt",
            "abc",
            "--seed",
            seed,
            "--temperature",
            "1.5",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--max-tokens",
            "16",
            "--backend",
            "cpu",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        out.stdout
    };
    assert_eq!(run("7"), run("7"));
}

#[test]
fn missing_model_names_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let out = llama5(&["generate", path(dir.path()), "--prompt", "x", "--backend", "cpu"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("manifest.json") && stderr.contains(path(dir.path())), "{stderr}");
}

#[test]
fn corrupted_shard_is_named() {
    let fx = Fixture::new(&[Precision::F16]);
    let shard = fx.tier(Precision::F16).join("shard_00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let out = llama5(&["generate", path(&fx.tier(Precision::F16)), "--prompt", "x", "--backend", "cpu"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("shard_00000.bin") && stderr.contains("sha256"), "{stderr}");
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let fx = Fixture::new(&[Precision::F16]);
    let dir = fx.tier(Precision::F16);
    let out = llama5(&["generate", path(&dir), "--prompt", "a prompt of many bytes", "--ctx", "8", "--backend", "cpu"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("does not fit a context of 8"), "{stderr}");
    // a sliding window accepts it
    let out = llama5(&[
        "generate",
        path(&dir),
        "--prompt",
        "a prompt of many bytes",
        "--ctx",
        "8",
        "--sliding-window",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--backend",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn tiers_auto_and_explicit() {
    let fx = Fixture::new(&[Precision::F16, Precision::Int4]);
    let tiers = fx.tiers();
    let out = llama5(&["generate", path(&tiers), "--prompt", "x", "--max-tokens", "2", "--backend", "cpu"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("f16 tier"), "auto picks the highest fidelity: {}", text(&out.stderr));
    let out = llama5(&[
        "generate",
        path(&tiers),
        "--prompt",
        "x",
        "--max-tokens",
        "2",
        "--backend",
        "cpu",
        "--precision",
        "int4",
    ]);
    assert!(out.status.success() && text(&out.stderr).contains("int4 tier"), "{}", text(&out.stderr));
    let out = llama5(&["generate", path(&tiers), "--prompt", "x", "--backend", "cpu", "--precision", "int8"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no int8 tier") && text(&out.stderr).contains("f16, int4"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn auto_backend_falls_back_with_one_notice() {
    let fx = Fixture::new(&[Precision::F16]);
    let out = llama5(&[
        "generate",
        path(&fx.tier(Precision::F16)),
        "--prompt",
        "x",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    // on a machine with a usable adapter the GPU runs; otherwise one notice says why
    if !stderr.contains("backend: gpu") {
        assert!(stderr.contains("no usable GPU (") && stderr.contains("using the CPU backend"), "{stderr}");
        assert!(stderr.contains("backend: cpu"), "{stderr}");
    }
}

#[test]
fn chat_keeps_history_and_resets() {
    let fx = Fixture::new(&[Precision::F16]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_llama5"))
        .args(["chat", path(&fx.tier(Precision::F16)), "--temperature", "0", "--max-tokens", "4", "--backend", "cpu"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hi\nAgain\n/reset\nHi\n/exit\nnever read\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let prefills: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("prefill: "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(prefills.len(), 3, "{stderr}");
    assert!(prefills[1] < prefills[0], "the second turn reuses the first: {prefills:?}");
    assert_eq!(prefills[2], prefills[0], "after /reset the first prompt runs whole again");
    assert!(stderr.contains("history cleared"));
}

#[test]
fn perplexity_json() {
    let fx = Fixture::new(&[Precision::F16]);
    let text_file = fx.dir.path().join("text.txt");
    std::fs::write(&text_file, "the quick brown fox jumps over the lazy dog. ".repeat(10)).unwrap();
    let out = llama5(&[
        "perplexity",
        path(&fx.tier(Precision::F16)),
        "--text",
        path(&text_file),
        "--ctx",
        "64",
        "--json",
        "--backend",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 450 bytes + BOS: 7 windows of 64, 31 scored each
    assert_eq!(report["windows"].as_array().unwrap().len(), 7);
    assert_eq!(report["scored"], 7 * 31);
    let ppl = report["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");
}

#[test]
fn info_summarises_the_model() {
    let fx = Fixture::new(&[Precision::F16, Precision::Int8]);
    let out = llama5(&["info", path(&fx.tiers())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("2 layers, hidden 64") && stdout.contains("precision:   f16"), "{stdout}");
    assert!(stdout.contains("precision:   int8"), "{stdout}");
}

/// The fixture's tokenizer with a wider one-layer model (hidden 512), whose
/// f16 projections are larger than any activation buffer, so a binding limit
/// can reject the f16 tier and admit the int8 one.
fn wide_hf_dir(dir: &Path) {
    tiny::write_hf_dir(dir).unwrap();
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let (hidden, inter, heads, kv_heads, head_dim, vocab) = (512usize, 256usize, 4usize, 2usize, 128usize, 259usize);
    config["hidden_size"] = hidden.into();
    config["intermediate_size"] = inter.into();
    config["num_hidden_layers"] = 1.into();
    config["num_attention_heads"] = heads.into();
    config["num_key_value_heads"] = kv_heads.into();
    config["head_dim"] = head_dim.into();
    config["vocab_size"] = vocab.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let l = |s: &str| format!("model.layers.0.{s}");
    let shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, hidden]),
        ("model.norm.weight".into(), vec![hidden]),
        (l("input_layernorm.weight"), vec![hidden]),
        (l("post_attention_layernorm.weight"), vec![hidden]),
        (l("self_attn.q_proj.weight"), vec![heads * head_dim, hidden]),
        (l("self_attn.k_proj.weight"), vec![kv_heads * head_dim, hidden]),
        (l("self_attn.v_proj.weight"), vec![kv_heads * head_dim, hidden]),
        (l("self_attn.o_proj.weight"), vec![hidden, heads * head_dim]),
        (l("mlp.gate_proj.weight"), vec![inter, hidden]),
        (l("mlp.up_proj.weight"), vec![inter, hidden]),
        (l("mlp.down_proj.weight"), vec![hidden, inter]),
    ];
    // a safetensors file by hand: header length, JSON header, f32 data
    let (mut header, mut data, mut state) = (serde_json::Map::new(), Vec::<u8>::new(), 0x9e37_79b9_7f4a_7c15u64);
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let start = data.len();
        for _ in 0..n {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = if shape.len() == 1 { 1.0 } else { ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1 };
            data.extend(v.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::Value::Object(header).to_string().into_bytes();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
}

/// A device whose largest binding is lowered below the f16 projections:
/// `auto` falls back to the int8 tier and says so; an explicit f16 fails
/// naming the limit.
#[test]
fn auto_falls_back_to_a_tier_that_fits_a_smaller_device() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    wide_hf_dir(&hf);
    let tiers = dir.path().join("tiers");
    let all = [Precision::Int4, Precision::Int8, Precision::F16];
    let manifests = llama5_convert::convert_tiers(&hf, &tiers, &all, &ConvertOptions::default()).unwrap();
    // the largest weight binding of the int8 tier and of the f16 tier
    let largest = |i: usize| {
        manifests[i]
            .tensors
            .values()
            .flat_map(|t| &t.parts)
            .map(|p| p.data.bytes + p.scales.map_or(0, |s| s.bytes))
            .max()
    };
    let (int8, f16) = (largest(1).unwrap(), largest(2).unwrap());
    let limit = (int8 + f16) / 2 / 4 * 4;
    assert!(int8 < limit && limit < f16);
    let run = |precision: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llama5"));
        cmd.args(["generate", path(&tiers), "--prompt", "x", "--max-tokens", "2", "--ctx", "16"]).args([
            "--backend",
            "gpu",
            "--no-pipeline-cache",
        ]);
        if let Some(p) = precision {
            cmd.args(["--precision", p]).env("LLAMA5_MAX_BINDING_BYTES", limit.to_string());
        }
        cmd.output().unwrap()
    };
    let out = run(Some("auto"));
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("the f16 tier does not fit the GPU") && err.contains("trying int8"), "{err}");
    assert!(err.contains(&format!(" allows {limit} (")), "{err}");
    assert!(err.contains("int8 tier from"), "int8 is the tier that ran: {err}");
    let out = run(Some("f16"));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no tier of") && err.contains(&limit.to_string()), "{err}");
    // the adapter's own limits take the f16 tier
    let out = run(None);
    assert!(out.status.success() && text(&out.stderr).contains("f16 tier from"), "{}", text(&out.stderr));
}

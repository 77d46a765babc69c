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

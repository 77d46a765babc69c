//! The real SmolLM2-135M-Instruct (the Q4_1 GGUF named by `LLAMA5_MODEL_GGUF`)
//! converted at each precision, the GPU backend (llvmpipe where there is no
//! GPU) against the CPU reference: logits over a long English text, and a
//! greedy chat reply. Without the model these tests fail; they never skip.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use llama5_codegen::manifest::Precision;
use llama5_convert::ConvertOptions;
use llama5_runtime::chat::ChatTemplate;
use llama5_runtime::generate::{Chat, GenerateOptions, Generation, Generator};
use llama5_runtime::gpu::{GpuBackend, GpuOptions};
use llama5_runtime::sampling::SamplingParams;
use llama5_runtime::tokenizer::Tokenizer;
use llama5_runtime::{Backend, CpuBackend, Logits, Model};

/// The text the logits are compared on: long, plain English, on every Debian-like system.
const TEXT: &str = "/usr/share/common-licenses/GPL-3";
/// Tokens of [`TEXT`] compared per precision; `LLAMA5_AGREEMENT_TOKENS` overrides
/// (512 for the full measurement, which is slow on llvmpipe).
const DEFAULT_AGREEMENT_TOKENS: usize = 256;
/// Rows whose greedy token agrees. The GPU keeps its KV cache in f16 where the
/// adapter has shader-f16 and sums in another order, so a near-tie may flip.
const MIN_TOP1_AGREEMENT: f64 = 0.99;
/// Mean cosine similarity of the logits rows: a wrong kernel drops it far below.
const MIN_MEAN_COSINE: f64 = 0.999;
const CHAT_PROMPT: &str = "Write a haiku about the sea.";
const CHAT_TOKENS: usize = 32;
/// Greedy tokens may differ where the CPU's top two logits are this close: the
/// f16 KV cache moves top logits by about 1e-3 (SmolLM2's reply to
/// [`CHAT_PROMPT`] has a tie of 2.5e-3 at its 18th token).
const NEAR_TIE_LOGITS: f32 = 0.02;

fn gguf() -> PathBuf {
    let Some(path) = std::env::var_os("LLAMA5_MODEL_GGUF") else {
        panic!("LLAMA5_MODEL_GGUF is not set: run `cargo xtask fetch-model` and set it to the .gguf it prints (`cargo xtask test` does both)");
    };
    let path = PathBuf::from(path);
    assert!(path.is_file(), "LLAMA5_MODEL_GGUF={} is not a file: run `cargo xtask fetch-model`", path.display());
    path
}

/// A converted model and its tokenizer, loaded once per precision.
struct Converted {
    model: Model,
    tokenizer: Tokenizer,
}

fn converted(precision: Precision) -> &'static Converted {
    static F16: OnceLock<Converted> = OnceLock::new();
    static INT8: OnceLock<Converted> = OnceLock::new();
    static INT4: OnceLock<Converted> = OnceLock::new();
    let cell = match precision {
        Precision::F16 => &F16,
        Precision::Int8 => &INT8,
        Precision::Int4 => &INT4,
        p => panic!("no converted model kept for {p}"),
    };
    cell.get_or_init(|| {
        let t0 = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(precision.as_str());
        llama5_convert::convert(&gguf(), &out, &ConvertOptions::with_precision(precision))
            .unwrap_or_else(|e| panic!("converting {} to {precision}: {e}", gguf().display()));
        let model = Model::open(&out, true).unwrap();
        let tokenizer = Tokenizer::for_model(&model).unwrap();
        // statics are never dropped: remove the files now; the shards stay mapped
        drop(dir);
        eprintln!("converted to {precision} in {:.1} s", t0.elapsed().as_secs_f64());
        Converted { model, tokenizer }
    })
}

fn agreement_tokens() -> usize {
    match std::env::var("LLAMA5_AGREEMENT_TOKENS") {
        Ok(v) => match v.parse() {
            Ok(n) if n > 0 => n,
            _ => panic!("LLAMA5_AGREEMENT_TOKENS={v:?} is not a positive token count"),
        },
        Err(_) => DEFAULT_AGREEMENT_TOKENS,
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-300)
}

/// How far the GPU's logits rows are from the CPU's.
struct Agreement {
    rows: usize,
    top1: f64,
    mean_cosine: f64,
    min_cosine: f64,
    /// Row of the smallest cosine.
    min_row: usize,
    max_abs_diff: f32,
}

impl std::fmt::Display for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows: top-1 agreement {:.4}, logits cosine mean {:.7} min {:.7} (row {}), max |gpu - cpu| {:.4}",
            self.rows, self.top1, self.mean_cosine, self.min_cosine, self.min_row, self.max_abs_diff
        )
    }
}

fn agreement(gpu: &[f32], cpu: &[f32], vocab: usize) -> Agreement {
    assert_eq!(gpu.len(), cpu.len(), "logits lengths");
    let rows = cpu.len() / vocab;
    let (mut same, mut sum, mut min_cosine, mut min_row, mut max_abs_diff) = (0, 0.0, f64::INFINITY, 0, 0f32);
    for (i, (g, c)) in gpu.chunks_exact(vocab).zip(cpu.chunks_exact(vocab)).enumerate() {
        assert!(g.iter().all(|v| v.is_finite()), "gpu logits row {i} is not finite");
        same += usize::from(argmax(g) == argmax(c));
        let cos = cosine(g, c);
        sum += cos;
        if cos < min_cosine {
            (min_cosine, min_row) = (cos, i);
        }
        max_abs_diff = g.iter().zip(c).map(|(a, b)| (a - b).abs()).fold(max_abs_diff, f32::max);
    }
    Agreement {
        rows,
        top1: same as f64 / rows as f64,
        mean_cosine: sum / rows as f64,
        min_cosine,
        min_row,
        max_abs_diff,
    }
}

fn text_tokens(tokenizer: &Tokenizer, n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(TEXT).unwrap_or_else(|e| panic!("{TEXT}: {e}"));
    let mut tokens = tokenizer.encode(&text, true).unwrap();
    assert!(tokens.len() >= n, "{TEXT} has {} tokens, fewer than the {n} to compare", tokens.len());
    tokens.truncate(n);
    tokens
}

fn gpu_backend(model: &Model, ctx: usize) -> GpuBackend {
    GpuBackend::new(model, &GpuOptions { adapter: None, ctx, pipeline_cache_dir: None })
        .unwrap_or_else(|e| panic!("the GPU backend does not load the {:?} model: {e}", model.manifest.precision))
}

fn logits_agree(precision: Precision) {
    let n = agreement_tokens();
    let c = converted(precision);
    let tokens = text_tokens(&c.tokenizer, n);
    let mut gpu = gpu_backend(&c.model, n);
    let mut cpu = CpuBackend::new(&c.model, n).unwrap();
    let vocab = cpu.vocab_size();
    assert_eq!(gpu.vocab_size(), vocab);

    let t0 = Instant::now();
    let g = gpu.forward(&tokens, 0, Logits::All).unwrap();
    let gpu_secs = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let want = cpu.forward(&tokens, 0, Logits::All).unwrap();
    let cpu_secs = t0.elapsed().as_secs_f64();
    assert_eq!(g.len(), n * vocab, "gpu logits for {n} tokens");

    let a = agreement(&g, &want, vocab);
    let what = format!("{precision}, first {n} tokens of {TEXT}, {}", gpu.info().details);
    eprintln!("{what}: {a} (gpu {gpu_secs:.1} s, cpu {cpu_secs:.1} s)");
    assert!(a.top1 >= MIN_TOP1_AGREEMENT, "{what}: top-1 agreement below {MIN_TOP1_AGREEMENT}: {a}");
    assert!(a.mean_cosine > MIN_MEAN_COSINE, "{what}: mean logits cosine not above {MIN_MEAN_COSINE}: {a}");
}

#[test]
fn f16_gpu_logits_match_cpu() {
    logits_agree(Precision::F16);
}

#[test]
fn int8_gpu_logits_match_cpu() {
    logits_agree(Precision::Int8);
}

#[test]
fn int4_gpu_logits_match_cpu() {
    logits_agree(Precision::Int4);
}

fn greedy_reply(backend: &mut dyn Backend, tokenizer: &Tokenizer, prompt: &[u32]) -> Generation {
    let opts = GenerateOptions { max_tokens: CHAT_TOKENS, sampling: SamplingParams::greedy(), sliding_window: false };
    Generator::new(backend, tokenizer).generate(prompt, &opts, &mut |_| Ok(())).unwrap()
}

/// The CPU's logit for its own greedy choice minus its logit for `other`, after `prefix`.
fn cpu_margin(model: &Model, prefix: &[u32], other: u32) -> (u32, f32) {
    let mut cpu = CpuBackend::new(model, prefix.len()).unwrap();
    let row = cpu.forward(prefix, 0, Logits::Last).unwrap();
    let best = argmax(&row);
    (best as u32, row[best] - row[other as usize])
}

#[test]
fn int4_greedy_chat_reply_is_the_same_on_gpu_and_cpu() {
    let c = converted(Precision::Int4);
    let template = ChatTemplate::for_tokenizer(&c.tokenizer).unwrap().expect("SmolLM2 has a chat template");
    let prompt = Chat::new(template).prompt(&c.tokenizer, CHAT_PROMPT).unwrap();
    let ctx = prompt.len() + CHAT_TOKENS;
    let mut cpu = CpuBackend::new(&c.model, ctx).unwrap();
    let want = greedy_reply(&mut cpu, &c.tokenizer, &prompt);
    assert!(!want.text.trim().is_empty(), "the CPU reply to {CHAT_PROMPT:?} is empty: {:?}", want.tokens);
    assert_eq!(want.tokens.len(), CHAT_TOKENS, "the CPU reply ends early: {:?}", want.text);

    // With an f32 KV cache the GPU differs from the CPU only in summation order:
    // every greedy token is the same.
    let opts = GpuOptions { adapter: None, ctx, pipeline_cache_dir: None };
    let mut gpu = GpuBackend::with_features(&c.model, &opts, wgpu::Features::all() - wgpu::Features::SHADER_F16)
        .unwrap_or_else(|e| panic!("the GPU backend without shader-f16: {e}"));
    assert!(!gpu.target().shader_f16, "kernels {} keep an f16 KV cache", gpu.target().name());
    let got = greedy_reply(&mut gpu, &c.tokenizer, &prompt);
    let what = format!("greedy reply to {CHAT_PROMPT:?} on {}", gpu.info().details);
    assert_eq!(got.tokens, want.tokens, "{what}\n gpu {:?}\n cpu {:?}", got.text, want.text);
    assert_eq!(got.text, want.text, "{what}");
    drop(gpu);

    // The adapter's own choice (f16 KV cache on llvmpipe) may take the other
    // side of a near-tie, but nowhere else.
    let mut gpu = gpu_backend(&c.model, ctx);
    let got = greedy_reply(&mut gpu, &c.tokenizer, &prompt);
    let what = format!("greedy reply to {CHAT_PROMPT:?} on {}", gpu.info().details);
    eprintln!("cpu: {:?}\ngpu: {:?} ({what})", want.text, got.text);
    if let Some(k) = got.tokens.iter().zip(&want.tokens).position(|(a, b)| a != b) {
        let prefix: Vec<u32> = prompt.iter().chain(&want.tokens[..k]).copied().collect();
        let (best, margin) = cpu_margin(&c.model, &prefix, got.tokens[k]);
        assert_eq!(best, want.tokens[k], "the CPU backend is not deterministic at generated token {k}");
        assert!(
            margin < NEAR_TIE_LOGITS,
            "{what}: generated token {k} is {} on the gpu, {} on the cpu, whose logits differ by {margin} \
             (more than a near-tie of {NEAR_TIE_LOGITS})\n gpu {:?}\n cpu {:?}",
            got.tokens[k],
            want.tokens[k],
            got.text,
            want.text
        );
    } else {
        assert_eq!(got.tokens, want.tokens, "{what}");
    }
}

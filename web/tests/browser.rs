//! The runtime in real browsers (`cargo xtask test` runs this file under
//! `wasm-bindgen-test-runner` in Chromium and in Firefox): a kernel against
//! CPU reference values on the browser's WebGPU adapter, and the tiny fixture
//! model generating the greedy tokens the native CPU backend generated.
//!
//! The fixture is converted natively by xtask into `$LLAMA5_WEB_FIXTURE`
//! (with `expected.json`, the native CPU backend's tokens) and embedded here.
#![cfg(target_arch = "wasm32")]

use llama5_codegen::format;
use llama5_codegen::manifest::{Manifest, QuantFormat};
use llama5_codegen::{generate, Activation, KernelSpec, StepUniform};
use llama5_runtime::generate::{AsyncGenerator, GenerateOptions, Generator, Streamed};
use llama5_runtime::gpu::harness::KernelRunner;
use llama5_runtime::gpu::{GpuBackend, GpuOptions};
use llama5_runtime::model::ShardBytes;
use llama5_runtime::sampling::SamplingParams;
use llama5_runtime::tokenizer::Tokenizer;
use llama5_runtime::{CpuBackend, Model};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

macro_rules! fixture {
    ($file:literal) => {
        include_bytes!(concat!(env!("LLAMA5_WEB_FIXTURE"), "/", $file))
    };
}

const MANIFEST: &[u8] = fixture!("manifest.json");
/// The norms' shard, then the matrices'.
const SHARDS: [&[u8]; 2] = [fixture!("shard_00000.bin"), fixture!("shard_00001.bin")];
const TOKENIZER: &[u8] = fixture!("tokenizer.json");
/// `{"ctx", "max_tokens", "prompt": [ids], "tokens": [ids]}` from the native CPU backend.
const EXPECTED: &[u8] = fixture!("expected.json");

/// Same bound as the native kernel tests for INT4: only summation order differs.
const NMSE: f64 = 1e-9;

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let err: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    err / norm.max(1e-30)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The line xtask collects for its summary.
async fn adapter_line(target: &llama5_codegen::Target) -> String {
    format!("adapter: {}; kernels {}", llama5_web::browser_adapter_info().await, target.name())
}

#[wasm_bindgen_test]
async fn adapter_grants_the_web_kernel_target() {
    let probe = llama5_runtime::gpu::probe(None).await.expect("a WebGPU adapter");
    console_log!("{}", adapter_line(&probe.target).await);
    assert_eq!(probe.info.backend, wgpu::Backend::BrowserWebGpu);
    // wgpu's web backend never reports subgroups: the workgroup-reduction kernels run
    assert!(!probe.target.subgroups);
}

#[wasm_bindgen_test]
async fn matvec_kernels_match_the_cpu() {
    let runner = KernelRunner::new_async(None, wgpu::Features::all()).await.expect("a WebGPU adapter");
    let target = *runner.target();
    console_log!("{}", adapter_line(&target).await);
    let formats = [
        QuantFormat::F16,
        QuantFormat::Int8 { per_tensor: false },
        QuantFormat::Int4 { group_size: 32, symmetric: false },
    ];
    for format in formats {
        let (in_features, out, tokens) = (96, 77, 2);
        let w = values(in_features as u64 + out as u64, out * in_features);
        let p = format::pack(format, &w, out, in_features).unwrap();
        let w = format::unpack(format, &p.data, &p.scales, out, in_features).unwrap();
        let mut w_bytes = p.data;
        w_bytes.extend_from_slice(&p.scales);
        let x = values(7, tokens * in_features);
        let hidden = values(9, tokens * out);
        let spec = KernelSpec::MatvecAdd { input: Activation::Ffn, in_features, out_features: out, format, target };
        let step = StepUniform {
            pos: 0,
            n_tokens: tokens as u32,
            ctx: 1,
            logits_from: 0,
            argmax_row: 0,
            ..Default::default()
        };
        let contents = vec![step.to_bytes().to_vec(), f32_bytes(&x), w_bytes, f32_bytes(&hidden)];
        let mut want = hidden.clone();
        for t in 0..tokens {
            for o in 0..out {
                let row = &w[o * in_features..(o + 1) * in_features];
                want[t * out + o] += row.iter().zip(&x[t * in_features..]).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        let kernel = generate(&spec).unwrap();
        let grid = kernel.dispatch_for(&step, 0);
        let result =
            runner.run_async(&kernel, &contents, grid).await.unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
        let got: Vec<f32> = result[3].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let e = nmse(&got, &want);
        assert!(e <= NMSE, "{}: nmse {e:.3e} above {NMSE:.0e}", kernel.name);
    }
}

fn tiny_model() -> (Model, Tokenizer) {
    let manifest = Manifest::from_json(std::str::from_utf8(MANIFEST).unwrap()).unwrap();
    assert_eq!(manifest.shards.len(), SHARDS.len(), "the fixture's shards");
    let shards = SHARDS.iter().map(|s| std::sync::Arc::new(*s) as ShardBytes).collect();
    let model = Model::from_parts(manifest, Default::default(), shards).unwrap();
    for i in 0..SHARDS.len() {
        model.verify_shard(i).unwrap();
    }
    let tokenizer = Tokenizer::from_bytes(TOKENIZER, &model.manifest.tokenizer).unwrap();
    (model, tokenizer)
}

#[wasm_bindgen_test]
async fn tiny_model_generates_the_native_cpu_backends_greedy_tokens() {
    let expected: serde_json::Value = serde_json::from_slice(EXPECTED).unwrap();
    let ids =
        |k: &str| -> Vec<u32> { expected[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
    let (prompt, want) = (ids("prompt"), ids("tokens"));
    let ctx = expected["ctx"].as_u64().unwrap() as usize;
    let opts = GenerateOptions {
        max_tokens: expected["max_tokens"].as_u64().unwrap() as usize,
        sampling: SamplingParams::greedy(),
        sliding_window: false,
    };
    assert!(want.len() > 8, "the expectation covers more than one greedy chunk");
    let (model, tokenizer) = tiny_model();

    // the CPU backend compiled to wasm is the same code as natively
    let mut cpu = CpuBackend::new(&model, ctx).unwrap();
    let on_cpu = Generator::new(&mut cpu, &tokenizer).generate(&prompt, &opts, &mut |_| Ok(())).unwrap();
    assert_eq!(on_cpu.tokens, want, "CPU backend in the browser");

    let gpu_opts = GpuOptions { adapter: None, ctx, pipeline_cache_dir: None };
    let gpu = GpuBackend::new_async(&model, &gpu_opts, wgpu::Features::all()).await.unwrap();
    console_log!("{}", gpu.load_report());
    let mut generator = AsyncGenerator::new(gpu, tokenizer);
    let mut streamed = Vec::new();
    let got = generator
        .generate(&prompt, &opts, &mut |e| {
            if let Streamed::Token(id) = e {
                streamed.push(id);
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(got.tokens, want, "GPU backend in the browser ({})", generator.backend().load_report());
    assert_eq!(streamed, want);
    assert_eq!(got.text, on_cpu.text);
}

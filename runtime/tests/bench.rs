//! `llama5 bench` with tiny models and small counts: every figure present and
//! sane (positive times, shares within 0..=100 %, memory covering the weights).
//! Speeds themselves are not asserted: they depend on the machine.

use std::process::Command;

use llama5_codegen::manifest::{ModelConfig, Precision};
use llama5_convert::ConvertOptions;
use llama5_fixtures::tiny;
use llama5_runtime::bench::{self, BenchBackend, BenchOptions, BenchReport, ModelSource};
use llama5_runtime::synthetic::SyntheticShape;

fn tiny_shape() -> SyntheticShape {
    SyntheticShape::Custom(ModelConfig {
        architecture: "llama".into(),
        name: Some("tiny".into()),
        hidden_size: 128,
        intermediate_size: 256,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        vocab_size: 512,
        max_position_embeddings: 256,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
    })
}

fn small(backend: BenchBackend) -> BenchOptions {
    BenchOptions {
        backend,
        runs: 2,
        prompt_tokens: 4,
        gen_tokens: 4,
        prefill_tokens: 16,
        copy_bytes: Some(4 << 20),
        profile: false,
        temperature: 0.0,
    }
}

/// Every figure that must hold whatever the machine's speed.
fn check(r: &BenchReport, opts: &BenchOptions) {
    let positive = [
        ("copy GB/s", r.copy.gb_per_s),
        ("copy min GB/s", r.copy.min_gb_per_s),
        ("backend ms", r.time_to_first_token.backend_ms),
        ("prompt ms", r.time_to_first_token.prompt_ms),
        ("decode median", r.decode.median_ms),
        ("decode min", r.decode.min_ms),
        ("decode tok/s", r.decode.tokens_per_s),
        ("prefill ms", r.prefill.median_ms),
        ("prefill tok/s", r.prefill.tokens_per_s),
        ("prefill matmul TFLOP/s", r.prefill.matmul_tflops),
        ("effective GB/s", r.traffic.effective_gb_per_s),
    ];
    for (what, v) in positive {
        assert!(v.is_finite() && v > 0.0, "{what} is {v}");
    }
    let c = &r.copy;
    assert!(c.min_gb_per_s <= c.gb_per_s && c.gb_per_s <= c.max_gb_per_s, "{c:?}");
    let d = &r.decode;
    assert!(d.min_ms <= d.p10_ms && d.p10_ms <= d.median_ms && d.median_ms <= d.p90_ms && d.p90_ms <= d.max_ms);
    assert_eq!(d.run_median_ms.len(), opts.runs);
    assert!(r.prefill.total_tflops > r.prefill.matmul_tflops);
    let f = &r.time_to_first_token;
    assert!(f.ttft_ms >= f.backend_ms + f.prompt_ms);

    let share = r.traffic.copy_share_percent;
    assert!(share > 0.0 && share <= 100.0, "copy share {share}%");
    let t = &r.traffic;
    assert!(t.weight_bytes_per_token > 0 && t.kv_bytes_per_token > 0);
    assert_eq!(t.bytes_per_token, t.weight_bytes_per_token + t.kv_bytes_per_token);
    assert_eq!(t.mean_context, opts.prompt_tokens as f64 + (opts.gen_tokens as f64 + 1.0) / 2.0);
    // a token reads every layer matrix but only one row of the embedding
    assert!(t.weight_bytes_per_token < r.model.weight_bytes + r.model.weight_bytes / 2);

    // the dispatch floor, and the ceiling it sets, on the GPU only
    match (&r.dispatch_floor, r.backend.kind.as_str()) {
        (Some(f), "gpu") => {
            assert!(f.us_per_dispatch.is_finite() && f.us_per_dispatch > 0.0, "{f:?}");
            assert_eq!(f.ms_per_token, f.us_per_dispatch * f.dispatches_per_token as f64 / 1e3);
            assert_eq!(f.dispatches_per_rep, f.dispatches_per_token * r.decode.tokens_per_call);
            let (ms, share) = (t.ceiling_ms_per_token.unwrap(), t.ceiling_share_percent.unwrap());
            // the floor is on top of the copy time: strictly below 100%
            assert!(share > 0.0 && share < 100.0, "ceiling share {share}%");
            let at_copy = t.bytes_per_token as f64 / r.copy.gb_per_s / 1e6;
            assert!((ms - at_copy - f.ms_per_token).abs() < 1e-9 * ms, "ceiling {ms} ms");
            assert!(r.to_table().contains("dispatch floor") && r.to_table().contains("decode ceiling"));
        }
        (None, "cpu") => assert!(t.ceiling_ms_per_token.is_none() && t.ceiling_share_percent.is_none()),
        (f, kind) => panic!("{kind} backend with dispatch floor {f:?}"),
    }

    let m = &r.memory;
    assert!(m.weights_bytes >= m.model_weight_bytes, "{m:?}");
    assert!(m.total_bytes >= m.model_weight_bytes + m.expected_kv_cache_bytes, "{m:?}");
    assert_eq!(m.kv_cache_bytes, m.expected_kv_cache_bytes);
    assert_eq!(r.settings.ctx, opts.prefill_tokens.max(opts.prompt_tokens + opts.gen_tokens));

    let json = serde_json::to_value(r).unwrap();
    for key in ["model", "backend", "copy", "time_to_first_token", "decode", "prefill", "traffic", "memory"] {
        assert!(json.get(key).is_some_and(|v| v.is_object()), "json lacks `{key}`");
    }
    let table = r.to_table();
    for row in ["copy bandwidth", "time to first token", "decode", "prefill", "bytes per token", "memory"] {
        assert!(table.contains(row), "table lacks `{row}`:\n{table}");
    }
}

#[test]
fn gpu_bench_of_a_synthetic_model() {
    let opts = BenchOptions { profile: true, ..small(BenchBackend::Gpu { adapter: None }) };
    let source = ModelSource::Synthetic { shape: tiny_shape(), precision: Precision::Int4, seed: 1 };
    let r = bench::run(&source, &opts).unwrap();
    check(&r, &opts);
    assert!(r.model.synthetic);
    assert_eq!(r.model.precision, "int4");
    assert_eq!(r.backend.kind, "gpu");
    assert!(r.memory.counted);
    assert!(r.decode.argmax_on_device);
    assert!(r.time_to_first_token.host_build_ms.is_some_and(|ms| ms >= 0.0));
    // both copies ran; the faster is the yardstick
    let methods: Vec<&str> = std::iter::once(&r.copy).chain(&r.other_copies).map(|c| c.method.as_str()).collect();
    assert_eq!(methods.len(), 2, "{methods:?}");
    assert!(methods.iter().any(|m| m.contains("shader")) && methods.iter().any(|m| m.contains("buffer-to-buffer")));
    assert!(r.other_copies.iter().all(|c| c.gb_per_s <= r.copy.gb_per_s));
    assert_eq!(r.copy.buffer_bytes, 4 << 20);

    // the profile covers every dispatch of a decode step and of the prefill
    let profile = r.profile.as_ref().expect("--profile was asked for");
    assert_eq!(profile.iter().map(|p| p.step.as_str()).collect::<Vec<_>>(), ["decode", "prefill"]);
    for p in profile {
        let calls: usize = p.kernels.iter().map(|k| k.calls).sum();
        assert_eq!(calls, p.dispatches, "{}", p.step);
        // 2 layers x 5 kernels, embed, logits, argmax
        assert_eq!(p.dispatches, 2 * 5 + 3, "{}", p.step);
        assert_eq!(r.dispatch_floor.as_ref().unwrap().dispatches_per_token, p.dispatches);
        let share: f64 = p.kernels.iter().map(|k| k.share_percent).sum();
        assert!((share - 100.0).abs() < 1e-6, "{}: shares sum to {share}", p.step);
        assert!(p.kernels.iter().all(|k| k.gpu_ms >= 0.0) && p.gpu_ms > 0.0, "{p:?}");
        assert!(p.kernels.windows(2).all(|w| w[0].gpu_ms >= w[1].gpu_ms), "sorted by time");
    }
    let prefill = &profile[1];
    assert_eq!(prefill.tokens, opts.prefill_tokens);
    assert!(prefill.kernels.iter().any(|k| k.kernel.ends_with("-batch") && k.flops > 0.0), "{prefill:?}");
    assert!(r.to_table().contains("profile: prefill"));
}

#[test]
fn sampled_decode_is_benched_on_both_backends() {
    let source = ModelSource::Synthetic { shape: tiny_shape(), precision: Precision::Int8, seed: 2 };
    for backend in [BenchBackend::Gpu { adapter: None }, BenchBackend::Cpu] {
        let opts = BenchOptions { temperature: 0.8, ..small(backend.clone()) };
        let r = bench::run(&source, &opts).unwrap();
        check(&r, &opts);
        assert_eq!(r.settings.temperature, 0.8, "{backend:?}");
    }
}

#[test]
fn cli_bench_of_a_converted_model_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    tiny::write_hf_dir(&hf).unwrap();
    let out = dir.path().join("int8");
    llama5_convert::convert(&hf, &out, &ConvertOptions::with_precision(Precision::Int8)).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_llama5"))
        .arg("bench")
        .arg(&out)
        .args(["--backend", "cpu", "--json", "--runs", "2", "--prompt-tokens", "4", "--gen-tokens", "4"])
        .args(["--prefill-tokens", "16", "--copy-mib", "4"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["backend"]["kind"], "cpu");
    assert_eq!(json["model"]["synthetic"], false);
    assert_eq!(json["model"]["precision"], "int8");
    assert_eq!(json["model"]["vocab_size"], tiny::VOCAB_SIZE);
    assert_eq!(json["settings"]["prefill_tokens"], 16);
    let share = json["traffic"]["copy_share_percent"].as_f64().unwrap();
    assert!(share > 0.0 && share <= 100.0, "copy share {share}%");
    assert!(json["decode"]["median_ms"].as_f64().unwrap() > 0.0);
    assert!(json["memory"]["total_bytes"].as_u64().unwrap() >= json["memory"]["model_weight_bytes"].as_u64().unwrap());

    // the library agrees with the CLI on what it measured
    let opts = small(BenchBackend::Cpu);
    let r = bench::run(&ModelSource::Dir { path: out, precision: None }, &opts).unwrap();
    check(&r, &opts);
    assert_eq!(r.model.weight_bytes, json["model"]["weight_bytes"].as_u64().unwrap());
    assert!(!r.memory.counted && !r.decode.argmax_on_device);
}

#[test]
fn bench_rejects_zero_counts_and_contexts_past_the_model() {
    let source = ModelSource::Synthetic { shape: tiny_shape(), precision: Precision::F16, seed: 0 };
    let zero = BenchOptions { gen_tokens: 0, ..small(BenchBackend::Cpu) };
    let e = bench::run(&source, &zero).unwrap_err().to_string();
    assert!(e.contains("gen tokens"), "{e}");
    let long = BenchOptions { prefill_tokens: 1000, ..small(BenchBackend::Cpu) };
    let e = bench::run(&source, &long).unwrap_err().to_string();
    assert!(e.contains("1000 positions") && e.contains("256"), "{e}");
    let profile = BenchOptions { profile: true, ..small(BenchBackend::Cpu) };
    let e = bench::run(&source, &profile).unwrap_err().to_string();
    assert!(e.contains("--profile") && e.contains("CPU"), "{e}");
}

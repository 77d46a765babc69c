//! `cargo xtask bench`: the standard benchmark set through the release
//! `llama5 bench`: the real SmolLM2 (converted at int4 and f16, as the demo
//! does) and synthetic shapes, written to `target/bench/bench.md` and
//! `bench.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::{demo, util};

pub const USAGE: &str = "\
usage: cargo xtask bench [options]
  --synthetic <shapes>     comma-separated synthetic shapes (smollm2-135m, llama-1b, llama-7b) or `none`;
                           default smollm2-135m,llama-1b with a discrete GPU, else smollm2-135m
  --precisions <list>      precisions of the synthetic models (default int4,f16)
  --no-real                skip the real SmolLM2 model
  --backend <gpu|cpu>      default gpu
  --adapter <name>         GPU adapter name substring
  --runs <n> --prompt-tokens <n> --gen-tokens <n> --prefill-tokens <n>
                           passed to `llama5 bench` (defaults: llama5's on a discrete GPU; 1 run,
                           32 prompt, 32 generated and 128 prefill tokens on other adapters)
  --out <dir>              default target/bench";

/// `llama5 bench` counts for adapters without a discrete GPU (software
/// rasterisers run SmolLM2 at a few tokens per second).
const SLOW_DEVICE_COUNTS: [(&str, &str); 4] =
    [("--runs", "1"), ("--prompt-tokens", "32"), ("--gen-tokens", "32"), ("--prefill-tokens", "128")];
const COUNT_FLAGS: [&str; 4] = ["--runs", "--prompt-tokens", "--gen-tokens", "--prefill-tokens"];

#[derive(Debug, Default, PartialEq)]
struct Options {
    synthetic: Option<Vec<String>>,
    precisions: Vec<String>,
    real: bool,
    backend: Option<String>,
    adapter: Option<String>,
    /// Count flags with their values, in the order given.
    counts: Vec<(String, String)>,
    out: Option<PathBuf>,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options { precisions: vec!["int4".into(), "f16".into()], real: true, ..Options::default() };
    let list = |v: &str| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect::<Vec<_>>();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--synthetic" => {
                let v = value()?;
                o.synthetic = Some(if v == "none" { Vec::new() } else { list(v) });
            }
            "--precisions" => o.precisions = list(value()?),
            "--no-real" => o.real = false,
            "--backend" => o.backend = Some(value()?.clone()),
            "--adapter" => o.adapter = Some(value()?.clone()),
            "--out" => o.out = Some(value()?.into()),
            flag if COUNT_FLAGS.contains(&flag) => {
                let v = value()?;
                v.parse::<usize>().with_context(|| format!("{flag} takes a number, got `{v}`"))?;
                o.counts.push((flag.to_string(), v.clone()));
            }
            other => bail!("unexpected bench argument `{other}`\n{USAGE}"),
        }
    }
    Ok(o)
}

/// One `llama5 bench` invocation of the set.
struct Job {
    label: String,
    args: Vec<String>,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let opts = parse(args)?;
    util::run(util::cargo().args(["build", "--release", "-p", "llama5-runtime", "--bin", "llama5"]))?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| util::workspace_root().join("target"), PathBuf::from);
    let llama5 = target.join("release").join("llama5");
    let out_dir = opts.out.clone().unwrap_or_else(|| target.join("bench"));

    let adapters = util::output(Command::new(&llama5).arg("info"))?;
    let discrete = adapters.contains("DiscreteGpu");
    let cpu_backend = opts.backend.as_deref() == Some("cpu");
    let mut common: Vec<String> = Vec::new();
    if let Some(b) = &opts.backend {
        common.extend(["--backend".into(), b.clone()]);
    }
    if let Some(a) = &opts.adapter {
        common.extend(["--adapter".into(), a.clone()]);
    }
    for (flag, value) in &opts.counts {
        common.extend([flag.clone(), value.clone()]);
    }
    if !discrete || cpu_backend {
        for (flag, value) in SLOW_DEVICE_COUNTS {
            if !opts.counts.iter().any(|(f, _)| f == flag) {
                common.extend([flag.to_string(), value.to_string()]);
            }
        }
    }

    let mut jobs = Vec::new();
    if opts.real {
        for dir in demo::prepare()? {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            jobs.push(Job { label: name, args: vec![dir.display().to_string()] });
        }
    }
    let default_shapes = if discrete { vec!["smollm2-135m", "llama-1b"] } else { vec!["smollm2-135m"] };
    let shapes = opts.synthetic.clone().unwrap_or_else(|| default_shapes.into_iter().map(String::from).collect());
    for shape in &shapes {
        for precision in &opts.precisions {
            jobs.push(Job {
                label: format!("synthetic {shape} {precision}"),
                args: vec!["--synthetic".into(), shape.clone(), "--precision".into(), precision.clone()],
            });
        }
    }

    let mut results = Vec::new();
    let mut failures = Vec::new();
    for job in &jobs {
        let mut cmd = Command::new(&llama5);
        cmd.arg("bench").args(&job.args).args(&common).arg("--json");
        let line = util::display(&cmd);
        eprintln!("$ {line}");
        let out = cmd.stderr(std::process::Stdio::inherit()).output().with_context(|| format!("starting `{line}`"))?;
        if !out.status.success() {
            eprintln!("bench: {} failed ({})", job.label, out.status);
            failures.push(json!({ "label": job.label, "command": line, "status": out.status.to_string() }));
            continue;
        }
        let report: Value =
            serde_json::from_slice(&out.stdout).with_context(|| format!("parsing the JSON of `{line}`"))?;
        results.push(json!({ "label": job.label, "command": line, "report": report }));
    }

    let summary = json!({ "adapters": adapters, "results": results, "failures": failures });
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    write(&out_dir.join("bench.json"), &(serde_json::to_string_pretty(&summary)? + "\n"))?;
    let md = markdown(&summary);
    write(&out_dir.join("bench.md"), &md)?;
    print!("{md}");
    if !failures.is_empty() {
        bail!("{} of {} benchmarks failed (see above)", failures.len(), jobs.len());
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

fn f(v: &Value, digits: usize) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn mib(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{:.1}", x / (1u64 << 20) as f64))
}

/// The results as a markdown table, then the failures and the conventions.
fn markdown(summary: &Value) -> String {
    let mut s = String::from("# llama5 bench\n\n");
    let empty = Vec::new();
    let results = summary["results"].as_array().unwrap_or(&empty);
    if let Some(first) = results.first() {
        let b = &first["report"]["backend"];
        let settings = &first["report"]["settings"];
        s += &format!(
            "Device: {} ({}), {}. Settings: {} runs, {} prompt tokens, {} decoded, prefill {}.\n\n",
            b["device"].as_str().unwrap_or("?"),
            b["kind"].as_str().unwrap_or("?"),
            b["details"].as_str().unwrap_or(""),
            settings["runs"],
            settings["prompt_tokens"],
            settings["gen_tokens"],
            settings["prefill_tokens"]
        );
    }
    s += "| model | precision | decode ms/token (p10–p90) | tok/s | prefill tok/s | prefill TFLOP/s | TTFT ms \
          | MiB/token | effective GB/s | copy GB/s | % of copy | ceiling % | memory MiB (weights + KV) |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in results {
        let rep = &r["report"];
        let (d, p, t, m) = (&rep["decode"], &rep["prefill"], &rep["traffic"], &rep["memory"]);
        s += &format!(
            "| {} | {} | {} ({}–{}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({} + {}) |\n",
            r["label"].as_str().unwrap_or("?"),
            rep["model"]["precision"].as_str().unwrap_or("?"),
            f(&d["median_ms"], 2),
            f(&d["p10_ms"], 2),
            f(&d["p90_ms"], 2),
            f(&d["tokens_per_s"], 1),
            f(&p["tokens_per_s"], 1),
            f(&p["matmul_tflops"], 3),
            f(&rep["time_to_first_token"]["ttft_ms"], 0),
            mib(&t["bytes_per_token"]),
            f(&t["effective_gb_per_s"], 2),
            f(&rep["copy"]["gb_per_s"], 1),
            f(&t["copy_share_percent"], 1),
            f(&t["ceiling_share_percent"], 1),
            mib(&m["total_bytes"]),
            mib(&m["weights_bytes"]),
            mib(&m["kv_cache_bytes"]),
        );
    }
    if let Some(failures) = summary["failures"].as_array().filter(|f| !f.is_empty()) {
        s += "\nFailed:\n\n";
        for fail in failures {
            s += &format!("- {}: `{}` ({})\n", fail["label"].as_str().unwrap_or("?"), fail["command"], fail["status"]);
        }
    }
    if let Some(conventions) = results.first().and_then(|r| r["report"]["conventions"].as_array()) {
        s += "\nConventions:\n\n";
        for c in conventions {
            s += &format!("- {}\n", c.as_str().unwrap_or(""));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_lists_counts_and_rejects_strangers() {
        let o = parse(&args(&["--synthetic", "llama-1b, llama-7b", "--runs", "5", "--no-real"])).unwrap();
        assert_eq!(o.synthetic, Some(vec!["llama-1b".to_string(), "llama-7b".to_string()]));
        assert_eq!(o.counts, vec![("--runs".to_string(), "5".to_string())]);
        assert!(!o.real);
        assert_eq!(o.precisions, vec!["int4", "f16"]);
        assert_eq!(parse(&args(&["--synthetic", "none"])).unwrap().synthetic, Some(Vec::new()));
        assert!(parse(&args(&["--runs", "many"])).unwrap_err().to_string().contains("--runs"));
        assert!(parse(&args(&["--runs"])).is_err());
        assert!(parse(&args(&["--bogus"])).unwrap_err().to_string().contains("--bogus"));
    }

    #[test]
    fn markdown_rows_carry_each_report() {
        let report = json!({
            "model": { "precision": "int4" },
            "backend": { "device": "Test GPU", "kind": "gpu", "details": "Vulkan" },
            "settings": { "runs": 3, "prompt_tokens": 32, "gen_tokens": 100, "prefill_tokens": 512 },
            "copy": { "gb_per_s": 2000.0 },
            "time_to_first_token": { "ttft_ms": 812.4 },
            "decode": { "median_ms": 1.234, "p10_ms": 1.2, "p90_ms": 1.5, "tokens_per_s": 810.4 },
            "prefill": { "tokens_per_s": 9000.0, "matmul_tflops": 2.5 },
            "traffic": { "bytes_per_token": 3145728, "effective_gb_per_s": 1500.0, "copy_share_percent": 75.0, "ceiling_share_percent": 81.5 },
            "memory": { "total_bytes": 104857600, "weights_bytes": 94371840, "kv_cache_bytes": 10485760 },
            "conventions": ["GB = 1e9 bytes"]
        });
        let summary = json!({
            "results": [{ "label": "smollm2-int4", "report": report }],
            "failures": [{ "label": "synthetic llama-7b f16", "command": "llama5 bench", "status": "exit status: 1" }],
        });
        let md = markdown(&summary);
        let row = md.lines().find(|l| l.starts_with("| smollm2-int4")).expect("a row per result");
        for cell in [
            "int4",
            "1.23 (1.20–1.50)",
            "810.4",
            "9000.0",
            "2.500",
            "812",
            "3.0",
            "1500.00",
            "| 75.0 | 81.5 |",
            "100.0 (90.0 + 10.0)",
        ] {
            assert!(row.contains(cell), "row lacks {cell}: {row}");
        }
        assert!(md
            .contains("Device: Test GPU (gpu), Vulkan. Settings: 3 runs, 32 prompt tokens, 100 decoded, prefill 512."));
        assert!(md.contains("- synthetic llama-7b f16"));
        assert!(md.contains("- GB = 1e9 bytes"));
    }
}

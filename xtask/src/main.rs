//! `cargo xtask <command>`: the project's automation, in Rust, with few
//! dependencies. Run `cargo xtask help` for the commands.

mod bench;
mod bench_convert;
mod ci;
mod codegen;
mod demo;
mod fetch;
mod util;
mod web;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  fetch-model [smollm2]     download and verify the pinned SmolLM2 GGUF into the cache
                            ($LLAMA5_CACHE, $XDG_CACHE_HOME/llama5 or ~/.cache/llama5); prints its path
  test                      what CI runs: Vulkan driver, fetch-model, codegen --check, fmt, clippy,
                            cargo test --workspace (with LLAMA5_MODEL_GGUF set), then a summary
  test-browser              only the browser steps of `test`: the wasm tests in Chromium and Firefox
                            (browsers, drivers and the wasm-bindgen CLI installed when missing)
  web [--model <dir>]       build the browser page into target/web (wasm-bindgen CLI installed when
      [--serve [--port N]]  missing); --model links a converted model as its model/; --serve serves it
  codegen [--check]         regenerate the fixture model's kernels in codegen/kernels/tiny
          [--model <dir>]   ... or those of a converted model (written to <dir>/kernels)
          [--out <dir>]     ... into another directory (default: codegen/kernels/tiny, <dir>/kernels)
  demo [--prompt <text>]    convert SmolLM2 (int4 and f16, cached) and generate with the llama5 CLI
  bench [<options>]         the benchmark set (real SmolLM2 at int4 and f16, synthetic shapes) through
                            `llama5 bench`, written to target/bench/bench.md and bench.json; bench --help
  bench convert             time converting a synthetic llama-1b F16 checkpoint to int4 and f16 against
                            `cp` of the same bytes, with peak memory (target/bench/convert/convert.md)";

fn main() -> ExitCode {
    // Errors are printed here, not by returning them from main, so no backtrace
    // follows them when RUST_BACKTRACE is set (CI logs end with the summary).
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        bail!("no command given");
    };
    match command.as_str() {
        "fetch-model" => {
            match rest {
                [] => {}
                [name] if fetch::MODELS.contains(&name.as_str()) => {}
                _ => bail!("fetch-model takes one of {:?}, got {rest:?}", fetch::MODELS),
            }
            println!("{}", fetch::fetch_model()?.display());
            Ok(ExitCode::SUCCESS)
        }
        "test" => {
            if !rest.is_empty() {
                bail!("test takes no arguments, got {rest:?}");
            }
            ci::run()
        }
        "test-browser" => {
            if !rest.is_empty() {
                bail!("test-browser takes no arguments, got {rest:?}");
            }
            ci::run_browser()
        }
        "web" => web::run(rest).map(|()| ExitCode::SUCCESS),
        "codegen" => run_codegen(rest).map(|()| ExitCode::SUCCESS),
        "demo" => match rest {
            [] => demo::demo(demo::DEMO_PROMPT),
            [flag, prompt] if flag == "--prompt" => demo::demo(prompt),
            _ => bail!("demo takes only --prompt <text>, got {rest:?}"),
        }
        .map(|()| ExitCode::SUCCESS),
        "bench" if rest.first().is_some_and(|a| a == "convert") => {
            if rest.len() > 1 {
                bail!("bench convert takes no arguments, got {:?}", &rest[1..]);
            }
            bench_convert::run().map(|()| ExitCode::SUCCESS)
        }
        "bench" if rest.iter().any(|a| a == "--help" || a == "-h") => {
            println!("{}", bench::USAGE);
            Ok(ExitCode::SUCCESS)
        }
        "bench" => bench::run(rest).map(|()| ExitCode::SUCCESS),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("{USAGE}");
            bail!("unknown command `{other}`")
        }
    }
}

fn run_codegen(args: &[String]) -> anyhow::Result<()> {
    let (mut check, mut model, mut out) = (false, None::<PathBuf>, None::<PathBuf>);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--model" => model = Some(it.next().context("--model needs a model directory")?.into()),
            "--out" => out = Some(it.next().context("--out needs a directory")?.into()),
            other => bail!("unexpected codegen argument `{other}` (expected --check, --model <dir>, --out <dir>)"),
        }
    }
    match (model, out) {
        (None, None) => codegen::generate(check),
        (Some(model), out) => {
            let out = out.unwrap_or_else(|| model.join("kernels"));
            codegen::generate_for_model(&model, &out, check)
        }
        (None, Some(out)) => codegen::generate_fixture(&out, check),
    }
}

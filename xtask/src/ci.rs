//! `cargo xtask test`: everything CI runs, each step timed, all steps run even
//! after a failure, and a summary at the end.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::web::{self, Browser};
use crate::{codegen, fetch, util};

/// What `cargo xtask test` installs when no Vulkan adapter is visible.
const VULKAN_PACKAGES: [&str; 3] = ["mesa-vulkan-drivers", "libvulkan1", "vulkan-tools"];

/// The browser target the runtime's library must keep compiling for.
const WASM_TARGET: &str = web::WASM_TARGET;

/// A step's note when it did not run: printed as SKIPPED, never counted as passed.
const SKIPPED: &str = "skipped: ";

struct Step {
    name: &'static str,
    secs: f64,
    result: anyhow::Result<String>,
}

fn step(steps: &mut Vec<Step>, name: &'static str, f: impl FnOnce() -> anyhow::Result<String>) {
    eprintln!("\n==> {name}");
    let start = Instant::now();
    let result = f();
    if let Err(e) = &result {
        eprintln!("{name} failed: {e:#}");
    }
    steps.push(Step { name, secs: start.elapsed().as_secs_f64(), result });
}

/// Runs every step; the summary's last line is `tests: N passed, N failed`.
pub fn run() -> anyhow::Result<ExitCode> {
    let mut steps = Vec::new();
    step(&mut steps, "vulkan", ensure_vulkan);
    let mut model: Option<PathBuf> = None;
    step(&mut steps, "fetch-model", || {
        let path = fetch::fetch_model()?;
        model = Some(path.clone());
        Ok(path.display().to_string())
    });
    step(&mut steps, "codegen --check", || codegen::generate(true).map(|()| String::new()));
    step(&mut steps, "fmt", || cargo_step(util::cargo().args(["fmt", "--all", "--", "--check"])));
    step(&mut steps, "clippy", || {
        cargo_step(util::cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
    });
    step(&mut steps, "wasm32 build", build_wasm);
    let mut totals = TestTotals::default();
    step(&mut steps, "cargo test", || {
        let mut cmd = util::cargo();
        // Every test binary runs even after one fails, so CI shows all failures.
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
        set_runtime_dir(&mut cmd)?;
        if let Some(path) = &model {
            cmd.env("LLAMA5_MODEL_GGUF", path);
        }
        run_tests(&mut cmd, &mut totals, "")
    });
    step(&mut steps, "gpu kernels, 16-wide subgroups", || {
        let mut cmd = util::cargo();
        // --workspace, as the step before: the same features, so nothing is rebuilt
        cmd.args(["test", "--workspace", "--test", "gpu", "--"]).args(WIDE_SUBGROUP_TESTS);
        set_runtime_dir(&mut cmd)?;
        // llvmpipe's subgroups are as wide as its vectors: 16 at 512 bits
        cmd.env("LP_NATIVE_VECTOR_WIDTH", "512")
            .env("LLAMA5_TEST_ADAPTER", "llvmpipe")
            .env("LLAMA5_TEST_SUBGROUP_SIZE", "16");
        run_tests(&mut cmd, &mut totals, "sg16")
    });
    browser_steps(&mut steps, &mut totals, model.as_deref());
    Ok(summary(&steps, &totals))
}

/// The kernel families whose k-slice sums take the shuffle path once two
/// k-slices of a tile share a subgroup, which llvmpipe's default 8-wide
/// subgroups never do (the tiles are 8 outputs or wider); INT4's wide
/// projections on int8 input groups in tiles of 8 quads need that too, and
/// the logits kernel's argmax shares, picked across fewer subgroups.
const WIDE_SUBGROUP_TESTS: [&str; 8] = [
    "matvec_add_matches_cpu",
    "residual_projections_hold_unnormalised_inputs",
    "rms_gate_up_matches_cpu",
    "rms_qkv_rope",
    "logits_part_matches_cpu",
    "attn_output_combines_splits_then_matches_cpu",
    "packed_products_hold_large_and_zero_inputs",
    "argmax_over_logits_shares_picks_the_first_largest_logit",
];

/// Mesa's Vulkan loader complains on every device open without `XDG_RUNTIME_DIR`.
fn set_runtime_dir(cmd: &mut Command) -> anyhow::Result<()> {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("llama5-xdg-runtime");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting the permissions of {}", dir.display()))?;
        }
        cmd.env("XDG_RUNTIME_DIR", dir);
    }
    Ok(())
}

/// `cargo xtask test-browser`: only the browser steps.
pub fn run_browser() -> anyhow::Result<ExitCode> {
    let mut steps = Vec::new();
    let mut totals = TestTotals::default();
    let mut model: Option<PathBuf> = None;
    step(&mut steps, "fetch-model", || {
        let path = fetch::fetch_model()?;
        model = Some(path.clone());
        Ok(path.display().to_string())
    });
    browser_steps(&mut steps, &mut totals, model.as_deref());
    Ok(summary(&steps, &totals))
}

/// The wasm-bindgen tests in each browser, then the page end to end.
fn browser_steps(steps: &mut Vec<Step>, totals: &mut TestTotals, model: Option<&std::path::Path>) {
    let mut setup: Option<(PathBuf, PathBuf)> = None;
    step(steps, "browser setup", || {
        let bindgen = web::ensure_wasm_bindgen()?;
        let runner = bindgen.with_file_name("wasm-bindgen-test-runner");
        let fixture = web::prepare_fixture()?;
        setup = Some((runner, fixture));
        Ok(format!("wasm-bindgen {}", web::locked_wasm_bindgen()?))
    });
    for (name, browser) in [("browser chromium", Browser::Chromium), ("browser firefox", Browser::Firefox)] {
        step(steps, name, || {
            let Some((runner, fixture)) = &setup else {
                return Ok(format!("{SKIPPED}browser setup failed"));
            };
            let driver = match web::ensure_browser(browser) {
                Ok(d) => d,
                Err(e) => return Ok(format!("{SKIPPED}{e:#}")),
            };
            let mut cmd = web::browser_test_command(browser, &driver, runner, fixture);
            run_tests(&mut cmd, totals, browser.name())
        });
    }
    for (name, browser) in [("page e2e chromium", Browser::Chromium), ("page e2e firefox", Browser::Firefox)] {
        step(steps, name, || {
            let Some(gguf) = model else {
                return Ok(format!("{SKIPPED}no model (fetch-model failed)"));
            };
            let driver = match web::ensure_browser(browser) {
                Ok(d) => d,
                Err(e) => return Ok(format!("{SKIPPED}{e:#}")),
            };
            let report = web::e2e(gguf, browser, &driver);
            // one test, counted like the others
            let b = browser.name();
            match &report {
                Ok(r) => {
                    totals.passed += 1;
                    println!("[{b}] test page_end_to_end ... ok ({r})");
                }
                Err(e) => {
                    totals.failed += 1;
                    println!("[{b}] test page_end_to_end ... FAILED ({e:#})");
                }
            }
            report
        });
    }
}

fn summary(steps: &[Step], totals: &TestTotals) -> ExitCode {
    println!("\nxtask test summary");
    for s in steps {
        let (status, note) = match &s.result {
            Ok(note) if note.starts_with(SKIPPED) => ("SKIPPED", note[SKIPPED.len()..].to_string()),
            Ok(note) => ("ok", note.clone()),
            Err(e) => ("FAILED", format!("{e:#}").lines().next().unwrap_or_default().to_string()),
        };
        println!("  {status:<7} {:<16} {:>7.1}s  {note}", s.name, s.secs);
    }
    let failed: Vec<&str> = steps.iter().filter(|s| s.result.is_err()).map(|s| s.name).collect();
    if !failed.is_empty() {
        println!("{} of {} steps failed: {}", failed.len(), steps.len(), failed.join(", "));
    }
    let skipped: Vec<&str> =
        steps.iter().filter(|s| s.result.as_ref().is_ok_and(|n| n.starts_with(SKIPPED))).map(|s| s.name).collect();
    if !skipped.is_empty() {
        println!("{} steps skipped (not counted as passed): {}", skipped.len(), skipped.join(", "));
    }
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cargo_step(cmd: &mut Command) -> anyhow::Result<String> {
    util::run(cmd).map(|()| String::new())
}

/// Passed and failed counts summed over every `test result:` line.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestTotals {
    passed: u64,
    failed: u64,
}

impl TestTotals {
    /// Adds a libtest summary line (`test result: ok. 16 passed; 0 failed; ...`); other lines are ignored.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else { return };
        for part in rest.split(';').flat_map(|p| p.split('.')) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(what), None) = (words.next(), words.next(), words.next()) {
                match (n.parse::<u64>(), what) {
                    (Ok(n), "passed") => self.passed += n,
                    (Ok(n), "failed") => self.failed += n,
                    _ => {}
                }
            }
        }
    }
}

/// Runs `cargo test`, echoing its stdout line by line (each prefixed with
/// `[prefix]` when one is given) while counting results; the note names the
/// adapters the tests reported (`adapter: ...` lines).
fn run_tests(cmd: &mut Command, totals: &mut TestTotals, prefix: &str) -> anyhow::Result<String> {
    let before = TestTotals { passed: totals.passed, failed: totals.failed };
    let mut adapters: Vec<String> = Vec::new();
    let line = util::display(cmd);
    eprintln!("$ {line}");
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("starting `{line}`"))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut out = std::io::stdout().lock();
    for l in BufReader::new(stdout).lines() {
        let l = l.with_context(|| format!("reading the output of `{line}`"))?;
        totals.add_line(&l);
        if let Some(a) = l.trim().strip_prefix("adapter: ") {
            if !adapters.iter().any(|x| x == a) {
                adapters.push(a.to_string());
            }
        }
        if prefix.is_empty() {
            writeln!(out, "{l}").context("writing to stdout")?;
        } else {
            writeln!(out, "[{prefix}] {l}").context("writing to stdout")?;
        }
    }
    drop(out);
    let status = child.wait().with_context(|| format!("waiting for `{line}`"))?;
    let (passed, failed) = (totals.passed - before.passed, totals.failed - before.failed);
    if !status.success() {
        bail!("`{line}` failed ({status}): {passed} passed, {failed} failed");
    }
    if passed == 0 {
        bail!("`{line}` ran no tests");
    }
    let on = if adapters.is_empty() { String::new() } else { format!(" on {}", adapters.join("; ")) };
    Ok(format!("{passed} passed{on}"))
}

/// Builds the runtime's library for the browser and lints the browser crate, adding the target through
/// rustup when it is missing (the getrandom backend cfg comes from `.cargo/config.toml`).
fn build_wasm() -> anyhow::Result<String> {
    let mut list = Command::new("rustup");
    list.args(["target", "list", "--installed"]).current_dir(util::workspace_root());
    let installed = util::output(&mut list).context("listing the installed targets (rustup is required)")?;
    if !installed.lines().any(|t| t.trim() == WASM_TARGET) {
        util::run(Command::new("rustup").args(["target", "add", WASM_TARGET]).current_dir(util::workspace_root()))
            .with_context(|| format!("installing the {WASM_TARGET} target"))?;
    }
    cargo_step(util::cargo().args(["build", "-p", "llama5-runtime", "--lib", "--target", WASM_TARGET]))?;
    // the browser crate is empty natively, so the workspace clippy step never lints it
    cargo_step(util::cargo().args([
        "clippy",
        "-p",
        "llama5-web",
        "--lib",
        "--target",
        WASM_TARGET,
        "--",
        "-D",
        "warnings",
    ]))?;
    Ok(WASM_TARGET.to_string())
}

/// The first Vulkan device `vulkaninfo --summary` reports, if any.
fn vulkan_device() -> Option<String> {
    let out = Command::new("vulkaninfo").arg("--summary").stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let name = text.lines().find_map(|l| l.trim().strip_prefix("deviceName")?.trim().strip_prefix('='));
    name.map(|n| n.trim().to_string())
}

fn is_root() -> bool {
    util::output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// A Vulkan adapter for the GPU tests: Mesa's llvmpipe is installed when none is found.
fn ensure_vulkan() -> anyhow::Result<String> {
    if let Some(device) = vulkan_device() {
        return Ok(device);
    }
    let install = format!("apt-get install -y {}", VULKAN_PACKAGES.join(" "));
    if !is_root() {
        bail!("no Vulkan adapter found; install Mesa's software driver as root: `apt-get update && {install}`");
    }
    eprintln!("vulkan: no adapter found, installing {}", VULKAN_PACKAGES.join(" "));
    util::run(Command::new("apt-get").arg("update")).context("apt-get update")?;
    util::run(
        Command::new("apt-get").args(["install", "-y"]).args(VULKAN_PACKAGES).env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("`{install}`"))?;
    vulkan_device().with_context(|| format!("still no Vulkan adapter after `{install}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_libtest_summaries() {
        let mut t = TestTotals::default();
        t.add_line("test result: ok. 16 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.08s");
        t.add_line("test result: FAILED. 15 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1s");
        t.add_line("test tiny::tests::passed ... ok");
        t.add_line("running 3 tests");
        assert_eq!(t, TestTotals { passed: 31, failed: 2 });
    }
}

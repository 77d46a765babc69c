//! `cargo xtask demo`: the real model converted into precision tiers under the
//! cache, then a chat answer through the `llama5` CLI, which picks the highest
//! tier that fits the adapter (`cargo xtask bench` reuses the conversions).

use std::path::PathBuf;

use crate::{fetch, util};

pub const DEMO_PROMPT: &str = "What is the capital of France?";

/// The tiers the demo converts, as `<cache>/smollm2/<precision>`.
const TIERS: [&str; 2] = ["int4", "f16"];

pub fn demo(prompt: &str) -> anyhow::Result<()> {
    let dirs = prepare()?;
    let tiers = dirs[0].parent().expect("a tier directory has a parent");
    util::run(
        util::cargo()
            .args(["run", "--release", "-p", "llama5-runtime", "--bin", "llama5", "--", "generate"])
            .arg(tiers)
            .args(["--chat", "--temperature", "0", "--max-tokens", "64", "--prompt", prompt]),
    )
}

/// Fetches the model and converts it at each precision of [`TIERS`]. A
/// conversion takes seconds, so it is redone every time rather than trusting a
/// cached directory written by another converter build.
pub fn prepare() -> anyhow::Result<Vec<PathBuf>> {
    let gguf = fetch::fetch_model()?;
    let root = fetch::cache_dir()?.join("smollm2");
    let mut dirs = Vec::new();
    for precision in TIERS {
        let out = root.join(precision);
        util::run(
            util::cargo()
                .args(["run", "--release", "-p", "llama5-convert", "--"])
                .arg(&gguf)
                .arg("-o")
                .arg(&out)
                .args(["--precision", precision, "--force"]),
        )?;
        dirs.push(out);
    }
    Ok(dirs)
}

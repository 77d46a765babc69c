//! Precision tiers: a model path is either a converted model directory
//! (`manifest.json` inside) or a directory whose immediate subdirectories each
//! hold one (`f16/`, `int8/`, `int4/`). `auto` tries them from the highest
//! fidelity down; an explicit precision picks exactly that tier.

use std::path::{Path, PathBuf};

use llama5_codegen::manifest::{Manifest, Precision, PrecisionTier};

use crate::error::RuntimeError;

/// One converted model directory.
#[derive(Clone, Debug, PartialEq)]
pub struct Tier {
    pub dir: PathBuf,
    pub precision: PrecisionTier,
    /// The coarsest precision among its layers: what a mixed tier is ranked by.
    pub lowest: Precision,
}

impl Tier {
    /// Uniform tiers rank by [`Precision::fidelity`]; a mixed tier ranks just
    /// below the uniform tier of its coarsest layers.
    fn rank(&self) -> (u8, bool) {
        (self.lowest.fidelity(), self.precision != PrecisionTier::Mixed)
    }

    pub fn name(&self) -> String {
        match self.precision {
            PrecisionTier::Mixed => format!("mixed ({})", self.dir.file_name().unwrap_or_default().to_string_lossy()),
            _ => self.lowest.to_string(),
        }
    }

    fn read(dir: &Path) -> Result<Self, RuntimeError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::Io { path: path.clone(), source: e })?;
        let manifest =
            Manifest::from_json(&text).map_err(|e| RuntimeError::Model(format!("{}: {e}", path.display())))?;
        let lowest = manifest.layers.iter().map(|l| l.precision).min_by_key(|p| p.fidelity());
        let lowest =
            lowest.ok_or_else(|| RuntimeError::Model(format!("{}: the model has no layers", path.display())))?;
        Ok(Tier { dir: dir.to_path_buf(), precision: manifest.precision, lowest })
    }
}

/// The tiers under `path`, highest fidelity first (ties by directory name).
pub fn discover(path: &Path) -> Result<Vec<Tier>, RuntimeError> {
    let dir = if path.file_name().is_some_and(|n| n == "manifest.json") { path.parent().unwrap_or(path) } else { path };
    if dir.join("manifest.json").is_file() {
        return Ok(vec![Tier::read(dir)?]);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| RuntimeError::Io { path: dir.to_path_buf(), source: e })?;
    let mut tiers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| RuntimeError::Io { path: dir.to_path_buf(), source: e })?;
        let sub = entry.path();
        if sub.join("manifest.json").is_file() {
            tiers.push(Tier::read(&sub)?);
        }
    }
    if tiers.is_empty() {
        return Err(RuntimeError::Model(format!(
            "{}: no manifest.json there or in its immediate subdirectories",
            dir.join("manifest.json").display()
        )));
    }
    tiers.sort_by(|a, b| b.rank().cmp(&a.rank()).then_with(|| a.dir.cmp(&b.dir)));
    Ok(tiers)
}

/// The candidates to try, in order: all of them for `auto` (`None`), else the
/// tier of exactly that precision.
pub fn select(tiers: &[Tier], precision: Option<Precision>) -> Result<Vec<Tier>, RuntimeError> {
    let Some(p) = precision else { return Ok(tiers.to_vec()) };
    let chosen: Vec<Tier> = tiers.iter().filter(|t| t.precision == PrecisionTier::from(p)).cloned().collect();
    if chosen.is_empty() {
        let available: Vec<String> = tiers.iter().map(Tier::name).collect();
        let at = tiers.first().and_then(|t| t.dir.parent()).map(|d| d.display().to_string()).unwrap_or_default();
        return Err(RuntimeError::Model(format!("no {p} tier in {at} (available: {})", available.join(", "))));
    }
    Ok(chosen)
}

/// Whether a GPU backend failed because this tier is too big for the device
/// (then a smaller tier may still fit), rather than for want of a usable GPU.
pub fn does_not_fit(e: &RuntimeError) -> bool {
    match e {
        RuntimeError::OutOfMemory(_) | RuntimeError::TooLarge { .. } => true,
        // wgpu's own refusals of a buffer or binding size
        RuntimeError::Gpu(message) => {
            let m = message.to_ascii_lowercase();
            m.contains("limit") || m.contains("too large") || m.contains("exceeds")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(precision: PrecisionTier, lowest: Precision, dir: &str) -> Tier {
        Tier { dir: PathBuf::from(dir), precision, lowest }
    }

    #[test]
    fn auto_orders_by_fidelity_and_explicit_picks_one() {
        let mut tiers = vec![
            tier(PrecisionTier::Int4, Precision::Int4, "m/int4"),
            tier(PrecisionTier::Mixed, Precision::Int8, "m/mixed"),
            tier(PrecisionTier::F16, Precision::F16, "m/f16"),
            tier(PrecisionTier::Int8, Precision::Int8, "m/int8"),
        ];
        tiers.sort_by(|a, b| b.rank().cmp(&a.rank()).then_with(|| a.dir.cmp(&b.dir)));
        let order: Vec<String> = tiers.iter().map(|t| t.dir.display().to_string()).collect();
        assert_eq!(order, ["m/f16", "m/int8", "m/mixed", "m/int4"]);
        assert_eq!(select(&tiers, None).unwrap().len(), 4);
        assert_eq!(select(&tiers, Some(Precision::Int8)).unwrap()[0].dir, PathBuf::from("m/int8"));
        let err = select(&tiers, Some(Precision::Bf16)).unwrap_err().to_string();
        assert!(err.contains("no bf16 tier in m") && err.contains("f16, int8, mixed (mixed), int4"), "{err}");
    }

    #[test]
    fn fit_errors() {
        assert!(does_not_fit(&RuntimeError::OutOfMemory("x".into())));
        assert!(does_not_fit(&RuntimeError::Gpu("buffer exceeds max_storage_buffer_binding_size limit".into())));
        let too_large = RuntimeError::TooLarge { what: "x".into(), bytes: 9, limit: 8, adapter: "a".into() };
        assert!(does_not_fit(&too_large));
        assert!(!does_not_fit(&RuntimeError::Gpu("shader compilation failed".into())));
        assert!(!does_not_fit(&RuntimeError::NoAdapter("none".into())));
    }

    #[test]
    fn missing_directory_names_the_manifest() {
        let err = discover(Path::new("/nonexistent/model")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/model"), "{err}");
    }
}

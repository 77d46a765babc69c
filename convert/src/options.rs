//! Conversion options: precision (uniform or per layer), quantization knobs,
//! shard size.

use std::collections::BTreeMap;

use llama5_codegen::manifest::{Precision, DEFAULT_GROUP_SIZE, DEFAULT_SHARD_BYTES};

/// Which precision each layer gets.
///
/// Written as one precision (`int4`) or comma-separated rules
/// `layers.0-3=f16,layers.7=int8,embed=int8,*=int4`: ranges are inclusive,
/// `*` is required and covers the other layers; `embed` sets the token
/// embedding and LM head.
///
/// Without an `embed` rule the embedding follows `*`, except that INT4 models
/// keep it at INT8: with tied embeddings the same matrix is the LM head, and
/// 4-bit logits cost far more accuracy than they save bytes (llama.cpp's Q4
/// presets keep it at 8 bits or more for the same reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrecisionSpec {
    text: String,
    rules: Vec<(usize, usize, Precision)>,
    default: Precision,
    embed: Option<Precision>,
}

impl PrecisionSpec {
    pub fn uniform(p: Precision) -> Self {
        PrecisionSpec { text: p.as_str().into(), rules: Vec::new(), default: p, embed: None }
    }

    /// The spec as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_uniform(&self) -> bool {
        self.rules.is_empty()
    }

    /// The `*` precision: layers no rule names.
    pub fn default_precision(&self) -> Precision {
        self.default
    }

    /// The precision of the token embedding and the LM head.
    pub fn embedding_precision(&self) -> Precision {
        match (self.embed, self.default) {
            (Some(p), _) => p,
            (None, Precision::Int4) => Precision::Int8,
            (None, p) => p,
        }
    }

    /// The precision of layer `i`, and whether a `layers.` rule chose it.
    pub fn for_layer(&self, i: usize) -> (Precision, bool) {
        self.rules.iter().find(|(a, b, _)| (*a..=*b).contains(&i)).map_or((self.default, false), |r| (r.2, true))
    }

    /// The largest layer index a rule names.
    pub fn max_layer(&self) -> Option<usize> {
        self.rules.iter().map(|r| r.1).max()
    }
}

impl Default for PrecisionSpec {
    fn default() -> Self {
        PrecisionSpec::uniform(Precision::F16)
    }
}

impl std::fmt::Display for PrecisionSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for PrecisionSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim().to_string();
        if !text.contains('=') {
            return Ok(PrecisionSpec { text: text.to_ascii_lowercase(), ..PrecisionSpec::uniform(text.parse()?) });
        }
        let mut rules: Vec<(usize, usize, Precision)> = Vec::new();
        let mut default = None;
        let mut embed = None;
        for rule in text.split(',').map(str::trim) {
            let (sel, prec) =
                rule.split_once('=').ok_or_else(|| format!("rule `{rule}` is not `selector=precision`"))?;
            let prec: Precision = prec.trim().parse()?;
            let sel = sel.trim();
            if sel == "*" {
                if default.replace(prec).is_some() {
                    return Err("`*` appears twice".into());
                }
                continue;
            }
            if sel == "embed" {
                if embed.replace(prec).is_some() {
                    return Err("`embed` appears twice".into());
                }
                continue;
            }
            let range = sel
                .strip_prefix("layers.")
                .ok_or_else(|| format!("selector `{sel}` is not `*`, `embed`, `layers.N` or `layers.A-B`"))?;
            let num = |t: &str| t.trim().parse::<usize>().map_err(|_| format!("`{t}` in `{sel}` is not a layer index"));
            let (a, b) = match range.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(range)?, num(range)?),
            };
            if a > b {
                return Err(format!("range `{sel}` is empty"));
            }
            if let Some(r) = rules.iter().find(|r| a <= r.1 && r.0 <= b) {
                return Err(format!("`{sel}` overlaps layers {}-{}", r.0, r.1));
            }
            rules.push((a, b, prec));
        }
        let default = default.ok_or("a per-layer spec needs a `*=precision` rule for the other tensors")?;
        Ok(PrecisionSpec { text, rules, default, embed })
    }
}

/// Everything that shapes the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertOptions {
    pub precision: PrecisionSpec,
    /// INT4 group size along the input dimension.
    pub group_size: u32,
    /// INT4: symmetric (`min = -8 * scale`) instead of asymmetric.
    pub symmetric: bool,
    /// INT8: one scale per tensor instead of per output channel.
    pub int8_per_tensor: bool,
    /// Largest shard in bytes.
    pub shard_size: u64,
    /// Replace an existing model directory.
    pub force: bool,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Set for a plan routed from a calibration file: why each layer got its precision.
    pub routing: Option<RoutingNotes>,
}

/// What a routed plan adds to the manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingNotes {
    /// [`llama5_codegen::manifest::LayerEntry::reason`] of each layer.
    pub layer_reasons: Vec<String>,
    /// Added to the recorded options (calibration file hash, objective, predicted loss).
    pub recorded: BTreeMap<String, String>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            precision: PrecisionSpec::default(),
            group_size: DEFAULT_GROUP_SIZE,
            symmetric: false,
            int8_per_tensor: false,
            shard_size: DEFAULT_SHARD_BYTES,
            force: false,
            progress: false,
            routing: None,
        }
    }
}

impl ConvertOptions {
    pub fn with_precision(p: Precision) -> Self {
        ConvertOptions { precision: PrecisionSpec::uniform(p), ..Default::default() }
    }

    /// The options recorded in the manifest (those that change the output).
    pub fn recorded(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::from([
            ("precision".to_string(), self.precision.as_str().to_string()),
            ("group_size".to_string(), self.group_size.to_string()),
            ("symmetric".to_string(), self.symmetric.to_string()),
            ("int8_per_tensor".to_string(), self.int8_per_tensor.to_string()),
            ("shard_size".to_string(), self.shard_size.to_string()),
        ]);
        if let Some(r) = &self.routing {
            map.extend(r.recorded.clone());
        }
        map
    }
}

/// Parses a byte size: `268435456`, `256MiB`, `64MB`, `1GiB`, `512k` (`k`/`m`/`g` alone are binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 268435456, 256MiB, 64MB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` in `{s}` (B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size `{s}` overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("64MB"), Ok(64_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2 GiB "), Ok(2 << 30));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn per_layer_specs() {
        let s: PrecisionSpec = "layers.0-3=f16, layers.7=int8, *=int4".parse().unwrap();
        assert_eq!(s.for_layer(0), (Precision::F16, true));
        assert_eq!(s.for_layer(3), (Precision::F16, true));
        assert_eq!(s.for_layer(4), (Precision::Int4, false));
        assert_eq!(s.for_layer(7), (Precision::Int8, true));
        assert_eq!(s.default_precision(), Precision::Int4);
        assert_eq!(s.max_layer(), Some(7));
        assert!(!s.is_uniform());
        let u: PrecisionSpec = "BF16".parse().unwrap();
        assert!(u.is_uniform());
        assert_eq!(u.for_layer(99), (Precision::Bf16, false));
        assert_eq!(u.as_str(), "bf16");
        for bad in [
            "layers.0-3=f16",
            "layers.3-1=f16,*=int4",
            "layers.0-3=f16,layers.2=int8,*=f16",
            "x=f16,*=f16",
            "*=f3",
            "*=f16,*=int4",
        ] {
            assert!(bad.parse::<PrecisionSpec>().is_err(), "{bad}");
        }
    }
}

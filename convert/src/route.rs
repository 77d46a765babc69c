//! Precision routing: one precision per unit from a calibration file, for a
//! byte budget or a loss limit.
//!
//! The loss of a plan is taken as the sum of its units' measured KL
//! divergences (each measured with only that unit quantized): additive, which
//! holds while the errors are small and independent, and which the README's
//! measurements check against real perplexity.
//!
//! The choice is greedy by marginal value: every unit starts at its smallest
//! precision, then the upgrade with the most KL removed per byte added is
//! taken, repeatedly. For `--max-loss` it stops as soon as the predicted loss
//! is within the limit; for `--budget` it goes on while upgrades fit. With a
//! few units and three or four precisions this is the classic greedy for the
//! multiple-choice knapsack: optimal at the points where it stops on the
//! convex hull of each unit's (bytes, loss) options, close elsewhere, and it
//! needs no byte discretisation. Ties go to the lower unit (embed first).

use std::collections::BTreeMap;
use std::path::Path;

use llama5_codegen::manifest::{ModelConfig, Precision};
use llama5_runtime::calibrate::Unit;

use llama5_codegen::manifest::Manifest;

use crate::calibrate::{fingerprint, fixed_bytes, unit_bytes, Calibration};
use crate::error::ConvertError;
use crate::options::{ConvertOptions, PrecisionSpec, RoutingNotes};
use crate::source::Source;

/// What the plan optimises.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    /// The most accurate plan of at most this many bytes.
    Budget(u64),
    /// The smallest plan whose predicted loss stays within this limit.
    MaxLoss(LossLimit),
}

/// A loss limit: nats per token of mean KL, or a perplexity increase in percent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossLimit {
    Nats(f64),
    PplPercent(f64),
}

impl LossLimit {
    /// In nats: a perplexity `(1 + x/100)` times higher is `ln(1 + x/100)`
    /// nats more per token, and the mean KL estimates that increase.
    pub fn nats(self) -> f64 {
        match self {
            LossLimit::Nats(n) => n,
            LossLimit::PplPercent(p) => (1.0 + p / 100.0).ln(),
        }
    }
}

impl std::fmt::Display for LossLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossLimit::Nats(n) => write!(f, "{n} nats"),
            LossLimit::PplPercent(p) => write!(f, "{p}%ppl"),
        }
    }
}

impl std::str::FromStr for LossLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (num, pct) = match t.strip_suffix("%ppl").or_else(|| t.strip_suffix('%')) {
            Some(n) => (n, true),
            None => (t.strip_suffix("nats").unwrap_or(t), false),
        };
        let v: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a loss (nats such as 0.02, or a perplexity increase such as 2%)"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(format!("loss `{s}` must be a finite number >= 0"));
        }
        Ok(if pct { LossLimit::PplPercent(v) } else { LossLimit::Nats(v) })
    }
}

/// One unit's choice.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub unit: Unit,
    pub precision: Precision,
    pub bytes: u64,
    /// The measured KL at the chosen precision (0 at the reference).
    pub kl: f64,
    /// Why: the unit's measured sensitivities.
    pub reason: String,
}

/// A routed plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub choices: Vec<Choice>,
    /// Sum of the chosen units' KL, nats per token.
    pub predicted_kl: f64,
    /// An upper bound of the model's shard bytes.
    pub planned_bytes: u64,
    pub objective: Objective,
}

impl Route {
    /// The plan as a precision spec (`layers.3=int8,embed=int8,*=int4`): the
    /// most common layer precision is `*`.
    pub fn spec(&self) -> PrecisionSpec {
        let layers: Vec<Precision> =
            self.choices.iter().filter(|c| matches!(c.unit, Unit::Layer(_))).map(|c| c.precision).collect();
        let mut counts: BTreeMap<Precision, usize> = BTreeMap::new();
        for &p in &layers {
            *counts.entry(p).or_default() += 1;
        }
        // most layers; ties to the lower precision, deterministic either way
        let default = counts.iter().max_by_key(|(p, n)| (**n, std::cmp::Reverse(p.fidelity()))).map(|(p, _)| *p);
        let embed = self.choices.iter().find(|c| c.unit == Unit::Embedding).map(|c| c.precision);
        let default = default.or(embed).unwrap_or(Precision::F16);
        let mut rules = Vec::new();
        for (l, &p) in layers.iter().enumerate() {
            if p != default {
                rules.push(format!("layers.{l}={p}"));
            }
        }
        if let Some(e) = embed {
            rules.push(format!("embed={e}"));
        }
        rules.push(format!("*={default}"));
        rules.join(",").parse().expect("a routed spec parses")
    }

    /// Notes for the manifest: per layer the reason, plus the plan's summary.
    pub fn layer_reasons(&self) -> Vec<String> {
        self.choices.iter().filter(|c| matches!(c.unit, Unit::Layer(_))).map(|c| c.reason.clone()).collect()
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Objective::Budget(b) => write!(f, "budget {b} bytes"),
            Objective::MaxLoss(l) => write!(f, "max loss {l}"),
        }
    }
}

/// Checks that `cal` was measured on this model with these options.
pub fn check_matches(
    cal: &Calibration,
    path: &Path,
    cfg: &ModelConfig,
    source_sha256: &str,
    options: &ConvertOptions,
) -> Result<(), ConvertError> {
    let bad = |field: &str, reason: String| Err(ConvertError::invalid(path, field, reason));
    if cal.model.num_layers != cfg.num_layers {
        return bad(
            "model.num_layers",
            format!("measured on a model of {} layers; this one has {}", cal.model.num_layers, cfg.num_layers),
        );
    }
    // the name comes from a file or directory name; everything else must agree
    if (ModelConfig { name: None, ..cal.model.clone() }) != (ModelConfig { name: None, ..cfg.clone() }) {
        return bad("model", "measured on a model of another configuration than this one".into());
    }
    if cal.source.sha256 != source_sha256 {
        return bad(
            "source.sha256",
            format!("measured on `{}` ({}), not on this input ({source_sha256})", cal.source.file, cal.source.sha256),
        );
    }
    let o = &cal.options;
    for (field, theirs, ours) in [
        ("options.group_size", o.group_size.to_string(), options.group_size.to_string()),
        ("options.symmetric", o.symmetric.to_string(), options.symmetric.to_string()),
        ("options.int8_per_tensor", o.int8_per_tensor.to_string(), options.int8_per_tensor.to_string()),
    ] {
        if theirs != ours {
            return bad(field, format!("measured with {theirs}, but this conversion uses {ours}"));
        }
    }
    Ok(())
}

/// One precision a unit can take.
#[derive(Clone, Copy, Debug)]
struct Opt {
    precision: Precision,
    bytes: u64,
    kl: f64,
}

/// Assigns a precision to every unit of `cal` for `objective`, with sizes for `options`.
pub fn route(cal: &Calibration, options: &ConvertOptions, objective: Objective) -> Result<Route, ConvertError> {
    let cfg = &cal.model;
    let mut precisions = vec![cal.options.reference];
    precisions.extend(cal.options.precisions.iter().filter(|p| **p != cal.options.reference));
    // each unit's options, smallest first (ties: lower loss first)
    let mut units: Vec<(Unit, Vec<Opt>)> = Vec::new();
    for (unit, entry) in cal.unit_entries() {
        let mut opts = Vec::new();
        for &p in &precisions {
            let kl = if p == cal.options.reference { 0.0 } else { entry.effects[&p].kl };
            opts.push(Opt { precision: p, bytes: unit_bytes(cfg, unit, p, options)?, kl });
        }
        opts.sort_by(|a, b| a.bytes.cmp(&b.bytes).then(a.kl.total_cmp(&b.kl)));
        units.push((unit, opts));
    }
    let fixed = fixed_bytes(cfg);
    let mut at: Vec<usize> = vec![0; units.len()];
    let total = |at: &[usize]| fixed + units.iter().zip(at).map(|((_, o), &i)| o[i].bytes).sum::<u64>();
    let loss = |at: &[usize]| units.iter().zip(at).map(|((_, o), &i)| o[i].kl).sum::<f64>();
    if let Objective::Budget(budget) = objective {
        let smallest = total(&at);
        if budget < smallest {
            let mut lowest_set: Vec<String> = units.iter().map(|(_, o)| o[0].precision.to_string()).collect();
            lowest_set.sort();
            lowest_set.dedup();
            return Err(ConvertError::Options(format!(
                "a budget of {budget} bytes is below the smallest possible model: {smallest} bytes ({} everywhere)",
                lowest_set.join("/")
            )));
        }
    }
    loop {
        let (bytes_now, loss_now) = (total(&at), loss(&at));
        let limit = match objective {
            Objective::MaxLoss(l) => Some(l.nats()),
            Objective::Budget(_) => None,
        };
        if limit.is_some_and(|l| loss_now <= l) {
            break;
        }
        // the best upgrade: most loss removed per byte added
        let mut best: Option<(f64, usize, usize)> = None;
        for (u, (_, opts)) in units.iter().enumerate() {
            let cur = opts[at[u]];
            for (j, o) in opts.iter().enumerate() {
                if o.kl >= cur.kl {
                    continue;
                }
                let extra = o.bytes.saturating_sub(cur.bytes);
                if let Objective::Budget(budget) = objective {
                    if bytes_now + extra > budget {
                        continue;
                    }
                }
                let value = (cur.kl - o.kl) / extra.max(1) as f64;
                if best.is_none_or(|(v, _, _)| value > v) {
                    best = Some((value, u, j));
                }
            }
        }
        let Some((_, u, j)) = best else { break };
        at[u] = j;
    }
    let planned_bytes = total(&at);
    let predicted_kl = loss(&at);
    let choices = units
        .iter()
        .zip(&at)
        .map(|((unit, opts), &i)| {
            let o = opts[i];
            let measured: Vec<String> = opts
                .iter()
                .filter(|m| m.precision != cal.options.reference)
                .map(|m| format!("{} {:.3e}", m.precision, m.kl))
                .collect();
            let reason = format!("calibrated ({objective}): kl {} nats", measured.join(", "));
            Choice { unit: *unit, precision: o.precision, bytes: o.bytes, kl: o.kl, reason }
        })
        .collect();
    Ok(Route { choices, predicted_kl, planned_bytes, objective })
}

/// Converts `input` into `out_dir` with the plan routed from the calibration
/// file at `calibration` for `objective`; `options.precision` is replaced.
pub fn convert_routed(
    input: &Path,
    out_dir: &Path,
    options: &ConvertOptions,
    calibration: &Path,
    objective: Objective,
) -> Result<(Manifest, Route), ConvertError> {
    let cal = Calibration::read(calibration)?;
    let source = Source::open(input)?;
    let source_hash = fingerprint(source.path())?.sha256;
    check_matches(&cal, calibration, source.config(), &source_hash, options)?;
    let route = route(&cal, options, objective)?;
    let cal_hash = fingerprint(calibration)?.sha256;
    let embed = route.choices.iter().find(|c| c.unit == Unit::Embedding).map(|c| c.reason.clone());
    let mut recorded = BTreeMap::from([
        ("calibration".to_string(), format!("{} sha256 {cal_hash}", cal.text.file)),
        ("objective".to_string(), objective.to_string()),
        ("predicted_kl".to_string(), format!("{:.4e}", route.predicted_kl)),
    ]);
    if let Some(e) = embed {
        recorded.insert("embed_reason".into(), e);
    }
    let options = ConvertOptions {
        precision: route.spec(),
        routing: Some(RoutingNotes { layer_reasons: route.layer_reasons(), recorded }),
        ..options.clone()
    };
    let manifest = crate::writer::convert_source(&source, out_dir, &options)?;
    Ok((manifest, route))
}

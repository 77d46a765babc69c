//! The kernel plan of a model: which kernel runs, in which order, on which
//! tensors, for one forward step; plus the files written beside a manifest.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::CodegenError;
use crate::format::part_sizes;
use crate::manifest::{names, Manifest, ManifestError, ModelConfig, QuantFormat};
use crate::ops::{generate, generate_batch};
use crate::spec::{Activation, Kernel, KernelSpec};
use crate::target::Target;
use crate::validate::{validate, workgroup_bytes};

/// The formats of one layer's matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerFormats {
    pub q: QuantFormat,
    pub k: QuantFormat,
    pub v: QuantFormat,
    pub o: QuantFormat,
    pub gate: QuantFormat,
    pub up: QuantFormat,
    pub down: QuantFormat,
}

impl LayerFormats {
    /// Every matrix in `format`.
    pub fn uniform(format: QuantFormat) -> Self {
        LayerFormats { q: format, k: format, v: format, o: format, gate: format, up: format, down: format }
    }

    /// Layer `layer`'s formats, each looked up by tensor name; the error names
    /// the first tensor `format_of` does not know.
    pub fn lookup(layer: usize, format_of: impl Fn(&str) -> Option<QuantFormat>) -> Result<Self, CodegenError> {
        let f = |suffix: &str| {
            let name = names::layer(layer, suffix);
            format_of(&name).ok_or(CodegenError::Manifest(ManifestError::MissingTensor(name)))
        };
        Ok(LayerFormats {
            q: f("self_attn.q_proj.weight")?,
            k: f("self_attn.k_proj.weight")?,
            v: f("self_attn.v_proj.weight")?,
            o: f("self_attn.o_proj.weight")?,
            gate: f("mlp.gate_proj.weight")?,
            up: f("mlp.up_proj.weight")?,
            down: f("mlp.down_proj.weight")?,
        })
    }

    fn from_manifest(m: &Manifest, layer: usize) -> Result<Self, CodegenError> {
        Self::lookup(layer, |name| m.tensors.get(name).map(|t| t.format))
    }
}

/// What a plan needs to know of a tensor: its format and the vocabulary /
/// output rows of each part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorLayout {
    pub format: QuantFormat,
    pub parts: Vec<[usize; 2]>,
}

/// A tensor part bound to one binding of a plan step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TensorRef {
    pub binding: u32,
    pub tensor: String,
    pub part: usize,
}

/// Which part of the forward step a dispatch belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Embed,
    Layer,
    Logits,
    /// Greedy sampling; runs only when the caller wants the argmax.
    Argmax,
    /// Sampling with temperature, top-k and top-p; runs instead of the argmax
    /// when the caller samples on the device.
    Sample,
}

/// One dispatch of a forward step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanStep {
    /// Index into [`Plan::kernels`].
    pub kernel: usize,
    /// The kernel for steps of many tokens or logits rows ([`crate::ops::generate_batch`]),
    /// the same tensors at the same bindings; `None` where `kernel` serves every step.
    pub batch_kernel: Option<usize>,
    /// The step whose choice of kernel this one follows: it runs its batch
    /// kernel exactly when that step runs its own (the argmax after logits
    /// that left no shares).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_with: Option<usize>,
    pub stage: Stage,
    /// The layer whose KV cache the step binds.
    pub layer: Option<usize>,
    pub tensors: Vec<TensorRef>,
}

/// Every dispatch of one forward step, in order, over one pipeline per distinct kernel.
#[derive(Clone, Debug)]
pub struct Plan {
    pub target: Target,
    /// Distinct kernels, each validated with naga.
    pub kernels: Vec<Kernel>,
    /// The workgroup memory each kernel takes, in bytes (from its validated
    /// module), for the runtime to check against the adapter's limit.
    pub workgroup_bytes: Vec<u32>,
    pub steps: Vec<PlanStep>,
    /// Slots of the logits kernel's argmax shares ([`crate::spec::Resource::ArgmaxShares`]);
    /// 0 where it leaves none.
    pub argmax_shares: usize,
}

/// The five kernel specs of one layer at decode time, in order.
pub fn layer_specs(cfg: &ModelConfig, formats: &LayerFormats, target: &Target) -> [KernelSpec; 5] {
    let target = *target;
    [
        KernelSpec::RmsQkvRope {
            hidden: cfg.hidden_size,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            rope_theta: cfg.rope_theta,
            eps: cfg.rms_norm_eps,
            q: formats.q,
            k: formats.k,
            v: formats.v,
            target,
        },
        KernelSpec::Attention { heads: cfg.num_heads, kv_heads: cfg.num_kv_heads, head_dim: cfg.head_dim, target },
        KernelSpec::AttnOutput {
            heads: cfg.num_heads,
            head_dim: cfg.head_dim,
            hidden: cfg.hidden_size,
            format: formats.o,
            target,
        },
        KernelSpec::RmsGateUp {
            hidden: cfg.hidden_size,
            ffn: cfg.intermediate_size,
            eps: cfg.rms_norm_eps,
            gate: formats.gate,
            up: formats.up,
            target,
        },
        KernelSpec::MatvecAdd {
            input: Activation::Ffn,
            in_features: cfg.intermediate_size,
            out_features: cfg.hidden_size,
            format: formats.down,
            target,
        },
    ]
}

/// The tensors each binding of a layer kernel reads, by binding name.
const LAYER_BINDINGS: [&[(&str, &str)]; 5] = [
    &[
        ("norm", "input_layernorm.weight"),
        ("wq", "self_attn.q_proj.weight"),
        ("wk", "self_attn.k_proj.weight"),
        ("wv", "self_attn.v_proj.weight"),
    ],
    &[],
    &[("w", "self_attn.o_proj.weight")],
    &[("norm", "post_attention_layernorm.weight"), ("w_gate", "mlp.gate_proj.weight"), ("w_up", "mlp.up_proj.weight")],
    &[("w", "mlp.down_proj.weight")],
];

/// Names of the kernels that run a layer with these formats (for [`crate::manifest::LayerEntry::kernels`]).
pub fn layer_kernel_names(cfg: &ModelConfig, formats: &LayerFormats, target: &Target) -> Vec<String> {
    layer_specs(cfg, formats, target).iter().map(KernelSpec::name).collect()
}

/// Names of the kernels that run layer `layer` of `manifest` on `target`.
pub fn kernel_names_for_layer(manifest: &Manifest, layer: usize, target: &Target) -> Result<Vec<String>, CodegenError> {
    Ok(layer_kernel_names(&manifest.model, &LayerFormats::from_manifest(manifest, layer)?, target))
}

/// Kernels deduplicated by name.
struct KernelSet {
    kernels: Vec<Kernel>,
    by_name: BTreeMap<String, usize>,
    target: Target,
}

impl KernelSet {
    fn add(&mut self, spec: &KernelSpec) -> Result<usize, CodegenError> {
        let name = spec.name();
        if let Some(&i) = self.by_name.get(&name) {
            return Ok(i);
        }
        let kernel = generate(spec)?;
        Ok(self.insert(name, kernel))
    }

    /// The batch variant of `spec`, if it has one.
    fn add_batch(&mut self, spec: &KernelSpec) -> Result<Option<usize>, CodegenError> {
        let Some(kernel) = generate_batch(spec)? else {
            return Ok(None);
        };
        if let Some(&i) = self.by_name.get(&kernel.name) {
            return Ok(Some(i));
        }
        Ok(Some(self.insert(kernel.name.clone(), kernel)))
    }

    /// Adds a kernel; [`KernelSet::validated`] validates them all at the end.
    fn insert(&mut self, name: String, kernel: Kernel) -> usize {
        self.kernels.push(kernel);
        self.by_name.insert(name, self.kernels.len() - 1);
        self.kernels.len() - 1
    }

    /// The kernels, each validated with naga, and the workgroup memory each
    /// takes: on native targets in parallel (a plan's few dozen kernels are
    /// part of every model load); the error is the first failing kernel's, in
    /// plan order.
    fn validated(self) -> Result<(Vec<Kernel>, Vec<u32>), CodegenError> {
        let target = self.target;
        let check = |k: &Kernel| validate(k, &target).and_then(|module| workgroup_bytes(k, &module));
        #[cfg(not(target_arch = "wasm32"))]
        let results: Vec<Result<u32, CodegenError>> = {
            use rayon::prelude::*;
            self.kernels.par_iter().map(check).collect()
        };
        #[cfg(target_arch = "wasm32")]
        let results: Vec<Result<u32, CodegenError>> = self.kernels.iter().map(check).collect();
        let bytes = results.into_iter().collect::<Result<Vec<u32>, _>>()?;
        Ok((self.kernels, bytes))
    }

    fn refs(&self, kernel: usize, pairs: &[(&str, String)], part: usize) -> Vec<TensorRef> {
        pairs
            .iter()
            .map(|(binding, tensor)| {
                let b = self.kernels[kernel].bindings.iter().find(|b| b.name == *binding);
                let index = b.map(|b| b.index).expect("op bindings and plan tables agree");
                TensorRef { binding: index, tensor: tensor.clone(), part }
            })
            .collect()
    }
}

impl Plan {
    /// The plan for a manifest (already validated by its loader).
    pub fn from_manifest(manifest: &Manifest, target: &Target) -> Result<Plan, CodegenError> {
        let tensors = manifest
            .tensors
            .iter()
            .map(|(name, t)| {
                (name.clone(), TensorLayout { format: t.format, parts: t.parts.iter().map(|p| p.rows).collect() })
            })
            .collect();
        Plan::new(&manifest.model, &tensors, target)
    }

    /// The plan for a model described by its config and tensor layouts.
    pub fn new(
        cfg: &ModelConfig,
        tensors: &BTreeMap<String, TensorLayout>,
        target: &Target,
    ) -> Result<Plan, CodegenError> {
        let get = |name: &str| {
            tensors.get(name).ok_or_else(|| crate::manifest::ManifestError::MissingTensor(name.to_string()))
        };
        let check_matrix = |name: &str, out: usize, in_features: usize| -> Result<&TensorLayout, CodegenError> {
            let t = get(name)?;
            for p in &t.parts {
                part_sizes(t.format, p[1].saturating_sub(p[0]), in_features)
                    .map_err(|source| CodegenError::Format { tensor: name.to_string(), source })?;
            }
            if t.parts.last().map(|p| p[1]) != Some(out) {
                return Err(CodegenError::Unsupported {
                    tensor: name.to_string(),
                    reason: format!("parts do not cover {out} rows"),
                });
            }
            Ok(t)
        };
        let mut set = KernelSet { kernels: Vec::new(), by_name: BTreeMap::new(), target: *target };
        let mut steps = Vec::new();
        let h = cfg.hidden_size;

        let embed = check_matrix(names::EMBED, cfg.vocab_size, h)?;
        for (i, rows) in embed.parts.iter().enumerate() {
            let spec = KernelSpec::Embed { hidden: h, rows: *rows, format: embed.format, target: *target };
            let k = set.add(&spec)?;
            let batch_kernel = set.add_batch(&spec)?;
            let tensors = set.refs(k, &[("embed", names::EMBED.to_string())], i);
            steps.push(PlanStep {
                kernel: k,
                batch_kernel,
                batch_with: None,
                stage: Stage::Embed,
                layer: None,
                tensors,
            });
        }

        for layer in 0..cfg.num_layers {
            let f = |suffix: &str, out: usize, inp: usize| -> Result<QuantFormat, CodegenError> {
                let name = names::layer(layer, suffix);
                let t = check_matrix(&name, out, inp)?;
                if t.parts.len() != 1 {
                    return Err(CodegenError::Unsupported {
                        tensor: name,
                        reason: "layer matrices must have one part".into(),
                    });
                }
                Ok(t.format)
            };
            let formats = LayerFormats {
                q: f("self_attn.q_proj.weight", cfg.q_dim(), h)?,
                k: f("self_attn.k_proj.weight", cfg.kv_dim(), h)?,
                v: f("self_attn.v_proj.weight", cfg.kv_dim(), h)?,
                o: f("self_attn.o_proj.weight", h, cfg.q_dim())?,
                gate: f("mlp.gate_proj.weight", cfg.intermediate_size, h)?,
                up: f("mlp.up_proj.weight", cfg.intermediate_size, h)?,
                down: f("mlp.down_proj.weight", h, cfg.intermediate_size)?,
            };
            for (spec, bindings) in layer_specs(cfg, &formats, target).iter().zip(LAYER_BINDINGS) {
                let k = set.add(spec)?;
                let batch_kernel = set.add_batch(spec)?;
                let pairs: Vec<(&str, String)> = bindings.iter().map(|(b, s)| (*b, names::layer(layer, s))).collect();
                let tensors = set.refs(k, &pairs, 0);
                steps.push(PlanStep {
                    kernel: k,
                    batch_kernel,
                    batch_with: None,
                    stage: Stage::Layer,
                    layer: Some(layer),
                    tensors,
                });
            }
        }

        let head_name = cfg.lm_head_name();
        let head = check_matrix(head_name, cfg.vocab_size, h)?;
        let mut logits_kernel = None;
        for (i, rows) in head.parts.iter().enumerate() {
            let spec = KernelSpec::RmsLogits {
                hidden: h,
                vocab: cfg.vocab_size,
                rows: *rows,
                eps: cfg.rms_norm_eps,
                format: head.format,
                target: *target,
            };
            let k = set.add(&spec)?;
            logits_kernel = Some(k);
            let batch_kernel = set.add_batch(&spec)?;
            let mut tensors = set.refs(k, &[("norm", names::FINAL_NORM.to_string())], 0);
            tensors.extend(set.refs(k, &[("w", head_name.to_string())], i));
            steps.push(PlanStep {
                kernel: k,
                batch_kernel,
                batch_with: None,
                stage: Stage::Logits,
                layer: None,
                tensors,
            });
        }

        // the argmax reads the logits kernel's shares where it leaves them; its
        // batch kernel reads the row, for steps whose logits the tiled kernel
        // computed (it leaves no shares)
        let argmax = set.add(&KernelSpec::Argmax { vocab: cfg.vocab_size, target: *target })?;
        let mut argmax_shares = 0;
        let step = match logits_kernel {
            Some(logits) if crate::ops::leaves_argmax_shares(cfg.vocab_size, head.parts[0]) => {
                argmax_shares = set.kernels[logits].dispatch[0] as usize;
                let spec = KernelSpec::ArgmaxShares { vocab: cfg.vocab_size, slots: argmax_shares, target: *target };
                let k = set.add(&spec)?;
                PlanStep {
                    kernel: k,
                    batch_kernel: Some(argmax),
                    // the one logits step, just before
                    batch_with: Some(steps.len() - 1),
                    stage: Stage::Argmax,
                    layer: None,
                    tensors: Vec::new(),
                }
            }
            _ => PlanStep {
                kernel: argmax,
                batch_kernel: None,
                batch_with: None,
                stage: Stage::Argmax,
                layer: None,
                tensors: Vec::new(),
            },
        };
        steps.push(step);
        let k = set.add(&KernelSpec::Sample { vocab: cfg.vocab_size, target: *target })?;
        steps.push(PlanStep {
            kernel: k,
            batch_kernel: None,
            batch_with: None,
            stage: Stage::Sample,
            layer: None,
            tensors: Vec::new(),
        });

        let (kernels, workgroup_bytes) = set.validated()?;
        Ok(Plan { target: *target, kernels, workgroup_bytes, steps, argmax_shares })
    }

    /// Dispatches per decoded token, its choice (argmax or sampling) included.
    pub fn dispatches_per_token(&self) -> usize {
        self.steps.iter().filter(|s| s.stage != Stage::Sample).count()
    }
}

/// The WGSL files of every kernel of `manifest` for each of `targets`
/// (`<kernel-name>.wgsl`), plus `index.json`: for each kernel its file, target,
/// entry point, workgroup size, dispatch and binding table, and for each target
/// the ordered plan.
pub fn generated_files(manifest: &Manifest, targets: &[Target]) -> Result<BTreeMap<String, String>, CodegenError> {
    let mut files = BTreeMap::new();
    let mut index_kernels = serde_json::Map::new();
    let mut index_plans = serde_json::Map::new();
    for target in targets {
        let plan = Plan::from_manifest(manifest, target)?;
        for k in &plan.kernels {
            let file = format!("{}.wgsl", k.name);
            let mut entry = serde_json::to_value(k).expect("kernel metadata serialises");
            if let serde_json::Value::Object(map) = &mut entry {
                map.insert("file".into(), file.clone().into());
                map.insert("target".into(), target.name().into());
            }
            index_kernels.insert(k.name.clone(), entry);
            files.insert(file, k.wgsl.clone());
        }
        let steps: Vec<serde_json::Value> = plan
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "kernel": plan.kernels[s.kernel].name,
                    "batch_kernel": s.batch_kernel.map(|k| plan.kernels[k].name.clone()),
                    "stage": s.stage,
                    "layer": s.layer,
                    "tensors": s.tensors,
                })
            })
            .collect();
        index_plans.insert(target.name().to_string(), steps.into());
    }
    let index = serde_json::json!({ "kernels": index_kernels, "plans": index_plans });
    let mut text = serde_json::to_string_pretty(&index).expect("index serialises");
    text.push('\n');
    files.insert("index.json".to_string(), text);
    Ok(files)
}

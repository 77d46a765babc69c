//! A GGUF file seen as a Llama checkpoint: hyper-parameters from `llama.*`
//! metadata, tensors under Hugging Face names, Q/K rows restored to Hugging
//! Face order.

use std::collections::BTreeMap;
use std::path::Path;

use llama5_codegen::manifest::{names, ModelConfig};

use crate::error::ConvertError;
use crate::gguf::{GgmlType, GgufFile, Value};
use crate::gguf_tokenizer;
use crate::quants;
use crate::source::{SourceTensor, SourceTokenizer, Weights};

/// The Hugging Face name of a GGUF Llama tensor.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some(names::EMBED.into()),
        "output_norm.weight" => return Some(names::FINAL_NORM.into()),
        "output.weight" => return Some(names::LM_HEAD.into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (digits, suffix) = rest.split_once('.')?;
    let index: usize = digits.parse().ok()?;
    if index.to_string() != digits {
        return None;
    }
    let hf = match suffix {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(names::layer(index, hf))
}

/// Row `r` of the Hugging Face matrix is row `from[r]` of the GGUF one.
///
/// llama.cpp's converter stores Q and K with each head's rows interleaved for
/// its rotary layout: `w.reshape(n_head, 2, head_dim / 2, in).swapaxes(1, 2)`.
/// So Hugging Face row `h*hd + s*hd/2 + i` sits at GGUF row `h*hd + 2*i + s`.
pub fn unpermute_rows(n_head: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut from = vec![0; n_head * head_dim];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                from[h * head_dim + s * half + i] = h * head_dim + 2 * i + s;
            }
        }
    }
    from
}

/// The inverse of [`unpermute_rows`] (Hugging Face -> GGUF), as llama.cpp's converter applies it.
pub fn permute_rows(n_head: usize, head_dim: usize) -> Vec<usize> {
    let from = unpermute_rows(n_head, head_dim);
    let mut inv = vec![0; from.len()];
    for (hf, &gg) in from.iter().enumerate() {
        inv[gg] = hf;
    }
    inv
}

pub struct GgufCheckpoint {
    pub file: GgufFile,
    pub config: ModelConfig,
    /// Hugging Face name -> index into `file.tensors`.
    by_name: BTreeMap<String, usize>,
}

impl GgufCheckpoint {
    pub fn open(path: &Path) -> Result<Self, ConvertError> {
        let file = GgufFile::open(path)?;
        let arch = file.get("general.architecture").and_then(Value::as_str).unwrap_or("");
        if arch != "llama" {
            return Err(ConvertError::Architecture { path: path.into(), found: arch.into(), expected: "`llama`" });
        }
        let mut by_name = BTreeMap::new();
        for (i, t) in file.tensors.iter().enumerate() {
            if t.name == "rope_freqs.weight" {
                return Err(ConvertError::Unsupported {
                    path: path.into(),
                    what: "rope frequency factors (`rope_freqs.weight`, Llama 3.1 rope scaling)".into(),
                });
            }
            if let Some(hf) = hf_name(&t.name) {
                by_name.insert(hf, i);
            }
        }
        let config = config_from_metadata(&file, &by_name)?;
        Ok(GgufCheckpoint { file, config, by_name })
    }

    pub fn tensors(&self) -> BTreeMap<String, SourceTensor> {
        self.by_name
            .iter()
            .map(|(name, &i)| {
                let t = &self.file.tensors[i];
                (name.clone(), SourceTensor { shape: t.torch_shape(), dtype: t.ty.name().into(), bytes: t.bytes })
            })
            .collect()
    }

    pub fn unmapped(&self) -> Vec<String> {
        self.file.tensors.iter().filter(|t| hf_name(&t.name).is_none()).map(|t| t.name.clone()).collect()
    }

    /// Reads a tensor by Hugging Face name: Q4_0 / Q4_1 as 4-bit groups, every
    /// other supported type as f32; Q and K rows restored to Hugging Face order.
    pub fn read(&self, name: &str) -> Result<Weights, ConvertError> {
        let path = &self.file.path;
        let &i = self
            .by_name
            .get(name)
            .ok_or_else(|| ConvertError::MissingTensor { path: path.clone(), tensor: name.into() })?;
        let t = &self.file.tensors[i];
        let bytes = self.file.data(t);
        let weights = match quants::q4_groups(t.ty, bytes) {
            Some((q, params)) => Weights::Int4Groups { q, params },
            None => Weights::F32(quants::dequantize(t.ty, bytes).ok_or_else(|| ConvertError::UnsupportedDtype {
                path: path.clone(),
                tensor: t.name.clone(),
                dtype: t.ty.name().into(),
            })?),
        };
        let cfg = &self.config;
        let in_features = t.dims[0] as usize;
        let heads = if name.ends_with("self_attn.q_proj.weight") {
            Some(cfg.num_heads)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(cfg.num_kv_heads)
        } else {
            None
        };
        match heads {
            Some(n_head) if t.dims.len() == 2 && t.dims[1] as usize == n_head * cfg.head_dim => {
                Ok(weights.permute_rows(in_features, &unpermute_rows(n_head, cfg.head_dim)))
            }
            _ => Ok(weights),
        }
    }

    /// The GGML type of a tensor, by Hugging Face name.
    pub fn ggml_type(&self, name: &str) -> Option<GgmlType> {
        self.by_name.get(name).map(|&i| self.file.tensors[i].ty)
    }

    pub fn tokenizer(&self) -> Result<SourceTokenizer, ConvertError> {
        gguf_tokenizer::build(&self.file)
    }
}

fn config_from_metadata(file: &GgufFile, by_name: &BTreeMap<String, usize>) -> Result<ModelConfig, ConvertError> {
    let path = &file.path;
    let int = |key: &str| -> Result<Option<usize>, ConvertError> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().and_then(|v| usize::try_from(v).ok()).map(Some).ok_or_else(|| {
                ConvertError::invalid(path, key, format!("{} is not a non-negative integer", v.summary()))
            }),
        }
    };
    let required = |key: &str| -> Result<usize, ConvertError> {
        int(key)?.ok_or_else(|| ConvertError::invalid(path, key, "missing"))
    };
    let float = |key: &str, default: f32| -> Result<f32, ConvertError> {
        match file.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| ConvertError::invalid(path, key, format!("{} is not a number", v.summary()))),
        }
    };
    let hidden = required("llama.embedding_length")?;
    let heads = required("llama.attention.head_count")?;
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(ConvertError::invalid(
            path,
            "llama.attention.head_count",
            format!("{heads} does not divide embedding_length {hidden}"),
        ));
    }
    let head_dim = int("llama.attention.key_length")?.unwrap_or(hidden / heads);
    if let Some(rot) = int("llama.rope.dimension_count")? {
        if rot != head_dim {
            return Err(ConvertError::Unsupported {
                path: path.clone(),
                what: format!("partial rotary embedding (llama.rope.dimension_count {rot}, head dim {head_dim})"),
            });
        }
    }
    if let Some(kind) = file.get("llama.rope.scaling.type").and_then(Value::as_str) {
        if kind != "none" {
            return Err(ConvertError::Unsupported { path: path.clone(), what: format!("rope scaling `{kind}`") });
        }
    }
    let tokens = file.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(<[Value]>::len);
    let embed_rows = by_name.get(names::EMBED).map(|&i| file.tensors[i].dims.get(1).copied().unwrap_or(0) as usize);
    let vocab_size = match (int("llama.vocab_size")?, tokens, embed_rows) {
        (Some(v), _, _) => v,
        (None, Some(t), _) => t,
        (None, None, Some(e)) => e,
        (None, None, None) => {
            return Err(ConvertError::invalid(path, "llama.vocab_size", "missing, and no token list"))
        }
    };
    Ok(ModelConfig {
        architecture: "llama".into(),
        name: file.get("general.name").and_then(Value::as_str).map(str::to_string),
        hidden_size: hidden,
        intermediate_size: required("llama.feed_forward_length")?,
        num_layers: required("llama.block_count")?,
        num_heads: heads,
        num_kv_heads: int("llama.attention.head_count_kv")?.unwrap_or(heads),
        head_dim,
        vocab_size,
        max_position_embeddings: int("llama.context_length")?.unwrap_or(2048),
        rope_theta: float("llama.rope.freq_base", 10000.0)?,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        tie_word_embeddings: !by_name.contains_key(names::LM_HEAD),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_for_a_layer() {
        assert_eq!(hf_name("blk.12.attn_output.weight").as_deref(), Some("model.layers.12.self_attn.o_proj.weight"));
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some(names::EMBED));
        assert_eq!(hf_name("blk.01.attn_q.weight"), None, "non-canonical index");
        assert_eq!(hf_name("blk.1.attn_qkv.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn permutation_matches_the_reshape_definition() {
        // reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape: GGUF row (h, i, s) <- HF row (h, s, i)
        let (n_head, hd) = (3, 8);
        let to_gguf = permute_rows(n_head, hd);
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for s in 0..2 {
                    let gguf_row = h * hd + i * 2 + s;
                    let hf_row = h * hd + s * hd / 2 + i;
                    assert_eq!(to_gguf[gguf_row], hf_row);
                }
            }
        }
        let back = unpermute_rows(n_head, hd);
        for r in 0..n_head * hd {
            assert_eq!(to_gguf[back[r]], r, "row {r} round trips");
        }
        assert_ne!(back, (0..n_head * hd).collect::<Vec<_>>());
    }
}

//! GGUF -> Hugging Face export: `config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.
//!
//! Every tensor is written as F32. Dequantized GGUF values (an f16 scale times
//! a small integer, plus an f16 minimum) need up to about 19 significant bits,
//! more than F16 or BF16 hold; F32 holds them exactly, so converting the export
//! sees the very values converting the GGUF file does.

use std::borrow::Cow;
use std::path::Path;

use safetensors::{Dtype, View};
use serde_json::json;

use crate::error::{ConvertError, IoContext};
use crate::gguf_model::GgufCheckpoint;
use crate::quants;
use crate::writer::{install, output_state, sibling, OutputState, TempDir};

/// A tensor dequantized only when the safetensors writer asks for its bytes,
/// so the export holds one tensor in memory at a time.
struct LazyTensor<'a> {
    ckpt: &'a GgufCheckpoint,
    name: String,
    shape: Vec<usize>,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // every tensor's type was checked against `quants::supported` before writing
        let w = self.ckpt.read(&self.name).expect("tensor type checked before export").into_f32();
        Cow::Owned(w.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Writes a Hugging Face checkpoint of the GGUF model at `gguf_path` into
/// `out_dir` (replacing an existing export only with `force`).
pub fn export_hf(gguf_path: &Path, out_dir: &Path, force: bool) -> Result<(), ConvertError> {
    let ckpt = GgufCheckpoint::open(gguf_path)?;
    let replace = output_state(out_dir, force, "config.json")? == OutputState::Replace;
    let cfg = &ckpt.config;
    let tensors = ckpt.tensors();
    for (name, t) in &tensors {
        let ty = ckpt.ggml_type(name).expect("listed tensors have a type");
        if !quants::supported(ty) {
            return Err(ConvertError::UnsupportedDtype {
                path: gguf_path.into(),
                tensor: name.clone(),
                dtype: t.dtype.clone(),
            });
        }
    }
    let tok = ckpt.tokenizer()?;
    if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).at(parent)?;
    }
    let tmp = TempDir::create(sibling(out_dir, "tmp"))?;
    let dir = tmp.path();

    let eos: serde_json::Value = match tok.info.eos_token_ids.as_slice() {
        [] => serde_json::Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": tok.info.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "_name_or_path": cfg.name,
    });
    let token_text = |id: Option<u32>| -> serde_json::Value {
        let tokenizer: Option<tokenizers::Tokenizer> = tok.json.parse().ok();
        match (id, tokenizer) {
            (Some(id), Some(t)) => t.id_to_token(id).map_or(serde_json::Value::Null, |s| json!(s)),
            _ => serde_json::Value::Null,
        }
    };
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.info.add_bos,
        "bos_token": token_text(tok.info.bos_token_id),
        "eos_token": token_text(tok.info.eos_token_ids.first().copied()),
        "chat_template": tok.info.chat_template,
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    let generation_config = json!({ "bos_token_id": tok.info.bos_token_id, "eos_token_id": eos });
    let write_json = |file: &str, v: &serde_json::Value| -> Result<(), ConvertError> {
        let path = dir.join(file);
        let mut text = serde_json::to_string_pretty(v).expect("json values serialise");
        text.push('\n');
        std::fs::write(&path, text).at(&path)
    };
    write_json("config.json", &config)?;
    write_json("tokenizer_config.json", &tokenizer_config)?;
    write_json("generation_config.json", &generation_config)?;
    let tok_path = dir.join("tokenizer.json");
    std::fs::write(&tok_path, &tok.json).at(&tok_path)?;

    let views: Vec<(String, LazyTensor)> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), LazyTensor { ckpt: &ckpt, name: name.clone(), shape: t.shape.clone() }))
        .collect();
    let st_path = dir.join("model.safetensors");
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &st_path)
        .map_err(|e| ConvertError::invalid(&st_path, "safetensors", e.to_string()))?;
    install(tmp, out_dir, replace)
}

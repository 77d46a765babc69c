//! Hugging Face checkpoints: a directory (`config.json`, `model.safetensors` or
//! shards listed in `model.safetensors.index.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`) or one `.safetensors`
//! file with `config.json` beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use llama5_codegen::manifest::{ModelConfig, TokenizerInfo};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value as Json;

use crate::error::{ConvertError, IoContext};
use crate::source::{SourceTensor, SourceTokenizer};

/// One mapped `.safetensors` file.
struct StFile {
    path: PathBuf,
    map: memmap2::Mmap,
    tensors: BTreeMap<String, StTensor>,
}

#[derive(Clone, Debug)]
struct StTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    range: (usize, usize),
}

pub struct HfCheckpoint {
    /// The directory, or the single `.safetensors` file given.
    pub path: PathBuf,
    /// Directory holding `config.json` and the tokenizer files.
    pub dir: PathBuf,
    pub config: ModelConfig,
    raw_config: Json,
    files: Vec<StFile>,
    /// Tensor name -> index into `files`.
    by_name: BTreeMap<String, usize>,
}

fn read_json(path: &Path) -> Result<Json, ConvertError> {
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map_err(|e| ConvertError::invalid(path, "json", e.to_string()))
}

fn read_json_opt(path: &Path) -> Result<Option<Json>, ConvertError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

impl HfCheckpoint {
    pub fn open(input: &Path) -> Result<Self, ConvertError> {
        let (dir, files): (PathBuf, Vec<PathBuf>) = if input.is_dir() {
            let index = input.join("model.safetensors.index.json");
            let single = input.join("model.safetensors");
            if index.exists() {
                let json = read_json(&index)?;
                let map = json
                    .get("weight_map")
                    .and_then(Json::as_object)
                    .ok_or_else(|| ConvertError::invalid(&index, "weight_map", "missing or not an object"))?;
                let mut files = std::collections::BTreeSet::new();
                for (name, file) in map {
                    let file = file.as_str().ok_or_else(|| {
                        ConvertError::invalid(&index, format!("weight_map.{name}"), "is not a file name")
                    })?;
                    if Path::new(file).components().count() != 1 {
                        return Err(ConvertError::invalid(
                            &index,
                            format!("weight_map.{name}"),
                            format!("`{file}` is not a plain file name"),
                        ));
                    }
                    files.insert(input.join(file));
                }
                (input.to_path_buf(), files.into_iter().collect())
            } else if single.exists() {
                (input.to_path_buf(), vec![single])
            } else {
                return Err(ConvertError::invalid(
                    input,
                    "checkpoint",
                    "neither model.safetensors nor model.safetensors.index.json found",
                ));
            }
        } else {
            let dir = input.parent().map(Path::to_path_buf).unwrap_or_default();
            (dir, vec![input.to_path_buf()])
        };
        let config_path = dir.join("config.json");
        let raw_config = read_json(&config_path)?;
        let config = model_config(&config_path, &raw_config, input)?;
        let files: Vec<StFile> = files.iter().map(|f| open_safetensors(f)).collect::<Result<_, _>>()?;
        let mut by_name = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors.keys() {
                if let Some(prev) = by_name.insert(name.clone(), i) {
                    return Err(ConvertError::invalid(
                        &f.path,
                        format!("tensor `{name}`"),
                        format!("also present in {}", files[prev].path.display()),
                    ));
                }
            }
        }
        Ok(HfCheckpoint { path: input.to_path_buf(), dir, config, raw_config, files, by_name })
    }

    pub fn file_of(&self, name: &str) -> Option<PathBuf> {
        self.by_name.get(name).map(|&i| self.files[i].path.clone())
    }

    pub fn tensors(&self) -> BTreeMap<String, SourceTensor> {
        self.by_name
            .iter()
            .map(|(name, &i)| {
                let t = &self.files[i].tensors[name];
                let st = SourceTensor {
                    shape: t.shape.clone(),
                    dtype: format!("{:?}", t.dtype),
                    bytes: (t.range.1 - t.range.0) as u64,
                };
                (name.clone(), st)
            })
            .collect()
    }

    /// Reads a tensor as f32 (F32, F16, BF16 sources).
    pub fn read(&self, name: &str) -> Result<Vec<f32>, ConvertError> {
        let &i = self
            .by_name
            .get(name)
            .ok_or_else(|| ConvertError::MissingTensor { path: self.path.clone(), tensor: name.into() })?;
        let f = &self.files[i];
        let t = &f.tensors[name];
        let bytes = &f.map[t.range.0..t.range.1];
        let out = match t.dtype {
            Dtype::F32 => bytes.par_chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.par_chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.par_chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(ConvertError::UnsupportedDtype {
                    path: f.path.clone(),
                    tensor: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        // The values are copied out: drop the tensor's pages from this
        // process's resident set (they stay in the page cache), so converting a
        // checkpoint holds about one tensor at a time, not the whole mapping.
        // SAFETY: the mapping is private and read-only and no borrow of it
        // outlives this call; later reads of these pages fetch the same bytes
        // from the file, which mapping it already assumes does not change.
        #[cfg(unix)]
        unsafe {
            f.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, t.range.0, t.range.1 - t.range.0).ok();
        }
        Ok(out)
    }

    pub fn tokenizer(&self) -> Result<SourceTokenizer, ConvertError> {
        let tok_path = self.dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&tok_path).at(&tok_path)?;
        let tokenizer: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| ConvertError::Tokenizer { path: tok_path.clone(), reason: format!("does not load: {e}") })?;
        let tc_path = self.dir.join("tokenizer_config.json");
        let tc = read_json_opt(&tc_path)?.unwrap_or(Json::Null);
        let gen = read_json_opt(&self.dir.join("generation_config.json"))?.unwrap_or(Json::Null);

        let token_id = |v: &Json| -> Option<u32> {
            let text = v.as_str().or_else(|| v.get("content").and_then(Json::as_str))?;
            tokenizer.token_to_id(text)
        };
        let ids = |v: &Json| -> Vec<u32> {
            match v {
                Json::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()).into_iter().collect(),
                Json::Array(a) => a.iter().filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok())).collect(),
                _ => Vec::new(),
            }
        };
        let first_id = |v: &Json| ids(v).first().copied();
        let bos_token_id = first_id(&gen["bos_token_id"])
            .or_else(|| first_id(&self.raw_config["bos_token_id"]))
            .or_else(|| token_id(&tc["bos_token"]));
        let mut eos_token_ids = ids(&gen["eos_token_id"]);
        if eos_token_ids.is_empty() {
            eos_token_ids = ids(&self.raw_config["eos_token_id"]);
        }
        if eos_token_ids.is_empty() {
            eos_token_ids = token_id(&tc["eos_token"]).into_iter().collect();
        }
        let chat_template = match &tc["chat_template"] {
            Json::String(s) => Some(s.clone()),
            // a list of named templates: the `default` one
            Json::Array(list) => {
                list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(str::to_string)
            }
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => {
                let jinja = self.dir.join("chat_template.jinja");
                if jinja.exists() {
                    Some(std::fs::read_to_string(&jinja).at(&jinja)?)
                } else {
                    None
                }
            }
        };
        let info = TokenizerInfo {
            file: "tokenizer.json".into(),
            bos_token_id,
            eos_token_ids,
            add_bos: tc["add_bos_token"].as_bool().unwrap_or(false),
            chat_template,
        };
        Ok(SourceTokenizer { json, info })
    }
}

/// Maps `config.json` onto [`ModelConfig`].
fn model_config(path: &Path, c: &Json, input: &Path) -> Result<ModelConfig, ConvertError> {
    let arch = c["architectures"].as_array().and_then(|a| a.first()).and_then(Json::as_str);
    let model_type = c["model_type"].as_str();
    if arch != Some("LlamaForCausalLM") && !(arch.is_none() && model_type == Some("llama")) {
        let found = arch.or(model_type).unwrap_or("none").to_string();
        return Err(ConvertError::Architecture { path: path.into(), found, expected: "`LlamaForCausalLM`" });
    }
    let int = |key: &str| -> Result<Option<usize>, ConvertError> {
        match &c[key] {
            Json::Null => Ok(None),
            v => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| ConvertError::invalid(path, key, format!("{v} is not a non-negative integer"))),
        }
    };
    let required = |key: &str| int(key)?.ok_or_else(|| ConvertError::invalid(path, key, "missing"));
    let float = |key: &str, default: f32| -> Result<f32, ConvertError> {
        match &c[key] {
            Json::Null => Ok(default),
            v => v
                .as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| ConvertError::invalid(path, key, format!("{v} is not a number"))),
        }
    };
    if !c["rope_scaling"].is_null() {
        return Err(ConvertError::Unsupported {
            path: path.into(),
            what: format!("rope_scaling {}", c["rope_scaling"]),
        });
    }
    let hidden = required("hidden_size")?;
    let heads = required("num_attention_heads")?;
    if heads == 0 || (!hidden.is_multiple_of(heads) && int("head_dim")?.is_none()) {
        return Err(ConvertError::invalid(
            path,
            "num_attention_heads",
            format!("{heads} does not divide hidden_size {hidden}"),
        ));
    }
    let name = c["_name_or_path"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| input.file_name().map(|n| n.to_string_lossy().into_owned()));
    Ok(ModelConfig {
        architecture: "llama".into(),
        name,
        hidden_size: hidden,
        intermediate_size: required("intermediate_size")?,
        num_layers: required("num_hidden_layers")?,
        num_heads: heads,
        num_kv_heads: int("num_key_value_heads")?.unwrap_or(heads),
        head_dim: int("head_dim")?.unwrap_or(hidden / heads),
        vocab_size: required("vocab_size")?,
        max_position_embeddings: int("max_position_embeddings")?.unwrap_or(2048),
        rope_theta: float("rope_theta", 10000.0)?,
        rms_norm_eps: float("rms_norm_eps", 1e-6)?,
        tie_word_embeddings: c["tie_word_embeddings"].as_bool().unwrap_or(false),
    })
}

/// Maps a `.safetensors` file, checking its header and every tensor's range
/// before the `safetensors` crate's own validation.
fn open_safetensors(path: &Path) -> Result<StFile, ConvertError> {
    let file = std::fs::File::open(path).at(path)?;
    // SAFETY: read-only mapping of an input the converter never writes.
    let map = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
    let len = map.len() as u64;
    let Some(n) = map.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))) else {
        return Err(ConvertError::Truncated {
            path: path.into(),
            what: "header length".into(),
            offset: 0,
            end: 8,
            len,
        });
    };
    let data_start = n.checked_add(8).filter(|&e| e <= len).ok_or(ConvertError::HeaderTooLarge {
        path: path.into(),
        header: n,
        len,
    })?;
    let data_len = len - data_start;
    // Our own pass over the header first, for errors that name the tensor and the fault.
    let header: Json = std::str::from_utf8(&map[8..data_start as usize])
        .ok()
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| ConvertError::invalid(path, "header", "not UTF-8 JSON"))?;
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    if let Some(obj) = header.as_object() {
        for (name, info) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
            let offs = info["data_offsets"].as_array();
            let (Some(start), Some(end)) =
                (offs.and_then(|o| o.first()?.as_u64()), offs.and_then(|o| o.get(1)?.as_u64()))
            else {
                return Err(ConvertError::invalid(path, format!("tensor `{name}` data_offsets"), "missing"));
            };
            if end < start {
                return Err(ConvertError::OffsetOutOfRange {
                    path: path.into(),
                    tensor: name.clone(),
                    start,
                    end,
                    len: data_len,
                });
            }
            if end > data_len {
                return Err(ConvertError::Truncated {
                    path: path.into(),
                    what: format!("tensor `{name}` data"),
                    offset: data_start + start,
                    end: data_start + end,
                    len,
                });
            }
            ranges.push((start, end, name.clone()));
        }
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(ConvertError::OverlappingTensors {
                path: path.into(),
                tensor: pair[1].2.clone(),
                other: pair[0].2.clone(),
                start: pair[1].0,
                end: pair[1].1,
            });
        }
    }
    let tensors = tensor_ranges(path, &map, data_start, len, ranges.last().map_or(0, |r| r.1))?;
    Ok(StFile { path: path.into(), tensors, map })
}

fn tensor_ranges(
    path: &Path,
    map: &[u8],
    data_start: u64,
    len: u64,
    data_end: u64,
) -> Result<BTreeMap<String, StTensor>, ConvertError> {
    let st = SafeTensors::deserialize(map).map_err(|e| match e {
        SafeTensorError::MetadataIncompleteBuffer => ConvertError::invalid(
            path,
            "data_offsets",
            format!("tensor data ends at {data_end} but the data section holds {} bytes", len - data_start),
        ),
        SafeTensorError::InvalidOffset(name) => {
            ConvertError::invalid(path, format!("tensor `{name}` data_offsets"), "leave a gap before the tensor")
        }
        SafeTensorError::TensorInvalidInfo | SafeTensorError::ValidationOverflow => {
            ConvertError::invalid(path, "header", "a tensor's byte size does not match its shape and dtype")
        }
        other => ConvertError::invalid(path, "header", other.to_string()),
    })?;
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
            let t = StTensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                range: (start, start + view.data().len()),
            };
            (name, t)
        })
        .collect();
    Ok(tensors)
}

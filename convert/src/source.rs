//! Any input the converter reads: a Hugging Face checkpoint or a GGUF file,
//! seen as a config plus tensors by Hugging Face name, read one at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::f16;
use llama5_codegen::manifest::{ModelConfig, TokenizerInfo};

use crate::error::ConvertError;
use crate::gguf_model::GgufCheckpoint;
use crate::hf::HfCheckpoint;

/// A tensor's values, as read from the source.
#[derive(Clone, Debug, PartialEq)]
pub enum Weights {
    /// Row-major in PyTorch order (`[out, in]` for a matrix).
    F32(Vec<f32>),
    /// Already 4-bit (GGUF Q4_0 / Q4_1): row-major nibbles `[out, in]` and
    /// `(scale, min)` per group of 32 inputs, `[out, in / 32]`; `w = scale * q + min`.
    Int4Groups { q: Vec<u8>, params: Vec<(f16, f16)> },
}

/// Group size of [`Weights::Int4Groups`] (ggml's Q4 block length).
pub const GGML_GROUP: usize = 32;

impl Weights {
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(v) => v.len(),
            Weights::Int4Groups { q, .. } => q.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (dequantizing 4-bit groups exactly as the kernels do).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Weights::F32(v) => v,
            Weights::Int4Groups { q, params } => q
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let (s, m) = params[i / GGML_GROUP];
                    s.to_f32() * n as f32 + m.to_f32()
                })
                .collect(),
        }
    }

    /// The first non-finite value, as `(index, value)`; scales and minimums of
    /// 4-bit groups count for every element of their group.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        match self {
            Weights::F32(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])),
            Weights::Int4Groups { q, params } => {
                params.iter().position(|(s, m)| !s.is_finite() || !m.is_finite()).map(|g| {
                    let (s, m) = params[g];
                    let i = g * GGML_GROUP;
                    (i, s.to_f32() * q[i] as f32 + m.to_f32())
                })
            }
        }
    }

    /// Reorders output rows: row `r` of the result is row `from[r]` of `self`.
    pub fn permute_rows(self, in_features: usize, from: &[usize]) -> Self {
        fn gather<T: Copy>(v: &[T], width: usize, from: &[usize]) -> Vec<T> {
            from.iter().flat_map(|&r| v[r * width..(r + 1) * width].iter().copied()).collect()
        }
        match self {
            Weights::F32(v) => Weights::F32(gather(&v, in_features, from)),
            Weights::Int4Groups { q, params } => Weights::Int4Groups {
                q: gather(&q, in_features, from),
                params: gather(&params, in_features / GGML_GROUP, from),
            },
        }
    }
}

/// What a source says about one tensor before reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceTensor {
    /// Shape in PyTorch order.
    pub shape: Vec<usize>,
    /// The stored encoding (`F32`, `BF16`, `Q4_1`, ...).
    pub dtype: String,
    /// Bytes the tensor takes in the source.
    pub bytes: u64,
}

/// The tokenizer a source provides.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceTokenizer {
    /// Contents of a Hugging Face `tokenizer.json`.
    pub json: String,
    /// The manifest's tokenizer entry (`file` is `tokenizer.json`).
    pub info: TokenizerInfo,
}

/// An opened input.
pub enum Source {
    Hf(HfCheckpoint),
    Gguf(GgufCheckpoint),
}

impl Source {
    /// Opens a Hugging Face directory, a `.safetensors` file (with `config.json`
    /// beside it) or a `.gguf` file.
    pub fn open(input: &Path) -> Result<Source, ConvertError> {
        if input.is_dir() {
            return Ok(Source::Hf(HfCheckpoint::open(input)?));
        }
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(input)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut magic))
            .map_err(|e| ConvertError::io(input, e))?;
        if read == 4 && magic == crate::gguf::MAGIC {
            Ok(Source::Gguf(GgufCheckpoint::open(input)?))
        } else if input.extension().is_some_and(|e| e == "gguf") {
            Err(ConvertError::invalid(input, "magic", format!("{:02x?} is not `GGUF`", &magic[..read])))
        } else {
            Ok(Source::Hf(HfCheckpoint::open(input)?))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Source::Hf(s) => &s.path,
            Source::Gguf(s) => &s.file.path,
        }
    }

    /// `safetensors` or `gguf`.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Hf(_) => "safetensors",
            Source::Gguf(_) => "gguf",
        }
    }

    /// The input's file (or directory) name, without directories.
    pub fn file_name(&self) -> String {
        self.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Source::Hf(s) => &s.config,
            Source::Gguf(s) => &s.config,
        }
    }

    /// Every tensor the source holds that maps to a Hugging Face name.
    pub fn tensors(&self) -> BTreeMap<String, SourceTensor> {
        match self {
            Source::Hf(s) => s.tensors(),
            Source::Gguf(s) => s.tensors(),
        }
    }

    /// Source tensors with no Hugging Face name (ignored by the converter).
    pub fn unmapped(&self) -> Vec<String> {
        match self {
            Source::Hf(_) => Vec::new(),
            Source::Gguf(s) => s.unmapped(),
        }
    }

    /// Reads one tensor by Hugging Face name.
    pub fn read(&self, name: &str) -> Result<Weights, ConvertError> {
        match self {
            Source::Hf(s) => s.read(name).map(Weights::F32),
            Source::Gguf(s) => s.read(name),
        }
    }

    pub fn tokenizer(&self) -> Result<SourceTokenizer, ConvertError> {
        match self {
            Source::Hf(s) => s.tokenizer(),
            Source::Gguf(s) => s.tokenizer(),
        }
    }

    /// The tensor's file, for error messages.
    pub fn tensor_path(&self, name: &str) -> PathBuf {
        match self {
            Source::Hf(s) => s.file_of(name).unwrap_or_else(|| s.path.clone()),
            Source::Gguf(s) => s.file.path.clone(),
        }
    }
}

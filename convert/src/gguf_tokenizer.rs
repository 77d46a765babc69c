//! A Hugging Face `tokenizer.json` built from a GGUF vocabulary.
//!
//! Supported: byte-level BPE (`tokenizer.ggml.model = gpt2`) with the
//! pre-tokenizers llama.cpp knows as `smollm` (and the others that share its
//! regexes: each digit alone, then the GPT-2 split), `gpt2` (the GPT-2 split
//! alone), `llama-bpe` (Llama 3's split) and `default`. Control (type 3) and
//! user-defined (type 4) tokens become added tokens, matched before
//! pre-tokenization as llama.cpp does with special-token parsing on.

use llama5_codegen::manifest::TokenizerInfo;
use serde_json::{json, Map, Value as Json};

use crate::error::ConvertError;
use crate::gguf::{GgufFile, Value};
use crate::source::SourceTokenizer;

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Llama 3's split (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3` regex).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `use_regex` applies the GPT-2 split (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_GPT2` regex).
fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// A regex split that keeps matches and the text between them as pieces.
fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Option<Json> {
    Some(match pre {
        // "\p{N}" first (each digit its own piece), then the GPT-2 regex
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)],
        }),
        "gpt2" | "mpt" | "olmo" | "jais" => byte_level(true),
        // llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT regexes for BPE vocabularies, applied in turn
        "default" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"[\p{P}\$\+<=>\^~\|]+"),
                split(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"),
                split(r"\p{N}+"),
                split(r"[0-9][0-9][0-9]"),
                byte_level(false),
            ],
        }),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(LLAMA3_PATTERN),
                byte_level(false),
            ],
        }),
        _ => return None,
    })
}

/// Builds `tokenizer.json` and the manifest's tokenizer entry from GGUF metadata.
pub fn build(file: &GgufFile) -> Result<SourceTokenizer, ConvertError> {
    let path = &file.path;
    let bad = |field: &str, reason: String| ConvertError::Tokenizer {
        path: path.clone(),
        reason: format!("{field}: {reason}"),
    };
    let model = file.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
    if model != "gpt2" {
        return Err(bad("tokenizer.ggml.model", format!("`{model}` is not supported (only byte-level BPE, `gpt2`)")));
    }
    let pre_name = file.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let pre = pre_tokenizer(pre_name)
        .ok_or_else(|| bad("tokenizer.ggml.pre", format!("pre-tokenizer `{pre_name}` is not supported")))?;
    let strings = |key: &str| -> Result<Vec<&str>, ConvertError> {
        let arr = file.get(key).and_then(Value::as_array).ok_or_else(|| bad(key, "missing or not an array".into()))?;
        arr.iter().map(|v| v.as_str().ok_or_else(|| bad(key, "holds a non-string".into()))).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        None => vec![1; tokens.len()],
        Some(arr) => arr
            .iter()
            .map(|v| v.as_i64().ok_or_else(|| bad("tokenizer.ggml.token_type", "holds a non-integer".into())))
            .collect::<Result<_, _>>()?,
    };
    if types.len() != tokens.len() {
        return Err(bad("tokenizer.ggml.token_type", format!("{} entries for {} tokens", types.len(), tokens.len())));
    }

    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        // duplicates keep their first id, as the BPE model can hold only one
        vocab.entry(tok.to_string()).or_insert(json!(id));
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    let merges: Vec<Json> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok(json!([a, b])),
            _ => Err(bad("tokenizer.ggml.merges", format!("entry {i} `{m}` is not two space-separated tokens"))),
        })
        .collect::<Result<_, _>>()?;

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    let json = serde_json::to_string(&tokenizer).expect("json values serialise");
    // Reject what the tokenizers crate would reject at load time, here, naming the file.
    json.parse::<tokenizers::Tokenizer>().map_err(|e| bad("tokenizer.json", format!("does not load: {e}")))?;

    let id = |key: &str| -> Result<Option<u32>, ConvertError> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|v| u32::try_from(v).ok()) {
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id)),
                _ => Err(bad(key, format!("{} is not a token id", v.summary()))),
            },
        }
    };
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
    if let Some(eot) = id("tokenizer.ggml.eot_token_id")? {
        if !eos_token_ids.contains(&eot) {
            eos_token_ids.push(eot);
        }
    }
    let info = TokenizerInfo {
        file: "tokenizer.json".into(),
        bos_token_id: id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        add_bos: file.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
        chat_template: file.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string),
    };
    Ok(SourceTokenizer { json, info })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_pre_tokenizer_loads() {
        for pre in ["smollm", "gpt2", "llama-bpe", "default"] {
            let t = json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
                "pre_tokenizer": pre_tokenizer(pre).unwrap(), "post_processor": null, "decoder": null,
                "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
            });
            let tok: tokenizers::Tokenizer = t.to_string().parse().unwrap_or_else(|e| panic!("{pre}: {e}"));
            assert_eq!(tok.encode("ab", false).unwrap().get_ids(), &[2], "{pre}");
        }
        assert!(pre_tokenizer("qwen2").is_none());
    }
}

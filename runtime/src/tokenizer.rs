//! The model's `tokenizer.json` (through the `tokenizers` crate) plus the
//! special tokens the manifest names, and streaming decode.

use llama5_codegen::manifest::TokenizerInfo;

use crate::error::RuntimeError;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    info: TokenizerInfo,
}

impl Tokenizer {
    /// Parses a Hugging Face `tokenizer.json`; `info` is the manifest's tokenizer entry.
    pub fn from_bytes(bytes: &[u8], info: &TokenizerInfo) -> Result<Self, RuntimeError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", info.file)))?;
        Ok(Tokenizer { inner, info: info.clone() })
    }

    /// Reads the tokenizer file the model's manifest names.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn for_model(model: &crate::model::Model) -> Result<Self, RuntimeError> {
        let info = &model.manifest.tokenizer;
        let path = model.dir.join(&info.file);
        let bytes = std::fs::read(&path).map_err(|e| RuntimeError::Io { path: path.clone(), source: e })?;
        Self::from_bytes(&bytes, info).map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", path.display())))
    }

    pub fn info(&self) -> &TokenizerInfo {
        &self.info
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.info.bos_token_id
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.info.eos_token_ids
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.info.eos_token_ids.contains(&id)
    }

    /// The vocabulary entry of `id` (special tokens included), e.g. `<|im_end|>`.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenizes `text`; special-token text in it (`<|im_start|>`) becomes the
    /// special token. With `add_special_tokens` the tokenizer's post-processor
    /// runs and, where the manifest says `add_bos`, BOS is prepended unless
    /// already there.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, RuntimeError> {
        let enc =
            self.inner.encode_fast(text, add_special_tokens).map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, true, Some(bos)) = (add_special_tokens, self.info.add_bos, self.info.bos_token_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, RuntimeError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| RuntimeError::Tokenizer(e.to_string()))
    }

    /// A decoder for text generated one token at a time.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder { tokenizer: self, ids: Vec::new(), prefix: 0, read: 0 }
    }
}

/// Turns tokens into text as they arrive.
///
/// Decoding tokens one by one breaks words (leading-space markers) and
/// characters whose UTF-8 bytes span several tokens, so it decodes the recent
/// suffix of the sequence and emits only the newly completed text: nothing
/// while the suffix ends in an incomplete character (U+FFFD).
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    /// Start of the suffix decoded for context.
    prefix: usize,
    /// End of the text already emitted.
    read: usize,
}

impl StreamDecoder<'_> {
    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, RuntimeError> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..], true)?;
        if after.len() > before.len() && !after.ends_with('\u{fffd}') {
            // `before` is normally a prefix of `after`; when a decoder rewrites
            // earlier text, emit from the first char boundary past it
            let mut cut = before.len();
            while !after.is_char_boundary(cut) {
                cut += 1;
            }
            let text = after[cut..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(text))
        } else {
            Ok(None)
        }
    }

    /// Text held back at the end (an incomplete character), lossily decoded.
    pub fn finish(&mut self) -> Result<Option<String>, RuntimeError> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(after.get(before.len()..).filter(|s| !s.is_empty()).map(str::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama5_fixtures::tiny;

    /// The fixture's byte-level tokenizer: byte `b` is token `b`.
    fn tiny_tokenizer(add_bos: bool) -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        tiny::write_hf_dir(dir.path()).unwrap();
        let bytes = std::fs::read(dir.path().join("tokenizer.json")).unwrap();
        let info = TokenizerInfo {
            file: "tokenizer.json".into(),
            bos_token_id: Some(tiny::BOS_TOKEN_ID),
            eos_token_ids: vec![tiny::EOS_TOKEN_ID],
            add_bos,
            chat_template: None,
        };
        Tokenizer::from_bytes(&bytes, &info).unwrap()
    }

    #[test]
    fn encode_with_and_without_special_tokens() {
        let t = tiny_tokenizer(true);
        assert_eq!(t.encode("Hi", false).unwrap(), vec![72, 105]);
        assert_eq!(t.encode("Hi", true).unwrap(), vec![tiny::BOS_TOKEN_ID, 72, 105]);
        assert_eq!(t.encode("<|im_start|>Hi", false).unwrap(), vec![tiny::IM_START_ID, 72, 105], "special text");
        assert_eq!(tiny_tokenizer(false).encode("Hi", true).unwrap(), vec![72, 105], "no add_bos");
        assert!(t.is_eos(tiny::EOS_TOKEN_ID) && !t.is_eos(tiny::BOS_TOKEN_ID));
        assert_eq!(t.token_text(tiny::EOS_TOKEN_ID).as_deref(), Some("<|im_end|>"));
        assert_eq!(t.decode(&[72, 105, tiny::EOS_TOKEN_ID], true).unwrap(), "Hi");
    }

    #[test]
    fn streaming_holds_back_split_characters() {
        let t = tiny_tokenizer(false);
        // "é" is two bytes, "🦙" four: each byte is its own token
        let text = "a é🦙 b";
        let ids = t.encode(text, false).unwrap();
        assert_eq!(ids.len(), text.len());
        let mut stream = t.stream();
        let mut pieces = Vec::new();
        for &id in &ids {
            if let Some(p) = stream.push(id).unwrap() {
                assert!(!p.contains('\u{fffd}'), "{p:?}");
                pieces.push(p);
            }
        }
        assert_eq!(stream.finish().unwrap(), None);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.contains(&"é".to_string()) && pieces.contains(&"🦙".to_string()), "{pieces:?}");
        // a dangling lead byte comes out at the end, lossily
        let mut stream = t.stream();
        assert_eq!(stream.push(0xc3).unwrap(), None);
        assert_eq!(stream.finish().unwrap().as_deref(), Some("\u{fffd}"));
    }

    #[test]
    fn malformed_tokenizer_is_an_error() {
        let info = TokenizerInfo {
            file: "tokenizer.json".into(),
            bos_token_id: None,
            eos_token_ids: vec![],
            add_bos: false,
            chat_template: None,
        };
        let err = Tokenizer::from_bytes(b"{", &info).err().expect("rejected").to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}

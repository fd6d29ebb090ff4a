//! Text to token ids and back: a Hugging Face `tokenizer.json` when the checkpoint has one,
//! otherwise a byte-level tokenizer (one token per UTF-8 byte), which the embedded model uses.

use std::path::Path;

use crate::EngineError;

/// The byte tokenizer's begin-of-sequence id (ids 0..=255 are the bytes themselves).
pub const BYTE_BOS: u32 = 256;
/// The byte tokenizer's end-of-sequence id.
pub const BYTE_EOS: u32 = 257;

pub enum Tokenizer {
    Bytes,
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// `tokenizer.json` in `dir` if present, else the byte tokenizer.
    pub fn for_checkpoint(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(Tokenizer::Bytes);
        }
        tokenizers::Tokenizer::from_file(&path)
            .map(|t| Tokenizer::HuggingFace(Box::new(t)))
            .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))
    }

    /// Token ids of `text`, with the begin-of-sequence token the model expects.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.encode_with(text, true)
    }

    /// Token ids of `text` alone, adding no begin-of-sequence token: for text that already
    /// holds its special tokens, like a rendered chat template. A Hugging Face tokenizer
    /// still turns special-token text in `text` (`<|begin_of_text|>`) into its id; the byte
    /// tokenizer has no special-token text, so it encodes bytes only.
    pub fn encode_without_special_tokens(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        match self {
            Tokenizer::Bytes => {
                let bos = add_special_tokens.then_some(BYTE_BOS);
                Ok(bos.into_iter().chain(text.bytes().map(u32::from)).collect())
            }
            Tokenizer::HuggingFace(t) => t
                .encode(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| EngineError::Tokenizer(e.to_string())),
        }
    }

    /// Text of `ids`, without special tokens. Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::HuggingFace(t) => t
                .decode(ids, true)
                .map_err(|e| EngineError::Tokenizer(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips_text_and_adds_bos() {
        let t = Tokenizer::Bytes;
        let ids = t.encode("KV ü").unwrap();
        assert_eq!(ids[0], BYTE_BOS);
        assert_eq!(ids.len(), 1 + "KV ü".len());
        assert_eq!(t.decode(&ids).unwrap(), "KV ü");
        assert_eq!(t.encode_without_special_tokens("KV ü").unwrap(), ids[1..]);
    }

    #[test]
    fn hugging_face_encoding_without_special_tokens_adds_no_bos_but_reads_its_text() {
        // A word-level tokenizer whose post-processor prepends <s>, as Llama's does.
        let tokenizer_json = r#"{
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
            "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "[UNK]",
                      "vocab": {"<s>": 0, "hello": 1, "world": 2, "[UNK]": 3}}
        }"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json).unwrap();
        let t = Tokenizer::for_checkpoint(dir.path()).unwrap();
        assert!(matches!(t, Tokenizer::HuggingFace(_)));
        assert_eq!(t.encode("hello world").unwrap(), [0, 1, 2]);
        assert_eq!(
            t.encode_without_special_tokens("hello world").unwrap(),
            [1, 2]
        );
        // A rendered chat template writes <s> itself: it is read as the token, once.
        assert_eq!(
            t.encode_without_special_tokens("<s>hello world").unwrap(),
            [0, 1, 2]
        );
    }
}

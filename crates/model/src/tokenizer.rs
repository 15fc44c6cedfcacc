//! The text side of the processor: a Hugging Face `tokenizer.json` (byte-level BPE) through the `tokenizers`
//! crate, and a streaming detokenizer that only emits complete UTF-8.

use std::path::Path;

use crate::error::{ModelError, Result};

/// A model's tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Parses the bytes of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`, `<|image_pad|>`) become their ids.
    /// No BOS is added (Qwen has none).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The id of a token string (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            skip_special,
        }
    }
}

/// Turns generated ids into text pieces as they come. Byte-level BPE can split a character over several tokens;
/// a piece is held back until its text no longer ends in an incomplete character (U+FFFD), so every emitted piece
/// is valid, final UTF-8 and the pieces concatenate to the decoded whole.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded for context (earlier tokens are final).
    prefix: usize,
    /// End of the text already emitted.
    read: usize,
    skip_special: bool,
}

impl StreamDecoder<'_> {
    /// The window's text without and with the tokens not yet emitted.
    fn decode_window(&self) -> Result<(String, String)> {
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = self
            .tokenizer
            .decode(&self.ids[self.prefix..], self.skip_special)?;
        Ok((before, now))
    }

    /// Adds one token; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (before, now) = self.decode_window()?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Text still held back at the end (an incomplete character), decoded lossily.
    pub fn flush(&mut self) -> Result<Option<String>> {
        if self.read == self.ids.len() {
            return Ok(None);
        }
        let (before, now) = self.decode_window()?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(now
            .get(before.len()..)
            .map(str::to_string)
            .filter(|s| !s.is_empty()))
    }
}

//! Incremental detokenization: text deltas that never split a UTF-8 character.

use super::error::Result;
use super::tokenizer::Tokenizer;

/// Turns a growing list of generated ids into text deltas.
///
/// Decoding each token alone loses the tokenizer's context (leading spaces, byte-fallback
/// pieces that form one character together), so it decodes a short window and emits the
/// difference, holding back while the tail is an incomplete character.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window that gives context to new tokens.
    prefix: usize,
    /// End of the text already emitted.
    read: usize,
    /// Whether special tokens (`<|im_end|>`, `</s>`) are part of the text.
    keep_special: bool,
}

impl IncrementalDecoder {
    /// An empty decoder that leaves special tokens out of the text.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty decoder that writes special tokens out as text (vLLM's
    /// `skip_special_tokens: false`).
    pub fn keeping_special_tokens() -> Self {
        Self { keep_special: true, ..Self::default() }
    }

    fn decode(&self, tok: &Tokenizer, ids: &[u32]) -> Result<String> {
        Ok(tok.decode_with(ids, !self.keep_special)?)
    }

    /// Adds a token; returns new text when a complete character is available.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.decode(tok, &self.ids[self.prefix..self.read])?;
        let now = self.decode(tok, &self.ids[self.prefix..])?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && let Some(delta) = now.get(before.len()..)
        {
            let delta = delta.to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(delta);
        }
        Ok(String::new())
    }

    /// The text `id` would add if it came next, without adding it.
    pub fn peek(&self, tok: &Tokenizer, id: u32) -> Result<String> {
        let mut ids = self.ids[self.prefix..].to_vec();
        ids.push(id);
        let before = self.decode(tok, &ids[..self.read - self.prefix])?;
        let now = self.decode(tok, &ids)?;
        Ok(match now.get(before.len()..) {
            Some(delta) if now.len() > before.len() && !now.ends_with('\u{FFFD}') => delta.to_string(),
            _ => String::new(),
        })
    }

    /// Whatever is still held back (e.g. an incomplete character at the end of generation).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let before = self.decode(tok, &self.ids[self.prefix..self.read])?;
        let now = self.decode(tok, &self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

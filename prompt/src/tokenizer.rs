//! A tokenizer plus the rules herd encodes prompts by: BOS, and user text that spells a special
//! token encoded as text.

use tokenizers::Tokenizer as HfTokenizer;

use crate::{PromptError, Result};

/// A tokenizer plus the BOS rule of its model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    bos: Option<u32>,
    add_bos: bool,
    /// The texts of its special tokens, to find them in what users wrote.
    specials: Vec<String>,
}

/// The texts of `inner`'s special tokens.
fn specials(inner: &HfTokenizer) -> Vec<String> {
    inner.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect()
}

impl Tokenizer {
    /// `inner` with its model's BOS id and whether prompts start with it.
    pub fn new(inner: HfTokenizer, bos: Option<u32>, add_bos: bool) -> Self {
        Self { specials: specials(&inner), inner, bos, add_bos: add_bos && bos.is_some() }
    }

    /// The tokenizer as `tokenizer.json` text, with its BOS rule: what [`Tokenizer::from_json`]
    /// takes, so that another process encodes prompts exactly as this one does.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    /// A tokenizer from [`Tokenizer::to_json`]'s text and the BOS rule.
    pub fn from_json(json: &str, bos: Option<u32>, add_bos: bool) -> Result<Self> {
        let inner: HfTokenizer = json.parse().map_err(|e: tokenizers::Error| PromptError::Tokenizer(e.to_string()))?;
        Ok(Self::new(inner, bos, add_bos))
    }

    /// Whether prompts start with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Encodes `text`, parsing special-token text, and adds BOS when the model expects it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_part(text, true)
    }

    /// Encodes `text`, parsing special-token text, with BOS only if `first` (a later part of a
    /// prompt encoded piece by piece).
    pub fn encode_part(&self, text: &str, first: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(bos) = self.bos.filter(|_| self.add_bos && first)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Whether `text` spells out a special token (`</s>`, `<|im_end|>`, ...).
    pub fn has_special_text(&self, text: &str) -> bool {
        self.specials.iter().any(|t| text.contains(t.as_str()))
    }

    /// Encodes what a user wrote: special-token text stays text, so that it cannot end a turn or
    /// open a forged one. No BOS.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>> {
        // Only for text that spells a special token, which is rare: a copy is cheap enough.
        let mut literal = self.inner.clone();
        literal.set_encode_special_tokens(true);
        let enc = literal.encode_fast(text, false).map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    /// Text of `ids`, with special tokens written out unless `skip_special`.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    /// The vocabulary entry of `id` as stored (e.g. "▁the" or "<0x0A>").
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The BOS id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

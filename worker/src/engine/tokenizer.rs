//! Text <-> token ids for every checkpoint kind: `tokenizer.json`, sentencepiece
//! `tokenizer.model`, and tokenizers embedded in GGUF metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use super::config::gguf_uint;
use super::error::{EngineError, Result, candle_message};
use super::sentencepiece::{Piece, SpmModel, kind};
pub use herd_prompt::Tokenizer;

/// A token given as a string or as `{"content": ...}` in `tokenizer_config.json`.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum TokenSpec {
    Text(String),
    Object { content: String },
}

impl TokenSpec {
    fn text(&self) -> &str {
        match self {
            Self::Text(t) | Self::Object { content: t } => t,
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum TemplateSpec {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize, Clone)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// The fields of `tokenizer_config.json` that herd uses.
#[derive(Debug, Deserialize, Default, Clone)]
pub struct TokenizerConfig {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    add_bos_token: Option<bool>,
    chat_template: Option<TemplateSpec>,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json` if the directory has one.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::checkpoint(&path, e))?;
        serde_json::from_str(&text).map_err(|e| EngineError::checkpoint(&path, format!("not valid JSON: {e}")))
    }

    /// The Jinja chat template (the `default` one when several are named).
    pub fn chat_template(&self) -> Option<String> {
        match self.chat_template.as_ref()? {
            TemplateSpec::One(t) => Some(t.clone()),
            TemplateSpec::Named(list) => {
                list.iter().find(|t| t.name == "default").or(list.first()).map(|t| t.template.clone())
            }
        }
    }

    /// The BOS token text.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_ref().map(TokenSpec::text)
    }

    /// The EOS token text.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_ref().map(TokenSpec::text)
    }
}

/// The tokenizer of an HF checkpoint directory: `tokenizer.json`, else `tokenizer.model`.
pub fn from_hf_dir(dir: &Path, tcfg: &TokenizerConfig, bos_id: Option<u32>) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    let spm = dir.join("tokenizer.model");
    let (inner, default_add_bos) = if json.is_file() {
        let inner = HfTokenizer::from_file(&json)
            .map_err(|e| EngineError::checkpoint(&json, format!("not a valid tokenizer.json: {e}")))?;
        // Whether its post-processor adds BOS tells us what the model was trained with.
        let adds = inner.encode("", true).ok().and_then(|e| e.get_ids().first().copied());
        let adds_bos = adds.is_some() && adds == bos_id.or_else(|| tcfg.bos_token().and_then(|t| inner.token_to_id(t)));
        (inner, adds_bos)
    } else if spm.is_file() {
        (SpmModel::from_file(&spm)?.to_tokenizer()?, true)
    } else {
        return Err(EngineError::checkpoint(dir, "no tokenizer found (expected tokenizer.json or tokenizer.model)"));
    };
    let bos = tcfg.bos_token().and_then(|t| inner.token_to_id(t)).or(bos_id);
    let add_bos = tcfg.add_bos_token.unwrap_or(default_add_bos) && bos.is_some();
    Ok(Tokenizer::new(inner, bos, add_bos))
}

/// The tokenizer embedded in GGUF metadata (`tokenizer.ggml.model` llama or gpt2).
pub fn from_gguf(md: &HashMap<String, Value>, path: &Path) -> Result<Tokenizer> {
    let err = |msg: String| EngineError::checkpoint(path, msg);
    let strings = |key: &str| -> Result<Vec<String>> {
        let v = md.get(key).ok_or_else(|| err(format!("GGUF metadata lacks {key}")))?;
        let list = v.to_vec().map_err(|e| err(format!("{key}: {}", candle_message(&e))))?;
        list.iter().map(|s| s.to_string().cloned().map_err(|e| err(format!("{key}: {}", candle_message(&e))))).collect()
    };
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        Some(list) => list.iter().map(|v| gguf_uint(v).unwrap_or(1) as i32).collect(),
        None => Vec::new(),
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let kind_of = |i: usize| types.get(i).copied().unwrap_or(kind::NORMAL);
    let flag = |key: &str| md.get(key).and_then(|v| v.to_bool().ok());
    let model = md.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("llama");
    let inner = match model {
        "llama" => {
            let scores: Vec<f32> = match md.get("tokenizer.ggml.scores").and_then(|v| v.to_vec().ok()) {
                Some(list) => list.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                None => vec![0.0; tokens.len()],
            };
            let pieces = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| Piece { text: t.clone(), score: scores.get(i).copied().unwrap_or(0.0), kind: kind_of(i) })
                .collect();
            SpmModel {
                pieces,
                byte_fallback: true,
                add_dummy_prefix: flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
                remove_extra_whitespaces: false,
                escape_whitespaces: true,
            }
            .to_tokenizer()?
        }
        "gpt2" => {
            let merges = strings("tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err("tokenizer.ggml.merges has an entry without a space".into()))?;
            let pre =
                md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("default");
            gpt2_tokenizer(&tokens, merges, pre, &kind_of).map_err(|e| err(e.to_string()))?
        }
        other => return Err(err(format!("unsupported GGUF tokenizer model {other} (herd reads llama and gpt2)"))),
    };
    let bos = md.get("tokenizer.ggml.bos_token_id").and_then(gguf_uint).map(|v| v as u32);
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama") && bos.is_some();
    Ok(Tokenizer::new(inner, bos, add_bos))
}

/// A byte-level BPE like GPT-2's, with the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.
fn gpt2_tokenizer(
    tokens: &[String],
    merges: Vec<(String, String)>,
    pre: &str,
    kind_of: &dyn Fn(usize) -> i32,
) -> tokenizers::Result<HfTokenizer> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build()?;
    let mut tok = HfTokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tok: PreTokenizerWrapper = match pre {
        // SmolLM splits every digit before the byte-level regex.
        "smollm" => PreSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt2" | "default" => byte_level.into(),
        other => {
            tracing::warn!("GGUF tokenizer.ggml.pre {other} is not known to herd; using GPT-2's pre-tokenizer");
            byte_level.into()
        }
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(byte_level));
    let special: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| kind_of(*i) == kind::CONTROL)
        .map(|(_, t)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(special)?;
    let user: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| kind_of(*i) == kind::USER_DEFINED)
        .map(|(_, t)| AddedToken::from(t.clone(), false))
        .collect();
    tok.add_tokens(user)?;
    Ok(tok)
}

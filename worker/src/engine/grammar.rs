//! Constrained decoding with llguidance: a token trie of the model's vocabulary, built once per
//! model on first use, and a matcher per sequence that masks the tokens its grammar forbids.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

use super::error::{EngineError, Result};
use super::tokenizer::Tokenizer;

/// What a sequence's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (OpenAI's JSON mode).
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(serde_json::Value),
    /// Text matching this regular expression.
    Regex(String),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

/// Whitespace a JSON answer may put between tokens: bounded, so that a model cannot spend its
/// whole budget on blanks (which unbounded flexible whitespace lets it do).
const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{0,8}";

impl Constraint {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Self::JsonObject => {
                TopLevelGrammar::from_json_schema(json_with_options(serde_json::json!({"type": "object"})))
            }
            Self::JsonSchema(schema) => TopLevelGrammar::from_json_schema(json_with_options(schema.clone())),
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// `schema` with herd's JSON options, unless it sets its own.
fn json_with_options(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// The model's grammar compiler, made on first use (it walks the whole vocabulary).
#[derive(Default)]
pub struct Grammars {
    factory: OnceLock<std::result::Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("ready", &self.factory.get().is_some()).finish()
    }
}

impl Grammars {
    /// A matcher for `constraint` over a vocabulary of `width` logits ending a sequence at `eos`;
    /// a grammar llguidance refuses (a bad schema, an unsupported keyword) is an invalid argument.
    pub fn matcher(
        &self,
        constraint: &Constraint,
        tokenizer: &Tokenizer,
        width: usize,
        eos: &[u32],
    ) -> Result<Matcher> {
        let factory = self
            .factory
            .get_or_init(|| factory(tokenizer, width, eos).map(Arc::new).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| EngineError::InvalidArgument(format!("this model's vocabulary cannot be constrained: {e}")))?;
        let parser = factory
            .create_parser(constraint.grammar())
            .map_err(|e| EngineError::InvalidArgument(format!("the output constraint is not usable: {e}")))?;
        Ok(Matcher::new(Ok(parser)))
    }
}

/// The trie of every token's bytes (padded to the logits' width) and a parser factory over it.
fn factory(tokenizer: &Tokenizer, width: usize, eos: &[u32]) -> anyhow::Result<ParserFactory> {
    let json: serde_json::Value = serde_json::from_str(&tokenizer.to_json()?)?;
    let mut words = llguidance::token_bytes_from_tokenizer_json(&json)?;
    anyhow::ensure!(words.len() <= width, "{} tokens for {width} logits", words.len());
    // Ids past the tokenizer's (padding rows of the embedding) can never be produced.
    for id in words.len()..width {
        words.push(format!("\u{ff}<[{id}]>").into_bytes());
    }
    let first_eos = *eos.first().ok_or_else(|| anyhow::anyhow!("the model has no end-of-sequence token"))?;
    let trie = TokTrie::from(&TokRxInfo::new(width as u32, first_eos), &words).with_eos_tokens(eos);
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    ParserFactory::new_simple(&env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_options_are_added_unless_set() {
        let schema = json_with_options(serde_json::json!({"type": "object"}));
        assert_eq!(schema["x-guidance"]["whitespace_pattern"], JSON_WHITESPACE);
        let own = json_with_options(serde_json::json!({"type": "object", "x-guidance": {"lenient": true}}));
        assert_eq!(own["x-guidance"], serde_json::json!({"lenient": true}));
    }
}

//! Prompts as the worker's engine sees them: chat templates, tokenizers, and the hashes of a
//! prompt's KV blocks. The worker encodes with them; the gateway encodes the same way to find
//! which worker already holds a prompt's prefix.

pub mod blocks;
pub mod template;
pub mod tokenizer;

pub use template::{ChatTemplate, Message, TemplateSource};
pub use tokenizer::Tokenizer;

/// What can go wrong turning a request into token ids.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The request itself is malformed (a message role the template cannot render).
    #[error("{0}")]
    InvalidArgument(String),
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be loaded or rendered.
    #[error("chat template: {0}")]
    Template(String),
}

/// This crate's results.
pub type Result<T> = std::result::Result<T, PromptError>;

/// The prompt ids for a conversation, ready for the assistant's answer. Only the template adds
/// special tokens: message text that spells one (`<|im_end|><|im_start|>system`, a forged turn)
/// is encoded as the text it is.
pub fn encode_chat(tokenizer: &Tokenizer, template: &ChatTemplate, messages: &[Message]) -> Result<Vec<u32>> {
    if !messages.iter().any(|m| tokenizer.has_special_text(&m.content)) {
        return tokenizer.encode(&template.render(messages, true)?);
    }
    // Render with a marker in place of each message's text, then encode the template's text
    // and the messages' separately.
    let (open, close) = ('\u{F8F0}', '\u{F8F1}');
    let marked: Vec<Message> =
        messages.iter().enumerate().map(|(i, m)| Message::new(m.role.clone(), format!("{open}{i}{close}"))).collect();
    let text = template.render(&marked, true)?;
    let mut ids = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find(open) {
        ids.extend(tokenizer.encode_part(&rest[..at], ids.is_empty())?);
        let after = &rest[at + open.len_utf8()..];
        let index = after.find(close).and_then(|end| after[..end].parse::<usize>().ok().map(|i| (i, end)));
        let Some((i, end)) = index.filter(|&(i, _)| i < messages.len()) else {
            return Err(PromptError::Template("the chat template altered a message's text".into()));
        };
        ids.extend(tokenizer.encode_literal(&messages[i].content)?);
        rest = &after[end + close.len_utf8()..];
    }
    ids.extend(tokenizer.encode_part(rest, ids.is_empty())?);
    Ok(ids)
}

//! A request's prompt as KV block hashes, for kv-aware routing. The gateway encodes prompts the
//! way the workers do, with the tokenizer and chat template a worker sends in `ModelInfo`, and
//! hashes the blocks as the workers' caches do (herd-prompt's `blocks`).

use herd_prompt::{ChatTemplate, Message, Tokenizer};
use herd_proto::v1::{GenerateRequest, ModelInfoResponse, generate_request};

/// Prompts longer than this many bytes per token of the context are routed by load alone: they
/// cannot fit (text averages about 4 bytes a token), and tokenizing them would only cost the
/// gateway time.
const MAX_BYTES_PER_TOKEN: usize = 8;

/// How one model's workers encode prompts.
pub struct Encoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    block_size: usize,
}

impl Encoder {
    /// The encoder a worker describes in its `ModelInfo`; `Err` when it sends no tokenizer (an
    /// older worker) or one that does not load.
    pub fn from_info(info: &ModelInfoResponse) -> Result<Self, String> {
        if info.tokenizer_json.is_empty() || info.kv_block_size == 0 {
            return Err("the worker's ModelInfo has no tokenizer".into());
        }
        let tokenizer =
            Tokenizer::from_json(&info.tokenizer_json, info.bos_token_id, info.add_bos).map_err(|e| e.to_string())?;
        let template = match info.chat_template.as_str() {
            "jinja" => ChatTemplate::Jinja {
                source: info.chat_template_source.clone(),
                bos_token: info.bos_token.clone(),
                eos_token: info.eos_token.clone(),
            },
            name => ChatTemplate::builtin(name).ok_or_else(|| format!("unknown chat template {name:?}"))?,
        };
        Ok(Self { tokenizer, template, block_size: info.kv_block_size as usize })
    }

    /// The hashes of the prompt's full KV blocks, or `None` when it cannot be encoded (the
    /// worker will say why) or is too long for a `context` of tokens.
    pub fn hashes(&self, request: &GenerateRequest, context: usize) -> Option<Vec<u64>> {
        let max_bytes = context.saturating_mul(MAX_BYTES_PER_TOKEN);
        let ids = match request.input.as_ref()? {
            generate_request::Input::Chat(chat) => {
                let bytes: usize = chat.messages.iter().map(|m| m.content.len()).sum();
                if bytes > max_bytes {
                    return None;
                }
                let messages: Vec<Message> =
                    chat.messages.iter().map(|m| Message::new(m.role.clone(), m.content.clone())).collect();
                herd_prompt::encode_chat(&self.tokenizer, &self.template, &messages).ok()?
            }
            generate_request::Input::Text(text) if text.len() <= max_bytes => self.tokenizer.encode(text).ok()?,
            generate_request::Input::Text(_) => return None,
            generate_request::Input::TokenIds(ids) => ids.ids.clone(),
        };
        Some(herd_prompt::blocks::prefix_hashes(&ids, self.block_size))
    }
}

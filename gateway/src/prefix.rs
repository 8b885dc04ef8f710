//! A request's prompt as KV block hashes, for kv-aware routing. The gateway encodes prompts the
//! way the workers do, with the tokenizer and chat template a worker sends in `ModelInfo`, and
//! hashes the blocks as the workers' caches do (herd-prompt's `blocks`).

use herd_prompt::{ChatTemplate, Message, Tokenizer};
use herd_proto::v1::{GenerateRequest, ModelInfoResponse, generate_request};

/// Prompts longer than this many bytes per token of the context are routed by load alone: they
/// cannot fit (text averages about 4 bytes a token), and tokenizing them would only cost the
/// gateway time.
const MAX_BYTES_PER_TOKEN: usize = 8;

/// Encoders by a digest of what they were built from, so that the workers serving one model share
/// one (a tokenizer takes tens of MiB).
#[derive(Default)]
pub struct Encoders {
    built: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::sync::Weak<Encoder>>>,
}

impl Encoders {
    /// The encoder a worker's `ModelInfo` describes: one already built from the same, else a new one.
    pub fn get(&self, info: &ModelInfoResponse) -> Result<std::sync::Arc<Encoder>, String> {
        use prost::Message as _;
        use sha2::Digest as _;
        // Everything that shapes the encoding; the names a worker serves under do not.
        let shape = ModelInfoResponse { models: Vec::new(), context_length: 0, ..info.clone() };
        let key: [u8; 32] = sha2::Sha256::digest(shape.encode_to_vec()).into();
        // Building under the lock: workers that start together build their model's encoder once.
        let mut built = self.built.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        built.retain(|_, encoder| encoder.strong_count() > 0);
        if let Some(encoder) = built.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(encoder);
        }
        let encoder = std::sync::Arc::new(Encoder::from_info(info)?);
        built.insert(key, std::sync::Arc::downgrade(&encoder));
        Ok(encoder)
    }
}

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

/// A prompt as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The hashes of its full KV blocks.
    pub hashes: Vec<u64>,
    /// How many leading blocks it shares with other recent prompts that go on differently (a
    /// system prompt many conversations start with): every worker soon holds those, so they
    /// say nothing about where the prompt belongs.
    pub shared: usize,
}

/// What follows a block in the prompts seen: one block, or several (the prompts branch there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    One(u64),
    Many,
}

/// Where recent prompts branch, as a map from a block to what followed it.
#[derive(Default)]
pub struct Branches {
    next: std::sync::Mutex<std::collections::HashMap<u64, Next>>,
}

/// Blocks remembered before the map starts afresh (16 bytes each, plus the map's overhead).
const MAX_BRANCH_BLOCKS: usize = 1 << 17;

impl Branches {
    /// Records a prompt's blocks and returns it as routing sees it. A conversation's turns
    /// extend one path, so its own blocks never branch; prompts that merely start alike do.
    pub fn route(&self, hashes: Vec<u64>) -> Route {
        let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if next.len() + hashes.len() > MAX_BRANCH_BLOCKS {
            next.clear();
        }
        let mut shared = 0;
        for (i, pair) in hashes.windows(2).enumerate() {
            let after = next.entry(pair[0]).or_insert(Next::One(pair[1]));
            if *after != Next::One(pair[1]) {
                *after = Next::Many;
            }
            if *after == Next::Many {
                shared = i + 1;
            }
        }
        Route { hashes, shared }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_common_start_is_shared_and_a_conversation_is_not() {
        let branches = Branches::default();
        // Two conversations after the same two-block system prompt.
        assert_eq!(branches.route(vec![1, 2, 10, 11]).shared, 0, "nothing seen yet");
        assert_eq!(branches.route(vec![1, 2, 20]).shared, 2);
        // The first one's next turn extends its own path: only the system prompt is shared.
        assert_eq!(branches.route(vec![1, 2, 10, 11, 12, 13]).shared, 2);
        assert_eq!(branches.route(vec![1, 2, 10, 11, 12, 13, 14]).shared, 2);
        // A prompt that is the same conversation resent, or a prefix of it, adds nothing.
        assert_eq!(branches.route(vec![1, 2, 10]).shared, 2);
        assert_eq!(branches.route(vec![5]).shared, 0);
    }
}

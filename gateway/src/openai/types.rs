//! OpenAI's request and response bodies, as they travel over the wire.
//!
//! Requests keep loosely typed fields (`Number`, `Value`) where the gateway checks ranges and shapes
//! itself, so that every violation gets a message naming the parameter and what is allowed.
//! Unknown fields are ignored, with a debug log: clients send many. A known field herd cannot
//! honour gets a 400 naming it.
//!
//! The chat and completions requests spell their shared sampling fields out twice on purpose:
//! `#[serde(flatten)]` would deserialize them through a buffer that loses the field path, and
//! every type error would then stop naming its parameter.

use herd_proto::v1::{FinishReason, TokenLogprob};
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model name or alias.
    pub model: String,
    /// The conversation, oldest first.
    pub messages: Vec<ChatMessageIn>,
    /// Sampling temperature in [0, 2].
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f64>,
    /// Tokens to generate at most (legacy name).
    pub max_tokens: Option<Number>,
    /// Tokens to generate at most; wins over `max_tokens`.
    pub max_completion_tokens: Option<Number>,
    /// A stop string or up to 4 of them.
    pub stop: Option<Value>,
    /// Choices to generate, 1..=16.
    pub n: Option<Number>,
    /// Sampling seed; choice i uses seed + i.
    pub seed: Option<Number>,
    /// In [-2, 2].
    pub presence_penalty: Option<f64>,
    /// In [-2, 2].
    pub frequency_penalty: Option<f64>,
    /// Whether to return each token's log probability.
    pub logprobs: Option<bool>,
    /// Alternatives per token, 0..=20; needs `logprobs`.
    pub top_logprobs: Option<Number>,
    /// The end user, for logs.
    pub user: Option<String>,
    /// Answer with server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// `{"type": "text"}`, `{"type": "json_object"}` (JSON mode) or `{"type": "json_schema",
    /// "json_schema": {"name", "schema", "strict"}}`.
    pub response_format: Option<Value>,
    /// Only an empty list (or absent) is accepted until tool calls land.
    pub tools: Option<Value>,
    /// Only `"none"` (or absent) is accepted until tool calls land.
    pub tool_choice: Option<Value>,
    /// OpenAI's deprecated function calling: refused.
    pub functions: Option<Value>,
    /// OpenAI's deprecated function calling: refused.
    pub function_call: Option<Value>,
    /// Only `["text"]` (or absent) is accepted.
    pub modalities: Option<Value>,
    /// Audio output: refused.
    pub audio: Option<Value>,
    /// Predicted outputs: refused.
    pub prediction: Option<Value>,
    /// Extension: keep only the k most likely tokens (0 or -1 keeps all).
    pub top_k: Option<Number>,
    /// Extension: repetition penalty, > 0 (1 is none).
    pub repetition_penalty: Option<f64>,
    /// Extension (vLLM's): keep generating past EOS, for benchmarks.
    pub ignore_eos: Option<bool>,
    /// Token id (as a string) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<Value>,
    /// Extension (vLLM's): drop tokens less likely than this share of the most likely one, [0, 1].
    pub min_p: Option<f64>,
    /// Extension (vLLM's): token ids that end the answer besides EOS.
    pub stop_token_ids: Option<Value>,
    /// Extension (vLLM's): tokens to generate before EOS or a stop may end the answer.
    pub min_tokens: Option<Number>,
    /// Extension (vLLM's): keep the stop string that ended the answer in its text.
    pub include_stop_str_in_output: Option<bool>,
    /// Extension (vLLM's): leave special tokens out of the text (the default) or write them out.
    pub skip_special_tokens: Option<bool>,
    /// Extension (vLLM's): constrain the output to one of `json` (a schema), `regex` or `grammar`.
    pub structured_outputs: Option<Value>,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// A string or a list of `{"type":"text","text":...}` parts.
    pub content: Option<Value>,
}

/// `stream_options` of a request.
#[derive(Debug, Clone, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with the usage.
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Model name or alias.
    pub model: String,
    /// A string, strings, token ids, or lists of token ids.
    pub prompt: Option<Value>,
    /// Not supported (400 unless empty).
    pub suffix: Option<Value>,
    /// Not supported (400 if true).
    pub echo: Option<bool>,
    /// Only accepted when it asks for nothing beyond `n`.
    pub best_of: Option<Number>,
    /// Completions-style logprobs: alternatives per token, 0..=5.
    pub logprobs: Option<Number>,
    /// Sampling temperature in [0, 2].
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f64>,
    /// Tokens to generate at most (OpenAI's default for this endpoint: 16).
    pub max_tokens: Option<Number>,
    /// A stop string or up to 4 of them.
    pub stop: Option<Value>,
    /// Choices per prompt, 1..=16.
    pub n: Option<Number>,
    /// Sampling seed; choice j of a prompt uses seed + j.
    pub seed: Option<Number>,
    /// In [-2, 2].
    pub presence_penalty: Option<f64>,
    /// In [-2, 2].
    pub frequency_penalty: Option<f64>,
    /// The end user, for logs.
    pub user: Option<String>,
    /// Answer with server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Extension: keep only the k most likely tokens (0 or -1 keeps all).
    pub top_k: Option<Number>,
    /// Extension: repetition penalty, > 0 (1 is none).
    pub repetition_penalty: Option<f64>,
    /// Extension (vLLM's): keep generating past EOS, for benchmarks.
    pub ignore_eos: Option<bool>,
    /// Token id (as a string) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<Value>,
    /// Extension (vLLM's): drop tokens less likely than this share of the most likely one, [0, 1].
    pub min_p: Option<f64>,
    /// Extension (vLLM's): token ids that end the answer besides EOS.
    pub stop_token_ids: Option<Value>,
    /// Extension (vLLM's): tokens to generate before EOS or a stop may end the answer.
    pub min_tokens: Option<Number>,
    /// Extension (vLLM's): keep the stop string that ended the answer in its text.
    pub include_stop_str_in_output: Option<bool>,
    /// Extension (vLLM's): leave special tokens out of the text (the default) or write them out.
    pub skip_special_tokens: Option<bool>,
    /// Extension (vLLM's): constrain the output to one of `json` (a schema), `regex` or `grammar`.
    pub structured_outputs: Option<Value>,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageOut {
    /// Prompt tokens, counted once per prompt.
    pub prompt_tokens: u64,
    /// Generated tokens over all choices.
    pub completion_tokens: u64,
    /// The sum of both.
    pub total_tokens: u64,
    /// What the prompt tokens were made of.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of prompt tokens.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens the worker found in its KV cache instead of computing them.
    pub cached_tokens: u64,
}

/// A non-streaming answer: `ChatCompletion` or `Completion`.
#[derive(Debug, Clone, Serialize)]
pub struct Answer<C> {
    /// `chatcmpl-...` or `cmpl-...`.
    pub id: String,
    /// `chat.completion` or `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as requested.
    pub model: String,
    /// One per choice, by index.
    pub choices: Vec<C>,
    /// Token counts.
    pub usage: UsageOut,
}

impl<C> Answer<C> {
    /// An answer with `(id, object, created, model, usage)` around `choices`.
    pub fn new(head: (String, &'static str, u64, String, UsageOut), choices: Vec<C>) -> Self {
        let (id, object, created, model, usage) = head;
        Self { id, object, created, model, choices, usage }
    }
}

/// One streamed chunk: `chat.completion.chunk` or a streamed `text_completion`.
#[derive(Debug, Clone, Serialize)]
pub struct Chunk<C> {
    /// The request's id, the same in every chunk.
    pub id: String,
    /// `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    /// Unix seconds, the same in every chunk.
    pub created: u64,
    /// The model as requested.
    pub model: String,
    /// The choices this chunk advances; empty in the usage chunk.
    pub choices: Vec<C>,
    /// Absent unless `stream_options.include_usage`; then null except in the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

/// One choice of a chat answer.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// The choice's index.
    pub index: u32,
    /// The generated message.
    pub message: AssistantMessage,
    /// Token log probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// Chat-style log probabilities.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// One generated token's log probability and alternatives.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely alternatives.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// One alternative token.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One choice's part of a streamed chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// The choice's index.
    pub index: u32,
    /// What to append.
    pub delta: Delta,
    /// Log probabilities of this chunk's tokens, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the choice's last chunk.
    pub finish_reason: Option<&'static str>,
}

/// The increment of a streamed chat message.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    /// `assistant`, in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Text to append.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One completions choice (or its increment when streaming).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// The generated text (or the increment).
    pub text: String,
    /// `prompt_index * n + j`.
    pub index: u32,
    /// Completions-style log probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; null until the choice's last chunk.
    pub finish_reason: Option<&'static str>,
}

/// Completions-style log probabilities.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    /// The generated tokens.
    pub tokens: Vec<String>,
    /// Each token's log probability.
    pub token_logprobs: Vec<f32>,
    /// Each token's alternatives, token to log probability.
    pub top_logprobs: Vec<TopLogprobMap>,
    /// Each token's character offset in the generated text.
    pub text_offset: Vec<u32>,
}

/// A token-to-logprob object that keeps the worker's order (most likely first) and f32 precision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobMap(pub Vec<(String, f32)>);

impl Serialize for TopLogprobMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut seen = std::collections::HashSet::new();
        let mut map = serializer.serialize_map(None)?;
        for (token, logprob) in &self.0 {
            // JSON objects cannot repeat a key; the first (most likely) entry wins.
            if seen.insert(token.as_str()) {
                map.serialize_entry(token, logprob)?;
            }
        }
        map.end()
    }
}

/// `GET /v1/models` answer.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The served models.
    pub data: Vec<ModelObject>,
}

/// One served model (name or alias).
#[derive(Debug, Clone, Serialize)]
pub struct ModelObject {
    /// The name clients pass as `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// When the gateway first saw it served, unix seconds.
    pub created: u64,
    /// Always `herd`.
    pub owned_by: &'static str,
    /// The context length in tokens, prompt and answer together (vLLM's field): the shortest of
    /// the workers serving it.
    pub max_model_len: u32,
}

/// `GET /health` answer.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// Always `ok` while the gateway serves.
    pub status: &'static str,
    /// Workers in the table.
    pub workers: usize,
}

/// OpenAI's name for a worker's finish reason.
pub fn finish_reason_str(reason: i32) -> &'static str {
    if reason == FinishReason::Length as i32 { "length" } else { "stop" }
}

/// Chat-style log probabilities of some tokens.
pub fn chat_logprobs(items: &[TokenLogprob]) -> ChatLogprobs {
    let content = items
        .iter()
        .map(|lp| ChatTokenLogprob {
            token: lp.token.clone(),
            logprob: lp.logprob,
            bytes: lp.token.as_bytes().to_vec(),
            top_logprobs: lp
                .top
                .iter()
                .map(|t| ChatTopLogprob {
                    token: t.token.clone(),
                    logprob: t.logprob,
                    bytes: t.token.as_bytes().to_vec(),
                })
                .collect(),
        })
        .collect();
    ChatLogprobs { content }
}

/// Completions-style log probabilities of some tokens; `offset` carries the text offset across chunks.
pub fn completion_logprobs(items: &[TokenLogprob], offset: &mut u32) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for lp in items {
        out.tokens.push(lp.token.clone());
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(TopLogprobMap(lp.top.iter().map(|t| (t.token.clone(), t.logprob)).collect()));
        out.text_offset.push(*offset);
        *offset += lp.token.chars().count() as u32;
    }
    out
}

/// Usage over choices: `(prompt_index, (prompt, completion, cached prompt) tokens)` each;
/// prompts count once, with the most any of their choices found cached.
pub fn total_usage(choices: impl IntoIterator<Item = (usize, (u32, u32, u32))>) -> UsageOut {
    let mut prompts: std::collections::BTreeMap<usize, (u32, u32)> = std::collections::BTreeMap::new();
    let mut completion = 0u64;
    for (prompt, (prompt_tokens, completion_tokens, cached)) in choices {
        let seen = prompts.entry(prompt).or_default();
        *seen = (seen.0.max(prompt_tokens), seen.1.max(cached));
        completion += u64::from(completion_tokens);
    }
    let prompt: u64 = prompts.values().map(|&(p, _)| u64::from(p)).sum();
    let cached_tokens = prompts.values().map(|&(_, c)| u64::from(c)).sum();
    UsageOut {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails { cached_tokens },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::v1::TopLogprob;
    use serde_json::json;

    fn lp(token: &str, logprob: f32, top: &[(&str, f32)]) -> TokenLogprob {
        TokenLogprob {
            token: token.into(),
            logprob,
            top: top.iter().map(|(t, l)| TopLogprob { token: (*t).into(), logprob: *l }).collect(),
        }
    }

    #[test]
    fn chat_logprobs_format() {
        let v = serde_json::to_value(chat_logprobs(&[lp("é", -0.5, &[("é", -0.5), ("e", -1.25)])])).unwrap();
        assert_eq!(
            v,
            json!({"content": [{"token": "é", "logprob": -0.5, "bytes": [195, 169],
                "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                                 {"token": "e", "logprob": -1.25, "bytes": [101]}]}]})
        );
    }

    #[test]
    fn completion_logprobs_offsets_carry_over() {
        let mut offset = 0;
        let a = completion_logprobs(&[lp("Hé", -0.5, &[("Hé", -0.5)]), lp("llo", -0.25, &[])], &mut offset);
        let b = completion_logprobs(&[lp("!", -2.0, &[])], &mut offset);
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            json!({"tokens": ["Hé", "llo"], "token_logprobs": [-0.5, -0.25],
                   "top_logprobs": [{"Hé": -0.5}, {}], "text_offset": [0, 2]})
        );
        assert_eq!(b.text_offset, vec![5]);
    }

    #[test]
    fn usage_counts_each_prompt_once() {
        let u = total_usage([(0, (10, 3, 0)), (0, (10, 4, 9)), (1, (7, 1, 6))]);
        let details = PromptTokensDetails { cached_tokens: 15 };
        let want =
            UsageOut { prompt_tokens: 17, completion_tokens: 8, total_tokens: 25, prompt_tokens_details: details };
        assert_eq!(u, want);
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(finish_reason_str(FinishReason::Stop as i32), "stop");
        assert_eq!(finish_reason_str(FinishReason::Length as i32), "length");
        assert_eq!(finish_reason_str(0), "stop");
    }

    #[test]
    fn chunk_usage_field_is_absent_null_or_set() {
        let mut chunk = Chunk::<ChatChunkChoice> {
            id: "x".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            choices: vec![],
            usage: None,
        };
        assert!(serde_json::to_value(&chunk).unwrap().get("usage").is_none());
        chunk.usage = Some(None);
        assert_eq!(serde_json::to_value(&chunk).unwrap()["usage"], Value::Null);
        chunk.usage =
            Some(Some(UsageOut { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3, ..Default::default() }));
        assert_eq!(serde_json::to_value(&chunk).unwrap()["usage"]["total_tokens"], 3);
    }
}

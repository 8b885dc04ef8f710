//! `POST /tokenize` and `POST /detokenize` (vLLM's): a prompt's token ids as a worker of the
//! model encodes it for generation, and the text of token ids.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use herd_proto::v1::{ChatInput, CountTokensRequest, DetokenizeRequest, count_tokens_request};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::handlers::{new_request_id, read_json};
use super::params::{chat_messages, parse_json, require_model, token_ids};
use super::types::ChatMessageIn;
use crate::dispatch::Ctx;
use crate::{AppState, GatewayError};

/// `POST /tokenize` body: `prompt` (text, encoded as is) or `messages` (rendered with the chat
/// template, as for a chat completion).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    /// Model name or alias.
    pub model: String,
    /// Text to encode.
    pub prompt: Option<String>,
    /// A conversation to render and encode.
    pub messages: Option<Vec<ChatMessageIn>>,
}

/// `POST /tokenize` answer.
#[derive(Debug, Serialize)]
pub struct TokenizeAnswer {
    /// How many tokens.
    pub count: u32,
    /// The model's context length.
    pub max_model_len: u32,
    /// The token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` body.
#[derive(Debug, Deserialize)]
pub struct DetokenizeBody {
    /// Model name or alias.
    pub model: String,
    /// Token ids.
    pub tokens: Vec<Value>,
}

/// `POST /detokenize` answer.
#[derive(Debug, Serialize)]
pub struct DetokenizeAnswer {
    /// The ids' text, special tokens written out.
    pub prompt: String,
}

/// The context of a call for `model`, under the client's request id or a new one.
fn ctx(state: &AppState, model: String, request_id: Option<String>) -> Ctx {
    let request_id = request_id.unwrap_or_else(|| new_request_id("tok"));
    Ctx::new(state, model, request_id, "prompt", std::time::Instant::now())
}

/// `POST /tokenize`.
pub async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<TokenizeAnswer>, GatewayError> {
    let (bytes, request_id) = read_json(&state, &headers, body).await?;
    let req: TokenizeRequest = parse_json(&bytes)?;
    let model = require_model(&req.model)?;
    let input = match (req.prompt, req.messages) {
        (Some(text), None) => count_tokens_request::Input::Text(text),
        (None, Some(messages)) => count_tokens_request::Input::Chat(ChatInput { messages: chat_messages(&messages)? }),
        _ => return Err(GatewayError::invalid("prompt", "give exactly one of `prompt` and `messages`")),
    };
    let call = CountTokensRequest { model: model.clone(), input: Some(input), with_ids: true };
    let answer = ctx(&state, model, request_id)
        .unary(|mut client, metadata| {
            let request = tonic::Request::from_parts(metadata, Default::default(), call.clone());
            async move { client.count_tokens(request).await }
        })
        .await?;
    Ok(Json(TokenizeAnswer { count: answer.tokens, max_model_len: answer.context_length, tokens: answer.ids }))
}

/// `POST /detokenize`.
pub async fn detokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<DetokenizeAnswer>, GatewayError> {
    let (bytes, request_id) = read_json(&state, &headers, body).await?;
    let req: DetokenizeBody = parse_json(&bytes)?;
    let model = require_model(&req.model)?;
    let call = DetokenizeRequest { model: model.clone(), ids: token_ids(&req.tokens, "tokens")? };
    let answer = ctx(&state, model, request_id)
        .unary(|mut client, metadata| {
            let request = tonic::Request::from_parts(metadata, Default::default(), call.clone());
            async move { client.detokenize(request).await }
        })
        .await?;
    Ok(Json(DetokenizeAnswer { prompt: answer.text }))
}

//! Request validation: JSON bytes in, a checked [`Plan`] of worker requests out (or a 400 naming the parameter).

use std::collections::HashMap;

use herd_proto::v1::generate_request::Input;
use herd_proto::v1::output_constraint::Kind;
use herd_proto::v1::{ChatInput, ChatMessage, GenerateRequest, OutputConstraint, Sampling, TokenIds};
use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

use super::types::{ChatCompletionRequest, ChatMessageIn, CompletionRequest, StreamOptions};
use crate::GatewayError;

/// Most choices per prompt.
pub const MAX_N: i64 = 16;
/// Most choices one completions request may fan out to (prompts × n).
pub const MAX_CHOICES: usize = 128;
/// Most stop strings.
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes: each is kept and matched per choice, so unbounded ones cost
/// memory and time on the gateway and the worker alike.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most chat alternatives per token.
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// Most tokens a `logit_bias` may name.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Most `stop_token_ids`.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// Most completions-style alternatives per token.
pub const MAX_COMPLETION_LOGPROBS: i64 = 5;
/// OpenAI's `max_tokens` default for `/v1/completions`.
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

/// Which endpoint a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

impl Api {
    /// Prefix of the request id.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Api::Chat => "chatcmpl",
            Api::Completion => "cmpl",
        }
    }

    /// The parameter blamed when the prompt does not fit the context.
    pub fn prompt_param(self) -> &'static str {
        match self {
            Api::Chat => "messages",
            Api::Completion => "prompt",
        }
    }
}

/// One choice to generate: its place in the response and its worker request.
#[derive(Debug, Clone)]
pub struct ChoicePlan {
    /// `index` in the response (`prompt_index * n + j` for completions).
    pub index: u32,
    /// Which prompt it answers (always 0 for chat).
    pub prompt_index: usize,
    /// What to send to the worker.
    pub request: GenerateRequest,
}

/// A validated request, ready to dispatch.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The endpoint.
    pub api: Api,
    /// The model as requested.
    pub model: String,
    /// Every choice, in index order.
    pub choices: Vec<ChoicePlan>,
    /// Answer with server-sent events.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// Render log probabilities.
    pub logprobs: bool,
    /// The end user, for logs.
    pub user: Option<String>,
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid(param, message)
}

/// Parses JSON into `T`, turning a type error into a 400 that names the parameter's path.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut ignored = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| ignored.push(path.to_string());
    let value: T =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(&mut de, &mut note)).map_err(data_error)?;
    de.end().map_err(|err| syntax_error(&err))?;
    if !ignored.is_empty() {
        tracing::debug!(fields = ?ignored, "ignored request fields herd does not know");
    }
    Ok(value)
}

/// serde_json's message without the position it appends, which means nothing beyond the path.
fn bare_message(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

fn syntax_error(err: &serde_json::Error) -> GatewayError {
    GatewayError::InvalidRequest {
        message: format!("We could not parse the JSON body of your request: {}", bare_message(err)),
        param: None,
        code: None,
    }
}

fn data_error(err: serde_path_to_error::Error<serde_json::Error>) -> GatewayError {
    use serde_json::error::Category;
    let inner = err.inner();
    if !matches!(inner.classify(), Category::Data) {
        return syntax_error(inner);
    }
    let text = bare_message(inner);
    let path = err.path().to_string();
    // serde accepts a struct written as an array; a path starting at an index means the body was one.
    let path = (path != "." && !path.starts_with('[')).then_some(path);
    let missing = text.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`'));
    match (missing, path) {
        (Some(field), path) => {
            // serde reports a missing field at its parent; name the field itself.
            let param = match path {
                Some(path) => format!("{path}.{field}"),
                None => field.to_string(),
            };
            invalid(param.clone(), format!("`{param}` is required"))
        }
        (None, Some(path)) => invalid(path.clone(), format!("invalid value for `{path}`: {text}")),
        (None, None) => GatewayError::InvalidRequest {
            message: format!("the request body must be a JSON object: {text}"),
            param: None,
            code: None,
        },
    }
}

/// An integer parameter within `[min, max]`.
fn int_param(name: &str, value: Option<&Number>, min: i64, max: i64) -> Result<Option<i64>, GatewayError> {
    let Some(value) = value else { return Ok(None) };
    let range = || invalid(name, format!("`{name}` must be an integer between {min} and {max}, got {value}"));
    match value.as_i64() {
        Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
        Some(_) => Err(range()),
        None if value.is_u64() => Err(range()),
        None => Err(invalid(name, format!("`{name}` must be an integer between {min} and {max}, got {value}"))),
    }
}

fn float_in(name: &str, value: Option<f64>, min: f64, max: f64) -> Result<Option<f64>, GatewayError> {
    match value {
        Some(v) if !(min..=max).contains(&v) => {
            Err(invalid(name, format!("`{name}` must be between {min} and {max}, got {v}")))
        }
        other => Ok(other),
    }
}

fn stop_param(value: Option<&Value>) -> Result<Vec<String>, GatewayError> {
    let shape = || invalid("stop", format!("`stop` must be a string or an array of at most {MAX_STOP} strings"));
    let stops = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(invalid(
                    "stop",
                    format!("`stop` must be a string or an array of at most {MAX_STOP} strings, got {}", items.len()),
                ));
            }
            let mut stops = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => stops.push(s.clone()),
                    _ => return Err(invalid(format!("stop[{i}]"), format!("`stop[{i}]` must be a string"))),
                }
            }
            stops
        }
        Some(_) => return Err(shape()),
    };
    if let Some((i, long)) = stops.iter().enumerate().find(|(_, s)| s.len() > MAX_STOP_BYTES) {
        let param = if matches!(value, Some(Value::Array(_))) { format!("stop[{i}]") } else { "stop".into() };
        return Err(invalid(
            param,
            format!("a stop string may be at most {MAX_STOP_BYTES} bytes long, got {}", long.len()),
        ));
    }
    // An empty stop string would match everywhere; treat it as no stop.
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

/// `logit_bias`: token ids (as strings, OpenAI's spelling) to biases in [-100, 100].
fn logit_bias_param(value: Option<&Value>) -> Result<HashMap<u32, f32>, GatewayError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(HashMap::new()),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(invalid("logit_bias", "`logit_bias` must be an object of token ids to biases")),
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(invalid(
            "logit_bias",
            format!("`logit_bias` may name at most {MAX_LOGIT_BIAS} tokens, got {}", map.len()),
        ));
    }
    map.iter()
        .map(|(key, bias)| {
            let id = key
                .trim()
                .parse::<u32>()
                .map_err(|_| invalid("logit_bias", format!("`logit_bias` keys must be token ids, got {key:?}")))?;
            match bias.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(invalid(
                    "logit_bias",
                    format!("`logit_bias` of token {key} must be a number between -100 and 100, got {bias}"),
                )),
            }
        })
        .collect()
}

/// `stop_token_ids`: at most [`MAX_STOP_TOKEN_IDS`] token ids.
fn stop_token_ids_param(value: Option<&Value>) -> Result<Vec<u32>, GatewayError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) if items.len() <= MAX_STOP_TOKEN_IDS => token_ids(items, "stop_token_ids"),
        Some(Value::Array(items)) => Err(invalid(
            "stop_token_ids",
            format!("`stop_token_ids` may hold at most {MAX_STOP_TOKEN_IDS} token ids, got {}", items.len()),
        )),
        Some(_) => Err(invalid("stop_token_ids", "`stop_token_ids` must be an array of token ids")),
    }
}

/// The sampling parameters both endpoints share, unchecked.
struct CommonIn<'a> {
    temperature: Option<f64>,
    top_p: Option<f64>,
    stop: Option<&'a Value>,
    n: Option<&'a Number>,
    seed: Option<&'a Number>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    top_k: Option<&'a Number>,
    repetition_penalty: Option<f64>,
    stream: Option<bool>,
    stream_options: Option<&'a StreamOptions>,
    logit_bias: Option<&'a Value>,
    min_p: Option<f64>,
    stop_token_ids: Option<&'a Value>,
    min_tokens: Option<&'a Number>,
    include_stop_str_in_output: Option<bool>,
    skip_special_tokens: Option<bool>,
    structured_outputs: Option<&'a Value>,
}

/// The shared parameters, checked.
struct Common {
    sampling: Sampling,
    seed: Option<u64>,
    stop: Vec<String>,
    n: u32,
    stream: bool,
    include_usage: bool,
    stop_token_ids: Vec<u32>,
    min_tokens: u32,
    include_stop_str_in_output: bool,
    skip_special_tokens: bool,
    constraint: Option<OutputConstraint>,
}

fn common(c: CommonIn<'_>) -> Result<Common, GatewayError> {
    let temperature = float_in("temperature", c.temperature, 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = match c.top_p {
        Some(v) if !(v > 0.0 && v <= 1.0) => {
            return Err(invalid("top_p", format!("`top_p` must be greater than 0 and at most 1, got {v}")));
        }
        other => other.unwrap_or(1.0),
    };
    let presence_penalty = float_in("presence_penalty", c.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty = float_in("frequency_penalty", c.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let repetition_penalty = match c.repetition_penalty {
        Some(v) if !(v > 0.0 && v.is_finite()) => {
            return Err(invalid("repetition_penalty", format!("`repetition_penalty` must be greater than 0, got {v}")));
        }
        other => other.unwrap_or(1.0),
    };
    // -1 is vLLM's and FastChat's "off", like 0.
    let top_k = int_param("top_k", c.top_k, -1, i64::from(u32::MAX))?.unwrap_or(0).max(0) as u32;
    let min_p = float_in("min_p", c.min_p, 0.0, 1.0)?.unwrap_or(0.0);
    let logit_bias = logit_bias_param(c.logit_bias)?;
    let stop_token_ids = stop_token_ids_param(c.stop_token_ids)?;
    let min_tokens = int_param("min_tokens", c.min_tokens, 0, i64::from(u32::MAX))?.unwrap_or(0) as u32;
    let n = int_param("n", c.n, 1, MAX_N)?.unwrap_or(1) as u32;
    let seed = match c.seed {
        None => None,
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => Some(u),
            // Negative seeds are fine as long as they are deterministic.
            (None, Some(i)) => Some(i as u64),
            _ => return Err(invalid("seed", format!("`seed` must be an integer, got {v}"))),
        },
    };
    let stop = stop_param(c.stop)?;
    let stream = c.stream.unwrap_or(false);
    let include_usage = stream && c.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let sampling = Sampling {
        temperature: temperature as f32,
        // A positive top_p that f32 rounds to 0 would read as unset (1); the smallest one keeps
        // just the top token, as asked.
        top_p: (top_p as f32).max(f32::MIN_POSITIVE),
        top_k,
        repetition_penalty: repetition_penalty as f32,
        presence_penalty: presence_penalty as f32,
        frequency_penalty: frequency_penalty as f32,
        seed: None,
        min_p: min_p as f32,
        logit_bias,
    };
    Ok(Common {
        sampling,
        seed,
        stop,
        n,
        stream,
        include_usage,
        stop_token_ids,
        min_tokens,
        include_stop_str_in_output: c.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
        constraint: structured_outputs(c.structured_outputs)?,
    })
}

pub(crate) fn require_model(model: &str) -> Result<String, GatewayError> {
    if model.is_empty() {
        return Err(invalid("model", "`model` must be a non-empty string naming a served model"));
    }
    Ok(model.to_string())
}

fn max_tokens_param(name: &str, value: Option<&Number>) -> Result<Option<u32>, GatewayError> {
    Ok(int_param(name, value, 1, i64::from(u32::MAX))?.map(|v| v as u32))
}

/// The text of one chat message's `content`.
fn message_text(i: usize, role: &str, content: Option<&Value>) -> Result<String, GatewayError> {
    let param = format!("messages[{i}].content");
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        // An assistant turn that only called tools has no content.
        None | Some(Value::Null) if role == "assistant" => Ok(String::new()),
        None | Some(Value::Null) => Err(invalid(param.clone(), format!("`{param}` is required"))),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text")) {
                    (Some("text"), Some(Value::String(text))) => texts.push(text.as_str()),
                    (Some("text"), _) => {
                        return Err(invalid(param.clone(), format!("`{param}[{j}].text` must be a string")));
                    }
                    (Some(other), _) => {
                        return Err(invalid(
                            param.clone(),
                            format!(
                                "unsupported content part type {other:?} in `{param}[{j}]`; only \"text\" parts are supported"
                            ),
                        ));
                    }
                    (None, _) => {
                        return Err(invalid(
                            param.clone(),
                            format!("`{param}[{j}]` must be an object with \"type\": \"text\" and a \"text\" string"),
                        ));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(invalid(param.clone(), format!("`{param}` must be a string or an array of text parts"))),
    }
}

/// The parameters chat and completions requests share, which both spell the same way.
macro_rules! common_in {
    ($req:expr) => {
        CommonIn {
            temperature: $req.temperature,
            top_p: $req.top_p,
            stop: $req.stop.as_ref(),
            n: $req.n.as_ref(),
            seed: $req.seed.as_ref(),
            presence_penalty: $req.presence_penalty,
            frequency_penalty: $req.frequency_penalty,
            top_k: $req.top_k.as_ref(),
            repetition_penalty: $req.repetition_penalty,
            stream: $req.stream,
            stream_options: $req.stream_options.as_ref(),
            logit_bias: $req.logit_bias.as_ref(),
            min_p: $req.min_p,
            stop_token_ids: $req.stop_token_ids.as_ref(),
            min_tokens: $req.min_tokens.as_ref(),
            include_stop_str_in_output: $req.include_stop_str_in_output,
            skip_special_tokens: $req.skip_special_tokens,
            structured_outputs: $req.structured_outputs.as_ref(),
        }
    };
}

/// The checked messages of a chat: roles named as templates know them, contents as text.
pub(crate) fn chat_messages(input: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, GatewayError> {
    if input.is_empty() {
        return Err(invalid("messages", "`messages` must contain at least one message"));
    }
    let mut messages = Vec::with_capacity(input.len());
    for (i, m) in input.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "invalid role {other:?} in `messages[{i}].role`; expected one of system, developer, user, assistant"
                    ),
                ));
            }
        };
        let content = message_text(i, role, m.content.as_ref())?;
        messages.push(ChatMessage { role: role.to_string(), content });
    }
    Ok(messages)
}

/// Validates a chat request body.
pub fn parse_chat(body: &[u8]) -> Result<Plan, GatewayError> {
    let req: ChatCompletionRequest = parse_json(body)?;
    let model = require_model(&req.model)?;
    refuse_unsupported(&req)?;
    let messages = chat_messages(&req.messages)?;
    let mut common = common(common_in!(req))?;
    if let Some(format) = response_format(req.response_format.as_ref())? {
        if common.constraint.is_some() {
            return Err(invalid("response_format", "give `response_format` or `structured_outputs`, not both"));
        }
        common.constraint = Some(format);
    }
    let max_tokens = max_tokens_param("max_tokens", req.max_tokens.as_ref())?;
    let max_completion_tokens = max_tokens_param("max_completion_tokens", req.max_completion_tokens.as_ref())?;
    check_min_tokens(&common, max_completion_tokens.or(max_tokens))?;
    let logprobs = req.logprobs.unwrap_or(false);
    let top_logprobs = int_param("top_logprobs", req.top_logprobs.as_ref(), 0, MAX_TOP_LOGPROBS)?;
    if top_logprobs.is_some() && !logprobs {
        return Err(invalid("top_logprobs", "`top_logprobs` requires `logprobs` to be true"));
    }
    let base = GenerateRequest {
        model: model.clone(),
        input: Some(Input::Chat(ChatInput { messages })),
        sampling: None,
        max_tokens: max_completion_tokens.or(max_tokens),
        ignore_eos: req.ignore_eos.unwrap_or(false),
        logprobs: logprobs.then(|| top_logprobs.unwrap_or(0) as u32),
        ..GenerateRequest::default()
    };
    let choices = (0..common.n)
        .map(|j| ChoicePlan { index: j, prompt_index: 0, request: with_seed(&base, &common, j) })
        .collect();
    Ok(Plan {
        api: Api::Chat,
        model,
        choices,
        stream: common.stream,
        include_usage: common.include_usage,
        logprobs,
        user: req.user,
    })
}

/// `base` with the shared parameters and the sampling of choice `j`: seed + j, so that n choices
/// differ yet stay reproducible.
fn with_seed(base: &GenerateRequest, common: &Common, j: u32) -> GenerateRequest {
    let mut sampling = common.sampling.clone();
    sampling.seed = common.seed.map(|s| s.wrapping_add(u64::from(j)));
    GenerateRequest {
        sampling: Some(sampling),
        stop: common.stop.clone(),
        stop_token_ids: common.stop_token_ids.clone(),
        min_tokens: common.min_tokens,
        include_stop_str_in_output: common.include_stop_str_in_output,
        keep_special_tokens: !common.skip_special_tokens,
        constraint: common.constraint.clone(),
        ..base.clone()
    }
}

/// Refuses `min_tokens` above the `max_tokens` asked for (beyond the context the worker refuses).
fn check_min_tokens(common: &Common, max_tokens: Option<u32>) -> Result<(), GatewayError> {
    match max_tokens {
        Some(max) if common.min_tokens > max => Err(invalid(
            "min_tokens",
            format!("`min_tokens` ({}) must be at most `max_tokens` ({max})", common.min_tokens),
        )),
        _ => Ok(()),
    }
}

/// Longest JSON schema, regex or grammar a request may carry, in bytes (compiled per request).
pub const MAX_CONSTRAINT_BYTES: usize = 256 << 10;

/// The output constraint of OpenAI's `response_format`: JSON mode, or a JSON schema.
fn response_format(value: Option<&Value>) -> Result<Option<OutputConstraint>, GatewayError> {
    let kind = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(format)) => format,
        Some(_) => return Err(invalid("response_format", "`response_format` must be an object with a `type`")),
    };
    match kind.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputConstraint { kind: Some(Kind::JsonObject(true)) })),
        Some("json_schema") => {
            let schema = kind.get("json_schema").and_then(|s| s.get("schema"));
            match schema {
                Some(schema @ Value::Object(_)) => {
                    Ok(Some(constraint_of(Kind::JsonSchema(schema.to_string()), "response_format")?))
                }
                _ => Err(invalid(
                    "response_format.json_schema.schema",
                    "`response_format.json_schema.schema` must be a JSON schema object",
                )),
            }
        }
        _ => Err(invalid(
            "response_format",
            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// vLLM's `structured_outputs` extension: exactly one of `json` (a schema), `regex` or `grammar`
/// (Lark).
fn structured_outputs(value: Option<&Value>) -> Result<Option<OutputConstraint>, GatewayError> {
    let param = "structured_outputs";
    let fields = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(fields)) => fields,
        Some(_) => return Err(invalid(param, "`structured_outputs` must be an object")),
    };
    let given: Vec<(&String, &Value)> = fields.iter().filter(|(_, v)| !v.is_null()).collect();
    let kind = match given.as_slice() {
        [(name, Value::Object(_))] if name.as_str() == "json" => Kind::JsonSchema(given[0].1.to_string()),
        [(name, Value::String(rx))] if name.as_str() == "regex" => Kind::Regex(rx.clone()),
        [(name, Value::String(lark))] if name.as_str() == "grammar" => Kind::Lark(lark.clone()),
        _ => {
            return Err(invalid(
                param,
                "`structured_outputs` takes exactly one of `json` (a schema object), `regex` or `grammar` (a string)",
            ));
        }
    };
    Ok(Some(constraint_of(kind, param)?))
}

/// A constraint of at most [`MAX_CONSTRAINT_BYTES`].
fn constraint_of(kind: Kind, param: &str) -> Result<OutputConstraint, GatewayError> {
    let bytes = match &kind {
        Kind::JsonSchema(text) | Kind::Regex(text) | Kind::Lark(text) => text.len(),
        Kind::JsonObject(_) => 0,
    };
    if bytes > MAX_CONSTRAINT_BYTES {
        return Err(invalid(
            param,
            format!("an output constraint may be at most {MAX_CONSTRAINT_BYTES} bytes, got {bytes}"),
        ));
    }
    Ok(OutputConstraint { kind: Some(kind) })
}

/// Refuses the chat fields herd knows but cannot honour yet, rather than answering as if they
/// were not there.
fn refuse_unsupported(req: &ChatCompletionRequest) -> Result<(), GatewayError> {
    let absent = |v: &Option<Value>| matches!(v, None | Some(Value::Null));
    if !absent(&req.tools) && req.tools.as_ref().and_then(Value::as_array).is_none_or(|t| !t.is_empty()) {
        return Err(invalid("tools", "`tools` is not supported: herd does not call tools yet"));
    }
    if !absent(&req.tool_choice) && req.tool_choice.as_ref().and_then(Value::as_str) != Some("none") {
        return Err(invalid(
            "tool_choice",
            "`tool_choice` is not supported beyond \"none\": herd does not call tools yet",
        ));
    }
    for (name, value) in [
        ("functions", &req.functions),
        ("function_call", &req.function_call),
        ("audio", &req.audio),
        ("prediction", &req.prediction),
    ] {
        if !absent(value) {
            return Err(invalid(name, format!("`{name}` is not supported")));
        }
    }
    match &req.modalities {
        None | Some(Value::Null) => {}
        Some(Value::Array(m)) if m.iter().all(|m| m == "text") => {}
        Some(_) => return Err(invalid("modalities", "`modalities` may only ask for [\"text\"]")),
    }
    Ok(())
}

/// A list of token ids at `path` (e.g. `prompt` or `prompt[2]`), each naming itself when invalid.
pub(crate) fn token_ids(list: &[Value], path: &str) -> Result<Vec<u32>, GatewayError> {
    list.iter()
        .enumerate()
        .map(|(k, v)| {
            v.as_u64().filter(|&t| t <= u64::from(u32::MAX)).map(|t| t as u32).ok_or_else(|| {
                invalid(format!("{path}[{k}]"), format!("`{path}[{k}]` must be a token id between 0 and {}", u32::MAX))
            })
        })
        .collect()
}

/// The prompts of a completions request.
fn prompts(value: Option<&Value>) -> Result<Vec<Input>, GatewayError> {
    let shape =
        "`prompt` must be a string, an array of strings, an array of token ids or an array of arrays of token ids";
    match value {
        None | Some(Value::Null) => Err(invalid("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(vec![Input::Text(s.clone())]),
        Some(Value::Array(items)) if items.is_empty() => Err(invalid("prompt", "`prompt` must not be empty")),
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(Input::Text(s.clone())),
                    _ => {
                        Err(invalid(format!("prompt[{i}]"), format!("`prompt[{i}]` must be a string like the others")))
                    }
                })
                .collect(),
            Value::Number(_) => Ok(vec![Input::TokenIds(TokenIds { ids: token_ids(items, "prompt")? })]),
            Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let Value::Array(list) = v else {
                        return Err(invalid(
                            format!("prompt[{i}]"),
                            format!("`prompt[{i}]` must be an array of token ids"),
                        ));
                    };
                    if list.is_empty() {
                        return Err(invalid(format!("prompt[{i}]"), format!("`prompt[{i}]` must not be empty")));
                    }
                    let ids = token_ids(list, &format!("prompt[{i}]"))?;
                    Ok(Input::TokenIds(TokenIds { ids }))
                })
                .collect(),
            _ => Err(invalid("prompt", shape)),
        },
        Some(_) => Err(invalid("prompt", shape)),
    }
}

/// Validates a completions request body.
pub fn parse_completion(body: &[u8]) -> Result<Plan, GatewayError> {
    let req: CompletionRequest = parse_json(body)?;
    let model = require_model(&req.model)?;
    if req.echo == Some(true) {
        return Err(invalid("echo", "`echo` is not supported"));
    }
    match &req.suffix {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => return Err(invalid("suffix", "`suffix` is not supported")),
    }
    let prompts = prompts(req.prompt.as_ref())?;
    let common = common(common_in!(req))?;
    let best_of = int_param("best_of", req.best_of.as_ref(), 1, MAX_N)?;
    if best_of.is_some_and(|b| b != 1 && b != i64::from(common.n)) {
        return Err(invalid("best_of", "`best_of` is not supported (only `best_of` equal to `n`)"));
    }
    let max_tokens = max_tokens_param("max_tokens", req.max_tokens.as_ref())?.unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS);
    check_min_tokens(&common, Some(max_tokens))?;
    let logprobs = int_param("logprobs", req.logprobs.as_ref(), 0, MAX_COMPLETION_LOGPROBS)?;
    let n = common.n;
    if prompts.len() * n as usize > MAX_CHOICES {
        return Err(invalid(
            "prompt",
            format!("{} prompts × n = {n} would make more than {MAX_CHOICES} choices", prompts.len()),
        ));
    }
    let mut choices = Vec::with_capacity(prompts.len() * n as usize);
    for (p, input) in prompts.into_iter().enumerate() {
        let base = GenerateRequest {
            model: model.clone(),
            input: Some(input),
            sampling: None,
            max_tokens: Some(max_tokens),
            ignore_eos: req.ignore_eos.unwrap_or(false),
            logprobs: logprobs.map(|k| k as u32),
            ..GenerateRequest::default()
        };
        for j in 0..n {
            choices.push(ChoicePlan {
                index: p as u32 * n + j,
                prompt_index: p,
                request: with_seed(&base, &common, j),
            });
        }
    }
    Ok(Plan {
        api: Api::Completion,
        model,
        choices,
        stream: common.stream,
        include_usage: common.include_usage,
        logprobs: logprobs.is_some(),
        user: req.user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_err(body: &str) -> (u16, Option<String>, String) {
        match parse_chat(body.as_bytes()) {
            Ok(_) => panic!("accepted: {body}"),
            Err(e) => (e.status().as_u16(), e.body().error.param, e.to_string()),
        }
    }

    fn completion_err(body: &str) -> (u16, Option<String>, String) {
        match parse_completion(body.as_bytes()) {
            Ok(_) => panic!("accepted: {body}"),
            Err(e) => (e.status().as_u16(), e.body().error.param, e.to_string()),
        }
    }

    const MSG: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

    #[test]
    fn chat_validation_table() {
        // (body, expected param, a fragment of the message)
        let cases: Vec<(String, Option<&str>, &str)> = vec![
            ("".into(), None, "parse the JSON"),
            ("{".into(), None, "parse the JSON"),
            ("[1]".into(), None, "JSON object"),
            (format!(r#"{{"model":"m",{MSG}}} trailing"#), None, "parse the JSON"),
            (format!("{{{MSG}}}"), Some("model"), "`model` is required"),
            (format!(r#"{{"model":5,{MSG}}}"#), Some("model"), "invalid type"),
            (format!(r#"{{"model":"",{MSG}}}"#), Some("model"), "non-empty"),
            (r#"{"model":"m"}"#.into(), Some("messages"), "required"),
            (r#"{"model":"m","messages":[]}"#.into(), Some("messages"), "at least one"),
            (r#"{"model":"m","messages":{}}"#.into(), Some("messages"), "invalid type"),
            (r#"{"model":"m","messages":[{"content":"x"}]}"#.into(), Some("messages[0].role"), "required"),
            (r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#.into(), Some("messages[0].role"), "expected one of"),
            (r#"{"model":"m","messages":[{"role":"user"}]}"#.into(), Some("messages[0].content"), "required"),
            (r#"{"model":"m","messages":[{"role":"user","content":5}]}"#.into(), Some("messages[0].content"), "string or an array"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#.into(),
                Some("messages[1].content"),
                "image_url",
            ),
            (r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}"#.into(), Some("messages[0].content"), "text"),
            (format!(r#"{{"model":"m",{MSG},"temperature":2.5}}"#), Some("temperature"), "between 0 and 2"),
            (format!(r#"{{"model":"m",{MSG},"temperature":-0.1}}"#), Some("temperature"), "between 0 and 2"),
            (format!(r#"{{"model":"m",{MSG},"temperature":"hot"}}"#), Some("temperature"), "invalid type"),
            (format!(r#"{{"model":"m",{MSG},"top_p":0}}"#), Some("top_p"), "greater than 0"),
            (format!(r#"{{"model":"m",{MSG},"top_p":1.01}}"#), Some("top_p"), "at most 1"),
            (format!(r#"{{"model":"m",{MSG},"max_tokens":0}}"#), Some("max_tokens"), "between 1 and 4294967295"),
            (format!(r#"{{"model":"m",{MSG},"max_tokens":4294967296}}"#), Some("max_tokens"), "between 1"),
            (format!(r#"{{"model":"m",{MSG},"max_tokens":18446744073709551615}}"#), Some("max_tokens"), "between 1"),
            (format!(r#"{{"model":"m",{MSG},"max_tokens":1.5}}"#), Some("max_tokens"), "integer"),
            (format!(r#"{{"model":"m",{MSG},"max_tokens":"10"}}"#), Some("max_tokens"), "invalid type"),
            (format!(r#"{{"model":"m",{MSG},"max_completion_tokens":-1}}"#), Some("max_completion_tokens"), "between 1"),
            (format!(r#"{{"model":"m",{MSG},"stop":["a","b","c","d","e"]}}"#), Some("stop"), "at most 4"),
            (format!(r#"{{"model":"m",{MSG},"stop":5}}"#), Some("stop"), "string or an array"),
            (format!(r#"{{"model":"m",{MSG},"stop":["a",1]}}"#), Some("stop[1]"), "must be a string"),
            (format!(r#"{{"model":"m",{MSG},"stop":"{}"}}"#, "x".repeat(1025)), Some("stop"), "at most 1024 bytes"),
            (format!(r#"{{"model":"m",{MSG},"stop":["a","{}"]}}"#, "x".repeat(1025)), Some("stop[1]"), "at most 1024 bytes"),
            (format!(r#"{{"model":"m",{MSG},"n":0}}"#), Some("n"), "between 1 and 16"),
            (format!(r#"{{"model":"m",{MSG},"n":17}}"#), Some("n"), "between 1 and 16"),
            (format!(r#"{{"model":"m",{MSG},"seed":1.5}}"#), Some("seed"), "integer"),
            (format!(r#"{{"model":"m",{MSG},"presence_penalty":2.1}}"#), Some("presence_penalty"), "between -2 and 2"),
            (format!(r#"{{"model":"m",{MSG},"frequency_penalty":-3}}"#), Some("frequency_penalty"), "between -2 and 2"),
            (format!(r#"{{"model":"m",{MSG},"logprobs":1}}"#), Some("logprobs"), "invalid type"),
            (format!(r#"{{"model":"m",{MSG},"top_logprobs":2}}"#), Some("top_logprobs"), "requires `logprobs`"),
            (format!(r#"{{"model":"m",{MSG},"logprobs":true,"top_logprobs":21}}"#), Some("top_logprobs"), "between 0 and 20"),
            (format!(r#"{{"model":"m",{MSG},"stream":"yes"}}"#), Some("stream"), "invalid type"),
            (format!(r#"{{"model":"m",{MSG},"stream_options":{{"include_usage":1}}}}"#), Some("stream_options.include_usage"), "invalid type"),
            (format!(r#"{{"model":"m",{MSG},"top_k":-2}}"#), Some("top_k"), "between -1"),
            (format!(r#"{{"model":"m",{MSG},"min_p":1.5}}"#), Some("min_p"), "between 0 and 1"),
            (format!(r#"{{"model":"m",{MSG},"logit_bias":[1]}}"#), Some("logit_bias"), "an object"),
            (format!(r#"{{"model":"m",{MSG},"logit_bias":{{"the":5}}}}"#), Some("logit_bias"), "token ids, got \"the\""),
            (format!(r#"{{"model":"m",{MSG},"logit_bias":{{"7":-101}}}}"#), Some("logit_bias"), "between -100 and 100"),
            (format!(r#"{{"model":"m",{MSG},"logit_bias":{{"7":"up"}}}}"#), Some("logit_bias"), "between -100 and 100"),
            (format!(r#"{{"model":"m",{MSG},"stop_token_ids":[1,-2]}}"#), Some("stop_token_ids[1]"), "token id"),
            (format!(r#"{{"model":"m",{MSG},"stop_token_ids":3}}"#), Some("stop_token_ids"), "an array"),
            (format!(r#"{{"model":"m",{MSG},"stop_token_ids":[{}]}}"#, ["1"; 65].join(",")), Some("stop_token_ids"), "at most 64"),
            (format!(r#"{{"model":"m",{MSG},"min_tokens":-1}}"#), Some("min_tokens"), "between 0"),
            (format!(r#"{{"model":"m",{MSG},"min_tokens":9,"max_tokens":8}}"#), Some("min_tokens"), "at most `max_tokens` (8)"),
            (format!(r#"{{"model":"m",{MSG},"skip_special_tokens":"no"}}"#), Some("skip_special_tokens"), "invalid type"),
            (format!(r#"{{"model":"m",{MSG},"response_format":{{"type":"xml"}}}}"#), Some("response_format"), "must be \"text\""),
            (format!(r#"{{"model":"m",{MSG},"response_format":{{"type":"json_schema","json_schema":{{"name":"x"}}}}}}"#), Some("response_format.json_schema.schema"), "JSON schema object"),
            (format!(r#"{{"model":"m",{MSG},"structured_outputs":{{"regex":"a+","grammar":"start: \"a\""}}}}"#), Some("structured_outputs"), "exactly one"),
            (format!(r#"{{"model":"m",{MSG},"structured_outputs":{{"json":"not an object"}}}}"#), Some("structured_outputs"), "exactly one"),
            (format!(r#"{{"model":"m",{MSG},"structured_outputs":{{"regex":"a"}},"response_format":{{"type":"json_object"}}}}"#), Some("response_format"), "not both"),
            (format!(r#"{{"model":"m",{MSG},"response_format":"json"}}"#), Some("response_format"), "an object"),
            (format!(r#"{{"model":"m",{MSG},"tools":[{{"type":"function","function":{{"name":"f"}}}}]}}"#), Some("tools"), "not supported"),
            (format!(r#"{{"model":"m",{MSG},"tool_choice":"required"}}"#), Some("tool_choice"), "not supported"),
            (format!(r#"{{"model":"m",{MSG},"functions":[{{"name":"f"}}]}}"#), Some("functions"), "not supported"),
            (format!(r#"{{"model":"m",{MSG},"modalities":["text","audio"]}}"#), Some("modalities"), "[\"text\"]"),
            (format!(r#"{{"model":"m",{MSG},"repetition_penalty":0}}"#), Some("repetition_penalty"), "greater than 0"),
            (format!(r#"{{"model":"m",{MSG},"user":7}}"#), Some("user"), "invalid type"),
        ];
        for (body, param, fragment) in cases {
            let (status, got_param, message) = chat_err(&body);
            assert_eq!(status, 400, "{body}");
            assert_eq!(got_param.as_deref(), param, "{body}: {message}");
            assert!(message.contains(fragment), "{body}: {message:?} lacks {fragment:?}");
        }
        // What clients send that changes nothing herd does is accepted.
        for extra in [
            r#""response_format":{"type":"text"}"#,
            r#""tools":[],"tool_choice":"none","parallel_tool_calls":true"#,
            r#""modalities":["text"],"store":false,"metadata":{"a":"b"},"some_future_field":[1,2]"#,
        ] {
            assert!(parse_chat(format!(r#"{{"model":"m",{MSG},{extra}}}"#).as_bytes()).is_ok(), "{extra}");
        }
        // Invalid UTF-8 is a parse error, not a panic.
        let bad =
            [br#"{"model":"m","messages":[{"role":"user","content":""#.as_slice(), &[0xff, 0xfe], br#""}]}"#].concat();
        assert_eq!(parse_chat(&bad).unwrap_err().status().as_u16(), 400);
    }

    #[test]
    fn chat_plan_is_built_from_defaults_and_params() {
        let plan = parse_chat(
            br#"{"model":"vicuna","messages":[{"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null}],
                "unknown_field":{"x":1},"max_tokens":5,"max_completion_tokens":7,"n":3,"seed":10,
                "stop":"STOP","logprobs":true,"top_logprobs":2,"stream":true,"stream_options":{"include_usage":true},
                "top_k":40,"repetition_penalty":1.1,"user":"u1"}"#,
        )
        .unwrap();
        assert_eq!(plan.api, Api::Chat);
        assert_eq!(plan.model, "vicuna");
        assert!(plan.stream && plan.include_usage && plan.logprobs);
        assert_eq!(plan.user.as_deref(), Some("u1"));
        assert_eq!(plan.choices.len(), 3);
        let r = &plan.choices[2].request;
        assert_eq!(plan.choices[2].index, 2);
        let Some(Input::Chat(chat)) = &r.input else { panic!("not chat") };
        let roles: Vec<_> = chat.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(roles, [("system", "be brief"), ("user", "a\nb"), ("assistant", "")]);
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.stop, ["STOP"]);
        assert_eq!(r.logprobs, Some(2));
        let s = r.sampling.as_ref().unwrap();
        assert_eq!((s.temperature, s.top_p, s.top_k), (1.0, 1.0, 40));
        assert_eq!(s.seed, Some(12));
        assert!((s.repetition_penalty - 1.1).abs() < 1e-6);
        assert_eq!(plan.choices[0].request.sampling.as_ref().unwrap().seed, Some(10));

        // A top_p too small for f32 still means "only the top token", not "unset".
        let plan = parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":1e-300}"#).unwrap();
        assert_eq!(plan.choices[0].request.sampling.as_ref().unwrap().top_p, f32::MIN_POSITIVE);

        let plan = parse_chat(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert!(!plan.stream && !plan.include_usage && !plan.logprobs);
        let r = &plan.choices[0].request;
        assert_eq!((r.max_tokens, r.logprobs), (None, None));
        let s = r.sampling.as_ref().unwrap();
        assert_eq!((s.temperature, s.top_p, s.seed, s.repetition_penalty), (1.0, 1.0, None, 1.0));
        let plan =
            parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":true,"stop":null}"#)
                .unwrap();
        assert_eq!(plan.choices[0].request.logprobs, Some(0));
    }

    #[test]
    fn vllm_fields_reach_every_choice() {
        for api in [Api::Chat, Api::Completion] {
            let input = if api == Api::Chat { MSG } else { r#""prompt":["a","b"]"# };
            let body = format!(
                r#"{{"model":"m",{input},"n":2,"top_k":-1,"min_p":0.05,"logit_bias":{{"15":-100," 7":2.5}},
                "stop_token_ids":[2,9],"min_tokens":3,"max_tokens":20,"include_stop_str_in_output":true,
                "skip_special_tokens":false}}"#
            );
            let plan = if api == Api::Chat { parse_chat(body.as_bytes()) } else { parse_completion(body.as_bytes()) };
            for choice in plan.unwrap().choices {
                let r = choice.request;
                let s = r.sampling.unwrap();
                assert_eq!((s.top_k, s.min_p), (0, 0.05), "-1 turns top-k off");
                assert_eq!(s.logit_bias, HashMap::from([(15, -100.0), (7, 2.5)]));
                assert_eq!((r.stop_token_ids, r.min_tokens), (vec![2, 9], 3));
                assert!(r.include_stop_str_in_output && r.keep_special_tokens);
            }
        }
        let plan = parse_chat(format!(r#"{{"model":"m",{MSG}}}"#).as_bytes()).unwrap();
        let r = &plan.choices[0].request;
        assert!(!r.include_stop_str_in_output && !r.keep_special_tokens, "vLLM's defaults");
        assert_eq!(completion_err(r#"{"model":"m","prompt":"x","min_tokens":17}"#).1.as_deref(), Some("min_tokens"));
    }

    #[test]
    fn output_constraints_travel_to_the_worker() {
        let kind = |body: &str| {
            let plan = parse_chat(format!(r#"{{"model":"m",{MSG},"n":2,{body}}}"#).as_bytes()).unwrap();
            let kinds: Vec<_> =
                plan.choices.iter().map(|c| c.request.constraint.clone().and_then(|c| c.kind)).collect();
            assert_eq!(kinds[0], kinds[1], "every choice is constrained alike");
            kinds[0].clone()
        };
        assert_eq!(kind(r#""response_format":{"type":"text"}"#), None);
        assert_eq!(kind(r#""response_format":{"type":"json_object"}"#), Some(Kind::JsonObject(true)));
        let schema = r#"{"type":"object","properties":{"a":{"type":"integer"}}}"#;
        let Some(Kind::JsonSchema(text)) = kind(&format!(
            r#""response_format":{{"type":"json_schema","json_schema":{{"name":"n","schema":{schema},"strict":true}}}}"#
        )) else {
            panic!("no schema")
        };
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), serde_json::from_str::<Value>(schema).unwrap());
        assert_eq!(kind(r#""structured_outputs":{"regex":"[0-9]+"}"#), Some(Kind::Regex("[0-9]+".into())));
        assert_eq!(
            kind(r#""structured_outputs":{"grammar":"start: \"a\"","json":null}"#),
            Some(Kind::Lark("start: \"a\"".into()))
        );
        let huge = format!(
            r#"{{"model":"m","prompt":"x","structured_outputs":{{"regex":"{}"}}}}"#,
            "a".repeat(MAX_CONSTRAINT_BYTES + 1)
        );
        assert_eq!(completion_err(&huge).1.as_deref(), Some("structured_outputs"));
    }

    #[test]
    fn completion_validation_table() {
        let cases: Vec<(&str, Option<&str>, &str)> = vec![
            (r#"{"model":"m"}"#, Some("prompt"), "required"),
            (r#"{"model":"m","prompt":[]}"#, Some("prompt"), "not be empty"),
            (r#"{"model":"m","prompt":5}"#, Some("prompt"), "must be a string"),
            (r#"{"model":"m","prompt":[{"a":1}]}"#, Some("prompt"), "must be a string"),
            (r#"{"model":"m","prompt":["a",1]}"#, Some("prompt[1]"), "string"),
            (r#"{"model":"m","prompt":[1,-2]}"#, Some("prompt[1]"), "token id"),
            (r#"{"model":"m","prompt":[1,4294967296]}"#, Some("prompt[1]"), "token id"),
            (r#"{"model":"m","prompt":[[1],[]]}"#, Some("prompt[1]"), "not be empty"),
            (r#"{"model":"m","prompt":[[1],[2,"x"]]}"#, Some("prompt[1][1]"), "token id"),
            (r#"{"model":"m","prompt":[[1],2]}"#, Some("prompt[1]"), "array of token ids"),
            (r#"{"model":"m","prompt":"x","echo":true}"#, Some("echo"), "not supported"),
            (r#"{"model":"m","prompt":"x","suffix":"end"}"#, Some("suffix"), "not supported"),
            (r#"{"model":"m","prompt":"x","logprobs":6}"#, Some("logprobs"), "between 0 and 5"),
            (r#"{"model":"m","prompt":"x","logprobs":true}"#, Some("logprobs"), "invalid type"),
            (r#"{"model":"m","prompt":"x","best_of":3}"#, Some("best_of"), "not supported"),
            (r#"{"model":"m","prompt":"x","max_tokens":0}"#, Some("max_tokens"), "between 1"),
            (r#"{"model":"m","prompt":"x","temperature":3}"#, Some("temperature"), "between 0 and 2"),
            (r#"{"prompt":"x"}"#, Some("model"), "required"),
        ];
        for (body, param, fragment) in cases {
            let (status, got_param, message) = completion_err(body);
            assert_eq!(status, 400, "{body}");
            assert_eq!(got_param.as_deref(), param, "{body}: {message}");
            assert!(message.contains(fragment), "{body}: {message:?} lacks {fragment:?}");
        }
    }

    #[test]
    fn completion_prompts_and_indices() {
        let plan =
            parse_completion(br#"{"model":"m","prompt":["a","b"],"n":2,"seed":5,"echo":false,"suffix":null}"#).unwrap();
        let got: Vec<_> =
            plan.choices.iter().map(|c| (c.index, c.prompt_index, c.request.sampling.as_ref().unwrap().seed)).collect();
        assert_eq!(got, [(0, 0, Some(5)), (1, 0, Some(6)), (2, 1, Some(5)), (3, 1, Some(6))]);
        assert!(matches!(&plan.choices[2].request.input, Some(Input::Text(t)) if t == "b"));
        assert_eq!(plan.choices[0].request.max_tokens, Some(DEFAULT_COMPLETION_MAX_TOKENS));
        let plan = parse_completion(br#"{"model":"m","prompt":[1,2,3],"logprobs":0,"max_tokens":9}"#).unwrap();
        assert_eq!(plan.choices.len(), 1);
        assert!(plan.logprobs);
        assert_eq!(plan.choices[0].request.logprobs, Some(0));
        assert_eq!(plan.choices[0].request.max_tokens, Some(9));
        assert!(matches!(&plan.choices[0].request.input, Some(Input::TokenIds(t)) if t.ids == [1, 2, 3]));
        let plan = parse_completion(br#"{"model":"m","prompt":[[1],[2,3]]}"#).unwrap();
        assert_eq!(plan.choices.len(), 2);
        assert_eq!(plan.choices[1].prompt_index, 1);
    }
}

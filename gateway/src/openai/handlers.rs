//! The HTTP handlers: parse, validate, dispatch each choice to a worker, answer in OpenAI's format.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::future::try_join_all;
use futures::{FutureExt, StreamExt};
use rand::Rng;
use rand::distr::Alphanumeric;
use tracing::{Instrument, info, info_span, warn};

use super::params::{Api, Plan, parse_chat, parse_completion};
use super::sse::{self, StreamMeta};
use super::types::{
    Answer, AssistantMessage, ChatChoice, CompletionChoice, Health, ModelList, ModelObject, chat_logprobs,
    completion_logprobs, finish_reason_str, total_usage,
};
use crate::auth::Account;
use crate::dispatch::{Attempts, Ctx};
use crate::metrics::since;
use crate::router::unix_now;
use crate::{AppState, GatewayError};

/// A fresh request id such as `chatcmpl-3xY...`.
pub fn new_request_id(prefix: &str) -> String {
    let suffix: String = rand::rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect();
    format!("{prefix}-{suffix}")
}

/// Longest `X-Request-Id` a client may send.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The client's `X-Request-Id`, if it sent one: kept for logs, the worker and the answer's
/// header. Refused unless it is 1 to [`MAX_REQUEST_ID_BYTES`] printable ASCII characters, so
/// that it cannot forge log lines or grow without bound.
fn client_request_id(headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
    let Some(value) = headers.get("x-request-id") else { return Ok(None) };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_REQUEST_ID_BYTES || !bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(GatewayError::invalid(
            "x-request-id",
            format!("the X-Request-Id header must be 1 to {MAX_REQUEST_ID_BYTES} printable ASCII characters"),
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// Most bytes of an oversized body read (and discarded) before answering 413.
const DRAIN_CAP: usize = 64 << 20;

/// Reads the body up to `--max-body-bytes`. An oversized body is still read to its end (up to
/// [`DRAIN_CAP`]) before the 413 goes out: closing a socket with unread data resets the
/// connection, and the client would see a network error instead of the answer.
async fn body_bytes(state: &AppState, body: Body) -> Result<Vec<u8>, GatewayError> {
    let limit = state.settings.max_body_bytes;
    let mut frames = body.into_data_stream();
    let (mut kept, mut seen) = (Vec::new(), 0usize);
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|e| GatewayError::InvalidRequest {
            message: format!("could not read the request body: {e}"),
            param: None,
            code: None,
        })?;
        seen += frame.len();
        if seen <= limit {
            kept.extend_from_slice(&frame);
        } else if seen > limit.saturating_add(DRAIN_CAP) {
            break;
        }
    }
    if seen > limit {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    Ok(kept)
}

/// The caller's API-key account, when keys are on.
type Caller = Option<Extension<Account>>;

/// Refuses a body not declared as `application/json` (parameters such as `charset` allowed).
fn require_json(headers: &HeaderMap) -> Result<(), GatewayError> {
    let sent =
        headers.get(axum::http::header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let media = sent.as_deref().map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    if media.as_deref() == Some("application/json") {
        return Ok(());
    }
    Err(GatewayError::UnsupportedMediaType { got: sent.map_or_else(|| "none".into(), |v| format!("{v:?}")) })
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    serve_json(state, (caller, &headers), body, parse_chat).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    serve_json(state, (caller, &headers), body, parse_completion).await
}

/// Reads a JSON body within `--body-timeout`, with the client's `X-Request-Id` if it sent one.
pub(crate) async fn read_json(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<u8>, Option<String>), GatewayError> {
    require_json(headers)?;
    let request_id = client_request_id(headers)?;
    let limit = state.settings.deadlines.body;
    let bytes = tokio::time::timeout(limit, body_bytes(state, body))
        .await
        .map_err(|_| GatewayError::BodyTimeout { after: limit })??;
    Ok((bytes, request_id))
}

/// Reads a JSON body, checks it with `parse` and runs the plan.
async fn serve_json(
    state: AppState,
    (caller, headers): (Caller, &HeaderMap),
    body: Body,
    parse: fn(&[u8]) -> Result<Plan, GatewayError>,
) -> Result<Response, GatewayError> {
    let started = Instant::now();
    let (bytes, request_id) = read_json(&state, headers, body).await?;
    let plan = parse(&bytes)?;
    Ok(execute(state, plan, request_id, (started, caller.map(|Extension(a)| a))).await)
}

/// Runs a validated request under a span carrying its request id (the client's `X-Request-Id`,
/// else the answer's id), which is also sent back as `x-request-id`.
async fn execute(
    state: AppState,
    plan: Plan,
    request_id: Option<String>,
    caller: (Instant, Option<Account>),
) -> Response {
    let id = new_request_id(plan.api.id_prefix());
    let request_id = request_id.unwrap_or_else(|| id.clone());
    let span = info_span!("request", request_id = %request_id, model = %plan.model);
    let header = HeaderValue::from_str(&request_id).ok();
    // Errors become responses inside the span, so their log line carries the request id.
    let mut response = async move {
        generate(state, plan, (id, request_id), caller).await.unwrap_or_else(IntoResponse::into_response)
    }
    .instrument(span)
    .await;
    if let Some(header) = header {
        response.headers_mut().insert("x-request-id", header);
    }
    response
}

/// The most tokens a request's choices may generate: their `max_tokens`, or the model's
/// context length where a choice has none.
fn plan_tokens(plan: &Plan, state: &AppState) -> u64 {
    let context = || u64::from(state.table.context_length(&plan.model).unwrap_or(1));
    plan.choices.iter().map(|c| c.request.max_tokens.map_or_else(context, u64::from)).sum()
}

async fn generate(
    state: AppState,
    plan: Plan,
    (id, request_id): (String, String),
    (started, account): (Instant, Option<Account>),
) -> Result<Response, GatewayError> {
    info!(
        id = %id,
        api = plan.api.id_prefix(),
        choices = plan.choices.len(),
        stream = plan.stream,
        user = plan.user.as_deref().unwrap_or(""),
        "generation request"
    );
    let reservation = match account {
        Some(account) => Some(Arc::new(account.reserve(plan_tokens(&plan, &state))?)),
        None => None,
    };
    let ctx = Ctx { reservation, ..Ctx::new(&state, plan.model.clone(), request_id, plan.api.prompt_param(), started) };
    let created = unix_now();
    if plan.stream {
        let meta = StreamMeta {
            api: plan.api,
            id,
            created,
            model: plan.model.clone(),
            include_usage: plan.include_usage,
            logprobs: plan.logprobs,
        };
        let positions: Vec<(u32, usize)> = plan.choices.iter().map(|c| (c.index, c.prompt_index)).collect();
        let requests: Vec<_> = plan.choices.into_iter().map(|c| c.request).collect();
        let wait = ctx.deadlines.stream_status;
        let opener = ctx.clone();
        let request_id = ctx.request_id.clone();
        let mut opening = async move {
            let opener = &opener;
            try_join_all(requests.iter().map(|r| async move { opener.open(r, &mut Attempts::default()).await })).await
        }
        .boxed();
        let stream_of = move |opened: Vec<_>| {
            let choices = positions.into_iter().zip(opened).map(|((index, prompt), o)| (index, prompt, o)).collect();
            sse::events(meta, ctx, choices)
        };
        // Errors such as an over-long prompt or full queues get their own status code when every
        // choice has its first chunk within `--stream-status-wait`. After that the 200 goes out,
        // SSE comments keep proxies from closing the idle connection, and a failure arrives as
        // an error event.
        return Ok(match tokio::time::timeout(wait, &mut opening).await {
            Ok(opened) => {
                let opened = opened?;
                let served_by = opened.first().map(|o| o.worker_id.clone());
                with_worker(Sse::new(stream_of(opened)).keep_alive(KeepAlive::default()).into_response(), served_by)
            }
            Err(_) => {
                let events = futures::stream::once(async move {
                    match opening.await {
                        Ok(opened) => stream_of(opened).boxed(),
                        Err(err) => {
                            warn!(request_id = %request_id, error = %err, "a committed stream failed before its first token");
                            futures::stream::iter([Ok(sse::error_event(&err))]).boxed()
                        }
                    }
                })
                .flatten();
                Sse::new(events).keep_alive(KeepAlive::new().interval(wait)).into_response()
            }
        });
    }
    let done = try_join_all(plan.choices.iter().map(|c| ctx.complete(&c.request))).await?;
    let usage = total_usage(plan.choices.iter().zip(&done).map(|(c, d)| (c.prompt_index, d.tally.counts())));
    let pairs = plan.choices.iter().zip(&done);
    let response = match plan.api {
        Api::Chat => Json(Answer::new(
            (id, "chat.completion", created, plan.model.clone(), usage),
            pairs
                .map(|(c, d)| ChatChoice {
                    index: c.index,
                    message: AssistantMessage { role: "assistant", content: d.text.clone() },
                    logprobs: plan.logprobs.then(|| chat_logprobs(&d.logprobs)),
                    finish_reason: finish_reason_str(d.finish_reason),
                })
                .collect(),
        ))
        .into_response(),
        Api::Completion => Json(Answer::new(
            (id, "text_completion", created, plan.model.clone(), usage),
            pairs
                .map(|(c, d)| CompletionChoice {
                    text: d.text.clone(),
                    index: c.index,
                    logprobs: plan.logprobs.then(|| completion_logprobs(&d.logprobs, &mut 0)),
                    finish_reason: Some(finish_reason_str(d.finish_reason)),
                })
                .collect(),
        ))
        .into_response(),
    };
    ctx.metrics.finished(since(started));
    ctx.account_for(usage.prompt_tokens, usage.completion_tokens);
    info!(prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens, "generation done");
    Ok(with_worker(response, done.first().map(|d| d.worker_id.clone())))
}

/// Names the worker that served the (first) choice in `x-herd-worker`, for operators and tests.
fn with_worker(mut response: Response, worker_id: Option<String>) -> Response {
    if let Some(value) = worker_id.and_then(|w| HeaderValue::from_str(&w).ok()) {
        response.headers_mut().insert("x-herd-worker", value);
    }
    response
}

fn model_objects(state: &AppState) -> Vec<ModelObject> {
    state
        .table
        .models()
        .into_iter()
        .map(|(id, created, max_model_len)| ModelObject {
            id,
            object: "model",
            created,
            owned_by: "herd",
            max_model_len,
        })
        .collect()
}

/// `GET /v1/models`: every served name and alias.
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList { object: "list", data: model_objects(&state) })
}

/// `GET /v1/models/{model}`.
pub async fn get_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelObject>, GatewayError> {
    let models = model_objects(&state);
    match models.iter().position(|m| m.id == model) {
        Some(i) => Ok(Json(models[i].clone())),
        None => {
            let served: Vec<String> = models.into_iter().map(|m| m.id).collect();
            Err(GatewayError::model_not_found(&model, &served))
        }
    }
}

/// `GET /health`: the gateway is up; how many workers it knows.
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health { status: "ok", workers: state.table.len() })
}

/// `GET /ready`: 200 once the table holds at least one worker, else 503.
pub async fn ready(State(state): State<AppState>) -> Result<Json<Health>, GatewayError> {
    match state.table.len() {
        0 => Err(GatewayError::Unavailable { message: "no worker is registered yet".into() }),
        workers => Ok(Json(Health { status: "ready", workers })),
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, herd_ops::metrics::CONTENT_TYPE)], state.metrics.render(&state.table))
}

/// Any unknown path.
pub async fn not_found(method: Method, uri: Uri) -> GatewayError {
    GatewayError::UnknownRoute { method: method.to_string(), path: uri.path().to_string() }
}

/// A known path with the wrong method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> GatewayError {
    GatewayError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}

/// Adds `Retry-After: --retry-after` to every 429 and 503, wherever it came from.
pub async fn add_retry_after(State(seconds): State<u64>, mut response: Response) -> Response {
    let status = response.status();
    if (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE)
        && !response.headers().contains_key(header::RETRY_AFTER)
    {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::Router;
    use axum::body::Body;
    use axum::http::HeaderMap;
    use futures::StreamExt;
    use herd_proto::v1::WorkerState;
    use serde_json::{Value, json};
    use tonic::Code;

    use crate::testing::{FAKE_PROMPT_TOKENS, FakeWorker, Script, dead_address, worker_state};
    use crate::{AppState, Settings, WorkerTable, router};

    fn app_with(workers: Vec<WorkerState>) -> (Router, Arc<WorkerTable>) {
        app_with_deadlines(workers, Default::default())
    }

    fn app_with_deadlines(workers: Vec<WorkerState>, deadlines: crate::Deadlines) -> (Router, Arc<WorkerTable>) {
        let table = Arc::new(WorkerTable::new());
        table.apply_snapshot(workers, Duration::ZERO);
        let settings =
            Settings { max_body_bytes: 2048, worker_down_for: Duration::from_secs(60), retry_after: 3, deadlines };
        (router(AppState::new(table.clone(), settings)), table)
    }

    async fn call(app: &Router, method: &str, uri: &str, body: impl Into<Body>) -> axum::response::Response {
        crate::testing::call(app, method, uri, &[], body).await
    }

    async fn send(app: &Router, method: &str, uri: &str, body: &str) -> (u16, HeaderMap, String) {
        crate::testing::send(app, method, uri, &[], body).await
    }

    async fn post_json(app: &Router, uri: &str, body: Value) -> (u16, HeaderMap, Value) {
        let (status, headers, text) = send(app, "POST", uri, &body.to_string()).await;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, value)
    }

    /// The `data:` payloads of an SSE body, JSON-decoded where possible.
    fn sse_data(body: &str) -> Vec<Value> {
        body.split("\n\n")
            .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.to_string())))
            .collect()
    }

    fn chat(n: u32) -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": n, "seed": 10})
    }

    #[tokio::test]
    async fn a_worker_that_never_answers_is_skipped_within_the_deadline() {
        // Accepts connections (the kernel completes them) and never says a word.
        let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hole_address = format!("http://{}", hole.local_addr().unwrap());
        let w = FakeWorker::start(Script::Reply(vec!["ok"])).await;
        // The black hole looks idle, so it is picked first.
        let workers = vec![worker_state("hole", &hole_address, &["m"], 0), worker_state("real", &w.address, &["m"], 5)];
        let deadlines = crate::Deadlines {
            accept: Duration::from_millis(300),
            first_token: Duration::from_secs(60),
            ..Default::default()
        };
        let (app, table) = app_with_deadlines(workers, deadlines);
        for stream in [false, true] {
            let started = std::time::Instant::now();
            let mut body = chat(1);
            body["stream"] = json!(stream);
            let (status, headers, _) = post_json(&app, "/v1/chat/completions", body).await;
            assert_eq!(status, 200, "stream {stream}");
            assert_eq!(headers["x-herd-worker"], "real");
            assert!(started.elapsed() < Duration::from_secs(10), "stream {stream}: {:?}", started.elapsed());
            let hole_state = table.overview().into_iter().find(|w| w.id == "hole").unwrap().state;
            assert_eq!(hole_state, "down");
            // Up again for the next round, so that it is tried first again.
            table.mark_down("hole", Duration::ZERO);
        }
        drop(hole);
    }

    #[tokio::test]
    async fn a_stalled_body_gets_408_within_the_body_timeout() {
        let w = FakeWorker::start(Script::Reply(vec!["ok"])).await;
        let deadlines = crate::Deadlines { body: Duration::from_millis(300), ..Default::default() };
        let (app, _) = app_with_deadlines(vec![worker_state("a", &w.address, &["m"], 0)], deadlines);
        // The first bytes of a body whose rest never comes.
        let start: Result<axum::body::Bytes, std::io::Error> = Ok(r#"{"model":"m","#.into());
        let stalled = Body::from_stream(futures::stream::iter([start]).chain(futures::stream::pending()));
        let response = tokio::time::timeout(Duration::from_secs(10), call(&app, "POST", "/v1/completions", stalled))
            .await
            .expect("answered within the body timeout");
        assert_eq!(response.status(), 408);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["code"], "request_timeout", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("300ms"), "{v}");
    }

    #[tokio::test]
    async fn a_stream_waiting_for_its_first_token_is_committed_and_kept_alive() {
        // A worker that accepts the call and never sends a token.
        let silent = FakeWorker::start(Script::Hang(vec![])).await;
        let deadlines = crate::Deadlines {
            first_token: Duration::from_millis(1500),
            stream_status: Duration::from_millis(200),
            ..Default::default()
        };
        let (app, _) = app_with_deadlines(vec![worker_state("silent", &silent.address, &["m"], 0)], deadlines);
        let mut body = chat(1);
        body["stream"] = json!(true);
        let started = std::time::Instant::now();
        let response = call(&app, "POST", "/v1/chat/completions", body.to_string()).await;
        assert_eq!(response.status(), 200, "committed after --stream-status-wait");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        let bytes =
            tokio::time::timeout(Duration::from_secs(10), axum::body::to_bytes(response.into_body(), usize::MAX))
                .await
                .expect("the stream ends after the first-token deadline")
                .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let comments = text.split("\n\n").filter(|e| e.starts_with(':')).count();
        assert!(comments >= 3, "a comment every 200 ms while waiting: {text:?}");
        let events = sse_data(&text);
        assert_eq!(events.len(), 1, "{text:?}");
        assert_eq!(events[0]["error"]["type"], "server_error", "{text:?}");
    }

    #[tokio::test]
    async fn a_request_past_its_deadline_ends_and_its_generation_stops() {
        for stream in [false, true] {
            // Sends one token, then nothing, without closing the stream.
            let stuck = FakeWorker::start(Script::Hang(vec!["a"])).await;
            let deadlines = crate::Deadlines { request: Duration::from_millis(500), ..Default::default() };
            let (app, table) = app_with_deadlines(vec![worker_state("stuck", &stuck.address, &["m"], 0)], deadlines);
            let mut body = chat(1);
            body["stream"] = json!(stream);
            let body = body.to_string();
            let answer =
                tokio::time::timeout(Duration::from_secs(10), send(&app, "POST", "/v1/chat/completions", &body));
            let (status, _, text) = answer.await.expect("the request ends at its deadline");
            if stream {
                assert_eq!(status, 200);
                let events = sse_data(&text);
                assert_eq!(events.last().unwrap()["error"]["code"], "timeout", "{text}");
            } else {
                assert_eq!(status, 504, "{text}");
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"]["code"], "timeout", "{text}");
            }
            // The worker is not blamed for a slow answer, and its call is cancelled.
            assert!(!table.is_down("stuck"));
            for _ in 0..100 {
                if stuck.cancelled() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(stuck.cancelled(), "stream {stream}: the worker's call was not cancelled");
        }
    }

    #[tokio::test]
    async fn only_json_bodies_are_read() {
        let w = FakeWorker::start(Script::Reply(vec!["ok"])).await;
        let (app, _) = app_with(vec![worker_state("a", &w.address, &["m"], 0)]);
        let body = chat(1).to_string();
        for uri in ["/v1/chat/completions", "/v1/completions"] {
            // What a web page can send from a visitor's browser without a CORS preflight.
            for kind in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
                let (status, _, text) = crate::testing::send(&app, "POST", uri, &[("content-type", kind)], &body).await;
                assert_eq!(status, 415, "{uri} {kind}: {text}");
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"]["code"], "unsupported_media_type", "{text}");
                assert!(v["error"]["message"].as_str().unwrap().contains("application/json"), "{text}");
            }
        }
        let json_utf8 = [("content-type", "Application/JSON; charset=utf-8")];
        let (status, _, text) = crate::testing::send(&app, "POST", "/v1/chat/completions", &json_utf8, &body).await;
        assert_eq!(status, 200, "{text}");
    }

    #[tokio::test]
    async fn chat_completion_end_to_end() {
        let w = FakeWorker::start(Script::Reply(vec!["Hel", "", "lo"])).await;
        let (app, table) = app_with(vec![worker_state("a", &w.address, &["m", "alias"], 0)]);
        let (status, headers, v) = post_json(
            &app,
            "/v1/chat/completions",
            json!({"model": "alias",
            "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 1}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "alias");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(v["created"].as_u64().unwrap() > 0);
        let choice = &v["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"], json!({"role": "assistant", "content": "Hello"}));
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["logprobs"]["content"][0]["token"], "Hel");
        assert_eq!(choice["logprobs"]["content"][0]["top_logprobs"][0]["token"], "alt0");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": FAKE_PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}})
        );
        let calls = w.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].request_id.as_deref(), v["id"].as_str());
        assert_eq!(headers["x-request-id"].to_str().ok(), v["id"].as_str());
        assert_eq!(calls[0].request.model, "alias");
        assert_eq!(calls[0].request.logprobs, Some(1));
        assert_eq!(table.inflight("a"), Some(0));
    }

    #[tokio::test]
    async fn a_client_request_id_is_carried_through_and_checked() {
        let w = FakeWorker::start(Script::Reply(vec!["ok"])).await;
        let (app, _) = app_with(vec![worker_state("a", &w.address, &["m"], 0)]);
        let body = chat(1).to_string();
        let json = ("content-type", "application/json");
        let (status, headers, text) = crate::testing::send(
            &app,
            "POST",
            "/v1/chat/completions",
            &[json, ("x-request-id", "trace-42/a b")],
            &body,
        )
        .await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(headers["x-request-id"], "trace-42/a b", "echoed");
        assert_eq!(w.calls()[0].request_id.as_deref(), Some("trace-42/a b"), "sent to the worker");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "the answer keeps its own id: {text}");
        let long = "x".repeat(super::MAX_REQUEST_ID_BYTES + 1);
        for bad in [long.as_str(), "tab\there"] {
            let (status, _, text) =
                crate::testing::send(&app, "POST", "/v1/chat/completions", &[json, ("x-request-id", bad)], &body).await;
            assert_eq!(status, 400, "{bad:?}: {text}");
            assert!(text.contains("X-Request-Id"), "{text}");
        }
        assert_eq!(w.calls().len(), 1, "refused ids reach no worker");
    }

    #[tokio::test]
    async fn n_choices_get_distinct_seeds_and_summed_usage() {
        let a = FakeWorker::start(Script::Reply(vec!["x", "y"])).await;
        let b = FakeWorker::start(Script::Reply(vec!["x", "y"])).await;
        let (app, _) =
            app_with(vec![worker_state("a", &a.address, &["m"], 0), worker_state("b", &b.address, &["m"], 0)]);
        let (status, _, v) = post_json(&app, "/v1/chat/completions", chat(3)).await;
        assert_eq!(status, 200, "{v}");
        let indices: Vec<u64> = v["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
        assert_eq!(indices, [0, 1, 2]);
        assert_eq!(v["usage"]["prompt_tokens"], FAKE_PROMPT_TOKENS);
        assert_eq!(v["usage"]["completion_tokens"], 6);
        let mut seeds: Vec<u64> =
            a.calls().into_iter().chain(b.calls()).map(|c| c.request.sampling.unwrap().seed.unwrap()).collect();
        seeds.sort();
        assert_eq!(seeds, [10, 11, 12]);
    }

    #[tokio::test]
    async fn fails_over_before_the_first_chunk_and_marks_down() {
        let good = FakeWorker::start(Script::Reply(vec!["ok"])).await;
        let broken = FakeWorker::start(Script::Refuse(Code::Unavailable, "draining")).await;
        let dead = dead_address().await;
        // The broken and dead workers look less loaded, so they are tried first.
        let (app, table) = app_with(vec![
            worker_state("dead", &dead, &["m"], 0),
            worker_state("broken", &broken.address, &["m"], 0),
            worker_state("good", &good.address, &["m"], 9),
        ]);
        let (status, _, v) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], "ok");
        assert!(table.is_down("dead") && table.is_down("broken") && !table.is_down("good"));
        assert_eq!(broken.calls().len(), 1);
        // Marked down: the next request goes straight to the good worker.
        let (status, _, _) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 200);
        assert_eq!(broken.calls().len(), 1);
        assert_eq!(good.calls().len(), 2);
    }

    #[tokio::test]
    async fn an_internal_error_fails_the_request_without_marking_the_worker_down() {
        let w = FakeWorker::start(Script::Refuse(Code::Internal, "out of memory on this prompt")).await;
        let other = FakeWorker::start(Script::Reply(vec!["ok"])).await;
        let (app, table) =
            app_with(vec![worker_state("a", &w.address, &["m"], 0), worker_state("b", &other.address, &["m"], 9)]);
        let (status, _, v) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 503, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("out of memory"), "{v}");
        assert!(!table.is_down("a"), "one bad request must not take a worker out of rotation");
        assert!(other.calls().is_empty(), "the request is not replayed on every worker");
    }

    #[tokio::test]
    async fn all_workers_failing_is_503_and_exhausted_is_429() {
        let dead = dead_address().await;
        let (app, _) = app_with(vec![worker_state("dead", &dead, &["m"], 0)]);
        let (status, headers, v) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 503, "{v}");
        assert_eq!(headers["retry-after"], "3");
        assert_eq!(v["error"]["type"], "server_error");
        // Now marked down: still 503, without another call.
        let (status, _, _) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 503);

        let full1 = FakeWorker::start(Script::Refuse(Code::ResourceExhausted, "queue full")).await;
        let full2 = FakeWorker::start(Script::Refuse(Code::ResourceExhausted, "queue full")).await;
        let (app, table) = app_with(vec![
            worker_state("f1", &full1.address, &["m"], 0),
            worker_state("f2", &full2.address, &["m"], 0),
        ]);
        let (status, headers, v) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 429, "{v}");
        assert_eq!(headers["retry-after"], "3");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!((full1.calls().len(), full2.calls().len()), (1, 1));
        assert!(!table.is_down("f1"), "a full queue is not a failure");
    }

    #[tokio::test]
    async fn worker_statuses_map_to_client_errors() {
        let long = FakeWorker::start(Script::Refuse(
            Code::InvalidArgument,
            "the prompt has 3000 tokens but the context length is 2048",
        ))
        .await;
        let (app, table) = app_with(vec![worker_state("w", &long.address, &["m"], 0)]);
        let (status, _, v) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        assert_eq!(v["error"]["param"], "messages");
        assert!(v["error"]["message"].as_str().unwrap().contains("2048"));
        assert!(!table.is_down("w"));

        let nf = FakeWorker::start(Script::Refuse(Code::NotFound, "model m is not served here")).await;
        let (app, _) = app_with(vec![worker_state("w", &nf.address, &["m"], 0)]);
        let (status, _, v) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 404, "{v}");
        assert_eq!(v["error"]["code"], "model_not_found");
    }

    #[tokio::test]
    async fn unknown_model_is_404_listing_served_models() {
        let (app, _) = app_with(vec![worker_state("w", "http://127.0.0.1:1", &["vicuna", "v"], 0)]);
        let (status, _, v) = post_json(
            &app,
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
        assert_eq!(status, 404);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("gpt-4") && message.contains("vicuna") && message.contains('v'), "{message}");
    }

    #[tokio::test]
    async fn unsynced_table_is_503() {
        let table = Arc::new(WorkerTable::new());
        let settings = Settings {
            max_body_bytes: 2048,
            worker_down_for: Duration::from_secs(1),
            retry_after: 1,
            deadlines: Default::default(),
        };
        let app = router(AppState::new(table, settings));
        let (status, headers, _) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 503);
        assert_eq!(headers["retry-after"], "1");
    }

    #[tokio::test]
    async fn non_streaming_retries_a_choice_whose_worker_dies_mid_way() {
        let dying = FakeWorker::start(Script::DieAfter(vec!["par", "tial"], Code::Unavailable)).await;
        let good = FakeWorker::start(Script::Reply(vec!["whole"])).await;
        let (app, table) = app_with(vec![
            worker_state("dying", &dying.address, &["m"], 0),
            worker_state("good", &good.address, &["m"], 5),
        ]);
        let (status, _, v) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], "whole");
        assert!(table.is_down("dying"));
    }

    #[tokio::test]
    async fn a_non_streamed_answer_is_replayed_at_most_once() {
        // Three workers that each die mid-answer: the request that kills them is tried on two.
        let dying: Vec<FakeWorker> = futures::future::join_all(
            (0..3).map(|_| FakeWorker::start(Script::DieAfter(vec!["par", "tial"], Code::Unavailable))),
        )
        .await;
        let workers = dying.iter().enumerate().map(|(i, w)| worker_state(&format!("d{i}"), &w.address, &["m"], 0));
        let (app, _) = app_with(workers.collect());
        let (status, _, v) = post_json(&app, "/v1/chat/completions", chat(1)).await;
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["error"]["code"], "worker_failed", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("two workers"), "{v}");
        let calls: usize = dying.iter().map(|w| w.calls().len()).sum();
        assert_eq!(calls, 2, "one replay, not one per worker");
    }

    #[tokio::test]
    async fn streaming_chat_with_usage() {
        let w = FakeWorker::start(Script::Reply(vec!["Hel", "", "lo"])).await;
        let (app, table) = app_with(vec![worker_state("a", &w.address, &["m"], 0)]);
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                          "stream_options": {"include_usage": true}, "max_tokens": 2});
        let (status, headers, text) = send(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
        assert_eq!(status, 200, "{text}");
        assert!(headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let events = sse_data(&text);
        assert_eq!(events.len(), 6, "{text}");
        let id = events[0]["id"].as_str().unwrap();
        assert!(id.starts_with("chatcmpl-"));
        assert!(events[..5].iter().all(|e| e["id"] == id && e["object"] == "chat.completion.chunk"));
        assert!(events[..4].iter().all(|e| e["usage"].is_null() && e.get("usage").is_some()));
        assert_eq!(events[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(events[1]["choices"][0]["delta"], json!({"content": "Hel"}));
        assert_eq!(events[2]["choices"][0]["delta"], json!({"content": "lo"}));
        assert_eq!(events[3]["choices"][0]["delta"], json!({}));
        assert_eq!(events[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(events[4]["choices"], json!([]));
        assert_eq!(
            events[4]["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}})
        );
        assert_eq!(events[5], "[DONE]");
        assert_eq!(table.inflight("a"), Some(0));
    }

    #[tokio::test]
    async fn streaming_merges_n_choices() {
        let a = FakeWorker::start(Script::Reply(vec!["a1", "a2"])).await;
        let (app, _) = app_with(vec![worker_state("a", &a.address, &["m"], 0)]);
        let mut body = chat(2);
        body["stream"] = json!(true);
        let (status, _, text) = send(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
        assert_eq!(status, 200);
        let events = sse_data(&text);
        assert_eq!(events.last().unwrap(), "[DONE]");
        for index in 0..2 {
            let mine: Vec<&Value> = events.iter().filter(|e| e["choices"][0]["index"] == index).collect();
            let content: String =
                mine.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
            assert_eq!(content, "a1a2");
            assert_eq!(mine.last().unwrap()["choices"][0]["finish_reason"], "stop");
            assert!(mine.iter().all(|e| e.get("usage").is_none()));
        }
    }

    #[tokio::test]
    async fn streaming_worker_failure_sends_one_error_event() {
        let w = FakeWorker::start(Script::DieAfter(vec!["Hel", "lo"], Code::Unknown)).await;
        let (app, table) = app_with(vec![worker_state("a", &w.address, &["m"], 0)]);
        let mut body = chat(1);
        body["stream"] = json!(true);
        let (status, _, text) = tokio::time::timeout(
            Duration::from_secs(10),
            send(&app, "POST", "/v1/chat/completions", &body.to_string()),
        )
        .await
        .expect("the stream must end");
        assert_eq!(status, 200);
        let events = sse_data(&text);
        let last = events.last().unwrap();
        assert_eq!(last["error"]["type"], "server_error", "{text}");
        assert_eq!(last["error"]["code"], "worker_failed");
        assert!(!text.contains("[DONE]"));
        assert_eq!(events.iter().filter(|e| e.get("error").is_some()).count(), 1);
        assert_eq!(events[1]["choices"][0]["delta"]["content"], "Hel");
        assert!(table.is_down("a"));
    }

    #[tokio::test]
    async fn client_disconnect_cancels_the_worker_stream() {
        let w = FakeWorker::start(Script::Hang(vec!["a"])).await;
        let (app, table) = app_with(vec![worker_state("a", &w.address, &["m"], 0)]);
        let mut body = chat(1);
        body["stream"] = json!(true);
        let response = call(&app, "POST", "/v1/chat/completions", body.to_string()).await;
        assert_eq!(response.status(), 200);
        let mut data = response.into_body().into_data_stream();
        let first = data.next().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("chat.completion.chunk"));
        assert_eq!(table.inflight("a"), Some(1), "counted for the whole stream");
        drop(data);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !w.cancelled() {
            assert!(tokio::time::Instant::now() < deadline, "the worker stream was not cancelled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(table.inflight("a"), Some(0));
    }

    #[tokio::test]
    async fn completions_non_streaming_and_streaming() {
        let w = FakeWorker::start(Script::Reply(vec!["fo", "o"])).await;
        let (app, _) = app_with(vec![worker_state("a", &w.address, &["m"], 0)]);
        let (status, _, v) =
            post_json(&app, "/v1/completions", json!({"model": "m", "prompt": ["p0", "p1"], "n": 2, "logprobs": 2}))
                .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 4);
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            assert_eq!(c["text"], "foo");
            assert_eq!(c["finish_reason"], "stop");
        }
        assert_eq!(
            choices[0]["logprobs"],
            json!({"tokens": ["fo", "o"], "token_logprobs": [-0.5, -0.5],
                   "top_logprobs": [{"alt0": -1.0, "alt1": -2.0}, {"alt0": -1.0, "alt1": -2.0}], "text_offset": [0, 2]})
        );
        // Two prompts counted once each.
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22, "prompt_tokens_details": {"cached_tokens": 0}})
        );
        assert_eq!(w.calls()[0].request.max_tokens, Some(16));

        let (status, _, text) =
            send(&app, "POST", "/v1/completions", &json!({"model": "m", "prompt": "p", "stream": true}).to_string())
                .await;
        assert_eq!(status, 200);
        let events = sse_data(&text);
        assert_eq!(events.len(), 4, "{text}");
        assert_eq!(events[0]["object"], "text_completion");
        assert_eq!(events[0]["choices"][0], json!({"text": "fo", "index": 0, "logprobs": null, "finish_reason": null}));
        assert_eq!(events[1]["choices"][0]["text"], "o");
        assert_eq!(events[2]["choices"][0], json!({"text": "", "index": 0, "logprobs": null, "finish_reason": "stop"}));
        assert_eq!(events[3], "[DONE]");
    }

    #[tokio::test]
    async fn models_health_and_http_errors() {
        let (app, _) = app_with(vec![
            worker_state("a", "http://127.0.0.1:1", &["vicuna", "lmsys/vicuna-7b"], 0),
            worker_state("b", "http://127.0.0.1:2", &["vicuna"], 0),
        ]);
        let (status, _, text) = send(&app, "GET", "/v1/models", "").await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "list");
        let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["lmsys/vicuna-7b", "vicuna"]);
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(v["data"][0]["owned_by"], "herd");
        assert_eq!(v["data"][0]["max_model_len"], 2048, "vLLM's field: the context length");
        assert!(v["data"][0]["created"].as_u64().unwrap() > 0);

        let (status, _, text) = send(&app, "GET", "/v1/models/lmsys/vicuna-7b", "").await;
        assert_eq!(status, 200, "{text}");
        let (status, _, _) = send(&app, "GET", "/v1/models/nope", "").await;
        assert_eq!(status, 404);

        let (status, _, text) = send(&app, "GET", "/health", "").await;
        assert_eq!(
            (status, serde_json::from_str::<Value>(&text).unwrap()),
            (200, json!({"status": "ok", "workers": 2}))
        );

        let (status, _, text) = send(&app, "GET", "/v1/nothing", "").await;
        assert_eq!(status, 404);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("/v1/nothing"));
        assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some());

        let (status, _, text) = send(&app, "GET", "/v1/chat/completions", "").await;
        assert_eq!(status, 405, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");

        let big = format!(r#"{{"model":"vicuna","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(4096));
        let (status, _, text) = send(&app, "POST", "/v1/chat/completions", &big).await;
        assert_eq!(status, 413, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("2048"));

        let (status, _, text) = send(&app, "POST", "/v1/chat/completions", "{not json").await;
        assert_eq!(status, 400);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], Value::Null);

        let (status, _, text) =
            send(&app, "POST", "/v1/completions", r#"{"model":"vicuna","prompt":"x","temperature":9}"#).await;
        assert_eq!(status, 400);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], "temperature");
    }
}

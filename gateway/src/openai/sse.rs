//! Turns the choices' worker streams into OpenAI's server-sent events.
//!
//! Order: a role chunk per choice (chat only), content chunks as tokens arrive (choices interleaved),
//! a final chunk per choice with its `finish_reason`, an optional usage chunk, then `[DONE]`.
//! A worker failure after the first chunk ends the stream with one error event.

use std::convert::Infallible;

use axum::response::sse::Event;
use futures::stream::{self, BoxStream, Stream, StreamExt};
use herd_proto::v1::GenerateChunk;
use serde::Serialize;
use tonic::{Status, Streaming};
use tracing::warn;

use super::params::Api;
use super::types::{
    ChatChunkChoice, Chunk, CompletionChoice, Delta, UsageOut, chat_logprobs, completion_logprobs, finish_reason_str,
    total_usage,
};
use crate::GatewayError;
use crate::dispatch::{Ctx, Opened, Tally, ended_early, is_worker_failure};
use crate::metrics::{Pacer, since};
use crate::router::InflightGuard;

/// The `data:` payload that ends a stream.
pub const DONE: &str = "[DONE]";

/// What every chunk of one response repeats.
#[derive(Debug, Clone)]
pub struct StreamMeta {
    /// The endpoint.
    pub api: Api,
    /// The request id.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model as requested.
    pub model: String,
    /// Whether a usage chunk ends the stream.
    pub include_usage: bool,
    /// Whether to render log probabilities.
    pub logprobs: bool,
}

struct ChoiceState {
    index: u32,
    prompt_index: usize,
    worker_id: String,
    finished: bool,
    tally: Tally,
    text_offset: u32,
}

/// Formats the events of one response; pure, so the wire format is testable without workers.
pub struct Formatter {
    meta: StreamMeta,
    choices: Vec<ChoiceState>,
}

impl Formatter {
    /// A formatter for choices given as `(index, prompt_index, worker_id)`, in stream position order.
    pub fn new(meta: StreamMeta, choices: impl IntoIterator<Item = (u32, usize, String)>) -> Self {
        let choices = choices
            .into_iter()
            .map(|(index, prompt_index, worker_id)| ChoiceState {
                index,
                prompt_index,
                worker_id,
                finished: false,
                tally: Tally::default(),
                text_offset: 0,
            })
            .collect();
        Formatter { meta, choices }
    }

    fn usage_field(&self) -> Option<Option<UsageOut>> {
        self.meta.include_usage.then_some(None)
    }

    fn chat(&self, choices: Vec<ChatChunkChoice>, usage: Option<Option<UsageOut>>) -> String {
        self.chunk("chat.completion.chunk", choices, usage)
    }

    fn completion(&self, choices: Vec<CompletionChoice>, usage: Option<Option<UsageOut>>) -> String {
        self.chunk("text_completion", choices, usage)
    }

    fn chunk<C: Serialize>(&self, object: &'static str, choices: Vec<C>, usage: Option<Option<UsageOut>>) -> String {
        let chunk = Chunk {
            id: self.meta.id.clone(),
            object,
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    /// The events before any token: a role chunk per choice for chat, nothing for completions.
    pub fn start(&self) -> Vec<String> {
        if self.meta.api != Api::Chat {
            return Vec::new();
        }
        self.choices
            .iter()
            .map(|c| {
                let delta = Delta { role: Some("assistant"), content: Some(String::new()) };
                let choice = ChatChunkChoice { index: c.index, delta, logprobs: None, finish_reason: None };
                self.chat(vec![choice], self.usage_field())
            })
            .collect()
    }

    /// The events for a worker chunk of the choice at stream position `pos`.
    pub fn on_chunk(&mut self, pos: usize, chunk: GenerateChunk) -> Vec<String> {
        let mut out = Vec::new();
        let usage_field = self.usage_field();
        let (api, logprobs) = (self.meta.api, self.meta.logprobs);
        let Some(choice) = self.choices.get_mut(pos) else { return out };
        if choice.finished {
            return out;
        }
        choice.tally.add(&chunk);
        let index = choice.index;
        // Empty text is a pending character or stop string: nothing to say unless logprobs are due.
        let has_logprobs = logprobs && !chunk.logprobs.is_empty();
        if !chunk.text.is_empty() || has_logprobs {
            match api {
                Api::Chat => {
                    let delta = Delta { role: None, content: Some(chunk.text.clone()) };
                    let lp = has_logprobs.then(|| chat_logprobs(&chunk.logprobs));
                    let choice = ChatChunkChoice { index, delta, logprobs: lp, finish_reason: None };
                    out.push(self.chat(vec![choice], usage_field));
                }
                Api::Completion => {
                    let lp = has_logprobs.then(|| completion_logprobs(&chunk.logprobs, &mut choice.text_offset));
                    let choice =
                        CompletionChoice { text: chunk.text.clone(), index, logprobs: lp, finish_reason: None };
                    out.push(self.completion(vec![choice], usage_field));
                }
            }
        }
        if chunk.finish_reason != 0 {
            out.push(self.finish(pos, chunk.finish_reason));
        }
        out
    }

    fn finish(&mut self, pos: usize, reason: i32) -> String {
        self.choices[pos].finished = true;
        let index = self.choices[pos].index;
        let reason = Some(finish_reason_str(reason));
        match self.meta.api {
            Api::Chat => {
                let choice = ChatChunkChoice { index, delta: Delta::default(), logprobs: None, finish_reason: reason };
                self.chat(vec![choice], self.usage_field())
            }
            Api::Completion => {
                let choice = CompletionChoice { text: String::new(), index, logprobs: None, finish_reason: reason };
                self.completion(vec![choice], self.usage_field())
            }
        }
    }

    /// The error event sent when the worker of position `pos` fails mid-stream.
    pub fn on_failure(&self, pos: usize, status: &Status) -> String {
        let worker = self.choices.get(pos).map_or("?", |c| c.worker_id.as_str());
        let err = GatewayError::WorkerFailed {
            message: format!("worker {worker} failed during generation: {}", status.message()),
        };
        error_data(&err)
    }

    /// The tokens of every choice so far.
    pub fn usage(&self) -> UsageOut {
        total_usage(self.choices.iter().map(|c| (c.prompt_index, c.tally.counts())))
    }

    /// The events after every choice finished: the usage chunk if asked for, then `[DONE]`.
    pub fn done(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.meta.include_usage {
            let usage = self.usage();
            out.push(match self.meta.api {
                Api::Chat => self.chat(Vec::new(), Some(Some(usage))),
                Api::Completion => self.completion(Vec::new(), Some(Some(usage))),
            });
        }
        out.push(DONE.to_string());
        out
    }

    fn worker_id(&self, pos: usize) -> &str {
        self.choices.get(pos).map_or("", |c| c.worker_id.as_str())
    }
}

enum Item {
    Chunk(GenerateChunk),
    Failed(Status),
}

/// One choice's worker stream as items tagged with its position; stops after the finishing chunk.
fn choice_items(pos: usize, first: GenerateChunk, rest: Streaming<GenerateChunk>) -> BoxStream<'static, (usize, Item)> {
    let finished = first.finish_reason != 0;
    let head = stream::once(async move { (pos, Item::Chunk(first)) });
    if finished {
        return head.boxed();
    }
    let tail = stream::unfold(Some(rest), move |rest| async move {
        let mut rest = rest?;
        match rest.message().await {
            Ok(Some(chunk)) => {
                let next = (chunk.finish_reason == 0).then_some(rest);
                Some(((pos, Item::Chunk(chunk)), next))
            }
            // The last chunk carries the finish reason: a stream that ends before it was cut off.
            Ok(None) => Some(((pos, Item::Failed(ended_early())), None)),
            Err(status) => Some(((pos, Item::Failed(status)), None)),
        }
    });
    head.chain(tail).boxed()
}

struct Driver {
    fmt: Formatter,
    merged: stream::SelectAll<BoxStream<'static, (usize, Item)>>,
    ctx: Ctx,
    done: bool,
    /// Times each choice's tokens.
    pacers: Vec<Pacer>,
    /// Held until the body is dropped: the workers count this request for the whole stream.
    _guards: Vec<InflightGuard>,
}

impl Drop for Driver {
    /// Whether the stream finished or the client left, the tokens generated are accounted.
    fn drop(&mut self) {
        let usage = self.fmt.usage();
        self.ctx.account_for(usage.prompt_tokens, usage.completion_tokens);
    }
}

/// The `data:` payload of an error event: OpenAI's error JSON.
fn error_data(err: &GatewayError) -> String {
    serde_json::to_string(&err.body()).unwrap_or_default()
}

/// The event that ends a stream whose choices could not start after its 200 went out.
pub(crate) fn error_event(err: &GatewayError) -> Event {
    Event::default().data(error_data(err))
}

/// The SSE events of a response whose choices all produced their first chunk.
///
/// Dropping the stream (the client went away) drops the gRPC streams, which cancels the generations.
pub(crate) fn events(
    meta: StreamMeta,
    ctx: Ctx,
    choices: Vec<(u32, usize, Opened)>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let mut guards = Vec::with_capacity(choices.len());
    let mut streams = Vec::with_capacity(choices.len());
    let mut ids = Vec::with_capacity(choices.len());
    for (pos, (index, prompt_index, opened)) in choices.into_iter().enumerate() {
        ids.push((index, prompt_index, opened.worker_id));
        guards.push(opened.guard);
        streams.push(choice_items(pos, opened.first, opened.rest));
    }
    let fmt = Formatter::new(meta, ids);
    let start = fmt.start();
    let pacers = (0..streams.len()).map(|_| Pacer::new()).collect();
    let driver = Driver { fmt, merged: stream::select_all(streams), ctx, done: false, pacers, _guards: guards };
    let body = stream::unfold(driver, |mut d| async move {
        if d.done {
            return None;
        }
        loop {
            let Ok(next) = tokio::time::timeout_at(d.ctx.deadline(), d.merged.next()).await else {
                d.done = true;
                let err = GatewayError::Timeout { after: d.ctx.deadlines.request };
                warn!(request_id = %d.ctx.request_id, "{err}; ending the stream");
                return Some((vec![error_data(&err)], d));
            };
            let out = match next {
                Some((pos, Item::Chunk(chunk))) => {
                    if let Some(pacer) = d.pacers.get_mut(pos) {
                        pacer.tick(&d.ctx.metrics, chunk.token_ids.len());
                    }
                    d.fmt.on_chunk(pos, chunk)
                }
                Some((pos, Item::Failed(status))) => {
                    if is_worker_failure(status.code()) {
                        d.ctx.worker_failed(d.fmt.worker_id(pos), &status);
                    }
                    d.done = true;
                    vec![d.fmt.on_failure(pos, &status)]
                }
                None => {
                    d.done = true;
                    d.ctx.metrics.finished(since(d.ctx.started));
                    d.fmt.done()
                }
            };
            if !out.is_empty() || d.done {
                return Some((out, d));
            }
        }
    });
    stream::iter(start).chain(body.flat_map(stream::iter)).map(|data| Ok::<_, Infallible>(Event::default().data(data)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::v1::{FinishReason, TokenLogprob, Usage};
    use serde_json::{Value, json};

    fn meta(api: Api, include_usage: bool, logprobs: bool) -> StreamMeta {
        StreamMeta { api, id: "id-1".into(), created: 42, model: "m".into(), include_usage, logprobs }
    }

    fn chunk(text: &str, finish: Option<FinishReason>, usage: Option<(u32, u32)>) -> GenerateChunk {
        GenerateChunk {
            text: text.into(),
            token_ids: if text.is_empty() { vec![] } else { vec![1] },
            logprobs: vec![],
            finish_reason: finish.map_or(0, |f| f as i32),
            usage: usage.map(|(p, c)| Usage { prompt_tokens: p, completion_tokens: c, cached_prompt_tokens: p / 2 }),
        }
    }

    fn parse(events: Vec<String>) -> Vec<Value> {
        events.iter().map(|e| serde_json::from_str(e).unwrap_or(Value::String(e.clone()))).collect()
    }

    #[test]
    fn chat_stream_format_with_usage() {
        let mut f = Formatter::new(meta(Api::Chat, true, false), [(0, 0, "w0".to_string()), (1, 0, "w1".to_string())]);
        let mut events = f.start();
        events.extend(f.on_chunk(0, chunk("Hel", None, None)));
        events.extend(f.on_chunk(1, chunk("", None, None)));
        events.extend(f.on_chunk(1, chunk("Yo", Some(FinishReason::Length), Some((5, 1)))));
        events.extend(f.on_chunk(0, chunk("lo", Some(FinishReason::Stop), Some((5, 2)))));
        events.extend(f.done());
        let v = parse(events);
        let base = |choices: Value, usage: Value| {
            json!({"id": "id-1", "object": "chat.completion.chunk", "created": 42, "model": "m",
                   "choices": choices, "usage": usage})
        };
        let role = |i: u32| json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
        let text =
            |i: u32, t: &str| json!([{"index": i, "delta": {"content": t}, "logprobs": null, "finish_reason": null}]);
        let fin = |i: u32, r: &str| json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": r}]);
        assert_eq!(
            v,
            vec![
                base(role(0), Value::Null),
                base(role(1), Value::Null),
                base(text(0, "Hel"), Value::Null),
                base(text(1, "Yo"), Value::Null),
                base(fin(1, "length"), Value::Null),
                base(text(0, "lo"), Value::Null),
                base(fin(0, "stop"), Value::Null),
                base(
                    json!([]),
                    json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                             "prompt_tokens_details": {"cached_tokens": 2}})
                ),
                Value::String("[DONE]".into()),
            ]
        );
    }

    #[test]
    fn chat_stream_without_usage_omits_the_field() {
        let mut f = Formatter::new(meta(Api::Chat, false, true), [(0, 0, "w".to_string())]);
        let mut c = chunk("", None, None);
        c.logprobs = vec![TokenLogprob { token: "\u{fffd}".into(), logprob: -0.5, top: vec![] }];
        let mut last = chunk("", None, None);
        last.finish_reason = FinishReason::Stop as i32;
        let events = parse([f.start(), f.on_chunk(0, c), f.on_chunk(0, last), f.done()].concat());
        assert!(events[..3].iter().all(|e| e.get("usage").is_none()), "{events:?}");
        // A chunk with empty text but logprobs is still sent.
        assert_eq!(events[1]["choices"][0]["logprobs"]["content"][0]["logprob"], json!(-0.5));
        assert_eq!(events[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events.len(), 4);
        assert_eq!(events[3], "[DONE]");
    }

    #[test]
    fn completion_stream_format() {
        let mut f = Formatter::new(meta(Api::Completion, false, false), [(3, 1, "w".to_string())]);
        let events = parse([f.start(), f.on_chunk(0, chunk("abc", Some(FinishReason::Stop), None)), f.done()].concat());
        assert_eq!(
            events,
            vec![
                json!({"id": "id-1", "object": "text_completion", "created": 42, "model": "m",
                       "choices": [{"text": "abc", "index": 3, "logprobs": null, "finish_reason": null}]}),
                json!({"id": "id-1", "object": "text_completion", "created": 42, "model": "m",
                       "choices": [{"text": "", "index": 3, "logprobs": null, "finish_reason": "stop"}]}),
                json!("[DONE]"),
            ]
        );
    }

    #[test]
    fn failure_event_format() {
        let f = Formatter::new(meta(Api::Chat, false, false), [(0, 0, "w7".to_string())]);
        let v: Value = serde_json::from_str(&f.on_failure(0, &Status::unavailable("gone"))).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["code"], "worker_failed");
        assert_eq!(v["error"]["param"], Value::Null);
        assert!(v["error"]["message"].as_str().unwrap().contains("gone"));
    }
}

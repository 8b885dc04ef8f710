//! The `herd.v1.Worker` gRPC service over the engine and its scheduler.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use futures::{Stream, StreamExt};
use herd_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine::grammar::Constraint;
use crate::engine::{ChatTemplate, Engine, EngineError, FinishReason, GenerationParams, Message, SamplingParams, Step};
use crate::error::WorkerError;
use crate::metrics::WorkerMetrics;
use crate::scheduler::{Load, Scheduler, StepResult, SubmitError};
use crate::tokenized::Tokenized;

/// The loaded engine and the thread that runs it.
pub struct Serving {
    /// Tokenizer, template and model.
    pub engine: Arc<Engine>,
    /// The engine thread's queue and load.
    pub scheduler: Scheduler,
}

/// State shared by the service, the registration loop and the drain logic.
pub struct WorkerCore {
    /// Served names, canonical first.
    pub names: Vec<String>,
    serving: OnceLock<Serving>,
    draining: AtomicBool,
    /// Requests accepted but not yet handed to the scheduler (still tokenizing).
    admitting: AtomicUsize,
    /// Request and token counts.
    pub metrics: WorkerMetrics,
    /// Recent tokenizations, shared by calls with the same prompt.
    tokenized: Tokenized,
    /// Open `WatchLoad` streams (each gateway holds one).
    pub(crate) watchers: Arc<tokio::sync::Semaphore>,
}

impl WorkerCore {
    /// A worker still loading its model.
    pub fn new(names: Vec<String>) -> Self {
        let metrics = WorkerMetrics::new();
        Self {
            names,
            serving: OnceLock::new(),
            draining: AtomicBool::new(false),
            admitting: AtomicUsize::new(0),
            tokenized: Tokenized::new(
                metrics.tokenizations.clone(),
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            ),
            metrics,
            watchers: Arc::new(tokio::sync::Semaphore::new(crate::load_stream::MAX_WATCHERS)),
        }
    }

    /// Marks the model loaded; requests are accepted from now on.
    pub fn set_serving(&self, serving: Serving) {
        let _ = self.serving.set(serving);
    }

    /// Stops accepting new requests; running ones go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The engine and scheduler, once loaded.
    pub fn serving(&self) -> Option<&Serving> {
        self.serving.get()
    }

    /// The scheduler's load, once loaded.
    pub fn load(&self) -> Option<&Arc<Load>> {
        self.serving().map(|s| s.scheduler.load())
    }

    /// Nothing accepted is left unfinished (what a drain waits for).
    pub fn is_idle(&self) -> bool {
        self.admitting.load(Ordering::SeqCst) == 0 && self.load().is_none_or(|l| l.is_idle())
    }

    /// The serving state as Health reports it.
    pub fn state(&self) -> pb::ServingState {
        match (self.serving.get(), self.draining.load(Ordering::SeqCst)) {
            (_, true) => pb::ServingState::Draining,
            (None, false) => pb::ServingState::Loading,
            (Some(_), false) => pb::ServingState::Ready,
        }
    }

    fn serving_model(&self, model: &str) -> Result<&Serving, WorkerError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(WorkerError::Draining);
        }
        let serving = self.serving.get().ok_or(WorkerError::Loading)?;
        if serving.scheduler.load().is_stopped() {
            return Err(WorkerError::Stopped);
        }
        if !model.is_empty() && !self.names.iter().any(|n| n == model) {
            return Err(WorkerError::UnknownModel { model: model.to_string(), served: self.names.clone() });
        }
        Ok(serving)
    }

    /// Accepts a generation: counted from here until it reaches the scheduler, so a drain that
    /// starts meanwhile waits for it.
    fn admit(&self, model: &str) -> Result<(&Serving, Admitting<'_>), WorkerError> {
        let admitting = self.admitting.fetch_add(1, Ordering::SeqCst) + 1;
        let guard = Admitting(&self.admitting);
        let serving = self.serving_model(model)?;
        // Refuse before paying for tokenization; calls still tokenizing count against the
        // queue too, so a burst of long prompts cannot pile up in front of it.
        if serving.scheduler.lacks_room_for(admitting) {
            return Err(WorkerError::QueueFull(serving.scheduler.load().waiting()));
        }
        Ok((serving, guard))
    }
}

/// Holds a request in [`WorkerCore::is_idle`]'s count until it is queued or refused.
struct Admitting<'a>(&'a AtomicUsize);

impl Drop for Admitting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The gRPC service.
pub struct WorkerService {
    core: Arc<WorkerCore>,
}

impl WorkerService {
    /// A service answering for `core`.
    pub fn new(core: Arc<WorkerCore>) -> Self {
        Self { core }
    }
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

fn chat_messages(input: &pb::ChatInput) -> Result<Vec<Message>, WorkerError> {
    if input.messages.is_empty() {
        return Err(WorkerError::InvalidArgument("messages must not be empty".into()));
    }
    input
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if ROLES.contains(&m.role.as_str()) {
                Ok(Message::new(m.role.as_str(), m.content.as_str()))
            } else {
                Err(WorkerError::InvalidArgument(format!(
                    "messages[{i}].role: {:?} is not one of system, user, assistant",
                    m.role
                )))
            }
        })
        .collect()
}

/// A prompt as either RPC carries it.
enum Prompt {
    Chat(pb::ChatInput),
    Text(String),
    Ids(Vec<u32>),
}

impl Prompt {
    fn from_generate(input: Option<pb::generate_request::Input>) -> Result<Self, WorkerError> {
        use pb::generate_request::Input;
        match input {
            Some(Input::Chat(chat)) => Ok(Self::Chat(chat)),
            Some(Input::Text(text)) => Ok(Self::Text(text)),
            Some(Input::TokenIds(ids)) => Ok(Self::Ids(ids.ids)),
            None => Err(WorkerError::InvalidArgument("the request has no input (chat, text or token_ids)".into())),
        }
    }

    fn from_count(input: Option<pb::count_tokens_request::Input>) -> Result<Self, WorkerError> {
        use pb::count_tokens_request::Input;
        match input {
            Some(Input::Chat(chat)) => Ok(Self::Chat(chat)),
            Some(Input::Text(text)) => Ok(Self::Text(text)),
            None => Err(WorkerError::InvalidArgument("the request has no input (chat or text)".into())),
        }
    }

    /// Token ids, rendered and tokenized off the async runtime (a long prompt takes a while),
    /// once for all calls that send the same prompt at about the same time.
    async fn ids(self, engine: &Arc<Engine>, tokenized: &Tokenized) -> Result<Arc<Vec<u32>>, WorkerError> {
        let (bytes, key) = match self {
            Self::Ids(ids) => return Ok(Arc::new(ids)),
            Self::Chat(ref chat) => {
                (chat.messages.iter().map(|m| m.content.len()).sum(), Tokenized::key(&[b"chat", &chat.encode_to_vec()]))
            }
            Self::Text(ref text) => (text.len(), Tokenized::key(&[b"text", text.as_bytes()])),
        };
        engine.check_prompt_bytes(bytes)?;
        let engine = engine.clone();
        let tokenize = async move {
            tokio::task::spawn_blocking(move || match self {
                Self::Chat(chat) => Ok(engine.encode_chat(&chat_messages(&chat)?)?),
                Self::Text(text) => Ok(engine.tokenizer().encode(&text).map_err(crate::engine::EngineError::from)?),
                Self::Ids(ids) => Ok(ids),
            })
            .await
            .map_err(|e| WorkerError::Server(format!("tokenizer task: {e}")))?
        };
        tokenized.ids(key, tokenize).await
    }
}

/// The engine's form of a request's output constraint; a schema that is not JSON is refused.
fn constraint(req: &pb::GenerateRequest) -> Result<Option<Constraint>, WorkerError> {
    use pb::output_constraint::Kind;
    let Some(kind) = req.constraint.as_ref().and_then(|c| c.kind.clone()) else { return Ok(None) };
    Ok(Some(match kind {
        Kind::JsonObject(_) => Constraint::JsonObject,
        Kind::JsonSchema(text) => Constraint::JsonSchema(serde_json::from_str(&text).map_err(|e| {
            WorkerError::from(EngineError::InvalidArgument(format!("the JSON schema is not JSON: {e}")))
        })?),
        Kind::Regex(rx) => Constraint::Regex(rx),
        Kind::Lark(lark) => Constraint::Lark(lark),
    }))
}

fn generation_params(req: &pb::GenerateRequest) -> Result<GenerationParams, WorkerError> {
    let sampling = req.sampling.as_ref().map_or_else(SamplingParams::default, |s| SamplingParams {
        temperature: s.temperature,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
        top_k: s.top_k as usize,
        repetition_penalty: if s.repetition_penalty == 0.0 { 1.0 } else { s.repetition_penalty },
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        min_p: s.min_p,
        logit_bias: s.logit_bias.iter().map(|(&id, &bias)| (id, bias)).collect(),
    });
    Ok(GenerationParams {
        sampling,
        max_tokens: req.max_tokens.map(|n| n as usize),
        stop: req.stop.clone(),
        stop_token_ids: req.stop_token_ids.clone(),
        ignore_eos: req.ignore_eos,
        logprobs: req.logprobs.map(|n| n as usize),
        min_tokens: req.min_tokens as usize,
        include_stop_str_in_output: req.include_stop_str_in_output,
        keep_special_tokens: req.keep_special_tokens,
        constraint: constraint(req)?,
    })
}

fn chunk(step: Step, prompt_tokens: usize, completion_tokens: usize) -> pb::GenerateChunk {
    let logprobs = match (step.logprob, step.token) {
        (Some(lp), Some(_)) => vec![pb::TokenLogprob {
            token: lp.text,
            logprob: lp.logprob,
            top: lp.top.into_iter().map(|alt| pb::TopLogprob { token: alt.text, logprob: alt.logprob }).collect(),
        }],
        _ => Vec::new(),
    };
    let finish_reason = match step.finish {
        None => pb::FinishReason::Unspecified,
        Some(FinishReason::Stop) => pb::FinishReason::Stop,
        Some(FinishReason::Length) => pb::FinishReason::Length,
    };
    let usage = step.finish.map(|_| pb::Usage {
        prompt_tokens: prompt_tokens as u32,
        completion_tokens: completion_tokens as u32,
        cached_prompt_tokens: step.cached_prompt_tokens as u32,
    });
    pb::GenerateChunk {
        text: step.text,
        token_ids: step.token.into_iter().collect(),
        logprobs,
        finish_reason: finish_reason as i32,
        usage,
    }
}

fn request_id<T>(req: &Request<T>) -> String {
    req.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string()
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

/// The steps of one sequence as chunks; a channel that closes before the finishing step (the
/// engine thread died) ends the stream with an error rather than passing for a finished answer.
fn chunks(
    rx: UnboundedReceiver<StepResult>,
    prompt_tokens: usize,
) -> impl Stream<Item = Result<pb::GenerateChunk, Status>> + Send {
    futures::stream::unfold(Some((rx, 0usize)), move |state| async move {
        let (mut rx, sampled) = state?;
        match rx.recv().await {
            Some(Ok(step)) => {
                let finished = step.finish.is_some();
                let chunk = chunk(step, prompt_tokens, sampled + 1);
                Some((Ok(chunk), (!finished).then_some((rx, sampled + 1))))
            }
            Some(Err(e)) => Some((Err(Status::from(WorkerError::from(e))), None)),
            None => Some((Err(Status::from(WorkerError::Stopped)), None)),
        }
    })
}

/// A queued sequence: where its steps arrive, and its prompt length.
type Queued = (UnboundedReceiver<StepResult>, usize);

impl WorkerService {
    /// Validates, tokenizes and queues a generation.
    async fn queue(&self, mut req: pb::GenerateRequest) -> Result<Queued, WorkerError> {
        let (serving, _admitting) = self.core.admit(&req.model)?;
        let engine = serving.engine.clone();
        let ids = Prompt::from_generate(req.input.take())?.ids(&engine, &self.core.tokenized).await?;
        let params = generation_params(&req)?;
        // Compiling an output constraint (and, the first time, the vocabulary's token trie) can
        // take a while: not on the async threads.
        let seq = if params.constraint.is_some() {
            let (engine, ids) = (engine.clone(), ids.clone());
            tokio::task::spawn_blocking(move || engine.start(&ids, &params))
                .await
                .map_err(|e| WorkerError::Server(format!("constraint compile task: {e}")))??
        } else {
            engine.start(&ids, &params)?
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        serving.scheduler.submit(seq, tx).map_err(|e| match e {
            SubmitError::QueueFull => WorkerError::QueueFull(serving.scheduler.load().waiting()),
            SubmitError::Stopped => WorkerError::Stopped,
        })?;
        tracing::debug!(prompt_tokens = ids.len(), "generation queued");
        Ok((rx, ids.len()))
    }
}

/// The `result` label of a Generate call, by the gRPC code its error maps to.
fn result_label<T>(result: &Result<T, WorkerError>) -> &'static str {
    use tonic::Code;
    match result.as_ref().map_err(WorkerError::code) {
        Ok(_) => "ok",
        Err(Code::InvalidArgument | Code::NotFound) => "invalid",
        Err(Code::ResourceExhausted) => "rejected",
        Err(Code::Unavailable) => "unavailable",
        Err(_) => "error",
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type GenerateStream = ChunkStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<ChunkStream>, Status> {
        let span = tracing::info_span!("request", request_id = %request_id(&request));
        let result = self.queue(request.into_inner()).instrument(span).await;
        let metrics = &self.core.metrics;
        metrics.requests.with_label_values(&[result_label(&result)]).inc();
        let (rx, prompt_tokens) = result?;
        metrics.prompt_tokens.inc_by(prompt_tokens as u64);
        let generated = metrics.generated_tokens.clone();
        let stream = chunks(rx, prompt_tokens).inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                generated.inc_by(chunk.token_ids.len() as u64);
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn count_tokens(
        &self,
        request: Request<pb::CountTokensRequest>,
    ) -> Result<Response<pb::CountTokensResponse>, Status> {
        let req = request.into_inner();
        let engine = self.core.serving_model(&req.model)?.engine.clone();
        let ids = Prompt::from_count(req.input)?.ids(&engine, &self.core.tokenized).await?;
        Ok(Response::new(pb::CountTokensResponse {
            tokens: ids.len() as u32,
            context_length: engine.context_length() as u32,
            ids: if req.with_ids { ids.to_vec() } else { Vec::new() },
        }))
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let req = request.into_inner();
        let engine = self.core.serving_model(&req.model)?.engine.clone();
        let vocab = engine.tokenizer().vocab_size();
        let invalid = |message: String| Status::from(WorkerError::from(EngineError::InvalidArgument(message)));
        if req.ids.len() > engine.context_length() {
            return Err(invalid(format!(
                "at most the context length ({}) of ids at once, got {}",
                engine.context_length(),
                req.ids.len()
            )));
        }
        if let Some(id) = req.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(invalid(format!("token id {id} is outside the vocabulary of {vocab}")));
        }
        let text = tokio::task::spawn_blocking(move || engine.tokenizer().decode_with(&req.ids, false))
            .await
            .map_err(|e| WorkerError::Server(format!("tokenizer task: {e}")))?
            .map_err(|e| WorkerError::from(EngineError::from(e)))?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let serving = self.core.serving().ok_or(WorkerError::Loading)?;
        let engine = &serving.engine;
        let tokenizer = engine.tokenizer();
        let tokenizer_json = tokenizer.to_json().map_err(|e| Status::internal(e.to_string()))?;
        let (source, bos_token, eos_token) = match engine.template().0 {
            ChatTemplate::Jinja { source, bos_token, eos_token } => {
                (source.clone(), bos_token.clone(), eos_token.clone())
            }
            ChatTemplate::VicunaV11 | ChatTemplate::OneShot => Default::default(),
        };
        Ok(Response::new(pb::ModelInfoResponse {
            models: self.core.names.clone(),
            context_length: engine.context_length() as u32,
            chat_template: engine.template().0.name().to_string(),
            tokenizer_json,
            bos_token_id: tokenizer.bos_id(),
            add_bos: tokenizer.adds_bos(),
            chat_template_source: source,
            bos_token,
            eos_token,
            kv_block_size: engine.kv_stats().block_size as u32,
        }))
    }

    type WatchLoadStream = crate::load_stream::LoadStream;

    async fn watch_load(&self, _: Request<pb::WatchLoadRequest>) -> Result<Response<Self::WatchLoadStream>, Status> {
        let load = self.core.load().cloned().ok_or(WorkerError::Loading)?;
        let Ok(watcher) = self.core.watchers.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "this worker already streams its load to {} watchers",
                crate::load_stream::MAX_WATCHERS
            )));
        };
        Ok(Response::new(crate::load_stream::updates(load, self.core.clone(), watcher)))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        let load = self.core.load().map(|l| load_report(l));
        Ok(Response::new(pb::HealthResponse { state: self.core.state() as i32, load }))
    }
}

/// A load report for heartbeats and health answers.
pub fn load_report(load: &Load) -> pb::WorkerLoad {
    let kv = load.kv_blocks();
    let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    pb::WorkerLoad {
        running: n(load.running()),
        waiting: n(load.waiting()),
        kv_used_tokens: n(kv.used * kv.block_size),
        kv_budget_tokens: n(kv.total * kv.block_size),
        generated_tokens: load.generated() as u64,
        kv_blocks_used: n(kv.used),
        kv_blocks_cached: n(kv.cached),
        kv_blocks_total: n(kv.total),
        kv_block_size: n(kv.block_size),
        prompt_tokens: load.prompt_tokens() as u64,
        cached_prompt_tokens: load.prefix().1 as u64,
        step_us_by_tokens: load.step_us_by_tokens(),
    }
}

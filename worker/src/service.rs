//! The `herd.v1.Worker` gRPC service over the engine and its scheduler.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use futures::Stream;
use herd_proto::v1 as pb;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, FinishReason, GenerationParams, Message, SamplingParams, Step};
use crate::error::WorkerError;
use crate::scheduler::{Load, Scheduler, SubmitError};

/// The loaded engine and the thread that runs it.
pub struct Serving {
    pub engine: Arc<Engine>,
    pub scheduler: Scheduler,
}

/// State shared by the service, the registration loop and the drain logic.
pub struct WorkerCore {
    /// Served names, canonical first.
    pub names: Vec<String>,
    serving: OnceLock<Serving>,
    draining: AtomicBool,
}

impl WorkerCore {
    /// A worker still loading its model.
    pub fn new(names: Vec<String>) -> Self {
        Self { names, serving: OnceLock::new(), draining: AtomicBool::new(false) }
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

    /// The serving state as Health reports it.
    pub fn state(&self) -> pb::ServingState {
        match (self.serving.get(), self.draining.load(Ordering::SeqCst)) {
            (_, true) => pb::ServingState::Draining,
            (None, false) => pb::ServingState::Loading,
            (Some(_), false) => pb::ServingState::Ready,
        }
    }

    fn accepting(&self, model: &str) -> Result<&Serving, WorkerError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(WorkerError::Draining);
        }
        let serving = self.serving.get().ok_or(WorkerError::Loading)?;
        if !model.is_empty() && !self.names.iter().any(|n| n == model) {
            return Err(WorkerError::UnknownModel { model: model.to_string(), served: self.names.clone() });
        }
        Ok(serving)
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

fn prompt_ids(engine: &Engine, input: Option<&pb::generate_request::Input>) -> Result<Vec<u32>, WorkerError> {
    use pb::generate_request::Input;
    match input {
        Some(Input::Chat(chat)) => Ok(engine.encode_chat(&chat_messages(chat)?)?),
        Some(Input::Text(text)) => Ok(engine.tokenizer().encode(text)?),
        Some(Input::TokenIds(ids)) => Ok(ids.ids.clone()),
        None => Err(WorkerError::InvalidArgument("the request has no input (chat, text or token_ids)".into())),
    }
}

fn generation_params(req: &pb::GenerateRequest) -> GenerationParams {
    let sampling = req.sampling.as_ref().map_or_else(SamplingParams::default, |s| SamplingParams {
        temperature: s.temperature,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
        top_k: s.top_k as usize,
        repetition_penalty: if s.repetition_penalty == 0.0 { 1.0 } else { s.repetition_penalty },
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
    });
    GenerationParams {
        sampling,
        max_tokens: req.max_tokens.map(|n| n as usize),
        stop: req.stop.clone(),
        stop_token_ids: Vec::new(),
        ignore_eos: req.ignore_eos,
        logprobs: req.logprobs.map(|n| n as usize),
    }
}

fn token_text(engine: &Engine, id: u32) -> String {
    engine.tokenizer().decode(&[id]).unwrap_or_default()
}

fn chunk(engine: &Engine, step: Step, prompt_tokens: usize, completion_tokens: usize) -> pb::GenerateChunk {
    let logprobs = match (&step.logprob, step.token) {
        (Some(lp), Some(id)) => vec![pb::TokenLogprob {
            token: token_text(engine, id),
            logprob: lp.logprob,
            top: lp.top.iter().map(|&(t, l)| pb::TopLogprob { token: token_text(engine, t), logprob: l }).collect(),
        }],
        _ => Vec::new(),
    };
    let finish_reason = match step.finish {
        None => pb::FinishReason::Unspecified,
        Some(FinishReason::Stop) => pb::FinishReason::Stop,
        Some(FinishReason::Length) => pb::FinishReason::Length,
    };
    let usage = step
        .finish
        .map(|_| pb::Usage { prompt_tokens: prompt_tokens as u32, completion_tokens: completion_tokens as u32 });
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

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type GenerateStream = ChunkStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<ChunkStream>, Status> {
        let id = request_id(&request);
        let req = request.into_inner();
        let serving = self.core.accepting(&req.model)?;
        let engine = serving.engine.clone();
        let ids = prompt_ids(&engine, req.input.as_ref())?;
        let seq = engine.start(&ids, &generation_params(&req)).map_err(WorkerError::from)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        serving.scheduler.submit(seq, tx).map_err(|e| match e {
            SubmitError::QueueFull => WorkerError::QueueFull(serving.scheduler.load().waiting()),
            SubmitError::Stopped => WorkerError::Stopped,
        })?;
        tracing::debug!(request_id = %id, prompt_tokens = ids.len(), "generation queued");
        let prompt_tokens = ids.len();
        let mut sampled = 0;
        let stream = UnboundedReceiverStream::new(rx).map(move |step| {
            sampled += 1;
            step.map(|s| chunk(&engine, s, prompt_tokens, sampled)).map_err(|e| Status::from(WorkerError::from(e)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn count_tokens(
        &self,
        request: Request<pb::CountTokensRequest>,
    ) -> Result<Response<pb::CountTokensResponse>, Status> {
        use pb::count_tokens_request::Input;
        let req = request.into_inner();
        let serving = self.core.accepting(&req.model)?;
        let engine = &serving.engine;
        let ids = match &req.input {
            Some(Input::Chat(chat)) => engine.encode_chat(&chat_messages(chat)?).map_err(WorkerError::from)?,
            Some(Input::Text(text)) => engine.tokenizer().encode(text).map_err(WorkerError::from)?,
            None => return Err(WorkerError::InvalidArgument("the request has no input (chat or text)".into()).into()),
        };
        Ok(Response::new(pb::CountTokensResponse {
            tokens: ids.len() as u32,
            context_length: engine.context_length() as u32,
        }))
    }

    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let serving = self.core.serving().ok_or(WorkerError::Loading)?;
        let engine = &serving.engine;
        Ok(Response::new(pb::ModelInfoResponse {
            models: self.core.names.clone(),
            context_length: engine.context_length() as u32,
            chat_template: engine.template().0.name().to_string(),
            path: engine.path().display().to_string(),
        }))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        let load =
            self.core.load().map(|l| pb::WorkerLoad { running: l.running() as u32, waiting: l.waiting() as u32 });
        Ok(Response::new(pb::HealthResponse { state: self.core.state() as i32, load }))
    }
}

//! Test doubles, compiled for unit tests only: a scripted fake `Worker` gRPC server and a fake
//! `Controller` that replays watch sessions. They exercise routing and failover, not real generation.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::stream::{self, Stream, StreamExt};
use herd_proto::v1::controller_server::{Controller, ControllerServer};
use herd_proto::v1::worker_server::{Worker, WorkerServer};
use herd_proto::v1::*;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status};

use crate::AbortOnDrop;

/// Calls `app` in-process with a JSON body and extra headers.
pub async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<axum::body::Body>,
) -> axum::response::Response {
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    // JSON unless the test says otherwise.
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type")) {
        req = req.header("content-type", "application/json");
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let mut svc = app.clone();
    tonic::codegen::Service::call(&mut svc, req.body(body.into()).unwrap()).await.unwrap()
}

/// [`call`], then the status, headers and whole body as text.
pub async fn send(
    app: &axum::Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, axum::http::HeaderMap, String) {
    let response = call(app, method, uri, headers, body.to_string()).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

/// A worker record as the controller would send it.
pub fn worker_state(id: &str, address: &str, models: &[&str], waiting: u32) -> WorkerState {
    WorkerState {
        info: Some(WorkerInfo {
            worker_id: id.into(),
            address: address.into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            context_length: 2048,
            max_batch_size: 4,
            max_queue: 8,
            tp_size: 1,
            devices: vec!["cpu".into()],
        }),
        load: Some(WorkerLoad { running: 0, waiting, ..Default::default() }),
    }
}

/// An address where nothing listens (connection refused).
pub async fn dead_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    address
}

/// How the fake worker answers every `Generate`.
#[derive(Clone, Debug)]
pub enum Script {
    /// Streams these pieces; the last one carries the finish reason and usage.
    Reply(Vec<&'static str>),
    /// Fails before the first chunk.
    Refuse(Code, &'static str),
    /// Streams these pieces, then fails with this code.
    DieAfter(Vec<&'static str>, Code),
    /// Streams these pieces, then never ends (until the caller goes away).
    Hang(Vec<&'static str>),
}

/// One `Generate` call the fake received.
#[derive(Clone, Debug)]
pub struct Call {
    /// The request.
    pub request: GenerateRequest,
    /// Its `x-request-id` metadata.
    pub request_id: Option<String>,
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct FakeWorkerService {
    script: Script,
    calls: Arc<Mutex<Vec<Call>>>,
    cancelled: Arc<AtomicBool>,
}

/// Prompt tokens the fake reports for every request.
pub const FAKE_PROMPT_TOKENS: u32 = 7;

fn piece_chunks(pieces: &[&str], request: &GenerateRequest) -> Vec<GenerateChunk> {
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| GenerateChunk {
            text: piece.to_string(),
            token_ids: if piece.is_empty() { vec![] } else { vec![i as u32] },
            logprobs: match request.logprobs {
                Some(k) if !piece.is_empty() => vec![TokenLogprob {
                    token: piece.to_string(),
                    logprob: -0.5,
                    top: (0..k).map(|t| TopLogprob { token: format!("alt{t}"), logprob: -1.0 - t as f32 }).collect(),
                }],
                _ => vec![],
            },
            finish_reason: 0,
            usage: None,
        })
        .collect()
}

#[tonic::async_trait]
impl Worker for FakeWorkerService {
    type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let request_id = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        let request = request.into_inner();
        self.calls.lock().unwrap().push(Call { request: request.clone(), request_id });
        let stream: Self::GenerateStream = match &self.script {
            Script::Refuse(code, message) => return Err(Status::new(*code, *message)),
            Script::Reply(pieces) => {
                let mut chunks = piece_chunks(pieces, &request);
                let produced = chunks.iter().filter(|c| !c.token_ids.is_empty()).count() as u32;
                if let Some(last) = chunks.last_mut() {
                    last.finish_reason = if request.max_tokens == Some(produced) {
                        FinishReason::Length as i32
                    } else {
                        FinishReason::Stop as i32
                    };
                    last.usage = Some(Usage {
                        prompt_tokens: FAKE_PROMPT_TOKENS,
                        completion_tokens: produced,
                        cached_prompt_tokens: 0,
                    });
                }
                stream::iter(chunks.into_iter().map(Ok)).boxed()
            }
            Script::DieAfter(pieces, code) => {
                let code = *code;
                let chunks = piece_chunks(pieces, &request).into_iter().map(Ok);
                stream::iter(chunks)
                    .chain(stream::once(async move { Err(Status::new(code, "worker crashed")) }))
                    .boxed()
            }
            Script::Hang(pieces) => {
                let flag = SetOnDrop(self.cancelled.clone());
                let chunks = piece_chunks(pieces, &request).into_iter().map(Ok);
                stream::iter(chunks)
                    .chain(stream::pending())
                    .map(move |item| {
                        let _alive = &flag;
                        item
                    })
                    .boxed()
            }
        };
        Ok(Response::new(stream))
    }

    async fn count_tokens(&self, _: Request<CountTokensRequest>) -> Result<Response<CountTokensResponse>, Status> {
        Err(Status::unimplemented("fake worker"))
    }

    async fn detokenize(&self, _: Request<DetokenizeRequest>) -> Result<Response<DetokenizeResponse>, Status> {
        Err(Status::unimplemented("fake worker"))
    }

    async fn model_info(&self, _: Request<ModelInfoRequest>) -> Result<Response<ModelInfoResponse>, Status> {
        Err(Status::unimplemented("fake worker"))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Err(Status::unimplemented("fake worker"))
    }

    type WatchLoadStream = Pin<Box<dyn Stream<Item = Result<LoadUpdate, Status>> + Send>>;

    async fn watch_load(&self, _: Request<WatchLoadRequest>) -> Result<Response<Self::WatchLoadStream>, Status> {
        Err(Status::unimplemented("fake worker"))
    }
}

/// A running fake worker; stops when dropped.
pub struct FakeWorker {
    /// Its gRPC address.
    pub address: String,
    calls: Arc<Mutex<Vec<Call>>>,
    cancelled: Arc<AtomicBool>,
    _server: AbortOnDrop,
}

async fn spawn_server(router: tonic::transport::server::Router) -> (String, AbortOnDrop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let incoming = TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        let _ = router.serve_with_incoming(incoming).await;
    });
    (address, AbortOnDrop(task))
}

impl FakeWorker {
    /// Starts a fake worker on 127.0.0.1 with a fresh port.
    pub async fn start(script: Script) -> FakeWorker {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let cancelled = Arc::new(AtomicBool::new(false));
        let service = FakeWorkerService { script, calls: calls.clone(), cancelled: cancelled.clone() };
        let (address, server) = spawn_server(Server::builder().add_service(WorkerServer::new(service))).await;
        FakeWorker { address, calls, cancelled, _server: server }
    }

    /// The `Generate` calls received so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Whether a hanging stream was dropped by the server (the caller went away).
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct FakeControllerService {
    sessions: Arc<Vec<Vec<WorkerEvent>>>,
    count: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Controller for FakeControllerService {
    type WatchWorkersStream = Pin<Box<dyn Stream<Item = Result<WorkerEvent, Status>> + Send>>;

    async fn register_worker(
        &self,
        _: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        Err(Status::unimplemented("fake controller"))
    }

    async fn heartbeat(&self, _: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        Err(Status::unimplemented("fake controller"))
    }

    async fn deregister(&self, _: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        Err(Status::unimplemented("fake controller"))
    }

    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        Err(Status::unimplemented("fake controller"))
    }

    async fn list_workers(&self, _: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        Err(Status::unimplemented("fake controller"))
    }

    async fn watch_workers(
        &self,
        _: Request<WatchWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        let k = self.count.fetch_add(1, Ordering::SeqCst);
        let last = self.sessions.len().saturating_sub(1);
        let events: Vec<Result<WorkerEvent, Status>> =
            self.sessions.get(k.min(last)).cloned().unwrap_or_default().into_iter().map(Ok).collect();
        // Every session but the last ends; the last stays open like a live controller.
        let stream =
            if k < last { stream::iter(events).boxed() } else { stream::iter(events).chain(stream::pending()).boxed() };
        Ok(Response::new(stream))
    }

    async fn pick_worker(&self, _: Request<PickWorkerRequest>) -> Result<Response<PickWorkerResponse>, Status> {
        Err(Status::unimplemented("fake controller"))
    }

    async fn health(
        &self,
        _: Request<herd_proto::v1::ControllerHealthRequest>,
    ) -> Result<Response<herd_proto::v1::ControllerHealthResponse>, Status> {
        Err(Status::unimplemented("fake controller"))
    }
}

/// A running fake controller; each `WatchWorkers` call replays the next session.
pub struct FakeController {
    /// Its gRPC address.
    pub address: String,
    count: Arc<AtomicUsize>,
    _server: AbortOnDrop,
}

impl FakeController {
    /// Starts a fake controller on 127.0.0.1 with a fresh port.
    pub async fn start(sessions: Vec<Vec<WorkerEvent>>) -> FakeController {
        let count = Arc::new(AtomicUsize::new(0));
        let service = FakeControllerService { sessions: Arc::new(sessions), count: count.clone() };
        let (address, server) = spawn_server(Server::builder().add_service(ControllerServer::new(service))).await;
        FakeController { address, count, _server: server }
    }

    /// How many watch sessions were opened.
    pub fn sessions(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

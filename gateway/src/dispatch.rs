//! Sends one choice to a worker: picking, failover before the first chunk, and collecting the output.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herd_ops::AuthChannel;
use herd_proto::v1::worker_client::WorkerClient;
use herd_proto::v1::{GenerateChunk, GenerateRequest, TokenLogprob, Usage, generate_request};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status, Streaming};
use tracing::{debug, warn};

use crate::auth::Reservation;
use crate::metrics::{GatewayMetrics, Pacer, since};
use crate::prefix::Route;
use crate::router::{InflightGuard, Lookup, Picked, WorkerTable};
use crate::{Deadlines, GatewayError};

/// Codes after which a worker is presumed broken: mark it down and try another. `Unknown` is what a
/// connection dropped mid-stream reads as. `Internal` is not here: a live worker answered it about
/// this request, and marking every worker down for one bad request would take the model offline.
pub(crate) fn is_worker_failure(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
}

/// The failure of a worker stream that ended before its finishing chunk.
pub(crate) fn ended_early() -> Status {
    Status::unavailable("the worker's stream ended before the answer finished")
}

/// What all choices of one request share: where to route them and how to label them.
#[derive(Clone)]
pub(crate) struct Ctx {
    /// The live worker table.
    pub table: Arc<WorkerTable>,
    /// The model as requested.
    pub model: String,
    /// Sent to workers as `x-request-id`.
    pub request_id: String,
    /// How long a failed worker is skipped.
    pub down_for: Duration,
    /// The parameter blamed when the worker says the prompt is too long.
    pub prompt_param: &'static str,
    /// Where latencies and token counts go.
    pub metrics: Arc<GatewayMetrics>,
    /// When the request arrived.
    pub started: Instant,
    /// The tokens reserved from the API key's allowance, when keys are on.
    pub reservation: Option<Arc<Reservation>>,
    /// How long a worker may take to accept the call and to send the first token.
    pub deadlines: Deadlines,
    /// The block hashes of the request's prompts, encoded once for all its choices.
    pub prefixes: Arc<tokio::sync::Mutex<Vec<Prefix>>>,
}

impl Ctx {
    /// The context of a request for `model` that arrived at `started`, without a token reservation.
    pub fn new(
        state: &crate::AppState,
        model: String,
        request_id: String,
        prompt_param: &'static str,
        started: Instant,
    ) -> Self {
        Ctx {
            table: state.table.clone(),
            model,
            request_id,
            down_for: state.settings.worker_down_for,
            prompt_param,
            metrics: state.metrics.clone(),
            started,
            reservation: None,
            deadlines: state.settings.deadlines,
            prefixes: Default::default(),
        }
    }

    /// Marks a call with the request id, for the worker's logs.
    fn tag(&self, metadata: &mut MetadataMap) {
        if let Ok(value) = MetadataValue::try_from(self.request_id.as_str()) {
            metadata.insert("x-request-id", value);
        }
    }

    /// What a failed call to `worker_id` means: a full queue or a broken worker lets the caller
    /// try another (noted in `attempts`); any other failure is the request's, and its answer.
    fn failed_over(&self, worker_id: &str, status: &Status, attempts: &mut Attempts) -> Result<(), GatewayError> {
        match status.code() {
            Code::ResourceExhausted => {
                debug!(request_id = %self.request_id, worker = %worker_id, "worker queue full; trying another");
                attempts.exhausted = true;
            }
            code if is_worker_failure(code) => {
                self.worker_failed(worker_id, status);
                attempts.last_failure = Some(status.message().to_string());
            }
            _ => return Err(GatewayError::from_status(status, self.prompt_param)),
        }
        Ok(())
    }

    /// Runs a unary call (`call` with a client of the chosen worker) on the best worker by load,
    /// failing over like [`Ctx::open`] while the failure is the worker's.
    pub async fn unary<T, F, Fut>(&self, call: F) -> Result<T, GatewayError>
    where
        F: Fn(WorkerClient<AuthChannel>, MetadataMap) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut attempts = Attempts::default();
        loop {
            let Some(picked) = self.table.pick(&self.model, &attempts.tried, None) else {
                return Err(self.no_worker(&attempts));
            };
            attempts.tried.insert(picked.worker_id.clone());
            let mut metadata = MetadataMap::new();
            self.tag(&mut metadata);
            let accept = self.deadlines.accept;
            let status = match tokio::time::timeout(accept, call(client(&picked), metadata)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => Status::unavailable(format!("the worker did not answer within {accept:?}")),
            };
            self.failed_over(&picked.worker_id, &status, &mut attempts)?;
        }
    }
}

/// A client of the picked worker, sending and reading messages up to the workers' request limit.
fn client(picked: &Picked) -> WorkerClient<AuthChannel> {
    WorkerClient::new(picked.channel.clone())
        .max_encoding_message_size(herd_proto::MAX_WORKER_REQUEST_BYTES)
        .max_decoding_message_size(herd_proto::MAX_WORKER_REQUEST_BYTES)
}

/// A prompt and its blocks (`None`: not encoded, the call is routed by load).
pub(crate) type Prefix = (Option<generate_request::Input>, Option<Route>);

/// A worker stream that produced its first chunk: from here on the choice is committed to it.
pub(crate) struct Opened {
    /// The worker that answered.
    pub worker_id: String,
    /// Its first chunk.
    pub first: GenerateChunk,
    /// The chunks still to come.
    pub rest: Streaming<GenerateChunk>,
    /// Counts the choice against the worker while it runs.
    pub guard: InflightGuard,
}

/// What one choice has tried so far, so retries go elsewhere and the final error is the right one.
#[derive(Default)]
pub(crate) struct Attempts {
    tried: HashSet<String>,
    /// The prompt's blocks, computed at the first pick when the policy uses them.
    prefix: Option<Option<Route>>,
    exhausted: bool,
    last_failure: Option<String>,
}

/// The whole output of one choice.
#[derive(Default)]
pub(crate) struct Completed {
    /// The worker that produced it.
    pub worker_id: String,
    /// The whole answer.
    pub text: String,
    /// Per-token log probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// The proto `FinishReason`.
    pub finish_reason: i32,
    /// Its token counts.
    pub tally: Tally,
    finished: bool,
    /// Keeps the worker counted until the response is built.
    _guard: Option<InflightGuard>,
}

impl Completed {
    fn push(&mut self, chunk: GenerateChunk) {
        self.text.push_str(&chunk.text);
        self.tally.add(&chunk);
        self.logprobs.extend(chunk.logprobs);
        if chunk.finish_reason != 0 {
            self.finish_reason = chunk.finish_reason;
            self.finished = true;
        }
    }
}

/// Token counts of one choice: the worker's usage (sent with its last chunk), else the ids seen.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    usage: Option<Usage>,
    tokens: u32,
}

impl Tally {
    /// Counts a chunk.
    pub fn add(&mut self, chunk: &GenerateChunk) {
        self.tokens += chunk.token_ids.len() as u32;
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
    }

    /// `(prompt, completion, cached prompt)` tokens.
    pub fn counts(&self) -> (u32, u32, u32) {
        self.usage
            .as_ref()
            .map_or((0, self.tokens, 0), |u| (u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens))
    }
}

impl Ctx {
    /// Records a finished (or abandoned) request's tokens and debits them from the caller.
    pub fn account_for(&self, prompt: u64, completion: u64) {
        self.metrics.tokens(prompt, completion);
        if let Some(reservation) = &self.reservation {
            reservation.settle(prompt + completion);
        }
    }

    /// When the whole request must be done (`--request-timeout` after its arrival).
    pub fn deadline(&self) -> tokio::time::Instant {
        (self.started + self.deadlines.request).into()
    }

    /// Logs a worker failure and skips that worker for `--worker-down-for`.
    pub fn worker_failed(&self, worker_id: &str, status: &Status) {
        warn!(request_id = %self.request_id, worker = %worker_id, code = ?status.code(),
              error = %status.message(), "worker failed; marking it down");
        self.table.mark_down(worker_id, self.down_for);
    }

    /// Starts `request` on the best worker not yet tried and waits for its first chunk,
    /// failing over to the next worker while the failure is the worker's.
    pub async fn open(&self, request: &GenerateRequest, attempts: &mut Attempts) -> Result<Opened, GatewayError> {
        if attempts.prefix.is_none() && self.table.uses_prefix() {
            attempts.prefix = Some(self.prefix(request).await);
        }
        loop {
            let prefix = attempts.prefix.as_ref().and_then(Option::as_ref);
            let Some(picked) = self.table.pick(&self.model, &attempts.tried, prefix) else {
                return Err(self.no_worker(attempts));
            };
            attempts.tried.insert(picked.worker_id.clone());
            let d = &picked.decision;
            debug!(request_id = %self.request_id, worker = %picked.worker_id, address = %picked.address,
                   policy = d.policy, reason = d.reason.label(), overlap_blocks = d.overlap,
                   shared_blocks = d.shared, prompt_blocks = d.prompt_blocks, load = d.load, least_load = d.least_load, "calling worker");
            self.metrics.routed(d);
            let mut client = client(&picked);
            let mut call = tonic::Request::new(request.clone());
            self.tag(call.metadata_mut());
            // A worker that accepts connections and never answers (or never gets to the first
            // token) counts as failed, so the choice moves on instead of hanging.
            let called = Instant::now();
            let Deadlines { accept, first_token, .. } = self.deadlines;
            let first = match tokio::time::timeout(accept, client.generate(call)).await {
                Err(_) => Err(Status::unavailable(format!("the worker did not accept the call within {accept:?}"))),
                Ok(Ok(response)) => {
                    let mut rest = response.into_inner();
                    let first_by = tokio::time::Instant::from(called + first_token).min(self.deadline());
                    match tokio::time::timeout_at(first_by, rest.message()).await {
                        Err(_) if first_by == self.deadline() => {
                            return Err(GatewayError::Timeout { after: self.deadlines.request });
                        }
                        Err(_) => {
                            Err(Status::unavailable(format!("no first token from the worker within {first_token:?}")))
                        }
                        Ok(Ok(Some(first))) => Ok((first, rest)),
                        Ok(Ok(None)) => Err(ended_early()),
                        Ok(Err(status)) => Err(status),
                    }
                }
                Ok(Err(status)) => Err(status),
            };
            match first {
                Ok((first, rest)) => {
                    self.metrics.first_token(since(self.started));
                    return Ok(Opened { worker_id: picked.worker_id, first, rest, guard: picked.guard });
                }
                Err(status) => self.failed_over(&picked.worker_id, &status, attempts)?,
            }
        }
    }

    /// The prompt's KV blocks, shared by the request's choices with the same prompt (they wait
    /// for the first one's encoding rather than each paying for it).
    async fn prefix(&self, request: &GenerateRequest) -> Option<Route> {
        let mut known = self.prefixes.lock().await;
        if let Some((_, route)) = known.iter().find(|(input, _)| *input == request.input) {
            return route.clone();
        }
        let route = self.encode(request).await.map(|hashes| self.table.route(hashes));
        known.push((request.input.clone(), route.clone()));
        route
    }

    /// The prompt's KV block hashes, encoded as the model's workers encode it (off the async
    /// threads: a long prompt takes milliseconds); `None` until a worker has said how, for a
    /// prompt longer than the context could hold, or while every core is already encoding (the
    /// call is then routed by load rather than queued).
    async fn encode(&self, request: &GenerateRequest) -> Option<Vec<u64>> {
        let encoder = self.table.encoder(&self.model)?;
        let context = self.table.context_length(&self.model)? as usize;
        let permit = self.table.encoding_permit()?;
        let request = request.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            encoder.hashes(&request, context)
        })
        .await
        .ok()
        .flatten()
    }

    /// The error when no worker is left to try.
    fn no_worker(&self, attempts: &Attempts) -> GatewayError {
        let model = &self.model;
        if attempts.tried.is_empty() {
            match self.table.lookup(model) {
                Lookup::NotSynced => {
                    return GatewayError::Unavailable {
                        message: "the gateway has not received the worker table from the controller yet".into(),
                    };
                }
                Lookup::Unknown(served) => return GatewayError::model_not_found(model, &served),
                Lookup::Known => {}
            }
        }
        if attempts.exhausted {
            GatewayError::Overloaded { message: format!("every worker serving `{model}` is at capacity; retry later") }
        } else if let Some(failure) = &attempts.last_failure {
            GatewayError::Unavailable {
                message: format!("no healthy worker for model `{model}` (last failure: {failure})"),
            }
        } else {
            GatewayError::Unavailable { message: format!("every worker serving `{model}` is marked down; retry later") }
        }
    }

    /// Runs one choice to the end, restarting it on another worker if one dies before the end
    /// (nothing has reached the client yet, so a restart is invisible), at most once: a request
    /// that kills its workers is not replayed across the whole pool.
    pub async fn complete(&self, request: &GenerateRequest) -> Result<Completed, GatewayError> {
        let mut attempts = Attempts::default();
        let mut replayed = false;
        loop {
            let Opened { worker_id, first, mut rest, guard } = self.open(request, &mut attempts).await?;
            let mut done = Completed::default();
            done.push(first);
            let mut pacer = Pacer::started();
            let failure = loop {
                if done.finished {
                    break None;
                }
                let Ok(next) = tokio::time::timeout_at(self.deadline(), rest.message()).await else {
                    return Err(GatewayError::Timeout { after: self.deadlines.request });
                };
                match next {
                    Ok(Some(chunk)) => {
                        pacer.tick(&self.metrics, chunk.token_ids.len());
                        done.push(chunk)
                    }
                    Ok(None) => break Some(ended_early()),
                    Err(status) => break Some(status),
                }
            };
            match failure {
                None => {
                    done._guard = Some(guard);
                    done.worker_id = worker_id;
                    return Ok(done);
                }
                Some(status) if is_worker_failure(status.code()) => {
                    self.worker_failed(&worker_id, &status);
                    if replayed {
                        return Err(GatewayError::WorkerFailed {
                            message: format!(
                                "the answer failed on two workers, so it is not tried again (last: {})",
                                status.message()
                            ),
                        });
                    }
                    replayed = true;
                    attempts.last_failure = Some(status.message().to_string());
                }
                Some(status) => return Err(GatewayError::from_status(&status, self.prompt_param)),
            }
        }
    }
}

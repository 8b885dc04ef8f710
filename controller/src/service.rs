//! The `herd.v1.Controller` gRPC service over a registry store.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, Stream, StreamExt};
use herd_ops::WorkerIds;
use herd_ops::tls::WORKER_URI_PREFIX;
use herd_proto::v1::controller_server::Controller;
use herd_proto::v1::worker_event::Event;
use herd_proto::v1::{
    ControllerHealthRequest, ControllerHealthResponse, DeregisterRequest, DeregisterResponse, HeartbeatRequest,
    HeartbeatResponse, ListModelsRequest, ListModelsResponse, ListWorkersRequest, ListWorkersResponse, ModelEntry,
    PickWorkerRequest, PickWorkerResponse, RegisterWorkerRequest, RegisterWorkerResponse, WatchWorkersRequest,
    WorkerEvent, WorkerInfo, WorkerLoad, WorkerSnapshot, WorkerState,
};
use rand::seq::IndexedRandom;
use tonic::{Request, Response, Status};

use crate::error::ControllerError;
use crate::metrics::ControllerMetrics;
use crate::registry::{ChangeStream, Lease, Store, WorkerChange};

/// The stream `WatchWorkers` answers with: a snapshot, then one event per change.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WorkerEvent, Status>> + Send>>;

/// A signal every open watch can wait on; `Shared` lets each stream hold its own clone.
type StopSignal = Shared<BoxFuture<'static, ()>>;

/// Serves registration, heartbeats, listings, watches and picks from a registry store.
pub struct ControllerService {
    store: Arc<dyn Store>,
    stop_watches: StopSignal,
    metrics: Arc<ControllerMetrics>,
    max_workers: usize,
    worker_certificates: bool,
}

/// Workers registered at once, unless `--max-workers` says otherwise.
pub const DEFAULT_MAX_WORKERS: usize = 1024;
/// Longest worker id, address, model name and device name, in bytes.
const MAX_ID: usize = 128;
const MAX_ADDRESS: usize = 512;
const MAX_NAME: usize = 128;
const MAX_DEVICE: usize = 32;
/// Most model names (with aliases) and devices one worker may list. With the lengths above, a
/// record stays under 4 KiB, and a registry of the default size's watch snapshot well under
/// [`herd_proto::MAX_WATCH_MESSAGE_BYTES`].
const MAX_MODELS: usize = 16;
const MAX_DEVICES: usize = 16;
/// The largest request the controller reads: registrations are small.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

impl ControllerService {
    /// A service over `store` whose watch streams run until their clients go away.
    pub fn new(store: Arc<dyn Store>) -> Self {
        let metrics = Arc::new(ControllerMetrics::new(store.clone()));
        let stop_watches = futures::future::pending().boxed().shared();
        Self { store, stop_watches, metrics, max_workers: DEFAULT_MAX_WORKERS, worker_certificates: false }
    }

    /// Refuses registrations beyond `max` live workers.
    #[must_use]
    pub fn max_workers(mut self, max: usize) -> Self {
        self.max_workers = max;
        self
    }

    /// With mutual TLS: only a certificate naming a worker id (`urn:herd:worker:<id>`) may
    /// register, heartbeat or deregister that id.
    #[must_use]
    pub fn require_worker_certificates(mut self, on: bool) -> Self {
        self.worker_certificates = on;
        self
    }

    /// Refuses a worker call whose certificate does not name `worker_id`, when certificates are
    /// required.
    fn check_certificate<T>(&self, request: &Request<T>, worker_id: &str) -> Result<(), ControllerError> {
        if !self.worker_certificates {
            return Ok(());
        }
        let ids = WorkerIds::of_peer(request).unwrap_or_default();
        if ids.permits(worker_id) {
            return Ok(());
        }
        tracing::warn!(worker_id, certificate_names = ?ids.patterns(), "refused a worker call from a certificate not naming its id");
        Err(ControllerError::NotThisWorker(if ids.is_worker() {
            format!("this certificate may act only for worker ids {:?}, not {worker_id:?}", ids.patterns())
        } else {
            format!(
                "only a worker certificate may register or act for worker {worker_id:?}: this one names no {WORKER_URI_PREFIX}<id> URI"
            )
        }))
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Arc<ControllerMetrics> {
        &self.metrics
    }

    /// Ends every open (and later) watch stream with Unavailable once `signal` completes. Graceful
    /// shutdown waits for all streams to finish, and a watch never finishes by itself.
    #[must_use]
    pub fn end_watches_on(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.stop_watches = signal.boxed().shared();
        self
    }
}

/// Checks a registering worker's record: the fields others depend on must be present, and
/// nothing may be larger than a real worker's record would be.
fn validate_info(info: Option<WorkerInfo>) -> Result<WorkerInfo, ControllerError> {
    let info = info.ok_or_else(|| ControllerError::InvalidRecord("info is missing".into()))?;
    if info.worker_id.trim().is_empty() {
        return Err(ControllerError::InvalidRecord("worker_id is empty".into()));
    }
    let too_long = |what: &str, value: &str, max: usize| {
        (value.len() > max).then(|| ControllerError::InvalidRecord(format!("{what} is longer than {max} bytes")))
    };
    let too_many = |what: &str, n: usize, max: usize| {
        (n > max).then(|| ControllerError::InvalidRecord(format!("{n} {what}: at most {max} per worker")))
    };
    let checks = [
        too_long("worker_id", &info.worker_id, MAX_ID),
        too_long("address", &info.address, MAX_ADDRESS),
        too_many("model names", info.models.len(), MAX_MODELS),
        too_many("devices", info.devices.len(), MAX_DEVICES),
    ];
    let names = info.models.iter().filter_map(|m| too_long("a model name", m, MAX_NAME));
    let devices = info.devices.iter().filter_map(|d| too_long("a device name", d, MAX_DEVICE));
    if let Some(err) = checks.into_iter().flatten().chain(names).chain(devices).next() {
        return Err(err);
    }
    if info.address.trim().is_empty() {
        return Err(ControllerError::InvalidRecord(format!("worker {:?}: address is empty", info.worker_id)));
    }
    if info.models.is_empty() {
        return Err(ControllerError::InvalidRecord(format!("worker {:?}: models is empty", info.worker_id)));
    }
    if info.models.iter().any(|model| model.trim().is_empty()) {
        return Err(ControllerError::InvalidRecord(format!("worker {:?}: a model name is empty", info.worker_id)));
    }
    Ok(info)
}

/// Checks the id and lease a heartbeat or deregistration names; returns the lease.
fn require_lease(worker_id: &str, lease: &str) -> Result<Lease, ControllerError> {
    if worker_id.trim().is_empty() {
        return Err(ControllerError::InvalidRecord("worker_id is empty".into()));
    }
    if lease.is_empty() {
        return Err(ControllerError::InvalidRecord(format!(
            "worker {worker_id:?}: lease is empty (send the one RegisterWorker returned)"
        )));
    }
    Ok(Lease::of(lease))
}

fn serves(state: &WorkerState, model: &str) -> bool {
    state.info.as_ref().is_some_and(|info| info.models.iter().any(|name| name == model))
}

/// Every model name and alias with how many workers serve it, sorted by name. The context length is
/// the smallest any of them reports, so a request that fits it fits whichever worker gets it.
pub fn model_entries(workers: &[WorkerState]) -> Vec<ModelEntry> {
    let mut entries: BTreeMap<&str, ModelEntry> = BTreeMap::new();
    for info in workers.iter().filter_map(|state| state.info.as_ref()) {
        for (i, name) in info.models.iter().enumerate() {
            // A name listed twice by one worker still counts that worker once.
            if info.models[..i].contains(name) {
                continue;
            }
            let entry = entries.entry(name).or_insert_with(|| ModelEntry {
                name: name.clone(),
                workers: 0,
                context_length: info.context_length,
            });
            entry.workers += 1;
            entry.context_length = entry.context_length.min(info.context_length);
        }
    }
    entries.into_values().collect()
}

/// The least-loaded worker serving `model` (the gateways' measure), chosen at random among ties so
/// that clients without a table of their own still spread out.
pub fn pick_least_loaded(workers: &[WorkerState], model: &str) -> Option<WorkerState> {
    let serving: Vec<&WorkerState> = workers.iter().filter(|state| serves(state, model)).collect();
    // The cluster's one load measure, as each last reported, paced against the others.
    let none = WorkerLoad::default();
    let loads: Vec<&WorkerLoad> = serving.iter().map(|state| state.load.as_ref().unwrap_or(&none)).collect();
    let scores: Vec<f64> =
        loads.iter().zip(herd_proto::paces(&loads)).map(|(load, pace)| load.paced_score(0, pace)).collect();
    let least = scores.iter().copied().min_by(f64::total_cmp)?;
    let tied: Vec<&WorkerState> =
        serving.into_iter().zip(scores).filter(|(_, score)| *score == least).map(|(state, _)| state).collect();
    tied.choose(&mut rand::rng()).map(|state| (*state).clone())
}

/// The TTL as the protocol carries it.
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

fn event(event: Event) -> WorkerEvent {
    WorkerEvent { event: Some(event) }
}

/// The snapshot, then the store's changes, until the changes fail or the service stops its watches.
fn watch_stream(snapshot: Vec<WorkerState>, ttl: Duration, changes: ChangeStream, stop: StopSignal) -> WatchStream {
    let heartbeat_ttl_ms = ttl_ms(ttl);
    let first = event(Event::Snapshot(WorkerSnapshot { workers: snapshot, heartbeat_ttl_ms }));
    let rest = futures::stream::unfold(Some((changes, stop)), |state| async move {
        let (mut changes, mut stop) = state?;
        tokio::select! {
            biased;
            () = &mut stop => Some((Err(Status::unavailable("controller is shutting down; reconnect")), None)),
            change = changes.next() => match change {
                Some(Ok(WorkerChange::Upsert(state))) => Some((Ok(event(Event::Upsert(state))), Some((changes, stop)))),
                Some(Ok(WorkerChange::Removed(id))) => Some((Ok(event(Event::Removed(id))), Some((changes, stop)))),
                Some(Err(err)) => Some((Err(Status::from(err)), None)),
                None => None,
            },
        }
    });
    Box::pin(futures::stream::once(async move { Ok(first) }).chain(rest))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let id = request.get_ref().info.as_ref().map_or("", |info| info.worker_id.as_str());
        self.check_certificate(&request, id)?;
        let request = request.into_inner();
        let info = validate_info(request.info)?;
        let load = request.load.unwrap_or_default();
        crate::registry::validate_load(&info, &load)?;
        if self.store.count().await? >= self.max_workers {
            return Err(ControllerError::TooManyWorkers(self.max_workers).into());
        }
        let state = WorkerState { info: Some(info.clone()), load: Some(load) };
        let secret = herd_ops::auth::random_secret();
        let registered = self.store.register(state, Lease::of(&secret)).await;
        self.metrics.registrations.with_label_values(&[if registered.is_ok() { "ok" } else { "error" }]).inc();
        registered?;
        tracing::info!(
            worker_id = %info.worker_id,
            address = %info.address,
            models = ?info.models,
            context_length = info.context_length,
            tp_size = info.tp_size,
            "worker registered"
        );
        let heartbeat_ttl_ms = ttl_ms(self.store.ttl());
        Ok(Response::new(RegisterWorkerResponse { heartbeat_ttl_ms, lease: secret }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        self.check_certificate(&request, &request.get_ref().worker_id)?;
        let request = request.into_inner();
        let lease = require_lease(&request.worker_id, &request.lease)?;
        let beat = self.store.heartbeat(&request.worker_id, &lease, request.load.unwrap_or_default()).await;
        let result = match &beat {
            Ok(()) => "ok",
            Err(ControllerError::UnknownWorker(_)) => "unknown",
            Err(ControllerError::WrongLease(_)) => "refused",
            Err(_) => "error",
        };
        self.metrics.heartbeats.with_label_values(&[result]).inc();
        beat?;
        Ok(Response::new(HeartbeatResponse {}))
    }

    async fn deregister(&self, request: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        self.check_certificate(&request, &request.get_ref().worker_id)?;
        let request = request.into_inner();
        let lease = require_lease(&request.worker_id, &request.lease)?;
        let removed = self.store.deregister(&request.worker_id, &lease).await.inspect_err(|e| {
            if matches!(e, ControllerError::WrongLease(_)) {
                tracing::warn!(worker_id = %request.worker_id, "refused a deregistration without the worker's lease");
            }
        })?;
        self.metrics.deregistrations.inc();
        let info = removed.info.unwrap_or_default();
        tracing::info!(worker_id = %info.worker_id, address = %info.address, models = ?info.models, "worker deregistered");
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn list_models(&self, _request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let workers = self.store.list().await?;
        Ok(Response::new(ListModelsResponse { models: model_entries(&workers) }))
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let model = request.into_inner().model;
        let mut workers = self.store.list().await?;
        if !model.is_empty() {
            workers.retain(|state| serves(state, &model));
        }
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    type WatchWorkersStream = WatchStream;

    async fn watch_workers(
        &self,
        _request: Request<WatchWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        let (snapshot, changes) = self.store.watch().await?;
        Ok(Response::new(watch_stream(snapshot, self.store.ttl(), changes, self.stop_watches.clone())))
    }

    async fn health(&self, _: Request<ControllerHealthRequest>) -> Result<Response<ControllerHealthResponse>, Status> {
        let workers = self.store.list().await.map_or(0, |w| w.len() as u32);
        let (ready, reason) = match self.store.readiness() {
            Ok(()) => (true, String::new()),
            Err(reason) => (false, reason),
        };
        Ok(Response::new(ControllerHealthResponse { ready, reason, workers }))
    }

    async fn pick_worker(&self, request: Request<PickWorkerRequest>) -> Result<Response<PickWorkerResponse>, Status> {
        let model = request.into_inner().model;
        if model.trim().is_empty() {
            return Err(ControllerError::InvalidRecord("model is empty".into()).into());
        }
        let workers = self.store.list().await?;
        let worker = pick_least_loaded(&workers, &model).ok_or(ControllerError::NoWorkerForModel(model))?;
        Ok(Response::new(PickWorkerResponse { worker: Some(worker) }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::registry::MemoryStore;
    use crate::testing::{load, worker};
    use tonic::Code;

    const PATIENCE: Duration = Duration::from_secs(10);

    fn service() -> ControllerService {
        ControllerService::new(Arc::new(MemoryStore::new(Duration::from_secs(10))))
    }

    /// Registers `state`; returns its lease.
    async fn register(service: &ControllerService, state: WorkerState) -> String {
        let request = RegisterWorkerRequest { info: state.info, load: state.load };
        let lease = service.register_worker(Request::new(request)).await.unwrap().into_inner().lease;
        assert_eq!(lease.len(), 64, "256 bits, hex");
        lease
    }

    fn with_load(mut state: WorkerState, running: u32, waiting: u32) -> WorkerState {
        state.load = Some(load(running, waiting));
        state
    }

    async fn next_event(stream: &mut WatchStream) -> Result<Event, Status> {
        let item = tokio::time::timeout(PATIENCE, stream.next()).await.expect("an event in time").expect("open stream");
        item.map(|event| event.event.expect("an event"))
    }

    #[tokio::test]
    async fn register_replies_with_the_ttl() {
        let service = ControllerService::new(Arc::new(MemoryStore::new(Duration::from_millis(1500))));
        let state = worker("w1", &["vicuna-7b"]);
        let reply = service
            .register_worker(Request::new(RegisterWorkerRequest { info: state.info, load: None }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.heartbeat_ttl_ms, 1500);
        let listed = service.list_workers(Request::new(ListWorkersRequest::default())).await.unwrap().into_inner();
        assert_eq!(listed.workers, vec![worker("w1", &["vicuna-7b"])], "a missing load is stored as zero");
    }

    #[tokio::test]
    async fn malformed_records_are_invalid_argument() {
        let service = service();
        let mut cases: Vec<(&str, Option<WorkerInfo>)> = vec![("missing info", None)];
        let base = worker("w1", &["m"]).info.unwrap();
        cases.push(("empty worker_id", Some(WorkerInfo { worker_id: String::new(), ..base.clone() })));
        cases.push(("empty address", Some(WorkerInfo { address: " ".into(), ..base.clone() })));
        cases.push(("no models", Some(WorkerInfo { models: vec![], ..base.clone() })));
        cases.push(("empty model name", Some(WorkerInfo { models: vec!["m".into(), String::new()], ..base })));
        for (what, info) in cases {
            let err = service.register_worker(Request::new(RegisterWorkerRequest { info, load: None })).await;
            assert_eq!(err.unwrap_err().code(), Code::InvalidArgument, "{what}");
        }
        let err = service.heartbeat(Request::new(HeartbeatRequest::default())).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        register(&service, worker("w1", &["m"])).await;
        let no_lease = HeartbeatRequest { worker_id: "w1".into(), ..Default::default() };
        let err = service.heartbeat(Request::new(no_lease)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("lease"), "{}", err.message());
    }

    #[tokio::test]
    async fn oversized_records_and_impossible_loads_are_refused() {
        let service = service();
        let base = worker("w1", &["m"]).info.unwrap();
        let long = |n: usize| "x".repeat(n);
        let cases = [
            ("worker_id", WorkerInfo { worker_id: long(129), ..base.clone() }),
            ("address", WorkerInfo { address: format!("http://{}", long(600)), ..base.clone() }),
            ("model name", WorkerInfo { models: vec![long(129)], ..base.clone() }),
            ("model names", WorkerInfo { models: (0..17).map(|i| format!("m{i}")).collect(), ..base.clone() }),
            ("devices", WorkerInfo { devices: vec!["cpu".into(); 17], ..base.clone() }),
            ("device name", WorkerInfo { devices: vec![long(33)], ..base.clone() }),
        ];
        for (what, info) in cases {
            let err =
                service.register_worker(Request::new(RegisterWorkerRequest { info: Some(info), load: None })).await;
            let err = err.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{what}");
            assert!(err.message().contains(what), "{what}: {}", err.message());
        }
        // worker() registers a batch of 8 and a queue of 64: 72 sequences at most.
        let over = RegisterWorkerRequest { info: Some(base.clone()), load: Some(load(8, 65)) };
        assert_eq!(service.register_worker(Request::new(over)).await.unwrap_err().code(), Code::InvalidArgument);
        let lease = register(&service, worker("w1", &["m"])).await;
        let beat = |running, waiting| HeartbeatRequest {
            worker_id: "w1".into(),
            load: Some(load(running, waiting)),
            lease: lease.clone(),
        };
        service.heartbeat(Request::new(beat(8, 64))).await.unwrap();
        let err = service.heartbeat(Request::new(beat(0, 1_000_000))).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        let listed = service.list_workers(Request::new(ListWorkersRequest::default())).await.unwrap().into_inner();
        assert_eq!(listed.workers[0].load, Some(load(8, 64)), "the impossible report was not stored");
    }

    #[tokio::test]
    async fn registrations_stop_at_max_workers() {
        let service = service().max_workers(3);
        for i in 0..3 {
            register(&service, worker(&format!("w{i}"), &["m"])).await;
        }
        let extra = RegisterWorkerRequest { info: worker("w3", &["m"]).info, load: None };
        let err = service.register_worker(Request::new(extra)).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.message().contains("--max-workers"), "{}", err.message());
    }

    #[tokio::test]
    async fn a_live_worker_cannot_be_hijacked() {
        let service = service();
        let lease = register(&service, worker("w1", &["m"])).await;
        // Registering the live id again, with another address: refused, and the record stays.
        let mut forged = worker("w1", &["m"]);
        forged.info.as_mut().unwrap().address = "http://10.0.0.66:7001".into();
        let request = RegisterWorkerRequest { info: forged.info, load: None };
        let err = service.register_worker(Request::new(request)).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
        // Someone else's heartbeat (with a huge load, to steer traffic) and deregistration.
        for wrong in ["0".repeat(64), lease.to_uppercase()] {
            let beat =
                HeartbeatRequest { worker_id: "w1".into(), load: Some(load(0, 1_000_000)), lease: wrong.clone() };
            assert_eq!(service.heartbeat(Request::new(beat)).await.unwrap_err().code(), Code::PermissionDenied);
            let leave = DeregisterRequest { worker_id: "w1".into(), lease: wrong };
            assert_eq!(service.deregister(Request::new(leave)).await.unwrap_err().code(), Code::PermissionDenied);
        }
        let listed = service.list_workers(Request::new(ListWorkersRequest::default())).await.unwrap().into_inner();
        assert_eq!(listed.workers, vec![worker("w1", &["m"])]);
        // The worker's own lease still works.
        let beat = HeartbeatRequest { worker_id: "w1".into(), load: Some(load(1, 0)), lease: lease.clone() };
        service.heartbeat(Request::new(beat)).await.unwrap();
        service.deregister(Request::new(DeregisterRequest { worker_id: "w1".into(), lease })).await.unwrap();
    }

    #[tokio::test]
    async fn heartbeat_and_deregister_of_unknown_worker_are_not_found() {
        let service = service();
        let request = HeartbeatRequest { worker_id: "ghost".into(), load: Some(load(1, 0)), lease: "x".into() };
        let err = service.heartbeat(Request::new(request)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("ghost"), "{}", err.message());

        let lease = register(&service, worker("w1", &["m"])).await;
        let deregister =
            || service.deregister(Request::new(DeregisterRequest { worker_id: "w1".into(), lease: lease.clone() }));
        deregister().await.unwrap();
        assert_eq!(deregister().await.unwrap_err().code(), Code::NotFound);
    }

    #[tokio::test]
    async fn with_worker_certificates_required_a_call_without_one_is_refused() {
        let service = service().require_worker_certificates(true);
        let state = worker("w1", &["m"]);
        let request = RegisterWorkerRequest { info: state.info, load: state.load };
        let err = service.register_worker(Request::new(request)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("only a worker certificate"), "{}", err.message());
        let beat = HeartbeatRequest { worker_id: "w1".into(), load: None, lease: "x".into() };
        assert_eq!(service.heartbeat(Request::new(beat)).await.unwrap_err().code(), Code::PermissionDenied);
    }

    #[tokio::test]
    async fn list_models_counts_aliases() {
        let service = service();
        let mut small = worker("w3", &["llama"]);
        small.info.as_mut().unwrap().context_length = 1024;
        register(&service, worker("w1", &["vicuna-7b", "vicuna"])).await;
        register(&service, worker("w2", &["vicuna-7b", "vicuna-7b"])).await;
        register(&service, small).await;
        let models = service.list_models(Request::new(ListModelsRequest {})).await.unwrap().into_inner().models;
        let summary: Vec<_> = models.iter().map(|m| (m.name.as_str(), m.workers, m.context_length)).collect();
        assert_eq!(summary, [("llama", 1, 1024), ("vicuna", 1, 2048), ("vicuna-7b", 2, 2048)]);
    }

    #[tokio::test]
    async fn list_workers_filters_by_model() {
        let service = service();
        register(&service, worker("w1", &["vicuna-7b", "vicuna"])).await;
        register(&service, worker("w2", &["llama"])).await;
        let list = |model: &str| {
            let request = Request::new(ListWorkersRequest { model: model.into() });
            let service = &service;
            async move {
                let workers = service.list_workers(request).await.unwrap().into_inner().workers;
                workers.into_iter().map(|s| s.info.unwrap().worker_id).collect::<Vec<_>>()
            }
        };
        assert_eq!(list("").await, ["w1", "w2"]);
        assert_eq!(list("vicuna").await, ["w1"]);
        assert_eq!(list("llama").await, ["w2"]);
        assert!(list("nope").await.is_empty());
    }

    #[tokio::test]
    async fn health_reports_ready_and_the_worker_count() {
        let service = service();
        register(&service, worker("w", &["m"])).await;
        let health = service.health(Request::new(ControllerHealthRequest {})).await.unwrap().into_inner();
        assert_eq!((health.ready, health.reason.as_str(), health.workers), (true, "", 1));
    }

    #[tokio::test]
    async fn pick_worker_chooses_the_least_loaded() {
        let service = service();
        register(&service, with_load(worker("busy", &["m"]), 2, 1)).await;
        register(&service, with_load(worker("light", &["m", "alias"]), 0, 1)).await;
        register(&service, with_load(worker("idle-other-model", &["other"]), 0, 0)).await;
        for model in ["m", "alias"] {
            let reply = service.pick_worker(Request::new(PickWorkerRequest { model: model.into() })).await.unwrap();
            assert_eq!(reply.into_inner().worker.unwrap().info.unwrap().worker_id, "light");
        }
        let err = service.pick_worker(Request::new(PickWorkerRequest { model: "absent-model".into() })).await;
        let err = err.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("absent-model"), "{}", err.message());
        let err = service.pick_worker(Request::new(PickWorkerRequest::default())).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[test]
    fn pick_breaks_ties_at_random() {
        let workers =
            vec![with_load(worker("a", &["m"]), 1, 0), with_load(worker("b", &["m"]), 0, 1), worker("c", &["n"])];
        let chosen: HashSet<String> =
            (0..200).map(|_| pick_least_loaded(&workers, "m").unwrap().info.unwrap().worker_id).collect();
        assert_eq!(chosen, HashSet::from(["a".to_owned(), "b".to_owned()]));
    }

    #[test]
    fn pick_paces_a_slower_worker() {
        let paced = |id, running, step_us| {
            let mut state = with_load(worker(id, &["m"]), running, 0);
            state.load.as_mut().unwrap().step_us_by_tokens = vec![step_us; 2];
            state
        };
        // Fewer sequences, but each twice as slow: (2 + 1) × 2 > 3 + 1.
        let workers = vec![paced("slow", 2, 50_000), paced("fast", 3, 25_000)];
        assert_eq!(pick_least_loaded(&workers, "m").unwrap().info.unwrap().worker_id, "fast");
    }

    #[tokio::test]
    async fn watch_gives_snapshot_then_changes_until_stopped() {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let service =
            ControllerService::new(Arc::new(MemoryStore::new(Duration::from_secs(10)))).end_watches_on(async move {
                let _ = stop_rx.await;
            });
        let lease = register(&service, worker("w1", &["m"])).await;
        let mut stream = service.watch_workers(Request::new(WatchWorkersRequest {})).await.unwrap().into_inner();
        match next_event(&mut stream).await.unwrap() {
            Event::Snapshot(snapshot) => assert_eq!(snapshot.workers, vec![worker("w1", &["m"])]),
            other => panic!("expected a snapshot first, got {other:?}"),
        }

        service
            .heartbeat(Request::new(HeartbeatRequest {
                worker_id: "w1".into(),
                load: Some(load(2, 3)),
                lease: lease.clone(),
            }))
            .await
            .unwrap();
        register(&service, worker("w2", &["m"])).await;
        service.deregister(Request::new(DeregisterRequest { worker_id: "w1".into(), lease })).await.unwrap();

        assert_eq!(next_event(&mut stream).await.unwrap(), Event::Upsert(with_load(worker("w1", &["m"]), 2, 3)));
        assert_eq!(next_event(&mut stream).await.unwrap(), Event::Upsert(worker("w2", &["m"])));
        assert_eq!(next_event(&mut stream).await.unwrap(), Event::Removed("w1".into()));

        stop_tx.send(()).unwrap();
        assert_eq!(next_event(&mut stream).await.unwrap_err().code(), Code::Unavailable);
        assert!(stream.next().await.is_none(), "the stream ends after the error");
    }
}

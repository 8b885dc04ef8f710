//! The etcd registry store: each worker's record at `{prefix}/v1/workers/{id}` on its own lease, and
//! a local view that a watch keeps current. Reads and watches are served from the view, so they go
//! on while etcd is away; any number of controller replicas share one registry this way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, KeyValue, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use herd_proto::v1::{WorkerLoad, WorkerState};
use prost::Message;
use tokio::sync::broadcast;

use super::{ChangeStream, Lease, Store, StoreStats, WorkerChange, changes, validate_load};
use crate::error::ControllerError;

/// Changes buffered per watcher before a slow one is cut off (and re-reads a snapshot).
const EVENT_CAPACITY: usize = 4096;
/// The longest wait between attempts to reach etcd again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `http://host:port` URLs of the etcd cluster.
    pub endpoints: Vec<String>,
    /// Key prefix; records live under `{prefix}/v1/workers/`.
    pub prefix: String,
    /// User and password, when etcd has auth enabled.
    pub user: Option<(String, String)>,
    /// For https endpoints.
    pub tls: Option<EtcdTls>,
}

/// PEM material for talking to etcd over TLS.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA that signed etcd's certificate (default: none beyond what the endpoint proves).
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key, when etcd requires client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Worker records in etcd, read through a local view.
pub struct EtcdStore {
    client: Client,
    /// `{prefix}/v1/workers/`.
    dir: String,
    /// `{prefix}/v1/leases/`: each record's lease digest, on the same etcd lease as the record and
    /// outside what is watched, so that no reader of the registry sees it.
    leases: String,
    ttl: Duration,
    view: Arc<View>,
}

/// The registry as last read from etcd: records with their lease ids, and the change feed.
struct View {
    table: Mutex<Table>,
    /// Why the view may be stale (the last attempt to reach etcd failed); `None` when in sync.
    stale: Mutex<Option<String>>,
    /// Records seen deleted because their lease ran out.
    expiries: AtomicU64,
}

struct Table {
    workers: HashMap<String, (WorkerState, i64)>,
    events: broadcast::Sender<WorkerChange>,
}

/// Failed etcd calls in this process (one store per controller process, so one count).
static ERRORS: AtomicU64 = AtomicU64::new(0);

fn store_err(e: etcd_client::Error) -> ControllerError {
    ERRORS.fetch_add(1, Ordering::Relaxed);
    ControllerError::Store(format!("etcd: {e}"))
}

fn worker_id(state: &WorkerState) -> &str {
    state.info.as_ref().map_or("", |info| info.worker_id.as_str())
}

impl View {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_stale(&self, reason: Option<String>) {
        *self.stale.lock().unwrap_or_else(PoisonError::into_inner) = reason;
    }

    fn get(&self, id: &str) -> Option<(WorkerState, i64)> {
        self.lock().workers.get(id).cloned()
    }

    fn len(&self) -> usize {
        self.lock().workers.len()
    }

    /// Records a put; publishes an upsert unless the record is already the same.
    fn put(&self, state: WorkerState, lease: i64) {
        let mut table = self.lock();
        let id = worker_id(&state).to_owned();
        if table.workers.get(&id).is_some_and(|(s, l)| *s == state && *l == lease) {
            return;
        }
        table.workers.insert(id, (state.clone(), lease));
        let _ = table.events.send(WorkerChange::Upsert(state));
    }

    fn delete(&self, id: &str) {
        let mut table = self.lock();
        if table.workers.remove(id).is_some() {
            let _ = table.events.send(WorkerChange::Removed(id.to_owned()));
        }
    }

    /// Replaces the whole view after a full read, publishing only the differences.
    fn replace(&self, records: Vec<(WorkerState, i64)>) {
        let fresh: HashMap<String, (WorkerState, i64)> =
            records.into_iter().map(|(s, l)| (worker_id(&s).to_owned(), (s, l))).collect();
        let gone: Vec<String> = self.lock().workers.keys().filter(|id| !fresh.contains_key(*id)).cloned().collect();
        for id in gone {
            self.delete(&id);
        }
        for (state, lease) in fresh.into_values() {
            self.put(state, lease);
        }
    }

    fn snapshot(&self) -> (Vec<WorkerState>, broadcast::Receiver<WorkerChange>) {
        let table = self.lock();
        let mut states: Vec<WorkerState> = table.workers.values().map(|(s, _)| s.clone()).collect();
        states.sort_by(|a, b| worker_id(a).cmp(worker_id(b)));
        (states, table.events.subscribe())
    }
}

impl EtcdStore {
    /// A store on `options.endpoints`. Connecting is lazy: etcd may come up after the controller,
    /// and until it answers the view is empty. Must be called inside a Tokio runtime (it spawns the
    /// task that keeps the view current, which ends when the store is dropped).
    pub async fn connect(options: &EtcdOptions, ttl: Duration) -> Result<Self, ControllerError> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        if let Some((user, password)) = &options.user {
            connect = connect.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &options.tls {
            let mut config = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                config = config.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(config);
        }
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(|e| ControllerError::Config(format!("--etcd-endpoints {:?}: {e}", options.endpoints)))?;
        let dir = format!("{}/v1/workers/", options.prefix.trim_end_matches('/'));
        let leases = format!("{}/v1/leases/", options.prefix.trim_end_matches('/'));
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let view = Arc::new(View {
            table: Mutex::new(Table { workers: HashMap::new(), events }),
            stale: Mutex::new(Some("the registry has not been read from etcd yet".into())),
            expiries: AtomicU64::new(0),
        });
        tokio::spawn(follow(client.clone(), dir.clone(), Arc::downgrade(&view)));
        Ok(Self { client, dir, leases, ttl, view })
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.dir)
    }

    fn lease_key(&self, id: &str) -> String {
        format!("{}{id}", self.leases)
    }

    /// Why a transaction conditioned on `id`'s lease failed: its record is gone, or the lease is
    /// not the registration's.
    async fn refusal(&self, id: &str) -> ControllerError {
        match self.client.clone().get(self.lease_key(id), None).await {
            Ok(resp) if resp.kvs().is_empty() => ControllerError::UnknownWorker(id.to_owned()),
            Ok(_) => ControllerError::WrongLease(id.to_owned()),
            Err(e) => store_err(e),
        }
    }

    /// A worker's record and lease: from the view, else from etcd (the view may still be loading).
    async fn lookup(&self, id: &str) -> Result<(WorkerState, i64), ControllerError> {
        if let Some(found) = self.view.get(id) {
            return Ok(found);
        }
        let resp = self.client.clone().get(self.key(id), None).await.map_err(store_err)?;
        resp.kvs().first().and_then(decode).ok_or_else(|| ControllerError::UnknownWorker(id.to_owned()))
    }
}

fn decode(kv: &KeyValue) -> Option<(WorkerState, i64)> {
    match WorkerState::decode(kv.value()) {
        Ok(state) => Some((state, kv.lease())),
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "ignoring an unreadable worker record");
            None
        }
    }
}

/// Keeps the view equal to etcd: a full read, then a watch from the next revision; a broken watch
/// resumes from the last revision seen, and a compacted one falls back to a full read.
async fn follow(mut client: Client, dir: String, view: Weak<View>) {
    let mut backoff = Duration::from_millis(100);
    let mut next_revision: Option<i64> = None;
    loop {
        let Some(current) = view.upgrade() else { return };
        let step = match next_revision {
            None => read_all(&mut client, &dir, &current).await,
            Some(revision) => watch_from(&mut client, &dir, revision, &view).await,
        };
        match step {
            Ok(next) => {
                backoff = Duration::from_millis(100);
                next_revision = next;
            }
            Err(e) => {
                current.set_stale(Some(e.to_string()));
                tracing::warn!(error = %e, retry_in = ?backoff, "etcd unreachable; serving the last registry view");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Counts a deleted record as expired when its lease is gone (see [`EtcdStore`]'s `deregister`).
fn count_if_expired(mut client: Client, lease: i64, view: Weak<View>) {
    tokio::spawn(async move {
        let Ok(resp) = client.lease_time_to_live(lease, None).await.map_err(store_err) else { return };
        if let Some(view) = view.upgrade().filter(|_| resp.ttl() <= 0) {
            view.expiries.fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// Reads every record; returns the revision to watch from.
async fn read_all(client: &mut Client, dir: &str, view: &View) -> Result<Option<i64>, ControllerError> {
    let resp = client.get(dir, Some(GetOptions::new().with_prefix())).await.map_err(store_err)?;
    let revision = resp.header().map_or(0, |h| h.revision());
    view.replace(resp.kvs().iter().filter_map(decode).collect());
    Ok(Some(revision + 1))
}

/// Applies watch events until the watch breaks; returns where to resume (`None`: read everything).
async fn watch_from(
    client: &mut Client,
    dir: &str,
    mut revision: i64,
    view: &Weak<View>,
) -> Result<Option<i64>, ControllerError> {
    let options = WatchOptions::new().with_prefix().with_start_revision(revision);
    let mut stream = client.watch(dir, Some(options)).await.map_err(store_err)?;
    if let Some(view) = view.upgrade() {
        // Watching from where the view stands: it is current again.
        view.set_stale(None);
    }
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            // A broken stream resumes where it stopped; the events in between are replayed.
            Ok(None) | Err(_) => return Ok(Some(revision)),
        };
        if resp.compact_revision() > 0 || resp.canceled() {
            tracing::warn!(revision, "etcd compacted the watched history; re-reading the registry");
            return Ok(None);
        }
        let Some(view) = view.upgrade() else { return Ok(None) };
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            revision = revision.max(kv.mod_revision() + 1);
            let id = String::from_utf8_lossy(kv.key()).trim_start_matches(dir).to_owned();
            match event.event_type() {
                EventType::Put => {
                    if let Some((state, lease)) = decode(kv) {
                        view.put(state, lease);
                    }
                }
                EventType::Delete => {
                    if let Some((_, lease)) = view.get(&id) {
                        count_if_expired(client.clone(), lease, Arc::downgrade(&view));
                    }
                    view.delete(&id);
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Store for EtcdStore {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn register(&self, mut state: WorkerState, secret: Lease) -> Result<(), ControllerError> {
        let id = worker_id(&state).to_owned();
        if id.is_empty() {
            return Err(ControllerError::InvalidRecord("worker_id is empty".into()));
        }
        state.load.get_or_insert_default();
        let mut client = self.client.clone();
        // etcd leases count whole seconds.
        let ttl_secs = i64::try_from(self.ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX).max(1);
        let lease = client.lease_grant(ttl_secs, None).await.map_err(store_err)?.id();
        let key = self.key(&id);
        let on_lease = || Some(PutOptions::new().with_lease(lease));
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then([
            TxnOp::put(key, state.encode_to_vec(), on_lease()),
            TxnOp::put(self.lease_key(&id), secret.as_bytes(), on_lease()),
        ]);
        let created = client.txn(txn).await.map_err(store_err)?.succeeded();
        if !created {
            let _ = client.lease_revoke(lease).await;
            return Err(ControllerError::DuplicateWorker(id));
        }
        self.view.put(state, lease);
        Ok(())
    }

    async fn heartbeat(&self, worker_id: &str, secret: &Lease, load: WorkerLoad) -> Result<(), ControllerError> {
        let (mut state, lease) = self.lookup(worker_id).await?;
        if let Some(info) = &state.info {
            validate_load(info, &load)?;
        }
        let mut client = self.client.clone();
        state.load = Some(load);
        // Put only if the record is still on this lease, so a late heartbeat cannot resurrect a
        // worker whose lease expired in between, and only for the worker that registered it.
        // The etcd lease is kept alive after that check, never for a caller who failed it.
        let key = self.key(worker_id);
        let txn = Txn::new()
            .when([
                Compare::lease(key.clone(), CompareOp::Equal, lease),
                Compare::value(self.lease_key(worker_id), CompareOp::Equal, secret.as_bytes()),
            ])
            .and_then([TxnOp::put(key, state.encode_to_vec(), Some(PutOptions::new().with_lease(lease)))]);
        if !client.txn(txn).await.map_err(store_err)?.succeeded() {
            return Err(self.refusal(worker_id).await);
        }
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.map_err(store_err)?;
        keeper.keep_alive().await.map_err(store_err)?;
        let alive = answers.message().await.map_err(store_err)?.is_some_and(|a| a.ttl() > 0);
        if !alive {
            self.view.delete(worker_id);
            return Err(ControllerError::UnknownWorker(worker_id.to_owned()));
        }
        self.view.put(state, lease);
        Ok(())
    }

    async fn deregister(&self, worker_id: &str, secret: &Lease) -> Result<WorkerState, ControllerError> {
        let (state, _) = self.lookup(worker_id).await?;
        // Deleting the key drops the worker from every replica's watch. Its lease is left to run
        // out unused, so that a replica seeing the deletion can tell it from an expiry: a
        // deregistered worker's lease is still alive then, an expired worker's is gone.
        let lease_key = self.lease_key(worker_id);
        let txn = Txn::new()
            .when([Compare::value(lease_key.clone(), CompareOp::Equal, secret.as_bytes())])
            .and_then([TxnOp::delete(self.key(worker_id), None), TxnOp::delete(lease_key, None)]);
        if !self.client.clone().txn(txn).await.map_err(store_err)?.succeeded() {
            return Err(self.refusal(worker_id).await);
        }
        self.view.delete(worker_id);
        Ok(state)
    }

    async fn list(&self) -> Result<Vec<WorkerState>, ControllerError> {
        Ok(self.view.snapshot().0)
    }

    async fn count(&self) -> Result<usize, ControllerError> {
        Ok(self.view.len())
    }

    fn stats(&self) -> StoreStats {
        StoreStats { expiries: self.view.expiries.load(Ordering::Relaxed), errors: ERRORS.load(Ordering::Relaxed) }
    }

    fn readiness(&self) -> Result<(), String> {
        self.view.stale.lock().unwrap_or_else(PoisonError::into_inner).clone().map_or(Ok(()), Err)
    }

    async fn watch(&self) -> Result<(Vec<WorkerState>, ChangeStream), ControllerError> {
        let (snapshot, receiver) = self.view.snapshot();
        Ok((snapshot, changes(receiver)))
    }
}

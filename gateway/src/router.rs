//! The worker table: every worker the controller knows, with the load it reports and this
//! gateway's calls to it; a routing policy (`policy`) picks among the healthy ones.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herd_ops::{AbortOnDrop, AuthChannel, ClusterTls, ClusterToken};
use herd_proto::v1::{WorkerEvent, WorkerLoad, WorkerState, worker_event};
use tonic::transport::Endpoint;
use tracing::{debug, warn};

use crate::live::{self, Live};
use crate::policy::{Candidate, KvAware, Policy, Reason};
use crate::prefix::{Branches, Encoder, Encoders, Route};

/// How much history the dashboard's charts get.
const HISTORY: Duration = Duration::from_secs(300);

/// How long dialing a worker or controller may take before the call fails over.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings notice a host that vanished mid-stream, so no stream hangs forever.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC endpoint for a worker or controller URL, with the gateway's timeouts and pings, and
/// the cluster's mutual TLS when it is on.
pub(crate) fn endpoint(url: &str, tls: Option<&ClusterTls>) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    herd_ops::tls::secure(endpoint, tls).map_err(|e| e.to_string())
}

/// Counts one request against a worker's in-flight total until dropped.
#[derive(Debug)]
pub struct InflightGuard(Arc<AtomicUsize>);

impl InflightGuard {
    fn new(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InflightGuard(counter)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A worker chosen for one call: where to send it and the guard that counts it.
#[derive(Debug)]
pub struct Picked {
    /// The worker's id.
    pub worker_id: String,
    /// Its gRPC address.
    pub address: String,
    /// A lazily connected channel to it (shared by all calls), carrying the cluster token.
    pub channel: AuthChannel,
    /// Counts this call in the worker's in-flight total.
    pub guard: InflightGuard,
    /// Why it was chosen.
    pub decision: Decision,
}

/// One routing decision, for the debug log and `herd_gateway_routing_*`.
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    /// The policy's name.
    pub policy: &'static str,
    /// Why it chose this worker.
    pub reason: Reason,
    /// Leading blocks of the prompt the worker holds beyond the `shared` ones other prompts
    /// start with too, and the prompt's full blocks (0 when the policy does not look at prompts).
    pub overlap: usize,
    pub shared: usize,
    pub prompt_blocks: usize,
    /// The chosen worker's load, and the least load among the candidates.
    pub load: f64,
    pub least_load: f64,
}

/// One point of a worker's charts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// When (unix milliseconds).
    pub t_ms: u64,
    /// Tokens per second it generated since the previous point.
    pub tokens_per_second: f64,
    /// Sequences it ran and queued.
    pub running: u32,
    pub waiting: u32,
    /// Share of the prompt tokens since the previous point that it found cached; `None`
    /// when it ran no prompt.
    pub cached_share: Option<f64>,
}

/// One worker as the dashboard shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    /// Its id.
    pub id: String,
    /// Where it is dialed.
    pub address: String,
    /// Served names, canonical first.
    pub models: Vec<String>,
    /// `ready`, `down` (failed a call lately, skipped for a while) or `missing` (absent from the
    /// controller's latest snapshot, kept until its TTL runs out).
    pub state: &'static str,
    /// Sequences it runs, as last reported.
    pub running: u32,
    /// Sequences it queues, as last reported.
    pub waiting: u32,
    /// This gateway's calls in flight to it.
    pub in_flight: usize,
    /// KV-cache tokens in use, as last reported.
    pub kv_used_tokens: u32,
    /// KV-cache budget in tokens (0: none).
    pub kv_budget_tokens: u32,
    /// KV blocks in use, cached (free, holding prefixes later prompts may share) and in all.
    pub kv_blocks_used: u32,
    pub kv_blocks_cached: u32,
    pub kv_blocks_total: u32,
    /// Its load as routing compares it (`WorkerLoad::paced_score`).
    pub load: f64,
    /// How many times slower it steps than the quickest worker of its model (`herd_proto::paces`).
    pub pace: f64,
    /// Whether this gateway has its tokenizer and template, to place prompts by their cached
    /// prefix (kv-aware routing).
    pub encodes_prompts: bool,
    /// Tokens per second it generated lately (the latest chart point).
    pub tokens_per_second: f64,
    /// Tokens generated, prompt tokens run and those found cached, since it started.
    pub generated_tokens: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    /// Its last five minutes, oldest first.
    pub history: Vec<Sample>,
    /// Seconds since its last heartbeat (through the controller).
    pub seconds_since_heartbeat: f64,
    /// Seconds since the load shown here was reported: its `WatchLoad` stream's latest update
    /// while one is up, else its heartbeat.
    pub seconds_since_report: f64,
    /// Its context length.
    pub context_length: u32,
    /// Tensor-parallel ranks.
    pub tp_size: u32,
    /// Devices of its ranks.
    pub devices: Vec<String>,
}

/// What the table knows about a model, to tell a 404 from a 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// No snapshot has arrived yet, so nothing can be said.
    NotSynced,
    /// No worker serves it; the served model names.
    Unknown(Vec<String>),
    /// At least one worker serves it.
    Known,
}

struct Entry {
    state: WorkerState,
    address: String,
    channel: AuthChannel,
    inflight: Arc<AtomicUsize>,
    /// Calls sent since the latest load report, which cannot count them yet.
    unreported: AtomicU32,
    /// The `Live` update count when `unreported` was last cleared.
    live_seen: u64,
    down_until: Option<Instant>,
    /// Set while the worker is missing from the latest snapshot: dropped after this instant.
    missing_until: Option<Instant>,
    first_seen: u64,
    /// When its record last arrived (a heartbeat carries one).
    updated: Instant,
    /// What it streams to this gateway, and the task that follows the stream.
    live: Arc<Live>,
    _follower: Option<AbortOnDrop>,
    /// Chart points, and the totals and time of the latest.
    history: VecDeque<Sample>,
    sampled: Option<(WorkerLoad, Instant)>,
}

impl Entry {
    fn new(
        state: WorkerState,
        (tls, token): (Option<&ClusterTls>, Option<&ClusterToken>),
        encoders: Option<Arc<Encoders>>,
    ) -> Option<Entry> {
        let info = state.info.as_ref()?;
        let address = info.address.clone();
        let channel = match endpoint(&address, tls) {
            Ok(endpoint) => herd_ops::auth::present(endpoint.connect_lazy(), token),
            Err(err) => {
                warn!(worker = %info.worker_id, %address, error = %err, "ignoring worker with an invalid address");
                return None;
            }
        };
        let live = Arc::new(Live::default());
        // Outside a runtime (never in the gateway itself) the table works from heartbeats alone.
        let follower = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let task = live::follow(channel.clone(), live.clone(), encoders, info.worker_id.clone());
            AbortOnDrop(runtime.spawn(task))
        });
        Some(Entry {
            state,
            address,
            channel,
            inflight: Arc::new(AtomicUsize::new(0)),
            unreported: AtomicU32::new(0),
            live_seen: 0,
            down_until: None,
            missing_until: None,
            first_seen: unix_now(),
            updated: Instant::now(),
            live,
            _follower: follower,
            history: VecDeque::new(),
            sampled: None,
        })
    }

    /// Takes a newer record of the same worker.
    fn refresh(&mut self, state: WorkerState) {
        self.state = state;
        self.missing_until = None;
        self.updated = Instant::now();
        if self.live.load().is_none() {
            self.unreported.store(0, Ordering::SeqCst);
        }
    }

    /// Its latest load: the stream's while one is up, else the heartbeat's. A new streamed
    /// report counts every call sent before it.
    fn current_load(&mut self) -> WorkerLoad {
        match self.live.load() {
            Some((load, seq)) => {
                if seq != self.live_seen {
                    self.live_seen = seq;
                    self.unreported.store(0, Ordering::SeqCst);
                }
                load
            }
            None => self.state.load.clone().unwrap_or_default(),
        }
    }

    /// Its load as policies compare it, at `pace` (see [`Inner::paces`]).
    fn score(&mut self, pace: f64) -> f64 {
        let load = self.current_load();
        load.paced_score(self.unreported.load(Ordering::SeqCst), pace)
    }

    /// Adds a chart point and drops those older than [`HISTORY`].
    fn sample(&mut self, now: Instant) {
        let load = self.current_load();
        let (rate, share) = match &self.sampled {
            Some((before, at)) => {
                let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
                let generated = load.generated_tokens.saturating_sub(before.generated_tokens);
                let prompt = load.prompt_tokens.saturating_sub(before.prompt_tokens);
                let cached = load.cached_prompt_tokens.saturating_sub(before.cached_prompt_tokens);
                (generated as f64 / secs, (prompt > 0).then(|| cached.min(prompt) as f64 / prompt as f64))
            }
            None => (0.0, None),
        };
        let t_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.history.push_back(Sample {
            t_ms,
            tokens_per_second: rate,
            running: load.running,
            waiting: load.waiting,
            cached_share: share,
        });
        let oldest = t_ms.saturating_sub(HISTORY.as_millis() as u64);
        while self.history.front().is_some_and(|s| s.t_ms < oldest) {
            self.history.pop_front();
        }
        self.sampled = Some((load, now));
    }

    fn models(&self) -> &[String] {
        self.state.info.as_ref().map(|i| i.models.as_slice()).unwrap_or(&[])
    }

    fn serves(&self, model: &str) -> bool {
        self.models().iter().any(|m| m == model)
    }

    fn is_down(&self, now: Instant) -> bool {
        self.down_until.is_some_and(|until| until > now)
    }
}

#[derive(Default)]
struct Inner {
    workers: HashMap<String, Entry>,
    synced: bool,
}

impl Inner {
    /// How many times slower each of `ids` steps than the quickest of them (`herd_proto::paces`).
    fn paces(&mut self, ids: &[String]) -> Vec<f64> {
        let loads: Vec<WorkerLoad> =
            ids.iter().map(|id| self.workers.get_mut(id).map(Entry::current_load).unwrap_or_default()).collect();
        herd_proto::paces(&loads.iter().collect::<Vec<_>>())
    }
}

/// The gateway's live view of the workers, kept by the watch loop and read by every request.
pub struct WorkerTable {
    inner: Mutex<Inner>,
    tls: Option<ClusterTls>,
    token: Option<ClusterToken>,
    policy: Box<dyn Policy>,
    /// Prompts being encoded for routing: at most one per core.
    encoding: Arc<tokio::sync::Semaphore>,
    /// Where recent prompts branch.
    branches: Branches,
    /// The workers' prompt encoders, one per model.
    encoders: Arc<Encoders>,
}

impl Default for WorkerTable {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            inner: Mutex::default(),
            tls: None,
            token: None,
            policy: Box::new(KvAware::new(crate::DEFAULT_BALANCE_THRESHOLD)),
            encoding: Arc::new(tokio::sync::Semaphore::new(cores)),
            branches: Branches::default(),
            encoders: Arc::default(),
        }
    }
}

/// Seconds since the epoch, for OpenAI's `created` fields.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn id_and_address(state: &WorkerState) -> Option<(String, String)> {
    let info = state.info.as_ref()?;
    (!info.worker_id.is_empty()).then(|| (info.worker_id.clone(), info.address.clone()))
}

impl WorkerTable {
    /// An empty table that has seen no snapshot yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table whose channels to workers use the cluster's mutual TLS and carry its token.
    pub fn with_credentials(tls: Option<ClusterTls>, token: Option<ClusterToken>) -> Self {
        Self { tls, token, ..Self::default() }
    }

    /// The table routing with `policy` instead of the default (kv-aware).
    pub fn with_policy(mut self, policy: Box<dyn Policy>) -> Self {
        self.policy = policy;
        self
    }

    /// The routing policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Whether picks want the prompt's block hashes ([`WorkerTable::encoder`]).
    pub fn uses_prefix(&self) -> bool {
        self.policy.uses_prefix()
    }

    /// How the workers serving `model` encode prompts, once one of them has said.
    pub fn encoder(&self, model: &str) -> Option<Arc<Encoder>> {
        let inner = self.lock();
        inner.workers.values().filter(|e| e.serves(model)).find_map(|e| e.live.encoder())
    }

    /// A prompt's block hashes as routing sees them, noting where it branches from others.
    pub fn route(&self, hashes: Vec<u64>) -> Route {
        self.branches.route(hashes)
    }

    /// Leave to encode one prompt for routing, if a core is free for it.
    pub fn encoding_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.encoding.clone().try_acquire_owned().ok()
    }

    /// Adds a chart point to every worker's history (the gateway calls this every few seconds).
    pub fn sample(&self) {
        let now = Instant::now();
        for entry in self.lock().workers.values_mut() {
            entry.sample(now);
        }
    }

    fn new_entry(&self, state: WorkerState) -> Option<Entry> {
        let encoders = self.policy.uses_prefix().then(|| self.encoders.clone());
        Entry::new(state, (self.tls.as_ref(), self.token.as_ref()), encoders)
    }

    /// The cluster TLS settings channels are made with.
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_ref()
    }

    /// The cluster token calls carry.
    pub fn token(&self) -> Option<&ClusterToken> {
        self.token.as_ref()
    }

    /// Locks the table, first dropping workers that stayed missing from a snapshot past their deadline.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not take routing down with it; the data stays consistent per call.
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        inner.workers.retain(|id, e| {
            let keep = e.missing_until.is_none_or(|until| until > now);
            if !keep {
                debug!(worker = %id, "worker missing from the controller's snapshot expired");
            }
            keep
        });
        inner
    }

    /// Applies one event of the controller's watch stream; true if it was a snapshot.
    pub fn apply_event(&self, event: WorkerEvent) -> bool {
        match event.event {
            Some(worker_event::Event::Snapshot(snapshot)) => {
                self.apply_snapshot(snapshot.workers, Duration::from_millis(snapshot.heartbeat_ttl_ms));
                true
            }
            Some(worker_event::Event::Upsert(state)) => {
                self.upsert(state);
                false
            }
            Some(worker_event::Event::Removed(id)) => {
                self.remove(&id);
                false
            }
            None => false,
        }
    }

    /// Replaces the table, keeping channels, counts and down marks of workers whose address is unchanged.
    ///
    /// A worker missing from the snapshot stays for `keep_missing_for` (the registry's TTL) unless an
    /// upsert brings it back: a restarted controller knows nobody until the workers' next heartbeat.
    pub fn apply_snapshot(&self, workers: Vec<WorkerState>, keep_missing_for: Duration) {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut old = std::mem::take(&mut inner.workers);
        for state in workers {
            let Some((id, address)) = id_and_address(&state) else {
                warn!("ignoring a worker record without an id");
                continue;
            };
            match old.remove(&id).filter(|e| e.address == address) {
                Some(mut entry) => {
                    entry.refresh(state);
                    inner.workers.insert(id, entry);
                }
                None => {
                    if let Some(entry) = self.new_entry(state) {
                        inner.workers.insert(id, entry);
                    }
                }
            }
        }
        if !keep_missing_for.is_zero() {
            let deadline = now + keep_missing_for;
            for (id, mut entry) in old {
                // Already missing from an earlier snapshot: its first deadline stands.
                entry.missing_until = Some(entry.missing_until.map_or(deadline, |d| d.min(deadline)));
                inner.workers.insert(id, entry);
            }
        }
        inner.synced = true;
        debug!(workers = inner.workers.len(), "applied worker snapshot");
    }

    /// Adds a worker or updates its record and load.
    pub fn upsert(&self, state: WorkerState) {
        let Some((id, address)) = id_and_address(&state) else {
            warn!("ignoring a worker record without an id");
            return;
        };
        let mut inner = self.lock();
        match inner.workers.get_mut(&id) {
            Some(entry) if entry.address == address => entry.refresh(state),
            _ => {
                if let Some(entry) = self.new_entry(state) {
                    debug!(worker = %id, %address, "worker added");
                    inner.workers.insert(id, entry);
                }
            }
        }
    }

    /// Forgets a worker that deregistered or expired.
    pub fn remove(&self, worker_id: &str) {
        if self.lock().workers.remove(worker_id).is_some() {
            debug!(worker = %worker_id, "worker removed");
        }
    }

    /// Skips a worker for `duration` after it failed.
    pub fn mark_down(&self, worker_id: &str, duration: Duration) {
        if let Some(entry) = self.lock().workers.get_mut(worker_id) {
            entry.down_until = Some(Instant::now() + duration);
        }
    }

    /// Picks a healthy worker serving `model` (name or alias), skipping `exclude`, with the
    /// routing policy; `prefix` is the prompt's blocks when the policy uses them.
    ///
    /// The call is counted against the worker before the lock is released, so concurrent picks
    /// spread out.
    pub fn pick(&self, model: &str, exclude: &HashSet<String>, prefix: Option<&Route>) -> Option<Picked> {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut ids: Vec<&String> = inner
            .workers
            .iter()
            .filter(|(id, e)| !exclude.contains(*id) && e.serves(model) && !e.is_down(now))
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return None;
        }
        ids.sort();
        let ids: Vec<String> = ids.into_iter().cloned().collect();
        // What a worker holds of the prompt beyond the start other prompts share.
        let shared = prefix.map_or(0, |p| p.shared);
        let paces = inner.paces(&ids);
        let candidates: Vec<Candidate> = ids
            .iter()
            .zip(paces)
            .map(|(id, pace)| {
                let entry = inner.workers.get_mut(id).expect("listed above");
                let overlap = prefix.map_or(0, |p| entry.live.overlap(&p.hashes).saturating_sub(shared));
                Candidate { load: entry.score(pace), overlap }
            })
            .collect();
        let (chosen, reason) = self.policy.choose(&candidates);
        let decision = Decision {
            policy: self.policy.name(),
            reason,
            overlap: candidates[chosen].overlap,
            shared,
            prompt_blocks: prefix.map_or(0, |p| p.hashes.len()),
            load: candidates[chosen].load,
            least_load: candidates.iter().map(|c| c.load).fold(f64::INFINITY, f64::min),
        };
        let id = &ids[chosen];
        let entry = &inner.workers[id];
        entry.unreported.fetch_add(1, Ordering::SeqCst);
        Some(Picked {
            worker_id: id.clone(),
            address: entry.address.clone(),
            channel: entry.channel.clone(),
            guard: InflightGuard::new(entry.inflight.clone()),
            decision,
        })
    }

    /// Whether any worker serves `model`, ignoring health.
    pub fn lookup(&self, model: &str) -> Lookup {
        let inner = self.lock();
        if !inner.synced {
            return Lookup::NotSynced;
        }
        if inner.workers.values().any(|e| e.serves(model)) {
            return Lookup::Known;
        }
        let names: std::collections::BTreeSet<String> =
            inner.workers.values().flat_map(|e| e.models().iter().cloned()).collect();
        Lookup::Unknown(names.into_iter().collect())
    }

    /// The longest context of the workers serving `model`.
    pub fn context_length(&self, model: &str) -> Option<u32> {
        let inner = self.lock();
        let serving = inner.workers.values().filter(|e| e.serves(model));
        serving.filter_map(|e| e.state.info.as_ref().map(|i| i.context_length)).max()
    }

    /// Every served model name and alias, sorted, with the time (unix seconds) it was first seen
    /// and the shortest context of the workers serving it (a request that fits it fits any).
    pub fn models(&self) -> Vec<(String, u64, u32)> {
        let inner = self.lock();
        let mut models: BTreeMap<String, (u64, u32)> = BTreeMap::new();
        for entry in inner.workers.values() {
            let context = entry.state.info.as_ref().map_or(0, |info| info.context_length);
            for name in entry.models() {
                let (created, shortest) = models.entry(name.clone()).or_insert((entry.first_seen, context));
                *created = (*created).min(entry.first_seen);
                *shortest = (*shortest).min(context);
            }
        }
        models.into_iter().map(|(name, (created, context))| (name, created, context)).collect()
    }

    /// Number of workers in the table, healthy or not.
    pub fn len(&self) -> usize {
        self.lock().workers.len()
    }

    /// Every worker as the dashboard shows it, ordered by id.
    pub fn overview(&self) -> Vec<WorkerView> {
        let now = Instant::now();
        let mut inner = self.lock();
        // Each worker's pace among those serving its canonical model.
        let mut by_model: HashMap<String, Vec<String>> = HashMap::new();
        for (id, e) in &inner.workers {
            let model = e.state.info.as_ref().and_then(|info| info.models.first()).cloned().unwrap_or_default();
            by_model.entry(model).or_default().push(id.clone());
        }
        let mut paces: HashMap<String, f64> = HashMap::new();
        for ids in by_model.values() {
            paces.extend(ids.iter().cloned().zip(inner.paces(ids)));
        }
        let mut views: Vec<WorkerView> = inner
            .workers
            .iter_mut()
            .map(|(id, e)| {
                let info = e.state.info.clone().unwrap_or_default();
                let load = e.current_load();
                let pace = paces.get(id).copied().unwrap_or(1.0);
                let score = e.score(pace);
                let state = if e.is_down(now) {
                    "down"
                } else if e.missing_until.is_some() {
                    "missing"
                } else {
                    "ready"
                };
                WorkerView {
                    id: id.clone(),
                    address: e.address.clone(),
                    models: info.models,
                    state,
                    running: load.running,
                    waiting: load.waiting,
                    in_flight: e.inflight.load(Ordering::SeqCst),
                    kv_used_tokens: load.kv_used_tokens,
                    kv_budget_tokens: load.kv_budget_tokens,
                    kv_blocks_used: load.kv_blocks_used,
                    kv_blocks_cached: load.kv_blocks_cached,
                    kv_blocks_total: load.kv_blocks_total,
                    load: score,
                    pace,
                    encodes_prompts: e.live.encoder().is_some(),
                    tokens_per_second: e.history.back().map_or(0.0, |s| s.tokens_per_second),
                    generated_tokens: load.generated_tokens,
                    prompt_tokens: load.prompt_tokens,
                    cached_prompt_tokens: load.cached_prompt_tokens,
                    history: e.history.iter().cloned().collect(),
                    seconds_since_heartbeat: now.duration_since(e.updated).as_secs_f64(),
                    seconds_since_report: now.duration_since(e.live.updated().unwrap_or(e.updated)).as_secs_f64(),
                    context_length: info.context_length,
                    tp_size: info.tp_size,
                    devices: info.devices,
                }
            })
            .collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    /// Per worker: id, gateway in-flight calls, and the running and waiting counts it last reported.
    pub fn loads(&self) -> Vec<(String, usize, u32, u32)> {
        let mut inner = self.lock();
        inner
            .workers
            .iter_mut()
            .map(|(id, e)| {
                let load = e.current_load();
                (id.clone(), e.inflight.load(Ordering::SeqCst), load.running, load.waiting)
            })
            .collect()
    }

    /// Whether the table has no workers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a snapshot has been received since start.
    #[cfg(test)]
    pub fn is_synced(&self) -> bool {
        self.lock().synced
    }

    /// The gateway's in-flight count for a worker, if it is in the table.
    #[cfg(test)]
    pub fn inflight(&self, worker_id: &str) -> Option<usize> {
        self.lock().workers.get(worker_id).map(|e| e.inflight.load(Ordering::SeqCst))
    }

    /// Whether a worker is currently skipped after a failure.
    #[cfg(test)]
    pub fn is_down(&self, worker_id: &str) -> bool {
        self.lock().workers.get(worker_id).is_some_and(|e| e.is_down(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::worker_state;

    fn table(workers: Vec<WorkerState>) -> WorkerTable {
        let table = WorkerTable::new();
        table.apply_snapshot(workers, Duration::ZERO);
        table
    }

    fn none() -> HashSet<String> {
        HashSet::new()
    }

    #[tokio::test]
    async fn picks_least_loaded_by_queue_and_inflight() {
        let t = table(vec![
            worker_state("a", "http://127.0.0.1:1", &["m"], 3),
            worker_state("b", "http://127.0.0.1:2", &["m"], 1),
        ]);
        let first = t.pick("m", &none(), None).unwrap();
        assert_eq!(first.worker_id, "b");
        // b: 1 waiting + 1 in flight = 2 < 3.
        let second = t.pick("m", &none(), None).unwrap();
        assert_eq!(second.worker_id, "b");
        assert_eq!(t.inflight("b"), Some(2));
        // b now scores 3 like a: both are candidates, and a must come up.
        let mut seen = HashSet::new();
        for _ in 0..200 {
            seen.insert(t.pick("m", &none(), None).unwrap().worker_id);
        }
        assert_eq!(seen, HashSet::from(["a".to_string(), "b".to_string()]));
        drop((first, second));
        assert_eq!(t.inflight("b"), Some(0));
    }

    #[tokio::test]
    async fn a_slower_worker_counts_its_sequences_for_more() {
        let paced = |id: &str, running, step_us: u32| {
            let mut state = worker_state(id, &format!("http://127.0.0.1:{}", id.len()), &["m"], 0);
            state.load = Some(WorkerLoad { running, step_us_by_tokens: vec![step_us; 3], ..Default::default() });
            state
        };
        // The slow one runs 2 sequences at half the speed: (2 + 1) × 2 against the fast one's 4 + 1.
        let t = table(vec![paced("slow", 2, 40_000), paced("fast", 4, 20_000)]);
        let picked = t.pick("m", &none(), None).unwrap();
        assert_eq!(picked.worker_id, "fast");
        let views = t.overview();
        assert_eq!(
            views.iter().map(|v| (v.id.as_str(), v.pace, v.load)).collect::<Vec<_>>(),
            [("fast", 1.0, 5.0), ("slow", 2.0, 5.0)]
        );
    }

    #[tokio::test]
    async fn random_tie_break_covers_all() {
        let t = table(vec![
            worker_state("a", "http://127.0.0.1:1", &["m"], 0),
            worker_state("b", "http://127.0.0.1:2", &["m"], 0),
            worker_state("c", "http://127.0.0.1:3", &["m"], 0),
        ]);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..300 {
            *counts.entry(t.pick("m", &none(), None).unwrap().worker_id).or_default() += 1;
        }
        assert_eq!(counts.len(), 3, "{counts:?}");
        assert!(counts.values().all(|&c| c > 30), "{counts:?}");
    }

    #[tokio::test]
    async fn skips_down_excluded_and_other_models() {
        let t = table(vec![
            worker_state("a", "http://127.0.0.1:1", &["m", "alias"], 0),
            worker_state("b", "http://127.0.0.1:2", &["m"], 5),
            worker_state("c", "http://127.0.0.1:3", &["other"], 0),
        ]);
        assert_eq!(t.pick("alias", &none(), None).unwrap().worker_id, "a");
        assert!(t.pick("ali", &none(), None).is_none(), "names match exactly");
        t.mark_down("a", Duration::from_secs(60));
        assert!(t.is_down("a"));
        assert_eq!(t.pick("m", &none(), None).unwrap().worker_id, "b");
        assert!(t.pick("alias", &none(), None).is_none());
        let exclude = HashSet::from(["b".to_string()]);
        assert!(t.pick("m", &exclude, None).is_none());
        t.mark_down("c", Duration::from_millis(0));
        assert_eq!(t.pick("other", &none(), None).unwrap().worker_id, "c", "an expired mark is ignored");
    }

    #[tokio::test]
    async fn snapshot_and_events_keep_counts_of_unchanged_workers() {
        let t = table(vec![worker_state("a", "http://127.0.0.1:1", &["m"], 0)]);
        let guard = t.pick("m", &none(), None).unwrap();
        t.mark_down("a", Duration::from_secs(60));
        t.apply_snapshot(
            vec![
                worker_state("a", "http://127.0.0.1:1", &["m"], 2),
                worker_state("b", "http://127.0.0.1:2", &["m"], 0),
            ],
            Duration::ZERO,
        );
        assert_eq!(t.inflight("a"), Some(1));
        assert!(t.is_down("a"));
        t.upsert(worker_state("a", "http://127.0.0.1:1", &["m"], 4));
        assert_eq!(t.inflight("a"), Some(1));
        // A new address is a new process: fresh entry.
        t.upsert(worker_state("a", "http://127.0.0.1:9", &["m"], 0));
        assert_eq!(t.inflight("a"), Some(0));
        assert!(!t.is_down("a"));
        drop(guard);
        t.remove("b");
        assert_eq!(t.len(), 1);
        assert_eq!(t.models().iter().map(|(m, _, _)| m.as_str()).collect::<Vec<_>>(), ["m"]);
    }

    #[tokio::test]
    async fn lookup_tells_unknown_from_unsynced() {
        let t = WorkerTable::new();
        assert_eq!(t.lookup("m"), Lookup::NotSynced);
        t.upsert(worker_state("a", "http://127.0.0.1:1", &["m", "x"], 0));
        assert_eq!(t.lookup("m"), Lookup::NotSynced, "only a snapshot syncs");
        t.apply_snapshot(vec![worker_state("a", "http://127.0.0.1:1", &["m", "x"], 0)], Duration::ZERO);
        assert_eq!(t.lookup("m"), Lookup::Known);
        assert_eq!(t.lookup("y"), Lookup::Unknown(vec!["m".into(), "x".into()]));
    }

    #[tokio::test]
    async fn workers_missing_from_a_snapshot_are_kept_for_the_ttl() {
        let t = table(vec![
            worker_state("a", "http://127.0.0.1:1", &["m"], 0),
            worker_state("b", "http://127.0.0.1:2", &["m"], 0),
            worker_state("c", "http://127.0.0.1:3", &["m"], 0),
        ]);
        // A restarted controller only knows "a" so far.
        t.apply_snapshot(vec![worker_state("a", "http://127.0.0.1:1", &["m"], 0)], Duration::from_millis(200));
        assert_eq!(t.len(), 3);
        t.upsert(worker_state("b", "http://127.0.0.1:2", &["m"], 0));
        t.remove("c");
        assert_eq!(t.len(), 2);
        t.apply_snapshot(vec![worker_state("a", "http://127.0.0.1:1", &["m"], 0)], Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(250));
        // "b" missed its heartbeat window: gone.
        assert_eq!(t.len(), 1);
        assert!(t.inflight("b").is_none());
        // Without a TTL a snapshot replaces the table outright.
        t.apply_snapshot(vec![], Duration::ZERO);
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn overview_reports_state_rates_and_history() {
        let t = table(vec![
            worker_state("a", "http://127.0.0.1:1", &["m"], 1),
            worker_state("b", "http://127.0.0.1:2", &["m"], 0),
        ]);
        let beat = |tokens: u64, prompt: u64, cached: u64| {
            let mut state = worker_state("a", "http://127.0.0.1:1", &["m"], 1);
            let load = state.load.as_mut().unwrap();
            (load.generated_tokens, load.prompt_tokens, load.cached_prompt_tokens) = (tokens, prompt, cached);
            load.running = 2;
            state
        };
        t.upsert(beat(100, 1000, 0));
        t.sample();
        std::thread::sleep(Duration::from_millis(200));
        t.upsert(beat(140, 1400, 300));
        t.sample();
        t.mark_down("b", Duration::from_secs(60));
        let views = t.overview();
        let ids: Vec<&str> = views.iter().map(|v| v.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let a = &views[0];
        assert_eq!((a.state, a.running, a.waiting), ("ready", 2, 1));
        assert_eq!((a.generated_tokens, a.prompt_tokens, a.cached_prompt_tokens), (140, 1400, 300));
        // 40 tokens in about 0.2 s; 300 of 400 prompt tokens cached.
        assert!((120.0..=210.0).contains(&a.tokens_per_second), "{}", a.tokens_per_second);
        assert_eq!(a.history.len(), 2);
        assert_eq!(a.history[1].cached_share, Some(0.75));
        assert_eq!(a.history[0].cached_share, None, "the first point has nothing to compare with");
        assert!(a.seconds_since_heartbeat < 0.2);
        assert_eq!(views[1].state, "down");
        // No new tokens since the last point: idle.
        t.sample();
        assert_eq!(t.overview()[0].tokens_per_second, 0.0);
    }
}

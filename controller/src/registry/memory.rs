//! The in-process registry store: for `herd up`, single-replica controllers and tests.

use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use herd_proto::v1::{WorkerLoad, WorkerState};
use tokio::sync::broadcast;
use tokio::time::{Instant, MissedTickBehavior};

use super::{ChangeStream, Lease, Store, StoreStats, WorkerChange, changes, validate_load};
use crate::error::ControllerError;

/// Changes buffered per watcher before a slow one is cut off (and re-reads a snapshot).
const EVENT_CAPACITY: usize = 4096;
/// The expiry sweep never waits longer than this, so long TTLs still expire promptly.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Keeps tiny TTLs from turning the sweep into a busy loop.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(5);

/// Worker records in a mutex-guarded map, a broadcast channel for changes, and a background task
/// that expires records whose TTL has passed.
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    ttl: Duration,
    table: Mutex<Table>,
    expiries: AtomicU64,
}

/// The records and the change feed live under one lock, so a change is published in the same
/// critical section that applies it: watchers see changes in order and a snapshot never races one.
struct Table {
    workers: HashMap<String, Entry>,
    events: broadcast::Sender<WorkerChange>,
}

struct Entry {
    state: WorkerState,
    lease: Lease,
    expires_at: Instant,
}

impl MemoryStore {
    /// A store whose records live `ttl` past their last register or heartbeat. Must be called
    /// inside a Tokio runtime: it spawns the expiry task, which ends once the store is dropped.
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Self::with_event_capacity(ttl, EVENT_CAPACITY)
    }

    fn with_event_capacity(ttl: Duration, capacity: usize) -> Self {
        let (events, _) = broadcast::channel(capacity);
        let shared = Arc::new(Shared {
            ttl,
            table: Mutex::new(Table { workers: HashMap::new(), events }),
            expiries: AtomicU64::new(0),
        });
        // A fraction of the TTL, so a silent worker is gone within about 1.1 x TTL (at most TTL + 1 s).
        let every = (ttl / 10).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL);
        tokio::spawn(expire_periodically(Arc::downgrade(&shared), every));
        Self { shared }
    }
}

/// The expiry task holds only a weak reference, so dropping the store stops it at the next tick.
async fn expire_periodically(shared: Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else { break };
        let expired = shared.lock().expire(Instant::now());
        shared.note_expired(&expired);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // No critical section leaves the table half-updated, so a panic elsewhere does not taint it.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs and counts the records [`Table::expire`] removed.
    fn note_expired(&self, expired: &[WorkerState]) {
        self.expiries.fetch_add(expired.len() as u64, Ordering::Relaxed);
        for state in expired {
            let info = state.info.clone().unwrap_or_default();
            tracing::warn!(
                worker_id = %info.worker_id,
                address = %info.address,
                models = ?info.models,
                "worker expired: no heartbeat within the TTL"
            );
        }
    }
}

impl Table {
    /// Drops records past their TTL and publishes their removal. Every operation calls this first,
    /// so a record past its TTL is gone even if the sweep has not reached it yet.
    fn expire(&mut self, now: Instant) -> Vec<WorkerState> {
        let expired_ids: Vec<String> =
            self.workers.iter().filter(|(_, entry)| entry.expires_at <= now).map(|(id, _)| id.clone()).collect();
        let mut expired = Vec::with_capacity(expired_ids.len());
        for id in expired_ids {
            if let Some(entry) = self.workers.remove(&id) {
                expired.push(entry.state);
                self.publish(WorkerChange::Removed(id));
            }
        }
        expired
    }

    fn publish(&self, change: WorkerChange) {
        // An error only means nobody is watching right now.
        let _ = self.events.send(change);
    }

    fn snapshot(&self) -> Vec<WorkerState> {
        let mut states: Vec<WorkerState> = self.workers.values().map(|entry| entry.state.clone()).collect();
        states.sort_by(|a, b| worker_id(a).cmp(worker_id(b)));
        states
    }
}

fn worker_id(state: &WorkerState) -> &str {
    state.info.as_ref().map_or("", |info| info.worker_id.as_str())
}

#[tonic::async_trait]
impl Store for MemoryStore {
    fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    fn stats(&self) -> StoreStats {
        StoreStats { expiries: self.shared.expiries.load(Ordering::Relaxed), errors: 0 }
    }

    async fn register(&self, mut state: WorkerState, lease: Lease) -> Result<(), ControllerError> {
        let id = worker_id(&state).to_owned();
        if id.is_empty() {
            return Err(ControllerError::InvalidRecord("worker_id is empty".into()));
        }
        state.load.get_or_insert_default();
        let now = Instant::now();
        let mut table = self.shared.lock();
        let expired = table.expire(now);
        let result = match table.workers.entry(id) {
            Slot::Occupied(taken) => Err(ControllerError::DuplicateWorker(taken.key().clone())),
            Slot::Vacant(free) => {
                free.insert(Entry { state: state.clone(), lease, expires_at: now + self.shared.ttl });
                table.publish(WorkerChange::Upsert(state));
                Ok(())
            }
        };
        drop(table);
        self.shared.note_expired(&expired);
        result
    }

    async fn heartbeat(&self, worker_id: &str, lease: &Lease, load: WorkerLoad) -> Result<(), ControllerError> {
        let now = Instant::now();
        let mut guard = self.shared.lock();
        let expired = guard.expire(now);
        let table = &mut *guard;
        let result = match table.workers.get_mut(worker_id) {
            Some(entry) if !entry.lease.matches(lease) => Err(ControllerError::WrongLease(worker_id.to_owned())),
            Some(entry) => match entry.state.info.as_ref().map_or(Ok(()), |info| validate_load(info, &load)) {
                Err(e) => Err(e),
                Ok(()) => {
                    entry.state.load = Some(load);
                    entry.expires_at = now + self.shared.ttl;
                    let _ = table.events.send(WorkerChange::Upsert(entry.state.clone()));
                    Ok(())
                }
            },
            None => Err(ControllerError::UnknownWorker(worker_id.to_owned())),
        };
        drop(guard);
        self.shared.note_expired(&expired);
        result
    }

    async fn deregister(&self, worker_id: &str, lease: &Lease) -> Result<WorkerState, ControllerError> {
        let mut table = self.shared.lock();
        let expired = table.expire(Instant::now());
        let result = match table.workers.entry(worker_id.to_owned()) {
            Slot::Occupied(entry) if !entry.get().lease.matches(lease) => {
                Err(ControllerError::WrongLease(worker_id.to_owned()))
            }
            Slot::Occupied(entry) => {
                let entry = entry.remove();
                table.publish(WorkerChange::Removed(worker_id.to_owned()));
                Ok(entry.state)
            }
            Slot::Vacant(_) => Err(ControllerError::UnknownWorker(worker_id.to_owned())),
        };
        drop(table);
        self.shared.note_expired(&expired);
        result
    }

    async fn list(&self) -> Result<Vec<WorkerState>, ControllerError> {
        let mut table = self.shared.lock();
        let expired = table.expire(Instant::now());
        let states = table.snapshot();
        drop(table);
        self.shared.note_expired(&expired);
        Ok(states)
    }

    async fn count(&self) -> Result<usize, ControllerError> {
        let mut table = self.shared.lock();
        let expired = table.expire(Instant::now());
        let count = table.workers.len();
        drop(table);
        self.shared.note_expired(&expired);
        Ok(count)
    }

    async fn watch(&self) -> Result<(Vec<WorkerState>, ChangeStream), ControllerError> {
        let mut table = self.shared.lock();
        // Expire before subscribing, so the watcher is not told to remove what its snapshot lacks.
        let expired = table.expire(Instant::now());
        let snapshot = table.snapshot();
        let receiver = table.events.subscribe();
        drop(table);
        self.shared.note_expired(&expired);
        Ok((snapshot, changes(receiver)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{lease, load, worker};
    use futures::StreamExt;

    /// Generous: the machine running the tests may be busy.
    const PATIENCE: Duration = Duration::from_secs(10);

    async fn next_change(stream: &mut ChangeStream) -> WorkerChange {
        tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("a change within the timeout")
            .expect("the stream is still open")
            .expect("a change, not an error")
    }

    #[tokio::test]
    async fn worker_expires_after_ttl_and_removal_is_emitted() {
        let store = MemoryStore::new(Duration::from_millis(200));
        assert_eq!(store.ttl(), Duration::from_millis(200));
        let (snapshot, mut changes) = store.watch().await.unwrap();
        assert!(snapshot.is_empty());
        store.register(worker("w1", &["vicuna-7b"]), lease()).await.unwrap();
        assert!(matches!(next_change(&mut changes).await, WorkerChange::Upsert(_)));
        // No heartbeats: the sweep removes it on its own.
        assert_eq!(next_change(&mut changes).await, WorkerChange::Removed("w1".into()));
        assert!(store.list().await.unwrap().is_empty());
        let err = store.heartbeat("w1", &lease(), load(0, 0)).await.unwrap_err();
        assert!(matches!(err, ControllerError::UnknownWorker(id) if id == "w1"));
        assert_eq!(store.stats(), StoreStats { expiries: 1, errors: 0 });
    }

    #[tokio::test]
    async fn heartbeat_refreshes_ttl_and_publishes_load() {
        let ttl = Duration::from_millis(500);
        let store = MemoryStore::new(ttl);
        store.register(worker("w1", &["m"]), lease()).await.unwrap();
        let (_, mut changes) = store.watch().await.unwrap();
        // Heartbeat for three TTLs: without the refresh it would have expired.
        let start = std::time::Instant::now();
        let mut beats = 0u32;
        while start.elapsed() < 3 * ttl {
            store.heartbeat("w1", &lease(), load(beats, 1)).await.unwrap();
            beats += 1;
            tokio::time::sleep(ttl / 10).await;
        }
        let listed = store.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].load, Some(load(beats - 1, 1)));
        // Every heartbeat is an upsert carrying the load it reported.
        for beat in 0..beats {
            match next_change(&mut changes).await {
                WorkerChange::Upsert(state) => assert_eq!(state.load, Some(load(beat, 1))),
                other => panic!("expected an upsert, got {other:?}"),
            }
        }
        // Once the heartbeats stop, it expires.
        assert_eq!(next_change(&mut changes).await, WorkerChange::Removed("w1".into()));
    }

    #[tokio::test]
    async fn heartbeat_of_unknown_worker_is_unknown() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let err = store.heartbeat("ghost", &lease(), load(1, 2)).await.unwrap_err();
        assert!(matches!(err, ControllerError::UnknownWorker(id) if id == "ghost"));
    }

    #[tokio::test]
    async fn watch_gives_snapshot_then_changes() {
        let store = MemoryStore::new(Duration::from_secs(10));
        store.register(worker("b", &["m"]), lease()).await.unwrap();
        store.register(worker("a", &["m"]), lease()).await.unwrap();
        let (snapshot, mut changes) = store.watch().await.unwrap();
        let ids: Vec<_> = snapshot.iter().map(|s| s.info.as_ref().unwrap().worker_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);

        store.heartbeat("a", &lease(), load(3, 4)).await.unwrap();
        store.deregister("b", &lease()).await.unwrap();
        store.register(worker("c", &["n"]), lease()).await.unwrap();

        let mut expected_a = worker("a", &["m"]);
        expected_a.load = Some(load(3, 4));
        assert_eq!(next_change(&mut changes).await, WorkerChange::Upsert(expected_a));
        assert_eq!(next_change(&mut changes).await, WorkerChange::Removed("b".into()));
        assert_eq!(next_change(&mut changes).await, WorkerChange::Upsert(worker("c", &["n"])));
    }

    #[tokio::test]
    async fn deregister_removes_and_returns_the_record() {
        let store = MemoryStore::new(Duration::from_secs(10));
        store.register(worker("w1", &["m"]), lease()).await.unwrap();
        let removed = store.deregister("w1", &lease()).await.unwrap();
        assert_eq!(removed, worker("w1", &["m"]));
        assert!(store.list().await.unwrap().is_empty());
        assert!(matches!(store.deregister("w1", &lease()).await, Err(ControllerError::UnknownWorker(_))));
        assert!(matches!(store.heartbeat("w1", &lease(), load(0, 0)).await, Err(ControllerError::UnknownWorker(_))));
        assert_eq!(store.stats().expiries, 0, "a deregistration is not an expiry");
    }

    #[tokio::test]
    async fn only_the_registration_holds_its_id() {
        let store = MemoryStore::new(Duration::from_millis(300));
        store.register(worker("w1", &["real"]), lease()).await.unwrap();
        // Another registration of the live id, a heartbeat and a deregistration without its lease:
        // all refused, and the record is untouched.
        let other = Lease::of(&herd_ops::auth::random_secret());
        let err = store.register(worker("w1", &["forged"]), other.clone()).await.unwrap_err();
        assert!(matches!(err, ControllerError::DuplicateWorker(ref id) if id == "w1"), "{err:?}");
        let err = store.heartbeat("w1", &other, load(0, 1000)).await.unwrap_err();
        assert!(matches!(err, ControllerError::WrongLease(ref id) if id == "w1"), "{err:?}");
        let err = store.deregister("w1", &other).await.unwrap_err();
        assert!(matches!(err, ControllerError::WrongLease(_)), "{err:?}");
        assert_eq!(store.list().await.unwrap(), vec![worker("w1", &["real"])]);
        // Once the record expires, the id is free again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        store.register(worker("w1", &["next"]), other).await.unwrap();
        assert_eq!(store.list().await.unwrap(), vec![worker("w1", &["next"])]);
    }

    #[tokio::test]
    async fn lagging_watcher_ends_with_an_error() {
        let store = MemoryStore::with_event_capacity(Duration::from_secs(10), 4);
        store.register(worker("w1", &["m"]), lease()).await.unwrap();
        let (_, mut changes) = store.watch().await.unwrap();
        for beat in 0..10 {
            store.heartbeat("w1", &lease(), load(beat, 0)).await.unwrap();
        }
        let first = tokio::time::timeout(PATIENCE, changes.next()).await.unwrap();
        assert!(matches!(first, Some(Err(ControllerError::WatchLagged(_)))), "{first:?}");
        assert!(changes.next().await.is_none(), "the stream ends after the error");
    }

    #[tokio::test]
    async fn dropping_the_store_ends_watches_with_an_error() {
        let store = MemoryStore::new(Duration::from_millis(50));
        let (_, mut changes) = store.watch().await.unwrap();
        drop(store);
        // The expiry task holds only a weak reference, so the channel closes once the store is gone.
        let end = tokio::time::timeout(PATIENCE, changes.next()).await.unwrap();
        assert!(matches!(end, Some(Err(ControllerError::Store(_)))), "{end:?}");
        assert!(changes.next().await.is_none());
    }
}

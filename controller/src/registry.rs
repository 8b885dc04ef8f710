//! The registry store: worker records that live for a TTL unless refreshed, plus a feed of changes.
//!
//! The trait speaks of records, TTLs and change events rather than maps and locks so that an etcd
//! store (a lease per worker, a watch on the key prefix) can implement it with the same meaning.

mod etcd;
mod memory;

pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use memory::MemoryStore;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use herd_proto::v1::{WorkerInfo, WorkerLoad, WorkerState};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::error::ControllerError;

/// One change to the registry, in the order the store applied it.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerChange {
    /// A worker registered, re-registered or reported new load; carries its whole record.
    Upsert(WorkerState),
    /// A worker deregistered or expired; carries its id.
    Removed(String),
}

/// Checks a load report against what the worker registered: it cannot run or queue more than
/// its batch and queue hold (a report that could would steer every gateway).
pub(crate) fn validate_load(info: &WorkerInfo, load: &WorkerLoad) -> Result<(), ControllerError> {
    let capacity = u64::from(info.max_batch_size) + u64::from(info.max_queue);
    let reported = u64::from(load.running) + u64::from(load.waiting);
    if capacity > 0 && reported > capacity {
        return Err(ControllerError::InvalidRecord(format!(
            "worker {:?} reports {reported} running and waiting sequences, more than its batch and queue hold \
             ({capacity})",
            info.worker_id
        )));
    }
    Ok(())
}

/// A registration's lease as stores keep it: the digest of the secret only its worker holds
/// ([`herd_ops::auth::random_secret`]).
pub type Lease = herd_ops::auth::SecretDigest;

/// What a store counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Workers removed because no heartbeat came within the TTL.
    pub expiries: u64,
    /// Failed calls to the backing service (etcd); always 0 in memory.
    pub errors: u64,
}

/// The changes after a watch's snapshot. It ends with an error (never silently) when the watcher
/// can no longer be given every change, so the watcher re-reads a snapshot.
pub type ChangeStream = Pin<Box<dyn Stream<Item = Result<WorkerChange, ControllerError>> + Send>>;

/// Where worker records live: each expires unless its worker heartbeats within the TTL.
#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    /// How long a record lives without a heartbeat (workers are told this when they register).
    fn ttl(&self) -> Duration;

    /// Creates the record for `state.info.worker_id` under `lease`, starts its TTL, and emits an
    /// upsert; `DuplicateWorker` while a live record holds the id (two workers would then be
    /// claiming one id, or someone is trying to take a worker's traffic).
    async fn register(&self, state: WorkerState, lease: Lease) -> Result<(), ControllerError>;

    /// Refreshes a worker's TTL and records its load, emitting an upsert (gateways route on load);
    /// `UnknownWorker` when the worker is not registered or has already expired, `WrongLease`
    /// when `lease` is not its registration's.
    async fn heartbeat(&self, worker_id: &str, lease: &Lease, load: WorkerLoad) -> Result<(), ControllerError>;

    /// Removes a worker's record, emitting a removal, and returns the record it removed;
    /// `UnknownWorker` when there was none, `WrongLease` when `lease` is not its registration's.
    async fn deregister(&self, worker_id: &str, lease: &Lease) -> Result<WorkerState, ControllerError>;

    /// Every live record, ordered by worker id.
    async fn list(&self) -> Result<Vec<WorkerState>, ControllerError>;

    /// How many live records there are.
    async fn count(&self) -> Result<usize, ControllerError>;

    /// Counts since the store started, for the controller's metrics.
    fn stats(&self) -> StoreStats;

    /// `Err(reason)` while the store cannot vouch that its records are current (etcd unreachable).
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }

    /// Every live record (ordered by worker id) and the changes after exactly that snapshot:
    /// the two are taken atomically, so no change falls between them.
    async fn watch(&self) -> Result<(Vec<WorkerState>, ChangeStream), ControllerError>;
}

/// Turns a broadcast receiver into a change stream that ends with an error, rather than skipping
/// ahead, when the watcher lagged or the store went away: either way its table is no longer exact.
fn changes(receiver: broadcast::Receiver<WorkerChange>) -> ChangeStream {
    Box::pin(futures::stream::unfold(Some(receiver), |receiver| async move {
        let mut receiver = receiver?;
        match receiver.recv().await {
            Ok(change) => Some((Ok(change), Some(receiver))),
            Err(RecvError::Lagged(missed)) => Some((Err(ControllerError::WatchLagged(missed)), None)),
            Err(RecvError::Closed) => Some((Err(ControllerError::Store("the registry store was closed".into())), None)),
        }
    }))
}

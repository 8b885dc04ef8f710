//! What a gateway hears from each worker directly, between the controller's heartbeats: its
//! load as it changes and the KV blocks it can find (its `WatchLoad` stream), and how it
//! encodes prompts (its `ModelInfo`). The controller stays the registry; this traffic bypasses
//! its store, which would otherwise be written at every change of every worker.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use herd_ops::AuthChannel;
use herd_proto::v1::worker_client::WorkerClient;
use herd_proto::v1::{LoadUpdate, ModelInfoRequest, WatchLoadRequest, WorkerLoad};
use tonic::Code;
use tracing::debug;

use crate::prefix::{Encoder, Encoders};

/// Wait before reconnecting a stream that failed.
const RETRY: Duration = Duration::from_secs(1);
/// Wait before asking again a worker that does not serve `WatchLoad` (an older version).
const RETRY_UNIMPLEMENTED: Duration = Duration::from_secs(60);

/// One worker's live state, shared by its table entry and the task that follows it.
#[derive(Default)]
pub struct Live {
    state: Mutex<State>,
    encoder: OnceLock<Arc<Encoder>>,
}

#[derive(Default)]
struct State {
    /// The latest load on the stream; `None` while no stream is up (the heartbeat's load rules).
    load: Option<WorkerLoad>,
    /// Updates received, so that the table notices a new one, and when the latest came.
    seq: u64,
    at: Option<std::time::Instant>,
    /// Short hashes of the KV blocks the worker can find.
    blocks: HashSet<u64>,
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one update of the stream.
    pub fn apply(&self, update: LoadUpdate) {
        let mut state = self.lock();
        if update.full {
            state.blocks.clear();
        }
        for hash in &update.removed {
            state.blocks.remove(hash);
        }
        state.blocks.extend(update.stored);
        if update.load.is_some() {
            state.load = update.load;
        }
        state.seq += 1;
        state.at = Some(std::time::Instant::now());
    }

    /// The stream ended: its load and blocks are no longer known.
    fn lost(&self) {
        let mut state = self.lock();
        state.load = None;
        state.blocks.clear();
    }

    /// The latest streamed load and how many updates have come, or `None` while no stream is up.
    pub fn load(&self) -> Option<(WorkerLoad, u64)> {
        let state = self.lock();
        state.load.clone().map(|load| (load, state.seq))
    }

    /// When the latest update came, while a stream is up.
    pub fn updated(&self) -> Option<std::time::Instant> {
        let state = self.lock();
        state.load.as_ref().and(state.at)
    }

    /// How many leading blocks of `hashes` the worker holds.
    pub fn overlap(&self, hashes: &[u64]) -> usize {
        let state = self.lock();
        hashes.iter().take_while(|h| state.blocks.contains(h)).count()
    }

    /// How the worker encodes prompts, once its `ModelInfo` has been read.
    pub fn encoder(&self) -> Option<Arc<Encoder>> {
        self.encoder.get().cloned()
    }
}

/// Follows a worker for as long as its entry lives (the entry aborts this task): reads its
/// `ModelInfo` once when `encoders` is given (the policy encodes prompts), then keeps a
/// `WatchLoad` stream open.
pub async fn follow(channel: AuthChannel, live: Arc<Live>, encoders: Option<Arc<Encoders>>, worker: String) {
    let mut client = WorkerClient::new(channel).max_decoding_message_size(herd_proto::MAX_MODEL_INFO_BYTES);
    loop {
        if let Some(encoders) = encoders.as_ref().filter(|_| live.encoder.get().is_none()) {
            match client.model_info(ModelInfoRequest {}).await {
                Ok(info) => match encoders.get(info.get_ref()) {
                    Ok(found) => {
                        let _ = live.encoder.set(found);
                    }
                    Err(err) => {
                        debug!(%worker, error = %err, "cannot encode this worker's prompts; routing it by load")
                    }
                },
                Err(status) => debug!(%worker, error = %status.message(), "ModelInfo failed"),
            }
        }
        let wait = match client.watch_load(WatchLoadRequest {}).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                while let Ok(Some(update)) = stream.message().await {
                    live.apply(update);
                }
                RETRY
            }
            Err(status) if status.code() == Code::Unimplemented => RETRY_UNIMPLEMENTED,
            Err(status) => {
                debug!(%worker, error = %status.message(), "WatchLoad failed");
                RETRY
            }
        };
        live.lost();
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_build_the_block_set_and_a_full_one_replaces_it() {
        let live = Live::default();
        assert!(live.load().is_none());
        let load = WorkerLoad { running: 2, ..Default::default() };
        live.apply(LoadUpdate { load: Some(load.clone()), full: true, stored: vec![1, 2, 3], removed: vec![] });
        assert_eq!(live.overlap(&[1, 2, 9, 3]), 2, "leading blocks only");
        live.apply(LoadUpdate { load: None, full: false, stored: vec![9], removed: vec![2] });
        assert_eq!(live.overlap(&[1, 2]), 1);
        assert_eq!(live.load().map(|(l, seq)| (l.running, seq)), Some((2, 2)));
        live.apply(LoadUpdate { load: Some(load), full: true, stored: vec![7], removed: vec![] });
        assert_eq!(live.overlap(&[1]), 0);
        live.lost();
        assert!(live.load().is_none() && live.overlap(&[7]) == 0);
    }
}

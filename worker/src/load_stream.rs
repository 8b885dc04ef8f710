//! `WatchLoad`: the worker's load and the KV blocks it can find, pushed to gateways as they
//! change. Heartbeats reach the controller (and through it every gateway) only every few
//! seconds and are written to its store; routing needs a fresher picture than that.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use herd_proto::v1 as pb;
use tokio::time::Instant;
use tonic::Status;

use crate::scheduler::Load;
use crate::service::{WorkerCore, load_report};

/// The stream `WatchLoad` answers with.
pub type LoadStream = Pin<Box<dyn Stream<Item = Result<pb::LoadUpdate, Status>> + Send>>;

/// How often the load is looked at; an update goes out only when it changed.
const TICK: Duration = Duration::from_millis(50);
/// Streams open at once; each gateway holds one, so more means a misbehaving caller.
pub const MAX_WATCHERS: usize = 256;
/// An unchanged load is sent again this often, so a watcher can tell a quiet worker from a
/// dead stream.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// What the stream has sent so far.
struct Sent {
    load: Option<pb::WorkerLoad>,
    version: Option<u64>,
    hashes: HashSet<u64>,
    at: Instant,
}

impl Sent {
    /// The update that brings a watcher from what was sent to `load` and the current blocks, or
    /// `None` when nothing changed and the keepalive is not due.
    fn next(&mut self, load: &Load, now: Instant) -> Option<pb::LoadUpdate> {
        let report = load_report(load);
        let (version, hashes) = load.kv_hashes();
        let first = self.load.is_none();
        let blocks_changed = self.version != Some(version);
        if !first && !blocks_changed && self.load.as_ref() == Some(&report) && now - self.at < KEEPALIVE {
            return None;
        }
        let (mut stored, mut removed) = (Vec::new(), Vec::new());
        if blocks_changed {
            let current: HashSet<u64> = hashes.iter().copied().collect();
            stored = current.difference(&self.hashes).copied().collect();
            removed = self.hashes.difference(&current).copied().collect();
            self.hashes = current;
            self.version = Some(version);
        }
        self.load = Some(report.clone());
        self.at = now;
        Some(pb::LoadUpdate { load: Some(report), full: first, stored, removed })
    }
}

/// Updates for one watcher until the worker drains or the watcher goes away; `slot` counts the
/// stream among the open ones until then.
pub fn updates(load: Arc<Load>, core: Arc<WorkerCore>, slot: tokio::sync::OwnedSemaphorePermit) -> LoadStream {
    let sent = Sent { load: None, version: None, hashes: HashSet::new(), at: Instant::now() };
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Box::pin(futures::stream::unfold((sent, ticks, slot), move |(mut sent, mut ticks, slot)| {
        let (load, core) = (load.clone(), core.clone());
        async move {
            loop {
                if core.state() == pb::ServingState::Draining {
                    return None;
                }
                if let Some(update) = sent.next(&load, Instant::now()) {
                    return Some((Ok(update), (sent, ticks, slot)));
                }
                ticks.tick().await;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_update_is_whole_then_only_changes_and_keepalives() {
        let load = Load::default();
        let mut sent = Sent { load: None, version: None, hashes: HashSet::new(), at: Instant::now() };
        let t0 = Instant::now();
        let first = sent.next(&load, t0).expect("the first update always goes out");
        assert!(first.full && first.stored.is_empty() && first.removed.is_empty());
        assert!(sent.next(&load, t0 + TICK).is_none(), "nothing changed");
        let again = sent.next(&load, t0 + KEEPALIVE).expect("a keepalive");
        assert!(!again.full);
        load.publish_hashes(1, vec![1, 2, 3]);
        let mut grown = sent.next(&load, t0 + KEEPALIVE + TICK).expect("new blocks");
        grown.stored.sort();
        assert_eq!((grown.stored, grown.removed), (vec![1, 2, 3], vec![]));
        load.publish_hashes(2, vec![2, 3, 4]);
        let moved = sent.next(&load, t0 + KEEPALIVE + 2 * TICK).expect("blocks replaced");
        assert_eq!((moved.stored, moved.removed), (vec![4], vec![1]));
    }
}

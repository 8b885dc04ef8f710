//! The controller watch loop: keeps the worker table current, and keeps the last table while away.

use std::sync::Arc;
use std::time::Duration;

use herd_proto::v1::WatchWorkersRequest;
use herd_proto::v1::controller_client::ControllerClient;
use tracing::{debug, info, warn};

use crate::router::endpoint;
use crate::{GatewayError, WorkerTable};
use herd_ops::ClusterTls;

/// First reconnect delay; doubled after each round in which no controller answered.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Rejects `--controller` values that can never be dialed, before serving starts.
pub fn check_urls(urls: &[String], tls: Option<&ClusterTls>) -> Result<(), GatewayError> {
    if urls.is_empty() {
        return Err(GatewayError::InvalidController { url: String::new(), reason: "no controller given".into() });
    }
    for url in urls {
        // Without a scheme the URI parses, but every call would then fail with "invalid URI".
        if !url.contains("://") {
            let reason = format!("needs a scheme, e.g. http://{url}");
            return Err(GatewayError::InvalidController { url: url.clone(), reason });
        }
        endpoint(url, tls).map_err(|reason| GatewayError::InvalidController { url: url.clone(), reason })?;
    }
    Ok(())
}

/// The delay after `current` when another round failed.
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(MAX_BACKOFF)
}

/// Watches the controllers forever, trying each URL in turn and backing off between rounds.
pub async fn watch_controllers(urls: Vec<String>, table: Arc<WorkerTable>) {
    if urls.is_empty() {
        warn!("no controller to watch; the worker table stays empty");
        return;
    }
    let mut backoff = INITIAL_BACKOFF;
    // Start each round at the controller that last worked.
    let mut start = 0;
    loop {
        let mut synced = false;
        let mut last_reason = String::new();
        for k in 0..urls.len() {
            let i = (start + k) % urls.len();
            let (got_snapshot, why) = watch_once(&urls[i], &table).await;
            if got_snapshot {
                warn!(controller = %urls[i], reason = %why, workers = table.len(), "worker watch ended; keeping the last table and reconnecting");
                synced = true;
                start = i;
                break;
            }
            debug!(controller = %urls[i], reason = %why, "controller did not answer");
            last_reason = why;
        }
        if synced {
            backoff = INITIAL_BACKOFF;
        } else {
            warn!(controllers = ?urls, reason = %last_reason, retry_in = ?backoff,
                  "no controller answered; keeping the last worker table");
        }
        tokio::time::sleep(backoff).await;
        if !synced {
            backoff = next_backoff(backoff);
        }
    }
}

/// One watch session: whether a snapshot arrived, and why the session ended.
async fn watch_once(url: &str, table: &WorkerTable) -> (bool, String) {
    let endpoint = match endpoint(url, table.tls()) {
        Ok(endpoint) => endpoint,
        Err(err) => return (false, format!("invalid URL: {err}")),
    };
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(err) => return (false, format!("connect failed: {err}")),
    };
    let mut client = ControllerClient::new(herd_ops::auth::present(channel, table.token()))
        .max_decoding_message_size(herd_proto::MAX_WATCH_MESSAGE_BYTES);
    let mut stream = match client.watch_workers(WatchWorkersRequest {}).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (false, format!("WatchWorkers failed: {status}")),
    };
    let mut got_snapshot = false;
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                if table.apply_event(event) && !got_snapshot {
                    got_snapshot = true;
                    info!(controller = %url, workers = table.len(), "worker table synced");
                }
            }
            Ok(None) => return (got_snapshot, "stream ended".into()),
            Err(status) => return (got_snapshot, format!("stream failed: {status}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeController, worker_state};
    use herd_proto::v1::{WorkerEvent, WorkerSnapshot, worker_event::Event};

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut d = INITIAL_BACKOFF;
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_backoff(d);
            seen.push(d);
        }
        assert_eq!(seen[1], Duration::from_millis(200));
        assert_eq!(seen[5], Duration::from_millis(3200));
        assert_eq!(*seen.last().unwrap(), MAX_BACKOFF);
    }

    #[test]
    fn bad_controller_urls_are_rejected() {
        assert!(check_urls(&[], None).is_err());
        assert!(check_urls(&["not a url".into()], None).is_err());
        assert!(check_urls(&["http://127.0.0.1:7000".into()], None).is_ok());
    }

    fn snapshot(workers: Vec<herd_proto::v1::WorkerState>) -> WorkerEvent {
        WorkerEvent { event: Some(Event::Snapshot(WorkerSnapshot { workers, heartbeat_ttl_ms: 0 })) }
    }

    #[tokio::test]
    async fn follows_events_keeps_table_and_reconnects() {
        // Session 1: snapshot, upsert, removal, then the stream ends. Session 2: a new snapshot.
        let sessions = vec![
            vec![
                snapshot(vec![worker_state("a", "http://127.0.0.1:1", &["m"], 0)]),
                WorkerEvent { event: Some(Event::Upsert(worker_state("b", "http://127.0.0.1:2", &["m"], 0))) },
                WorkerEvent { event: Some(Event::Removed("a".into())) },
            ],
            vec![snapshot(vec![
                worker_state("c", "http://127.0.0.1:3", &["n"], 0),
                worker_state("d", "http://127.0.0.1:4", &["n"], 0),
            ])],
        ];
        let controller = FakeController::start(sessions).await;
        let table = Arc::new(WorkerTable::new());
        // The first URL is dead: the loop must move on to the live one.
        let dead = crate::testing::dead_address().await;
        let task = tokio::spawn(watch_controllers(vec![dead, controller.address.clone()], table.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !(table.len() == 2 && table.models().iter().any(|(m, _, _)| m == "n")) {
            assert!(tokio::time::Instant::now() < deadline, "watch never applied the second session");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(controller.sessions() >= 2);
        // Controller gone: the table is kept.
        drop(controller);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(table.len(), 2);
        assert!(table.is_synced());
        task.abort();
    }
}

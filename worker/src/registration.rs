//! Keeps the worker registered: register once loaded, heartbeat every TTL/3 with the load,
//! register again when a controller answers that it does not know us (it restarted).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use herd_ops::{AuthChannel, ClusterTls, ClusterToken};
use herd_proto::v1 as pb;
use herd_proto::v1::controller_client::ControllerClient;
use tokio::sync::watch;
use tonic::transport::Endpoint;
use tonic::{Code, Status};

use crate::error::WorkerError;
use crate::scheduler::Load;

/// The controllers a worker reports to, and what it tells them.
pub struct Registration {
    controllers: Vec<(String, ControllerClient<AuthChannel>)>,
    info: pb::WorkerInfo,
    load: Arc<Load>,
    /// The secret the last registration returned, which heartbeats and the deregistration present.
    lease: Mutex<String>,
}

/// The wait after a failed registration grows to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Each controller call gives up after this, so a dead controller cannot stall heartbeats.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Heartbeats come three times per TTL, so one lost heartbeat never expires a live worker.
fn interval(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(1))
}

impl Registration {
    /// Clients for `urls` (connected lazily: a controller may start after the worker).
    pub fn new(
        urls: &[String],
        info: pb::WorkerInfo,
        load: Arc<Load>,
        (tls, token): (Option<&ClusterTls>, Option<&ClusterToken>),
    ) -> Result<Self, WorkerError> {
        if urls.is_empty() {
            return Err(WorkerError::Flag {
                flag: "--controller",
                msg: "at least one controller URL is needed".into(),
            });
        }
        let controllers = urls
            .iter()
            .map(|url| {
                if !url.contains("://") {
                    let msg = format!("{url:?} needs a scheme, e.g. http://{url}");
                    return Err(WorkerError::Flag { flag: "--controller", msg });
                }
                let endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|e| WorkerError::Flag { flag: "--controller", msg: format!("{url:?}: {e}") })?
                    .connect_timeout(CALL_TIMEOUT)
                    .timeout(CALL_TIMEOUT);
                let endpoint = herd_ops::tls::secure(endpoint, tls)
                    .map_err(|e| WorkerError::Flag { flag: "--controller", msg: e.to_string() })?;
                Ok((url.clone(), ControllerClient::new(herd_ops::auth::present(endpoint.connect_lazy(), token))))
            })
            .collect::<Result<_, WorkerError>>()?;
        Ok(Self { controllers, info, load, lease: Mutex::new(String::new()) })
    }

    fn current_load(&self) -> pb::WorkerLoad {
        crate::service::load_report(&self.load)
    }

    /// Registers with the first controller that answers; returns the heartbeat TTL.
    async fn register(&self) -> Result<Duration, Status> {
        let mut last = Status::unavailable("no controller configured");
        for (url, client) in &self.controllers {
            let req = pb::RegisterWorkerRequest { info: Some(self.info.clone()), load: Some(self.current_load()) };
            match client.clone().register_worker(req).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    *self.lease.lock().unwrap_or_else(PoisonError::into_inner) = resp.lease;
                    let ttl = Duration::from_millis(resp.heartbeat_ttl_ms);
                    tracing::info!(controller = %url, worker_id = %self.info.worker_id, ttl = ?ttl, "registered");
                    return Ok(ttl);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The lease of the current registration.
    fn lease(&self) -> String {
        self.lease.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Heartbeats the first controller that answers; NotFound means it forgot us, PermissionDenied
    /// that our registration expired and another took the id.
    async fn heartbeat(&self) -> Result<(), Status> {
        let mut last = Status::unavailable("no controller configured");
        for (_, client) in &self.controllers {
            let req = pb::HeartbeatRequest {
                worker_id: self.info.worker_id.clone(),
                load: Some(self.current_load()),
                lease: self.lease(),
            };
            match client.clone().heartbeat(req).await {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.code(), Code::NotFound | Code::PermissionDenied) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Removes the registration (on drain); failures are only logged since expiry cleans up anyway.
    pub async fn deregister(&self) {
        for (url, client) in &self.controllers {
            let req = pb::DeregisterRequest { worker_id: self.info.worker_id.clone(), lease: self.lease() };
            match client.clone().deregister(req).await {
                Ok(_) => {
                    tracing::info!(controller = %url, "deregistered");
                    return;
                }
                Err(e) => tracing::warn!(controller = %url, error = %e.message(), "deregister failed"),
            }
        }
    }

    /// Registers, then heartbeats until `stop` turns true.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let mut ttl = None;
        let mut backoff = Duration::from_millis(200);
        while !*stop.borrow() {
            if self.load.is_stopped() {
                return;
            }
            let wait = match ttl {
                None => match self.register().await {
                    Ok(t) => {
                        ttl = Some(t);
                        backoff = Duration::from_millis(200);
                        interval(t)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message(), retry_in = ?backoff, "registration failed");
                        let wait = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        wait
                    }
                },
                Some(t) => match self.heartbeat().await {
                    Ok(()) => interval(t),
                    Err(e) if e.code() == Code::NotFound => {
                        tracing::info!("the controller does not know this worker; registering again");
                        ttl = None;
                        continue;
                    }
                    Err(e) if e.code() == Code::PermissionDenied => {
                        tracing::warn!(
                            worker_id = %self.info.worker_id,
                            "another registration holds this worker id (ours expired); registering again"
                        );
                        ttl = None;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message(), "heartbeat failed");
                        interval(t)
                    }
                },
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

//! The `grpc.health.v1.Health` service that Kubernetes' gRPC probes call: one status for the
//! whole server (service "") and the same for each named herd service.

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health as HealthService, HealthServer};
use tonic_health::server::HealthReporter;

/// The health statuses a server reports; clones share them.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<&'static str>,
}

impl Health {
    /// A reporter for the given service names, starting as `serving`, and the gRPC service to add.
    pub async fn new(services: &[&'static str], serving: bool) -> (Self, HealthServer<impl HealthService + use<>>) {
        let (reporter, server) = tonic_health::server::health_reporter();
        let health = Health { reporter, services: services.to_vec() };
        health.set(serving).await;
        (health, server)
    }

    /// Reports every service as serving or not.
    pub async fn set(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        for name in std::iter::once("").chain(self.services.iter().copied()) {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

//! The controller's Prometheus metrics (`herd_controller_*`), served on `--metrics-listen`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use herd_ops::metrics::{IntCounter, IntCounterVec, IntGauge, Registry, catch_up};

use crate::registry::{Store, StoreStats};

/// Counters the service bumps and gauges the monitor keeps current.
pub struct ControllerMetrics {
    registry: Registry,
    /// Workers in the registry.
    pub workers: IntGauge,
    /// RegisterWorker calls by result (`ok`, `error`).
    pub registrations: IntCounterVec,
    /// Heartbeat calls by result (`ok`, `unknown`: expired or never registered, `error`).
    pub heartbeats: IntCounterVec,
    /// Deregister calls that removed a worker.
    pub deregistrations: IntCounter,
    expiries: IntCounter,
    store_errors: IntCounter,
    store: Arc<dyn Store>,
    ready: AtomicBool,
}

impl ControllerMetrics {
    /// The metrics of a controller over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        let registry = Registry::default();
        ControllerMetrics {
            workers: registry.gauge("herd_controller_workers", "Workers in the registry."),
            registrations: registry.counter_vec(
                "herd_controller_registrations_total",
                "RegisterWorker calls, by result.",
                &["result"],
            ),
            heartbeats: registry.counter_vec("herd_controller_heartbeats_total", "Heartbeats, by result.", &["result"]),
            deregistrations: registry
                .counter("herd_controller_deregistrations_total", "Workers that deregistered (on drain)."),
            expiries: registry
                .counter("herd_controller_expiries_total", "Workers removed because no heartbeat came within the TTL."),
            store_errors: registry.counter("herd_controller_etcd_errors_total", "Failed calls to etcd."),
            registry,
            store,
            ready: AtomicBool::new(false),
        }
    }

    /// Records whether the store vouches for its records (what `/ready` and gRPC health say).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

impl herd_ops::Exporter for ControllerMetrics {
    fn render(&self) -> String {
        let StoreStats { expiries, errors } = self.store.stats();
        catch_up(&self.expiries, expiries);
        catch_up(&self.store_errors, errors);
        self.registry.render()
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

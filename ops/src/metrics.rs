//! Prometheus metrics: a registry with short constructors for herd's series, and the plain-HTTP
//! endpoint (`/metrics`, `/health`, `/ready`) that the controller and workers serve on
//! `--metrics-listen`. The gateway serves the same routes on its API port.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
pub use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use prometheus::{HistogramOpts, Opts, TextEncoder};
use tokio::net::TcpListener;

use crate::OpsError;

/// The `--metrics-listen` flag of the controller and the worker.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MetricsArgs {
    /// Address for plain-HTTP `/metrics` (Prometheus text), `/health` and `/ready`; off when unset.
    #[arg(long, env = "HERD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

/// Latency buckets in seconds, from a fast token to a long answer.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// A role's metrics. Names are fixed at compile time, so registering one twice is a bug in herd,
/// caught by each role's unit test that renders its registry.
#[derive(Clone, Default)]
pub struct Registry(prometheus::Registry);

impl Registry {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, metric: prometheus::Result<M>) -> M {
        let metric = metric.expect("a valid metric definition");
        self.0.register(Box::new(metric.clone())).expect("metric names are unique");
        metric
    }

    /// A counter.
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::with_opts(Opts::new(name, help)))
    }

    /// A counter with labels.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }

    /// A gauge.
    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::with_opts(Opts::new(name, help)))
    }

    /// A gauge with labels.
    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    /// A histogram with the given buckets.
    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        self.add(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())))
    }

    /// A histogram with labels.
    pub fn histogram_vec(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        self.add(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels))
    }

    /// Everything in Prometheus' text format.
    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.0.gather()).unwrap_or_default()
    }
}

/// Moves a counter that mirrors a count kept elsewhere up to `total` (a counter never goes back).
pub fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// What a role exposes on its metrics endpoint.
pub trait Exporter: Send + Sync + 'static {
    /// The metrics, with gauges brought up to date (called on every scrape).
    fn render(&self) -> String;
    /// Whether the role can take work now (`/ready`).
    fn ready(&self) -> bool;
}

/// The `Content-Type` of Prometheus' text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(exporter): State<Arc<dyn Exporter>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], exporter.render())
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(exporter): State<Arc<dyn Exporter>>) -> impl IntoResponse {
    if exporter.ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

/// `/metrics`, `/health` (the process is up) and `/ready` (it can take work).
pub fn router(exporter: Arc<dyn Exporter>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(exporter)
}

impl MetricsArgs {
    /// Binds `--metrics-listen` (if set) and serves [`router`] there until `shutdown`; the bound
    /// address is returned at once, the server runs as a task.
    pub async fn serve(
        &self,
        exporter: Arc<dyn Exporter>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Option<std::net::SocketAddr>, OpsError> {
        let Some(addr) = &self.metrics_listen else { return Ok(None) };
        let bind = |source| OpsError::Bind { addr: addr.clone(), source };
        let listener = TcpListener::bind(addr).await.map_err(bind)?;
        let local = listener.local_addr().map_err(bind)?;
        tracing::info!(addr = %local, "metrics listening");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router(exporter)).with_graceful_shutdown(shutdown).await {
                tracing::warn!(error = %e, "metrics endpoint stopped");
            }
        });
        Ok(Some(local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Registry, bool);

    impl Exporter for Fixed {
        fn render(&self) -> String {
            self.0.render()
        }
        fn ready(&self) -> bool {
            self.1
        }
    }

    async fn get_text(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let registry = Registry::default();
        registry.counter_vec("herd_test_things_total", "Things.", &["kind"]).with_label_values(&["a"]).inc_by(3);
        registry.histogram("herd_test_wait_seconds", "Waits.", LATENCY_BUCKETS).observe(0.2);
        let args = MetricsArgs { metrics_listen: Some("127.0.0.1:0".into()) };
        let addr = args.serve(Arc::new(Fixed(registry, false)), std::future::pending()).await.unwrap().unwrap();
        let text = get_text(addr, "/metrics").await;
        assert!(text.contains("herd_test_things_total{kind=\"a\"} 3"), "{text}");
        assert!(text.contains("herd_test_wait_seconds_count 1"), "{text}");
        assert!(get_text(addr, "/health").await.starts_with("HTTP/1.1 200"));
        assert!(get_text(addr, "/ready").await.starts_with("HTTP/1.1 503"));
    }

    #[tokio::test]
    async fn a_bad_address_names_the_flag() {
        let args = MetricsArgs { metrics_listen: Some("nowhere".into()) };
        let err = args.serve(Arc::new(Fixed(Registry::default(), true)), async {}).await.unwrap_err();
        assert!(err.to_string().starts_with("--metrics-listen"), "{err}");
    }
}

//! The gateway's Prometheus metrics (`herd_gateway_*`), served at `/metrics` on its API port.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use herd_ops::metrics::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, LATENCY_BUCKETS, Registry,
};

use crate::AppState;
use crate::router::{Decision, WorkerTable};

/// Every series the gateway exports.
pub struct GatewayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    durations: HistogramVec,
    /// Time from a generation request's arrival to its first token, per choice.
    ttft: Histogram,
    /// Time between consecutive tokens of one choice.
    pub itl: Histogram,
    /// Time from a generation request's arrival to its last token.
    e2e: Histogram,
    /// The last minutes of the two, for the dashboard.
    recent_ttft: Window,
    recent_e2e: Window,
    /// Prompt tokens of finished generations.
    pub prompt_tokens: IntCounter,
    /// Completion tokens of finished generations.
    pub completion_tokens: IntCounter,
    workers: IntGauge,
    inflight: IntGaugeVec,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    /// Routing decisions by policy and reason.
    routing_decisions: IntCounterVec,
    /// Per decision: the share of the prompt's own blocks the chosen worker held, and how much
    /// busier it was than the least loaded.
    routing_overlap: Histogram,
    routing_load_gap: Histogram,
}

impl GatewayMetrics {
    /// A fresh set of the gateway's series.
    pub fn new() -> Self {
        let r = Registry::default();
        let worker = &["worker"];
        GatewayMetrics {
            requests: r.counter_vec(
                "herd_gateway_requests_total",
                "HTTP requests, by route and status.",
                &["route", "status"],
            ),
            durations: r.histogram_vec(
                "herd_gateway_request_duration_seconds",
                "Time to the response headers, by route (streams go on after them).",
                &["route"],
                LATENCY_BUCKETS,
            ),
            ttft: r.histogram("herd_gateway_time_to_first_token_seconds", "Time to the first token.", LATENCY_BUCKETS),
            itl: r.histogram("herd_gateway_inter_token_latency_seconds", "Time between tokens.", LATENCY_BUCKETS),
            e2e: r.histogram(
                "herd_gateway_e2e_latency_seconds",
                "Time from request to the end of the whole answer.",
                LATENCY_BUCKETS,
            ),
            recent_ttft: Window::default(),
            recent_e2e: Window::default(),
            prompt_tokens: r.counter("herd_gateway_prompt_tokens_total", "Prompt tokens of finished generations."),
            completion_tokens: r.counter("herd_gateway_completion_tokens_total", "Tokens generated."),
            workers: r.gauge("herd_gateway_workers", "Workers in the gateway's table."),
            inflight: r.gauge_vec(
                "herd_gateway_worker_in_flight",
                "This gateway's calls in flight per worker.",
                worker,
            ),
            running: r.gauge_vec("herd_gateway_worker_running", "Running sequences each worker last reported.", worker),
            waiting: r.gauge_vec("herd_gateway_worker_waiting", "Queued sequences each worker last reported.", worker),
            routing_decisions: r.counter_vec(
                "herd_gateway_routing_decisions_total",
                "Routing decisions by policy and reason (prefix, balance, least_loaded, power_of_two, round_robin).",
                &["policy", "reason"],
            ),
            routing_overlap: r.histogram(
                "herd_gateway_routing_prefix_overlap_ratio",
                "Share of the prompt's own KV blocks (after a start other prompts share) the chosen worker held.",
                &[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0],
            ),
            routing_load_gap: r.histogram(
                "herd_gateway_routing_load_gap",
                "How much busier (in sequences) the chosen worker was than the least loaded.",
                &[0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            ),
            registry: r,
        }
    }

    /// Everything in Prometheus' text format, per-worker gauges read from `table` now.
    pub fn render(&self, table: &WorkerTable) -> String {
        let loads = table.loads();
        self.workers.set(loads.len() as i64);
        // Workers that left must not linger as stale series.
        for vec in [&self.inflight, &self.running, &self.waiting] {
            vec.reset();
        }
        for (id, inflight, running, waiting) in loads {
            self.inflight.with_label_values(&[&id]).set(inflight as i64);
            self.running.with_label_values(&[&id]).set(i64::from(running));
            self.waiting.with_label_values(&[&id]).set(i64::from(waiting));
        }
        self.registry.render()
    }

    /// Records a routing decision.
    pub fn routed(&self, decision: &Decision) {
        self.routing_decisions.with_label_values(&[decision.policy, decision.reason.label()]).inc();
        let own = decision.prompt_blocks.saturating_sub(decision.shared);
        if own > 0 {
            self.routing_overlap.observe(decision.overlap as f64 / own as f64);
        }
        self.routing_load_gap.observe(decision.load - decision.least_load);
    }

    /// Records a choice's first token, `secs` after its request arrived.
    pub fn first_token(&self, secs: f64) {
        self.ttft.observe(secs);
        self.recent_ttft.push(secs);
    }

    /// Records a generation answered in full, `secs` after it arrived.
    pub fn finished(&self, secs: f64) {
        self.e2e.observe(secs);
        self.recent_e2e.push(secs);
    }

    /// Recent time-to-first-token and end-to-end latencies.
    pub fn recent(&self) -> (Summary, Summary) {
        (self.recent_ttft.summary(), self.recent_e2e.summary())
    }

    /// Records a finished generation's tokens.
    pub fn tokens(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.inc_by(prompt);
        self.completion_tokens.inc_by(completion);
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How far back the dashboard's figures reach.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Samples kept at most, so a flood of requests cannot grow the window without bound.
const WINDOW_CAP: usize = 20_000;

/// Latency samples of the last [`WINDOW`].
#[derive(Default)]
struct Window(Mutex<VecDeque<(Instant, f64)>>);

/// A window's sample rate and percentiles (seconds); `None` without samples.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Summary {
    /// Samples per second over the last minute.
    pub per_second: f64,
    /// Samples in the window.
    pub count: usize,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

impl Window {
    fn push(&self, value: f64) {
        let now = Instant::now();
        let mut samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        samples.push_back((now, value));
        while samples.len() > WINDOW_CAP || samples.front().is_some_and(|(at, _)| now.duration_since(*at) > WINDOW) {
            samples.pop_front();
        }
    }

    fn summary(&self) -> Summary {
        let now = Instant::now();
        let samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut values: Vec<f64> =
            samples.iter().filter(|(at, _)| now.duration_since(*at) <= WINDOW).map(|&(_, v)| v).collect();
        let last_minute = samples.iter().filter(|(at, _)| now.duration_since(*at) <= Duration::from_secs(60)).count();
        values.sort_by(f64::total_cmp);
        let pick = |q: f64| (!values.is_empty()).then(|| values[((values.len() - 1) as f64 * q).round() as usize]);
        Summary {
            per_second: last_minute as f64 / 60.0,
            count: values.len(),
            p50: pick(0.5),
            p90: pick(0.9),
            p99: pick(0.99),
        }
    }
}

/// Times the gaps between one choice's tokens.
#[derive(Default)]
pub struct Pacer {
    last: Option<Instant>,
}

impl Pacer {
    /// Starts timing at the first chunk that carries a token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts timing after the first token arrived now.
    pub fn started() -> Self {
        Pacer { last: Some(Instant::now()) }
    }

    /// Records the gap before a chunk carrying `tokens` tokens (chunks without tokens are
    /// held-back text and do not count).
    pub fn tick(&mut self, metrics: &GatewayMetrics, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        if let Some(last) = self.last {
            let gap = now.duration_since(last).as_secs_f64() / tokens as f64;
            for _ in 0..tokens {
                metrics.itl.observe(gap);
            }
        }
        self.last = Some(now);
    }
}

/// Seconds since `start`.
pub fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Middleware counting every request by route template and status, and timing it to its headers.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics.requests.with_label_values(&[route.as_str(), response.status().as_str()]).inc();
    metrics.durations.with_label_values(&[route.as_str()]).observe(since(start));
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::testing::{FakeWorker, Script, send, worker_state};
    use crate::{AppState, Settings, WorkerTable, router};

    fn value(text: &str, prefix: &str) -> Option<f64> {
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
    }

    #[tokio::test]
    async fn metrics_count_requests_tokens_and_latencies() {
        let worker = FakeWorker::start(Script::Reply(vec!["a", "b", "c"])).await;
        let table = Arc::new(WorkerTable::new());
        table.apply_snapshot(vec![worker_state("w1", &worker.address, &["m"], 0)], Duration::ZERO);
        let settings = Settings {
            max_body_bytes: 1 << 20,
            worker_down_for: Duration::from_secs(10),
            retry_after: 1,
            deadlines: Default::default(),
        };
        let app = router(AppState::new(table, settings));
        let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let stream = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        for body in [chat, chat, stream] {
            let (status, _, text) = send(&app, "POST", "/v1/chat/completions", &[], body).await;
            assert_eq!(status, 200, "{text}");
        }
        assert_eq!(send(&app, "POST", "/v1/chat/completions", &[], "{bad").await.0, 400);
        assert_eq!(send(&app, "GET", "/nowhere", &[], "").await.0, 404);
        let (status, headers, text) = send(&app, "GET", "/metrics", &[], "").await;
        assert_eq!(status, 200);
        assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain"), "{headers:?}");
        let ok = r#"herd_gateway_requests_total{route="/v1/chat/completions",status="200"}"#;
        assert_eq!(value(&text, ok), Some(3.0), "{text}");
        let bad = r#"herd_gateway_requests_total{route="/v1/chat/completions",status="400"}"#;
        assert_eq!(value(&text, bad), Some(1.0), "{text}");
        assert_eq!(value(&text, r#"herd_gateway_requests_total{route="unmatched",status="404"}"#), Some(1.0));
        // Three answers of 3 tokens, 7 prompt tokens each (the fake worker's counts).
        assert_eq!(value(&text, "herd_gateway_prompt_tokens_total"), Some(21.0), "{text}");
        assert_eq!(value(&text, "herd_gateway_completion_tokens_total"), Some(9.0), "{text}");
        assert_eq!(value(&text, "herd_gateway_time_to_first_token_seconds_count"), Some(3.0), "{text}");
        assert_eq!(value(&text, "herd_gateway_e2e_latency_seconds_count"), Some(3.0), "{text}");
        // Two gaps per answer of three tokens.
        assert_eq!(value(&text, "herd_gateway_inter_token_latency_seconds_count"), Some(6.0), "{text}");
        assert_eq!(value(&text, "herd_gateway_workers"), Some(1.0), "{text}");
        assert_eq!(value(&text, r#"herd_gateway_worker_in_flight{worker="w1"}"#), Some(0.0), "{text}");
    }

    #[test]
    fn window_percentiles_and_rate() {
        let window = super::Window::default();
        assert_eq!(window.summary().p50, None);
        for v in 1..=100 {
            window.push(f64::from(v));
        }
        let s = window.summary();
        assert_eq!((s.count, s.p50, s.p90, s.p99), (100, Some(51.0), Some(90.0), Some(99.0)));
        assert!((s.per_second - 100.0 / 60.0).abs() < 1e-9);
    }
}

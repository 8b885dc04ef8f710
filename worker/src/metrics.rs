//! The worker's Prometheus metrics (`herd_worker_*`), served on `--metrics-listen`.

use std::sync::Arc;

use herd_ops::metrics::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, catch_up};

use crate::scheduler::Load;
use crate::service::WorkerCore;

/// Counters the service bumps; gauges read from the scheduler's load at each scrape.
pub struct WorkerMetrics {
    registry: Registry,
    /// Generate calls by result: `ok` (queued), `invalid`, `rejected` (queue full), `unavailable`.
    pub requests: IntCounterVec,
    /// Prompt tokens of queued sequences.
    pub prompt_tokens: IntCounter,
    /// Tokens sampled and streamed.
    pub generated_tokens: IntCounter,
    /// Prompts tokenized, by `source`: `computed`, or `shared` with a call that sent the same.
    pub tokenizations: IntCounterVec,
    running: IntGauge,
    waiting: IntGauge,
    kv_used: IntGauge,
    kv_budget: IntGauge,
    kv_blocks: IntGaugeVec,
    batch_size: IntGauge,
    steps: IntCounter,
    stepped: IntCounter,
    preemptions: IntCounter,
    prefix_hits: IntCounter,
    prefix_hit_tokens: IntCounter,
    prefix_tokens: IntGauge,
}

impl WorkerMetrics {
    /// A fresh set of the worker's series.
    pub fn new() -> Self {
        let r = Registry::default();
        WorkerMetrics {
            requests: r.counter_vec("herd_worker_requests_total", "Generate calls, by result.", &["result"]),
            prompt_tokens: r.counter("herd_worker_prompt_tokens_total", "Prompt tokens of accepted requests."),
            generated_tokens: r.counter("herd_worker_generated_tokens_total", "Tokens generated and streamed."),
            tokenizations: r.counter_vec(
                "herd_worker_tokenizations_total",
                "Prompts tokenized, by source: computed, or shared with a call that sent the same prompt.",
                &["source"],
            ),
            running: r.gauge("herd_worker_running_sequences", "Sequences in the running batch."),
            waiting: r.gauge("herd_worker_waiting_sequences", "Sequences queued for a batch slot."),
            kv_used: r.gauge("herd_worker_kv_cache_used_tokens", "Tokens the KV blocks in use hold room for."),
            kv_budget: r.gauge("herd_worker_kv_cache_budget_tokens", "Tokens the KV cache holds room for in all."),
            kv_blocks: r.gauge_vec(
                "herd_worker_kv_blocks",
                "KV-cache blocks, by state: used, cached (free, holding prefixes later prompts may share), total.",
                &["state"],
            ),
            batch_size: r.gauge("herd_worker_batch_size", "Sequences in the latest batched step."),
            steps: r.counter("herd_worker_steps_total", "Batched forward steps."),
            stepped: r.counter(
                "herd_worker_batched_sequences_total",
                "Sequences stepped, summed over steps (divide by steps for the mean batch size).",
            ),
            preemptions: r
                .counter("herd_worker_preemptions_total", "Sequences evicted from the KV cache to recompute."),
            prefix_hits: r.counter("herd_worker_prefix_cache_hits_total", "Prompts that found a cached KV prefix."),
            prefix_hit_tokens: r.counter(
                "herd_worker_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the KV cache instead of computed.",
            ),
            prefix_tokens: r
                .gauge("herd_worker_prefix_cache_tokens", "Tokens the cached (free) KV blocks hold room for."),
            registry: r,
        }
    }

    /// Everything in Prometheus' text format, gauges read from `load` (absent while loading).
    pub fn render(&self, load: Option<&Load>) -> String {
        if let Some(load) = load {
            let kv = load.kv_blocks();
            let (steps, stepped, last) = load.steps();
            self.running.set(load.running() as i64);
            self.waiting.set(load.waiting() as i64);
            self.kv_used.set((kv.used * kv.block_size) as i64);
            self.kv_budget.set((kv.total * kv.block_size) as i64);
            for (state, n) in [("used", kv.used), ("cached", kv.cached), ("total", kv.total)] {
                self.kv_blocks.with_label_values(&[state]).set(n as i64);
            }
            self.batch_size.set(last as i64);
            catch_up(&self.steps, steps as u64);
            catch_up(&self.stepped, stepped as u64);
            catch_up(&self.preemptions, load.preemptions() as u64);
            let (hits, hit_tokens) = load.prefix();
            catch_up(&self.prefix_hits, hits as u64);
            catch_up(&self.prefix_hit_tokens, hit_tokens as u64);
            self.prefix_tokens.set((kv.cached * kv.block_size) as i64);
        }
        self.registry.render()
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the metrics endpoint serves: the core's metrics and readiness.
pub struct Exported(pub Arc<WorkerCore>);

impl herd_ops::Exporter for Exported {
    fn render(&self) -> String {
        self.0.metrics.render(self.0.load().map(|l| &**l))
    }

    fn ready(&self) -> bool {
        self.0.state() == herd_proto::v1::ServingState::Ready
    }
}

//! The herd worker: the inference engine and the gRPC service that serves it.

pub mod engine;
pub mod error;
pub mod load_stream;
pub mod metrics;
pub mod registration;
pub mod scheduler;
pub mod service;
pub mod tokenized;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use herd_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use engine::kv::KvOptions;
use engine::{DTypeChoice, Engine, LoadOptions, parse_devices};
pub use error::WorkerError;
use herd_ops::{AuthArgs, Health, MetricsArgs, RequireToken, TlsArgs};
use registration::Registration;
use scheduler::{Scheduler, SchedulerConfig};
use service::{Serving, WorkerCore, WorkerService};
use tonic::service::interceptor::InterceptedService;

/// Flags of `herd worker` (each also read from its `HERD_*` variable).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// An HF checkpoint directory or a .gguf file.
    #[arg(long, env = "HERD_MODEL")]
    pub model: PathBuf,
    /// Controller URL(s) to register with, comma-separated (e.g. http://127.0.0.1:7000).
    #[arg(long, env = "HERD_CONTROLLER", value_delimiter = ',', required = true)]
    pub controller: Vec<String>,
    /// Address the gRPC server binds.
    #[arg(long, env = "HERD_LISTEN", default_value = "0.0.0.0:7001")]
    pub listen: String,
    /// Address others dial, e.g. http://10.0.0.7:7001 (default: the bound address).
    #[arg(long, env = "HERD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Name clients use for the model; repeat (or comma-separate) for aliases. Default: the file name.
    #[arg(long = "model-name", env = "HERD_MODEL_NAME", value_delimiter = ',')]
    pub model_names: Vec<String>,
    /// Stable id of this worker (default: random).
    #[arg(long, env = "HERD_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Weight dtype: auto, f32, f16, bf16.
    #[arg(long, env = "HERD_DTYPE", default_value = "auto")]
    pub dtype: DTypeChoice,
    /// Quantize an HF checkpoint's matrices as they are read: q8_0, q4_0 or q4_k (CPU only; GGUF
    /// files are used as they are quantized).
    #[arg(long, env = "HERD_QUANTIZE")]
    pub quantize: Option<engine::QuantizeChoice>,
    /// Tensor-parallel ranks to split the model over (default: one per device listed).
    #[arg(long, env = "HERD_TP")]
    pub tp: Option<usize>,
    /// Devices: cpu (every rank a CPU thread), cuda (the first --tp GPUs), or cuda:0,cuda:1,...
    #[arg(long, visible_alias = "device", env = "HERD_DEVICES", value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<String>,
    /// Chat template: vicuna_v1.1, one_shot, or a Jinja file (default: as `herd chat` chooses).
    #[arg(long, env = "HERD_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    /// Sequences generated at once.
    #[arg(long, env = "HERD_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Tokens one step runs at most: prompts longer than what is left are prefilled in chunks
    /// between decoding steps, so running answers keep flowing.
    #[arg(long, env = "HERD_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Sequences queued beyond those before requests are refused (ResourceExhausted, HTTP 429).
    #[arg(long, visible_alias = "max-waiting", env = "HERD_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// KV-cache memory over all ranks, in MiB (default: half the memory available at start on
    /// the CPU; on GPUs --gpu-memory-utilization of the memory free after loading the weights).
    /// It is held in blocks that sequences starting alike share; when running sequences need
    /// more blocks than are free, the newest gives its blocks up and is recomputed later.
    #[arg(long, env = "HERD_KV_CACHE_MB")]
    pub kv_cache_mb: Option<u64>,
    /// Tokens per KV-cache block.
    #[arg(long, env = "HERD_KV_BLOCK_SIZE", default_value_t = engine::kv::DEFAULT_BLOCK_SIZE)]
    pub kv_block_size: usize,
    /// The share of each GPU's memory, free after loading the weights, that the KV cache takes
    /// when --kv-cache-mb is not given.
    #[arg(long, env = "HERD_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Forget what finished sequences' blocks hold instead of letting later prompts that start
    /// alike (shared system prompts, chat history) find it.
    #[arg(long, env = "HERD_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,
    /// Compute threads (default: every core). Give co-located workers disjoint shares.
    #[arg(long, env = "HERD_THREADS")]
    pub threads: Option<usize>,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "HERD_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Mutual TLS with the controller and gateways.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The cluster token: checked on gateways' calls, presented to the controller.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// The metrics endpoint.
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// Sleep after each scheduling round (for tests that need a slow worker).
    #[arg(long, hide = true, default_value = "0s", value_parser = humantime::parse_duration)]
    pub debug_step_delay: Duration,
}

/// The worker's service name, as gRPC health checks name it.
const WORKER_SERVICE: &str = <pb::worker_server::WorkerServer<WorkerService> as tonic::server::NamedService>::NAME;

/// Longest `--drain-timeout` accepted (longer ones are typos, and overflow clocks).
const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The default model name: the file or directory name without a `.gguf` extension.
pub fn default_name(model: &Path) -> String {
    let name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
}

fn advertise_url(args: &WorkerArgs, bound: SocketAddr, scheme: &str) -> String {
    if let Some(a) = &args.advertise {
        return if a.contains("://") { a.clone() } else { format!("{scheme}://{a}") };
    }
    if bound.ip().is_unspecified() {
        tracing::warn!("--listen binds every interface; advertising 127.0.0.1 (set --advertise for other hosts)");
        return format!("{scheme}://127.0.0.1:{}", bound.port());
    }
    format!("{scheme}://{bound}")
}

/// How a rank's device is reported to the controller.
fn device_name(d: &candle_core::Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

fn random_id() -> String {
    format!("worker-{:08x}", rand::random::<u32>())
}

/// Runs a worker until `shutdown` resolves, then drains and returns.
pub async fn run(args: WorkerArgs, shutdown: impl Future<Output = ()> + Send) -> Result<(), WorkerError> {
    if args.max_batch_size == 0 {
        return Err(WorkerError::Flag { flag: "--max-batch-size", msg: "must be at least 1".into() });
    }
    if args.max_batch_tokens < args.max_batch_size {
        // Each running sequence needs a token of every step, or some would never advance.
        return Err(WorkerError::Flag { flag: "--max-batch-tokens", msg: "must be at least --max-batch-size".into() });
    }
    if args.kv_cache_mb == Some(0) {
        return Err(WorkerError::Flag { flag: "--kv-cache-mb", msg: "must be at least 1".into() });
    }
    if args.drain_timeout > MAX_DRAIN_TIMEOUT {
        return Err(WorkerError::Flag { flag: "--drain-timeout", msg: "must be at most 24h".into() });
    }
    if let Some(n) = args.threads {
        if n == 0 {
            return Err(WorkerError::Flag { flag: "--threads", msg: "must be at least 1".into() });
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("herd-compute-{i}"))
            .build_global()
            .map_err(|e| WorkerError::Flag { flag: "--threads", msg: e.to_string() })?;
    }
    let devices = parse_devices(&args.devices, args.tp)?;
    if !(1..=engine::kv::MAX_BLOCK_SIZE).contains(&args.kv_block_size) {
        let msg = format!("must be between 1 and {} tokens", engine::kv::MAX_BLOCK_SIZE);
        return Err(WorkerError::Flag { flag: "--kv-block-size", msg });
    }
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        let msg = "must be more than 0 and at most 1".into();
        return Err(WorkerError::Flag { flag: "--gpu-memory-utilization", msg });
    }
    let tls = args.tls.load()?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| WorkerError::Flag { flag: "--listen", msg: format!("cannot bind {}: {e}", args.listen) })?;
    let bound = listener.local_addr().map_err(|e| WorkerError::Server(e.to_string()))?;
    let token = args.auth.for_server(bound, tls.is_some())?;
    println!("herd worker listening on {bound}");
    let _ = std::io::Write::flush(&mut std::io::stdout());

    let names = if args.model_names.is_empty() { vec![default_name(&args.model)] } else { args.model_names.clone() };
    let core = Arc::new(WorkerCore::new(names.clone()));
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    args.metrics
        .serve(Arc::new(metrics::Exported(core.clone())), async {
            let _ = metrics_stopped.await;
        })
        .await?;
    // Probes see NOT_SERVING until the model is loaded, and again from the start of a drain.
    let (health, health_service) = Health::new(&[WORKER_SERVICE], false).await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder.tls_config(tls.server()).map_err(|e| WorkerError::Server(format!("TLS setup: {e}")))?;
    }
    let server = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(InterceptedService::new(
                pb::worker_server::WorkerServer::new(WorkerService::new(core.clone()))
                    .max_decoding_message_size(herd_proto::MAX_WORKER_REQUEST_BYTES),
                RequireToken(token.clone()),
            ))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = server_stopped.await;
            }),
    );

    let device_names: Vec<String> = devices.iter().map(device_name).collect();
    let opts = LoadOptions {
        model: args.model.clone(),
        dtype: args.dtype,
        quantize: args.quantize,
        devices,
        chat_template: args.chat_template.clone(),
        threads: args.threads.unwrap_or_else(engine::default_threads),
        tensor_attention: false,
        kv: KvOptions {
            block_size: args.kv_block_size,
            cache_bytes: args.kv_cache_mb.map(|mb| mb << 20),
            gpu_memory_utilization: args.gpu_memory_utilization,
            prefix_caching: !args.no_prefix_cache,
        },
    };
    let loading = tokio::task::spawn_blocking(move || Engine::load(&opts, &mut |_, _| {}));
    tokio::pin!(shutdown);
    let engine = tokio::select! {
        loaded = loading => loaded.map_err(|e| WorkerError::Server(format!("model loading thread: {e}")))??,
        // Nothing was registered or accepted yet: stopping is all there is to do.
        _ = &mut shutdown => {
            tracing::info!("stopped while loading the model");
            return Ok(());
        }
    };
    let kv = engine.kv_stats();
    tracing::info!(
        blocks = kv.total,
        block_size = kv.block_size,
        tokens = kv.total * kv.block_size,
        prefix_caching = !args.no_prefix_cache,
        "KV cache"
    );
    let engine = Arc::new(engine);
    let config = SchedulerConfig {
        max_batch_size: args.max_batch_size,
        max_queue: args.max_queue,
        step_delay: args.debug_step_delay,
        max_batch_tokens: args.max_batch_tokens,
    };
    let scheduler = Scheduler::start(engine.clone(), config).map_err(|e| WorkerError::Server(e.to_string()))?;
    let load = scheduler.load().clone();
    let info = pb::WorkerInfo {
        worker_id: args.worker_id.clone().unwrap_or_else(random_id),
        address: advertise_url(&args, bound, herd_ops::tls::scheme(tls.as_ref())),
        models: names,
        context_length: engine.context_length() as u32,
        max_batch_size: args.max_batch_size as u32,
        max_queue: args.max_queue as u32,
        tp_size: engine.tp_size() as u32,
        devices: device_names,
    };
    core.set_serving(Serving { engine, scheduler });
    health.set(true).await;
    tracing::info!(worker_id = %info.worker_id, address = %info.address, models = ?info.models, "worker ready");

    let registration =
        Arc::new(Registration::new(&args.controller, info, load.clone(), (tls.as_ref(), token.as_ref()))?);
    let (stop_reg, stop_rx) = tokio::sync::watch::channel(false);
    let reg_task = tokio::spawn({
        let registration = registration.clone();
        async move { registration.run(stop_rx).await }
    });

    tokio::pin!(server);
    let engine_died = async {
        while !load.is_stopped() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = &mut shutdown => {}
        _ = engine_died => {
            registration.deregister().await;
            return Err(WorkerError::Server("the engine thread stopped; exiting so a supervisor restarts the worker".into()));
        }
        res = &mut server => {
            return Err(WorkerError::Server(match res {
                Ok(Ok(())) => "stopped unexpectedly".into(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            }));
        }
    }

    // Drain: refuse new work, leave the registry, let running requests finish.
    tracing::info!(running = load.running(), waiting = load.waiting(), "draining");
    core.start_draining();
    health.set(false).await;
    let _ = stop_reg.send(true);
    let _ = reg_task.await;
    registration.deregister().await;
    let deadline = tokio::time::Instant::now() + args.drain_timeout;
    while !core.is_idle() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !core.is_idle() {
        tracing::warn!(running = load.running(), waiting = load.waiting(), "drain timeout; stopping anyway");
    }
    let _ = stop_server.send(());
    let _ = stop_metrics.send(());
    // Streams still open after the drain timeout would hold graceful shutdown forever.
    match tokio::time::timeout(Duration::from_secs(2), &mut server).await {
        Ok(Ok(Err(e))) => Err(WorkerError::Server(e.to_string())),
        _ => Ok(()),
    }
}

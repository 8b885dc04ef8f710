//! `herd up`: a whole cluster on one machine — controller and gateway in this process, each
//! worker a child process with its own share of the cores.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use herd_controller::{ControllerArgs, StoreKind};
use herd_ops::ClusterToken;
use herd_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// Flags of `herd up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// An HF checkpoint directory or a .gguf file.
    #[arg(long, env = "HERD_MODEL")]
    model: PathBuf,
    /// Worker processes to start.
    #[arg(long, env = "HERD_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Gateway port.
    #[arg(long, env = "HERD_PORT", default_value_t = 8000)]
    port: u16,
    /// Gateway bind address.
    #[arg(long, env = "HERD_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Name clients use for the model, repeatable for aliases (default: the file name).
    #[arg(long = "model-name", env = "HERD_MODEL_NAME", value_delimiter = ',')]
    model_names: Vec<String>,
    /// Weight dtype: auto, f32, f16, bf16.
    #[arg(long, env = "HERD_DTYPE", default_value = "auto")]
    dtype: String,
    /// Quantize an HF checkpoint's matrices as they are read: q8_0, q4_0 or q4_k (CPU only; GGUF
    /// files are used as they are quantized).
    #[arg(long, env = "HERD_QUANTIZE")]
    quantize: Option<herd_worker::engine::QuantizeChoice>,
    /// Chat template: vicuna_v1.1, one_shot, or a Jinja file.
    #[arg(long, env = "HERD_CHAT_TEMPLATE")]
    chat_template: Option<String>,
    /// Tensor-parallel ranks per worker.
    #[arg(long, env = "HERD_TP", default_value_t = 1)]
    tp: usize,
    /// Devices: cpu, cuda (GPUs 0.. handed out --tp per worker), or a list of cuda:N with
    /// --workers × --tp entries, taken --tp per worker in order.
    #[arg(long, visible_alias = "device", env = "HERD_DEVICES", value_delimiter = ',', default_value = "cpu")]
    devices: Vec<String>,
    /// Registry store: memory (in this process) or etcd.
    #[arg(long, env = "HERD_STORE", value_enum, default_value_t = StoreKind::Memory)]
    store: StoreKind,
    /// With `--store etcd`: etcd URLs, comma-separated.
    #[arg(long, env = "HERD_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// With `--store etcd`: key prefix.
    #[arg(long, env = "HERD_ETCD_PREFIX", default_value = "/herd")]
    etcd_prefix: String,
    /// How the gateway picks a worker (see `herd gateway --routing-policy`).
    #[arg(long, value_enum, default_value = "kv-aware", env = "HERD_ROUTING_POLICY")]
    pub routing_policy: herd_gateway::policy::PolicyName,
    /// With kv-aware routing (see `herd gateway --routing-balance-threshold`).
    #[arg(long, default_value_t = herd_gateway::DEFAULT_BALANCE_THRESHOLD,
          value_parser = herd_gateway::balance_threshold, env = "HERD_ROUTING_BALANCE_THRESHOLD")]
    pub routing_balance_threshold: f64,
    /// API keys file for the gateway, one key per line (see `herd gateway --api-keys`).
    #[arg(long, env = "HERD_API_KEYS_FILE")]
    api_keys: Option<PathBuf>,
    /// API keys for the gateway, comma-separated.
    #[arg(long = "api-key", env = "HERD_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_key_list: Vec<String>,
    /// Registry heartbeat TTL.
    #[arg(long, env = "HERD_HEARTBEAT_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_ttl: Duration,
}

/// Sends SIGTERM so the worker drains instead of dying mid-request.
fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own; no memory is touched.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

/// The `--devices` value of each worker: CPU workers share the CPU; GPUs are dealt out
/// `tp` per worker, so no two ranks share one.
fn worker_devices(devices: &[String], tp: usize, workers: usize) -> anyhow::Result<Vec<String>> {
    if tp == 0 {
        bail!("--tp must be at least 1");
    }
    let list: Vec<&str> = devices.iter().map(|d| d.trim()).filter(|d| !d.is_empty()).collect();
    match list.as_slice() {
        [] | ["cpu"] => Ok(vec!["cpu".into(); workers]),
        ["cuda"] => Ok((0..workers)
            .map(|w| (0..tp).map(|r| format!("cuda:{}", w * tp + r)).collect::<Vec<_>>().join(","))
            .collect()),
        list if list.len() == workers * tp => Ok(list.chunks(tp).map(|c| c.join(",")).collect()),
        list => {
            bail!("--devices names {} devices, but --workers {workers} × --tp {tp} needs {}", list.len(), workers * tp)
        }
    }
}

fn spawn_worker(
    args: &UpArgs,
    (controller, token): (&str, &ClusterToken),
    threads: usize,
    index: usize,
    devices: &str,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating the herd binary")?;
    let mut cmd = Command::new(exe);
    // The token goes in the environment, which only this user can read, not on the command line.
    cmd.env(herd_ops::auth::TOKEN_ENV, token.secret()).env_remove("HERD_CLUSTER_TOKEN_FILE");
    cmd.arg("worker")
        .arg("--model")
        .arg(&args.model)
        .args(["--controller", controller, "--listen", "127.0.0.1:0", "--dtype", &args.dtype])
        .args(["--threads", &threads.to_string(), "--worker-id", &format!("up-worker-{index}")])
        .args(["--tp", &args.tp.to_string(), "--devices", devices]);
    if let Some(q) = args.quantize {
        cmd.args(["--quantize", q.name()]);
    }
    // CPU workers share the machine's memory, and a busy worker's KV cache fills its budget:
    // each takes an equal part of what one worker alone would take.
    if devices == "cpu" && args.workers > 1 {
        let share = herd_worker::engine::available_memory_bytes().map(|b| (b / 2 / args.workers as u64) >> 20);
        if let Some(mb) = share.filter(|&mb| mb > 0) {
            cmd.args(["--kv-cache-mb", &mb.to_string()]);
        }
    }
    for name in &args.model_names {
        cmd.args(["--model-name", name]);
    }
    if let Some(t) = &args.chat_template {
        cmd.args(["--chat-template", t]);
    }
    // The child's "listening" line is ours to swallow; its logs go to our stderr.
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    // If `herd up` itself dies (even by SIGKILL), the kernel tells its workers to drain and exit.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches no memory of the forked child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd.spawn().context("starting a worker process")?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(worker = index, "{line}");
            }
        });
    }
    Ok(child)
}

/// Waits until `n` workers are registered, failing if a worker process exits first.
async fn wait_for_workers(
    (controller, token): (&str, &ClusterToken),
    n: usize,
    children: &mut [Child],
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(controller.to_string())?.connect().await?;
    let mut client = pb::controller_client::ControllerClient::new(herd_ops::auth::present(channel, Some(token)));
    loop {
        for (i, child) in children.iter_mut().enumerate() {
            if let Some(status) = child.try_wait()? {
                bail!("worker {i} exited while starting ({status}); see its log above");
            }
        }
        let workers = client.list_workers(pb::ListWorkersRequest::default()).await?.into_inner().workers;
        if workers.len() >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The wait before restarting a worker that exited, doubled after each exit that came sooner than
/// [`STABLE_RUN`] after its start, up to [`MAX_RESTART_DELAY`].
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
const STABLE_RUN: Duration = Duration::from_secs(60);

/// Starts again each worker whose process exits (a crash, the OOM killer, a `kill -9`) until
/// `stop`, backing off while a worker keeps exiting soon after its start.
async fn supervise(
    args: &UpArgs,
    cluster: (&str, &ClusterToken),
    threads: usize,
    devices: &[String],
    children: &mut [Child],
    stop: &mut Pin<Box<dyn Future<Output = ()> + Send>>,
) -> anyhow::Result<()> {
    let mut delays = vec![FIRST_RESTART_DELAY; children.len()];
    let mut started = vec![std::time::Instant::now(); children.len()];
    loop {
        let exited = futures::future::select_all(children.iter_mut().map(|c| Box::pin(c.wait())));
        let (status, i) = tokio::select! {
            (status, i, _) = exited => (status, i),
            () = &mut *stop => return Ok(()),
        };
        if started[i].elapsed() >= STABLE_RUN {
            delays[i] = FIRST_RESTART_DELAY;
        }
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        eprintln!(
            "herd up: worker {i} exited ({status}); starting it again in {}",
            humantime::format_duration(delays[i])
        );
        tokio::select! {
            () = tokio::time::sleep(delays[i]) => {}
            () = &mut *stop => return Ok(()),
        }
        children[i] = spawn_worker(args, cluster, threads, i, &devices[i])?;
        started[i] = std::time::Instant::now();
        delays[i] = (delays[i] * 2).min(MAX_RESTART_DELAY);
    }
}

/// Runs `herd up` until `stop` (Ctrl-C or SIGTERM).
pub async fn run(args: UpArgs, mut stop: Pin<Box<dyn Future<Output = ()> + Send>>) -> anyhow::Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if !args.model.exists() {
        bail!("--model {}: no such file or directory", args.model.display());
    }
    let devices = worker_devices(&args.devices, args.tp, args.workers)?;
    let with_keys = |mut gateway: herd_gateway::GatewayArgs| {
        gateway.api_keys = args.api_keys.clone();
        gateway.api_key_list = args.api_key_list.clone();
        gateway.routing_policy = args.routing_policy;
        gateway.routing_balance_threshold = args.routing_balance_threshold;
        gateway
    };
    // A bad key file must stop `herd up` before it loads any model.
    with_keys(herd_gateway::GatewayArgs::new(Vec::new(), String::new())).auth()?;
    // Every gRPC call between the roles carries this run's token.
    let token = ClusterToken::generate();
    let controller_listener = TcpListener::bind("127.0.0.1:0").await.context("binding the controller")?;
    let controller = format!("http://{}", controller_listener.local_addr()?);
    let (stop_controller, controller_stopped) = tokio::sync::oneshot::channel::<()>();
    let store = herd_controller::open_store(&ControllerArgs {
        listen: controller.clone(),
        store: args.store,
        heartbeat_ttl: args.heartbeat_ttl,
        max_workers: herd_controller::service::DEFAULT_MAX_WORKERS,
        etcd_endpoints: args.etcd_endpoints.clone(),
        etcd_prefix: args.etcd_prefix.clone(),
        etcd_user: None,
        etcd_password: None,
        etcd_ca: None,
        etcd_cert: None,
        etcd_key: None,
        tls: Default::default(),
        auth: Default::default(),
        metrics: Default::default(),
    })
    .await?;
    let exposure = herd_controller::Exposure { token: Some(token.clone()), ..Default::default() };
    let controller_task = tokio::spawn(herd_controller::serve_store(controller_listener, store, exposure, async {
        let _ = controller_stopped.await;
    }));

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / args.workers).max(1);
    let mut children = (0..args.workers)
        .map(|i| spawn_worker(&args, (&controller, &token), threads, i, &devices[i]))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let bind = format!("{}:{}", args.host, args.port);
    let gateway_listener = TcpListener::bind(&bind).await.with_context(|| format!("--port: cannot bind {bind}"))?;
    let gateway_addr = gateway_listener.local_addr()?;
    let mut gateway_args =
        with_keys(herd_gateway::GatewayArgs::new(vec![controller.clone()], gateway_addr.to_string()));
    gateway_args.cluster_token.given = Some(token.clone());
    let (stop_gateway, gateway_stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway_task = tokio::spawn(herd_gateway::serve(gateway_listener, gateway_args, async {
        let _ = gateway_stopped.await;
    }));

    eprintln!("herd up: loading {} worker(s) of {} …", args.workers, args.model.display());
    // Ok(false): stopped by the user before the workers were ready, which is no error.
    let ready = tokio::select! {
        r = wait_for_workers((&controller, &token), args.workers, &mut children) => r.map(|()| true),
        _ = &mut stop => Ok(false),
    };
    if matches!(ready, Ok(true)) {
        let url = format!("http://{gateway_addr}");
        println!("herd is serving at {url}");
        println!(
            "try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' \
             -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Who wrote Hamlet?\"}}]}}'",
            args.model_names.first().cloned().unwrap_or_else(|| herd_worker::default_name(&args.model))
        );
        supervise(&args, (&controller, &token), threads, &devices, &mut children, &mut stop).await?;
        eprintln!("herd up: stopping");
    }
    for child in &children {
        terminate(child);
    }
    for child in &mut children {
        let _ = child.wait().await;
    }
    let _ = stop_gateway.send(());
    let _ = stop_controller.send(());
    let _ = gateway_task.await;
    let _ = controller_task.await;
    ready.map(drop)
}

#[cfg(test)]
mod tests {
    use super::worker_devices;

    #[test]
    fn gpus_are_dealt_out_tp_per_worker() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(worker_devices(&s(&["cpu"]), 3, 2).unwrap(), vec!["cpu", "cpu"]);
        assert_eq!(worker_devices(&s(&["cuda"]), 2, 2).unwrap(), vec!["cuda:0,cuda:1", "cuda:2,cuda:3"]);
        assert_eq!(worker_devices(&s(&["cuda:3", "cuda:1"]), 1, 2).unwrap(), vec!["cuda:3", "cuda:1"]);
        let e = worker_devices(&s(&["cuda:0", "cuda:1"]), 2, 2).unwrap_err().to_string();
        assert!(e.contains("--devices names 2 devices, but --workers 2 × --tp 2 needs 4"), "{e}");
    }
}

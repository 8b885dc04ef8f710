//! The controller: the worker registry (records with a TTL, kept alive by heartbeats), its change
//! feed, and the `herd.v1.Controller` gRPC service that workers register with and gateways watch.

pub mod error;
pub mod metrics;
pub mod registry;
pub mod service;
#[cfg(test)]
mod testing;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, TryStreamExt};
use herd_ops::{AbortOnDrop, AuthArgs, ClusterTls, ClusterToken, Health, MetricsArgs, RequireToken, TlsArgs};
use herd_proto::v1::controller_server::ControllerServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;

pub use error::ControllerError;
use metrics::ControllerMetrics;
pub use registry::{
    ChangeStream, EtcdOptions, EtcdStore, EtcdTls, Lease, MemoryStore, Store, StoreStats, WorkerChange,
};
pub use service::ControllerService;

/// Which registry store backs the controller.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// In-process: one controller replica; the registry is lost when it exits.
    #[default]
    Memory,
    /// etcd: registrations outlive the controller, and any number of replicas share them.
    Etcd,
}

/// Command-line options of `herd controller`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Address to serve gRPC on; port 0 picks a free one (the startup line on stdout names it).
    #[arg(long, env = "HERD_LISTEN", default_value = "0.0.0.0:7000")]
    pub listen: String,
    /// Where worker records live.
    #[arg(long, env = "HERD_STORE", value_enum, default_value_t = StoreKind::Memory)]
    pub store: StoreKind,
    /// How long a worker stays registered without a heartbeat (e.g. 10s, 1500ms).
    #[arg(long, env = "HERD_HEARTBEAT_TTL", default_value = "10s", value_parser = parse_heartbeat_ttl)]
    pub heartbeat_ttl: Duration,
    /// Most workers registered at once; registrations beyond are refused (ResourceExhausted).
    #[arg(long, env = "HERD_MAX_WORKERS", default_value_t = service::DEFAULT_MAX_WORKERS)]
    pub max_workers: usize,
    /// With `--store etcd`: etcd URLs, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, env = "HERD_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// With `--store etcd`: key prefix; records live under `{prefix}/v1/workers/`.
    #[arg(long, env = "HERD_ETCD_PREFIX", default_value = "/herd")]
    pub etcd_prefix: String,
    /// With `--store etcd`: user, when etcd has auth enabled (needs --etcd-password).
    #[arg(long, env = "HERD_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,
    /// With `--store etcd`: password of --etcd-user.
    #[arg(long, env = "HERD_ETCD_PASSWORD", requires = "etcd_user")]
    pub etcd_password: Option<String>,
    /// With `--store etcd` over https: PEM file of the CA that signed etcd's certificate.
    #[arg(long, env = "HERD_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// With `--store etcd` over https: PEM client certificate, when etcd checks clients.
    #[arg(long, env = "HERD_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// With `--store etcd` over https: PEM key of --etcd-cert.
    #[arg(long, env = "HERD_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Mutual TLS with workers and gateways.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The cluster token callers must present.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// The metrics endpoint.
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// How the controller's servers are exposed, beyond the gRPC listener.
pub struct Exposure {
    /// Mutual TLS on the gRPC listener.
    pub tls: Option<ClusterTls>,
    /// The token every gRPC call must carry (`None`: no token is checked).
    pub token: Option<ClusterToken>,
    /// Most workers registered at once.
    pub max_workers: usize,
    /// Where `/metrics`, `/health` and `/ready` are served.
    pub metrics: MetricsArgs,
}

impl Default for Exposure {
    fn default() -> Self {
        Self { tls: None, token: None, max_workers: service::DEFAULT_MAX_WORKERS, metrics: MetricsArgs::default() }
    }
}

/// Reads a PEM file named by `flag`.
fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, ControllerError> {
    std::fs::read(path).map_err(|e| ControllerError::Config(format!("{flag} {}: {e}", path.display())))
}

/// The store `args` ask for (etcd's connection is lazy: this succeeds while etcd is down).
pub async fn open_store(args: &ControllerArgs) -> Result<Arc<dyn Store>, ControllerError> {
    Ok(match args.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(args.heartbeat_ttl)),
        StoreKind::Etcd => {
            if args.etcd_endpoints.is_empty() {
                return Err(ControllerError::Config("--store etcd needs --etcd-endpoints URL[,URL]".into()));
            }
            let tls = match (&args.etcd_ca, args.etcd_cert.as_ref().zip(args.etcd_key.as_ref())) {
                (None, None) => None,
                (ca, identity) => Some(EtcdTls {
                    ca: ca.as_deref().map(|p| read_pem("--etcd-ca", p)).transpose()?,
                    identity: identity
                        .map(|(cert, key)| {
                            Ok::<_, ControllerError>((read_pem("--etcd-cert", cert)?, read_pem("--etcd-key", key)?))
                        })
                        .transpose()?,
                }),
            };
            let options = EtcdOptions {
                endpoints: args.etcd_endpoints.clone(),
                prefix: args.etcd_prefix.clone(),
                user: args.etcd_user.clone().zip(args.etcd_password.clone()),
                tls,
            };
            Arc::new(EtcdStore::connect(&options, args.heartbeat_ttl).await?)
        }
    })
}

/// Parses `--heartbeat-ttl`, refusing a TTL that would expire every worker at once.
fn parse_heartbeat_ttl(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value).map_err(|err| err.to_string())?;
    check_heartbeat_ttl(ttl).map_err(|err| err.to_string())?;
    Ok(ttl)
}

/// Workers are told the TTL in whole milliseconds, so anything shorter than one would read as zero;
/// a TTL over a day is a typo (and would overflow clock arithmetic if absurdly large).
fn check_heartbeat_ttl(ttl: Duration) -> Result<(), ControllerError> {
    if ttl < Duration::from_millis(1) || ttl > Duration::from_secs(24 * 3600) {
        return Err(ControllerError::Config(format!(
            "--heartbeat-ttl must be between 1ms and 24h, got {}",
            humantime::format_duration(ttl)
        )));
    }
    Ok(())
}

/// Serves the controller with an in-memory registry whose records live `ttl`, on `listener`,
/// until `shutdown` completes (open watch streams then end with Unavailable so the drain finishes).
pub async fn serve(
    listener: TcpListener,
    ttl: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    check_heartbeat_ttl(ttl)?;
    serve_store(listener, Arc::new(MemoryStore::new(ttl)), Exposure::default(), shutdown).await
}

/// How often readiness and the worker gauge are refreshed.
const MONITOR_EVERY: Duration = Duration::from_secs(1);

/// Keeps gRPC health, `/ready` and the worker gauge in step with the store.
async fn monitor(store: Arc<dyn Store>, metrics: Arc<ControllerMetrics>, health: Health) {
    let mut tick = tokio::time::interval(MONITOR_EVERY);
    let mut reported = None;
    loop {
        tick.tick().await;
        let ready = store.readiness().is_ok();
        metrics.set_ready(ready);
        // Health watchers are told only of changes.
        if reported != Some(ready) {
            health.set(ready).await;
            reported = Some(ready);
        }
        if let Ok(workers) = store.list().await {
            metrics.workers.set(workers.len() as i64);
        }
    }
}

/// Serves the controller over any registry store, on `listener`, until `shutdown` completes.
pub async fn serve_store(
    listener: TcpListener,
    store: Arc<dyn Store>,
    exposure: Exposure,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    // The watch streams, the metrics endpoint and the server's drain wait on the same signal.
    let shutdown = shutdown.boxed().shared();
    let service = ControllerService::new(store.clone())
        .max_workers(exposure.max_workers)
        .require_worker_certificates(exposure.tls.is_some())
        .end_watches_on(shutdown.clone());
    let metrics = service.metrics().clone();
    exposure.metrics.serve(metrics.clone(), shutdown.clone()).await?;
    let (health, health_service) = Health::new(&[ControllerServer::<ControllerService>::NAME], false).await;
    let _monitor = AbortOnDrop(tokio::spawn(monitor(store, metrics, health)));
    // Small unary RPCs (heartbeats, picks) should not wait on Nagle's algorithm.
    let incoming = TcpListenerStream::new(listener).map_ok(|stream| {
        let _ = stream.set_nodelay(true);
        stream
    });
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &exposure.tls {
        server = server.tls_config(tls.server())?;
    }
    server
        .add_service(health_service)
        .add_service(InterceptedService::new(
            ControllerServer::new(service)
                .max_decoding_message_size(service::MAX_REQUEST_BYTES)
                .max_encoding_message_size(herd_proto::MAX_WATCH_MESSAGE_BYTES),
            RequireToken(exposure.token),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Runs `herd controller`: binds `--listen`, prints `herd controller listening on {addr}` as the
/// only line on stdout (tests read the port from it), then serves until `shutdown` completes.
pub async fn run(
    args: ControllerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    check_heartbeat_ttl(args.heartbeat_ttl)?;
    let tls = args.tls.load()?;
    let bind_error = |source| ControllerError::Bind { addr: args.listen.clone(), source };
    let listener = TcpListener::bind(&args.listen).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    let token = args.auth.for_server(local_addr, tls.is_some())?;
    let exposure = Exposure { tls, token, max_workers: args.max_workers, metrics: args.metrics.clone() };
    let store = open_store(&args).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "herd controller listening on {local_addr}")
        .and_then(|()| stdout.flush())
        .map_err(ControllerError::Stdout)?;
    drop(stdout);
    tracing::info!(
        listen = %local_addr,
        store = ?args.store,
        heartbeat_ttl = %humantime::format_duration(args.heartbeat_ttl),
        cluster_token = exposure.token.is_some(),
        mutual_tls = exposure.tls.is_some(),
        "controller started"
    );
    serve_store(listener, store, exposure, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use futures::StreamExt;
    use herd_proto::v1::controller_client::ControllerClient;
    use herd_proto::v1::worker_event::Event;
    use herd_proto::v1::{HeartbeatRequest, RegisterWorkerRequest, WatchWorkersRequest};
    use tonic::Code;

    const PATIENCE: Duration = Duration::from_secs(10);

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    #[test]
    fn args_defaults_and_overrides() {
        let cli = Cli::try_parse_from(["herd"]).unwrap();
        assert_eq!(cli.args.listen, "0.0.0.0:7000");
        assert_eq!(cli.args.store, StoreKind::Memory);
        assert_eq!(cli.args.heartbeat_ttl, Duration::from_secs(10));

        let argv = ["herd", "--listen", "127.0.0.1:0", "--store", "memory", "--heartbeat-ttl", "1500ms"];
        let cli = Cli::try_parse_from(argv).unwrap();
        assert_eq!(cli.args.listen, "127.0.0.1:0");
        assert_eq!(cli.args.heartbeat_ttl, Duration::from_millis(1500));
    }

    #[test]
    fn zero_ttl_is_rejected_naming_the_flag() {
        for bad in ["0s", "0ms", "soon"] {
            let err = Cli::try_parse_from(["herd", "--heartbeat-ttl", bad]).unwrap_err().to_string();
            assert!(err.contains("--heartbeat-ttl"), "{bad}: {err}");
        }
        assert!(Cli::try_parse_from(["herd", "--store", "paper"]).is_err());
    }

    #[tokio::test]
    async fn etcd_store_needs_endpoints() {
        let cli = Cli::try_parse_from(["herd", "--store", "etcd", "--listen", "127.0.0.1:0"]).unwrap();
        let err = run(cli.args, async {}).await.unwrap_err().to_string();
        assert!(err.contains("--etcd-endpoints"), "{err}");
    }

    #[tokio::test]
    async fn serve_rejects_zero_ttl() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = serve(listener, Duration::ZERO, async {}).await.unwrap_err();
        assert!(err.to_string().contains("--heartbeat-ttl"), "{err}");
    }

    #[tokio::test]
    async fn run_names_listen_when_the_bind_fails() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = taken.local_addr().unwrap().to_string();
        let args = Cli::try_parse_from(["herd", "--listen", &listen]).unwrap().args;
        let err = run(args, async {}).await.unwrap_err();
        assert!(matches!(err, ControllerError::Bind { .. }), "{err:?}");
        assert!(err.to_string().contains("--listen"), "{err}");
    }

    /// Over a real socket: register, watch, NotFound on an unknown heartbeat, and a shutdown that
    /// completes even while a watch stream is open.
    #[tokio::test]
    async fn serves_over_grpc_and_shuts_down_with_open_watches() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Duration::from_secs(5), async move {
            let _ = stop_rx.await;
        }));

        let mut client = ControllerClient::connect(format!("http://{addr}")).await.unwrap();
        let state = testing::worker("w1", &["vicuna-7b"]);
        let reply = client
            .register_worker(RegisterWorkerRequest { info: state.info.clone(), load: state.load.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.heartbeat_ttl_ms, 5000);

        let mut watch = client.watch_workers(WatchWorkersRequest {}).await.unwrap().into_inner();
        let first = tokio::time::timeout(PATIENCE, watch.next()).await.unwrap().unwrap().unwrap();
        assert!(matches!(first.event, Some(Event::Snapshot(ref s)) if s.workers == vec![state.clone()]), "{first:?}");

        let err = client
            .heartbeat(HeartbeatRequest { worker_id: "ghost".into(), load: None, lease: "x".into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);

        stop_tx.send(()).unwrap();
        let ended = tokio::time::timeout(PATIENCE, watch.next()).await.expect("the watch ends on shutdown");
        assert_eq!(ended.unwrap().unwrap_err().code(), Code::Unavailable);
        drop(watch);
        drop(client);
        tokio::time::timeout(PATIENCE, server).await.expect("the server drains").unwrap().unwrap();
    }
}

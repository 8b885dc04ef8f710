//! herd's gateway: the OpenAI-compatible HTTP API in front of the workers.
//!
//! It keeps a live table of workers from the controller's `WatchWorkers` stream (see [`watch`]),
//! routes every choice of a request to the least-loaded healthy worker for its model (see [`router`])
//! and translates between OpenAI's JSON/SSE formats and the workers' gRPC `Generate` streams.

mod dispatch;
pub mod openai;
pub mod router;
pub mod watch;

#[cfg(test)]
mod testing;

use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tracing::info;

pub use openai::errors::GatewayError;
pub use router::WorkerTable;

/// Command-line and environment settings of `herd gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Controller gRPC URLs, tried in turn (e.g. http://127.0.0.1:7000).
    #[arg(long, required = true, value_delimiter = ',', env = "HERD_CONTROLLER")]
    pub controller: Vec<String>,
    /// Address the HTTP API listens on.
    #[arg(long, default_value = "0.0.0.0:8000", env = "HERD_LISTEN")]
    pub listen: String,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024, env = "HERD_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    /// How long a worker that failed is skipped (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, env = "HERD_WORKER_DOWN_FOR")]
    pub worker_down_for: Duration,
    /// Seconds sent in `Retry-After` with 429 and 503 answers.
    #[arg(long, default_value_t = 1, env = "HERD_RETRY_AFTER")]
    pub retry_after: u64,
}

/// The per-request settings taken from [`GatewayArgs`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// How long a failed worker is skipped.
    pub worker_down_for: Duration,
    /// Seconds sent in `Retry-After` with 429 and 503 answers.
    pub retry_after: u64,
}

impl From<&GatewayArgs> for Settings {
    fn from(args: &GatewayArgs) -> Self {
        Settings {
            max_body_bytes: args.max_body_bytes,
            worker_down_for: args.worker_down_for,
            retry_after: args.retry_after,
        }
    }
}

/// What every HTTP handler shares: the worker table and the settings.
#[derive(Clone)]
pub struct AppState {
    /// The live worker table, filled by the watch loop.
    pub table: Arc<WorkerTable>,
    /// Per-request settings.
    pub settings: Arc<Settings>,
}

impl AppState {
    /// Builds the state from a table (filled by [`watch::watch_controllers`] or by hand in tests).
    pub fn new(table: Arc<WorkerTable>, settings: Settings) -> Self {
        AppState { table, settings: Arc::new(settings) }
    }
}

/// The gateway's HTTP routes, ready to serve or to call in-process.
pub fn router(state: AppState) -> Router {
    use openai::handlers;
    let retry_after = state.settings.retry_after;
    Router::new()
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{*model}", get(handlers::get_model))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/health", get(handlers::health))
        // Must come after the routes: it only applies to those already added.
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::not_found)
        .layer(axum::middleware::map_response_with_state(retry_after, handlers::add_retry_after))
        .with_state(state)
}

/// Aborts a background task when dropped, so the watch loop never outlives its server.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the API on `listener` until `shutdown` resolves, watching the controllers meanwhile.
pub async fn serve(
    listener: TcpListener,
    args: GatewayArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    watch::check_urls(&args.controller)?;
    let table = Arc::new(WorkerTable::new());
    let _watcher = AbortOnDrop(tokio::spawn(watch::watch_controllers(args.controller.clone(), table.clone())));
    let state = AppState::new(table, Settings::from(&args));
    info!(addr = ?listener.local_addr().ok(), controllers = ?args.controller, "gateway serving");
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// Binds `--listen`, announces the bound address on stdout, then [`serve`]s.
pub async fn run(args: GatewayArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), GatewayError> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|source| GatewayError::Bind { addr: args.listen.clone(), source })?;
    let local = listener.local_addr()?;
    {
        // Tests parse this exact line to learn the port of `--listen 127.0.0.1:0`.
        let mut out = std::io::stdout().lock();
        writeln!(out, "herd gateway listening on {local}")?;
        out.flush()?;
    }
    serve(listener, args, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GatewayArgs,
    }

    #[test]
    fn args_parse_with_defaults() {
        let cli = Cli::try_parse_from(["gw", "--controller", "http://a:7000,http://b:7000"]).unwrap();
        assert_eq!(cli.args.controller, vec!["http://a:7000", "http://b:7000"]);
        assert_eq!(cli.args.listen, "0.0.0.0:8000");
        assert_eq!(cli.args.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(cli.args.worker_down_for, Duration::from_secs(10));
        assert_eq!(cli.args.retry_after, 1);
        let cli = Cli::try_parse_from(["gw", "--controller", "http://a:7000", "--worker-down-for", "250ms"]).unwrap();
        assert_eq!(cli.args.worker_down_for, Duration::from_millis(250));
    }

    #[test]
    fn controller_is_required() {
        // The environment may legitimately provide it; only check when it does not.
        if std::env::var_os("HERD_CONTROLLER").is_none() {
            assert!(Cli::try_parse_from(["gw"]).is_err());
        }
    }

    #[tokio::test]
    async fn run_reports_a_bad_listen_address() {
        let args = GatewayArgs {
            controller: vec!["http://127.0.0.1:1".into()],
            listen: "not-an-address".into(),
            max_body_bytes: 1024,
            worker_down_for: Duration::from_secs(1),
            retry_after: 1,
        };
        let err = run(args, std::future::pending()).await.unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
    }

    #[tokio::test]
    async fn serve_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let args = GatewayArgs {
            controller: vec!["http://127.0.0.1:1".into()],
            listen: String::new(),
            max_body_bytes: 1024,
            worker_down_for: Duration::from_secs(1),
            retry_after: 1,
        };
        let result = tokio::time::timeout(Duration::from_secs(5), serve(listener, args, async {})).await;
        assert!(matches!(result, Ok(Ok(()))));
    }

    #[test]
    fn entry_points_are_send() {
        fn is_send<T: Send>(_: &T) {}
        let args = GatewayArgs {
            controller: vec!["http://127.0.0.1:1".into()],
            listen: "127.0.0.1:0".into(),
            max_body_bytes: 1024,
            worker_down_for: Duration::from_secs(1),
            retry_after: 1,
        };
        is_send(&run(args, async {}));
    }

    /// A raw HTTP/1.1 exchange, so the test needs no HTTP client crate.
    async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serve_routes_through_the_watched_table() {
        use crate::testing::{FakeController, FakeWorker, Script, worker_state};
        use herd_proto::v1::{WorkerEvent, WorkerSnapshot, worker_event::Event};
        let worker = FakeWorker::start(Script::Reply(vec!["hi", " there"])).await;
        let snapshot = WorkerEvent {
            event: Some(Event::Snapshot(WorkerSnapshot {
                workers: vec![worker_state("w", &worker.address, &["m"], 0)],
                heartbeat_ttl_ms: 10_000,
            })),
        };
        let controller = FakeController::start(vec![vec![snapshot]]).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let args = GatewayArgs {
            controller: vec![controller.address.clone()],
            listen: addr.to_string(),
            max_body_bytes: 1 << 20,
            worker_down_for: Duration::from_secs(10),
            retry_after: 1,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, args, async move {
            let _ = stopped.await;
        }));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !http(addr, "GET", "/health", "").await.contains(r#""workers":1"#) {
            assert!(tokio::time::Instant::now() < deadline, "the table never synced");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
        let response = http(addr, "POST", "/v1/chat/completions", body).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains(r#""content":"hi there""#), "{response}");
        let _ = stop.send(());
        let result = tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
        assert!(result.is_ok());
    }
}

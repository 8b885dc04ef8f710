//! herd's gateway: the OpenAI-compatible HTTP API in front of the workers.
//!
//! It keeps a live table of workers from the controller's `WatchWorkers` stream (see [`watch`]),
//! routes every choice of a request to the least-loaded healthy worker for its model (see [`router`])
//! and translates between OpenAI's JSON/SSE formats and the workers' gRPC `Generate` streams.
//! It also checks API keys and rate limits ([`auth`]), exports Prometheus metrics ([`metrics`]),
//! and serves the chat page and the cluster dashboard ([`ui`]).

pub mod auth;
mod cors;
mod dispatch;
mod https;
mod live;
pub mod metrics;
pub mod openai;
pub mod policy;
mod prefix;
pub mod router;
mod server;
pub mod ui;
pub mod watch;

#[cfg(test)]
mod testing;

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use herd_ops::{AbortOnDrop, TlsArgs, TokenArgs};
use tokio::net::TcpListener;
use tracing::info;

use auth::{Auth, Keys, Limits};
use metrics::GatewayMetrics;
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
    /// How long a worker may take to accept a call (answer its headers) before the call moves
    /// to another worker: a worker that accepts connections and never answers is skipped.
    #[arg(long, default_value = "10s", value_parser = time_limit, env = "HERD_WORKER_ACCEPT_TIMEOUT")]
    pub worker_accept_timeout: Duration,
    /// How long a worker may take to send a choice's first token (queueing and the prompt
    /// included) before the call moves to another worker.
    #[arg(long, default_value = "5m", value_parser = time_limit, env = "HERD_FIRST_TOKEN_TIMEOUT")]
    pub first_token_timeout: Duration,
    /// How long a client may take to send a request head, and how long an idle keep-alive
    /// connection stays open.
    #[arg(long, default_value = "30s", value_parser = time_limit, env = "HERD_HEADER_TIMEOUT")]
    pub header_timeout: Duration,
    /// How long a whole generation may take, queueing included: a non-streamed request past it
    /// gets 504, a stream ends with an error event, and the worker stops generating.
    #[arg(long, default_value = "30m", value_parser = time_limit, env = "HERD_REQUEST_TIMEOUT")]
    pub request_timeout: Duration,
    /// How long a streamed request waits for its first tokens before answering 200 anyway (until
    /// then an error still gets its own status); after that an SSE comment goes out whenever
    /// as long passes without an event, and a failure arrives as an error event.
    #[arg(long, default_value = "10s", value_parser = time_limit, env = "HERD_STREAM_STATUS_WAIT")]
    pub stream_status_wait: Duration,
    /// How long a client may take to send a whole request body (else 408).
    #[arg(long, default_value = "60s", value_parser = time_limit, env = "HERD_BODY_TIMEOUT")]
    pub body_timeout: Duration,
    /// File of API keys, one per line (`#` comments allowed): every `/v1` route then needs
    /// `Authorization: Bearer KEY`. `/health`, `/ready` and `/metrics` stay open.
    #[arg(long, env = "HERD_API_KEYS_FILE")]
    pub api_keys: Option<PathBuf>,
    /// API keys given directly, comma-separated (added to --api-keys).
    #[arg(long = "api-key", env = "HERD_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_key_list: Vec<String>,
    /// Requests per minute allowed to each API key (needs keys).
    #[arg(long, env = "HERD_RATE_LIMIT_RPM")]
    pub rate_limit_rpm: Option<u32>,
    /// Prompt + completion tokens per minute allowed to each API key (needs keys).
    #[arg(long, env = "HERD_RATE_LIMIT_TPM")]
    pub rate_limit_tpm: Option<u32>,
    /// PEM certificate chain for HTTPS on --listen (with --http-tls-key).
    #[arg(long, env = "HERD_HTTP_TLS_CERT", requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,
    /// PEM private key of --http-tls-cert.
    #[arg(long, env = "HERD_HTTP_TLS_KEY", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,
    /// Serve `/metrics` only to callers with an API key (the key's allowance is not spent).
    #[arg(long, env = "HERD_METRICS_REQUIRE_KEY")]
    pub metrics_require_key: bool,
    /// How a call's worker is chosen: kv-aware (where the prompt's prefix is cached, within
    /// the balance threshold), least-loaded, power-of-two or round-robin.
    #[arg(long, value_enum, default_value = "kv-aware", env = "HERD_ROUTING_POLICY")]
    pub routing_policy: policy::PolicyName,
    /// With kv-aware routing: how much busier than the least loaded worker (in sequences) a
    /// worker holding more of the prompt may be and still get the call.
    #[arg(long, default_value_t = DEFAULT_BALANCE_THRESHOLD, value_parser = balance_threshold,
          env = "HERD_ROUTING_BALANCE_THRESHOLD")]
    pub routing_balance_threshold: f64,
    /// Origins whose web pages may call the API from a browser (CORS): `*` or
    /// scheme://host[:port], comma-separated; none by default.
    #[arg(long, value_delimiter = ',', value_parser = cors::origin, env = "HERD_CORS_ALLOW_ORIGIN")]
    pub cors_allow_origin: Vec<String>,
    /// Mutual TLS towards the controller and workers.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The cluster token its calls to the controller and workers carry.
    #[command(flatten)]
    pub cluster_token: TokenArgs,
}

/// `--routing-balance-threshold`'s default.
pub const DEFAULT_BALANCE_THRESHOLD: f64 = 8.0;

/// Parses `--routing-balance-threshold`: a finite number of sequences, at least 0.
pub fn balance_threshold(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a number of sequences (0 or more)")),
    }
}

/// How often the dashboard's chart points are taken.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

impl GatewayArgs {
    /// Gateway arguments with every option at its default, for `controller`.
    pub fn new(controller: Vec<String>, listen: String) -> Self {
        GatewayArgs {
            controller,
            listen,
            max_body_bytes: 4 * 1024 * 1024,
            worker_down_for: Duration::from_secs(10),
            retry_after: 1,
            worker_accept_timeout: Deadlines::default().accept,
            first_token_timeout: Deadlines::default().first_token,
            header_timeout: Duration::from_secs(30),
            body_timeout: Deadlines::default().body,
            stream_status_wait: Deadlines::default().stream_status,
            request_timeout: Deadlines::default().request,
            api_keys: None,
            api_key_list: Vec::new(),
            rate_limit_rpm: None,
            rate_limit_tpm: None,
            http_tls_cert: None,
            http_tls_key: None,
            metrics_require_key: false,
            routing_policy: policy::PolicyName::KvAware,
            routing_balance_threshold: DEFAULT_BALANCE_THRESHOLD,
            cors_allow_origin: Vec::new(),
            tls: TlsArgs::default(),
            cluster_token: TokenArgs::default(),
        }
    }

    /// The API keys and their limits; `None` when no key is configured.
    pub fn auth(&self) -> Result<Option<Auth>, GatewayError> {
        let mut keys = match &self.api_keys {
            Some(path) => Keys::read(path).map_err(GatewayError::Config)?,
            None => Vec::new(),
        };
        keys.extend(self.api_key_list.iter().cloned());
        let Some(keys) = Keys::new(keys.iter().map(String::as_str)) else {
            if self.metrics_require_key {
                return Err(GatewayError::Config(
                    "--metrics-require-key needs API keys: give them with --api-keys or HERD_API_KEYS".into(),
                ));
            }
            if self.rate_limit_rpm.is_some() || self.rate_limit_tpm.is_some() {
                return Err(GatewayError::Config(
                    "--rate-limit-rpm and --rate-limit-tpm are per API key: give keys with --api-keys or HERD_API_KEYS"
                        .into(),
                ));
            }
            return Ok(None);
        };
        for (flag, value) in [("--rate-limit-rpm", self.rate_limit_rpm), ("--rate-limit-tpm", self.rate_limit_tpm)] {
            if value == Some(0) {
                return Err(GatewayError::Config(format!("{flag} must be at least 1 (leave it out for no limit)")));
            }
        }
        let limits =
            Limits { requests: self.rate_limit_rpm, tokens: self.rate_limit_tpm, period: Duration::from_secs(60) };
        Ok(Some(Auth::new(keys, limits)))
    }
}

/// The longest time limit a flag takes: beyond it, clock arithmetic could overflow.
const MAX_TIME_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses a time-limit flag: zero would refuse everything (and make SSE comments spin), and
/// more than [`MAX_TIME_LIMIT`] is a typo.
fn time_limit(value: &str) -> Result<Duration, String> {
    let limit = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if limit.is_zero() || limit > MAX_TIME_LIMIT {
        return Err(format!("must be more than 0 and at most {}", humantime::format_duration(MAX_TIME_LIMIT)));
    }
    Ok(limit)
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
    /// How long a worker may take to accept a call, then to send its first token.
    pub deadlines: Deadlines,
}

/// How long the gateway waits on a client's body, and on a worker before calling another.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// For the client's whole request body.
    pub body: Duration,
    /// For the worker to accept the call (its response headers).
    pub accept: Duration,
    /// For the first token, from the call's start.
    pub first_token: Duration,
    /// For a streamed request's first tokens, before its 200 goes out anyway.
    pub stream_status: Duration,
    /// For the whole request, from its arrival.
    pub request: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            body: Duration::from_secs(60),
            accept: Duration::from_secs(10),
            first_token: Duration::from_secs(300),
            stream_status: Duration::from_secs(10),
            request: Duration::from_secs(30 * 60),
        }
    }
}

impl From<&GatewayArgs> for Settings {
    fn from(args: &GatewayArgs) -> Self {
        Settings {
            max_body_bytes: args.max_body_bytes,
            worker_down_for: args.worker_down_for,
            retry_after: args.retry_after,
            deadlines: Deadlines {
                body: args.body_timeout,
                accept: args.worker_accept_timeout,
                first_token: args.first_token_timeout,
                stream_status: args.stream_status_wait,
                request: args.request_timeout,
            },
        }
    }
}

/// What every HTTP handler shares: the worker table, the settings, keys and metrics.
#[derive(Clone)]
pub struct AppState {
    /// The live worker table, filled by the watch loop.
    pub table: Arc<WorkerTable>,
    /// Per-request settings.
    pub settings: Arc<Settings>,
    /// API keys and rate limits; `None` leaves `/v1` open.
    pub auth: Option<Arc<Auth>>,
    /// The gateway's metrics.
    pub metrics: Arc<GatewayMetrics>,
    /// Whether `/metrics` needs an API key too.
    pub private_metrics: bool,
    /// Origins allowed to call from a browser (`--cors-allow-origin`).
    pub cors_origins: Vec<String>,
}

impl AppState {
    /// Builds the state from a table (filled by [`watch::watch_controllers`] or by hand in tests).
    pub fn new(table: Arc<WorkerTable>, settings: Settings) -> Self {
        AppState {
            table,
            settings: Arc::new(settings),
            auth: None,
            metrics: Arc::new(GatewayMetrics::new()),
            private_metrics: false,
            cors_origins: Vec::new(),
        }
    }

    /// Requires API keys (and their limits) on `/v1`.
    #[must_use]
    pub fn with_auth(mut self, auth: Option<Auth>) -> Self {
        self.auth = auth.map(Arc::new);
        self
    }

    /// Lets web pages from `origins` call the API (see [`cors::layer`]).
    #[must_use]
    pub fn with_cors(mut self, origins: Vec<String>) -> Self {
        self.cors_origins = origins;
        self
    }

    /// Puts `/metrics` behind the API keys (when there are keys).
    #[must_use]
    pub fn with_private_metrics(mut self, private: bool) -> Self {
        self.private_metrics = private;
        self
    }
}

/// The gateway's HTTP routes, ready to serve or to call in-process.
pub fn router(state: AppState) -> Router {
    use openai::handlers;
    let retry_after = state.settings.retry_after;
    let cors = cors::layer(&state.cors_origins);
    let mut api = Router::new()
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{*model}", get(handlers::get_model))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/tokenize", post(openai::tokens::tokenize))
        .route("/detokenize", post(openai::tokens::detokenize));
    let mut admin = Router::new().route("/admin/cluster", get(ui::cluster));
    let mut open = Router::new();
    if state.private_metrics && state.auth.is_some() {
        admin = admin.route("/metrics", get(handlers::metrics));
    } else {
        open = open.route("/metrics", get(handlers::metrics));
    }
    if let Some(auth) = state.auth.clone() {
        // Route layers: unknown paths still answer 404, not 401.
        api = api.route_layer(axum::middleware::from_fn_with_state(auth.clone(), auth::require_key));
        admin = admin.route_layer(axum::middleware::from_fn_with_state(auth, auth::require_key_only));
    }
    let app = api
        .merge(admin)
        .merge(open)
        .route("/", get(ui::chat_page))
        .route("/dashboard", get(ui::dashboard_page))
        .route("/ui/config", get(ui::config))
        .route("/ui/{file}", get(ui::asset))
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        // Must come after the routes: it only applies to those already added.
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(axum::middleware::map_response_with_state(retry_after, handlers::add_retry_after));
    // Outermost, so that preflights (which carry no API key) are answered before auth.
    let app = match cors {
        Some(cors) => app.layer(cors),
        None => app,
    };
    app.with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves, watching the controllers meanwhile.
pub async fn serve(
    listener: TcpListener,
    args: GatewayArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let tls = args.tls.load().map_err(|e| GatewayError::Config(e.to_string()))?;
    watch::check_urls(&args.controller, tls.as_ref())?;
    let auth = args.auth()?;
    let https = match (&args.http_tls_cert, &args.http_tls_key) {
        (Some(cert), Some(key)) => Some(https::config(cert, key)?),
        _ => None,
    };
    let token = args.cluster_token.load().map_err(|e| GatewayError::Config(e.to_string()))?;
    let policy = args.routing_policy.build(args.routing_balance_threshold);
    let table = Arc::new(WorkerTable::with_credentials(tls, token).with_policy(policy));
    let _watcher = AbortOnDrop(tokio::spawn(watch::watch_controllers(args.controller.clone(), table.clone())));
    let sampled = table.clone();
    let _sampler = AbortOnDrop(tokio::spawn(async move {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        loop {
            every.tick().await;
            sampled.sample();
        }
    }));
    let api_keys = auth.as_ref().map_or(0, |a| a.keys.len());
    let addr = listener.local_addr().ok();
    info!(?addr, controllers = ?args.controller, api_keys, https = https.is_some(), routing = table.policy_name(),
          "gateway serving");
    let app = router(
        AppState::new(table, Settings::from(&args))
            .with_auth(auth)
            .with_private_metrics(args.metrics_require_key)
            .with_cors(args.cors_allow_origin.clone()),
    );
    match https {
        Some(config) => {
            server::serve(https::TlsListener::new(listener, config)?, app, args.header_timeout, shutdown).await
        }
        None => server::serve(listener, app, args.header_timeout, shutdown).await,
    }
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
    fn keys_and_limits_are_checked_at_start() {
        let mut args = GatewayArgs::new(vec!["http://a:7000".into()], "127.0.0.1:0".into());
        assert!(args.auth().unwrap().is_none(), "no keys: /v1 stays open");
        args.rate_limit_rpm = Some(10);
        let err = args.auth().err().unwrap().to_string();
        assert!(err.contains("--rate-limit-rpm") && err.contains("API key"), "{err}");
        args.api_key_list = vec!["sk-1".into(), " ".into()];
        assert_eq!(args.auth().unwrap().unwrap().keys.len(), 1);
        args.rate_limit_tpm = Some(0);
        assert!(args.auth().err().unwrap().to_string().starts_with("--rate-limit-tpm"));
        let cli = Cli::try_parse_from(["gw", "--controller", "http://a:7000", "--api-key", "k1,k2"]).unwrap();
        assert_eq!(cli.args.api_key_list, vec!["k1", "k2"]);
    }

    #[test]
    fn controller_is_required() {
        // The environment may legitimately provide it; only check when it does not.
        if std::env::var_os("HERD_CONTROLLER").is_none() {
            assert!(Cli::try_parse_from(["gw"]).is_err());
        }
    }

    #[test]
    fn time_limits_must_be_positive_and_sane() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            gateway: GatewayArgs,
        }
        let parse =
            |flag: &str, value: &str| Cli::try_parse_from(["herd", "--controller", "http://a:7000", flag, value]);
        for flag in ["--stream-status-wait", "--request-timeout", "--body-timeout", "--header-timeout"] {
            for bad in ["0s", "100000d"] {
                let err = parse(flag, bad).err().unwrap_or_else(|| panic!("{flag} {bad} accepted")).to_string();
                assert!(err.contains(flag) && err.contains("more than 0"), "{err}");
            }
        }
        let cli = parse("--request-timeout", "90s").unwrap();
        assert_eq!(cli.gateway.request_timeout, Duration::from_secs(90));
    }

    #[tokio::test]
    async fn run_reports_a_bad_listen_address() {
        let args = GatewayArgs::new(vec!["http://127.0.0.1:1".into()], "not-an-address".into());
        let err = run(args, std::future::pending()).await.unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
    }

    #[tokio::test]
    async fn serve_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let args = GatewayArgs::new(vec!["http://127.0.0.1:1".into()], String::new());
        let result = tokio::time::timeout(Duration::from_secs(5), serve(listener, args, async {})).await;
        assert!(matches!(result, Ok(Ok(()))));
    }

    #[test]
    fn entry_points_are_send() {
        fn is_send<T: Send>(_: &T) {}
        let args = GatewayArgs::new(vec!["http://127.0.0.1:1".into()], "127.0.0.1:0".into());
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
        let args = GatewayArgs::new(vec![controller.address.clone()], addr.to_string());
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

    #[test]
    fn the_balance_threshold_is_a_finite_number_of_sequences() {
        assert_eq!(balance_threshold("2.5"), Ok(2.5));
        assert_eq!(balance_threshold("0"), Ok(0.0));
        for bad in ["-1", "nan", "inf", "", "two"] {
            assert!(balance_threshold(bad).is_err(), "{bad}");
        }
    }
}

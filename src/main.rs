//! `herd`: one binary for every role of the serving cluster.

mod bench;
mod bench_engine;
mod chat;
mod openai_client;
mod up;

use std::future::Future;
use std::io::IsTerminal;
use std::pin::Pin;

use clap::{Parser, Subcommand};

/// herd — a serving cluster for Vicuna and other LLaMA-family chat models.
#[derive(Parser)]
#[command(name = "herd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: `text` for people, `json` (one object per line, with the request id
    /// of the span) for log collectors. Verbosity comes from HERD_LOG (e.g. info, herd_worker=debug).
    #[arg(long, global = true, env = "HERD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sends logs to stderr, so that stdout carries only answers and "listening on" lines; `level`
/// unless HERD_LOG says otherwise.
fn init_logs(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERD_LOG").unwrap_or_else(|_| level.into());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Span fields (the request id) are flattened into each line's `span` and `spans`.
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: the registry of workers.
    Controller(herd_controller::ControllerArgs),
    /// Run a worker: load a model and serve it over gRPC.
    Worker(herd_worker::WorkerArgs),
    /// Run the OpenAI-compatible HTTP gateway.
    Gateway(herd_gateway::GatewayArgs),
    /// Run a whole local cluster: controller, workers and gateway.
    Up(up::UpArgs),
    /// Chat in the terminal with a model file, or with a gateway (--url).
    Chat(chat::ChatArgs),
    /// Load-test a gateway: throughput, time to first token, inter-token and end-to-end latency.
    Bench(bench::BenchArgs),
}

/// Listens for Ctrl-C and SIGTERM from the moment it is called (so a signal during a long model
/// load is not lost); the future resolves on the first of them. Call it inside the runtime.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// A runtime for a server role; few threads, since the engine computes on its own threads.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Runs a server role on its runtime until it returns; `role` gets the shutdown signal.
fn serve<F: Future<Output = anyhow::Result<()>>>(
    role: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    let result = rt.block_on(async {
        let stop = shutdown_signal()?;
        role(Box::pin(stop)).await
    });
    // The role is done; a model load it abandoned on a signal must not hold the exit.
    rt.shutdown_background();
    result
}

fn main() {
    let cli = Cli::parse();
    // A terminal chat shows only what goes wrong between its prompts and answers.
    init_logs(cli.log_format, if matches!(cli.command, Command::Chat(_)) { "warn" } else { "info" });
    let threads = match &cli.command {
        Command::Worker(args) => args.threads,
        Command::Bench(args) => args.threads(),
        _ => None,
    };
    // `herd up` starts its workers as child processes: they log the same way.
    let format = if cli.log_format == LogFormat::Json { "json" } else { "text" };
    // SAFETY: no other thread exists yet to read the environment concurrently.
    unsafe { std::env::set_var("HERD_LOG_FORMAT", format) };
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        // candle sizes its matmul pools from these when they first start, and without them it
        // re-reads /proc/cpuinfo on every CPU op; a worker given a share of the cores must not
        // spin on all of them either.
        if let Some(n) = threads.or_else(|| std::env::var_os(var).is_none().then(herd_worker::engine::default_threads))
        {
            // SAFETY: no other thread exists yet to read the environment concurrently.
            unsafe { std::env::set_var(var, n.to_string()) };
        }
    }
    let result = match cli.command {
        Command::Controller(args) => serve(|stop| async move { Ok(herd_controller::run(args, stop).await?) }),
        Command::Worker(args) => serve(|stop| async move { Ok(herd_worker::run(args, stop).await?) }),
        Command::Gateway(args) => serve(|stop| async move { Ok(herd_gateway::run(args, stop).await?) }),
        Command::Up(args) => serve(|stop| up::run(args, stop)),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("herd: {e:#}");
        std::process::exit(1);
    }
}

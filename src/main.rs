//! `herd`: one binary for every role of the serving cluster.

mod chat;
mod up;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};

/// herd — a serving cluster for Vicuna and other LLaMA-family chat models.
#[derive(Parser)]
#[command(name = "herd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

/// Resolves on Ctrl-C or SIGTERM, whichever comes first.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A runtime for a server role; few threads, since the engine computes on its own threads.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn main() {
    // Logs go to stderr so that stdout carries only answers and "listening on" lines.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HERD_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Controller(args) => {
            runtime().and_then(|rt| Ok(rt.block_on(herd_controller::run(args, shutdown_signal()))?))
        }
        Command::Worker(args) => runtime().and_then(|rt| Ok(rt.block_on(herd_worker::run(args, shutdown_signal()))?)),
        Command::Gateway(args) => runtime().and_then(|rt| Ok(rt.block_on(herd_gateway::run(args, shutdown_signal()))?)),
        Command::Up(args) => runtime().and_then(|rt| rt.block_on(up::run(args))),
        Command::Chat(args) => chat::run(args),
    };
    if let Err(e) = result {
        eprintln!("herd: {e:#}");
        std::process::exit(1);
    }
}

//! `herd`: one binary for every role of the serving cluster.

mod chat;

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
    /// Chat with a model in the terminal, or answer one --prompt for scripts.
    Chat(chat::ChatArgs),
}

fn main() {
    // Logs go to stderr so that `--prompt` leaves only the answer on stdout.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HERD_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Chat(args) => chat::run(args),
    };
    if let Err(e) = result {
        eprintln!("herd: {e:#}");
        std::process::exit(1);
    }
}

//! `herd chat`: an interactive terminal chat, or one answer with `--prompt`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use herd_worker::engine::{DTypeChoice, Engine, GenerationParams, LoadOptions, Message, SamplingParams, parse_devices};
use indicatif::{ProgressBar, ProgressStyle};

mod remote;

/// Flags of `herd chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// An HF checkpoint directory or a .gguf file to load here.
    #[arg(long, env = "HERD_MODEL", required_unless_present = "url", conflicts_with = "url")]
    model: Option<PathBuf>,
    /// Chat through a herd (or any OpenAI-compatible) gateway instead, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "HERD_URL")]
    url: Option<String>,
    /// With --url: the model to ask (default: the gateway's first model).
    #[arg(long = "model-name", env = "HERD_MODEL_NAME", requires = "url")]
    model_name: Option<String>,
    /// With --url: an API key of the gateway, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "HERD_API_KEY", hide_env_values = true, requires = "url")]
    api_key: Option<String>,
    /// With an `https://` --url: a PEM file of the CA that signed the gateway's certificate,
    /// trusted beside the system's roots.
    #[arg(long, env = "HERD_CA_CERT", requires = "url")]
    ca_cert: Option<PathBuf>,
    /// Answer this one message, print the answer to stdout and exit.
    #[arg(long)]
    prompt: Option<String>,
    /// System message (replaces the template's default).
    #[arg(long, env = "HERD_SYSTEM")]
    system: Option<String>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Most tokens per answer (default: what the context leaves).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Chat template: vicuna_v1.1, one_shot, or a Jinja file.
    #[arg(long, env = "HERD_CHAT_TEMPLATE")]
    chat_template: Option<String>,
    /// Weight dtype: auto, f32, f16, bf16.
    #[arg(long, env = "HERD_DTYPE", default_value = "auto")]
    dtype: DTypeChoice,
    /// Quantize an HF checkpoint's matrices as they are read: q8_0, q4_0 or q4_k (CPU only; GGUF
    /// files are used as they are quantized).
    #[arg(long, env = "HERD_QUANTIZE")]
    quantize: Option<herd_worker::engine::QuantizeChoice>,
    /// Tensor-parallel ranks to split the model over (default: one per device listed).
    #[arg(long, env = "HERD_TP")]
    tp: Option<usize>,
    /// Devices: cpu (every rank a CPU thread), cuda (the first --tp GPUs), or cuda:0,cuda:1,...
    #[arg(long, visible_alias = "device", env = "HERD_DEVICES", value_delimiter = ',', default_value = "cpu")]
    devices: Vec<String>,
}

fn load(args: &ChatArgs, model: &Path) -> anyhow::Result<Engine> {
    let opts = LoadOptions {
        model: model.to_path_buf(),
        dtype: args.dtype,
        quantize: args.quantize,
        devices: parse_devices(&args.devices, args.tp)?,
        chat_template: args.chat_template.clone(),
        threads: herd_worker::engine::default_threads(),
        tensor_attention: false,
        kv: Default::default(),
    };
    // indicatif draws nothing when stderr is not a terminal.
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading weights {bar:40} {pos}/{len} (embeddings, each layer, output) {elapsed}")
            .expect("static template"),
    );
    let engine = Engine::load(&opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    Ok(engine?)
}

/// Where answers come from.
enum Backend {
    Local { engine: Box<Engine>, params: GenerationParams },
    Remote(remote::Client),
}

impl Backend {
    /// Streams one answer to `out` and returns its text.
    fn answer(&self, history: &[Message], out: &mut dyn Write) -> anyhow::Result<String> {
        match self {
            Self::Local { engine, params } => answer(engine, history, params, out),
            Self::Remote(client) => client.answer(history, out),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Local { engine, .. } => engine.path().display().to_string(),
            Self::Remote(client) => client.describe(),
        }
    }
}

/// Runs `herd chat`.
pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..SamplingParams::default()
        },
        max_tokens: args.max_tokens,
        ..GenerationParams::default()
    };
    let backend = match (&args.url, &args.model) {
        (Some(url), _) => {
            let http = crate::openai_client::http_client(args.api_key.as_deref(), args.ca_cert.as_deref())?;
            Backend::Remote(remote::Client::new(http, url, args.model_name.clone(), &params)?)
        }
        (None, Some(model)) => Backend::Local { engine: Box::new(load(&args, model)?), params },
        (None, None) => anyhow::bail!("give --model PATH or --url URL"),
    };
    let mut history: Vec<Message> = args.system.iter().map(|s| Message::new("system", s.as_str())).collect();
    let stdout = std::io::stdout();
    if let Some(prompt) = &args.prompt {
        history.push(Message::new("user", prompt.as_str()));
        backend.answer(&history, &mut stdout.lock())?;
        return Ok(());
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("herd chat: {} — /reset clears the conversation, /exit quits", backend.describe());
    }
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("USER> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(usize::from(args.system.is_some()));
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        match backend.answer(&history, &mut stdout.lock()) {
            Ok(text) => history.push(Message::new("assistant", text)),
            Err(e) => {
                // A too-long conversation is the user's to fix; keep the session alive.
                history.pop();
                eprintln!("herd: {e:#}");
            }
        }
    }
    Ok(())
}

/// Streams one answer from a local engine to `out` and returns its text.
fn answer(
    engine: &Engine,
    history: &[Message],
    params: &GenerationParams,
    out: &mut dyn Write,
) -> anyhow::Result<String> {
    let ids = engine.encode_chat(history)?;
    let mut write_err = None;
    let done = engine.generate(&ids, params, &mut |tok| {
        if write_err.is_none()
            && let Err(e) = out.write_all(tok.text.as_bytes()).and_then(|_| out.flush())
        {
            write_err = Some(e);
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing the answer");
    }
    writeln!(out)?;
    tracing::debug!(
        prompt_tokens = done.prompt_tokens,
        completion_tokens = done.completion_tokens,
        finish = done.finish_reason.as_str(),
        "answered"
    );
    Ok(done.text)
}

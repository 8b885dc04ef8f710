//! `herd chat --url`: the terminal chat as a client of an OpenAI-compatible gateway.

use std::io::Write;

use anyhow::{Context, bail};
use futures::StreamExt;
use herd_worker::engine::{GenerationParams, Message};
use serde_json::{Value, json};

/// A gateway and the request settings every turn uses.
pub struct Client {
    http: reqwest::Client,
    base: String,
    model: String,
    settings: Value,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// Connects to `url`, asking it for its first model unless `model` is given.
    pub fn new(url: &str, model: Option<String>, params: &GenerationParams) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let http = reqwest::Client::new();
        let base = url.trim_end_matches('/').to_string();
        let model = match model {
            Some(m) => m,
            None => rt.block_on(async {
                let models: Value = http
                    .get(format!("{base}/v1/models"))
                    .send()
                    .await
                    .with_context(|| format!("--url {base}: no answer"))?
                    .json()
                    .await
                    .context("reading /v1/models")?;
                models["data"][0]["id"]
                    .as_str()
                    .map(str::to_string)
                    .with_context(|| format!("--url {base}: the gateway serves no model yet"))
            })?,
        };
        let s = &params.sampling;
        let mut settings = json!({ "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k });
        if let Some(seed) = s.seed {
            settings["seed"] = json!(seed);
        }
        if let Some(n) = params.max_tokens {
            settings["max_tokens"] = json!(n);
        }
        Ok(Self { http, base, model, settings, rt })
    }

    /// The gateway and model, for the banner.
    pub fn describe(&self) -> String {
        format!("{} at {}", self.model, self.base)
    }

    /// Streams one answer to `out` and returns its text.
    pub fn answer(&self, history: &[Message], out: &mut dyn Write) -> anyhow::Result<String> {
        let messages: Vec<Value> = history.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let mut body = self.settings.clone();
        body["model"] = json!(self.model);
        body["messages"] = json!(messages);
        body["stream"] = json!(true);
        let text = self.rt.block_on(async {
            let resp = self.http.post(format!("{}/v1/chat/completions", self.base)).json(&body).send().await?;
            if !resp.status().is_success() {
                let status = resp.status();
                let err: Value = resp.json().await.unwrap_or(Value::Null);
                bail!("{status}: {}", err["error"]["message"].as_str().unwrap_or("no error message"));
            }
            let mut text = String::new();
            // Bytes, not text: a character may be split between two network reads.
            let mut pending: Vec<u8> = Vec::new();
            let mut bytes = resp.bytes_stream();
            while let Some(piece) = bytes.next().await {
                pending.extend_from_slice(&piece?);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line);
                    let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
                    if data == "[DONE]" {
                        return Ok(text);
                    }
                    let event: Value = serde_json::from_str(data).context("a malformed stream event")?;
                    if let Some(msg) = event["error"]["message"].as_str() {
                        bail!("the gateway ended the answer: {msg}");
                    }
                    if let Some(delta) = event["choices"][0]["delta"]["content"].as_str() {
                        text.push_str(delta);
                        out.write_all(delta.as_bytes())?;
                        out.flush()?;
                    }
                }
            }
            bail!("the connection closed before the answer finished")
        })?;
        writeln!(out)?;
        Ok(text)
    }
}

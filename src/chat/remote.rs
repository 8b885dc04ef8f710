//! `herd chat --url`: the terminal chat as a client of an OpenAI-compatible gateway.

use std::io::Write;

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
    /// Connects to `url` with `http`, asking it for its first model unless `model` is given.
    pub fn new(
        http: reqwest::Client,
        url: &str,
        model: Option<String>,
        params: &GenerationParams,
    ) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let base = url.trim_end_matches('/').to_string();
        let model = match model {
            Some(m) => m,
            None => rt.block_on(crate::openai_client::first_model(&http, &base))?,
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
            let mut text = String::new();
            crate::openai_client::for_each_event(resp, |event| {
                if let Some(delta) = event["choices"][0]["delta"]["content"].as_str() {
                    text.push_str(delta);
                    out.write_all(delta.as_bytes())?;
                    out.flush()?;
                }
                Ok(())
            })
            .await?;
            anyhow::Ok(text)
        })?;
        writeln!(out)?;
        Ok(text)
    }
}

//! The client side of an OpenAI-compatible gateway, shared by `herd chat --url` and `herd bench`.

use std::path::Path;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::Value;

/// An HTTP client that sends the API key, if any, on every call, and also trusts `ca_cert` (a
/// PEM file) beside the system's roots for `https://` gateways.
pub fn http_client(api_key: Option<&str>, ca_cert: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("--api-key: not a valid HTTP header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("--ca-cert {}: cannot read it", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca-cert {}: not a PEM certificate", path.display()))?;
        if certs.is_empty() {
            bail!("--ca-cert {}: holds no PEM certificate", path.display());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder.build()?)
}

/// The first model the gateway at `base` lists.
pub async fn first_model(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
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
}

/// Reads an event stream (`data: {json}` lines until `data: [DONE]`), calling `on_event` with
/// each JSON event as it arrives. An error event, a malformed line or a stream cut short is an error.
pub async fn for_each_event(
    resp: reqwest::Response,
    mut on_event: impl FnMut(Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if !resp.status().is_success() {
        let status = resp.status();
        let err: Value = resp.json().await.unwrap_or(Value::Null);
        bail!("{status}: {}", err["error"]["message"].as_str().unwrap_or("no error message"));
    }
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
                return Ok(());
            }
            let event: Value = serde_json::from_str(data).context("a malformed stream event")?;
            if let Some(msg) = event["error"]["message"].as_str() {
                bail!("the gateway ended the stream: {msg}");
            }
            on_event(event)?;
        }
    }
    bail!("the connection closed before the stream finished")
}

//! The browser pages: a chat page at `/` and a cluster dashboard at `/dashboard`, built from the
//! static files in `ui/` (compiled into the binary: no CDN, nothing to install), plus the JSON
//! the dashboard polls (`/admin/cluster`) and the page settings (`/ui/config`).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::metrics::{Summary, WINDOW};
use crate::router::WorkerView;
use crate::{AppState, GatewayError};

/// `(name, content type, body)` of every static file under `/ui/`.
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.css", "text/css; charset=utf-8", include_str!("ui/app.css")),
    ("chat.js", "text/javascript; charset=utf-8", include_str!("ui/chat.js")),
    ("markdown.js", "text/javascript; charset=utf-8", include_str!("ui/markdown.js")),
    ("dashboard.js", "text/javascript; charset=utf-8", include_str!("ui/dashboard.js")),
];

fn html(body: &'static str) -> Response {
    // The pages load only their own scripts and talk only to this gateway.
    let csp = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'";
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CONTENT_SECURITY_POLICY, csp)], body).into_response()
}

/// `GET /`: the chat page.
pub async fn chat_page() -> Response {
    html(include_str!("ui/index.html"))
}

/// `GET /dashboard`: the cluster dashboard.
pub async fn dashboard_page() -> Response {
    html(include_str!("ui/dashboard.html"))
}

/// `GET /ui/{file}`: a static file of the pages.
pub async fn asset(Path(file): Path<String>) -> Result<Response, GatewayError> {
    let (_, content_type, body) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| GatewayError::UnknownRoute { method: "GET".into(), path: format!("/ui/{file}") })?;
    Ok(([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], *body).into_response())
}

/// What the pages need to know before their first call.
#[derive(Serialize)]
pub struct UiConfig {
    /// Whether `/v1` and `/admin` need an API key.
    pub api_keys: bool,
}

/// `GET /ui/config`.
pub async fn config(State(state): State<AppState>) -> Json<UiConfig> {
    Json(UiConfig { api_keys: state.auth.is_some() })
}

/// The dashboard's data.
#[derive(Serialize)]
pub struct Cluster {
    /// Every worker in the gateway's table.
    pub workers: Vec<WorkerView>,
    /// Every served name with how many workers serve it.
    pub models: Vec<ModelCount>,
    /// This gateway's recent traffic.
    pub gateway: GatewayView,
    /// The routing policy in use.
    pub routing_policy: &'static str,
}

/// A served model name and its worker count.
#[derive(Serialize)]
pub struct ModelCount {
    /// The name (or alias).
    pub name: String,
    /// Workers serving it.
    pub workers: usize,
    /// Of those, workers not marked down.
    pub ready: usize,
}

/// This gateway's traffic over the last minutes.
#[derive(Serialize)]
pub struct GatewayView {
    /// Seconds the latency figures cover.
    pub window_seconds: u64,
    /// Generations in flight through this gateway.
    pub in_flight: usize,
    /// Time to first token of recent choices (its `per_second`: choices started per second).
    pub ttft: Summary,
    /// End-to-end latency of recent requests (its `per_second`: requests answered per second).
    pub e2e: Summary,
}

/// `GET /admin/cluster`: workers, models and gateway traffic, for the dashboard.
pub async fn cluster(State(state): State<AppState>) -> Json<Cluster> {
    let workers = state.table.overview();
    let mut models: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for w in &workers {
        for name in &w.models {
            let entry = models.entry(name.clone()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(w.state != "down");
        }
    }
    let (ttft, e2e) = state.metrics.recent();
    let gateway = GatewayView {
        window_seconds: WINDOW.as_secs(),
        in_flight: workers.iter().map(|w| w.in_flight).sum(),
        ttft,
        e2e,
    };
    let models = models.into_iter().map(|(name, (workers, ready))| ModelCount { name, workers, ready }).collect();
    Json(Cluster { workers, models, gateway, routing_policy: state.table.policy_name() })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::Value;

    use crate::auth::{Auth, Keys, Limits};
    use crate::testing::{FakeWorker, Script, send, worker_state};
    use crate::{AppState, Settings, WorkerTable, router};

    async fn app(keys: bool) -> (axum::Router, FakeWorker) {
        let worker = FakeWorker::start(Script::Reply(vec!["a", "b"])).await;
        let table = Arc::new(WorkerTable::new());
        table.apply_snapshot(vec![worker_state("w1", &worker.address, &["m", "alias"], 2)], Duration::ZERO);
        let settings = Settings {
            max_body_bytes: 1 << 20,
            worker_down_for: Duration::from_secs(10),
            retry_after: 1,
            deadlines: Default::default(),
        };
        let limits = Limits { requests: Some(1), tokens: None, period: Duration::from_secs(60) };
        let auth = keys.then(|| Auth::new(Keys::new(["sk-ui"]).unwrap(), limits));
        (router(AppState::new(table, settings).with_auth(auth)), worker)
    }

    #[tokio::test]
    async fn pages_and_assets_are_served_from_the_binary() {
        let (app, _w) = app(true).await;
        for (uri, kind, needle) in [
            ("/", "text/html", "<label for=\"message\""),
            ("/dashboard", "text/html", "id=\"workers\""),
            ("/ui/chat.js", "text/javascript", "/v1/chat/completions"),
            ("/ui/markdown.js", "text/javascript", "renderMarkdown"),
            ("/ui/dashboard.js", "text/javascript", "/admin/cluster"),
            ("/ui/app.css", "text/css", "max-width: 700px"),
        ] {
            let (status, headers, body) = send(&app, "GET", uri, &[], "").await;
            assert_eq!(status, 200, "{uri}");
            assert!(headers["content-type"].to_str().unwrap().starts_with(kind), "{uri}: {headers:?}");
            assert!(body.contains(needle), "{uri} lacks {needle:?}");
        }
        let (_, headers, _) = send(&app, "GET", "/", &[], "").await;
        assert!(headers["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
        let (status, _, body) = send(&app, "GET", "/ui/secret.txt", &[], "").await;
        assert_eq!(status, 404, "{body}");
        let (_, _, body) = send(&app, "GET", "/ui/config", &[], "").await;
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["api_keys"], true);
    }

    #[tokio::test]
    async fn cluster_data_needs_the_key_but_not_its_allowance() {
        let (app, _w) = app(true).await;
        assert_eq!(send(&app, "GET", "/admin/cluster", &[], "").await.0, 401);
        let key = [("authorization", "Bearer sk-ui")];
        // The key allows one request a minute; polling the dashboard spends none of it.
        for _ in 0..3 {
            let (status, _, body) = send(&app, "GET", "/admin/cluster", &key, "").await;
            assert_eq!(status, 200, "{body}");
        }
        let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(send(&app, "POST", "/v1/chat/completions", &key, chat).await.0, 200);
        let (_, _, body) = send(&app, "GET", "/admin/cluster", &key, "").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let w = &v["workers"][0];
        assert_eq!(
            (w["id"].as_str(), w["state"].as_str(), w["waiting"].as_u64()),
            (Some("w1"), Some("ready"), Some(2))
        );
        assert_eq!(w["models"], serde_json::json!(["m", "alias"]));
        assert!(w["seconds_since_heartbeat"].as_f64().unwrap() >= 0.0);
        assert_eq!(
            v["models"],
            serde_json::json!([{"name": "alias", "workers": 1, "ready": 1}, {"name": "m", "workers": 1, "ready": 1}])
        );
        assert_eq!(v["gateway"]["e2e"]["count"], 1);
        assert_eq!(v["gateway"]["ttft"]["count"], 1);
        assert!(v["gateway"]["e2e"]["p50"].as_f64().unwrap() > 0.0);
    }
}

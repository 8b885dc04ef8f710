//! API keys and per-key rate limits on the `/v1` routes.
//!
//! Keys are compared as SHA-256 digests in constant time, against every configured key, so neither
//! the time taken nor an early exit tells a caller how much of a key was right. Each key has two
//! token buckets: requests per minute, and tokens (prompt + completion) per minute. A request
//! needs a whole request token, and once parsed it reserves what its choices may generate
//! (`n × max_tokens`, at most a whole minute's allowance), so concurrent requests cannot overdraw
//! the balance. When it ends, the reservation is refunded and the tokens it used (prompt
//! included) are debited: a long prompt can still drive the balance below zero, and the next
//! request waits it out.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use herd_ops::auth::SecretDigest;

use crate::GatewayError;

/// The configured API keys, kept only as digests.
pub struct Keys {
    digests: Vec<SecretDigest>,
}

impl Keys {
    /// Keys from a list (blank entries ignored); `None` when the list holds none.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let digests: Vec<SecretDigest> =
            keys.into_iter().map(str::trim).filter(|k| !k.is_empty()).map(SecretDigest::of).collect();
        (!digests.is_empty()).then_some(Keys { digests })
    }

    /// Reads `--api-keys FILE`: one key per line; blank lines and `#` comments are skipped.
    pub fn read(path: &Path) -> Result<Vec<String>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--api-keys {}: {e}", path.display()))?;
        let keys: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
        if keys.is_empty() {
            return Err(format!("--api-keys {}: the file holds no key (one per line)", path.display()));
        }
        Ok(keys)
    }

    /// The index of the key `presented` matches, comparing with every key in constant time.
    pub fn find(&self, presented: &str) -> Option<usize> {
        let candidate = SecretDigest::of(presented);
        let mut found = None;
        for (i, d) in self.digests.iter().enumerate() {
            if d.matches(&candidate) {
                found = Some(i);
            }
        }
        found
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Never true: an empty key set is `None` in [`Keys::new`].
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

/// Per-key limits; `None` means unlimited.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests per period.
    pub requests: Option<u32>,
    /// Prompt + completion tokens per period.
    pub tokens: Option<u32>,
    /// The period the limits refill over (a minute, except in tests).
    pub period: Duration,
}

/// A token bucket holding up to `capacity`, refilled continuously over the period.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn full(capacity: u32, now: Instant) -> Self {
        Bucket { level: f64::from(capacity), updated: now }
    }

    fn refill(&mut self, capacity: u32, period: Duration, now: Instant) {
        let rate = f64::from(capacity) / period.as_secs_f64();
        self.level = (self.level + rate * now.duration_since(self.updated).as_secs_f64()).min(f64::from(capacity));
        self.updated = now;
    }

    /// Seconds until the level reaches `needed`, at least 1 (Retry-After counts whole seconds).
    fn wait_for(&self, needed: f64, capacity: u32, period: Duration) -> u64 {
        let rate = f64::from(capacity) / period.as_secs_f64();
        (((needed - self.level) / rate).ceil() as u64).max(1)
    }
}

/// The buckets of every key.
pub struct Limiter {
    limits: Limits,
    buckets: Mutex<Vec<(Bucket, Bucket)>>,
}

impl Limiter {
    /// Full buckets for `keys` keys.
    pub fn new(limits: Limits, keys: usize) -> Self {
        let now = Instant::now();
        let full = |limit: Option<u32>| Bucket::full(limit.unwrap_or(0), now);
        Limiter { limits, buckets: Mutex::new(vec![(full(limits.requests), full(limits.tokens)); keys]) }
    }

    /// Takes one request from key `key`'s allowance, or says how many seconds to wait.
    pub fn admit(&self, key: usize) -> Result<(), (&'static str, u64)> {
        let Limits { requests, tokens, period } = self.limits;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((reqs, toks)) = buckets.get_mut(key) else { return Ok(()) };
        if let Some(cap) = tokens {
            toks.refill(cap, period, now);
            if toks.level < 1.0 {
                return Err(("tokens", toks.wait_for(1.0, cap, period)));
            }
        }
        if let Some(cap) = requests {
            reqs.refill(cap, period, now);
            if reqs.level < 1.0 {
                return Err(("requests", reqs.wait_for(1.0, cap, period)));
            }
            reqs.level -= 1.0;
        }
        Ok(())
    }

    /// Sets aside `tokens` (at most the bucket's capacity) of key `key`'s token allowance;
    /// returns what was set aside, or how many seconds to wait.
    pub fn reserve(&self, key: usize, tokens: u64) -> Result<f64, u64> {
        let Some(cap) = self.limits.tokens else { return Ok(0.0) };
        let needed = (tokens as f64).clamp(1.0, f64::from(cap));
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((_, toks)) = buckets.get_mut(key) else { return Ok(0.0) };
        toks.refill(cap, self.limits.period, Instant::now());
        if toks.level < needed {
            return Err(toks.wait_for(needed, cap, self.limits.period));
        }
        toks.level -= needed;
        Ok(needed)
    }

    /// Ends a reservation: gives back the `reserved` tokens and debits the `used` ones.
    pub fn settle(&self, key: usize, reserved: f64, used: u64) {
        let Some(cap) = self.limits.tokens else { return };
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, toks)) = buckets.get_mut(key) {
            toks.refill(cap, self.limits.period, Instant::now());
            toks.level += reserved - used as f64;
        }
    }
}

/// Keys and their limits: what the `/v1` routes check.
pub struct Auth {
    /// The accepted keys.
    pub keys: Keys,
    /// Their buckets.
    pub limiter: Limiter,
}

impl Auth {
    /// Auth over `keys`, each limited by `limits`.
    pub fn new(keys: Keys, limits: Limits) -> Self {
        let limiter = Limiter::new(limits, keys.len());
        Auth { keys, limiter }
    }
}

/// The caller a request was admitted for: whose token balance its usage is debited from.
#[derive(Clone)]
pub struct Account {
    auth: Arc<Auth>,
    key: usize,
}

impl Account {
    /// Reserves the `tokens` a request may generate, or answers 429 with the wait.
    pub fn reserve(self, tokens: u64) -> Result<Reservation, GatewayError> {
        match self.auth.limiter.reserve(self.key, tokens) {
            Ok(reserved) => Ok(Reservation { account: self, reserved, settled: AtomicBool::new(false) }),
            Err(retry_after) => Err(GatewayError::RateLimited {
                message: format!(
                    "Rate limit reached for this API key (tokens per minute): this request may use {tokens} tokens; retry in {retry_after} s."
                ),
                retry_after,
            }),
        }
    }
}

/// Tokens set aside for one request: settled with what it used, or refunded whole when it is
/// dropped unsettled (the request failed before producing anything).
pub struct Reservation {
    account: Account,
    reserved: f64,
    settled: AtomicBool,
}

impl Reservation {
    /// Refunds the reservation and debits `used` tokens; only the first call counts.
    pub fn settle(&self, used: u64) {
        if !self.settled.swap(true, Ordering::SeqCst) {
            self.account.auth.limiter.settle(self.account.key, self.reserved, used);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.settle(0);
    }
}

/// The index of the key in `Authorization: Bearer KEY`, or the 401 to answer.
fn authenticate(auth: &Auth, request: &Request) -> Result<usize, GatewayError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(presented) = presented.filter(|k| !k.is_empty()) else {
        return Err(GatewayError::Unauthorized {
            message: "You didn't provide an API key. Send it in an Authorization header using Bearer auth \
                      (Authorization: Bearer YOUR_KEY)."
                .into(),
            code: None,
        });
    };
    auth.keys.find(presented).ok_or_else(|| GatewayError::Unauthorized {
        message: "Incorrect API key provided.".into(),
        code: Some("invalid_api_key"),
    })
}

/// Middleware on `/v1`: a valid `Authorization: Bearer KEY` and room in the key's limits, else
/// 401 or 429 in OpenAI's error shape. The admitted [`Account`] travels as a request extension.
pub async fn require_key(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    let key = match authenticate(&auth, &request) {
        Ok(key) => key,
        Err(e) => return e.into_response(),
    };
    if let Err((what, retry_after)) = auth.limiter.admit(key) {
        return GatewayError::RateLimited {
            message: format!("Rate limit reached for this API key ({what} per minute); retry in {retry_after} s."),
            retry_after,
        }
        .into_response();
    }
    request.extensions_mut().insert(Account { auth: auth.clone(), key });
    next.run(request).await
}

/// Middleware on the dashboard's data: a valid key, without spending the key's allowance.
pub async fn require_key_only(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    match authenticate(&auth, &request) {
        Ok(_) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = Keys::new(["alpha", " beta ", ""]).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.find("alpha"), Some(0));
        assert_eq!(keys.find("beta"), Some(1));
        for wrong in ["alph", "alphaa", "ALPHA", ""] {
            assert_eq!(keys.find(wrong), None, "{wrong:?}");
        }
        assert!(Keys::new(["", "  "]).is_none());
    }

    #[test]
    fn key_file_skips_comments_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# team a\nsk-a\n\n  sk-b  \n").unwrap();
        assert_eq!(Keys::read(&path).unwrap(), vec!["sk-a", "sk-b"]);
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(Keys::read(&path).unwrap_err().contains("no key"));
        assert!(Keys::read(&dir.path().join("missing")).unwrap_err().starts_with("--api-keys"));
    }

    #[test]
    fn request_bucket_refills_over_the_period() {
        let limits = Limits { requests: Some(2), tokens: None, period: Duration::from_millis(400) };
        let limiter = Limiter::new(limits, 2);
        assert!(limiter.admit(0).is_ok());
        assert!(limiter.admit(0).is_ok());
        let (what, wait) = limiter.admit(0).unwrap_err();
        assert_eq!((what, wait), ("requests", 1));
        // Another key has its own allowance.
        assert!(limiter.admit(1).is_ok());
        std::thread::sleep(Duration::from_millis(250));
        assert!(limiter.admit(0).is_ok(), "half a period refills one request");
    }

    #[test]
    fn token_bucket_goes_negative_and_recovers() {
        let limits = Limits { requests: None, tokens: Some(100), period: Duration::from_secs(60) };
        let limiter = Limiter::new(limits, 1);
        assert!(limiter.admit(0).is_ok());
        limiter.settle(0, 0.0, 160);
        let (what, wait) = limiter.admit(0).unwrap_err();
        // 60 tokens in debt, 61 from one token of allowance at 100 per minute: 37 s.
        assert_eq!(what, "tokens");
        assert!((37..=38).contains(&wait), "{wait}");
    }

    use crate::testing::{FakeWorker, Script, send, worker_state};
    use crate::{AppState, Settings, WorkerTable, router};

    async fn app(limits: Limits) -> (axum::Router, FakeWorker) {
        app_of(Script::Reply(vec!["hi", " there"]), limits).await
    }

    /// A gateway with keys `sk-right` and `sk-other` under `limits`, over a worker playing `script`.
    async fn app_of(script: Script, limits: Limits) -> (axum::Router, FakeWorker) {
        let worker = FakeWorker::start(script).await;
        (router(state_of(Some(&worker), &["sk-right", "sk-other"], limits)), worker)
    }

    /// The state of a gateway with `keys` under `limits`, over `worker` if any.
    fn state_of(worker: Option<&FakeWorker>, keys: &[&str], limits: Limits) -> AppState {
        let table = Arc::new(WorkerTable::new());
        let workers = worker.map(|w| worker_state("w", &w.address, &["m"], 0)).into_iter().collect();
        table.apply_snapshot(workers, Duration::ZERO);
        let settings = Settings {
            max_body_bytes: 1 << 20,
            worker_down_for: Duration::from_secs(10),
            retry_after: 1,
            deadlines: Default::default(),
        };
        AppState::new(table, settings).with_auth(Some(Auth::new(Keys::new(keys.iter().copied()).unwrap(), limits)))
    }

    const UNLIMITED: Limits = Limits { requests: None, tokens: None, period: Duration::from_secs(60) };
    const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;

    /// Every `/v1` route, with a body that succeeds when the key is right.
    fn routes() -> [(&'static str, &'static str, &'static str); 4] {
        [
            ("GET", "/v1/models", ""),
            ("GET", "/v1/models/m", ""),
            ("POST", "/v1/chat/completions", CHAT),
            ("POST", "/v1/completions", r#"{"model":"m","prompt":"hello"}"#),
        ]
    }

    #[tokio::test]
    async fn metrics_can_be_put_behind_the_keys() {
        let (open, _worker) = app(UNLIMITED).await;
        assert_eq!(send(&open, "GET", "/metrics", &[], "").await.0, 200, "open by default");
        let private = router(state_of(None, &["sk-right"], UNLIMITED).with_private_metrics(true));
        assert_eq!(send(&private, "GET", "/metrics", &[], "").await.0, 401);
        assert_eq!(send(&private, "GET", "/metrics", &[("authorization", "Bearer sk-wrong")], "").await.0, 401);
        let (status, _, text) = send(&private, "GET", "/metrics", &[("authorization", "Bearer sk-right")], "").await;
        assert_eq!(status, 200);
        assert!(text.contains("herd_gateway"), "{text}");
        let mut args = crate::GatewayArgs::new(vec![], String::new());
        args.metrics_require_key = true;
        assert!(args.auth().err().unwrap().to_string().contains("--metrics-require-key"));
    }

    #[tokio::test]
    async fn browsers_from_allowed_origins_get_cors_answers_and_still_need_a_key() {
        let (closed, _worker) = app(UNLIMITED).await;
        let from = |origin| [("origin", origin), ("access-control-request-method", "POST")];
        let (_, headers, _) = send(&closed, "OPTIONS", "/v1/chat/completions", &from("https://app.example"), "").await;
        assert!(headers.get("access-control-allow-origin").is_none(), "no CORS unless configured");

        let worker = FakeWorker::start(Script::Reply(vec!["hi"])).await;
        let open =
            router(state_of(Some(&worker), &["sk-right"], UNLIMITED).with_cors(vec!["https://app.example".into()]));
        // The preflight carries no key, and is answered.
        let mut preflight = from("https://app.example").to_vec();
        preflight.push(("access-control-request-headers", "authorization,content-type"));
        let (status, headers, _) = send(&open, "OPTIONS", "/v1/chat/completions", &preflight, "").await;
        assert_eq!(status, 200);
        assert_eq!(headers["access-control-allow-origin"], "https://app.example");
        let allowed = headers["access-control-allow-headers"].to_str().unwrap().to_string();
        assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
        let (_, headers, _) = send(&open, "OPTIONS", "/v1/chat/completions", &from("https://evil.example"), "").await;
        assert!(headers.get("access-control-allow-origin").is_none(), "another origin is not allowed");
        // The call itself still needs a key, and its answer is readable by the page.
        let page = [("origin", "https://app.example"), ("content-type", "application/json")];
        assert_eq!(send(&open, "POST", "/v1/chat/completions", &page, CHAT).await.0, 401);
        let keyed = [page[0], page[1], ("authorization", "Bearer sk-right")];
        let (status, headers, text) = send(&open, "POST", "/v1/chat/completions", &keyed, CHAT).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(headers["access-control-allow-origin"], "https://app.example");
        assert!(headers["access-control-expose-headers"].to_str().unwrap().contains("x-request-id"));
    }

    #[tokio::test]
    async fn every_v1_route_needs_a_right_key() {
        let (app, _worker) = app(UNLIMITED).await;
        for (method, uri, body) in routes() {
            let (status, _, text) = send(&app, method, uri, &[], body).await;
            assert_eq!(status, 401, "{method} {uri} without a key: {text}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["type"], "invalid_request_error", "{text}");
            assert!(v["error"]["message"].as_str().unwrap().contains("API key"), "{text}");
            for wrong in ["Bearer sk-wrong", "Bearer sk-righ", "Bearer sk-right2", "Basic sk-right", "sk-right"] {
                let (status, _, text) = send(&app, method, uri, &[("authorization", wrong)], body).await;
                assert_eq!(status, 401, "{method} {uri} with {wrong:?}: {text}");
            }
            for right in ["Bearer sk-right", "Bearer sk-other"] {
                let (status, _, text) = send(&app, method, uri, &[("authorization", right)], body).await;
                assert_eq!(status, 200, "{method} {uri} with {right:?}: {text}");
            }
        }
        let v: serde_json::Value =
            serde_json::from_str(&send(&app, "GET", "/v1/models", &[("authorization", "Bearer x")], "").await.2)
                .unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        // Probes and scrapes stay open.
        for uri in ["/health", "/metrics"] {
            assert_eq!(send(&app, "GET", uri, &[], "").await.0, 200, "{uri}");
        }
        assert_eq!(send(&app, "GET", "/ready", &[], "").await.0, 200);
    }

    #[tokio::test]
    async fn a_key_over_its_limit_gets_429_with_retry_after_then_recovers() {
        let limits = Limits { requests: Some(2), tokens: None, period: Duration::from_secs(2) };
        let (app, _worker) = app(limits).await;
        let key = [("authorization", "Bearer sk-right")];
        for _ in 0..2 {
            assert_eq!(send(&app, "POST", "/v1/chat/completions", &key, CHAT).await.0, 200);
        }
        let (status, headers, text) = send(&app, "POST", "/v1/chat/completions", &key, CHAT).await;
        assert_eq!(status, 429, "{text}");
        assert_eq!(headers.get("retry-after").unwrap(), "1", "one request refills in a second");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        // The other key is not affected.
        let other = [("authorization", "Bearer sk-other")];
        assert_eq!(send(&app, "POST", "/v1/chat/completions", &other, CHAT).await.0, 200);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(send(&app, "POST", "/v1/chat/completions", &key, CHAT).await.0, 200, "recovered");
    }

    #[tokio::test]
    async fn tokens_used_count_against_the_token_limit() {
        // The fake worker reports 7 prompt + 2 completion tokens per answer.
        let limits = Limits { requests: None, tokens: Some(10), period: Duration::from_secs(60) };
        let (app, _worker) = app(limits).await;
        let key = [("authorization", "Bearer sk-right")];
        let small = r#"{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":1}"#;
        assert_eq!(send(&app, "POST", "/v1/chat/completions", &key, small).await.0, 200);
        // 1 token left: enough to reserve max_tokens 1, and the prompt drives the balance below zero.
        assert_eq!(send(&app, "POST", "/v1/chat/completions", &key, small).await.0, 200);
        let (status, headers, text) = send(&app, "POST", "/v1/chat/completions", &key, small).await;
        assert_eq!(status, 429, "{text}");
        let wait: u64 = headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
        assert!((54..=55).contains(&wait), "8 tokens in debt, 9 from one token of allowance at 10 per minute: {wait}");
    }

    #[tokio::test]
    async fn concurrent_requests_reserve_their_max_tokens_and_get_the_rest_back() {
        let limits = Limits { requests: None, tokens: Some(100), period: Duration::from_secs(3600) };
        let (app, _worker) = app_of(Script::Hang(vec!["hi"]), limits).await;
        let key = [("authorization", "Bearer sk-right")];
        let body = |max_tokens: u32| {
            format!(r#"{{"model":"m","prompt":"hello","max_tokens":{max_tokens},"n":2,"stream":true}}"#)
        };
        // Two choices of 30: 60 of the 100 are set aside while the stream runs.
        let running = crate::testing::call(&app, "POST", "/v1/completions", &key, body(30)).await;
        assert_eq!(running.status(), 200);
        let (status, _, text) = send(&app, "POST", "/v1/completions", &key, &body(21)).await;
        assert_eq!(status, 429, "42 more than the 40 left: {text}");
        assert!(text.contains("may use 42 tokens"), "{text}");
        // A chat choice without max_tokens may run to the context (2048), capped at the allowance.
        let open = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        assert_eq!(send(&app, "POST", "/v1/chat/completions", &key, open).await.0, 429);
        let fits = crate::testing::call(&app, "POST", "/v1/completions", &key, body(20)).await;
        assert_eq!(fits.status(), 200, "40 fit exactly");
        // Ending the streams refunds what they did not use (each choice produced one token).
        drop((running, fits));
        let after = crate::testing::call(&app, "POST", "/v1/completions", &key, body(45)).await;
        assert_eq!(after.status(), 200, "the refunds leave more than 90 of 100");
    }
}

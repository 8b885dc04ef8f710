//! The gateway's one error type, and the one place it becomes an HTTP status and OpenAI error JSON.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tonic::Code;
use tracing::{debug, warn};

/// Everything that can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A parameter or body the client must fix (400).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong, naming the parameter and what is allowed.
        message: String,
        /// The offending parameter's path, e.g. `messages[0].content`.
        param: Option<String>,
        /// A machine-readable code such as `context_length_exceeded`.
        code: Option<&'static str>,
    },
    /// The body is larger than `--max-body-bytes` (413).
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The client did not send the whole body within `--body-timeout` (408).
    #[error("the request body did not arrive within {}", humantime::format_duration(*.after))]
    BodyTimeout {
        /// The limit.
        after: std::time::Duration,
    },
    /// The body is not declared as JSON (415): a form or `text/plain` POST, which a web page can
    /// send from a visitor's browser without a CORS preflight.
    #[error("the request body must be JSON, sent with `Content-Type: application/json` (got {got})")]
    UnsupportedMediaType {
        /// The content type sent, or "none".
        got: String,
    },
    /// No route has this path (404).
    #[error("Invalid URL ({method} {path})")]
    UnknownRoute {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The path exists but not with this method (405).
    #[error("Method {method} is not allowed for {path}")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The model is not served here, or a worker says it does not serve it (404).
    #[error("{message}")]
    ModelNotFound {
        /// Names the model and, when known, the served ones.
        message: String,
    },
    /// No API key, or an unknown one (401).
    #[error("{message}")]
    Unauthorized {
        /// What was wrong with the key.
        message: String,
        /// `invalid_api_key` for a wrong key.
        code: Option<&'static str>,
    },
    /// The caller's key is over its rate limit (429, with its own Retry-After).
    #[error("{message}")]
    RateLimited {
        /// Which limit, and when to retry.
        message: String,
        /// Seconds until the request would be admitted.
        retry_after: u64,
    },
    /// Every worker for the model has a full queue (429).
    #[error("{message}")]
    Overloaded {
        /// Why the request was turned away.
        message: String,
    },
    /// No worker can take the request now (503).
    #[error("{message}")]
    Unavailable {
        /// Why no worker could take it.
        message: String,
    },
    /// A worker failed after a streamed response had started (sent as an SSE event), or a
    /// non-streamed answer failed on two workers (503).
    #[error("{message}")]
    WorkerFailed {
        /// What the worker reported.
        message: String,
    },
    /// The request ran past `--request-timeout` (504; a stream gets it as an error event).
    #[error("the request did not finish within {}", humantime::format_duration(*.after))]
    Timeout {
        /// The limit.
        after: std::time::Duration,
    },
    /// `--listen` could not be bound.
    #[error("cannot listen on --listen {addr}: {source}")]
    Bind {
        /// The `--listen` value.
        addr: String,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// A `--controller` URL is not usable.
    #[error("invalid --controller URL {url:?}: {reason}")]
    InvalidController {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A startup setting is unusable (API keys, limits, TLS files); the message names the flag.
    #[error("{0}")]
    Config(String),
    /// The HTTPS certificate or key is unusable.
    #[error("{0}")]
    Tls(String),
    /// Serving the listener (or writing the startup line) failed.
    #[error("gateway I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// OpenAI's error envelope: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

/// OpenAI's error object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    /// Human-readable description.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending parameter, if one is to blame.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<String>,
}

impl GatewayError {
    /// A 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        GatewayError::InvalidRequest { message: message.into(), param: Some(param.into()), code: None }
    }

    /// The 404 for a model that no worker in the table serves; lists what is served.
    pub fn model_not_found(model: &str, served: &[String]) -> Self {
        let message = if served.is_empty() {
            format!("The model `{model}` does not exist: no models are being served right now.")
        } else {
            format!("The model `{model}` does not exist. Served models: {}.", served.join(", "))
        };
        GatewayError::ModelNotFound { message }
    }

    /// Maps a worker's gRPC status to the client's error; `prompt_param` is blamed for context overflows.
    pub fn from_status(status: &tonic::Status, prompt_param: &str) -> Self {
        let message = if status.message().is_empty() {
            format!("worker returned {:?}", status.code())
        } else {
            status.message().to_string()
        };
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition | Code::Unimplemented => {
                // The contract has the worker say the numbers; we only recognise the kind.
                let context = message.to_lowercase().contains("context");
                GatewayError::InvalidRequest {
                    message,
                    param: context.then(|| prompt_param.to_string()),
                    code: context.then_some("context_length_exceeded"),
                }
            }
            Code::NotFound => GatewayError::ModelNotFound { message },
            Code::ResourceExhausted => GatewayError::Overloaded { message },
            _ => GatewayError::Unavailable { message: format!("worker unavailable: {message}") },
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::UnknownRoute { .. } | GatewayError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            GatewayError::Overloaded { .. } | GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Unavailable { .. } | GatewayError::WorkerFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            // Startup failures: never produced by a request.
            GatewayError::Bind { .. }
            | GatewayError::InvalidController { .. }
            | GatewayError::Config(_)
            | GatewayError::Tls(_)
            | GatewayError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error JSON for this error.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code): (&str, Option<String>, Option<&str>) = match self {
            GatewayError::InvalidRequest { param, code, .. } => ("invalid_request_error", param.clone(), *code),
            GatewayError::BodyTooLarge { .. } => ("invalid_request_error", None, Some("request_too_large")),
            GatewayError::BodyTimeout { .. } => ("invalid_request_error", None, Some("request_timeout")),
            GatewayError::UnsupportedMediaType { .. } => {
                ("invalid_request_error", None, Some("unsupported_media_type"))
            }
            GatewayError::UnknownRoute { .. } => ("invalid_request_error", None, Some("unknown_url")),
            GatewayError::MethodNotAllowed { .. } => ("invalid_request_error", None, Some("method_not_allowed")),
            GatewayError::ModelNotFound { .. } => {
                ("invalid_request_error", Some("model".to_string()), Some("model_not_found"))
            }
            GatewayError::Unauthorized { code, .. } => ("invalid_request_error", None, *code),
            GatewayError::Overloaded { .. } | GatewayError::RateLimited { .. } => {
                ("rate_limit_error", None, Some("rate_limit_exceeded"))
            }
            GatewayError::Unavailable { .. } => ("server_error", None, Some("service_unavailable")),
            GatewayError::WorkerFailed { .. } => ("server_error", None, Some("worker_failed")),
            GatewayError::Timeout { .. } => ("server_error", None, Some("timeout")),
            GatewayError::Bind { .. }
            | GatewayError::InvalidController { .. }
            | GatewayError::Config(_)
            | GatewayError::Tls(_)
            | GatewayError::Io(_) => ("server_error", None, None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: kind.to_string(),
                param,
                code: code.map(str::to_string),
            },
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            warn!(status = status.as_u16(), error = %self, "request failed");
        } else {
            debug!(status = status.as_u16(), error = %self, "request rejected");
        }
        // Retry-After for 429/503 is added by one middleware, which knows `--retry-after`; a rate
        // limit knows better when its bucket refills.
        let mut response = (status, Json(self.body())).into_response();
        if let GatewayError::RateLimited { retry_after, .. } = self {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, retry_after.into());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(code: Code, message: &str) -> (u16, String, Option<String>, Option<String>) {
        let err = GatewayError::from_status(&tonic::Status::new(code, message), "messages");
        let body = err.body().error;
        (err.status().as_u16(), body.kind, body.param, body.code)
    }

    #[test]
    fn status_mapping() {
        let (status, kind, param, code) = mapped(Code::InvalidArgument, "temperature must be finite");
        assert_eq!((status, kind.as_str(), param, code), (400, "invalid_request_error", None, None));
        let (status, kind, param, code) =
            mapped(Code::InvalidArgument, "prompt has 5000 tokens, more than the context length 4096");
        assert_eq!(status, 400);
        assert_eq!(kind, "invalid_request_error");
        assert_eq!(param.as_deref(), Some("messages"));
        assert_eq!(code.as_deref(), Some("context_length_exceeded"));
        let (status, _, param, code) = mapped(Code::NotFound, "no model x");
        assert_eq!((status, param.as_deref(), code.as_deref()), (404, Some("model"), Some("model_not_found")));
        let (status, kind, _, _) = mapped(Code::ResourceExhausted, "queue full");
        assert_eq!((status, kind.as_str()), (429, "rate_limit_error"));
        for code in [Code::Unavailable, Code::Internal, Code::Unknown, Code::DeadlineExceeded] {
            let (status, kind, _, _) = mapped(code, "x");
            assert_eq!((status, kind.as_str()), (503, "server_error"), "{code:?}");
        }
    }

    #[test]
    fn body_shape() {
        let err = GatewayError::invalid("top_p", "`top_p` must be greater than 0 and at most 1, got 2");
        let json = serde_json::to_value(err.body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {
                "message": "`top_p` must be greater than 0 and at most 1, got 2",
                "type": "invalid_request_error", "param": "top_p", "code": null}})
        );
        assert_eq!(GatewayError::BodyTooLarge { limit: 10 }.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let nf = GatewayError::model_not_found("x", &["a".into(), "b".into()]);
        assert!(nf.to_string().contains("`x`") && nf.to_string().contains("a, b"));
    }
}

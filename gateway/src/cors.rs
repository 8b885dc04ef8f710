//! Cross-origin access for browser clients (`--cors-allow-origin`): off unless configured, so
//! that no web page a visitor opens can call the API with what the visitor's network reaches.

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may reuse a preflight answer.
const PREFLIGHT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Parses one `--cors-allow-origin` value: `*` (any origin) or an origin such as
/// `https://app.example.com` (scheme and host, an optional port, nothing after).
pub fn origin(text: &str) -> Result<String, String> {
    if text == "*" {
        return Ok(text.into());
    }
    let rest = text.strip_prefix("https://").or_else(|| text.strip_prefix("http://"));
    let valid = rest.is_some_and(|host| {
        !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    });
    if valid {
        Ok(text.into())
    } else {
        Err(format!("{text:?} is not an origin: give `*` or scheme://host[:port], e.g. https://app.example.com"))
    }
}

/// The layer answering preflights and marking answers for `origins` (each `*` or an origin
/// [`origin`] accepted); `None` when no origin is allowed.
pub fn layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, HeaderName::from_static("x-request-id")])
            .expose_headers([
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("x-herd-worker"),
                header::RETRY_AFTER,
            ])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        for good in ["*", "https://app.example.com", "http://127.0.0.1:3000", "http://[::1]:8080"] {
            assert_eq!(origin(good).as_deref(), Ok(good));
        }
        for bad in ["", "app.example.com", "https://", "https://a.com/path", "ftp://a.com", "https://a.com\n"] {
            assert!(origin(bad).is_err(), "{bad:?}");
        }
        assert!(layer(&[]).is_none(), "off by default");
    }
}

//! Operations plumbing every herd role shares: the cluster token and mutual TLS between the roles, the gRPC health
//! service that probes read, and the plain-HTTP metrics endpoint. It knows nothing of models,
//! registries or HTTP APIs; the roles still talk to each other only through `herd-proto`.

pub mod auth;
pub mod health;
pub mod metrics;
pub mod tls;

pub use auth::{AuthArgs, AuthChannel, ClusterToken, RequireToken, TokenArgs};
pub use health::Health;
pub use metrics::{Exporter, MetricsArgs};
pub use tls::{ClusterTls, TlsArgs, WorkerIds};

/// Aborts a background task when dropped, so helpers never outlive the server they serve.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What can go wrong setting up TLS or the metrics listener; each message names its flag.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A certificate, key or CA file is missing or unusable.
    #[error("{flag} {path}: {msg}")]
    File {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A cluster token that is missing where it is needed, or too weak.
    #[error("{0}")]
    Token(String),
    /// A URL that cannot be used with the TLS settings.
    #[error("{0}")]
    Url(String),
    /// The metrics listener could not bind.
    #[error("--metrics-listen: cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

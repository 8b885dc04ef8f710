//! The controller's one error type and its one mapping to gRPC status codes.

use tonic::{Code, Status};

/// Everything that can go wrong in the controller, from a bad record to a failed bind.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A worker record or request field is missing or malformed.
    #[error("invalid worker record: {0}")]
    InvalidRecord(String),
    /// Heartbeat or deregister named a worker the registry does not hold (never registered, or expired).
    #[error("unknown worker {0:?}: register again")]
    UnknownWorker(String),
    /// A live worker already holds this id.
    #[error("worker id {0:?} is already registered by a live worker; pick another --worker-id or wait for its TTL")]
    DuplicateWorker(String),
    /// A heartbeat or deregistration for a live worker without that registration's lease: it
    /// comes from someone else.
    #[error(
        "worker {0:?} is registered under another lease; only the worker that registered it may heartbeat or deregister it"
    )]
    WrongLease(String),
    /// With mutual TLS, the caller's certificate does not name this worker id (a gateway's or a
    /// controller's names none).
    #[error("{0}")]
    NotThisWorker(String),
    /// The registry holds as many workers as `--max-workers` allows.
    #[error("the registry already holds {0} workers, the most --max-workers allows")]
    TooManyWorkers(usize),
    /// No registered worker serves the requested model.
    #[error("no worker serves model {0:?}")]
    NoWorkerForModel(String),
    /// The registry store failed or is unreachable.
    #[error("registry store unavailable: {0}")]
    Store(String),
    /// A watcher fell behind the change feed; its view is incomplete, so it must re-read a snapshot.
    #[error("watch fell {0} events behind; reconnect for a fresh snapshot")]
    WatchLagged(u64),
    /// A command-line or configuration value is unusable.
    #[error("{0}")]
    Config(String),
    /// The `--listen` address could not be bound.
    #[error("cannot bind --listen {addr}: {source}")]
    Bind {
        /// The address as given on the command line.
        addr: String,
        /// Why the bind failed.
        source: std::io::Error,
    },
    /// Writing the startup line to stdout failed.
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
    /// TLS files or the metrics listener are unusable.
    #[error(transparent)]
    Ops(#[from] herd_ops::OpsError),
    /// The gRPC server stopped with an error.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<ControllerError> for Status {
    /// The single place that decides which gRPC code a client sees for each error.
    fn from(err: ControllerError) -> Self {
        let code = match &err {
            ControllerError::InvalidRecord(_) => Code::InvalidArgument,
            ControllerError::DuplicateWorker(_) => Code::AlreadyExists,
            ControllerError::WrongLease(_) | ControllerError::NotThisWorker(_) => Code::PermissionDenied,
            ControllerError::TooManyWorkers(_) => Code::ResourceExhausted,
            // Workers react to NotFound on Heartbeat by registering again.
            ControllerError::UnknownWorker(_) | ControllerError::NoWorkerForModel(_) => Code::NotFound,
            // Unavailable tells watchers to reconnect, which is what both store trouble and lag need.
            ControllerError::Store(_) | ControllerError::WatchLagged(_) => Code::Unavailable,
            ControllerError::Config(_)
            | ControllerError::Bind { .. }
            | ControllerError::Stdout(_)
            | ControllerError::Ops(_)
            | ControllerError::Transport(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(Status::from(ControllerError::InvalidRecord("x".into())).code(), Code::InvalidArgument);
        assert_eq!(Status::from(ControllerError::UnknownWorker("w".into())).code(), Code::NotFound);
        assert_eq!(Status::from(ControllerError::DuplicateWorker("w".into())).code(), Code::AlreadyExists);
        assert_eq!(Status::from(ControllerError::WrongLease("w".into())).code(), Code::PermissionDenied);
        let status = Status::from(ControllerError::NoWorkerForModel("vicuna-7b".into()));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("vicuna-7b"), "{}", status.message());
        assert_eq!(Status::from(ControllerError::Store("down".into())).code(), Code::Unavailable);
        assert_eq!(Status::from(ControllerError::WatchLagged(3)).code(), Code::Unavailable);
    }
}

//! The worker service's error type and its one mapping to gRPC status codes.

use tonic::{Code, Status};

use crate::engine::EngineError;

/// Everything the worker's service and lifecycle can fail with.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The engine rejected or failed a request, or failed to load.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A request came in before the model finished loading.
    #[error("the model is still loading")]
    Loading,
    /// SIGTERM was received: no new work is accepted.
    #[error("the worker is draining and accepts no new requests")]
    Draining,
    /// The request names a model this worker does not serve.
    #[error("model {model:?} is not served here (serving: {})", served.join(", "))]
    UnknownModel {
        /// The name asked for.
        model: String,
        /// The names this worker answers to.
        served: Vec<String>,
    },
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The queue is full.
    #[error("the worker's queue is full ({0} waiting)")]
    QueueFull(usize),
    /// The engine thread is gone.
    #[error("the engine has stopped")]
    Stopped,
    /// A flag value is unusable.
    #[error("{flag}: {msg}")]
    Flag {
        /// The flag, e.g. `--listen`.
        flag: &'static str,
        /// What is wrong with its value.
        msg: String,
    },
    /// TLS files or the metrics listener are unusable.
    #[error(transparent)]
    Ops(#[from] herd_ops::OpsError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(String),
    /// An error several calls share (one tokenization of a prompt they all sent).
    #[error(transparent)]
    Shared(std::sync::Arc<WorkerError>),
}

impl WorkerError {
    /// The gRPC code clients see for this error: the one place that decides it.
    pub fn code(&self) -> Code {
        use EngineError as E;
        match self {
            WorkerError::Shared(e) => e.code(),
            WorkerError::Engine(
                E::InvalidArgument(_)
                | E::PromptTooLong { .. }
                | E::PromptTooManyBytes { .. }
                | E::ContextOverflow { .. }
                | E::KvCacheFull { .. }
                | E::Tokenizer(_)
                | E::Template(_),
            )
            | WorkerError::InvalidArgument(_) => Code::InvalidArgument,
            WorkerError::UnknownModel { .. } => Code::NotFound,
            WorkerError::QueueFull(_) => Code::ResourceExhausted,
            WorkerError::Loading | WorkerError::Draining | WorkerError::Stopped => Code::Unavailable,
            WorkerError::Engine(E::Checkpoint { .. } | E::Model(_))
            | WorkerError::Flag { .. }
            | WorkerError::Ops(_)
            | WorkerError::Server(_) => Code::Internal,
        }
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_mistakes_are_invalid_argument_and_capacity_is_resource_exhausted() {
        let overflow = WorkerError::Engine(EngineError::ContextOverflow { prompt: 10, max_tokens: 20, context: 16 });
        let status = Status::from(overflow);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("16"), "{}", status.message());
        assert_eq!(Status::from(WorkerError::QueueFull(3)).code(), Code::ResourceExhausted);
        assert_eq!(Status::from(WorkerError::Draining).code(), Code::Unavailable);
        let unknown = WorkerError::UnknownModel { model: "x".into(), served: vec!["a".into()] };
        assert_eq!(Status::from(unknown).code(), Code::NotFound);
    }
}

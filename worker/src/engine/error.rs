//! The engine's one error type; the gRPC service maps it to status codes.

use std::path::PathBuf;

/// Everything that can go wrong loading a model or generating from it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A checkpoint file is missing, corrupt or does not match its config.
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be loaded or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// The prompt alone does not fit in the context window.
    #[error("the prompt is {prompt} tokens but the model's context length is {context} tokens")]
    PromptTooLong { prompt: usize, context: usize },
    /// The prompt's text is too long to fit the context window whatever its tokens; refused
    /// before tokenizing, which would cost time and memory for nothing.
    #[error(
        "the prompt is {bytes} bytes, longer than any prompt within the model's context length of {context} tokens \
         can be (at most {max_bytes} bytes)"
    )]
    PromptTooManyBytes { bytes: usize, context: usize, max_bytes: usize },
    /// The prompt fits but prompt + max_tokens does not.
    #[error(
        "prompt ({prompt} tokens) + max_tokens ({max_tokens}) = {} exceeds the model's context length of {context} tokens",
        prompt + max_tokens
    )]
    ContextOverflow { prompt: usize, max_tokens: usize, context: usize },
    /// A sequence needs more KV cache than the worker holds in all.
    #[error(
        "the prompt and max_tokens need {tokens} tokens of KV cache, more than this worker's budget of {budget} \
         (--kv-cache-mb)"
    )]
    KvCacheFull { tokens: usize, budget: usize },
    /// A request parameter is out of range.
    #[error("invalid parameter: {0}")]
    InvalidArgument(String),
    /// A tensor operation failed while running the model.
    #[error("model execution: {0}")]
    Model(String),
}

impl From<herd_prompt::PromptError> for EngineError {
    fn from(e: herd_prompt::PromptError) -> Self {
        match e {
            herd_prompt::PromptError::InvalidArgument(m) => Self::InvalidArgument(m),
            herd_prompt::PromptError::Tokenizer(m) => Self::Tokenizer(m),
            herd_prompt::PromptError::Template(m) => Self::Template(m),
        }
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(candle_message(&e))
    }
}

/// A candle error's message without the backtrace candle attaches when RUST_BACKTRACE is set.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        other => other.to_string(),
    }
}

impl EngineError {
    /// A checkpoint error about `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Self::Checkpoint { path: path.into(), msg: msg.to_string() }
    }
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, EngineError>;

//! The OpenAI-compatible HTTP surface: wire types, validation, handlers, errors and streaming.

pub mod errors;
pub mod handlers;
pub mod params;
pub mod sse;
pub mod tokens;
pub mod types;

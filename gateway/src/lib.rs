//! The OpenAI-compatible HTTP gateway (filled in by the cluster issue).

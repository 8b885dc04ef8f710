//! herd's gRPC contract: the only thing the controller, worker and gateway crates share.

/// `herd.v1`: the `Controller` and `Worker` services and their messages.
pub mod v1 {
    tonic::include_proto!("herd.v1");
}

/// The largest message a controller sends and a gateway reads: a `WatchWorkers` snapshot of a
/// full registry (the controller bounds how many workers register, and how large each record is).
pub const MAX_WATCH_MESSAGE_BYTES: usize = 16 << 20;

/// The largest `Generate` or `CountTokens` request a worker reads (a prompt of a few MiB).
pub const MAX_WORKER_REQUEST_BYTES: usize = 16 << 20;

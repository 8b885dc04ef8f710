//! herd's gRPC contract: the only thing the controller, worker and gateway crates share.

/// `herd.v1`: the `Controller` and `Worker` services and their messages.
pub mod v1 {
    tonic::include_proto!("herd.v1");
}

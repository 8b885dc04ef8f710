//! The controller: worker registry, heartbeats and expiry (filled in by the cluster issue).

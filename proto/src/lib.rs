//! The gRPC contract between herd components (filled in by the cluster issue).

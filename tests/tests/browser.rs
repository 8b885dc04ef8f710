//! The chat page and the dashboard in a real browser: `tests/browser/ui.mjs` drives headless
//! Chromium (Debian's `chromium`, through npm's `playwright-core`) against `herd up` on the test
//! model. Screenshots go to `artifacts/browser/` (or `$HERD_ARTIFACTS`).

use std::path::PathBuf;
use std::process::Command;

use herd_tests::cluster::{MODEL, Proc};
use herd_tests::{repo_root, test_model};

/// Chromium: `$HERD_CHROMIUM`, else Debian's `/usr/bin/chromium`, which `scripts/setup.sh` installs.
fn chromium() -> PathBuf {
    let path = PathBuf::from(std::env::var("HERD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(
        path.is_file(),
        "Chromium is missing at {}: install Debian's chromium (scripts/setup.sh does) or set HERD_CHROMIUM",
        path.display()
    );
    path
}

#[test]
fn chat_and_dashboard_in_headless_chromium() {
    let browser_dir = repo_root().join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: run `npm ci --prefix tests/browser` (scripts/setup.sh does)"
    );
    let chromium = chromium();
    let artifacts =
        std::env::var_os("HERD_ARTIFACTS").map_or_else(|| repo_root().join("artifacts"), PathBuf::from).join("browser");
    let model = test_model().display().to_string();
    // With an API key on, so the pages must ask for it (the stricter of the two modes).
    let key = "sk-browser-test";
    let up = Proc::start_until(
        &["up", "--model", &model, "--port", "0", "--model-name", MODEL, "--api-key", key].map(String::from),
        "herd is serving at ",
    );
    let out = Command::new("node")
        .arg(browser_dir.join("ui.mjs"))
        .arg(&up.addr)
        .arg(&artifacts)
        .arg(&chromium)
        .arg(key)
        .output()
        .expect("node runs (Node.js 20 or newer is needed)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "the browser test failed (screenshots in {}):\n{stderr}", artifacts.display());
}

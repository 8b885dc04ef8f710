//! `herd up` starts a whole cluster on the test model (its worker split over 3 CPU ranks);
//! `herd chat --url` and `herd bench` talk to it; Ctrl-C stops everything cleanly.

use std::process::Command;
use std::time::Duration;

use herd_tests::cluster::Proc;
use herd_tests::{herd_bin, test_model};

#[test]
fn herd_up_serves_chat_clients_and_stops_on_ctrl_c() {
    let model = test_model().display().to_string();
    let args = ["up", "--model", &model, "--port", "0", "--workers", "1", "--tp", "3", "--model-name", "smol"]
        .map(String::from);
    let mut up = Proc::start_until(&args, "serving at ");
    let out = Command::new(herd_bin())
        .args(["chat", "--url", &up.url(), "--temperature", "0", "--max-tokens", "24"])
        .args(["--prompt", "Who wrote the play Hamlet?"])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(answer.contains("Shakespeare"), "answer: {answer}");

    // A short load test through the gateway: every request streams exactly max_tokens tokens.
    let out = Command::new(herd_bin())
        .args(["bench", "--url", &up.url(), "--requests", "4", "--concurrency", "2", "--max-tokens", "8", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!((report["completed"].as_u64(), report["failed"].as_u64()), (Some(4), Some(0)), "{report}");
    assert_eq!(report["output_tokens"], 32, "{report}");
    assert!(report["ttft_s"]["p50"].as_f64().unwrap() > 0.0 && report["itl_s"]["p99"].as_f64().unwrap() > 0.0);

    let bad = Command::new(herd_bin())
        .args(["chat", "--url", &up.url(), "--model-name", "nope", "--prompt", "hi"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("404") && err.contains("nope"), "{err}");

    up.signal(libc::SIGINT);
    let status = up.wait_exit(Duration::from_secs(60)).expect("herd up stops after Ctrl-C");
    assert!(status.success(), "herd up exits 0: {status:?}");
}

//! Structured outputs as applications use them: the official openai Python SDK (pinned in
//! `scripts/sdk-check/requirements.lock`) against `herd up` on the test model. Pydantic parsing
//! of 20 answers, and 100 generated JSON schemas validated with `jsonschema`, streamed and not.

use std::process::Command;

use herd_tests::cluster::Proc;
use herd_tests::test_model;

#[test]
fn the_openai_sdk_parses_and_validates_structured_answers() {
    let model = test_model().display().to_string();
    let args = ["up", "--model", &model, "--port", "0", "--model-name", "smol"].map(String::from);
    let up = Proc::start_until(&args, "serving at ");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/sdk-check/run.sh");
    let out = Command::new("bash").args([script, &up.url(), "smol"]).output().expect("run bash");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("120 of 120 structured answers held"), "{stdout}");
}

//! Failures: a worker killed mid-load, a controller restart, a worker drained with SIGTERM.

use std::time::Duration;

use futures::StreamExt;
use herd_proto::v1 as pb;
use herd_tests::cluster::{MODEL, Proc, controller, gateway, gateway_of, wait_for_workers, worker, worker_of};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

/// How a streamed request ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// `[DONE]` after this finish_reason.
    Done(String),
    /// An error event; `chunks` data events (the role chunk included) came before it.
    Error { chunks: usize },
}

/// Streams a chat request to the end. The gateway answers 200 once the first token exists; then
/// `started` gets the id of the worker serving it.
async fn stream(url: &str, prompt: &str, max_tokens: u32, started: Option<UnboundedSender<String>>) -> Outcome {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                      "max_tokens": max_tokens, "stream": true, "temperature": 0, "ignore_eos": true});
    let resp = reqwest::Client::new().post(url).json(&body).send().await.expect("gateway answers");
    assert_eq!(resp.status().as_u16(), 200, "{}", resp.text().await.unwrap_or_default());
    if let Some(tx) = started {
        let _ = tx.send(resp.headers()["x-herd-worker"].to_str().unwrap().to_string());
    }
    let mut bytes = resp.bytes_stream();
    let (mut buf, mut chunks, mut finish) = (Vec::new(), 0, None);
    while let Some(piece) = bytes.next().await {
        let Ok(piece) = piece else { break };
        buf.extend_from_slice(&piece);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8(line).expect("events are UTF-8");
            let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                return Outcome::Done(finish.expect("[DONE] without a finish_reason"));
            }
            let event: Value = serde_json::from_str(data).unwrap();
            if event.get("error").is_some() {
                return Outcome::Error { chunks };
            }
            if let Some(reason) = event["choices"][0]["finish_reason"].as_str() {
                finish = Some(reason.to_string());
            }
            chunks += 1;
        }
    }
    panic!("the stream ended without [DONE] or an error event after {chunks} chunks");
}

fn done(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Done(_))
}

async fn list_workers(controller: &Proc) -> Vec<String> {
    let mut client = pb::controller_client::ControllerClient::connect(controller.url()).await.unwrap();
    let resp = client.list_workers(pb::ListWorkersRequest::default()).await.unwrap().into_inner();
    resp.workers.into_iter().map(|w| w.info.unwrap().worker_id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_worker_fails_over_requests_without_a_first_token() {
    let ctl = controller("127.0.0.1:0", "2s");
    // The victim is slow so that the kill lands while its streams are mid-answer.
    let victim = worker(&ctl, &["--worker-id", "victim", "--max-batch-size", "4", "--debug-step-delay", "100ms"]);
    let _survivor = worker(&ctl, &["--worker-id", "survivor", "--max-batch-size", "4"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 2, Duration::from_secs(120)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let (started, mut serving) = unbounded_channel();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (url, started) = (url.clone(), started.clone());
            tokio::spawn(async move {
                let prompt = format!("Tell me about {i}.");
                let answer = stream(&url, &prompt, 12, Some(started));
                tokio::time::timeout(Duration::from_secs(600), answer).await.expect("no stream may hang")
            })
        })
        .collect();
    // Kill the victim once one of its streams is under way.
    while serving.recv().await.expect("a stream starts") != "victim" {}
    victim.signal(libc::SIGKILL);
    let killed_at = std::time::Instant::now();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    // A request that had its first token ends with an error event; every other one must have
    // moved to the survivor (a failure before the first token would have been a non-200).
    let failed: Vec<_> = outcomes.iter().filter(|o| !done(o)).collect();
    assert!(!failed.is_empty(), "the kill landed mid-stream, so some streams end with an error: {outcomes:?}");
    assert!(failed.iter().all(|o| matches!(o, Outcome::Error { chunks } if *chunks > 0)), "{outcomes:?}");
    assert!(outcomes.iter().filter(|o| done(o)).count() >= 10, "{outcomes:?}");
    loop {
        if !list_workers(&ctl).await.contains(&"victim".to_string()) {
            break;
        }
        // Its last heartbeat came before the kill, so it expires within the 2 s TTL (+ the sweep).
        assert!(killed_at.elapsed() < Duration::from_secs(3), "the dead worker stays listed past its TTL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_restart_loses_nothing() {
    let ctl = controller("127.0.0.1:0", "3s");
    let addr = ctl.addr.clone();
    let _w1 = worker(&ctl, &["--worker-id", "w1"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    drop(ctl);
    // The gateway keeps its last table while no controller answers.
    assert!(done(&stream(&url, "Hello!", 4, None).await));
    let ctl = controller(&addr, "3s");
    let restarted = std::time::Instant::now();
    while list_workers(&ctl).await.is_empty() {
        // Heartbeats come every TTL/3 = 1 s; the first one the new controller answers is NotFound,
        // and the worker registers again at once.
        let limit = Duration::from_millis(2500);
        assert!(restarted.elapsed() < limit, "the worker did not re-register within a heartbeat (+ slack)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done(&stream(&url, "Hello again!", 4, None).await));
    // A worker that joins after the restart reaches the gateway: it watches the new controller.
    let _w2 = worker(&ctl, &["--worker-id", "w2"]);
    wait_for_workers(&gw, 2, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_and_gateways_fail_over_to_a_second_controller() {
    let a = controller("127.0.0.1:0", "3s");
    let b = controller("127.0.0.1:0", "3s");
    let both = format!("{},{}", a.url(), b.url());
    let _w = worker_of(&both, &["--worker-id", "w"]);
    let gw = gateway_of(&both);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    assert_eq!(list_workers(&a).await, ["w"], "the worker registers with the first controller");
    let url = format!("{}/v1/chat/completions", gw.url());
    drop(a);
    let lost = std::time::Instant::now();
    // Requests keep succeeding across more than a TTL while the worker and gateway move to B.
    while lost.elapsed() < Duration::from_secs(4) {
        assert!(done(&stream(&url, "Hi!", 2, None).await), "a request failed after controller A died");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while list_workers(&b).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the worker did not move to controller B");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done(&stream(&url, "Still there?", 2, None).await));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_a_worker() {
    let ctl = controller("127.0.0.1:0", "5s");
    let mut w = worker(&ctl, &["--worker-id", "drained", "--debug-step-delay", "200ms"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let (started, mut serving) = unbounded_channel();
    let request = tokio::spawn(async move { stream(&url, "Write a long story.", 16, Some(started)).await });
    serving.recv().await.expect("the answer starts");
    w.signal(libc::SIGTERM);
    assert_eq!(request.await.unwrap(), Outcome::Done("length".into()), "the in-flight request completes");
    let status = w.wait_exit(Duration::from_secs(60)).expect("the worker exits after draining");
    assert!(status.success(), "the worker exits 0: {status:?}");
    assert!(list_workers(&ctl).await.is_empty(), "a drained worker deregisters");
}

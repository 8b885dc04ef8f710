//! Failures: a worker killed mid-load, a controller restart, a worker drained with SIGTERM.

use std::time::Duration;

use futures::StreamExt;
use herd_proto::v1 as pb;
use herd_tests::cluster::{MODEL, Proc, controller, gateway, wait_for_workers, worker};
use serde_json::{Value, json};

/// How a streamed request ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// `[DONE]` after a finish_reason.
    Done,
    /// An error event; `chunks` data events came before it.
    Error { chunks: usize },
}

async fn stream(url: &str, prompt: &str, max_tokens: u32) -> Outcome {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                      "max_tokens": max_tokens, "stream": true, "temperature": 0, "ignore_eos": true});
    let resp = reqwest::Client::new().post(url).json(&body).send().await.expect("gateway answers");
    assert_eq!(resp.status().as_u16(), 200, "{}", resp.text().await.unwrap_or_default());
    let mut bytes = resp.bytes_stream();
    let (mut buf, mut chunks, mut finished) = (String::new(), 0, false);
    while let Some(piece) = bytes.next().await {
        let Ok(piece) = piece else { break };
        buf.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buf.find('\n') {
            let line = buf[..end].to_string();
            buf.drain(..=end);
            let Some(data) = line.strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                assert!(finished, "[DONE] without a finish_reason");
                return Outcome::Done;
            }
            let event: Value = serde_json::from_str(data).unwrap();
            if event.get("error").is_some() {
                return Outcome::Error { chunks };
            }
            finished |= !event["choices"][0]["finish_reason"].is_null();
            chunks += 1;
        }
    }
    panic!("the stream ended without [DONE] or an error event after {chunks} chunks");
}

async fn list_workers(controller: &Proc) -> Vec<String> {
    let mut client = pb::controller_client::ControllerClient::connect(controller.url()).await.unwrap();
    let resp = client.list_workers(pb::ListWorkersRequest::default()).await.unwrap().into_inner();
    resp.workers.into_iter().map(|w| w.info.unwrap().worker_id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_worker_fails_over_requests_without_a_first_token() {
    let ctl = controller("127.0.0.1:0", "2s");
    let victim = worker(&ctl, &["--worker-id", "victim", "--max-batch-size", "4"]);
    let _survivor = worker(&ctl, &["--worker-id", "survivor", "--max-batch-size", "4"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 2, Duration::from_secs(120)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(300), stream(&url, &format!("Tell me about {i}."), 24))
                    .await
                    .expect("no stream may hang")
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    victim.signal(libc::SIGKILL);
    let killed_at = std::time::Instant::now();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    for o in &outcomes {
        if let Outcome::Error { chunks } = o {
            assert!(*chunks > 0, "a request failed before its first token instead of moving: {outcomes:?}");
        }
    }
    let done = outcomes.iter().filter(|o| **o == Outcome::Done).count();
    assert!(done >= 10, "requests without a first token succeed on the survivor: {outcomes:?}");
    loop {
        if !list_workers(&ctl).await.contains(&"victim".to_string()) {
            break;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(4), "the dead worker stays listed past its TTL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_restart_loses_nothing() {
    let ctl = controller("127.0.0.1:0", "3s");
    let addr = ctl.addr.clone();
    let _w = worker(&ctl, &["--worker-id", "w1"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    drop(ctl);
    // The gateway keeps its last table while no controller answers.
    assert_eq!(stream(&url, "Hello!", 4).await, Outcome::Done);
    let ctl = controller(&addr, "3s");
    let restarted = std::time::Instant::now();
    while list_workers(&ctl).await.is_empty() {
        assert!(restarted.elapsed() < Duration::from_secs(3), "the worker did not re-register within a TTL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_workers(&gw, 1, Duration::from_secs(10)).await;
    assert_eq!(stream(&url, "Hello again!", 4).await, Outcome::Done);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_a_worker() {
    let ctl = controller("127.0.0.1:0", "5s");
    let mut w = worker(&ctl, &["--worker-id", "drained"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let request = tokio::spawn(async move { stream(&url, "Write a long story.", 32).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.signal(libc::SIGTERM);
    assert_eq!(request.await.unwrap(), Outcome::Done, "the in-flight request completes");
    let status = w.wait_exit(Duration::from_secs(60)).expect("the worker exits after draining");
    assert!(status.success(), "the worker exits 0: {status:?}");
    assert!(list_workers(&ctl).await.is_empty(), "a drained worker deregisters");
}

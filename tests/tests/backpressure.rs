//! Backpressure and cancellation through the gateway, on real processes: a full worker answers
//! 429 with Retry-After and finishes what it took; a client that leaves frees its sequence
//! without disturbing the others.

use std::time::{Duration, Instant};

use futures::StreamExt;
use herd_proto::v1 as pb;
use herd_tests::cluster::{MODEL, controller, gateway, wait_for_workers, worker};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn a_full_worker_answers_429_with_retry_after_and_finishes_the_rest() {
    let ctl = controller("127.0.0.1:0", "5s");
    // One running and two waiting at most; slow steps so that all ten arrive while it is full.
    let _w = worker(&ctl, &["--max-batch-size", "1", "--max-waiting", "2", "--debug-step-delay", "100ms"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let url = format!("{}/v1/completions", gw.url());
    let client = reqwest::Client::new();
    let body =
        json!({"model": MODEL, "prompt": "Count slowly:", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let resp = client.post(&url).json(&body).send().await.expect("the gateway answers");
                let status = resp.status().as_u16();
                let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                let body: Value = resp.json().await.expect("a JSON body");
                (status, retry_after, body)
            })
        })
        .collect();
    let (mut done, mut refused) = (0, 0);
    for t in tasks {
        let (status, retry_after, body) = t.await.unwrap();
        match status {
            200 => {
                assert_eq!(body["usage"]["completion_tokens"], 12, "{body}");
                done += 1;
            }
            429 => {
                assert!(retry_after.is_some(), "429 without Retry-After: {body}");
                assert!(body["error"]["message"].is_string(), "429 without an OpenAI error: {body}");
                refused += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!((done, refused), (3, 7), "one running and two waiting complete, the surplus is refused");
}

async fn running(worker: &mut pb::worker_client::WorkerClient<tonic::transport::Channel>) -> u32 {
    let health = worker.health(pb::HealthRequest {}).await.expect("worker health").into_inner();
    health.load.map_or(0, |l| l.running)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_frees_its_sequence_and_spares_the_others() {
    let ctl = controller("127.0.0.1:0", "5s");
    let w = worker(&ctl, &["--max-batch-size", "4", "--debug-step-delay", "20ms"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let mut health = pb::worker_client::WorkerClient::connect(w.url()).await.expect("the worker's gRPC port");
    let url = format!("{}/v1/completions", gw.url());
    let client = reqwest::Client::new();
    let stream = |max_tokens: u32| {
        let body = json!({"model": MODEL, "prompt": "Tell a long story:", "max_tokens": max_tokens,
                          "temperature": 0, "ignore_eos": true, "stream": true});
        client.post(&url).json(&body).send()
    };
    // The one that stays: read to the end in the background.
    let stays = tokio::spawn({
        let resp = stream(40).await.expect("a stream");
        async move { resp.bytes().await.expect("the whole stream") }
    });
    // The one that leaves, after its first few events.
    let leaves = stream(2000).await.expect("a stream");
    let mut events = leaves.bytes_stream();
    for _ in 0..3 {
        events.next().await.expect("an event").expect("bytes");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(&mut health).await < 2 {
        assert!(Instant::now() < deadline, "both sequences never ran together");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(events);
    let left = Instant::now();
    while running(&mut health).await > 1 {
        assert!(left.elapsed() < Duration::from_secs(10), "the abandoned sequence kept running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = String::from_utf8(stays.await.unwrap().to_vec()).unwrap();
    let tokens = text.lines().filter(|l| l.starts_with("data: {") && l.contains("\"text\"")).count();
    assert!(text.trim_end().ends_with("data: [DONE]"), "the other stream did not finish: {text}");
    assert!(tokens >= 40, "the other stream lost tokens: {tokens} events");
}

//! Least-loaded routing across two real workers: even under a burst, skewed toward the faster one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herd_tests::cluster::{MODEL, controller, gateway, wait_for_workers, worker};
use serde_json::json;
use tokio::sync::Mutex;

/// Sends one short chat request; returns the id of the worker that served it.
async fn ask(client: &reqwest::Client, url: &str, i: usize) -> String {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": format!("Count to {i}.")}],
                      "max_tokens": 4, "temperature": 0});
    let resp = client.post(url).json(&body).send().await.expect("gateway answers");
    assert_eq!(resp.status().as_u16(), 200);
    let worker = resp.headers().get("x-herd-worker").expect("x-herd-worker header").to_str().unwrap().to_string();
    resp.bytes().await.unwrap();
    worker
}

/// Both tests load the 2 CPUs; run one at a time so their workers' relative speeds are their own.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn tally(ids: Vec<String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_is_shared_between_two_workers() {
    let _serial = SERIAL.lock().await;
    let ctl = controller("127.0.0.1:0", "5s");
    let _a = worker(&ctl, &["--worker-id", "a"]);
    let _b = worker(&ctl, &["--worker-id", "b"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 2, Duration::from_secs(120)).await;
    let url = Arc::new(format!("{}/v1/chat/completions", gw.url()));
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { ask(&client, &url, i).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let counts = tally(ids);
    let (a, b) = (counts.get("a").copied().unwrap_or(0), counts.get("b").copied().unwrap_or(0));
    assert!(a > 0 && b > 0, "both workers serve: {counts:?}");
    assert!(a <= 2 * b && b <= 2 * a, "neither gets more than twice the other's count: {counts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_faster_worker_gets_more_requests() {
    let _serial = SERIAL.lock().await;
    let ctl = controller("127.0.0.1:0", "5s");
    let _slow = worker(&ctl, &["--worker-id", "slow", "--debug-step-delay", "1s"]);
    let _fast = worker(&ctl, &["--worker-id", "fast"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 2, Duration::from_secs(120)).await;
    let url = Arc::new(format!("{}/v1/chat/completions", gw.url()));
    let client = reqwest::Client::new();
    // Four clients, each sending its next request when the last one is answered.
    let tasks: Vec<_> = (0..4)
        .map(|c| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..6 {
                    ids.push(ask(&client, &url, c * 10 + i).await);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let counts = tally(ids);
    let (slow, fast) = (counts.get("slow").copied().unwrap_or(0), counts.get("fast").copied().unwrap_or(0));
    assert!(fast > slow, "the faster worker gets more requests: {counts:?}");
}

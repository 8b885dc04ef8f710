//! Routing across two real workers: a burst is shared, the faster worker gets more, and a
//! conversation's turns follow its KV cache whichever gateway they pass through.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herd_tests::cluster::{MODEL, controller, gateway, series, wait_for_workers, worker};
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
    // Both ran steps of the same sizes, so the gateway knows how much slower the slow one is.
    let cluster: serde_json::Value =
        reqwest::get(format!("{}/admin/cluster", gw.url())).await.unwrap().json().await.unwrap();
    let pace = |id: &str| {
        let workers = cluster["workers"].as_array().expect("a worker list");
        workers.iter().find(|w| w["id"] == id).and_then(|w| w["pace"].as_f64()).expect("a pace per worker")
    };
    assert!(pace("slow") > 2.0 && pace("fast") == 1.0, "{cluster:#}");
}

/// One chat turn of `messages`; the worker that served it and its answer.
async fn turn(client: &reqwest::Client, gateway: &str, messages: &[serde_json::Value]) -> (String, String) {
    let body = json!({"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0});
    let resp = client.post(format!("{gateway}/v1/chat/completions")).json(&body).send().await.expect("gateway answers");
    assert_eq!(resp.status().as_u16(), 200);
    let worker = resp.headers().get("x-herd-worker").expect("x-herd-worker header").to_str().unwrap().to_string();
    let answer: serde_json::Value = resp.json().await.unwrap();
    (worker, answer["choices"][0]["message"]["content"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_send_a_conversation_to_the_worker_holding_it() {
    let _serial = SERIAL.lock().await;
    let ctl = controller("127.0.0.1:0", "5s");
    let _a = worker(&ctl, &["--worker-id", "a"]);
    let _b = worker(&ctl, &["--worker-id", "b"]);
    let gateways = [gateway(&ctl), gateway(&ctl)];
    for gw in &gateways {
        wait_for_workers(gw, 2, Duration::from_secs(120)).await;
    }
    let client = reqwest::Client::new();
    let mut later_turns = 0;
    for c in 0..4 {
        let mut messages = vec![json!({"role": "user", "content": format!(
            "Conversation {c}. I am planning a garden with tomatoes, basil, peppers and marigolds along a sunny \
             south-facing fence; the soil is clay and the summers are dry. What should I plant first, and why?")})];
        let (first, answer) = turn(&client, &gateways[0].url(), &messages).await;
        for t in 1..3 {
            // The gateways hear of the new blocks on the workers' load streams (every 50 ms).
            tokio::time::sleep(Duration::from_millis(300)).await;
            messages.push(json!({"role": "assistant", "content": answer}));
            messages
                .push(json!({"role": "user", "content": format!("Thanks. Follow-up {t}: how often should I water?")}));
            let (served, _) = turn(&client, &gateways[t % 2].url(), &messages).await;
            assert_eq!(served, first, "conversation {c} turn {t} left the worker holding it");
            later_turns += 1;
        }
    }
    // Each later turn was placed for its prefix, not by chance.
    let mut prefix_routed = 0.0;
    for gw in &gateways {
        let text = client.get(format!("{}/metrics", gw.url())).send().await.unwrap().text().await.unwrap();
        prefix_routed +=
            series(&text, "herd_gateway_routing_decisions_total{policy=\"kv-aware\",reason=\"prefix\"}").unwrap_or(0.0);
    }
    assert!(prefix_routed >= f64::from(later_turns), "{prefix_routed} of {later_turns} later turns routed by prefix");
}

//! Chaos under load: 16 clients stream chat answers for 60 s while a worker is killed with
//! SIGKILL, the controller restarted and (etcd store) etcd restarted. A request may fail only
//! once its stream has started (an error event after its first tokens); every worker comes back.

use std::time::{Duration, Instant};

use futures::StreamExt;
use herd_proto::v1 as pb;
use herd_tests::cluster::{MODEL, Proc, controller, controller_on_etcd, gateway, wait_for_workers, worker};
use herd_tests::etcd::Etcd;
use herd_tests::test_model;
use serde_json::{Value, json};

const CLIENTS: usize = 16;
const RUN: Duration = Duration::from_secs(60);

/// How one streamed request ended.
#[derive(Debug)]
enum Outcome {
    /// `[DONE]`.
    Done,
    /// An error event, or a cut connection, after `chunks` data events.
    FailedAfterStart { chunks: usize },
    /// A non-200 answer, or an error before any token: what chaos must never cause.
    FailedBeforeStart(String),
}

/// Streams one chat answer through the gateway at `url`.
async fn one_stream(client: &reqwest::Client, url: &str, n: usize) -> Outcome {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": format!("Count to {n}.")}],
                      "max_tokens": 12, "stream": true, "temperature": 0.7, "ignore_eos": true});
    let resp = match client.post(url).json(&body).send().await {
        Ok(resp) => resp,
        Err(e) => return Outcome::FailedBeforeStart(format!("no answer: {e}")),
    };
    let status = resp.status().as_u16();
    if status != 200 {
        return Outcome::FailedBeforeStart(format!("{status}: {}", resp.text().await.unwrap_or_default()));
    }
    let mut bytes = resp.bytes_stream();
    let (mut buf, mut chunks) = (Vec::new(), 0);
    let cut = |chunks: usize, why: String| {
        if chunks > 0 { Outcome::FailedAfterStart { chunks } } else { Outcome::FailedBeforeStart(why) }
    };
    while let Some(piece) = bytes.next().await {
        let Ok(piece) = piece else { return cut(chunks, "connection cut before the first token".into()) };
        buf.extend_from_slice(&piece);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                return Outcome::Done;
            }
            let event: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            if event.get("error").is_some() {
                return cut(chunks, format!("error event before the first token: {data}"));
            }
            chunks += 1;
        }
    }
    cut(chunks, "the stream ended without [DONE]".into())
}

/// [`CLIENTS`] clients streaming one request after another until `until`; every outcome.
async fn load(url: String, until: Instant) -> Vec<Outcome> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while Instant::now() < until {
                    outcomes.push(one_stream(&client, &url, c * 1000 + outcomes.len()).await);
                }
                outcomes
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("a client task"));
    }
    all
}

/// No request failed before it started, and the load got real work done.
fn check(outcomes: &[Outcome]) {
    let before: Vec<&str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::FailedBeforeStart(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    assert!(before.is_empty(), "{} requests failed before their stream started: {before:?}", before.len());
    let cut: Vec<usize> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::FailedAfterStart { chunks } => Some(*chunks),
            _ => None,
        })
        .collect();
    let done = outcomes.len() - cut.len();
    assert!(done >= CLIENTS, "only {done} of {} requests finished", outcomes.len());
    eprintln!("chaos: {done} of {} streams finished; cut after this many chunks: {cut:?}", outcomes.len());
}

/// Sleeps until `offset` after `start`.
async fn at(start: Instant, offset: Duration) {
    tokio::time::sleep_until((start + offset).into()).await;
}

/// The pids of `pid`'s child processes.
fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process is alive");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn herd_up_restarts_a_killed_worker_and_no_unstarted_request_fails() {
    let model = test_model().display().to_string();
    let args = ["up", "--model", &model, "--port", "0", "--workers", "2", "--model-name", MODEL];
    let mut args: Vec<String> = args.map(String::from).to_vec();
    args.extend(["--heartbeat-ttl".into(), "3s".into()]);
    let up = Proc::start_until(&args, "serving at ");
    let url = format!("{}/v1/chat/completions", up.url());
    let start = Instant::now();
    let running = tokio::spawn(load(url, start + RUN));

    at(start, Duration::from_secs(15)).await;
    let before = children(up.pid());
    assert_eq!(before.len(), 2, "two worker processes: {before:?}");
    // SAFETY: kill(2) on a worker process of the herd up we started.
    unsafe {
        libc::kill(before[0] as libc::pid_t, libc::SIGKILL);
    }
    check(&running.await.unwrap());

    // herd up started the killed worker again, and it is back in the gateway's table.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = children(up.pid());
        if now.len() == 2 && !now.contains(&before[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "the killed worker was not started again: {before:?} -> {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_workers(&up, 2, Duration::from_secs(120)).await;
}

/// The names of the workers the controller at `url` lists.
async fn listed(url: &str) -> Vec<String> {
    let Ok(mut client) = pb::controller_client::ControllerClient::connect(url.to_string()).await else {
        return Vec::new();
    };
    let Ok(resp) = client.list_workers(pb::ListWorkersRequest::default()).await else { return Vec::new() };
    let mut ids: Vec<String> =
        resp.into_inner().workers.into_iter().filter_map(|w| w.info.map(|i| i.worker_id)).collect();
    ids.sort();
    ids
}

/// Controller, two workers and a gateway as separate processes, on the memory store or etcd:
/// the controller restarts at 10 s, worker w1 is killed and started again at 25 s, and etcd
/// (when used) is down from 40 s to 44 s.
async fn separate_processes_ride_out_restarts(on_etcd: bool) {
    let mut etcd = on_etcd.then(Etcd::start);
    let etcd_url = etcd.as_ref().map(Etcd::url);
    let start_controller = |addr: &str| match &etcd_url {
        Some(url) => controller_on_etcd(addr, "3s", url),
        None => controller(addr, "3s"),
    };
    let mut ctl = start_controller("127.0.0.1:0");
    let addr = ctl.addr.clone();
    let _w0 = worker(&ctl, &["--worker-id", "w0"]);
    let mut w1 = worker(&ctl, &["--worker-id", "w1"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 2, Duration::from_secs(120)).await;
    let start = Instant::now();
    let running = tokio::spawn(load(format!("{}/v1/chat/completions", gw.url()), start + RUN));

    at(start, Duration::from_secs(10)).await;
    drop(ctl);
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctl = start_controller(&addr);
    at(start, Duration::from_secs(25)).await;
    w1.signal(libc::SIGKILL);
    drop(w1);
    w1 = worker(&ctl, &["--worker-id", "w1"]);
    if let Some(etcd) = etcd.as_mut() {
        at(start, Duration::from_secs(40)).await;
        etcd.stop();
        tokio::time::sleep(Duration::from_secs(4)).await;
        etcd.resume();
    }
    check(&running.await.unwrap());

    let deadline = Instant::now() + Duration::from_secs(60);
    while listed(&ctl.url()).await != ["w0", "w1"] {
        assert!(Instant::now() < deadline, "a worker stayed dropped: {:?}", listed(&ctl.url()).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_workers(&gw, 2, Duration::from_secs(60)).await;
    drop(w1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_store_cluster_rides_out_a_controller_restart_and_a_killed_worker() {
    separate_processes_ride_out_restarts(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_etcd_cluster_rides_out_controller_etcd_and_worker_restarts() {
    separate_processes_ride_out_restarts(true).await;
}

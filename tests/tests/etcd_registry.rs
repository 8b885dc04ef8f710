//! The etcd registry store with a real etcd: registrations outlive controllers, replicas share
//! them, silent workers expire, and a worker id can be held by one live worker only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use herd_proto::v1 as pb;
use herd_proto::v1::controller_client::ControllerClient;
use herd_tests::cluster::{
    MODEL, Proc, controller_on_etcd, controller_on_etcd_with, free_addr, gateway, gateway_of, registration, series,
    wait_for_workers, worker, worker_of,
};
use herd_tests::etcd::Etcd;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

async fn client(controller: &Proc) -> ControllerClient<Channel> {
    ControllerClient::connect(controller.url()).await.expect("controller answers")
}

async fn health(controller: &Proc) -> pb::ControllerHealthResponse {
    client(controller).await.health(pb::ControllerHealthRequest {}).await.unwrap().into_inner()
}

/// The controller's `grpc.health.v1` status for the whole server, as Kubernetes probes ask it.
async fn grpc_health(controller: &Proc) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(controller.url()).unwrap().connect().await.unwrap();
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = client.check(tonic_health::pb::HealthCheckRequest::default()).await.unwrap();
    resp.into_inner().status()
}

async fn worker_ids(controller: &Proc) -> Vec<String> {
    let resp = client(controller).await.list_workers(pb::ListWorkersRequest::default()).await.unwrap();
    resp.into_inner().workers.into_iter().map(|w| w.info.unwrap().worker_id).collect()
}

/// The etcd create revision of a worker's key: it changes only when the worker registers anew.
async fn create_revision(etcd: &Etcd, id: &str) -> i64 {
    let mut etcd = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
    let resp = etcd.get(format!("/herd/v1/workers/{id}"), None).await.unwrap();
    resp.kvs().first().map(|kv| kv.create_revision()).expect("the worker's key exists")
}

/// One short chat request through the gateway at `gateway_url`; its HTTP status.
async fn chat(gateway_url: &str) -> u16 {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let url = format!("{gateway_url}/v1/chat/completions");
    reqwest::Client::new().post(url).json(&body).send().await.expect("gateway answers").status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_controller_on_the_same_etcd_knows_every_worker_without_re_registration() {
    let etcd = Etcd::start();
    // The default TTL: leases outlive a controller restart of a few seconds.
    let first = controller_on_etcd("127.0.0.1:0", "10s", &etcd.url());
    let addr = first.addr.clone();
    let _w = worker(&first, &["--worker-id", "w"]);
    let gw = gateway(&first);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let registered = create_revision(&etcd, "w").await;

    first.signal(libc::SIGKILL);
    drop(first);
    assert_eq!(chat(&gw.url()).await, 200, "the gateway serves while no controller runs");
    let second = controller_on_etcd(&addr, "10s", &etcd.url());
    let started = Instant::now();
    while worker_ids(&second).await != ["w"] {
        assert!(started.elapsed() < Duration::from_secs(2), "the new controller does not list the worker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Heartbeats (every TTL/3) now reach the new controller, which finds the worker's lease in etcd.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(create_revision(&etcd, "w").await, registered, "the worker registered again");
    assert_eq!(chat(&gw.url()).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_worker_id_is_refused() {
    let etcd = Etcd::start();
    let ctl = controller_on_etcd("127.0.0.1:0", "5s", &etcd.url());
    let mut c = client(&ctl).await;
    let lease =
        c.register_worker(registration("twin", "http://127.0.0.1:1001")).await.expect("the first one registers");
    let lease = lease.into_inner().lease;
    let err = c.register_worker(registration("twin", "http://127.0.0.1:1002")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("twin"), "{}", err.message());
    // Nor can anyone without the registration's lease heartbeat or deregister it.
    let forged = "f".repeat(64);
    let beat = pb::HeartbeatRequest { worker_id: "twin".into(), load: None, lease: forged.clone() };
    assert_eq!(c.heartbeat(beat).await.unwrap_err().code(), Code::PermissionDenied);
    let leave = pb::DeregisterRequest { worker_id: "twin".into(), lease: forged };
    assert_eq!(c.deregister(leave).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(worker_ids(&ctl).await, ["twin"]);
    c.heartbeat(pb::HeartbeatRequest { worker_id: "twin".into(), load: None, lease: lease.clone() }).await.unwrap();
    c.deregister(pb::DeregisterRequest { worker_id: "twin".into(), lease }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_registrations_and_expire_silent_workers() {
    let etcd = Etcd::start();
    let a = controller_on_etcd("127.0.0.1:0", "2s", &etcd.url());
    let metrics = free_addr();
    let b = controller_on_etcd_with("127.0.0.1:0", "2s", &etcd.url(), &["--metrics-listen", &metrics]);
    let mut watch = client(&b).await.watch_workers(pb::WatchWorkersRequest {}).await.unwrap().into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(pb::worker_event::Event::Snapshot(_))));

    let lease = client(&a).await.register_worker(registration("shared", "http://127.0.0.1:1003")).await.unwrap();
    let lease = lease.into_inner().lease;
    let seen = tokio::time::timeout(Duration::from_secs(1), watch.next()).await;
    let event = seen.expect("B sees A's registration within 1 s").unwrap().unwrap();
    assert!(
        matches!(event.event, Some(pb::worker_event::Event::Upsert(ref s)) if s.info.as_ref().unwrap().worker_id == "shared")
    );

    // A heartbeat through either replica keeps the lease alive.
    let beat = |ctl: &Proc| {
        let (url, lease) = (ctl.url(), lease.clone());
        async move {
            let load = pb::WorkerLoad { running: 1, ..Default::default() };
            let mut c = ControllerClient::connect(url).await.unwrap();
            c.heartbeat(pb::HeartbeatRequest { worker_id: "shared".into(), load: Some(load), lease }).await
        }
    };
    for _ in 0..4 {
        beat(&b).await.expect("B renews a lease A granted");
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(worker_ids(&a).await, ["shared"]);
    let silent_since = Instant::now();
    for ctl in [&a, &b] {
        while !worker_ids(ctl).await.is_empty() {
            assert!(silent_since.elapsed() < Duration::from_secs(3), "a silent worker outlives TTL + 1 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(beat(&a).await.unwrap_err().code(), Code::NotFound, "an expired worker must register again");

    // B counts the expiry, though A granted the lease; a deregistration through A is no expiry.
    let lease = client(&a).await.register_worker(registration("leaving", "http://127.0.0.1:1004")).await.unwrap();
    let leave = pb::DeregisterRequest { worker_id: "leaving".into(), lease: lease.into_inner().lease };
    client(&a).await.deregister(leave).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = reqwest::get(format!("http://{metrics}/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(series(&text, "herd_controller_expiries_total"), Some(1.0), "{text}");
    assert_eq!(series(&text, "herd_controller_etcd_errors_total"), Some(0.0), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn herd_up_runs_on_etcd() {
    let etcd = Etcd::start();
    let model = herd_tests::test_model().display().to_string();
    let url = etcd.url();
    let args =
        ["up", "--model", &model, "--port", "0", "--model-name", MODEL, "--store", "etcd", "--etcd-endpoints", &url];
    let mut up = Proc::start_until(&args.map(String::from), "serving at ");
    assert_eq!(chat(&up.url()).await, 200);
    create_revision(&etcd, "up-worker-0").await;
    up.signal(libc::SIGINT);
    let status = up.wait_exit(Duration::from_secs(60)).expect("herd up stops after Ctrl-C");
    assert!(status.success(), "{status:?}");
}

/// Sends chat requests back to back until `stop` says so; returns every status.
fn chat_until(gateway: &Proc, mut stop: oneshot::Receiver<()>) -> JoinHandle<Vec<u16>> {
    let url = gateway.url();
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        while stop.try_recv().is_err() {
            statuses.push(chat(&url).await);
        }
        statuses
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_on_etcd_take_over_from_a_dead_one_with_no_failed_request() {
    let etcd = Etcd::start();
    let a = controller_on_etcd("127.0.0.1:0", "3s", &etcd.url());
    let b = controller_on_etcd("127.0.0.1:0", "3s", &etcd.url());
    let both = format!("{},{}", a.url(), b.url());
    let _w = worker_of(&both, &["--worker-id", "w"]);
    let gw = gateway_of(&both);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let registered = create_revision(&etcd, "w").await;
    let (stop, stopped) = oneshot::channel();
    let load = chat_until(&gw, stopped);
    drop(a);
    // Longer than a TTL: the worker's heartbeats must be reaching B.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _ = stop.send(());
    let statuses = load.await.unwrap();
    assert!(!statuses.is_empty() && statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(worker_ids(&b).await, ["w"]);
    assert_eq!(create_revision(&etcd, "w").await, registered, "the worker had to register again");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_etcd_outage_under_load_fails_no_request_and_drops_no_worker() {
    let mut etcd = Etcd::start();
    let ctl = controller_on_etcd("127.0.0.1:0", "3s", &etcd.url());
    let _w = worker(&ctl, &["--worker-id", "w"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let registered = create_revision(&etcd, "w").await;
    let (stop, stopped) = oneshot::channel();
    let load = chat_until(&gw, stopped);
    assert!(health(&ctl).await.ready);
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(worker_ids(&ctl).await, ["w"], "the controller serves its last view while etcd is away");
    let away = health(&ctl).await;
    assert!(!away.ready && away.reason.contains("etcd"), "not ready while etcd is away: {away:?}");
    assert_eq!(grpc_health(&ctl).await, ServingStatus::NotServing, "gRPC health while etcd is away");
    etcd.resume();
    // Two heartbeats after etcd returns.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let back = tokio::time::timeout(Duration::from_secs(10), async {
        while !health(&ctl).await.ready {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    back.await.expect("ready again once etcd is back");
    let serving = tokio::time::timeout(Duration::from_secs(5), async {
        while grpc_health(&ctl).await != ServingStatus::Serving {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    serving.await.expect("gRPC health SERVING again once etcd is back");
    let _ = stop.send(());
    let statuses = load.await.unwrap();
    assert!(!statuses.is_empty() && statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(worker_ids(&ctl).await, ["w"], "after the outage the registry matches the live workers");
    assert_eq!(create_revision(&etcd, "w").await, registered, "the live worker was dropped and re-registered");
}

/// A TCP proxy in front of etcd that the test can cut, to break one controller's watch while
/// etcd stays up for everyone else.
struct Proxy {
    url: String,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (cut, conns) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (accept_cut, accept_conns) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if accept_cut.load(Ordering::SeqCst) {
                    continue; // dropped: refused while cut
                }
                let target = target.trim_start_matches("http://").to_string();
                accept_conns.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Proxy { url, cut, conns }
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// The next event of a WatchWorkers stream, as `+id` (upsert) or `-id` (removed), within 15 s.
async fn next_event(stream: &mut tonic::Streaming<pb::WorkerEvent>) -> String {
    use pb::worker_event::Event;
    let event = tokio::time::timeout(Duration::from_secs(15), stream.next()).await.expect("an event in time");
    match event.unwrap().unwrap().event.unwrap() {
        Event::Upsert(s) => format!("+{}", s.info.unwrap().worker_id),
        Event::Removed(id) => format!("-{id}"),
        Event::Snapshot(s) => format!("snapshot of {}", s.workers.len()),
    }
}

/// Controller A sees etcd through a proxy; B directly. While A's watch is cut, B records changes.
async fn changes_during_a_cut_watch(compact: bool) -> Vec<String> {
    let etcd = Etcd::start();
    let proxy = Proxy::start(etcd.url()).await;
    let a = controller_on_etcd("127.0.0.1:0", "20s", &proxy.url);
    let b = controller_on_etcd("127.0.0.1:0", "20s", &etcd.url());
    let mut watch = client(&a).await.watch_workers(pb::WatchWorkersRequest {}).await.unwrap().into_inner();
    assert_eq!(next_event(&mut watch).await, "snapshot of 0");
    client(&b).await.register_worker(registration("before", "http://127.0.0.1:2001")).await.unwrap();
    assert_eq!(next_event(&mut watch).await, "+before");

    proxy.cut();
    let mut c = client(&b).await;
    let lease = c.register_worker(registration("gone", "http://127.0.0.1:2002")).await.unwrap().into_inner().lease;
    c.deregister(pb::DeregisterRequest { worker_id: "gone".into(), lease }).await.unwrap();
    c.register_worker(registration("after", "http://127.0.0.1:2003")).await.unwrap();
    if compact {
        let mut etcd_client = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
        let revision = etcd_client.get("/", None).await.unwrap().header().unwrap().revision();
        etcd_client.compact(revision, None).await.unwrap();
    }
    proxy.restore();
    let mut seen = Vec::new();
    while !seen.contains(&"+after".to_string()) {
        seen.push(next_event(&mut watch).await);
    }
    assert_eq!(worker_ids(&a).await, ["after", "before"], "A's registry matches etcd again");
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_watch_loses_no_event() {
    assert_eq!(changes_during_a_cut_watch(false).await, ["+gone", "-gone", "+after"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_past_a_compaction_resyncs_the_difference() {
    // "gone" came and went inside the compacted history: only the net change is left to emit.
    assert_eq!(changes_during_a_cut_watch(true).await, ["+after"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_reaches_etcd_over_tls_with_a_client_certificate() {
    let etcd = Etcd::start_tls();
    let pem = |name: &str| etcd.pem(name).display().to_string();
    let args = ["controller", "--listen", "127.0.0.1:0", "--store", "etcd", "--etcd-endpoints", &etcd.url()]
        .into_iter()
        .chain(["--etcd-ca", &pem("ca.pem"), "--etcd-cert", &pem("client.pem"), "--etcd-key", &pem("client-key.pem")])
        .map(String::from)
        .collect::<Vec<_>>();
    let ctl = Proc::start(&args);
    client(&ctl)
        .await
        .register_worker(registration("secure", "http://127.0.0.1:3001"))
        .await
        .expect("registers over TLS");
    assert_eq!(worker_ids(&ctl).await, ["secure"]);
    assert!(health(&ctl).await.ready);
}

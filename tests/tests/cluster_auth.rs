//! Attacks on the control plane, on real processes: calls without the cluster token, and a
//! caller holding the token (a compromised gateway) trying to take over a live worker's id.

use std::process::Command;
use std::time::Duration;

use herd_proto::v1 as pb;
use herd_proto::v1::controller_client::ControllerClient;
use herd_proto::v1::worker_client::WorkerClient;
use herd_tests::cluster::{MODEL, Proc, registration, wait_for_workers};
use herd_tests::{herd_bin, test_model};
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A token file, and the flag that names it.
fn token_file(dir: &tempfile::TempDir) -> [String; 2] {
    let path = dir.path().join("cluster-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    ["--cluster-token-file".into(), path.display().to_string()]
}

/// A controller, a worker (with `worker_extra` flags) and a gateway, all given the token file,
/// with the worker in the gateway's table; the directory holding the file goes with them.
async fn cluster_with_token(worker_extra: &[&str]) -> (tempfile::TempDir, Proc, Proc, Proc) {
    let dir = tempfile::tempdir().unwrap();
    let flag = token_file(&dir);
    let with_token = |args: &[&str]| args.iter().map(|a| a.to_string()).chain(flag.clone()).collect::<Vec<_>>();
    let controller = Proc::start(&with_token(&["controller", "--listen", "127.0.0.1:0"]));
    let model = test_model().display().to_string();
    let ctl = controller.url();
    let mut worker_args =
        vec!["worker", "--listen", "127.0.0.1:0", "--threads", "1", "--model-name", MODEL, "--model", &model];
    worker_args.extend(["--controller", &ctl]);
    worker_args.extend(worker_extra);
    let worker = Proc::start(&with_token(&worker_args));
    let gateway = Proc::start(&with_token(&["gateway", "--listen", "127.0.0.1:0", "--controller", &ctl]));
    wait_for_workers(&gateway, 1, Duration::from_secs(120)).await;
    (dir, controller, worker, gateway)
}

type Bearer = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;

/// A channel to `url` whose calls carry `authorization: Bearer <token>` (nothing for `None`).
async fn channel(url: &str, token: Option<&str>) -> InterceptedService<Channel, Bearer> {
    let channel = Channel::from_shared(url.to_string()).unwrap().connect().await.expect("the server answers");
    let header: Option<tonic::metadata::AsciiMetadataValue> = token.map(|t| format!("Bearer {t}").parse().unwrap());
    let bearer: Bearer = Box::new(move |mut request: Request<()>| {
        if let Some(h) = &header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    });
    InterceptedService::new(channel, bearer)
}

async fn chat(gateway_url: &str) -> u16 {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let url = format!("{gateway_url}/v1/chat/completions");
    reqwest::Client::new().post(url).json(&body).send().await.expect("gateway answers").status().as_u16()
}

/// Every controller rpc, called with `token`: the codes they answered.
async fn controller_codes(url: &str, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let mut c = ControllerClient::new(channel(url, token).await);
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    let lease = "f".repeat(64);
    vec![
        ("RegisterWorker", code(c.register_worker(registration("intruder", "http://127.0.0.1:9")).await.map(drop))),
        (
            "Heartbeat",
            code(
                c.heartbeat(pb::HeartbeatRequest { worker_id: "w".into(), load: None, lease: lease.clone() })
                    .await
                    .map(drop),
            ),
        ),
        ("Deregister", code(c.deregister(pb::DeregisterRequest { worker_id: "w".into(), lease }).await.map(drop))),
        ("ListModels", code(c.list_models(pb::ListModelsRequest {}).await.map(drop))),
        ("ListWorkers", code(c.list_workers(pb::ListWorkersRequest::default()).await.map(drop))),
        ("WatchWorkers", code(c.watch_workers(pb::WatchWorkersRequest {}).await.map(drop))),
        ("PickWorker", code(c.pick_worker(pb::PickWorkerRequest { model: MODEL.into() }).await.map(drop))),
        ("Health", code(c.health(pb::ControllerHealthRequest {}).await.map(drop))),
    ]
}

/// Every worker rpc, called with `token`: the codes they answered.
async fn worker_codes(url: &str, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let mut w = WorkerClient::new(channel(url, token).await);
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    let generate = pb::GenerateRequest {
        model: MODEL.into(),
        input: Some(pb::generate_request::Input::Text("Hello".into())),
        max_tokens: Some(2),
        ..Default::default()
    };
    let count = pb::CountTokensRequest {
        model: MODEL.into(),
        input: Some(pb::count_tokens_request::Input::Text("Hello".into())),
        with_ids: true,
    };
    let detokenize = pb::DetokenizeRequest { model: MODEL.into(), ids: vec![1, 2] };
    vec![
        ("Generate", code(w.generate(generate).await.map(drop))),
        ("CountTokens", code(w.count_tokens(count).await.map(drop))),
        ("Detokenize", code(w.detokenize(detokenize).await.map(drop))),
        ("ModelInfo", code(w.model_info(pb::ModelInfoRequest {}).await.map(drop))),
        ("Health", code(w.health(pb::HealthRequest {}).await.map(drop))),
        ("WatchLoad", code(w.watch_load(pb::WatchLoadRequest {}).await.map(drop))),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_needs_the_cluster_token() {
    let (_dir, controller, worker, gateway) = cluster_with_token(&[]).await;
    // With the token everywhere, the cluster works.
    assert_eq!(chat(&gateway.url()).await, 200);

    for token in [None, Some("0123456789abcdef0123456789abcdeX"), Some("")] {
        for (rpc, code) in controller_codes(&controller.url(), token).await {
            assert_eq!(code, Code::Unauthenticated, "controller {rpc} with token {token:?}");
        }
        for (rpc, code) in worker_codes(&worker.url(), token).await {
            assert_eq!(code, Code::Unauthenticated, "worker {rpc} with token {token:?}");
        }
    }
    // The right token gets through (the calls answer on their merits).
    let codes = controller_codes(&controller.url(), Some(TOKEN)).await;
    assert!(codes.iter().all(|(_, code)| *code != Code::Unauthenticated), "{codes:?}");
    let codes = worker_codes(&worker.url(), Some(TOKEN)).await;
    assert!(codes.iter().all(|(_, code)| *code != Code::Unauthenticated), "{codes:?}");
    assert_eq!(chat(&gateway.url()).await, 200, "the refused calls changed nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_worker_id_cannot_be_taken_over() {
    let (_dir, controller, _worker, gateway) = cluster_with_token(&["--worker-id", "victim"]).await;
    // The attacker holds the cluster token, but not the worker's lease.
    let mut c = ControllerClient::new(channel(&controller.url(), Some(TOKEN)).await);
    let err = c.register_worker(registration("victim", "http://127.0.0.1:9")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let lease = "0".repeat(64);
    let steer = pb::WorkerLoad { waiting: 1_000_000, ..Default::default() };
    let beat = pb::HeartbeatRequest { worker_id: "victim".into(), load: Some(steer), lease: lease.clone() };
    assert_eq!(c.heartbeat(beat).await.unwrap_err().code(), Code::PermissionDenied);
    let leave = pb::DeregisterRequest { worker_id: "victim".into(), lease };
    assert_eq!(c.deregister(leave).await.unwrap_err().code(), Code::PermissionDenied);

    let workers = c.list_workers(pb::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!(workers.len(), 1);
    let info = workers[0].info.clone().unwrap();
    assert_ne!(info.address, "http://127.0.0.1:9", "the record still points at the real worker");
    assert!(workers[0].load.as_ref().is_none_or(|l| l.waiting < 1_000_000), "the forged load was not stored");
    assert_eq!(chat(&gateway.url()).await, 200, "the gateway still reaches the real worker");
}

#[test]
fn a_reachable_role_without_a_credential_refuses_to_start() {
    let model = test_model().display().to_string();
    let roles: [&[&str]; 2] = [
        &["controller", "--listen", "0.0.0.0:0"],
        &["worker", "--listen", "0.0.0.0:0", "--model", &model, "--controller", "http://127.0.0.1:9"],
    ];
    for role in roles {
        let out = Command::new(herd_bin()).args(role).env_remove("HERD_CLUSTER_TOKEN").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{role:?} started without a credential");
        assert!(stderr.contains("--cluster-token-file") && stderr.contains("--insecure-no-auth"), "{role:?}: {stderr}");
    }
    // Said loudly, it may.
    let controller = Proc::start(&["controller", "--listen", "0.0.0.0:0", "--insecure-no-auth"].map(String::from));
    assert!(controller.addr.starts_with("0.0.0.0:"), "{}", controller.addr);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_registrations_is_capped_and_new_gateways_still_sync() {
    let dir = tempfile::tempdir().unwrap();
    let flag = token_file(&dir);
    let args = ["controller", "--listen", "127.0.0.1:0", "--max-workers", "2000"];
    let controller = Proc::start(&args.iter().map(|a| a.to_string()).chain(flag.clone()).collect::<Vec<_>>());
    let mut c = ControllerClient::new(channel(&controller.url(), Some(TOKEN)).await);
    // Ten thousand registrations by a token holder, each record as large as the limits allow
    // (about 3 KiB: 2000 of them are over the 4 MiB gRPC messages default to).
    let mut refused = 0;
    for i in 0..10_000 {
        let mut request = registration(&format!("fake-{i:05}-{}", "x".repeat(100)), "http://127.0.0.1:9");
        let info = request.info.as_mut().unwrap();
        info.models = (0..16).map(|m| format!("{m:02}{}", "m".repeat(126))).collect();
        info.devices = (0..16).map(|d| format!("{d:02}{}", "d".repeat(30))).collect();
        if let Err(status) = c.register_worker(request).await {
            assert_eq!(status.code(), Code::ResourceExhausted, "registration {i}: {status:?}");
            refused += 1;
        }
    }
    assert_eq!(refused, 8000);
    let mut args: Vec<String> =
        ["gateway", "--listen", "127.0.0.1:0", "--controller", &controller.url()].map(String::from).to_vec();
    args.extend(flag);
    let gateway = Proc::start(&args);
    let health = format!("{}/health", gateway.url());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen: serde_json::Value = reqwest::get(&health).await.unwrap().json().await.unwrap();
        if seen["workers"] == 2000 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new gateway did not get the snapshot: {seen}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_black_hole_is_skipped_within_the_accept_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let flag = token_file(&dir);
    let with_token = |args: &[&str]| args.iter().map(|a| a.to_string()).chain(flag.clone()).collect::<Vec<_>>();
    let controller = Proc::start(&with_token(&["controller", "--listen", "127.0.0.1:0", "--heartbeat-ttl", "60s"]));
    let (model, ctl) = (test_model().display().to_string(), controller.url());
    let worker_args = ["worker", "--listen", "127.0.0.1:0", "--threads", "1", "--model-name", MODEL, "--model", &model];
    let _worker =
        Proc::start(&with_token(&[&worker_args[..], &["--controller", &ctl, "--worker-id", "real"]].concat()));
    let gateway_args = ["gateway", "--listen", "127.0.0.1:0", "--controller", &ctl, "--worker-accept-timeout", "2s"];
    let gateway = Proc::start(&with_token(&gateway_args));
    // A token holder registers a new worker at an address that accepts connections and never
    // answers a byte.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", hole.local_addr().unwrap());
    let mut c = ControllerClient::new(channel(&ctl, Some(TOKEN)).await);
    c.register_worker(registration("hole", &address)).await.expect("a new id registers");
    wait_for_workers(&gateway, 2, Duration::from_secs(120)).await;
    // Two requests at once: the gateway spreads them, so one is sent to the black hole first.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let url = format!("{}/v1/chat/completions", gateway.url());
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let send = || async { client.post(&url).json(&body).send().await.expect("an answer within a minute") };
    let (a, b) = tokio::join!(send(), send());
    for resp in [a, b] {
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["x-herd-worker"], "real", "the answer came from the real worker");
    }
    // The black hole was tried, and is skipped for --worker-down-for.
    let cluster: serde_json::Value =
        reqwest::get(format!("{}/admin/cluster", gateway.url())).await.unwrap().json().await.unwrap();
    let workers = cluster["workers"].as_array().expect("a worker list");
    let hole_state = workers.iter().find(|w| w["id"] == "hole").map(|w| w["state"].clone());
    assert_eq!(hole_state, Some(json!("down")), "{cluster}");
    drop(hole);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_streams_its_load_to_a_bounded_number_of_watchers() {
    let (_dir, _controller, worker, _gateway) = cluster_with_token(&[]).await;
    // Several connections: one HTTP/2 connection carries a bounded number of streams.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(WorkerClient::new(channel(&worker.url(), Some(TOKEN)).await));
    }
    let mut open = Vec::new();
    let refused = loop {
        assert!(open.len() <= 300, "no limit on WatchLoad streams");
        let client = &mut clients[open.len() % 6];
        match client.watch_load(pb::WatchLoadRequest {}).await {
            Ok(stream) => open.push(stream.into_inner()),
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // 256 in all, the gateway's among them (unless it was reconnecting just then).
    assert!((255..=256).contains(&open.len()), "{} streams opened", open.len());
    let first = open[0].message().await.unwrap().expect("an update");
    assert!(first.full && first.load.is_some(), "the first update is whole: {first:?}");
    // Streams that end give their place back.
    open.clear();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match clients[0].watch_load(pb::WatchLoadRequest {}).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("a stream after the others closed: {status:?}"),
        }
    }
}

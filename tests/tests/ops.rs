//! Operations on real processes: gRPC health and `/ready` through a worker's life (loading,
//! serving, draining), Prometheus metrics from each role, and mutual TLS between the roles.

use std::path::Path;
use std::time::{Duration, Instant};

use herd_proto::v1 as pb;
use herd_tests::cluster::{MODEL, Proc, controller, free_addr, gateway, series, wait_for_workers, worker};
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A gRPC health client for a plain-text server.
async fn health_client(url: &str) -> HealthClient<Channel> {
    let channel = Endpoint::from_shared(url.to_string()).unwrap().connect().await.expect("the gRPC port");
    HealthClient::new(channel)
}

/// The worker's gRPC health for the whole server ("") and for its service.
async fn health(url: &str) -> Vec<ServingStatus> {
    let mut client = health_client(url).await;
    let mut out = Vec::new();
    for service in ["", "herd.v1.Worker"] {
        let status = client.check(HealthCheckRequest { service: service.into() }).await.expect("a health answer");
        out.push(status.into_inner().status());
    }
    out
}

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.expect("an HTTP answer");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Waits until `check` holds, up to `limit`.
async fn eventually<F: AsyncFnMut() -> bool>(limit: Duration, what: &str, mut check: F) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_loading_worker_is_not_serving() {
    let ctl = controller("127.0.0.1:0", "5s");
    // A FIFO nobody writes: opening the model blocks, so the worker stays in its loading state.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stuck.gguf");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let metrics = free_addr();
    let args = ["worker", "--listen", "127.0.0.1:0", "--controller", &ctl.url(), "--metrics-listen", &metrics];
    let mut args: Vec<String> = args.map(String::from).to_vec();
    args.extend(["--model".into(), fifo.display().to_string()]);
    let w = Proc::start(&args);
    assert_eq!(health(&w.url()).await, vec![ServingStatus::NotServing; 2]);
    let (status, _) = get(&format!("http://{metrics}/ready")).await;
    assert_eq!(status, 503, "/ready while loading");
    let (status, _) = get(&format!("http://{metrics}/health")).await;
    assert_eq!(status, 200, "/health (alive) while loading");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_worker_is_not_serving_and_finishes_its_work() {
    let ctl = controller("127.0.0.1:0", "5s");
    let metrics = free_addr();
    let w = worker(&ctl, &["--metrics-listen", &metrics, "--debug-step-delay", "30ms", "--drain-timeout", "60s"]);
    let gw = gateway(&ctl);
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    assert_eq!(health(&w.url()).await, vec![ServingStatus::Serving; 2]);
    assert_eq!(get(&format!("http://{metrics}/ready")).await.0, 200);

    // Two streams: the worker exits as soon as its last sequence ends, so its final counts can only
    // be scraped while the long one still runs.
    let stream = |max_tokens: u32| {
        let body = json!({"model": MODEL, "prompt": "Tell a long story:", "max_tokens": max_tokens,
                          "temperature": 0, "ignore_eos": true, "stream": true});
        let url = format!("{}/v1/completions", gw.url());
        tokio::spawn(async move {
            let resp = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            resp.text().await.expect("the whole stream")
        })
    };
    let short = stream(40);
    let long = stream(300);
    let metrics_url = format!("http://{metrics}/metrics");
    eventually(Duration::from_secs(30), "the worker reporting two running sequences", async || {
        series(&get(&metrics_url).await.1, "herd_worker_running_sequences ") == Some(2.0)
    })
    .await;
    w.signal(libc::SIGTERM);
    eventually(Duration::from_secs(10), "NOT_SERVING after SIGTERM", async || {
        health(&w.url()).await == vec![ServingStatus::NotServing; 2]
    })
    .await;
    assert_eq!(get(&format!("http://{metrics}/ready")).await.0, 503, "/ready while draining");
    let text = short.await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "the drained request did not finish: {text}");
    let scraped = get(&metrics_url).await.1;
    assert_eq!(series(&scraped, "herd_worker_requests_total{result=\"ok\"}"), Some(2.0), "{scraped}");
    let generated = series(&scraped, "herd_worker_generated_tokens_total").unwrap_or(0.0);
    assert!((40.0..340.0).contains(&generated), "{scraped}");
    let text = long.await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "the long drained request did not finish: {text}");
    // The gateway accounts a stream when its body is dropped, just after the last event went out.
    let gateway_metrics = format!("{}/metrics", gw.url());
    eventually(Duration::from_secs(10), "the gateway counting both streams' tokens", async || {
        series(&get(&gateway_metrics).await.1, "herd_gateway_completion_tokens_total") == Some(340.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_exports_registry_metrics() {
    let metrics = free_addr();
    let ctl = Proc::start(
        &["controller", "--listen", "127.0.0.1:0", "--heartbeat-ttl", "1s", "--metrics-listen", &metrics]
            .map(String::from),
    );
    let mut client = pb::controller_client::ControllerClient::connect(ctl.url()).await.unwrap();
    let info = pb::WorkerInfo {
        worker_id: "w1".into(),
        address: "http://127.0.0.1:9".into(),
        models: vec!["m".into()],
        context_length: 2048,
        max_batch_size: 1,
        ..Default::default()
    };
    let register = pb::RegisterWorkerRequest { info: Some(info), load: None };
    let lease = client.register_worker(register).await.expect("registered").into_inner().lease;
    client.heartbeat(pb::HeartbeatRequest { worker_id: "w1".into(), load: None, lease }).await.expect("a heartbeat");
    let unknown = pb::HeartbeatRequest { worker_id: "nobody".into(), load: None, lease: "x".into() };
    assert!(client.heartbeat(unknown).await.is_err());
    let url = format!("http://{metrics}/metrics");
    // No more heartbeats: the worker expires after its 1 s TTL.
    eventually(Duration::from_secs(10), "the silent worker expiring", async || {
        series(&get(&url).await.1, "herd_controller_expiries_total") == Some(1.0)
    })
    .await;
    let text = get(&url).await.1;
    assert_eq!(series(&text, "herd_controller_registrations_total{result=\"ok\"}"), Some(1.0), "{text}");
    assert_eq!(series(&text, "herd_controller_heartbeats_total{result=\"ok\"}"), Some(1.0), "{text}");
    assert_eq!(series(&text, "herd_controller_heartbeats_total{result=\"unknown\"}"), Some(1.0), "{text}");
    assert_eq!(series(&text, "herd_controller_etcd_errors_total"), Some(0.0), "{text}");
    let health = health_client(&ctl.url()).await.check(HealthCheckRequest::default()).await;
    assert_eq!(health.unwrap().into_inner().status(), ServingStatus::Serving);
}

/// `--tls-*` flags for the certificate `name` in `dir`.
fn tls_flags(dir: &Path, name: &str) -> Vec<String> {
    let path = |f: String| dir.join(f).display().to_string();
    vec![
        "--tls-cert".into(),
        path(format!("{name}.pem")),
        "--tls-key".into(),
        path(format!("{name}-key.pem")),
        "--tls-ca".into(),
        path("ca.pem".into()),
    ]
}

/// A gRPC channel to `url` trusting `ca_dir`'s CA, presenting the certificate `name` of the
/// directory `identity` (none when `None`).
async fn channel(
    url: &str,
    ca_dir: &Path,
    identity: Option<(&Path, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let read = |dir: &Path, f: &str| std::fs::read(dir.join(f)).unwrap();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca_dir, "ca.pem")));
    if let Some((dir, name)) = identity {
        tls =
            tls.identity(Identity::from_pem(read(dir, &format!("{name}.pem")), read(dir, &format!("{name}-key.pem"))));
    }
    Endpoint::from_shared(url.to_string())?.tls_config(tls)?.connect().await
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_admits_only_peers_with_a_cluster_certificate_and_binds_worker_ids() {
    let usage = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n";
    // The gateway's and controller's certificate names no worker; a worker's names the ids it may
    // register (`*` ends a pattern).
    let node = ("node", "127.0.0.1", usage);
    let worker_usage =
        "subjectAltName=IP:127.0.0.1,URI:urn:herd:worker:good-*\nextendedKeyUsage=serverAuth,clientAuth\n";
    let worker_cert = ("worker", "127.0.0.1", worker_usage);
    let cluster = tempfile::tempdir().unwrap();
    herd_tests::certs::issue(cluster.path(), &[node, worker_cert]);
    // Same names, another CA: what a stranger could make.
    let rogue = tempfile::tempdir().unwrap();
    herd_tests::certs::issue(rogue.path(), &[node, worker_cert]);

    let mut args: Vec<String> = ["controller", "--listen", "127.0.0.1:0"].map(String::from).to_vec();
    args.extend(tls_flags(cluster.path(), "node"));
    let ctl = Proc::start(&args);
    let ctl_url = format!("https://{}", ctl.addr);
    let worker_tls = tls_flags(cluster.path(), "worker");
    let mut worker_args: Vec<&str> = worker_tls.iter().map(String::as_str).collect();
    worker_args.extend(["--worker-id", "good-1"]);
    let _w = herd_tests::cluster::worker_of(&ctl_url, &worker_args);
    let mut args: Vec<String> =
        ["gateway", "--listen", "127.0.0.1:0", "--controller", &ctl_url].map(String::from).to_vec();
    args.extend(tls_flags(cluster.path(), "node"));
    let gw = Proc::start(&args);
    // The whole path runs over mutual TLS: gateway → controller, worker → controller, gateway → worker.
    wait_for_workers(&gw, 1, Duration::from_secs(120)).await;
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0});
    let resp = reqwest::Client::new().post(format!("{}/v1/completions", gw.url())).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{}", resp.text().await.unwrap());

    // A worker with a certificate from another CA never gets registered.
    let rogue_tls = tls_flags(rogue.path(), "worker");
    let mut rogue_args: Vec<&str> = rogue_tls.iter().map(String::as_str).collect();
    rogue_args.extend(["--worker-id", "good-2"]);
    let _stranger = herd_tests::cluster::worker_of(&ctl_url, &rogue_args);
    let register = |id: &str| {
        let info = pb::WorkerInfo {
            worker_id: id.into(),
            address: "https://127.0.0.1:9".into(),
            models: vec![MODEL.into()],
            context_length: 2048,
            max_batch_size: 1,
            ..Default::default()
        };
        pb::RegisterWorkerRequest { info: Some(info), load: None }
    };
    // A client that trusts the controller but has no certificate, or a stranger's, is refused.
    for identity in [None, Some((rogue.path(), "worker"))] {
        let refused = match channel(&ctl_url, cluster.path(), identity).await {
            Ok(ch) => {
                pb::controller_client::ControllerClient::new(ch).register_worker(register("good-3")).await.is_err()
            }
            Err(_) => true,
        };
        assert!(refused, "a client with certificate {identity:?} registered a worker");
    }
    // Cluster certificates that do not name the id: the gateway's (no worker at all), and a
    // worker's trying an id outside its pattern. Each is PermissionDenied, also for heartbeats
    // and deregistrations of the live worker.
    for (name, id) in [("node", "good-3"), ("worker", "intruder")] {
        let ch =
            channel(&ctl_url, cluster.path(), Some((cluster.path(), name))).await.expect("a cluster member connects");
        let mut client = pb::controller_client::ControllerClient::new(ch);
        let err = client.register_worker(register(id)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{name} registering {id}: {err:?}");
        let wanted = if name == "node" { "only a worker certificate" } else { "good-*" };
        assert!(err.message().contains(wanted), "{}", err.message());
    }
    let ch = channel(&ctl_url, cluster.path(), Some((cluster.path(), "node"))).await.unwrap();
    let mut client = pb::controller_client::ControllerClient::new(ch);
    let beat = pb::HeartbeatRequest { worker_id: "good-1".into(), load: None, lease: "guess".into() };
    assert_eq!(client.heartbeat(beat).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let gone = pb::DeregisterRequest { worker_id: "good-1".into(), lease: "guess".into() };
    assert_eq!(client.deregister(gone).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    // Give the stranger time to try (it retries with backoff), then count who got in.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let workers =
        client.list_workers(pb::ListWorkersRequest::default()).await.expect("ListWorkers").into_inner().workers;
    let ids: Vec<_> = workers.iter().filter_map(|w| w.info.as_ref()).map(|i| i.worker_id.as_str()).collect();
    assert_eq!(ids, ["good-1"], "only the worker with a cluster certificate naming its id registers");
}

/// `GET path` over TLS to `addr`, trusting only `ca`; the raw HTTP/1.1 response.
async fn https_get(addr: &str, ca: &Path, path: &str) -> std::io::Result<String> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: herd\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_serves_https_and_keys_guard_it() {
    let certs = tempfile::tempdir().unwrap();
    herd_tests::certs::issue(
        certs.path(),
        &[("gateway", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")],
    );
    let ctl = controller("127.0.0.1:0", "5s");
    let pem = |f: &str| certs.path().join(f).display().to_string();
    let args = ["gateway", "--listen", "127.0.0.1:0", "--controller", &ctl.url(), "--api-key", "sk-test"];
    let mut args: Vec<String> = args.map(String::from).to_vec();
    args.extend(["--http-tls-cert".into(), pem("gateway.pem"), "--http-tls-key".into(), pem("gateway-key.pem")]);
    let gw = Proc::start(&args);
    let ca = certs.path().join("ca.pem");
    let health = https_get(&gw.addr, &ca, "/health").await.expect("an HTTPS answer");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let models = https_get(&gw.addr, &ca, "/v1/models").await.expect("an HTTPS answer");
    assert!(models.starts_with("HTTP/1.1 401"), "no key must be refused over HTTPS too: {models}");
    // herd's own clients speak HTTPS: `herd chat --url https://…` trusting the CA it is given.
    let _worker = worker(&ctl, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !https_get(&gw.addr, &ca, "/ready").await.is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "the gateway never saw the worker");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let url = format!("https://{}", gw.addr);
    let chat = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(herd_tests::herd_bin());
        cmd.args(["chat", "--url", &url, "--api-key", "sk-test", "--prompt", "Who wrote the play Hamlet?"]);
        cmd.args(["--temperature", "0", "--max-tokens", "8"]).args(extra).env_remove("HERD_CA_CERT");
        cmd.output().unwrap()
    };
    let ca_flag = ca.display().to_string();
    let out = chat(&["--ca-cert", &ca_flag]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !stdout.trim().is_empty(), "{stdout}{stderr}");
    let out = chat(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--url"), "a certificate nobody vouches for: {stderr}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::get(format!("http://{}/health", gw.addr)).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success(), "plain HTTP answered on the TLS listener");
    // A bad key file is a clear startup error naming the flag.
    let out = std::process::Command::new(herd_tests::herd_bin())
        .args(["gateway", "--controller", &ctl.url(), "--listen", "127.0.0.1:0", "--api-keys"])
        .arg(certs.path().join("missing-keys"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--api-keys"), "{stderr}");
}

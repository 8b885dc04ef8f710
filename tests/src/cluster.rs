//! Real herd processes on 127.0.0.1 with OS-chosen ports: a controller, workers, a gateway.
//! Every process is killed when its handle drops, so a failing test leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{herd_bin, test_model};

/// One running `herd` process and the address it printed.
pub struct Proc {
    child: Child,
    /// The `host:port` from its "listening on" line.
    pub addr: String,
}

impl Proc {
    /// Starts `herd <args>` and waits (up to 2 minutes) for its "listening on" line.
    pub fn start(args: &[String]) -> Proc {
        Self::start_until(args, "listening on ")
    }

    /// Starts `herd <args>` and waits (up to 2 minutes) for a stdout line containing `marker`;
    /// what follows the marker is the address.
    pub fn start_until(args: &[String], marker: &'static str) -> Proc {
        let mut child = Command::new(herd_bin())
            .args(args)
            .env("HERD_LOG", std::env::var("HERD_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start herd");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.split(marker).nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("herd {args:?} exited or printed no {marker:?} line within 2 minutes (its stderr is above)");
            }
        };
        Proc { child, addr }
    }

    /// `http://host:port` (the address as printed when it already is a URL).
    pub fn url(&self) -> String {
        if self.addr.contains("://") { self.addr.clone() } else { format!("http://{}", self.addr) }
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`, `libc::SIGKILL`).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free 127.0.0.1 address, for a `--metrics-listen` (whose address is not printed on stdout).
pub fn free_addr() -> String {
    // Below Linux's ephemeral range (32768-60999 by default): a port the OS hands out for
    // `bind(0)` or an outgoing connection could be taken between this check and the child's bind.
    // The start differs per process and call, so concurrent tests seldom try the same port.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed =
        std::process::id().wrapping_mul(7919).wrapping_add(NEXT.fetch_add(97, std::sync::atomic::Ordering::Relaxed));
    for i in 0..12_000u32 {
        let port = 20_000 + seed.wrapping_add(i) % 12_000;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().expect("its address").to_string();
        }
    }
    panic!("no free port in 20000-31999");
}

/// The value of the first line of Prometheus text that starts with `prefix`
/// (e.g. `herd_worker_requests_total{result="ok"}`).
pub fn series(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// The model name workers register in these tests.
pub const MODEL: &str = "smollm2";

/// A worker's registration for `id` at `address`, serving [`MODEL`], as a test sends it by hand.
pub fn registration(id: &str, address: &str) -> herd_proto::v1::RegisterWorkerRequest {
    let info = herd_proto::v1::WorkerInfo {
        worker_id: id.into(),
        address: address.into(),
        models: vec![MODEL.into()],
        context_length: 2048,
        max_batch_size: 1,
        max_queue: 1,
        tp_size: 1,
        devices: vec!["cpu".into()],
    };
    herd_proto::v1::RegisterWorkerRequest { info: Some(info), load: None }
}

/// `herd controller` on an OS-chosen port (or `listen`), with a short TTL.
pub fn controller(listen: &str, ttl: &str) -> Proc {
    Proc::start(&["controller", "--listen", listen, "--heartbeat-ttl", ttl].map(String::from))
}

/// `herd controller --store etcd` on `etcd_url` (records under the default `/herd` prefix).
pub fn controller_on_etcd(listen: &str, ttl: &str, etcd_url: &str) -> Proc {
    controller_on_etcd_with(listen, ttl, etcd_url, &[])
}

/// [`controller_on_etcd`] with `extra` flags.
pub fn controller_on_etcd_with(listen: &str, ttl: &str, etcd_url: &str, extra: &[&str]) -> Proc {
    let args =
        ["controller", "--listen", listen, "--heartbeat-ttl", ttl, "--store", "etcd", "--etcd-endpoints", etcd_url];
    Proc::start(&args.iter().chain(extra).map(|s| s.to_string()).collect::<Vec<_>>())
}

/// `herd worker` serving the test model as [`MODEL`], one compute thread, plus `extra` flags.
pub fn worker(controller: &Proc, extra: &[&str]) -> Proc {
    worker_of(&controller.url(), extra)
}

/// [`worker`] registering with `controllers` (comma-separated URLs).
pub fn worker_of(controllers: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> =
        ["worker", "--listen", "127.0.0.1:0", "--threads", "1", "--model-name", MODEL].map(String::from).to_vec();
    args.extend(["--model".into(), test_model().display().to_string(), "--controller".into(), controllers.into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start(&args)
}

/// `herd gateway` watching `controller`.
pub fn gateway(controller: &Proc) -> Proc {
    gateway_of(&controller.url())
}

/// `herd gateway` watching `controllers` (comma-separated URLs).
pub fn gateway_of(controllers: &str) -> Proc {
    Proc::start(&["gateway", "--listen", "127.0.0.1:0", "--controller", controllers].map(String::from))
}

/// Waits until the gateway lists `n` workers for [`MODEL`] (its /health count), up to `limit`.
pub async fn wait_for_workers(gateway: &Proc, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    let client = reqwest::Client::new();
    loop {
        let health: Option<serde_json::Value> = match client.get(format!("{}/health", gateway.url())).send().await {
            Ok(resp) => resp.json().await.ok(),
            Err(_) => None,
        };
        if health.as_ref().and_then(|h| h["workers"].as_u64()) == Some(n as u64) {
            return;
        }
        assert!(Instant::now() < deadline, "the gateway did not see {n} workers within {limit:?}: {health:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the gateway has every worker's tokenizer for kv-aware routing, up to `limit`: it is
/// read once, after a worker joins, and takes the gateway tens of MiB. `key`: its API key, if any.
pub async fn wait_for_prompt_encoding(gateway: &Proc, key: Option<&str>, limit: Duration) {
    let deadline = Instant::now() + limit;
    let client = reqwest::Client::new();
    loop {
        let mut request = client.get(format!("{}/admin/cluster", gateway.url()));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let cluster: Option<serde_json::Value> = match request.send().await {
            Ok(resp) => resp.json().await.ok(),
            Err(_) => None,
        };
        let workers = cluster.as_ref().and_then(|c| c["workers"].as_array());
        if workers.is_some_and(|w| !w.is_empty() && w.iter().all(|w| w["encodes_prompts"] == true)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not read the workers' tokenizers within {limit:?}: {cluster:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

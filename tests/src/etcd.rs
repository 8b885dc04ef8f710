//! A throwaway etcd server for the registry tests: free 127.0.0.1 ports, a temporary data dir,
//! stopped (and its data removed) when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd.
pub struct Etcd {
    child: Option<Child>,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    tls: bool,
}

/// The etcd binary: `$ETCD_BIN`, else `etcd` on PATH (Debian's `etcd-server`, which `.ci/run` installs).
fn etcd_bin() -> PathBuf {
    let bin = PathBuf::from(std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into()));
    let found = Command::new(&bin).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        matches!(found, Ok(s) if s.success()),
        "etcd is missing: {} did not run. Install Debian's etcd-server (scripts/setup.sh does) or set ETCD_BIN",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

impl Etcd {
    /// Starts etcd and waits (up to 30 s) until it accepts connections.
    pub fn start() -> Etcd {
        Self::launch(false)
    }

    /// Starts etcd serving clients over TLS and requiring client certificates; [`Etcd::pem`]
    /// names the CA, client certificate and key (made with the `openssl` command).
    pub fn start_tls() -> Etcd {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            data: tempfile::tempdir().expect("a temporary data dir"),
            client_port: free_port(),
            peer_port: free_port(),
            tls,
        };
        if tls {
            make_certificates(etcd.data.path());
        }
        etcd.resume();
        etcd
    }

    /// A PEM file of a TLS etcd: `ca.pem`, `client.pem` or `client-key.pem`.
    pub fn pem(&self, name: &str) -> PathBuf {
        self.data.path().join(name)
    }

    /// `http(s)://127.0.0.1:PORT`, for `--etcd-endpoints`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (its data stays, for [`Etcd::resume`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data, as after an outage.
    pub fn resume(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = self.url();
        let mut cmd = Command::new(etcd_bin());
        if self.tls {
            cmd.arg("--cert-file")
                .arg(self.pem("server.pem"))
                .arg("--key-file")
                .arg(self.pem("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(self.pem("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "herd-test", "--data-dir"])
            .arg(self.data.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("herd-test={peer}"), "--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen on {} within 30 s", self.url());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn make_certificates(dir: &std::path::Path) {
    crate::certs::issue(
        dir,
        &[
            ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
            ("client", "herd-controller", "extendedKeyUsage=clientAuth\n"),
        ],
    );
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

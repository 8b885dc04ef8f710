//! Mutual TLS between gateway, controller and workers: each presents a certificate signed by the
//! cluster's CA and accepts only peers that do the same.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::OpsError;

/// The `--tls-*` flags of every role.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate this process presents to its peers (turns on mutual TLS inside the cluster).
    #[arg(long, env = "HERD_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "HERD_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that sign the cluster's certificates; peers without one are refused.
    #[arg(long, env = "HERD_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Name expected in peers' certificates, when it is not the host in their URL (e.g. pod IPs).
    #[arg(long, env = "HERD_TLS_SERVER_NAME", requires = "tls_cert")]
    pub tls_server_name: Option<String>,
}

/// Loaded cluster TLS material: this process's identity and the CA it trusts.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    identity: Identity,
    ca: Certificate,
    server_name: Option<String>,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, OpsError> {
    let file = |msg: String| OpsError::File { flag, path: path.display().to_string(), msg };
    let bytes = std::fs::read(path).map_err(|e| file(e.to_string()))?;
    // tonic only parses PEM when the first connection arrives; a wrong file must fail at start.
    let text = String::from_utf8_lossy(&bytes);
    let wanted = if flag == "--tls-key" { "PRIVATE KEY-----" } else { "-----BEGIN CERTIFICATE-----" };
    if !text.contains(wanted) {
        return Err(file(format!("not a PEM file with a {}", wanted.trim_matches('-').to_lowercase())));
    }
    Ok(bytes)
}

impl TlsArgs {
    /// The TLS material, or `None` when mutual TLS is off.
    pub fn load(&self) -> Result<Option<ClusterTls>, OpsError> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else {
            return Ok(None);
        };
        Ok(Some(ClusterTls {
            identity: Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?),
            ca: Certificate::from_pem(read("--tls-ca", ca)?),
            server_name: self.tls_server_name.clone(),
        }))
    }
}

impl ClusterTls {
    /// Server side: present our certificate and require a client certificate signed by the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.ca.clone())
    }

    /// Client side: trust only the CA and present our certificate.
    pub fn client(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone());
        match &self.server_name {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        }
    }
}

/// Applies the cluster TLS settings (if any) to the endpoint of a peer's URL: with TLS on, the
/// URL must be `https://`, without it `http://`, so a half-configured cluster fails loudly.
pub fn secure(endpoint: Endpoint, tls: Option<&ClusterTls>) -> Result<Endpoint, OpsError> {
    let uri = endpoint.uri().to_string();
    match (tls, endpoint.uri().scheme_str().unwrap_or("")) {
        (Some(tls), "https") => {
            endpoint.tls_config(tls.client()).map_err(|e| OpsError::Url(format!("{uri}: TLS setup failed: {e}")))
        }
        (None, "http") => Ok(endpoint),
        (Some(_), _) => Err(OpsError::Url(format!("{uri}: with --tls-cert, peers are dialed at https:// URLs"))),
        (None, _) => Err(OpsError::Url(format!("{uri}: an https:// peer needs --tls-cert, --tls-key and --tls-ca"))),
    }
}

/// The URL scheme peers use to reach a server with these settings.
pub fn scheme(tls: Option<&ClusterTls>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

/// The URI prefix of a certificate's subject alternative names that makes it a worker
/// certificate: `urn:herd:worker:<id>` lets it register that id; a trailing `*` matches any rest.
pub const WORKER_URI_PREFIX: &str = "urn:herd:worker:";

/// The worker ids a peer's certificate names, read from its `urn:herd:worker:` URI names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerIds(Vec<String>);

impl WorkerIds {
    /// The ids named by a DER certificate; empty when it names none (a gateway's, a
    /// controller's) or cannot be parsed.
    pub fn of_der(der: &[u8]) -> Self {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Self::default() };
        let Ok(Some(names)) = cert.subject_alternative_name() else { return Self::default() };
        let ids = names.value.general_names.iter().filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(WORKER_URI_PREFIX),
            _ => None,
        });
        Self(ids.filter(|id| !id.is_empty()).map(str::to_owned).collect())
    }

    /// The ids named by the certificate a gRPC peer presented; `None` when it presented none
    /// (mutual TLS is off).
    pub fn of_peer<T>(request: &tonic::Request<T>) -> Option<Self> {
        let chain = request.peer_certs()?;
        Some(chain.first().map_or_else(Self::default, |leaf| Self::of_der(leaf)))
    }

    /// Whether the certificate names `worker_id` (exactly, or by a pattern ending in `*`).
    pub fn permits(&self, worker_id: &str) -> bool {
        self.0.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => worker_id.starts_with(prefix),
            None => pattern == worker_id,
        })
    }

    /// Whether the certificate names any worker id at all, i.e. belongs to a worker.
    pub fn is_worker(&self) -> bool {
        !self.0.is_empty()
    }

    /// The patterns, for error messages.
    pub fn patterns(&self) -> &[String] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_without_flags_and_errors_name_the_flag() {
        assert!(TlsArgs::default().load().unwrap().is_none());
        let dir = std::env::temp_dir().join(format!("herd-ops-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").unwrap();
        let key = dir.join("key.pem");
        std::fs::write(&key, "not a key").unwrap();
        let args = TlsArgs {
            tls_cert: Some(cert.clone()),
            tls_key: Some(key.clone()),
            tls_ca: Some(dir.join("missing.pem")),
            tls_server_name: None,
        };
        let err = args.load().unwrap_err().to_string();
        assert!(err.starts_with("--tls-key") && err.contains("not a PEM file"), "{err}");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n").unwrap();
        let err = args.load().unwrap_err().to_string();
        assert!(err.starts_with("--tls-ca") && err.contains("missing.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn worker_ids_come_from_urn_herd_worker_uris() {
        // Made with openssl: SANs DNS:herd.internal, URI:urn:herd:worker:w-1,
        // URI:urn:herd:worker:pool-*, URI:https://example.invalid/x.
        let pem = include_bytes!("../testdata/worker-cert.pem");
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem).unwrap();
        let ids = WorkerIds::of_der(&pem.contents);
        assert_eq!(ids.patterns(), ["w-1", "pool-*"]);
        assert!(ids.is_worker());
        assert!(ids.permits("w-1") && ids.permits("pool-7") && ids.permits("pool-"));
        assert!(!ids.permits("w-10") && !ids.permits("w-") && !ids.permits("other"));
        let none = WorkerIds::of_der(b"not a certificate");
        assert!(!none.is_worker() && !none.permits("w-1"));
    }

    #[test]
    fn the_scheme_must_match_the_settings() {
        let plain = Endpoint::from_static("http://127.0.0.1:7000");
        assert!(secure(plain, None).is_ok());
        let err = secure(Endpoint::from_static("https://127.0.0.1:7000"), None).unwrap_err().to_string();
        assert!(err.contains("--tls-cert"), "{err}");
    }
}

//! The cluster token: the shared secret every gRPC call inside the cluster carries when mutual
//! TLS is off, so that reaching a controller's or worker's port is not enough to use it.
//!
//! Callers send `authorization: Bearer <token>`; servers compare SHA-256 digests in constant
//! time. The gRPC health service stays open: Kubernetes probes cannot send metadata, and it
//! tells nothing but whether the role is serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::OpsError;

/// The environment variable that holds the token itself (instead of a file).
pub const TOKEN_ENV: &str = "HERD_CLUSTER_TOKEN";

/// Tokens shorter than this are refused: they could be guessed.
const MIN_TOKEN_LEN: usize = 16;

/// The cluster token flags of every role that calls another.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TokenArgs {
    /// File holding the cluster token that every gRPC call inside the cluster carries. Not
    /// needed with mutual TLS.
    #[arg(long, env = "HERD_CLUSTER_TOKEN_FILE", conflicts_with = "cluster_token")]
    pub cluster_token_file: Option<PathBuf>,
    /// The cluster token itself; prefer the file or the environment variable, since other users
    /// can read command lines.
    #[arg(long, env = "HERD_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// A token handed over in-process by whatever starts the role (`herd up`); it takes the
    /// place of the file and the environment.
    #[arg(skip)]
    pub given: Option<ClusterToken>,
}

/// The cluster credential flags of a role that serves gRPC (controller, worker).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// The cluster token.
    #[command(flatten)]
    pub token: TokenArgs,
    /// Serve gRPC on a non-loopback address with neither a cluster token nor mutual TLS: anyone
    /// who can reach the port may then register workers and run generations.
    #[arg(long, env = "HERD_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

/// A cluster token, loaded and checked; its value never appears in `Debug` output or logs.
#[derive(Clone)]
pub struct ClusterToken {
    secret: String,
    digest: SecretDigest,
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(..)")
    }
}

/// A secret as it is kept to check it later: its SHA-256, compared in constant time, so that what
/// is stored (a store's record, a process's memory) cannot be presented as the secret itself.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretDigest([u8; 32]);

impl std::fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretDigest(..)")
    }
}

impl SecretDigest {
    /// The digest of `secret`.
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// Whether two digests are the same, in time independent of where they differ.
    pub fn matches(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }

    /// Its bytes, as a store writes them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A fresh secret of 256 random bits, in hex.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ClusterToken {
    /// A token from its text (surrounding whitespace dropped); `source` names where it came from
    /// in the error.
    pub fn new(text: &str, source: &str) -> Result<Self, OpsError> {
        let secret = text.trim();
        if secret.len() < MIN_TOKEN_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(OpsError::Token(format!(
                "{source}: a cluster token is at least {MIN_TOKEN_LEN} printable ASCII characters without spaces \
                 (e.g. `openssl rand -hex 32`)"
            )));
        }
        Ok(Self { secret: secret.to_owned(), digest: SecretDigest::of(secret) })
    }

    /// A fresh random token (256 bits, hex), for a cluster started by one command.
    pub fn generate() -> Self {
        let secret = random_secret();
        Self { digest: SecretDigest::of(&secret), secret }
    }

    /// The token's text, to hand to a child process; never log it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether a call's metadata carries this token.
    pub fn accepts(&self, metadata: &MetadataMap) -> bool {
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        SecretDigest::of(presented).matches(&self.digest)
    }

    fn header(&self) -> AsciiMetadataValue {
        format!("Bearer {}", self.secret).parse().expect("a token is printable ASCII")
    }
}

impl TokenArgs {
    /// The token given in-process, else from `--cluster-token-file` or `--cluster-token`; `None`
    /// when there is none.
    pub fn load(&self) -> Result<Option<ClusterToken>, OpsError> {
        if let Some(token) = &self.given {
            return Ok(Some(token.clone()));
        }
        match (&self.cluster_token_file, self.cluster_token.as_deref().filter(|t| !t.is_empty())) {
            (Some(_), Some(_)) => Err(OpsError::Token(format!(
                "--cluster-token-file and --cluster-token ({TOKEN_ENV}) are both set; give the token one way"
            ))),
            (Some(path), None) => read_token(path).map(Some),
            (None, Some(text)) => ClusterToken::new(text, "--cluster-token (HERD_CLUSTER_TOKEN)").map(Some),
            (None, None) => Ok(None),
        }
    }
}

fn read_token(path: &Path) -> Result<ClusterToken, OpsError> {
    let flag = "--cluster-token-file";
    let text = std::fs::read_to_string(path).map_err(|e| OpsError::File {
        flag,
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    ClusterToken::new(&text, &format!("{flag} {}", path.display()))
}

impl AuthArgs {
    /// The token a server on `listen` checks, after making sure that it checks something: a
    /// server reachable from other hosts needs the token or mutual TLS (`with_tls`), unless
    /// `--insecure-no-auth` says otherwise.
    pub fn for_server(&self, listen: SocketAddr, with_tls: bool) -> Result<Option<ClusterToken>, OpsError> {
        let token = self.token.load()?;
        if token.is_some() || with_tls {
            return Ok(token);
        }
        if self.insecure_no_auth {
            tracing::warn!(
                %listen,
                "--insecure-no-auth: serving gRPC without a cluster token or mutual TLS; anyone who can reach \
                 this port can register workers, steer traffic and run generations"
            );
        } else if !listen.ip().is_loopback() {
            return Err(OpsError::Token(format!(
                "refusing to serve gRPC on {listen} without a cluster credential: set --cluster-token-file (or \
                 {TOKEN_ENV}) on every role, or mutual TLS (--tls-cert, --tls-key, --tls-ca), or pass \
                 --insecure-no-auth to accept calls from anyone who can reach the port"
            )));
        }
        Ok(None)
    }
}

/// Server side: refuses calls without the cluster token (lets every call through when there is
/// no token to check: mutual TLS, loopback, or `--insecure-no-auth`).
#[derive(Clone, Debug)]
pub struct RequireToken(pub Option<ClusterToken>);

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &self.0 {
            Some(token) if !token.accepts(request.metadata()) => {
                let peer = request.remote_addr().map_or_else(|| "unknown".into(), |a| a.to_string());
                tracing::warn!(%peer, "refused a gRPC call without the cluster token");
                Err(Status::unauthenticated(
                    "missing or wrong cluster token: give the caller the cluster's token with \
                     --cluster-token-file or HERD_CLUSTER_TOKEN",
                ))
            }
            _ => Ok(request),
        }
    }
}

/// Client side: adds the cluster token (if any) to every call.
#[derive(Clone, Debug)]
pub struct PresentToken(Option<AsciiMetadataValue>);

impl PresentToken {
    /// Presents `token`, or nothing.
    pub fn new(token: Option<&ClusterToken>) -> Self {
        Self(token.map(ClusterToken::header))
    }
}

impl Interceptor for PresentToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.0 {
            request.metadata_mut().insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the cluster token.
pub type AuthChannel = InterceptedService<Channel, PresentToken>;

/// Wraps `channel` so that its calls carry `token`.
pub fn present(channel: Channel, token: Option<&ClusterToken>) -> AuthChannel {
    InterceptedService::new(channel, PresentToken::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_with(header: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        request
    }

    #[test]
    fn only_the_exact_token_passes() {
        let token = ClusterToken::new("  0123456789abcdef0123\n", "test").unwrap();
        let mut check = RequireToken(Some(token.clone()));
        assert!(check.call(call_with(Some("Bearer 0123456789abcdef0123"))).is_ok());
        for wrong in [None, Some("Bearer 0123456789abcdef012"), Some("0123456789abcdef0123"), Some("Bearer ")] {
            let err = check.call(call_with(wrong)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
        // What a client presents is what a server accepts.
        let presented = PresentToken::new(Some(&token)).call(Request::new(())).unwrap();
        assert!(token.accepts(presented.metadata()));
        assert!(RequireToken(None).call(call_with(None)).is_ok(), "no token configured: nothing to check");
        assert_eq!(format!("{token:?}"), "ClusterToken(..)", "Debug never shows the secret");
    }

    #[test]
    fn weak_tokens_are_refused_and_generated_ones_are_strong() {
        for weak in ["", "short", "has spaces in the middle of it"] {
            let err = ClusterToken::new(weak, "--cluster-token").unwrap_err().to_string();
            assert!(err.starts_with("--cluster-token"), "{err}");
        }
        let (a, b) = (ClusterToken::generate(), ClusterToken::generate());
        assert_eq!(a.secret().len(), 64);
        assert_ne!(a.secret(), b.secret());
        assert!(ClusterToken::new(a.secret(), "generated").is_ok());
    }

    #[test]
    fn a_reachable_server_needs_a_credential() {
        let public: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let none = AuthArgs::default();
        let err = none.for_server(public, false).unwrap_err().to_string();
        assert!(err.contains("--cluster-token-file") && err.contains("--insecure-no-auth"), "{err}");
        assert!(none.for_server(local, false).unwrap().is_none(), "loopback only: allowed");
        assert!(none.for_server(public, true).unwrap().is_none(), "mutual TLS is a credential");
        let insecure = AuthArgs { insecure_no_auth: true, ..AuthArgs::default() };
        assert!(insecure.for_server(public, false).unwrap().is_none());
    }

    #[test]
    fn token_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "fedcba9876543210fedcba\n").unwrap();
        let args = TokenArgs { cluster_token_file: Some(path.clone()), ..TokenArgs::default() };
        let token = args.load().unwrap().unwrap();
        assert_eq!(token.secret(), "fedcba9876543210fedcba");
        std::fs::write(&path, "weak\n").unwrap();
        let err = args.load().unwrap_err().to_string();
        assert!(err.starts_with("--cluster-token-file"), "{err}");
        let missing = TokenArgs { cluster_token_file: Some(dir.path().join("missing")), ..TokenArgs::default() };
        assert!(missing.load().unwrap_err().to_string().starts_with("--cluster-token-file"));
        let both = TokenArgs { cluster_token: Some("fedcba9876543210fedcba".into()), ..args };
        assert!(both.load().unwrap_err().to_string().contains("both"));
        let given = TokenArgs { given: Some(ClusterToken::generate()), ..both };
        assert!(given.load().unwrap().is_some(), "a token given in-process takes the place of the flags");
    }
}

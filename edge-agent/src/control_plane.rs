//! The agent's client of the operator's agent API (`/agent/v1`): long-poll the
//! node's assignment, download artifacts (resuming after a broken connection) and
//! send reports. Every call carries the projected service-account token, read
//! afresh each time because the kubelet rotates it.

use crate::cache::{Cache, CacheError};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, ETAG, IF_NONE_MATCH, RANGE};
use shoal_api::agent_protocol::{self, AgentReport, AssignedModel, Assignment};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while a download streams before it counts as broken.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed beyond the long-poll wait for the answer to arrive.
const POLL_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("cannot reach the control plane at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error(
        "cannot read the service-account token {path}: {source}; is the projected token volume mounted?"
    )]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the control plane sent an assignment this agent cannot read: {0}")]
    BadAssignment(String),
    #[error("the assignment is for node {actual}, not {expected}")]
    WrongNode { expected: String, actual: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot configure the HTTP client: {0}")]
    Client(String),
    #[error(
        "{url} sent more than the {limit} bytes {bound}; the download was stopped and its partial file removed"
    )]
    TooLarge {
        url: String,
        limit: u64,
        bound: &'static str,
    },
    #[error("--control-plane {url:?}: {reason}")]
    InsecureUrl { url: String, reason: String },
}

impl ControlPlaneError {
    /// Whether a new try in a second may succeed: the control plane answered 503
    /// (a replica that is not the leader, or one still starting) or could not be
    /// reached.
    pub fn is_worth_retrying_soon(&self) -> bool {
        matches!(
            self,
            ControlPlaneError::Status { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE
        ) || matches!(self, ControlPlaneError::Unreachable { .. })
    }

    /// Whether the control plane sent bytes that cannot be the artifact (the
    /// wrong digest, or more than it may be): the same download would fail the
    /// same way, so it waits longer before the next attempt.
    pub fn is_bad_artifact(&self) -> bool {
        matches!(
            self,
            ControlPlaneError::Cache(CacheError::DigestMismatch { .. })
                | ControlPlaneError::TooLarge { .. }
        )
    }
}

/// The result of one long-poll.
#[derive(Debug, PartialEq)]
pub enum Poll {
    Changed {
        assignment: Assignment,
        etag: Option<String>,
    },
    Unchanged,
}

pub struct ControlPlane {
    base_url: String,
    node: String,
    token_file: Option<PathBuf>,
    /// The CA file (`--control-plane-ca`), looked at again at most every
    /// [`CA_CHECK_EVERY`]: when the operator's CA rotates, the kubelet swaps the
    /// mounted ConfigMap's file, and the client is rebuilt to trust the new one.
    ca_file: Option<PathBuf>,
    client: std::sync::Mutex<TrustedClient>,
}

/// The HTTP client, and the version of the CA file it was built from.
struct TrustedClient {
    client: reqwest::Client,
    ca_stamp: FileStamp,
    checked: std::time::Instant,
}

/// What identifies one version of a file: its size and modification time.
type FileStamp = Option<(u64, Option<std::time::SystemTime>)>;

fn file_stamp(path: &Path) -> FileStamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

/// How often the CA file is looked at for a change, at most.
pub const CA_CHECK_EVERY: Duration = Duration::from_secs(1);

impl ControlPlane {
    /// `ca_file` names the PEM CA (or bundle of CAs) that signed the operator's
    /// serving certificate; when it is given the client trusts it only, not the
    /// public roots built into the agent. Without it, the public roots only.
    pub fn new(
        base_url: &str,
        node: &str,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
    ) -> Result<ControlPlane, ControlPlaneError> {
        check_url(base_url).map_err(|reason| ControlPlaneError::InsecureUrl {
            url: base_url.to_string(),
            reason,
        })?;
        let ca_stamp = ca_file.as_deref().and_then(file_stamp);
        let client = build_client(ca_file.as_deref())?;
        Ok(ControlPlane {
            base_url: base_url.trim_end_matches('/').to_string(),
            node: node.to_string(),
            token_file,
            ca_file,
            client: std::sync::Mutex::new(TrustedClient {
                client,
                ca_stamp,
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// The client to send with: rebuilt first when the CA file changed. A CA file
    /// that does not load (half written) is logged and the client in use kept; the
    /// next check tries again.
    fn client(&self) -> reqwest::Client {
        let mut current = self
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ca_file) = &self.ca_file
            && current.checked.elapsed() >= CA_CHECK_EVERY
        {
            current.checked = std::time::Instant::now();
            let stamp = file_stamp(ca_file);
            if stamp != current.ca_stamp {
                match build_client(Some(ca_file)) {
                    Ok(client) => {
                        tracing::info!(ca = %ca_file.display(), "the control plane's CA file changed; trusting its new contents");
                        current.client = client;
                        current.ca_stamp = stamp;
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        "the control plane's CA file changed but does not load; the CA in use stays trusted"
                    ),
                }
            }
        }
        current.client.clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Sends `request` with the current token.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ControlPlaneError> {
        self.authorized(request)
            .await?
            .send()
            .await
            .map_err(|source| ControlPlaneError::Unreachable {
                url: url.to_string(),
                source,
            })
    }

    async fn authorized(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, ControlPlaneError> {
        let Some(path) = &self.token_file else {
            return Ok(request);
        };
        let token =
            tokio::fs::read_to_string(path)
                .await
                .map_err(|source| ControlPlaneError::Token {
                    path: path.clone(),
                    source,
                })?;
        Ok(request.header(AUTHORIZATION, format!("Bearer {}", token.trim())))
    }

    /// Waits up to `wait` for the node's assignment to differ from `etag`.
    pub async fn poll_assignment(
        &self,
        etag: Option<&str>,
        wait: Duration,
    ) -> Result<Poll, ControlPlaneError> {
        let url = self.url(&agent_protocol::assignment_path(&self.node));
        let mut request = self
            .client()
            .get(&url)
            .query(&[("waitSeconds", wait.as_secs().to_string())])
            .timeout(wait + POLL_GRACE);
        if let Some(etag) = etag {
            request = request.header(IF_NONE_MATCH, etag);
        }
        let response = self.send(request, &url).await?;
        if response.status() == StatusCode::NOT_MODIFIED {
            return Ok(Poll::Unchanged);
        }
        let response = check(response, &url).await?;
        let etag = response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ControlPlaneError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let assignment: Assignment = serde_json::from_slice(&bytes)
            .map_err(|e| ControlPlaneError::BadAssignment(e.to_string()))?;
        if assignment.node != self.node {
            return Err(ControlPlaneError::WrongNode {
                expected: self.node.clone(),
                actual: assignment.node,
            });
        }
        Ok(Poll::Changed { assignment, etag })
    }

    /// Downloads a model's artifact into the cache and verifies it. A partial file
    /// from an earlier broken attempt is resumed with a `Range` request. A
    /// download longer than the size the assignment declares (or, when it
    /// declares none, than `cache_limit`) is stopped and its partial file removed.
    pub async fn download(
        &self,
        model: &AssignedModel,
        cache: &Cache,
        cache_limit: u64,
    ) -> Result<PathBuf, ControlPlaneError> {
        if cache.read_artifact(&model.artifact_digest)?.is_some() {
            return Ok(cache.artifact_path(&model.artifact_digest)?);
        }
        let partial = cache.partial_path(&model.artifact_digest)?;
        let offset = tokio::fs::metadata(&partial)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if model.artifact_bytes > 0 && offset >= model.artifact_bytes {
            // Complete but not yet verified (the agent stopped in between).
            return Ok(cache.commit_download(&model.artifact_digest)?);
        }
        let url = self.url(&model.download_path);
        let mut request = self.client().get(&url);
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let response = self.send(request, &url).await?;
        let resumed = response.status() == StatusCode::PARTIAL_CONTENT;
        let response = check(response, &url).await?;
        let io_error = |source| CacheError::Io {
            what: "cannot write",
            path: partial.clone(),
            source,
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(&partial)
            .await
            .map_err(io_error)?;
        if resumed {
            tracing::info!(model = %model.name, version = %model.version, offset, "resuming download");
        }
        let (limit, bound) = if model.artifact_bytes > 0 {
            (model.artifact_bytes, "the assignment declares")
        } else {
            (cache_limit, "of the cache limit")
        };
        let mut written = if resumed { offset } else { 0 };
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| ControlPlaneError::Unreachable {
                url: url.clone(),
                source,
            })?;
            written = written.saturating_add(chunk.len() as u64);
            if written > limit {
                drop(file);
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(ControlPlaneError::TooLarge { url, limit, bound });
            }
            file.write_all(&chunk).await.map_err(io_error)?;
        }
        file.sync_all().await.map_err(io_error)?;
        drop(file);
        Ok(cache.commit_download(&model.artifact_digest)?)
    }

    pub async fn report(&self, report: &AgentReport) -> Result<(), ControlPlaneError> {
        let url = self.url(&agent_protocol::report_path(&self.node));
        let request = self
            .client()
            .post(&url)
            .json(report)
            .timeout(CONNECT_TIMEOUT + READ_TIMEOUT);
        let response = self.send(request, &url).await?;
        check(response, &url).await?;
        Ok(())
    }
}

/// Accepts `https://` URLs, and `http://` ones only to a loopback host
/// (127.0.0.0/8, ::1, localhost): every call carries the node's token, which
/// plain HTTP across a network gives to anyone on the path.
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e}); use https://HOST:PORT"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&parsed) => Ok(()),
        "http" => Err(
            "plain http:// would send the node's token unencrypted across the network; \
             use https:// (http:// is accepted only for a loopback host: 127.0.0.0/8, ::1, localhost)"
                .to_string(),
        ),
        scheme => Err(format!(
            "unsupported scheme {scheme:?}; use https://HOST:PORT"
        )),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    // An IPv6 host keeps its brackets in a URL.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// How much of an error answer's body an error keeps (the control plane's messages
/// are short; anything longer is not worth logging).
const MAX_ERROR_BODY_BYTES: usize = 512;

/// Shortens `text` to at most `max` bytes without splitting a character.
fn cut_at_char_boundary(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
}

fn agent_protocol_wait() -> Duration {
    Duration::from_secs(agent_protocol::MAX_WAIT_SECONDS)
}

async fn check(
    response: reqwest::Response,
    url: &str,
) -> Result<reqwest::Response, ControlPlaneError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let mut body = response.text().await.unwrap_or_default();
    cut_at_char_boundary(&mut body, MAX_ERROR_BODY_BYTES);
    Err(ControlPlaneError::Status {
        url: url.to_string(),
        status,
        body,
    })
}

/// The HTTP client for the control plane. With `ca_file` (a PEM CA, or a bundle of
/// CAs during a rotation) it trusts those CAs only, not the public roots.
fn build_client(ca_file: Option<&Path>) -> Result<reqwest::Client, ControlPlaneError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT + agent_protocol_wait())
        .user_agent(concat!("shoal-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| ControlPlaneError::Client(format!("{}: {e}", path.display())))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            ControlPlaneError::Client(format!("{}: not a PEM CA: {e}", path.display()))
        })?;
        if certificates.is_empty() {
            return Err(ControlPlaneError::Client(format!(
                "{} holds no PEM certificate; give the CA that signed the operator's serving certificate",
                path.display()
            )));
        }
        // A private CA replaces the public roots: a certificate any public CA
        // issued for the operator's name must not be trusted as well.
        builder = builder.tls_built_in_root_certs(false);
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|e| ControlPlaneError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: String) -> reqwest::Response {
        let response = axum::http::Response::builder()
            .status(status)
            .body(body)
            .expect("a response");
        reqwest::Response::from(response)
    }

    fn refusal(url: &str) -> Option<String> {
        ControlPlane::new(url, "n1", None, None)
            .err()
            .map(|error| error.to_string())
    }

    #[test]
    fn the_url_check_allows_plain_http_only_to_loopback_hosts() {
        assert_eq!(check_url("https://10.0.0.1:8443"), Ok(()));
        assert_eq!(check_url("http://127.0.0.1:8443"), Ok(()));
        assert_eq!(check_url("http://127.255.255.254"), Ok(()));
        assert_eq!(check_url("http://[::1]:8443/"), Ok(()));
        assert_eq!(check_url("http://LOCALHOST:8443"), Ok(()));
        for url in [
            "http://128.0.0.1",
            "http://10.0.0.1:8443",
            "http://localhost.example.com",
            "http://[::2]",
        ] {
            let reason = check_url(url).expect_err(url);
            assert!(reason.starts_with("plain http://"), "{url}: {reason}");
        }
        assert!(check_url("ws://127.0.0.1").is_err());
        assert!(check_url("127.0.0.1:8443").is_err());
    }

    #[test]
    fn plain_http_is_refused_unless_the_host_is_loopback() {
        for url in [
            "http://10.0.0.1:8443",
            "http://shoal-operator.shoal-system.svc:8443",
            "http://127.0.0.1.nip.io:8443",
            "http://[::ffff:10.0.0.1]:8443",
        ] {
            let refusal = refusal(url).unwrap_or_else(|| panic!("{url} was accepted"));
            assert!(refusal.contains("use https://"), "{url}: {refusal}");
        }
        for url in [
            "http://127.0.0.1:8443",
            "http://127.200.3.4:8443",
            "http://[::1]:8443",
            "http://localhost:8443",
            "https://10.0.0.1:8443",
            "https://shoal-operator.shoal-system.svc:8443",
        ] {
            assert_eq!(refusal(url), None, "{url} is refused");
        }
        assert!(refusal("ftp://10.0.0.1").is_some());
        assert!(refusal("not a url").is_some());
    }

    #[tokio::test]
    async fn a_long_error_body_is_cut_at_a_character_boundary_without_a_panic() {
        // 511 ASCII bytes, then a two-byte character across the 512-byte cut.
        let body = format!("{}é and more", "a".repeat(511));
        let error = check(answer(503, body), "https://hub/agent/v1")
            .await
            .expect_err("a 503 is an error");
        let ControlPlaneError::Status { status, body, .. } = error else {
            panic!("a status error, not {error:?}");
        };
        assert_eq!(status.as_u16(), 503);
        assert_eq!(
            body,
            "a".repeat(511),
            "cut before the character that crosses 512 bytes"
        );
    }
}

//! The agent's client of the operator's agent API (`/agent/v1`): long-poll the
//! node's assignment, download artifacts (resuming after a broken connection) and
//! send reports. Every call carries the projected service-account token, read
//! afresh each time because the kubelet rotates it.

use crate::cache::{Cache, CacheError};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, ETAG, IF_NONE_MATCH, RANGE};
use shoal_api::agent_protocol::{self, AgentReport, AssignedModel, Assignment};
use std::path::PathBuf;
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
    client: reqwest::Client,
}

impl ControlPlane {
    /// `ca_file` adds a PEM CA to trust for the operator's serving certificate.
    pub fn new(
        base_url: &str,
        node: &str,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
    ) -> Result<ControlPlane, ControlPlaneError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT + agent_protocol_wait())
            .user_agent(concat!("shoal-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            let pem = std::fs::read(&path)
                .map_err(|e| ControlPlaneError::Client(format!("{}: {e}", path.display())))?;
            let certificate = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| ControlPlaneError::Client(e.to_string()))?;
            builder = builder.add_root_certificate(certificate);
        }
        let client = builder
            .build()
            .map_err(|e| ControlPlaneError::Client(e.to_string()))?;
        Ok(ControlPlane {
            base_url: base_url.trim_end_matches('/').to_string(),
            node: node.to_string(),
            token_file,
            client,
        })
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
            .client
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
    /// from an earlier broken attempt is resumed with a `Range` request.
    pub async fn download(
        &self,
        model: &AssignedModel,
        cache: &Cache,
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
        let mut request = self.client.get(&url);
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
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| ControlPlaneError::Unreachable {
                url: url.clone(),
                source,
            })?;
            file.write_all(&chunk).await.map_err(io_error)?;
        }
        file.sync_all().await.map_err(io_error)?;
        drop(file);
        Ok(cache.commit_download(&model.artifact_digest)?)
    }

    pub async fn report(&self, report: &AgentReport) -> Result<(), ControlPlaneError> {
        let url = self.url(&agent_protocol::report_path(&self.node));
        let request = self
            .client
            .post(&url)
            .json(report)
            .timeout(CONNECT_TIMEOUT + READ_TIMEOUT);
        let response = self.send(request, &url).await?;
        check(response, &url).await?;
        Ok(())
    }
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
    body.truncate(512);
    Err(ControlPlaneError::Status {
        url: url.to_string(),
        status,
        body,
    })
}

//! The agent API's listener: HTTPS with rustls when a certificate is configured,
//! plain HTTP otherwise — and plain HTTP only on a loopback address, for local
//! development, because agents send their tokens with every request.

use anyhow::{Context as _, bail};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};

use super::certificate::ReloadingCertificate;
pub use super::certificate::TlsFiles;
use super::connection_limits::{ConnectionLimits, Refused};

/// A client that has not finished its TLS handshake, or sent its request headers,
/// within this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AgentApiListener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Arc<ConnectionLimits>,
}

impl AgentApiListener {
    /// Binds `addr`, loading the certificate first so a bad one stops the operator
    /// at start instead of failing every agent's handshake. Connections beyond
    /// `limits` are closed as soon as they are accepted.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<&TlsFiles>,
        limits: Arc<ConnectionLimits>,
    ) -> anyhow::Result<Self> {
        if tls.is_none() && !addr.ip().is_loopback() {
            bail!(
                "the agent API would take agents' tokens over plain HTTP on {addr}: give --tls-cert and \
                 --tls-key, or listen on a loopback address (127.0.0.1) for local development"
            );
        }
        let tls = tls.map(acceptor).transpose()?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for agents on {addr}"))?;
        Ok(Self {
            listener,
            tls,
            limits,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves `app` until the process ends: one task per admitted connection, HTTP/1.1
    /// over TLS or plain TCP.
    pub async fn serve(self, app: Router) {
        let mut refused_since_log = 0u64;
        let mut last_log: Option<Instant> = None;
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "agent API cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let guard = match self.limits.admit(peer.ip()) {
                Ok(guard) => guard,
                Err(refused) => {
                    drop(stream);
                    refused_since_log += 1;
                    if last_log.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                        let cap = match refused {
                            Refused::Total(cap) => {
                                format!("{cap} connections in all (--agent-api-max-connections)")
                            }
                            Refused::PerSource(cap) => format!(
                                "{cap} connections from {} (--agent-api-max-connections-per-source)",
                                peer.ip()
                            ),
                        };
                        tracing::warn!(
                            refused = refused_since_log,
                            "agent API refused connections over its cap of {cap}"
                        );
                        refused_since_log = 0;
                        last_log = Some(Instant::now());
                    }
                    continue;
                }
            };
            let tls = self.tls.clone();
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _counted = guard;
                match tls {
                    None => serve_connection(TokioIo::new(stream), service, peer).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        {
                            Ok(Ok(stream)) => {
                                serve_connection(TokioIo::new(stream), service, peer).await
                            }
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "TLS handshake with an agent failed");
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake with an agent timed out");
                            }
                        }
                    }
                }
            });
        }
    }
}

/// How often refused connections are logged (with a count), at most.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

async fn serve_connection<I>(io: I, service: TowerToHyperService<Router>, peer: SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, service);
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "agent connection ended with an error");
    }
}

/// A TLS acceptor for HTTP/1.1 from PEM files, with rustls' ring provider. The
/// files are read again when they change ([`ReloadingCertificate`]).
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificate = ReloadingCertificate::new(files.clone(), provider.clone())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls has no safe protocol versions for the ring provider")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certificate));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

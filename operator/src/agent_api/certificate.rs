//! The agent API's serving certificate, read from its PEM files and read again when
//! they change (a cert-manager renewal swaps the Secret's files under the running
//! operator): each TLS handshake looks at the files at most once a second and, when
//! their size or modification time moved, loads the new pair. A pair that does not
//! load (half written, or a key that does not belong to the certificate) is logged
//! and the certificate in use keeps serving.

use anyhow::{Context as _, bail};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// How often a handshake may look at the files.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// PEM files of the serving certificate (chain) and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What identifies one version of the two files: size and modification time.
type FilesStamp = [(u64, Option<SystemTime>); 2];

fn stamp(files: &TlsFiles) -> FilesStamp {
    let of = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| (m.len(), m.modified().ok()))
            .unwrap_or((0, None))
    };
    [of(&files.cert), of(&files.key)]
}

/// Reads the pair and checks that the key belongs to the certificate.
pub fn load(files: &TlsFiles, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .with_context(|| {
            format!(
                "cannot read the agent API certificate {} (--tls-cert): it must be a PEM file",
                files.cert.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "the agent API certificate {} (--tls-cert) holds no CERTIFICATE block",
            files.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| {
        format!(
            "cannot read the agent API private key {} (--tls-key): it must be a PEM private key",
            files.key.display()
        )
    })?;
    CertifiedKey::from_der(certs, key, provider).context(
        "the agent API certificate (--tls-cert) and key (--tls-key) do not belong together",
    )
}

struct Current {
    key: Arc<CertifiedKey>,
    stamp: FilesStamp,
    checked: Instant,
}

/// A certificate resolver that serves the newest pair of files that loads.
pub struct ReloadingCertificate {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current>,
}

impl fmt::Debug for ReloadingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCertificate")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingCertificate {
    /// Loads the files once; an error here stops the operator at start.
    pub fn new(files: TlsFiles, provider: Arc<CryptoProvider>) -> anyhow::Result<Self> {
        let stamp = stamp(&files);
        let key = Arc::new(load(&files, &provider)?);
        Ok(Self {
            files,
            provider,
            current: Mutex::new(Current {
                key,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The certificate to present now, reloaded first if the files changed.
    fn certificate(&self) -> Arc<CertifiedKey> {
        let mut current = crate::runtime::lock(&self.current);
        if current.checked.elapsed() < CHECK_EVERY {
            return current.key.clone();
        }
        current.checked = Instant::now();
        let stamp = stamp(&self.files);
        if stamp != current.stamp {
            match load(&self.files, &self.provider) {
                Ok(key) => {
                    tracing::info!(cert = %self.files.cert.display(), "agent API certificate reloaded");
                    current.key = Arc::new(key);
                    current.stamp = stamp;
                }
                // Not recorded as seen: the next check tries again (the second file
                // of a renewal may still be on its way).
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "the agent API certificate files changed but do not load; the previous certificate keeps serving"
                ),
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certificate())
    }
}

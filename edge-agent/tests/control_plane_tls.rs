//! The agent's control-plane client over real TLS on 127.0.0.1. Given a CA file
//! (`--control-plane-ca`) it trusts that CA only: a server whose certificate
//! another CA signed is refused. Certificates are made with the `openssl` command,
//! as the integration harness makes them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shoal_agent::control_plane::{ControlPlane, Poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

fn openssl(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run openssl; install it (`make deps`)");
    assert!(
        output.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA named `ca` in `dir` and a certificate it signed for 127.0.0.1:
/// (the CA's PEM, the server's certificate PEM, the server's key PEM).
fn ca_and_server_certificate(dir: &Path, ca: &str) -> (PathBuf, PathBuf, PathBuf) {
    let file = |suffix: &str| format!("{ca}-{suffix}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            &file("ca.key"),
            "-out",
            &file("ca.crt"),
            "-subj",
            &format!("/CN={ca}"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &file("server.key"),
            "-out",
            &file("server.csr"),
            "-subj",
            "/CN=shoal-operator",
        ],
    );
    std::fs::write(
        dir.join(file("server.ext")),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write the extensions file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &file("server.csr"),
            "-CA",
            &file("ca.crt"),
            "-CAkey",
            &file("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &file("server.crt"),
            "-extfile",
            &file("server.ext"),
        ],
    );
    (
        dir.join(file("ca.crt")),
        dir.join(file("server.crt")),
        dir.join(file("server.key")),
    )
}

/// An HTTPS server on 127.0.0.1 with `cert` and `key` that answers every request
/// with an empty assignment for node n1. Returns its URL.
async fn assignment_server(cert: &Path, key: &Path) -> String {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("reads the certificate")
        .collect::<Result<_, _>>()
        .expect("parses the certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("reads the key");
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let url = format!("https://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A refused handshake ends here; that is what one test wants.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let body = r#"{"node":"n1","models":[]}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\netag: \"1\"\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

/// The error and all its sources, one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[tokio::test]
async fn with_a_ca_given_only_that_ca_is_trusted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ours, our_cert, our_key) = ca_and_server_certificate(dir.path(), "ours");
    let (_theirs, their_cert, their_key) = ca_and_server_certificate(dir.path(), "theirs");
    let wait = Duration::from_secs(1);

    let signed_by_ours = assignment_server(&our_cert, &our_key).await;
    let client = ControlPlane::new(&signed_by_ours, "n1", None, Some(ours.clone()))
        .expect("the client builds");
    match client.poll_assignment(None, wait).await {
        Ok(Poll::Changed { assignment, .. }) => assert_eq!(assignment.node, "n1"),
        other => panic!("the server our CA signed must be trusted: {other:?}"),
    }

    let signed_by_theirs = assignment_server(&their_cert, &their_key).await;
    let client =
        ControlPlane::new(&signed_by_theirs, "n1", None, Some(ours)).expect("the client builds");
    let error = match client.poll_assignment(None, wait).await {
        Ok(poll) => panic!("a server another CA signed was trusted: {poll:?}"),
        Err(error) => chain(&error),
    };
    assert!(error.contains("UnknownIssuer"), "{error}");
}

/// Issue: the agent read `--control-plane-ca` once at start, so an operator whose
/// CA rotated stranded every agent until it restarted. Now a changed CA file (the
/// kubelet swaps a ConfigMap mount's files) is trusted from the next request on.
#[tokio::test]
async fn a_rotated_ca_file_is_trusted_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ours, _, _) = ca_and_server_certificate(dir.path(), "ours");
    let (next, next_cert, next_key) = ca_and_server_certificate(dir.path(), "next");
    let wait = Duration::from_secs(1);
    let ca_file = dir.path().join("ca.crt");
    std::fs::copy(&ours, &ca_file).expect("copies the CA");

    // The operator already serves a certificate of the next CA.
    let server = assignment_server(&next_cert, &next_key).await;
    let client =
        ControlPlane::new(&server, "n1", None, Some(ca_file.clone())).expect("the client builds");
    let error = match client.poll_assignment(None, wait).await {
        Ok(poll) => panic!("a server the next CA signed was trusted before the rotation: {poll:?}"),
        Err(error) => chain(&error),
    };
    assert!(error.contains("UnknownIssuer"), "{error}");

    // The rotation reaches the node: both CAs, for the overlap, swapped in whole
    // (written aside and renamed, as the kubelet does).
    let mut bundle = std::fs::read(&ours).expect("reads our CA");
    bundle.extend(std::fs::read(&next).expect("reads the next CA"));
    let staged = dir.path().join("ca.crt.new");
    std::fs::write(&staged, bundle).expect("writes the bundle");
    std::fs::rename(&staged, &ca_file).expect("swaps the file");
    tokio::time::sleep(shoal_agent::control_plane::CA_CHECK_EVERY + Duration::from_millis(200))
        .await;
    match client.poll_assignment(None, wait).await {
        Ok(Poll::Changed { assignment, .. }) => assert_eq!(assignment.node, "n1"),
        other => panic!("the rotated CA file must be trusted without a restart: {other:?}"),
    }

    // A CA file that does not load keeps the CAs in use.
    std::fs::write(&ca_file, b"not a certificate").expect("writes garbage");
    tokio::time::sleep(shoal_agent::control_plane::CA_CHECK_EVERY + Duration::from_millis(200))
        .await;
    match client.poll_assignment(None, wait).await {
        Ok(Poll::Changed { assignment, .. }) => assert_eq!(assignment.node, "n1"),
        other => panic!("a broken CA file must not drop the trusted CAs: {other:?}"),
    }
}

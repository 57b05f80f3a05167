//! What the agent API tests authenticate and encrypt with: ServiceAccount tokens
//! from the TokenRequest API, and a throwaway CA with a serving certificate.

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};
use std::path::{Path, PathBuf};

/// A token of `service_account` from the TokenRequest API with `audience`, bound to
/// the pod `pod` — what the kubelet projects into an agent's pod. The API server
/// adds the pod's node to such a token (`authentication.kubernetes.io/node-name`).
pub async fn pod_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    pod: &str,
    audience: &str,
) -> anyhow::Result<String> {
    let pod_uid = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(pod)
        .await
        .with_context(|| format!("cannot read pod {namespace}/{pod} to bind a token to it"))?
        .metadata
        .uid;
    let bound = BoundObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.into()),
        uid: pod_uid,
    };
    request_token(client, namespace, service_account, audience, Some(bound)).await
}

/// A token of `service_account` with `audience`, bound to nothing (what
/// `kubectl create token` makes): valid, but it names no pod and no node.
pub async fn unbound_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    audience: &str,
) -> anyhow::Result<String> {
    request_token(client, namespace, service_account, audience, None).await
}

async fn request_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    audience: &str,
    bound: Option<BoundObjectReference>,
) -> anyhow::Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_string()],
            bound_object_ref: bound,
            expiration_seconds: Some(3600),
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!("the TokenRequest API refused a token for {namespace}/{service_account}")
        })?;
    Ok(answer
        .status
        .context("the TokenRequest answer has no status")?
        .token)
}

/// PEM files of a throwaway CA and a serving certificate it signed for 127.0.0.1
/// and localhost, made with `openssl` in `dir`.
pub struct TestCertificate {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a [`TestCertificate`] in `dir` with the `openssl` command (`make deps`
/// installs it).
pub fn serving_certificate(dir: &Path) -> anyhow::Result<TestCertificate> {
    certificate_for(dir, "IP:127.0.0.1,DNS:localhost")
}

/// A [`TestCertificate`] in `dir` whose serving certificate names `subject_alt_names`
/// (openssl syntax: `IP:10.0.0.200,DNS:shoal-operator.shoal-system.svc`).
pub fn certificate_for(dir: &Path, subject_alt_names: &str) -> anyhow::Result<TestCertificate> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("cannot run openssl; install it (`make deps`)")?;
        if !output.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=shoal-test-ca",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=shoal-operator",
    ])?;
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName={subject_alt_names}\nextendedKeyUsage=serverAuth\n"),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        "server.crt",
        "-extfile",
        "server.ext",
    ])?;
    Ok(TestCertificate {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    })
}

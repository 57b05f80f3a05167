//! Downloads a Model's `source.http` bytes into memory, bounded in size and time.
//! Build the client once with [`http_client`] (it carries the timeouts, the user
//! agent and the [`SourcePolicy`] guard on every address it connects to and every
//! redirect it follows) and pass it to [`fetch_http`]; the digest check happens in
//! the artifact store.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{StatusCode, Url};

use super::source_policy::SourcePolicy;

/// Redirects followed before a fetch gives up.
pub const MAX_REDIRECTS: usize = 10;

/// Time allowed to establish a TCP (and TLS) connection to the source.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence allowed between two reads of the body: a stalled server fails
/// fast even while the overall timeout still has plenty of room.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for a whole download, headers to last byte. Generous because
/// models can be hundreds of megabytes on a slow link.
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("`{url}` is not a valid http(s) URL ({reason}); fix the Model's spec.source.http.url")]
    InvalidUrl { url: String, reason: String },

    #[error(
        "GET {url} answered HTTP {status}: {hint}",
        hint = status_hint(*status)
    )]
    Status { url: String, status: StatusCode },

    #[error(
        "{url} is larger than the artifact size limit of {max_bytes} bytes; use a smaller model \
         or raise the operator's artifact size limit"
    )]
    TooLarge { url: String, max_bytes: u64 },

    #[error(
        "timed out downloading {url}; check that the source is reachable from the operator pod \
         and fast enough to serve the model within {total}s",
        total = TOTAL_TIMEOUT.as_secs()
    )]
    Timeout { url: String },

    #[error(
        "could not download {url}: {reason}; check the URL, DNS and network policy between the \
         operator and the source"
    )]
    Transport { url: String, reason: String },

    #[error("could not build the HTTP client: {reason}")]
    Client { reason: String },

    #[error("refused to fetch {url}: {reason}")]
    Refused { url: String, reason: String },
}

impl FetchError {
    /// A short, fixed label for the `reason` of an error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            FetchError::InvalidUrl { .. } => "invalid_url",
            FetchError::Status { .. } => "http_status",
            FetchError::TooLarge { .. } => "too_large",
            FetchError::Timeout { .. } => "timeout",
            FetchError::Transport { .. } => "transport",
            FetchError::Client { .. } => "client",
            FetchError::Refused { .. } => "refused",
        }
    }

    /// Whether only a change to the Model (or to the operator's flags) can fix it, so
    /// that retrying is pointless.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            FetchError::InvalidUrl { .. } | FetchError::Refused { .. }
        )
    }
}

fn status_hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            "the source refused the operator; make the URL readable without credentials or use a pre-signed URL"
        }
        StatusCode::NOT_FOUND | StatusCode::GONE => {
            "the file is not there; check spec.source.http.url"
        }
        s if s.is_server_error() => "the source server failed; check the server or try again later",
        _ => "expected 200; check spec.source.http.url",
    }
}

/// The client every download should use: bounded connect, read and total time, a
/// user agent that tells the source's operators who is calling, a resolver that
/// drops the addresses `policy` refuses (so a name that turns internal between the
/// check and the connection is refused too) and a redirect policy that applies the
/// same guard and never goes from https to http. `extra_ca` (PEM) is trusted beside
/// the public roots, for in-house model stores.
pub fn http_client(
    policy: Arc<SourcePolicy>,
    extra_ca: Option<&[u8]>,
) -> Result<reqwest::Client, FetchError> {
    let client_error = |reason: String| FetchError::Client { reason };
    let redirect_guard = policy.clone();
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("shoal-operator/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .timeout(TOTAL_TIMEOUT)
        .dns_resolver(Arc::new(GuardedResolver { policy }))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            let refusal = match attempt.previous().last() {
                Some(from) if attempt.previous().len() > MAX_REDIRECTS => Some(format!(
                    "more than {MAX_REDIRECTS} redirects from {}",
                    redact_url(from.as_str())
                )),
                Some(from) => redirect_refusal(from, attempt.url(), &redirect_guard),
                None => None,
            };
            match refusal {
                Some(reason) => attempt.error(reason),
                None => attempt.follow(),
            }
        }));
    if let Some(pem) = extra_ca {
        let certificates = reqwest::Certificate::from_pem_bundle(pem).map_err(|err| {
            client_error(format!(
                "the model source CA is not PEM: {}",
                error_chain(&err)
            ))
        })?;
        if certificates.is_empty() {
            return Err(client_error(
                "the model source CA file holds no certificate".into(),
            ));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|err| client_error(error_chain(&err)))
}

/// Pure: why the fetch must not follow a redirect from `from` to `to`, if it must not.
/// Names are checked when they resolve (by the client's resolver); addresses here.
pub fn redirect_refusal(from: &Url, to: &Url, policy: &SourcePolicy) -> Option<String> {
    if from.scheme() == "https" && to.scheme() != "https" {
        return Some(format!(
            "{} redirected to {}, from https to {}; a redirect that drops TLS is never followed",
            redact_url(from.as_str()),
            redact_url(to.as_str()),
            to.scheme()
        ));
    }
    let reason = literal_ip(to).and_then(|ip| policy.refusal(ip))?;
    Some(format!(
        "redirected to {}: {reason}",
        redact_url(to.as_str())
    ))
}

/// The address in a URL whose host is an IP literal (reqwest connects to those
/// without asking the resolver).
fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    // IPv6 literals come bracketed.
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// The system resolver, minus the addresses the policy refuses: a name that resolves
/// only to refused addresses fails to resolve, with the reason.
struct GuardedResolver {
    policy: Arc<SourcePolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let addresses = resolve_allowed(name.as_str(), &policy).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addresses.into_iter());
            Ok(addrs)
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("{0}")]
    Refused(String),
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: std::io::Error,
    },
}

/// Resolves `host`; refuses the name when any of its addresses is refused (a name
/// that also points inside is not a model store).
async fn resolve_allowed(
    host: &str,
    policy: &SourcePolicy,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|source| ResolveError::Lookup {
            host: host.to_string(),
            source,
        })?
        .collect();
    for address in &addresses {
        if let Some(reason) = policy.refusal(address.ip()) {
            return Err(ResolveError::Refused(format!(
                "{host} resolves to {reason}"
            )));
        }
    }
    Ok(addresses)
}

/// GETs `url` and returns its body, refusing anything but 2xx and any body larger
/// than `max_bytes` (checked while streaming, so a lying or missing
/// Content-Length cannot make the operator buffer more than that).
///
/// Timeouts and the address guard come from `client`; build it with [`http_client`]
/// and pass the same `policy`, which is checked here before any connection too.
pub async fn fetch_http(
    client: &reqwest::Client,
    policy: &SourcePolicy,
    url: &str,
    max_bytes: u64,
) -> Result<Vec<u8>, FetchError> {
    let parsed = Url::parse(url).map_err(|err| FetchError::InvalidUrl {
        url: redact_url(url),
        reason: err.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(FetchError::InvalidUrl {
            url: redact_url(url),
            reason: format!("scheme `{}` is not http or https", parsed.scheme()),
        });
    }
    // Error messages end up in Model status, readable by anyone who can get the
    // Model: never show credentials or pre-signed query strings there.
    let shown_url = redact_url(url);
    check_host(&parsed, policy)
        .await
        .map_err(|reason| FetchError::Refused {
            url: shown_url.clone(),
            reason,
        })?;

    let mut response = client
        .get(parsed)
        .send()
        .await
        .map_err(|err| request_error(&shown_url, err))?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            url: shown_url,
            status,
        });
    }
    let too_large = || FetchError::TooLarge {
        url: shown_url.clone(),
        max_bytes,
    };
    if let Some(declared) = response.content_length()
        && declared > max_bytes
    {
        return Err(too_large());
    }

    let expected = response.content_length().unwrap_or(0).min(max_bytes);
    let mut body = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| request_error(&shown_url, err))?
    {
        if body.len() as u64 + chunk.len() as u64 > max_bytes {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Refuses, before connecting, a URL whose host is (or resolves to) an address the
/// policy refuses. The client's resolver checks again when it connects.
async fn check_host(url: &Url, policy: &SourcePolicy) -> Result<(), String> {
    if let Some(ip) = literal_ip(url) {
        return policy.refusal(ip).map_or(Ok(()), Err);
    }
    let Some(host) = url.host_str() else {
        return Err("the URL has no host".into());
    };
    match resolve_allowed(host, policy).await {
        Err(ResolveError::Refused(reason)) => Err(reason),
        // A name that does not resolve is the transport's error to report.
        Ok(_) | Err(ResolveError::Lookup { .. }) => Ok(()),
    }
}

fn request_error(shown_url: &str, err: reqwest::Error) -> FetchError {
    if err.is_redirect() {
        // The redirect policy's own reason, without reqwest's generic wrapper.
        let reason = std::error::Error::source(&err)
            .map(|cause| cause.to_string())
            .unwrap_or_else(|| error_chain(&err.without_url()));
        return FetchError::Refused {
            url: shown_url.to_string(),
            reason,
        };
    }
    if err.is_timeout() {
        return FetchError::Timeout {
            url: shown_url.to_string(),
        };
    }
    FetchError::Transport {
        url: shown_url.to_string(),
        // without_url: reqwest's own message would repeat the unredacted URL.
        reason: error_chain(&err.without_url()),
    }
}

/// reqwest's top-level message is generic ("error sending request"); the cause
/// (connection refused, DNS, TLS) is further down the chain.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Drops user info and replaces the query, which for pre-signed URLs holds the signature.
fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        // Not a URL we can take apart: show only what precedes any query or user info.
        let before_query = url.split(['?', '#']).next().unwrap_or_default();
        return match before_query.rsplit_once('@') {
            Some((_, host_and_path)) => format!("…@{host_and_path}"),
            None => before_query.to_string(),
        };
    };
    // Both setters only fail for URLs that cannot have user info (no host), in
    // which case there is nothing to remove.
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    if parsed.query().is_some() {
        parsed.set_query(Some("redacted"));
    }
    parsed.set_fragment(None);
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A one-shot HTTP server on 127.0.0.1 that answers the first request with
    /// `response` (raw bytes, status line included). Plain std so the tests need no
    /// extra tokio features.
    fn serve_once(response: Vec<u8>) -> String {
        serve_once_on("127.0.0.1", response)
    }

    /// [`serve_once`] on another loopback address (Linux answers on all of 127/8).
    fn serve_once_on(ip: &str, response: Vec<u8>) -> String {
        let listener = TcpListener::bind((ip, 0)).expect("bind");
        let addr = listener.local_addr().expect("local addr");
        std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            // Read the request head up to the blank line; the tests only send GETs.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line == "\r\n" {
                    break;
                }
                line.clear();
            }
            let mut stream = reader.into_inner();
            let _ = stream.write_all(&response);
            let _ = stream.flush();
        });
        format!("http://{addr}")
    }

    fn response(status_line: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {status_line}\r\nConnection: close\r\n");
        for header in headers {
            out.push_str(header);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(body);
        out
    }

    /// The tests' servers run on loopback, which the default policy refuses.
    fn loopback() -> SourcePolicy {
        SourcePolicy::new(vec!["127.0.0.0/8".parse().expect("network")])
    }

    fn client() -> reqwest::Client {
        http_client(Arc::new(loopback()), None).expect("client")
    }

    #[tokio::test]
    async fn returns_the_body() {
        let url = serve_once(response("200 OK", &["Content-Length: 5"], b"hello"));
        let body = fetch_http(&client(), &loopback(), &format!("{url}/model.onnx"), 1024)
            .await
            .expect("fetch");
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn accepts_a_body_of_exactly_max_bytes() {
        let url = serve_once(response("200 OK", &["Content-Length: 5"], b"hello"));
        let body = fetch_http(&client(), &loopback(), &url, 5)
            .await
            .expect("fetch");
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn not_found_names_status_and_url() {
        let url = serve_once(response("404 Not Found", &["Content-Length: 0"], b""));
        let model_url = format!("{url}/missing.onnx");
        let err = fetch_http(&client(), &loopback(), &model_url, 1024)
            .await
            .expect_err("404 must fail");
        assert!(
            matches!(err, FetchError::Status { status, .. } if status == StatusCode::NOT_FOUND)
        );
        assert_eq!(err.metric_label(), "http_status");
        let message = err.to_string();
        assert!(message.contains("404"), "{message}");
        assert!(message.contains(&model_url), "{message}");
    }

    #[tokio::test]
    async fn refuses_declared_oversize_body() {
        let url = serve_once(response("200 OK", &["Content-Length: 11"], b"hello world"));
        let err = fetch_http(&client(), &loopback(), &url, 10)
            .await
            .expect_err("oversize must fail");
        assert_eq!(err.metric_label(), "too_large");
        assert!(err.to_string().contains("10 bytes"), "{err}");
    }

    #[tokio::test]
    async fn refuses_oversize_body_without_content_length() {
        // No Content-Length: the body runs until the server closes the connection,
        // so only the streaming check can stop it.
        let url = serve_once(response("200 OK", &[], &[b'x'; 4096]));
        let err = fetch_http(&client(), &loopback(), &url, 100)
            .await
            .expect_err("oversize must fail");
        assert_eq!(err.metric_label(), "too_large");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        // Accept, then hold the connection open without answering.
        let holder = std::thread::spawn(move || {
            let conn = listener.accept();
            std::thread::sleep(Duration::from_secs(2));
            drop(conn);
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .expect("client");
        let err = fetch_http(&client, &loopback(), &url, 1024)
            .await
            .expect_err("must time out");
        assert_eq!(err.metric_label(), "timeout", "{err}");
        let _ = holder.join();
    }

    #[tokio::test]
    async fn connection_refused_is_a_transport_error() {
        // Bind then drop: the port is very likely closed afterwards.
        let addr = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let err = fetch_http(
            &client(),
            &loopback(),
            &format!("http://{addr}/m.onnx"),
            1024,
        )
        .await
        .expect_err("must fail");
        assert_eq!(err.metric_label(), "transport", "{err}");
    }

    #[tokio::test]
    async fn rejects_non_http_urls() {
        for url in [
            "file:///etc/passwd",
            "not a url",
            "ftp://example.com/m.onnx",
        ] {
            let err = fetch_http(&client(), &loopback(), url, 1024)
                .await
                .expect_err("must fail");
            assert_eq!(err.metric_label(), "invalid_url", "{url}");
        }
    }

    #[tokio::test]
    async fn errors_hide_credentials_and_signatures() {
        let url = serve_once(response("403 Forbidden", &["Content-Length: 0"], b""));
        let secret_url =
            url.replace("http://", "http://user:hunter2@") + "/m.onnx?X-Amz-Signature=deadbeef";
        let err = fetch_http(&client(), &loopback(), &secret_url, 1024)
            .await
            .expect_err("403 must fail");
        let message = err.to_string();
        assert!(!message.contains("hunter2"), "{message}");
        assert!(!message.contains("deadbeef"), "{message}");
        assert!(message.contains("/m.onnx"), "{message}");
    }

    #[tokio::test]
    async fn refuses_metadata_and_loopback_addresses_before_connecting() {
        let default = SourcePolicy::default();
        let client = http_client(Arc::new(default.clone()), None).expect("client");
        // Nothing listens on 169.254.169.254 here: a connection attempt would time
        // out (a transport error), not be refused.
        let err = fetch_http(
            &client,
            &default,
            "http://169.254.169.254/latest/meta-data/",
            1024,
        )
        .await
        .expect_err("metadata must be refused");
        assert_eq!(err.metric_label(), "refused", "{err}");
        assert!(err.is_permanent());
        let message = err.to_string();
        assert!(
            message.contains("169.254.169.254 is a link-local address"),
            "{message}"
        );
        // A server that does answer on loopback is never reached by default.
        let url = serve_once(response("200 OK", &["Content-Length: 5"], b"hello"));
        let err = fetch_http(&client, &default, &url, 1024)
            .await
            .expect_err("loopback must be refused");
        assert_eq!(err.metric_label(), "refused", "{err}");
        let err = fetch_http(&client, &default, "http://localhost:1/m.onnx", 1024)
            .await
            .expect_err("a name that resolves to loopback must be refused");
        assert!(err.to_string().contains("localhost resolves to"), "{err}");
        let err = fetch_http(
            &client,
            &default,
            "http://[::ffff:127.0.0.1]:1/m.onnx",
            1024,
        )
        .await
        .expect_err("mapped loopback must be refused");
        assert_eq!(err.metric_label(), "refused", "{err}");
    }

    #[tokio::test]
    async fn a_source_named_by_host_name_is_fetched_through_the_guarded_resolver() {
        // localhost resolves to loopback addresses only; allowed here, so the
        // resolver hands them (with the URL's port) to the connection.
        let url = serve_once(response("200 OK", &["Content-Length: 5"], b"hello"));
        let by_name = url.replace("127.0.0.1", "localhost");
        let policy = SourcePolicy::new(vec![
            "127.0.0.0/8".parse().expect("network"),
            "::1".parse().expect("network"),
        ]);
        let client = http_client(Arc::new(policy.clone()), None).expect("client");
        let body = fetch_http(&client, &policy, &format!("{by_name}/m.onnx"), 1024)
            .await
            .expect("fetch by name");
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn a_redirect_into_a_refused_network_is_not_followed() {
        // The source on 127.0.0.2 is allowed; it redirects to 127.0.0.1, which is not.
        let target = serve_once(response("200 OK", &["Content-Length: 6"], b"secret"));
        let location = format!("Location: {target}/internal");
        let source = serve_once_on(
            "127.0.0.2",
            response("302 Found", &[&location, "Content-Length: 0"], b""),
        );
        let policy = SourcePolicy::new(vec!["127.0.0.2/32".parse().expect("network")]);
        let client = http_client(Arc::new(policy.clone()), None).expect("client");
        let err = fetch_http(&client, &policy, &format!("{source}/m.onnx"), 1024)
            .await
            .expect_err("the redirect must be refused");
        assert_eq!(err.metric_label(), "refused", "{err}");
        let message = err.to_string();
        assert!(
            message.contains("redirected to http://127.0.0.1:"),
            "{message}"
        );
        assert!(message.contains("loopback"), "{message}");
    }

    #[test]
    fn redirects_that_drop_tls_or_reach_inside_are_refused() {
        let url = |text: &str| Url::parse(text).expect("url");
        let policy = SourcePolicy::default();
        let cases = [
            (
                "https://models.example.com/a",
                "https://cdn.example.com/a",
                None,
            ),
            (
                "http://models.example.com/a",
                "https://cdn.example.com/a",
                None,
            ),
            (
                "http://models.example.com/a",
                "http://cdn.example.com/a",
                None,
            ),
            (
                "https://models.example.com/a",
                "http://cdn.example.com/a?sig=1",
                Some("from https to http"),
            ),
            (
                "https://models.example.com/a",
                "https://169.254.169.254/",
                Some("link-local"),
            ),
            (
                "http://models.example.com/a",
                "http://[fd00:ec2::254]/",
                Some("unique-local"),
            ),
            (
                "http://models.example.com/a",
                "http://10.0.0.1/",
                Some("private"),
            ),
        ];
        for (from, to, expected) in cases {
            let refusal = redirect_refusal(&url(from), &url(to), &policy);
            match expected {
                None => assert_eq!(refusal, None, "{from} -> {to}"),
                Some(part) => {
                    let refusal =
                        refusal.unwrap_or_else(|| panic!("{from} -> {to} must be refused"));
                    assert!(refusal.contains(part), "{refusal}");
                    assert!(!refusal.contains("sig=1"), "{refusal}");
                }
            }
        }
    }

    #[test]
    fn a_source_ca_that_is_not_pem_is_a_clear_error() {
        let err = http_client(
            Arc::new(SourcePolicy::default()),
            Some(b"not a certificate"),
        )
        .expect_err("must fail");
        assert!(err.to_string().contains("model source CA"), "{err}");
    }

    #[test]
    fn redacts_unparseable_urls_too() {
        assert_eq!(redact_url("http//u:p@host/m?sig=1"), "…@host/m");
    }
}

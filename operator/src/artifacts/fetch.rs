//! Downloads a Model's `source.http` bytes into memory, bounded in size and time.
//! Build the client once with [`http_client`] (it carries the timeouts and the user
//! agent) and pass it to [`fetch_http`]; the digest check happens in the artifact store.

use std::time::Duration;

use reqwest::{StatusCode, Url};

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
        }
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

/// The client every download should use: bounded connect, read and total time,
/// and a user agent that tells the source's operators who is calling.
pub fn http_client() -> Result<reqwest::Client, FetchError> {
    reqwest::Client::builder()
        .user_agent(concat!("shoal-operator/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .timeout(TOTAL_TIMEOUT)
        .build()
        .map_err(|err| FetchError::Client {
            reason: error_chain(&err),
        })
}

/// GETs `url` and returns its body, refusing anything but 2xx and any body larger
/// than `max_bytes` (checked while streaming, so a lying or missing
/// Content-Length cannot make the operator buffer more than that).
///
/// Timeouts come from `client`; build it with [`http_client`].
pub async fn fetch_http(
    client: &reqwest::Client,
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

fn request_error(shown_url: &str, err: reqwest::Error) -> FetchError {
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
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
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

    fn client() -> reqwest::Client {
        http_client().expect("client")
    }

    #[tokio::test]
    async fn returns_the_body() {
        let url = serve_once(response("200 OK", &["Content-Length: 5"], b"hello"));
        let body = fetch_http(&client(), &format!("{url}/model.onnx"), 1024)
            .await
            .expect("fetch");
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn accepts_a_body_of_exactly_max_bytes() {
        let url = serve_once(response("200 OK", &["Content-Length: 5"], b"hello"));
        let body = fetch_http(&client(), &url, 5).await.expect("fetch");
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn not_found_names_status_and_url() {
        let url = serve_once(response("404 Not Found", &["Content-Length: 0"], b""));
        let model_url = format!("{url}/missing.onnx");
        let err = fetch_http(&client(), &model_url, 1024)
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
        let err = fetch_http(&client(), &url, 10)
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
        let err = fetch_http(&client(), &url, 100)
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
        let err = fetch_http(&client, &url, 1024)
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
        let err = fetch_http(&client(), &format!("http://{addr}/m.onnx"), 1024)
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
            let err = fetch_http(&client(), url, 1024)
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
        let err = fetch_http(&client(), &secret_url, 1024)
            .await
            .expect_err("403 must fail");
        let message = err.to_string();
        assert!(!message.contains("hunter2"), "{message}");
        assert!(!message.contains("deadbeef"), "{message}");
        assert!(message.contains("/m.onnx"), "{message}");
    }

    #[test]
    fn redacts_unparseable_urls_too() {
        assert_eq!(redact_url("http//u:p@host/m?sig=1"), "…@host/m");
    }
}

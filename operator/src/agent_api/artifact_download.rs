//! `GET /agent/v1/artifacts/sha256/{hex}`: streams a blob of the artifact store to
//! an agent whose node is assigned it (now, or within the last hour). A blob never
//! changes under its digest, so it is cacheable forever, and `Range` lets an agent
//! resume a broken download.

use crate::agent_api::byte_range::{ByteRange, parse_range};
use crate::agent_api::{AgentApi, ApiError};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::jiff::Timestamp;
use std::io::SeekFrom;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

const CHUNK_BYTES: usize = 64 * 1024;

pub async fn artifact(
    State(api): State<AgentApi>,
    Path(hex): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let agent = api.authenticate(&headers, None).await?;
    if !is_sha256_hex(&hex) {
        return Err(ApiError::bad_request(format!(
            "{:?} is not a sha256 digest: use the 64 lowercase hex characters after `sha256:` in the assignment's artifactDigest",
            hex.chars().take(80).collect::<String>()
        )));
    }
    // Artifacts are a namespace's models: an agent gets only what its own node is
    // assigned, whether or not the store holds the digest.
    if !api
        .fleet
        .may_download(&agent, &format!("sha256:{hex}"), Timestamp::now())
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "artifact sha256:{hex} is not assigned to node {} (pool {}/{}) now or in the last hour; an agent downloads only the artifacts its assignment names: ask for the assignment again",
                agent.node, agent.namespace, agent.pool
            ),
        ));
    }
    let path = api
        .artifacts
        .path(&hex)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no artifact sha256:{hex} in the operator's store; ask for the assignment again, it names the artifacts to download"
                ),
            ));
        }
        Err(error) => return Err(store_error(&path, &error)),
    };
    let len = file
        .metadata()
        .await
        .map_err(|error| store_error(&path, &error))?
        .len();
    let range = headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok());
    let (status, body, content_length, content_range) = match parse_range(range, len) {
        ByteRange::Unsatisfiable => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the artifact has {len} bytes; a Range must start below that"),
            )
            .into_response();
            insert(
                &mut response,
                header::CONTENT_RANGE,
                &format!("bytes */{len}"),
            );
            return Ok(response);
        }
        ByteRange::Full => (
            StatusCode::OK,
            Body::from_stream(ReaderStream::with_capacity(file, CHUNK_BYTES)),
            len,
            None,
        ),
        ByteRange::Partial { start, end } => {
            file.seek(SeekFrom::Start(start))
                .await
                .map_err(|error| store_error(&path, &error))?;
            let count = end - start + 1;
            let body =
                Body::from_stream(ReaderStream::with_capacity(file.take(count), CHUNK_BYTES));
            let content_range = format!("bytes {start}-{end}/{len}");
            (
                StatusCode::PARTIAL_CONTENT,
                body,
                count,
                Some(content_range),
            )
        }
    };
    let mut response = (status, body).into_response();
    if let Some(content_range) = content_range {
        insert(&mut response, header::CONTENT_RANGE, &content_range);
    }
    insert(
        &mut response,
        header::CONTENT_LENGTH,
        &content_length.to_string(),
    );
    insert(
        &mut response,
        header::CONTENT_TYPE,
        "application/octet-stream",
    );
    insert(&mut response, header::ACCEPT_RANGES, "bytes");
    insert(
        &mut response,
        header::CACHE_CONTROL,
        "public, max-age=31536000, immutable",
    );
    insert(&mut response, header::ETAG, &format!("\"sha256:{hex}\""));
    Ok(response)
}

/// Exactly 64 lowercase hex characters, the form the store names blobs by.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn insert(response: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

fn store_error(path: &std::path::Path, error: &std::io::Error) -> ApiError {
    tracing::error!(path = %path.display(), %error, "cannot read an artifact for an agent");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the operator cannot read its artifact store; retry later (the operator's log says why)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_form() {
        assert!(is_sha256_hex(&"a1".repeat(32)));
        for bad in [
            "".to_string(),
            "A1".repeat(32),
            "a1".repeat(31),
            format!("sha256:{}", "a".repeat(57)),
            "../".repeat(21) + "a",
        ] {
            assert!(!is_sha256_hex(&bad), "{bad}");
        }
    }
}

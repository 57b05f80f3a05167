//! The agent API: what edge agents dial home to, under `/agent/v1` on
//! a listener of its own. Assignment long-polls, artifact downloads and reports,
//! each authenticated with the agent's projected ServiceAccount token.
//!
//! The operator needs RBAC `create` on `tokenreviews` (API group
//! `authentication.k8s.io`) for this; the chart's ClusterRole must grant it.

pub mod artifact_download;
pub mod assignment_poll;
pub mod auth;
pub mod byte_range;
pub mod certificate;
pub mod connection_limits;
pub mod listener;
pub mod report_intake;
pub mod token_cache;
pub mod token_signature;

use crate::agent_api::auth::{AuthError, TokenReviewer, authorize, bearer_token};
use crate::artifacts::store::ArtifactStore;
use crate::fleet::Fleet;
use crate::fleet::reports::Agent;
use crate::runtime::metrics::Metrics;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use shoal_api::agent_protocol::{MAX_REPORT_BYTES, PREFIX};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything the handlers share.
#[derive(Clone)]
pub struct AgentApi {
    pub fleet: Arc<Fleet>,
    pub artifacts: ArtifactStore,
    pub reviewer: Arc<TokenReviewer>,
    pub metrics: Arc<Metrics>,
}

impl AgentApi {
    pub fn new(
        client: kube::Client,
        fleet: Arc<Fleet>,
        artifacts: ArtifactStore,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            fleet,
            artifacts,
            reviewer: Arc::new(TokenReviewer::new(client, metrics.clone())),
            metrics,
        }
    }

    /// The routes under `/agent/v1`, with request counting on all of them.
    pub fn router(self) -> Router {
        Router::new()
            .route(
                &format!("{PREFIX}/nodes/{{node}}/assignment"),
                get(assignment_poll::assignment),
            )
            .route(
                &format!("{PREFIX}/nodes/{{node}}/report"),
                post(report_intake::report),
            )
            .route(
                &format!("{PREFIX}/artifacts/sha256/{{hex}}"),
                get(artifact_download::artifact),
            )
            .fallback(|| async {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no such agent API route; agents use {PREFIX}/nodes/<node>/assignment, {PREFIX}/nodes/<node>/report and {PREFIX}/artifacts/sha256/<hex>"),
                )
            })
            .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
            .layer(middleware::from_fn_with_state(
                self.metrics.clone(),
                count_requests,
            ))
            .with_state(self)
    }

    /// The agent behind the request's bearer token, allowed to act for `path_node`
    /// (when the route names one).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        path_node: Option<&str>,
    ) -> Result<Agent, ApiError> {
        let header = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        let token = bearer_token(header)?;
        let deleted_pods = &self.fleet.deleted_pods;
        let reviewed = self
            .reviewer
            .review(token, |uid| deleted_pods.contains(uid, Instant::now()))
            .await?;
        if !self.fleet.cluster.is_synced() {
            return Err(ApiError::not_synced());
        }
        let cluster = &self.fleet.cluster;
        Ok(authorize(&reviewed, path_node, |namespace, pool| {
            cluster.has_pool(namespace, pool)
        })?)
    }
}

/// An error answer: a status and a JSON body `{"message": …}` that says what to do.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `Retry-After` of a 503 (default [`RETRY_AFTER`]).
    pub retry_after: Option<Duration>,
    /// Answer with `Connection: close`, so that the client's next request opens a
    /// new connection (which a Service may balance to another replica).
    pub close_connection: bool,
}

/// How long an agent should wait before retrying a 503.
const RETRY_AFTER: Duration = Duration::from_secs(5);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            close_connection: false,
        }
    }

    /// 503 from a replica that is not the leader, for a request only the leader
    /// takes: retry in a second, on a new connection.
    pub fn not_the_leader(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(Duration::from_secs(1)),
            close_connection: true,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_synced() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the operator is still reading the cluster's Models, EdgePools, ModelRollouts and Nodes; retry shortly",
        )
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        let status = match &error {
            AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "message": self.message });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"shoal\""),
            );
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(self.retry_after.unwrap_or(RETRY_AFTER).as_secs()),
            );
        }
        if self.close_connection {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Counts every answer by route template and status code.
async fn count_requests(
    State(metrics): State<Arc<Metrics>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(matched.as_ref().map(MatchedPath::as_str));
    let response = next.run(request).await;
    metrics.agent_api_request(route, response.status().as_u16());
    response
}

fn route_label(template: Option<&str>) -> &'static str {
    match template {
        Some(path) if path.ends_with("/assignment") => "assignment",
        Some(path) if path.ends_with("/report") => "report",
        Some(path) if path.contains("/artifacts/") => "artifact",
        _ => "unmatched",
    }
}

/// Parses a duration flag such as `90s`, `2m`, `1h` or `500ms`.
pub fn parse_duration_flag(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 2m or 500ms"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" | "" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "{text:?} has unit {unit:?}; use ms, s, m or h (for example 90s)"
            ));
        }
    };
    if duration.is_zero() {
        return Err("the duration must be more than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_flags() {
        assert_eq!(parse_duration_flag("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration_flag("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration_flag("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration_flag("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration_flag("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "s", "0s", "1.5m", "10d", "-1s"] {
            assert!(parse_duration_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_are_labelled_by_template() {
        assert_eq!(
            route_label(Some("/agent/v1/nodes/{node}/assignment")),
            "assignment"
        );
        assert_eq!(route_label(Some("/agent/v1/nodes/{node}/report")), "report");
        assert_eq!(
            route_label(Some("/agent/v1/artifacts/sha256/{hex}")),
            "artifact"
        );
        assert_eq!(route_label(None), "unmatched");
    }
}

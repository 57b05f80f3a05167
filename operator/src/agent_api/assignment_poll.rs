//! `GET /agent/v1/nodes/{node}/assignment?waitSeconds=N`: the long-poll. Answers at
//! once when the assignment differs from the agent's `If-None-Match`, else waits up
//! to N seconds for the cluster view to change and answers 304 if nothing did.

use crate::agent_api::{AgentApi, ApiError};
use crate::placement::assignment::{assignment_etag, etag_matches};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use shoal_api::agent_protocol::{Assignment, MAX_WAIT_SECONDS};
use std::time::Duration;

#[derive(Deserialize)]
pub struct WaitQuery {
    /// How long to wait for a change; 0 (the default) answers at once. More than
    /// `MAX_WAIT_SECONDS` is cut to it.
    #[serde(rename = "waitSeconds", default)]
    wait_seconds: u64,
}

pub async fn assignment(
    State(api): State<AgentApi>,
    Path(node): Path<String>,
    Query(query): Query<WaitQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let agent = api.authenticate(&headers, Some(&node)).await?;
    let wait = Duration::from_secs(query.wait_seconds.min(MAX_WAIT_SECONDS));
    let deadline = tokio::time::Instant::now() + wait;
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok());
    let cluster = &api.fleet.cluster;
    let mut changes = cluster.subscribe();
    // Read the counter before the view, so that a change made while this request
    // computes wakes the wait below.
    let mut seen = *changes.borrow_and_update();
    let mut in_flight = None;
    loop {
        // Noted as assigned: what the agent may download and report from now on.
        let assignment = api
            .fleet
            .assignment_for(&agent, Timestamp::now())
            .ok_or_else(ApiError::not_synced)?;
        let etag = assignment_etag(&assignment);
        if !etag_matches(if_none_match, &etag) {
            return Ok(answer(StatusCode::OK, &etag, Some(assignment)));
        }
        in_flight.get_or_insert_with(|| api.metrics.long_poll_started());
        // Wait for a change that concerns this node; other nodes' label changes
        // wake us too, but cost only this check.
        loop {
            let woke = tokio::select! {
                changed = changes.changed() => changed.is_ok(),
                () = tokio::time::sleep_until(deadline) => false,
            };
            if !woke {
                return Ok(answer(StatusCode::NOT_MODIFIED, &etag, None));
            }
            let latest = *changes.borrow_and_update();
            let concerns_us = cluster.changed_for(&agent.node, seen);
            seen = latest;
            if concerns_us {
                break;
            }
        }
    }
}

fn answer(status: StatusCode, etag: &str, assignment: Option<Assignment>) -> Response {
    let mut response = match assignment {
        Some(assignment) => (status, axum::Json(assignment)).into_response(),
        None => status.into_response(),
    };
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, etag);
    }
    // Proxies must not answer for the operator: the assignment changes at any time.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

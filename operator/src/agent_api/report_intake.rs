//! `POST /agent/v1/nodes/{node}/report`: takes an agent's report, drops the entries
//! of model versions its node was not assigned, keeps the rest as the agent's latest
//! and adds what is new in its counters to the fleet totals. Pool status is written
//! later, coalesced (see `fleet`), never per report.

use crate::agent_api::{AgentApi, ApiError};
use crate::fleet::reports::{keep_assigned, validate_report};
use crate::runtime::metrics::FleetLabels;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use k8s_openapi::jiff::Timestamp;
use shoal_api::agent_protocol::{AgentReport, MAX_REPORT_BYTES};
use std::time::Duration;

/// How long an authenticated agent may take to send its report's body (at most
/// 256 KiB; a few KiB usually).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(15);

pub async fn report(
    State(api): State<AgentApi>,
    Path(node): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    // Who is calling is settled from the headers alone: no byte of the body is read
    // for a client without a valid token, so unauthenticated clients cannot make
    // the operator hold their bodies in memory.
    let agent = api.authenticate(&headers, Some(&node)).await?;
    if !api.fleet.is_leading() {
        // Reports feed status and rollout analysis, which only the leader writes.
        // Agents send cumulative counters, so the next report that reaches the
        // leader loses nothing. The connection is closed: a Service balances per
        // connection, so an agent that kept this one would keep reaching us.
        return Err(ApiError::not_the_leader(
            "this operator replica is not the leader; send the report again in a second, \
             on a new connection (through the Service it reaches any replica, the leader among them)",
        ));
    }
    let body = read_report_body(body).await?;
    let report: AgentReport = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!("the body is not an AgentReport in JSON: {error}"))
    })?;
    let report = validate_report(report, &node).map_err(ApiError::bad_request)?;
    // Only versions the node is (or lately was) assigned reach the fleet state: a
    // report naming made-up versions would otherwise fill the fleet series.
    let now = Timestamp::now();
    api.fleet
        .assignment_for(&agent, now)
        .ok_or_else(ApiError::not_synced)?;
    let (report, unassigned) = keep_assigned(report, |model, version| {
        api.fleet.assigned.has_version(&agent, model, version, now)
    });
    let deltas = api
        .fleet
        .reports
        .record(agent.clone(), report, now)
        .map_err(ApiError::bad_request)?;
    if unassigned > 0 {
        tracing::debug!(
            node = %agent.node,
            pool = %agent.pool,
            namespace = %agent.namespace,
            entries = unassigned,
            "a report names model versions its node was not assigned; they are dropped"
        );
        api.metrics
            .unassigned_report_entries(&agent.namespace, &agent.pool, unassigned as u64);
    }
    for delta in deltas {
        let labels = FleetLabels {
            namespace: agent.namespace.clone(),
            model: delta.model,
            version: delta.version,
            pool: agent.pool.clone(),
        };
        if !api
            .metrics
            .fleet_served(labels, delta.requests, delta.errors)
        {
            tracing::warn!(
                node = %agent.node,
                pool = %agent.pool,
                namespace = %agent.namespace,
                "fleet telemetry holds the most series it may; a new model version's counts are dropped"
            );
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The report's body, at most [`MAX_REPORT_BYTES`], within [`BODY_READ_TIMEOUT`].
async fn read_report_body(body: Body) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, MAX_REPORT_BYTES),
    )
    .await
    {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a report is at most {MAX_REPORT_BYTES} bytes (or its body ended early); send fewer models per report"
            ),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the report's body did not arrive within {BODY_READ_TIMEOUT:?}; send it again"),
        )),
    }
}

//! Bytes → the agent wire protocol (`shoal_api::agent_protocol`) on both ends:
//!
//! - the operator's side of `POST /agent/v1/nodes/{node}/report`: parse an
//!   `AgentReport`, `validate_report` it (for its own node, so the later checks
//!   run too), then record it twice in a `ReportIndex` (counter deltas);
//! - the agent's side of the assignment long-poll: parse an `Assignment`, and turn
//!   each model's digest into the cache file name (`cache::digest_hex`).
//!
//! Checks: no panic or abort; a report that validates keeps the limits it was
//! checked against, its error text is cut to 1024 characters, recording the same
//! report again adds nothing; an assignment serializes and parses back to itself;
//! an accepted digest is 64 lowercase hex digits (it becomes a file name).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_agent::cache::digest_hex;
use shoal_api::agent_protocol::{
    AgentReport, Assignment, MAX_LATENCY_BUCKETS, MAX_REPORTED_MODELS,
};
use shoal_operator::fleet::reports::{Agent, ReportIndex, validate_report};

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = serde_json::from_slice::<AgentReport>(data) {
        // Sent to another node's path: always refused.
        assert!(validate_report(report.clone(), &format!("{}-other", report.node)).is_err());
        let node = report.node.clone();
        if let Ok(report) = validate_report(report, &node) {
            assert!(report.models.len() <= MAX_REPORTED_MODELS);
            for model in &report.models {
                assert!(model.errors <= model.requests);
                assert!(model.latency_buckets.len() <= MAX_LATENCY_BUCKETS);
                assert!(
                    model
                        .error
                        .as_ref()
                        .is_none_or(|e| e.chars().count() <= 1024)
                );
            }
            serde_json::to_vec(&report).expect("a valid report serializes");
            let started: jiff::Timestamp = "2025-06-01T12:00:00Z".parse().expect("timestamp");
            let index = ReportIndex::new(started);
            let agent = Agent {
                namespace: "shop".into(),
                pool: "pool".into(),
                node,
            };
            let now: jiff::Timestamp = "2025-06-01T13:00:00Z".parse().expect("timestamp");
            let first = index
                .record(agent.clone(), report.clone(), now)
                .expect("the first report of an agent is kept");
            assert!(first.len() <= report.models.len());
            let again = index
                .record(agent, report, now)
                .expect("the same start time again is kept");
            assert!(again.is_empty(), "the same report twice adds {again:?}");
        }
    }
    if let Ok(assignment) = serde_json::from_slice::<Assignment>(data) {
        for model in &assignment.models {
            if let Ok(hex) = digest_hex(&model.artifact_digest) {
                assert_eq!(hex.len(), 64);
                assert!(
                    hex.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                );
            }
        }
        let json = serde_json::to_vec(&assignment).expect("an assignment serializes");
        let back: Assignment = serde_json::from_slice(&json).expect("its own JSON parses");
        assert_eq!(back, assignment);
    }
});

//! Leader election on a coordination.k8s.io Lease, so that several operator replicas
//! run safely: only the leader runs the controllers (and so writes status); every
//! replica serves the agent API from its own watches.
//!
//! The protocol is client-go's: the holder renews `renewTime` every renew interval;
//! anyone may take the lease once `renewTime + leaseDurationSeconds` has passed.
//! Updates carry the resourceVersion read, so two candidates cannot both win. A
//! leader that cannot renew within the lease duration stops leading (the process
//! exits and its restart rejoins as a candidate), before anyone else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Who this replica is (its Pod name): written as holderIdentity.
    pub identity: String,
    /// How long a lease stays valid without renewal (15 s, as in client-go).
    pub lease_duration: Duration,
    /// How often the holder renews and a candidate retries (2 s).
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        Self {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate may do with a lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder let it expire: take it.
    Take,
    /// Someone else holds it.
    Wait { holder: String },
}

/// Pure: what `identity` may do with a lease whose spec is `spec`, at `now`.
pub fn verdict(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Verdict {
    let Some(spec) = spec else {
        return Verdict::Take;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Verdict::Take;
    }
    if holder == identity {
        return Verdict::Renew;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15).max(1));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    let expired = match renewed {
        None => true,
        Some(renewed) => renewed
            .checked_add(jiff_seconds(duration))
            .is_ok_and(|deadline| deadline < now),
    };
    if expired {
        Verdict::Take
    } else {
        Verdict::Wait { holder }
    }
}

fn jiff_seconds(seconds: i64) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(seconds)
}

/// The lease spec after `identity` renews or takes it at `now`.
pub fn next_spec(
    current: Option<&LeaseSpec>,
    identity: &str,
    lease_duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let ours = current.and_then(|s| s.holder_identity.as_deref()) == Some(identity);
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(lease_duration.as_secs().max(1) as i32),
        acquire_time: if ours {
            current.and_then(|s| s.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours || current.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

/// Campaigns for the lease until the process ends. `leading` turns true when this
/// replica becomes the leader. If it then fails to renew for a whole lease duration,
/// it returns: the caller must stop leading (exit), because another replica may take
/// over from then on.
pub async fn campaign(client: Client, config: LeaseConfig, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        match try_once(&api, &config).await {
            Ok(true) => {
                if last_renewed.is_none() {
                    tracing::info!(lease = %config.name, identity = %config.identity, "became the leader");
                    let _ = leading.send(true);
                }
                last_renewed = Some(tokio::time::Instant::now());
            }
            Ok(false) => {
                if last_renewed.is_some() {
                    tracing::error!(lease = %config.name, "another replica holds the lease now");
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(lease = %config.name, %error, "leader election: could not read or write the lease");
            }
        }
        if let Some(renewed) = last_renewed
            && renewed.elapsed() >= config.lease_duration
        {
            tracing::error!(lease = %config.name, "could not renew the lease within its duration");
            return;
        }
        tokio::time::sleep(config.retry_period).await;
    }
}

/// One attempt: true when we hold the lease afterwards.
async fn try_once(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&config.name).await?;
    let spec = current.as_ref().and_then(|lease| lease.spec.as_ref());
    match verdict(spec, &config.identity, now) {
        Verdict::Wait { .. } => Ok(false),
        Verdict::Renew | Verdict::Take => {
            let spec = next_spec(spec, &config.identity, config.lease_duration, now);
            let result = match current {
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(config.name.clone()),
                            namespace: Some(config.namespace.clone()),
                            ..Default::default()
                        },
                        spec: Some(spec),
                    };
                    api.create(&PostParams::default(), &lease).await
                }
                Some(mut lease) => {
                    // The resourceVersion read makes this a compare-and-swap.
                    lease.spec = Some(spec);
                    api.replace(&config.name, &PostParams::default(), &lease)
                        .await
                }
            };
            match result {
                Ok(_) => Ok(true),
                // Someone else wrote it first (409) or created it first (409): not us.
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_750_000_000 + seconds).expect("timestamp")
    }

    fn held_by(holder: &str, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(0))),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn verdict_table() {
        let cases = [
            (None, 0, Verdict::Take),
            (Some(LeaseSpec::default()), 0, Verdict::Take),
            (Some(held_by("me", 0, 15)), 100, Verdict::Renew),
            (
                Some(held_by("other", 0, 15)),
                10,
                Verdict::Wait {
                    holder: "other".into(),
                },
            ),
            (
                Some(held_by("other", 0, 15)),
                15,
                Verdict::Wait {
                    holder: "other".into(),
                },
            ),
            (Some(held_by("other", 0, 15)), 16, Verdict::Take),
        ];
        for (spec, now, expected) in cases {
            assert_eq!(
                verdict(spec.as_ref(), "me", at(now)),
                expected,
                "{spec:?} at {now}"
            );
        }
    }

    #[test]
    fn taking_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let other = held_by("other", 0, 15);
        let taken = next_spec(Some(&other), "me", Duration::from_secs(15), at(20));
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(20))));
        let renewed = next_spec(Some(&taken), "me", Duration::from_secs(15), at(22));
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(22))));
        let first = next_spec(None, "me", Duration::from_secs(15), at(1));
        assert_eq!(first.lease_transitions, Some(0));
    }
}

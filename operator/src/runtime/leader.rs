//! Leader election on a coordination.k8s.io Lease, so that several operator replicas
//! run safely: only the leader runs the controllers (and so writes status); every
//! replica serves the agent API from its own watches.
//!
//! The protocol is client-go's: the holder renews `renewTime` every retry period;
//! a candidate may take the lease once it has seen the same lease record, unchanged,
//! for `leaseDurationSeconds` by its own clock (never by comparing the holder's
//! timestamps with its own clock: two machines' clocks differ). Updates carry the
//! resourceVersion read, so two candidates cannot both win.
//!
//! A leader that has not renewed within the renew deadline (10 s, shorter than the
//! 15 s lease) stops leading at that deadline, even while a lease call is still
//! hanging: every call is cut off at the deadline. The process then exits and its
//! restart rejoins as a candidate, 5 s before any other replica may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Who this replica is (its Pod name): written as holderIdentity.
    pub identity: String,
    /// How long a lease stays valid without renewal (15 s, as in client-go).
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal (10 s, as in
    /// client-go). Shorter than `lease_duration`, so the old leader has stopped
    /// before anyone else may take the lease.
    pub renew_deadline: Duration,
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
            renew_deadline: Duration::from_secs(10),
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

/// Pure: what `identity` may do with a lease whose spec is `spec`, when this
/// replica has seen that same record (holder and renew time) unchanged for
/// `unchanged_for`, measured on its own clock.
pub fn verdict(spec: Option<&LeaseSpec>, identity: &str, unchanged_for: Duration) -> Verdict {
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
    let duration = u64::try_from(spec.lease_duration_seconds.unwrap_or(15).max(1)).unwrap_or(15);
    if unchanged_for > Duration::from_secs(duration) {
        Verdict::Take
    } else {
        Verdict::Wait { holder }
    }
}

/// The part of a lease record whose change shows that its holder is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    acquire_time: Option<Timestamp>,
}

impl Record {
    fn of(spec: Option<&LeaseSpec>) -> Option<Record> {
        spec.map(|spec| Record {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
        })
    }
}

/// Remembers when this replica last saw the lease record change, on its own
/// monotonic clock.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Option<Record>, Instant)>,
}

impl Observer {
    /// How long the record `spec` has been unchanged, as seen at `now`.
    pub fn unchanged_for(&mut self, spec: Option<&LeaseSpec>, now: Instant) -> Duration {
        let record = Record::of(spec);
        match &self.last {
            Some((seen, since)) if *seen == record => now.saturating_duration_since(*since),
            _ => {
                self.last = Some((record, now));
                Duration::ZERO
            }
        }
    }
}

/// Pure: the instant at which a leader whose last successful renewal started at
/// `renewed` must stop leading.
pub fn leading_deadline(renewed: Instant, config: &LeaseConfig) -> Instant {
    renewed + config.renew_deadline
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
/// replica becomes the leader. If it then goes a whole renew deadline without a
/// successful renewal, or sees another holder, it returns at once (a lease call still
/// hanging is abandoned): the caller must stop leading (exit), because another
/// replica may take over once the lease duration has passed.
pub async fn campaign(client: Client, config: LeaseConfig, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observer = Observer::default();
    // When the last successful renewal started, while we lead.
    let mut renewed: Option<Instant> = None;
    loop {
        let started = Instant::now();
        // Leading: no call may outlast the deadline. A candidate bounds its calls too,
        // so that a hung API server cannot wedge the campaign.
        let cutoff = match renewed {
            Some(last) => leading_deadline(last, &config),
            None => started + config.renew_deadline,
        };
        let attempt = tokio::time::timeout_at(cutoff, try_once(&api, &config, &mut observer));
        match attempt.await {
            Ok(Ok(true)) => {
                if renewed.is_none() {
                    tracing::info!(lease = %config.name, identity = %config.identity, "became the leader");
                    let _ = leading.send(true);
                }
                renewed = Some(started);
            }
            Ok(Ok(false)) => {
                if renewed.is_some() {
                    tracing::error!(lease = %config.name, "another replica holds the lease now");
                    return;
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(lease = %config.name, %error, "leader election: could not read or write the lease");
            }
            Err(_) => {
                tracing::warn!(lease = %config.name, timeout = ?cutoff.saturating_duration_since(started), "leader election: the API server did not answer in time");
            }
        }
        if let Some(last) = renewed {
            let deadline = leading_deadline(last, &config);
            if Instant::now() >= deadline {
                tracing::error!(
                    lease = %config.name,
                    renew_deadline = ?config.renew_deadline,
                    "could not renew the lease within the renew deadline"
                );
                return;
            }
            tokio::time::sleep_until((Instant::now() + config.retry_period).min(deadline)).await;
        } else {
            tokio::time::sleep(config.retry_period).await;
        }
    }
}

/// One attempt: true when we hold the lease afterwards.
async fn try_once(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observer: &mut Observer,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&config.name).await?;
    let spec = current.as_ref().and_then(|lease| lease.spec.as_ref());
    let unchanged_for = observer.unchanged_for(spec, Instant::now());
    match verdict(spec, &config.identity, unchanged_for) {
        Verdict::Wait { .. } => Ok(false),
        Verdict::Renew | Verdict::Take => {
            let spec = next_spec(
                spec,
                &config.identity,
                config.lease_duration,
                Timestamp::now(),
            );
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
        let secs = Duration::from_secs;
        let cases = [
            (None, secs(0), Verdict::Take),
            (Some(LeaseSpec::default()), secs(0), Verdict::Take),
            (Some(held_by("me", 0, 15)), secs(100), Verdict::Renew),
            (
                Some(held_by("other", 0, 15)),
                secs(10),
                Verdict::Wait {
                    holder: "other".into(),
                },
            ),
            (
                Some(held_by("other", 0, 15)),
                secs(15),
                Verdict::Wait {
                    holder: "other".into(),
                },
            ),
            (Some(held_by("other", 0, 15)), secs(16), Verdict::Take),
            (
                Some(held_by("other", 0, 30)),
                secs(16),
                Verdict::Wait {
                    holder: "other".into(),
                },
            ),
        ];
        for (spec, unchanged_for, expected) in cases {
            assert_eq!(
                verdict(spec.as_ref(), "me", unchanged_for),
                expected,
                "{spec:?} unchanged for {unchanged_for:?}"
            );
        }
    }

    #[test]
    fn expiry_is_measured_on_the_candidates_clock_not_from_the_holders_timestamps() {
        // The holder's clock runs an hour behind: its renewTime looks long expired to
        // a candidate comparing timestamps, but it renews every 2 s.
        let start = Instant::now();
        let mut observer = Observer::default();
        let mut renewed_at = -3600;
        for tick in 0..20u64 {
            let spec = held_by("other", renewed_at, 15);
            let seen = observer.unchanged_for(Some(&spec), start + Duration::from_secs(2 * tick));
            assert_eq!(seen, Duration::ZERO, "a renewal resets the observation");
            assert_eq!(
                verdict(Some(&spec), "me", seen),
                Verdict::Wait {
                    holder: "other".into()
                }
            );
            renewed_at += 2;
        }
        // The holder stops renewing: the same record, seen for longer than the lease.
        let stuck = held_by("other", renewed_at, 15);
        let base = start + Duration::from_secs(40);
        assert_eq!(observer.unchanged_for(Some(&stuck), base), Duration::ZERO);
        let later = observer.unchanged_for(Some(&stuck), base + Duration::from_secs(16));
        assert_eq!(later, Duration::from_secs(16));
        assert_eq!(verdict(Some(&stuck), "me", later), Verdict::Take);
        // A holder whose clock runs ahead is not trusted for longer either.
        let mut fresh = Observer::default();
        let ahead = held_by("other", 3600, 15);
        fresh.unchanged_for(Some(&ahead), base);
        let seen = fresh.unchanged_for(Some(&ahead), base + Duration::from_secs(16));
        assert_eq!(verdict(Some(&ahead), "me", seen), Verdict::Take);
    }

    #[test]
    fn the_leader_stops_before_anyone_may_take_over() {
        let config = LeaseConfig::new("ns".into(), "lease".into(), "me".into());
        let renewed = Instant::now();
        let deadline = leading_deadline(renewed, &config);
        assert_eq!(deadline - renewed, Duration::from_secs(10));
        // A candidate that saw that renewal (no earlier than it started) waits a whole
        // lease duration: the old leader has stopped 5 s before.
        assert!(renewed + config.lease_duration > deadline);
        assert!(config.retry_period < config.renew_deadline);
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

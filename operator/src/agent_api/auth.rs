//! Who is calling the agent API. An agent presents the projected ServiceAccount
//! token its pod mounts (audience `shoal`). A token not signed with the cluster's
//! service-account keys is refused at once ([`token_signature`]); otherwise the API
//! server vouches for it through a TokenReview, and the rule in [`authorize`]
//! decides which agent, if any, it is.

use crate::agent_api::token_cache::{ACCEPTED_TTL, CAPACITY, REJECTED_TTL, TokenCache, token_key};
use crate::agent_api::token_signature::{self, IssuerKeys, unchecked_claims};
use crate::fleet::reports::Agent;
use crate::runtime::metrics::Metrics;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};
use shoal_api::agent_protocol::{AGENT_ACCOUNT_PREFIX, TOKEN_AUDIENCE};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, Semaphore};

/// The extra the API server adds to pod-bound tokens (Kubernetes 1.30 and later):
/// the node the pod runs on.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The extra of pod-bound tokens that names the pod's UID.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";
const TOKEN_REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// TokenReviews in flight at once, for identities accepted before (an agent whose
/// token was renewed) and for new ones: a fleet that reconnects together (after an
/// operator restart) must not flood the API server, and new identities cannot take
/// the places of agents the operator already knows.
const MAX_CONCURRENT_RENEWALS: usize = 8;
const MAX_CONCURRENT_NEW_REVIEWS: usize = 8;
/// How long an identity counts as known after its last accepted token (projected
/// tokens are renewed about every 48 min).
const KNOWN_IDENTITY_TTL: Duration = Duration::from_secs(2 * 3600);
/// The issuer's keys are read again at most this often (on a token with a key id
/// they do not hold, or while they could not be read).
const ISSUER_KEYS_REFRESH: Duration = Duration::from_secs(30);
/// Projected tokens are about 1 KiB; anything this large is not one.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a request was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthError {
    /// 401: no usable token.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403: a valid token, but not of an agent allowed to do this.
    #[error("{0}")]
    Forbidden(String),
    /// 503: the token could not be checked right now; retry.
    #[error("{0}")]
    Unavailable(String),
}

/// What the API server said about a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedToken {
    pub username: String,
    /// The node of the pod the token is bound to; None for tokens not bound to a pod.
    pub node: Option<String>,
    /// The UID of the pod the token is bound to; None for tokens not bound to a pod.
    pub pod_uid: Option<String>,
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(header: Option<&str>) -> Result<&str, AuthError> {
    let missing = || {
        AuthError::Unauthenticated(format!(
            "send `Authorization: Bearer <token>` with the projected ServiceAccount token of the agent's pod (audience {TOKEN_AUDIENCE})"
        ))
    };
    let header = header.ok_or_else(missing)?;
    let (scheme, token) = header.trim().split_once(' ').ok_or_else(missing)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(missing());
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Unauthenticated(format!(
            "the bearer token is {} bytes; a ServiceAccount token is far smaller",
            token.len()
        )));
    }
    Ok(token)
}

/// Reads a TokenReview's answer: the token is valid for audience `shoal`, or 401.
pub fn reviewed_token(status: Option<&TokenReviewStatus>) -> Result<ReviewedToken, AuthError> {
    let status = status.ok_or_else(|| {
        AuthError::Unauthenticated("the API server returned no TokenReview status".into())
    })?;
    if status.authenticated != Some(true) {
        let reason = status.error.as_deref().unwrap_or("the token is not valid");
        return Err(AuthError::Unauthenticated(format!(
            "the API server rejected the token ({reason}); agents present a projected ServiceAccount token with audience {TOKEN_AUDIENCE}"
        )));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|audience| audience == TOKEN_AUDIENCE) {
        return Err(AuthError::Unauthenticated(format!(
            "the token is not meant for Shoal: its audiences are {audiences:?}, not {TOKEN_AUDIENCE}"
        )));
    }
    let user = status.user.as_ref();
    let extra = |name: &str| {
        user.and_then(|user| user.extra.as_ref())
            .and_then(|extra| extra.get(name))
            .and_then(|values| values.first())
            .cloned()
    };
    Ok(ReviewedToken {
        username: user
            .and_then(|user| user.username.clone())
            .unwrap_or_default(),
        node: extra(NODE_NAME_EXTRA),
        pod_uid: extra(POD_UID_EXTRA),
    })
}

/// The `exp` claim (Unix seconds) of a JWT, read without checking its signature:
/// only for a token the API server has just accepted, to cache it no longer than
/// it is valid. None when the token is not a JWT with a numeric `exp`.
pub fn token_expiry(token: &str) -> Option<i64> {
    unchecked_claims(token)?.expiry
}

/// How long an accepted token may be taken from the cache: [`ACCEPTED_TTL`], but
/// never past its expiry; None (do not cache) when it has expired already.
pub fn accepted_ttl(expiry: Option<i64>, now_unix: i64) -> Option<Duration> {
    match expiry {
        None => Some(ACCEPTED_TTL),
        Some(expiry) if expiry <= now_unix => None,
        Some(expiry) => {
            let left = Duration::from_secs(u64::try_from(expiry - now_unix).unwrap_or(0));
            Some(left.min(ACCEPTED_TTL))
        }
    }
}

/// The authorization rule. A caller is the agent of pool `P` in namespace `N` on
/// node `X` when its token:
/// 1. belongs to the ServiceAccount `N/shoal-agent-P` (username
///    `system:serviceaccount:N:shoal-agent-P`), the account the pool's DaemonSet
///    runs as, and an EdgePool `P` exists in `N` (`pool_exists`);
/// 2. is bound to a pod on node `X` (the `authentication.kubernetes.io/node-name`
///    extra), and `X` is the node in the request path, when there is one.
///
/// Anything else is 403. Artifact downloads have no node in their path: any agent
/// may download any stored artifact (digests are not secrets, and the model bytes
/// are what agents serve anyway).
pub fn authorize(
    token: &ReviewedToken,
    path_node: Option<&str>,
    pool_exists: impl Fn(&str, &str) -> bool,
) -> Result<Agent, AuthError> {
    let not_an_agent = |why: String| {
        AuthError::Forbidden(format!(
            "{} is not a Shoal agent: {why}; agents run as the ServiceAccount shoal-agent-<pool> of their EdgePool",
            token.username
        ))
    };
    let (namespace, account) = token
        .username
        .strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| not_an_agent("it is not a ServiceAccount".into()))?;
    let pool = account
        .strip_prefix(AGENT_ACCOUNT_PREFIX)
        .filter(|pool| !pool.is_empty())
        .ok_or_else(|| {
            not_an_agent(format!(
                "ServiceAccount {account} is not named shoal-agent-<pool>"
            ))
        })?;
    if !pool_exists(namespace, pool) {
        return Err(not_an_agent(format!(
            "there is no EdgePool {pool} in namespace {namespace} that this operator manages"
        )));
    }
    let node = token.node.as_deref().ok_or_else(|| {
        AuthError::Forbidden(
            "the token is not bound to a pod on a node; agents present the projected token their pod mounts, not one made with `kubectl create token`".into(),
        )
    })?;
    if let Some(path_node) = path_node
        && path_node != node
    {
        return Err(AuthError::Forbidden(format!(
            "the token belongs to the agent on node {node}; an agent may act only for its own node, not for {path_node}"
        )));
    }
    Ok(Agent {
        namespace: namespace.to_string(),
        pool: pool.to_string(),
        node: node.to_string(),
    })
}

/// Checks tokens: first locally against the service-account issuer's keys (a token
/// it did not sign is refused without a TokenReview), then with a TokenReview, one
/// per token however many requests carry it at once, remembering the verdicts for
/// a short while.
pub struct TokenReviewer {
    client: Client,
    cache: TokenCache<Result<ReviewedToken, AuthError>>,
    /// Usernames accepted lately: their reviews have places of their own.
    known_identities: TokenCache<()>,
    renewals: Semaphore,
    new_reviews: Semaphore,
    /// Reviews running now, by token key: a second request with the same token
    /// waits for the first one's answer.
    in_flight: std::sync::Mutex<HashMap<[u8; 32], Arc<OnceCell<Verdict>>>>,
    issuer_keys: std::sync::RwLock<Option<Arc<IssuerKeys>>>,
    /// When the issuer's keys were last fetched (or tried).
    keys_fetched: tokio::sync::Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

/// What the API server said about a token.
type Verdict = Result<ReviewedToken, AuthError>;

/// What the local check decided.
enum LocalCheck {
    /// Signed by the issuer: a TokenReview decides; the username it claims.
    Signed(String),
    /// Refused without a TokenReview.
    Refused(String),
    /// The issuer's keys are not known: a TokenReview decides.
    NoKeys,
}

impl TokenReviewer {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            cache: TokenCache::new(CAPACITY),
            known_identities: TokenCache::new(CAPACITY),
            renewals: Semaphore::new(MAX_CONCURRENT_RENEWALS),
            new_reviews: Semaphore::new(MAX_CONCURRENT_NEW_REVIEWS),
            in_flight: std::sync::Mutex::new(HashMap::new()),
            issuer_keys: std::sync::RwLock::new(None),
            keys_fetched: tokio::sync::Mutex::new(None),
            metrics,
        }
    }

    /// What the API server says about `token` (401 when it is not valid for
    /// audience `shoal`), from the cache when it was asked recently, unless the pod
    /// the token is bound to has been deleted since (`pod_deleted` of its UID). An
    /// accepted token is cached for at most [`ACCEPTED_TTL`] and never past its
    /// own expiry. A token the service-account issuer did not sign is refused
    /// without asking the API server, and is not cached.
    pub async fn review(
        &self,
        token: &str,
        pod_deleted: impl Fn(&str) -> bool,
    ) -> Result<ReviewedToken, AuthError> {
        if let Some(verdict) = self.cache.get(token, Instant::now()) {
            let pod_gone = matches!(&verdict, Ok(reviewed) if reviewed.pod_uid.as_deref().is_some_and(&pod_deleted));
            if !pod_gone {
                return verdict;
            }
        }
        let claimed = match self.local_check(token).await {
            LocalCheck::Refused(reason) => {
                self.metrics.token_reviewed("refused_locally");
                return Err(AuthError::Unauthenticated(format!(
                    "{reason}; agents present the projected ServiceAccount token of their pod (audience {TOKEN_AUDIENCE})"
                )));
            }
            LocalCheck::Signed(subject) => Some(subject),
            LocalCheck::NoKeys => None,
        };
        let known = claimed
            .as_deref()
            .is_some_and(|subject| self.known_identities.get(subject, Instant::now()).is_some());
        let verdict = self.review_once(token, known).await;
        let now_unix = k8s_openapi::jiff::Timestamp::now().as_second();
        let ttl = match &verdict {
            Ok(reviewed) => {
                self.known_identities.put(
                    &reviewed.username,
                    (),
                    KNOWN_IDENTITY_TTL,
                    Instant::now(),
                );
                accepted_ttl(token_expiry(token), now_unix)
            }
            Err(AuthError::Unauthenticated(_)) => Some(REJECTED_TTL),
            // Not the token's fault: ask again next time.
            Err(_) => None,
        };
        if let Some(ttl) = ttl {
            self.cache.put(token, verdict.clone(), ttl, Instant::now());
        }
        verdict
    }

    /// One TokenReview for `token`, shared by every request that carries it while
    /// it runs.
    async fn review_once(&self, token: &str, known: bool) -> Result<ReviewedToken, AuthError> {
        let key = token_key(token);
        let cell = crate::runtime::lock(&self.in_flight)
            .entry(key)
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let verdict = cell
            .get_or_init(|| self.ask_api_server(token, known))
            .await
            .clone();
        let mut in_flight = crate::runtime::lock(&self.in_flight);
        if in_flight
            .get(&key)
            .is_some_and(|running| Arc::ptr_eq(running, &cell))
        {
            in_flight.remove(&key);
        }
        verdict
    }

    /// The local check against the issuer's keys, reading them first when they are
    /// not known yet or the token names a key id they do not hold.
    async fn local_check(&self, token: &str) -> LocalCheck {
        let now_unix = k8s_openapi::jiff::Timestamp::now().as_second();
        for attempt in 0..2 {
            let keys = self
                .issuer_keys
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            let verdict = keys
                .as_deref()
                .map(|keys| token_signature::check(token, keys, TOKEN_AUDIENCE, now_unix));
            match verdict {
                Some(token_signature::Verdict::Valid { subject, .. }) => {
                    return LocalCheck::Signed(subject);
                }
                Some(token_signature::Verdict::Invalid(reason)) => {
                    return LocalCheck::Refused(reason);
                }
                Some(token_signature::Verdict::UnknownKey(kid)) if attempt == 1 => {
                    return LocalCheck::Refused(format!(
                        "the token is signed with key {kid:?}, which the cluster's service-account issuer does not publish"
                    ));
                }
                None if attempt == 1 => return LocalCheck::NoKeys,
                // No keys yet, or an unknown key id: read the keys (at most every
                // ISSUER_KEYS_REFRESH) and look again.
                _ => self.refresh_issuer_keys().await,
            }
        }
        LocalCheck::NoKeys
    }

    /// Reads the issuer's keys from the API server's OIDC discovery, unless that
    /// was tried less than [`ISSUER_KEYS_REFRESH`] ago; one caller at a time.
    async fn refresh_issuer_keys(&self) {
        let mut fetched = self.keys_fetched.lock().await;
        if fetched.is_some_and(|at| at.elapsed() < ISSUER_KEYS_REFRESH) {
            return;
        }
        *fetched = Some(Instant::now());
        match fetch_issuer_keys(&self.client).await {
            Ok(keys) => {
                tracing::info!(issuer = %keys.issuer, keys = keys.len(), "service-account issuer keys read; tokens it did not sign are refused without a TokenReview");
                *self
                    .issuer_keys
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(keys));
            }
            Err(error) => tracing::warn!(
                %error,
                "cannot read the service-account issuer's keys (/.well-known/openid-configuration, /openid/v1/jwks); every token goes to a TokenReview: grant the operator get on those URLs (ClusterRole system:service-account-issuer-discovery)"
            ),
        }
    }

    async fn ask_api_server(&self, token: &str, known: bool) -> Result<ReviewedToken, AuthError> {
        let unavailable = |why: String| {
            AuthError::Unavailable(format!("cannot check the token right now ({why}); retry"))
        };
        let places = if known {
            &self.renewals
        } else {
            &self.new_reviews
        };
        let _permit = tokio::time::timeout(TOKEN_REVIEW_TIMEOUT, places.acquire())
            .await
            .map_err(|_| unavailable("too many token checks are waiting".into()))?
            .map_err(|_| unavailable("the operator is shutting down".into()))?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = tokio::time::timeout(
            TOKEN_REVIEW_TIMEOUT,
            api.create(&PostParams::default(), &review),
        )
        .await;
        let reviewed = match answer {
            Ok(Ok(reviewed)) => reviewed,
            Ok(Err(kube::Error::Api(status))) if status.code == 403 => {
                self.metrics.token_reviewed("error");
                tracing::error!(
                    message = %status.message,
                    "the operator may not create TokenReviews, so no agent can authenticate: grant its ServiceAccount `create` on `tokenreviews` in API group authentication.k8s.io"
                );
                return Err(unavailable(
                    "the operator may not create TokenReviews".into(),
                ));
            }
            Ok(Err(error)) => {
                self.metrics.token_reviewed("error");
                tracing::warn!(%error, "TokenReview failed");
                return Err(unavailable(format!("TokenReview failed: {error}")));
            }
            Err(_) => {
                self.metrics.token_reviewed("error");
                return Err(unavailable(format!(
                    "the API server did not answer a TokenReview within {TOKEN_REVIEW_TIMEOUT:?}"
                )));
            }
        };
        let verdict = reviewed_token(reviewed.status.as_ref());
        self.metrics.token_reviewed(if verdict.is_ok() {
            "authenticated"
        } else {
            "rejected"
        });
        verdict
    }
}

/// The service-account issuer and its keys, from the API server's OIDC discovery.
async fn fetch_issuer_keys(client: &Client) -> Result<IssuerKeys, String> {
    let get = |path: &str| {
        axum::http::Request::get(path)
            .body(Vec::new())
            .map_err(|error| error.to_string())
    };
    let discovery = tokio::time::timeout(
        TOKEN_REVIEW_TIMEOUT,
        client.request_text(get("/.well-known/openid-configuration")?),
    )
    .await
    .map_err(|_| "the API server did not answer".to_string())?
    .map_err(|error| error.to_string())?;
    let discovery: serde_json::Value = serde_json::from_str(&discovery)
        .map_err(|error| format!("discovery is not JSON: {error}"))?;
    let issuer = discovery
        .get("issuer")
        .and_then(|v| v.as_str())
        .ok_or("the discovery document names no issuer")?
        .to_string();
    let jwks = tokio::time::timeout(
        TOKEN_REVIEW_TIMEOUT,
        client.request_text(get("/openid/v1/jwks")?),
    )
    .await
    .map_err(|_| "the API server did not answer".to_string())?
    .map_err(|error| error.to_string())?;
    IssuerKeys::from_jwks(issuer, jwks.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn status(
        authenticated: bool,
        audiences: &[&str],
        username: &str,
        node: Option<&str>,
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            error: (!authenticated).then(|| "token audiences [\"other\"] is invalid".into()),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: node.map(|node| {
                    BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![node.to_string()])])
                }),
                ..Default::default()
            }),
        }
    }

    const AGENT: &str = "system:serviceaccount:shop:shoal-agent-stores";

    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer_token(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("bearer  abc ")), Ok("abc"));
        for bad in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some("Basic abc"),
        ] {
            assert!(
                matches!(bearer_token(bad), Err(AuthError::Unauthenticated(_))),
                "{bad:?}"
            );
        }
        let huge = format!("Bearer {}", "x".repeat(MAX_TOKEN_BYTES + 1));
        assert!(matches!(
            bearer_token(Some(&huge)),
            Err(AuthError::Unauthenticated(_))
        ));
    }

    #[test]
    fn review_answers() {
        let ok = reviewed_token(Some(&status(true, &["shoal"], AGENT, Some("n1"))));
        assert_eq!(
            ok,
            Ok(ReviewedToken {
                username: AGENT.into(),
                node: Some("n1".into()),
                pod_uid: None,
            })
        );
        let rejected = reviewed_token(Some(&status(false, &[], "", None)));
        assert!(
            matches!(&rejected, Err(AuthError::Unauthenticated(m)) if m.contains("audience")),
            "{rejected:?}"
        );
        let other_audience = reviewed_token(Some(&status(true, &["other"], AGENT, Some("n1"))));
        assert!(matches!(other_audience, Err(AuthError::Unauthenticated(_))));
        assert!(matches!(
            reviewed_token(None),
            Err(AuthError::Unauthenticated(_))
        ));
    }

    #[test]
    fn authorization_table() {
        let pools = |namespace: &str, pool: &str| namespace == "shop" && pool == "stores";
        let token = |username: &str, node: Option<&str>| ReviewedToken {
            username: username.into(),
            node: node.map(String::from),
            pod_uid: None,
        };
        let agent = Agent {
            namespace: "shop".into(),
            pool: "stores".into(),
            node: "n1".into(),
        };
        assert_eq!(
            authorize(&token(AGENT, Some("n1")), Some("n1"), pools),
            Ok(agent.clone())
        );
        assert_eq!(authorize(&token(AGENT, Some("n1")), None, pools), Ok(agent));
        let forbidden = [
            (
                "another node's agent",
                token(AGENT, Some("n2")),
                Some("n1"),
                "only for its own node",
            ),
            (
                "token not bound to a pod",
                token(AGENT, None),
                Some("n1"),
                "not bound to a pod",
            ),
            (
                "a user",
                token("alice", Some("n1")),
                Some("n1"),
                "not a ServiceAccount",
            ),
            (
                "another ServiceAccount",
                token("system:serviceaccount:shop:default", Some("n1")),
                Some("n1"),
                "not named shoal-agent-<pool>",
            ),
            (
                "the bare prefix",
                token("system:serviceaccount:shop:shoal-agent-", Some("n1")),
                Some("n1"),
                "not named shoal-agent-<pool>",
            ),
            (
                "an agent account without a pool",
                token("system:serviceaccount:shop:shoal-agent-gone", Some("n1")),
                Some("n1"),
                "no EdgePool gone",
            ),
            (
                "a pool's account in another namespace",
                token("system:serviceaccount:other:shoal-agent-stores", Some("n1")),
                Some("n1"),
                "no EdgePool stores in namespace other",
            ),
        ];
        for (what, token, path_node, says) in forbidden {
            match authorize(&token, path_node, pools) {
                Err(AuthError::Forbidden(message)) => {
                    assert!(message.contains(says), "{what}: {message}")
                }
                other => panic!("{what}: expected 403, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_pod_bound_token_names_its_pod() {
        let mut answer = status(true, &["shoal"], AGENT, Some("n1"));
        if let Some(extra) = answer.user.as_mut().and_then(|u| u.extra.as_mut()) {
            extra.insert(POD_UID_EXTRA.into(), vec!["uid-1".into()]);
        }
        let reviewed = reviewed_token(Some(&answer)).expect("accepted");
        assert_eq!(reviewed.pod_uid.as_deref(), Some("uid-1"));
    }

    #[test]
    fn the_cache_never_outlives_the_token() {
        // {"aud":["shoal"],"exp":1750000100,"sub":"x"} as a JWT payload.
        let payload = "eyJhdWQiOlsic2hvYWwiXSwiZXhwIjoxNzUwMDAwMTAwLCJzdWIiOiJ4In0";
        let token = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2lnbmF0dXJl");
        assert_eq!(token_expiry(&token), Some(1_750_000_100));
        assert_eq!(token_expiry("not-a-jwt"), None);
        assert_eq!(token_expiry("a.!!!.c"), None);
        assert_eq!(
            accepted_ttl(Some(1_750_000_100), 1_750_000_000),
            Some(ACCEPTED_TTL)
        );
        assert_eq!(
            accepted_ttl(Some(1_750_000_100), 1_750_000_090),
            Some(Duration::from_secs(10))
        );
        assert_eq!(accepted_ttl(Some(1_750_000_100), 1_750_000_100), None);
        assert_eq!(accepted_ttl(None, 1_750_000_000), Some(ACCEPTED_TTL));
    }
}

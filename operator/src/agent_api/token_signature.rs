//! A first check of a bearer token without asking the API server: is it a JWT
//! signed with one of the cluster's service-account signing keys, for audience
//! `shoal`, and not expired? The issuer's public keys come from the API server's OIDC discovery
//! (`/openid/v1/jwks`). A token that fails here is refused at once and costs no
//! TokenReview, so a flood of made-up tokens cannot crowd out real agents' reviews.
//! A token that passes still goes to a TokenReview (which also checks that its pod
//! still exists): this check only filters.
//!
//! Pure: [`check`] decides from the token, the keys and the time.

use ring::signature;
use std::collections::HashMap;

/// Clock difference tolerated between the operator and the API server, for
/// `exp` and `nbf`.
pub const LEEWAY_SECONDS: i64 = 60;

/// The issuer's name and its signing keys by key id.
#[derive(Debug, Clone, Default)]
pub struct IssuerKeys {
    pub issuer: String,
    keys: HashMap<String, PublicKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicKey {
    /// RS256: modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// ES256: the uncompressed P-256 point (0x04 || x || y).
    P256 { point: Vec<u8> },
}

impl IssuerKeys {
    /// The keys of a JWK Set (the API server's `/openid/v1/jwks`). Keys of other
    /// types or without a key id are skipped.
    pub fn from_jwks(issuer: String, jwks: &[u8]) -> Result<IssuerKeys, String> {
        let set: serde_json::Value = serde_json::from_slice(jwks)
            .map_err(|error| format!("the JWK Set is not JSON: {error}"))?;
        let entries = set
            .get("keys")
            .and_then(|keys| keys.as_array())
            .ok_or("the JWK Set has no keys array")?;
        let mut keys = HashMap::new();
        for entry in entries {
            let field = |name: &str| {
                entry
                    .get(name)
                    .and_then(|v| v.as_str())
                    .and_then(base64url_decode)
            };
            let Some(kid) = entry.get("kid").and_then(|v| v.as_str()) else {
                continue;
            };
            let key = match entry.get("kty").and_then(|v| v.as_str()) {
                Some("RSA") => match (field("n"), field("e")) {
                    (Some(n), Some(e)) => PublicKey::Rsa { n, e },
                    _ => continue,
                },
                Some("EC") if entry.get("crv").and_then(|v| v.as_str()) == Some("P-256") => {
                    match (field("x"), field("y")) {
                        (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                            let mut point = vec![0x04];
                            point.extend_from_slice(&x);
                            point.extend_from_slice(&y);
                            PublicKey::P256 { point }
                        }
                        _ => continue,
                    }
                }
                _ => continue,
            };
            keys.insert(kid.to_string(), key);
        }
        if keys.is_empty() {
            return Err("the JWK Set holds no RS256 or ES256 key with a key id".into());
        }
        Ok(IssuerKeys { issuer, keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What the local check says about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Signed by the issuer, for the audience, within its lifetime.
    Valid {
        subject: String,
        expiry: Option<i64>,
    },
    /// Not a token the API server would accept; the reason.
    Invalid(String),
    /// Signed with a key id the keys do not hold: the issuer may have rotated its
    /// keys since they were read.
    UnknownKey(String),
}

/// The claims of a JWT whose signature has not been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UncheckedClaims {
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub audiences: Vec<String>,
    pub expiry: Option<i64>,
    pub not_before: Option<i64>,
}

/// The claims of `token` read without checking its signature, or None when it is
/// not a JWT.
pub fn unchecked_claims(token: &str) -> Option<UncheckedClaims> {
    let payload = token.split('.').nth(1)?;
    let claims: serde_json::Value = serde_json::from_slice(&base64url_decode(payload)?).ok()?;
    let text = |name: &str| claims.get(name).and_then(|v| v.as_str()).map(String::from);
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        Some(serde_json::Value::Array(many)) => many
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    Some(UncheckedClaims {
        issuer: text("iss"),
        subject: text("sub"),
        audiences,
        expiry: claims.get("exp").and_then(|v| v.as_i64()),
        not_before: claims.get("nbf").and_then(|v| v.as_i64()),
    })
}

/// Checks `token` against the issuer's `keys` for `audience` at `now_unix`.
pub fn check(token: &str, keys: &IssuerKeys, audience: &str, now_unix: i64) -> Verdict {
    let invalid = |why: &str| Verdict::Invalid(format!("the token {why}"));
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return invalid("is not a JWT (three base64url parts separated by dots)");
    };
    let Some(header) = base64url_decode(header)
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
    else {
        return invalid("has no readable JWT header");
    };
    let Some(signature) = base64url_decode(signature) else {
        return invalid("has no readable signature");
    };
    let algorithm = header
        .get("alg")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let kid = header
        .get("kid")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let Some(key) = keys.keys.get(kid) else {
        return Verdict::UnknownKey(kid.to_string());
    };
    let signed = &token[..header_and_payload_len(token)];
    let verified = match (algorithm, key) {
        ("RS256", PublicKey::Rsa { n, e }) => signature::RsaPublicKeyComponents { n, e }
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                signed.as_bytes(),
                &signature,
            )
            .is_ok(),
        ("ES256", PublicKey::P256 { point }) => {
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed.as_bytes(), &signature)
                .is_ok()
        }
        _ => {
            return invalid(&format!(
                "is signed with {algorithm:?}, not what key {kid:?} is for"
            ));
        }
    };
    if !verified {
        return invalid("has a signature the service-account issuer did not make");
    }
    let Some(claims) = unchecked_claims(&format!("x.{payload}")) else {
        return invalid("has no readable claims");
    };
    // The issuer is left to the TokenReview: an API server that is moving to a new
    // issuer name accepts tokens of the old one too, signed with the same keys,
    // while its discovery names only the new one.
    if !claims.audiences.iter().any(|a| a == audience) {
        return invalid(&format!(
            "is for audiences {:?}, not {audience}",
            claims.audiences
        ));
    }
    if claims
        .expiry
        .is_some_and(|exp| exp + LEEWAY_SECONDS <= now_unix)
    {
        return invalid("has expired");
    }
    if claims
        .not_before
        .is_some_and(|nbf| nbf - LEEWAY_SECONDS > now_unix)
    {
        return invalid("is not valid yet");
    }
    let Some(subject) = claims.subject else {
        return invalid("names no subject");
    };
    Verdict::Valid {
        subject,
        expiry: claims.expiry,
    }
}

fn header_and_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

/// Decodes unpadded (or padded) base64url, as JWT segments are written.
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        })
    };
    let digits = text.trim_end_matches('=').as_bytes();
    if digits.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut bits = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            bits |= value(*c)? << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
    /// An RSA key made with openssl for this test, and a token it signed:
    /// {"alg":"RS256","kid":"test-key"} / {"aud":["shoal"],"exp":1750003600,
    /// "nbf":1750000000,"iss":ISSUER,"sub":"system:serviceaccount:shop:shoal-agent-stores"}.
    const JWKS: &str = r#"{"keys":[{"use":"sig","kty":"RSA","kid":"test-key","alg":"RS256","n":"shCSC0HHc1Chpf0ICy0mEjvYSzBpBejvQRy7F_kAQ-PLlWmFcZ2wQVbsdhqpkvqn4xa3n43ng5ryOPCHMQJZ1AunZjYBR8x7fG108Q_3i8ES4afsRfNUWL1nuTgTd4I5nICjan6TFOop3fOb99MagNHzyqYBUmdHPld9PWoyFZ1N11Eh8di_GBqiYolkAx19eusXifGdhy1jlgDTL3Uxb6G5HfnQ0tIgHgj94QYRk4zUuohJTmj0dH_CQHBy91UCXpZAUNt_v7zH7r_kxKqJH16sn-OGfDTuN25IY9BdBPDA5wvsAFo6IqaBRlBHdbceS5sVkx5xASuVZCQqlja5Yw","e":"AQAB"}]}"#;
    const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3Qta2V5In0.eyJhdWQiOlsic2hvYWwiXSwiZXhwIjoxNzUwMDAzNjAwLCJpYXQiOjE3NTAwMDAwMDAsIm5iZiI6MTc1MDAwMDAwMCwiaXNzIjoiaHR0cHM6Ly9rdWJlcm5ldGVzLmRlZmF1bHQuc3ZjLmNsdXN0ZXIubG9jYWwiLCJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6c2hvcDpzaG9hbC1hZ2VudC1zdG9yZXMifQ.r9LA2R1zPoqfYRce1v6B8aVaSm_SNd23c3P4w74qlsHq_aZJDPYpYyBSsMQpc7-HBtfnEwzeA37AQImqtP2VEA8tHIJTNXxQQSjUSPhqN2sJDWWbDPUdY6eaP086pSg3wHUhtdVpKTGMZMCdgrz2VE0X0W-6f12-b9uUX8Y6YAGfL8klgvUg76-gIy_dF_Xi1wbdHXKDQ8kUuuZOYoHLmnFiz3TJFX2YPkqQRZkf88x1xUk3o6y8hl1mVQ_QaHCOu8h-04dgcQzcrtLWGwsdwl7wPbSYPvgjxVowd_1kz_dmbV4shTu-oCpRBcl6ojtdF9N7m6GZM8JSDtNmaVvkJg";
    const AGENT: &str = "system:serviceaccount:shop:shoal-agent-stores";

    fn keys() -> IssuerKeys {
        IssuerKeys::from_jwks(ISSUER.into(), JWKS.as_bytes()).expect("keys")
    }

    #[test]
    fn a_token_the_issuer_signed_is_valid_within_its_lifetime() {
        assert_eq!(
            check(TOKEN, &keys(), "shoal", 1_750_000_100),
            Verdict::Valid {
                subject: AGENT.into(),
                expiry: Some(1_750_003_600)
            }
        );
        let expired = check(TOKEN, &keys(), "shoal", 1_750_003_600 + LEEWAY_SECONDS);
        assert!(
            matches!(&expired, Verdict::Invalid(m) if m.contains("expired")),
            "{expired:?}"
        );
        let early = check(TOKEN, &keys(), "shoal", 1_750_000_000 - LEEWAY_SECONDS - 1);
        assert!(
            matches!(&early, Verdict::Invalid(m) if m.contains("not valid yet")),
            "{early:?}"
        );
        let other_audience = check(TOKEN, &keys(), "other", 1_750_000_100);
        assert!(matches!(other_audience, Verdict::Invalid(_)));
        // A token of another issuer name, signed with a published key, is left to
        // the TokenReview (an issuer migration).
        let renamed =
            IssuerKeys::from_jwks("https://new-issuer".into(), JWKS.as_bytes()).expect("keys");
        assert!(matches!(
            check(TOKEN, &renamed, "shoal", 1_750_000_100),
            Verdict::Valid { .. }
        ));
    }

    #[test]
    fn made_up_and_tampered_tokens_are_invalid() {
        let keys = keys();
        let at = 1_750_000_100;
        for junk in ["", "x", "a.b", "a.b.c.d", "not a token at all", "..."] {
            assert!(
                matches!(check(junk, &keys, "shoal", at), Verdict::Invalid(_)),
                "{junk:?}"
            );
        }
        // Another payload under the same signature.
        let (head, rest) = TOKEN.split_once('.').expect("parts");
        let (_, signature) = rest.rsplit_once('.').expect("parts");
        let forged_claims = "eyJhdWQiOlsic2hvYWwiXSwiZXhwIjo5OTk5OTk5OTk5LCJpc3MiOiJodHRwczovL2t1YmVybmV0ZXMuZGVmYXVsdC5zdmMuY2x1c3Rlci5sb2NhbCIsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpzaG9wOnNob2FsLWFnZW50LXN0b3JlcyJ9";
        let forged = format!("{head}.{forged_claims}.{signature}");
        let verdict = check(&forged, &keys, "shoal", at);
        assert!(
            matches!(&verdict, Verdict::Invalid(m) if m.contains("signature")),
            "{verdict:?}"
        );
        // alg none is never accepted.
        let none = format!("eyJhbGciOiJub25lIiwia2lkIjoidGVzdC1rZXkifQ.{forged_claims}.");
        assert!(matches!(
            check(&none, &keys, "shoal", at),
            Verdict::Invalid(_)
        ));
        // A key id the keys do not hold.
        let unknown = TOKEN.replacen(
            "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3Qta2V5In0",
            "eyJhbGciOiJSUzI1NiIsImtpZCI6Im90aGVyIn0",
            1,
        );
        assert_eq!(
            check(&unknown, &keys, "shoal", at),
            Verdict::UnknownKey("other".into())
        );
    }

    #[test]
    fn es256_tokens_are_checked_too() {
        use ring::rand::SystemRandom;
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pair");
        let point = pair.public_key().as_ref();
        let b64 = |bytes: &[u8]| encode(bytes);
        let jwks = format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"ec","x":"{}","y":"{}"}}]}}"#,
            b64(&point[1..33]),
            b64(&point[33..65])
        );
        let keys = IssuerKeys::from_jwks(ISSUER.into(), jwks.as_bytes()).expect("keys");
        let header = b64(br#"{"alg":"ES256","kid":"ec"}"#);
        let payload = b64(format!(
            r#"{{"aud":"shoal","exp":1750003600,"iss":"{ISSUER}","sub":"{AGENT}"}}"#
        )
        .as_bytes());
        let signed = format!("{header}.{payload}");
        let signature = pair.sign(&rng, signed.as_bytes()).expect("sign");
        let token = format!("{signed}.{}", b64(signature.as_ref()));
        assert!(matches!(
            check(&token, &keys, "shoal", 1_750_000_000),
            Verdict::Valid { .. }
        ));
        let tampered = format!("{signed}x.{}", b64(signature.as_ref()));
        assert!(matches!(
            check(&tampered, &keys, "shoal", 1_750_000_000),
            Verdict::Invalid(_)
        ));
    }

    #[test]
    fn jwk_sets_without_usable_keys_are_refused() {
        assert!(IssuerKeys::from_jwks(ISSUER.into(), b"not json").is_err());
        assert!(IssuerKeys::from_jwks(ISSUER.into(), br#"{"keys":[]}"#).is_err());
        assert!(
            IssuerKeys::from_jwks(
                ISSUER.into(),
                br#"{"keys":[{"kty":"oct","kid":"k","k":"AA"}]}"#
            )
            .is_err()
        );
        assert_eq!(keys().len(), 1);
    }

    #[test]
    fn base64url_round_trips() {
        assert_eq!(base64url_decode("aGk").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64url_decode("aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64url_decode("a"), None);
        for len in 0..40u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(
                base64url_decode(&encode(&bytes)).as_deref(),
                Some(bytes.as_slice())
            );
        }
    }

    /// Unpadded base64url, for the tests' own tokens.
    fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut bits = 0u32;
            for (i, b) in chunk.iter().enumerate() {
                bits |= u32::from(*b) << (16 - 8 * i);
            }
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((bits >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }
}

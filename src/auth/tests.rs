//! Token validation as data: each case builds a token and names the outcome.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

use super::*;
use crate::config::{AuthConfig, KeyConfig};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";
const OTHER: &str = "fedcba9876543210fedcba9876543210-test";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs_key(kid: &str, secret: &str, issuer: Option<&str>) -> KeyConfig {
    KeyConfig {
        kid: kid.into(),
        algorithm: "HS256".into(),
        secret: Some(secret.into()),
        issuer: issuer.map(str::to_owned),
        ..KeyConfig::default()
    }
}

fn auth(config: AuthConfig) -> Authenticator {
    Authenticator::new(&config, &|_| None).expect("keys")
}

fn config(keys: Vec<KeyConfig>) -> AuthConfig {
    AuthConfig { keys, leeway_secs: 0, ..AuthConfig::default() }
}

fn sign(alg: Algorithm, kid: Option<&str>, secret: &str, claims: serde_json::Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    encode(&h, &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("sign")
}

fn good_claims() -> serde_json::Value {
    json!({"sub": "alice", "tenant": "acme", "exp": now() + 300, "roles": ["publisher"], "jti": "t-1"})
}

#[tokio::test]
async fn a_good_token_gives_its_principal() {
    let a = auth(config(vec![hs_key("k1", SECRET, None)]));
    let p = a.verify(&sign(Algorithm::HS256, Some("k1"), SECRET, good_claims())).await.expect("valid");
    assert_eq!(p.tenant.as_str(), "acme");
    assert_eq!(p.subject, "alice");
    assert!(p.roles.contains(Roles::PUBLISHER));
    assert!(!p.roles.contains(Roles::SYSTEM));
    assert_eq!(p.token_id, "t-1");
}

#[tokio::test]
async fn token_id_falls_back_to_a_short_hash() {
    let a = auth(config(vec![hs_key("k1", SECRET, None)]));
    let mut c = good_claims();
    c.as_object_mut().expect("obj").remove("jti");
    let t = sign(Algorithm::HS256, Some("k1"), SECRET, c);
    let p = a.verify(&t).await.expect("valid");
    assert_eq!(p.token_id, short_hash(&t));
    assert_eq!(p.token_id.len(), 16);
    assert!(!t.contains(&p.token_id) || p.token_id.len() < t.len());
}

#[tokio::test]
async fn every_refusal_has_its_code() {
    let mut cfg = config(vec![hs_key("k1", SECRET, None), hs_key("k2", OTHER, Some("https://b.example"))]);
    cfg.issuer = None;
    let a = auth(cfg);
    let c = good_claims;
    let with = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut v = c();
        f(v.as_object_mut().expect("obj"));
        v
    };
    let cases: Vec<(String, &str)> = vec![
        ("garbage".into(), "malformed"),
        ("a.b.c".into(), "malformed"),
        (sign(Algorithm::HS256, Some("k1"), OTHER, c()), "bad_signature"),
        (sign(Algorithm::HS256, Some("nope"), SECRET, c()), "unknown_kid"),
        (sign(Algorithm::HS256, None, SECRET, c()), "malformed"),
        (sign(Algorithm::HS384, Some("k1"), SECRET, c()), "algorithm_not_allowed"),
        (
            sign(
                Algorithm::HS256,
                Some("k1"),
                SECRET,
                with(&|m| {
                    m.insert("exp".into(), json!(now() - 100));
                }),
            ),
            "expired",
        ),
        (
            sign(
                Algorithm::HS256,
                Some("k1"),
                SECRET,
                with(&|m| {
                    m.insert("nbf".into(), json!(now() + 100));
                }),
            ),
            "not_yet_valid",
        ),
        (
            sign(
                Algorithm::HS256,
                Some("k1"),
                SECRET,
                with(&|m| {
                    m.remove("exp");
                }),
            ),
            "missing_claim",
        ),
        (
            sign(
                Algorithm::HS256,
                Some("k1"),
                SECRET,
                with(&|m| {
                    m.remove("sub");
                }),
            ),
            "missing_claim",
        ),
        (
            sign(
                Algorithm::HS256,
                Some("k1"),
                SECRET,
                with(&|m| {
                    m.remove("tenant");
                }),
            ),
            "missing_claim",
        ),
        (
            sign(
                Algorithm::HS256,
                Some("k1"),
                SECRET,
                with(&|m| {
                    m.insert("tenant".into(), json!("a b"));
                }),
            ),
            "invalid_claim",
        ),
        (
            sign(
                Algorithm::HS256,
                Some("k1"),
                SECRET,
                with(&|m| {
                    m.insert("roles".into(), json!(5));
                }),
            ),
            "invalid_claim",
        ),
        // k2 is bound to issuer B: a token without iss, or with another iss, never reaches it.
        (sign(Algorithm::HS256, Some("k2"), OTHER, c()), "unknown_kid"),
        (
            sign(
                Algorithm::HS256,
                Some("k2"),
                OTHER,
                with(&|m| {
                    m.insert("iss".into(), json!("https://a.example"));
                }),
            ),
            "unknown_kid",
        ),
    ];
    for (token, code) in cases {
        assert_eq!(a.verify(&token).await.map(|p| p.subject).map_err(|e| e.code()), Err(code), "{token}");
    }
    let ok = sign(
        Algorithm::HS256,
        Some("k2"),
        OTHER,
        with(&|m| {
            m.insert("iss".into(), json!("https://b.example"));
        }),
    );
    assert!(a.verify(&ok).await.is_ok());
}

#[tokio::test]
async fn issuer_and_audience_are_required_when_configured() {
    let mut cfg = config(vec![hs_key("k1", SECRET, None)]);
    cfg.issuer = Some("https://id.example".into());
    cfg.audience = Some("incident-stream".into());
    let a = auth(cfg);
    let mk = |iss: Option<&str>, aud: Option<&str>| {
        let mut v = good_claims();
        let a = &a;
        let m = v.as_object_mut().expect("obj");
        if let Some(i) = iss {
            m.insert("iss".into(), json!(i));
        }
        if let Some(x) = aud {
            m.insert("aud".into(), json!(x));
        }
        let token = sign(Algorithm::HS256, Some("k1"), SECRET, v);
        async move { a.verify(&token).await.map(|_| ()).map_err(|e| e.code()) }
    };
    assert_eq!(mk(Some("https://id.example"), Some("incident-stream")).await, Ok(()));
    assert_eq!(mk(None, Some("incident-stream")).await, Err("missing_claim"));
    assert_eq!(mk(Some("https://id.example"), None).await, Err("missing_claim"));
    assert_eq!(mk(Some("https://evil.example"), Some("incident-stream")).await, Err("wrong_issuer"));
    assert_eq!(mk(Some("https://id.example"), Some("other")).await, Err("wrong_audience"));
}

#[tokio::test]
async fn alg_none_is_refused() {
    let a = auth(config(vec![hs_key("k1", SECRET, None)]));
    // {"alg":"none","kid":"k1"} . {"sub":"alice","tenant":"acme","exp":9999999999} . (empty)
    let header = "eyJhbGciOiJub25lIiwia2lkIjoiazEifQ";
    let body = "eyJzdWIiOiJhbGljZSIsInRlbmFudCI6ImFjbWUiLCJleHAiOjk5OTk5OTk5OTl9";
    let err = a.verify(&format!("{header}.{body}.")).await.expect_err("refused");
    assert!(matches!(err, AuthError::Malformed(_) | AuthError::AlgorithmNotAllowed), "{err:?}");
}

#[tokio::test]
async fn bad_key_configs_are_named() {
    let short =
        KeyConfig { kid: "s".into(), algorithm: "HS256".into(), secret: Some("short".into()), ..KeyConfig::default() };
    let unknown =
        KeyConfig { kid: "u".into(), algorithm: "XX1".into(), secret: Some(SECRET.into()), ..KeyConfig::default() };
    let nopem = KeyConfig { kid: "p".into(), algorithm: "ES256".into(), ..KeyConfig::default() };
    let env_missing = KeyConfig {
        kid: "e".into(),
        algorithm: "HS256".into(),
        secret_env: Some("NOPE".into()),
        ..KeyConfig::default()
    };
    for k in [short, unknown, nopem, env_missing] {
        let kid = k.kid.clone();
        let err = Authenticator::new(&config(vec![k]), &|_| None).err().expect("refused").to_string();
        assert!(err.contains(&format!("`{kid}`")), "{err}");
    }
    let dup = config(vec![hs_key("d", SECRET, None), hs_key("d", OTHER, None)]);
    assert!(Authenticator::new(&dup, &|_| None).is_err());
}

#[tokio::test]
async fn minted_tokens_verify() {
    let a = auth(config(vec![hs_key("k1", SECRET, None)]));
    let claims = good_claims().as_object().cloned().expect("obj");
    let t = a.mint("k1", &claims).expect("mint");
    assert_eq!(a.verify(&t).await.expect("valid").subject, "alice");
}

//! Keys of every accepted algorithm over a real TLS upgrade; per-key algorithm allowlists
//! (no HS/RS confusion, no `none`); keys bound to their issuer; JWKS files.

mod common;

use common::keys::{claims, generate, TestKey};
use common::{config, Client, TestServer};
use incident_stream::config::{JwksConfig, KeyConfig};
use jsonwebtoken::Algorithm;
use serde_json::json;

const ALL: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fn write_pem(dir: &std::path::Path, k: &TestKey) -> std::path::PathBuf {
    let p = dir.join(format!("{}.pub.pem", k.kid));
    std::fs::write(&p, &k.public_pem).expect("write pem");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_is_accepted_with_its_own_key_only() {
    let mut cfg = config();
    let dir = cfg.tls.cert.parent().expect("dir").to_owned();
    let keys: Vec<TestKey> = ALL.iter().map(|a| generate(*a, &format!("{a:?}").to_lowercase())).collect();
    for k in &keys {
        cfg.auth.keys.push(KeyConfig {
            kid: k.kid.clone(),
            algorithm: format!("{:?}", k.alg),
            public_key: Some(write_pem(&dir, k)),
            ..KeyConfig::default()
        });
    }
    let server = TestServer::start(cfg).await;
    for k in &keys {
        let mut c = Client::connect(&server, &k.sign(&claims("acme", &format!("user-{}", k.kid), None))).await;
        assert_eq!(c.welcome["tenant"], "acme", "{:?}", k.alg);
        c.assert_alive().await;
    }
    // A key verifies only its own algorithm: an RSA key with RS256 refuses a PS256 token.
    let rs256 = &keys[0];
    assert_eq!(
        server.refusal(&rs256.sign_as(Algorithm::PS256, &claims("acme", "a", None))).await,
        (401, "algorithm_not_allowed".into())
    );
    assert_eq!(
        server.refusal(&rs256.sign_as(Algorithm::RS512, &claims("acme", "a", None))).await,
        (401, "algorithm_not_allowed".into())
    );
    // HS/RS confusion: an HS256 token "signed" with the RSA public key as the secret.
    let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
    h.kid = Some(rs256.kid.clone());
    let confused = jsonwebtoken::encode(
        &h,
        &claims("acme", "a", None),
        &jsonwebtoken::EncodingKey::from_secret(rs256.public_pem.as_bytes()),
    )
    .expect("sign");
    assert_eq!(server.refusal(&confused).await, (401, "algorithm_not_allowed".into()));
    // A token signed by another key under a known kid.
    let impostor = generate(Algorithm::ES256, "es256");
    assert_eq!(server.refusal(&impostor.sign(&claims("acme", "a", None))).await, (401, "bad_signature".into()));
    // alg none.
    let none = format!(
        "{}.{}.",
        "eyJhbGciOiJub25lIiwia2lkIjoiZXMyNTYifQ", // {"alg":"none","kid":"es256"}
        "eyJzdWIiOiJhIiwidGVuYW50IjoiYWNtZSIsImV4cCI6OTk5OTk5OTk5OX0"
    );
    let (status, code) = server.refusal(&none).await;
    assert_eq!(status, 401);
    assert!(code == "malformed" || code == "algorithm_not_allowed", "{code}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_one_issuer_never_validates_another_issuers_token() {
    let mut cfg = config();
    let dir = cfg.tls.cert.parent().expect("dir").to_owned();
    // Issuer A: a static key "shared". Issuer B: a JWKS file whose key also has kid "shared".
    let a = generate(Algorithm::ES256, "shared");
    let b = generate(Algorithm::ES256, "shared");
    cfg.auth.keys.push(KeyConfig {
        kid: "shared".into(),
        algorithm: "ES256".into(),
        public_key: Some(write_pem(&dir, &a)),
        issuer: Some("https://a.example".into()),
        ..KeyConfig::default()
    });
    let b_only = generate(Algorithm::ES256, "b-only");
    let jwks = dir.join("b.jwks.json");
    std::fs::write(&jwks, json!({"keys": [b.jwk, b_only.jwk]}).to_string()).expect("jwks");
    cfg.auth.audience = Some(common::keys::AUDIENCE.into());
    cfg.auth.jwks.push(JwksConfig {
        issuer: "https://b.example".into(),
        file: Some(jwks),
        algorithms: vec!["ES256".into()],
        ..JwksConfig::default()
    });
    let server = TestServer::start(cfg).await;

    // Each issuer's own tokens work, although both use kid "shared": keys are found by
    // (issuer, kid).
    Client::connect(&server, &a.sign(&claims("acme", "a-user", Some("https://a.example")))).await;
    Client::connect(&server, &b.sign(&claims("acme", "b-user", Some("https://b.example")))).await;
    Client::connect(&server, &b_only.sign(&claims("acme", "b-user", Some("https://b.example")))).await;
    // A's genuine key signing a token that claims issuer B: looked up among B's keys, refused.
    let r = server.refusal(&a.sign(&claims("acme", "x", Some("https://b.example")))).await;
    assert_eq!(r, (401, "bad_signature".into()));
    // B's genuine key signing a token that claims issuer A: A's key "shared" does not verify it.
    let r = server.refusal(&b.sign(&claims("acme", "x", Some("https://a.example")))).await;
    assert_eq!(r, (401, "bad_signature".into()));
    // A kid only B's set holds, in a token claiming issuer A: A has no such key.
    let r = server.refusal(&b_only.sign(&claims("acme", "x", Some("https://a.example")))).await;
    assert_eq!(r, (401, "unknown_kid".into()));
    // A's key in a token with no issuer at all: bound keys are never tried.
    let r = server.refusal(&a.sign(&claims("acme", "x", None))).await;
    assert_eq!(r, (401, "unknown_kid".into()));
    // A kid nobody has.
    let stranger = generate(Algorithm::ES256, "nobody");
    let r = server.refusal(&stranger.sign(&claims("acme", "x", Some("https://b.example")))).await;
    assert_eq!(r, (401, "unknown_kid".into()));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_sets_never_supply_symmetric_keys_or_unlisted_algorithms() {
    let mut cfg = config();
    let dir = cfg.tls.cert.parent().expect("dir").to_owned();
    let rsa = generate(Algorithm::RS256, "rsa");
    let ec = generate(Algorithm::ES256, "ec");
    let jwks = dir.join("mixed.jwks.json");
    let oct =
        json!({"kty": "oct", "kid": "oct", "alg": "HS256", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"});
    std::fs::write(&jwks, json!({"keys": [rsa.jwk, ec.jwk, oct]}).to_string()).expect("jwks");
    cfg.auth.audience = Some(common::keys::AUDIENCE.into());
    cfg.auth.jwks.push(JwksConfig {
        issuer: "https://idp.example".into(),
        file: Some(jwks),
        algorithms: vec!["RS256".into()],
        ..JwksConfig::default()
    });
    let server = TestServer::start(cfg).await;
    let iss = Some("https://idp.example");
    Client::connect(&server, &rsa.sign(&claims("acme", "u", iss))).await;
    // ES256 is not on this set's allowlist, so its key was never taken.
    assert_eq!(server.refusal(&ec.sign(&claims("acme", "u", iss))).await, (401, "unknown_kid".into()));
    // The oct key was never taken: an HS256 token under its kid is refused.
    let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
    h.kid = Some("oct".into());
    let hs = jsonwebtoken::encode(
        &h,
        &claims("acme", "u", iss),
        &jsonwebtoken::EncodingKey::from_secret(b"secret-secret-secret-secret-secret"),
    )
    .expect("sign");
    assert_eq!(server.refusal(&hs).await, (401, "unknown_kid".into()));
    server.shutdown().await;
}

//! Tenant limits and the pre-authentication limit, black-box: a real TLS server whose tenant
//! policies set each limit low, real tokens and WebSocket clients. Each test crosses one limit
//! and asserts the exact refusal (status or error code, close code, `Retry-After`, the
//! `rate_limited_total{scope}` metric, the audit record), and that a client under its limit is
//! unaffected.

mod common;

use std::net::IpAddr;

use common::{policy_config, token, try_connect, wait_audit, Client, TestServer};
use serde_json::{json, Value};

fn scope_count(m: &common::Metrics, scope: &str) -> f64 {
    m.get(&format!("rate_limited_total{{scope=\"{scope}\"}}"))
}

#[tokio::test]
async fn a_tenant_at_its_connection_cap_gets_503_and_others_do_not() {
    let cfg = policy_config(&[("acme", "[limits]\nmax_connections = 2\n")]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let a = Client::as_user(&server, "acme", "alice").await;
    let _b = Client::as_user(&server, "acme", "bob").await;
    let refused = try_connect(&server, &token("acme", "carol", &[], 60), &[], None).await.expect_err("over the cap");
    assert_eq!((refused.status, refused.code()), (503, "too_many_connections"));
    assert_eq!(refused.retry_after, Some(5));
    assert_eq!(scope_count(&server.metrics().await, "tenant_connections"), 1.0);
    let rec = wait_audit(&audit, "tenant cap", |r| r["reason"] == "too_many_connections").await;
    assert_eq!(
        (rec["kind"].as_str(), rec["scope"].as_str()),
        (Some("connection.rejected"), Some("tenant_connections"))
    );
    assert_eq!(
        (rec["tenant"].as_str(), rec["subject"].as_str(), rec["status"].as_u64()),
        (Some("acme"), Some("carol"), Some(503))
    );
    // Another tenant is not counted against acme's cap.
    let mut g = Client::as_user(&server, "globex", "gina").await;
    g.assert_alive().await;
    // A closed connection frees its place.
    drop(a);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        match try_connect(&server, &token("acme", "carol", &[], 60), &[], None).await {
            Ok(mut c) => {
                c.assert_alive().await;
                break;
            }
            Err(r) => {
                assert_eq!(r.code(), "too_many_connections");
                assert!(tokio::time::Instant::now() < deadline, "the place was never freed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_subject_at_its_connection_cap_gets_503_and_other_subjects_do_not() {
    let cfg = policy_config(&[("acme", "[limits]\nmax_connections_per_subject = 1\n")]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let _a = Client::as_user(&server, "acme", "alice").await;
    let refused = try_connect(&server, &token("acme", "alice", &[], 60), &[], None).await.expect_err("second alice");
    assert_eq!((refused.status, refused.code(), refused.retry_after), (503, "too_many_connections", Some(5)));
    assert_eq!(scope_count(&server.metrics().await, "subject_connections"), 1.0);
    let rec = wait_audit(&audit, "subject cap", |r| r["scope"] == "subject_connections").await;
    assert_eq!((rec["kind"].as_str(), rec["subject"].as_str()), (Some("connection.rejected"), Some("alice")));
    let mut bob = Client::as_user(&server, "acme", "bob").await;
    bob.assert_alive().await;
    server.shutdown().await;
}

#[tokio::test]
async fn new_connections_per_minute_per_subject_get_429_with_retry_after() {
    let cfg = policy_config(&[("acme", "[limits]\nconnects_per_minute_per_subject = 2\n")]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    for _ in 0..2 {
        let mut c = Client::as_user(&server, "acme", "alice").await;
        c.assert_alive().await;
    }
    let refused =
        try_connect(&server, &token("acme", "alice", &[], 60), &[], None).await.expect_err("third in a minute");
    assert_eq!((refused.status, refused.code()), (429, "rate_limited"));
    // Two per minute: the next one is about 30 s away.
    let wait = refused.retry_after.expect("Retry-After");
    assert!((20..=31).contains(&wait), "Retry-After {wait}");
    assert_eq!(scope_count(&server.metrics().await, "connect"), 1.0);
    let rec = wait_audit(&audit, "connect rate", |r| r["scope"] == "connect").await;
    assert_eq!((rec["kind"].as_str(), rec["reason"].as_str()), (Some("connection.rejected"), Some("rate_limited")));
    let mut bob = Client::as_user(&server, "acme", "bob").await;
    bob.assert_alive().await;
    server.shutdown().await;
}

#[tokio::test]
async fn client_messages_over_the_tenant_rate_get_rate_limited_then_4029() {
    let cfg = policy_config(&[("acme", "[limits]\nmessages_per_second = 1\nmessage_burst = 3\n")]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let mut other = Client::as_user(&server, "acme", "bob").await;
    let mut c = Client::as_user(&server, "acme", "alice").await;
    for i in 0..3 {
        c.send(json!({"type": "ping", "timestamp": format!("t{i}")})).await;
        assert_eq!(c.recv().await["type"], "pong");
    }
    c.send(json!({"type": "ping"})).await;
    let e = c.recv().await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("rate_limited")));
    assert!(e["message"].as_str().unwrap_or_default().contains("1 messages per second (burst 3)"), "{e}");
    let rec = wait_audit(&audit, "message rate", |r| r["kind"] == "rate_limit.tripped").await;
    assert_eq!(
        (rec["scope"].as_str(), rec["limit_per_second"].as_u64(), rec["burst"].as_u64()),
        (Some("message"), Some(1), Some(3))
    );
    // Going on: closed with 4029 after ten refusals in the window.
    for _ in 0..12 {
        c.send(json!({"type": "ping"})).await;
    }
    let (_, code, reason) = c.read_until_close().await;
    assert_eq!((code, reason.as_str()), (4029, "rate_limited"));
    assert!(scope_count(&server.metrics().await, "message") >= 10.0);
    other.assert_alive().await;
    server.shutdown().await;
}

#[tokio::test]
async fn subscriptions_over_the_tenant_cap_are_refused() {
    let cfg = policy_config(&[("acme", "[limits]\nmax_subscriptions_per_connection = 2\n")]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let mut c = Client::as_user(&server, "acme", "alice").await;
    c.subscribe("a", json!({})).await;
    c.subscribe("b", json!({"event_types": ["escalated"]})).await;
    c.send(json!({"type": "subscribe", "subscription_id": "c", "filters": {}})).await;
    let e = c.recv().await;
    assert_eq!((e["code"].as_str(), e["subscription_id"].as_str()), (Some("too_many_subscriptions"), Some("c")));
    assert!(e["message"].as_str().unwrap_or_default().contains("at most 2"), "{e}");
    assert_eq!(scope_count(&server.metrics().await, "subscriptions"), 1.0);
    let rec = wait_audit(&audit, "subscription cap", |r| r["reason"] == "too_many_subscriptions").await;
    assert_eq!((rec["kind"].as_str(), rec["subscription_id"].as_str()), (Some("subscription.rejected"), Some("c")));
    // Under the cap again after an unsubscribe.
    c.send(json!({"type": "unsubscribe", "subscription_id": "a"})).await;
    assert_eq!(c.recv().await["type"], "unsubscribed");
    c.subscribe("c", json!({})).await;
    server.shutdown().await;
}

async fn post(server: &TestServer, tenant: &str, body: &Value) -> common::HttpResponse {
    let t = token(tenant, "publisher-1", &["publisher"], 60);
    server.http("POST", "/v1/events", &[("authorization", &format!("Bearer {t}"))], Some(body)).await
}

#[tokio::test]
async fn publishes_over_the_tenant_rate_get_429() {
    let cfg = policy_config(&[("acme", "[limits]\npublishes_per_second = 1\npublish_burst = 3\n")]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let ev = json!({"event_type": "escalated"});
    let too_big = post(&server, "acme", &json!([ev, ev, ev, ev])).await;
    assert_eq!((too_big.status, too_big.json()["code"].as_str()), (400, Some("batch_too_large")));
    assert_eq!(post(&server, "acme", &json!([ev, ev, ev])).await.status, 202, "the burst");
    let refused = post(&server, "acme", &ev).await;
    assert_eq!((refused.status, refused.json()["code"].as_str()), (429, Some("rate_limited")));
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(scope_count(&server.metrics().await, "publish"), 1.0);
    let rec = wait_audit(&audit, "publish rate", |r| r["scope"] == "publish").await;
    assert_eq!(
        (rec["kind"].as_str(), rec["tenant"].as_str(), rec["subject"].as_str(), rec["status"].as_u64()),
        (Some("rate_limit.tripped"), Some("acme"), Some("publisher-1"), Some(429))
    );
    assert_eq!(post(&server, "globex", &ev).await.status, 202, "another tenant is unaffected");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(post(&server, "acme", &ev).await.status, 202, "refilled after a second");
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_from_one_address_is_throttled_before_any_token_is_verified() {
    let mut cfg = policy_config(&[]);
    cfg.limits.handshakes_per_second_per_ip = 2;
    cfg.limits.handshake_burst = 5;
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let flooder: IpAddr = "127.0.0.1".parse().expect("ip");
    let good = token("acme", "flood", &[], 60);
    let (mut accepted, mut throttled) = (Vec::new(), 0);
    let started = std::time::Instant::now();
    for _ in 0..60 {
        match try_connect(&server, &good, &[], Some(flooder)).await {
            Ok(c) => accepted.push(c),
            Err(r) => {
                assert_eq!((r.status, r.code()), (429, "rate_limited"));
                assert!(r.retry_after.is_some_and(|s| s >= 1));
                throttled += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The burst, plus what the rate refilled while the loop ran.
    let allowed = 5.0 + 2.0 * elapsed;
    assert!((accepted.len() as f64) <= allowed + 1.0, "{} let through in {elapsed:.1}s", accepted.len());
    assert!(accepted.len() >= 5, "the burst passes");
    assert_eq!(throttled + accepted.len(), 60);
    let m = server.metrics().await;
    // Only the requests that passed the address limit had their token verified.
    assert_eq!(m.get("auth_token_verifications_total") as usize, accepted.len());
    assert_eq!(scope_count(&m, "ip") as usize, throttled);
    let rec = wait_audit(&audit, "ip limit", |r| r["scope"] == "ip").await;
    assert_eq!((rec["kind"].as_str(), rec["status"].as_u64()), (Some("connection.rejected"), Some(429)));
    assert!(rec["tenant"].is_null(), "no token was looked at: {rec}");
    assert!(rec["remote_addr"].as_str().unwrap_or_default().starts_with("127.0.0.1:"));
    // Another address connects normally meanwhile.
    let other: IpAddr = "127.0.0.2".parse().expect("ip");
    let mut c =
        try_connect(&server, &token("acme", "neighbour", &[], 60), &[], Some(other)).await.expect("other address");
    c.assert_alive().await;
    server.shutdown().await;
}

#[tokio::test]
async fn browser_origins_must_be_allowed_by_the_tenant() {
    let cfg = policy_config(&[("acme", "allowed_origins = [\"https://console.acme.example\"]\n")]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let t = token("acme", "alice", &[], 60);
    let mut ok = try_connect(&server, &t, &[("origin", "https://console.acme.example")], None).await.expect("allowed");
    ok.assert_alive().await;
    let mut no_origin = try_connect(&server, &t, &[], None).await.expect("not a browser");
    no_origin.assert_alive().await;
    let refused = try_connect(&server, &t, &[("origin", "https://evil.example")], None).await.expect_err("refused");
    assert_eq!((refused.status, refused.code()), (403, "origin_not_allowed"));
    // The defaults' origin is not acme's: its list replaced it.
    let refused = try_connect(&server, &t, &[("origin", "https://app.example")], None).await.expect_err("refused");
    assert_eq!(refused.code(), "origin_not_allowed");
    assert_eq!(server.metrics().await.get("auth_failures_total{reason=\"origin_not_allowed\"}"), 2.0);
    let rec =
        wait_audit(&audit, "origin", |r| r["reason"] == "origin_not_allowed" && r["origin"] == "https://app.example")
            .await;
    assert_eq!(
        (rec["kind"].as_str(), rec["origin"].as_str()),
        (Some("connection.rejected"), Some("https://app.example"))
    );
    // globex keeps the defaults' origin.
    let g = token("globex", "gina", &[], 60);
    try_connect(&server, &g, &[("origin", "https://app.example")], None).await.expect("globex allows it");
    server.shutdown().await;
}

#[tokio::test]
async fn revoked_subjects_and_tokens_are_refused_at_the_door() {
    let cfg = policy_config(&[("acme", "revoked_subjects = [\"mallory\"]\nrevoked_token_ids = [\"stolen-1\"]\n")]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let r = try_connect(&server, &token("acme", "mallory", &[], 60), &[], None).await.expect_err("revoked subject");
    assert_eq!((r.status, r.code()), (403, "subject_revoked"));
    let now = jsonwebtoken::get_current_timestamp();
    let stolen = common::sign(json!({"sub": "alice", "tenant": "acme", "jti": "stolen-1", "exp": now + 60}));
    let r = try_connect(&server, &stolen, &[], None).await.expect_err("revoked token");
    assert_eq!((r.status, r.code()), (403, "token_revoked"));
    let rec = wait_audit(&audit, "token revoked", |r| r["reason"] == "token_revoked").await;
    assert_eq!(rec["token_id"], "stolen-1");
    // The same subject with another token, and mallory of another tenant, are fine.
    let fresh = common::sign(json!({"sub": "alice", "tenant": "acme", "jti": "fresh-2", "exp": now + 60}));
    try_connect(&server, &fresh, &[], None).await.expect("another token");
    try_connect(&server, &token("globex", "mallory", &[], 60), &[], None).await.expect("another tenant's mallory");
    server.shutdown().await;
}

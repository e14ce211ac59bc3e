//! `POST /v1/events` as a producer sees it: single events and arrays get `202` with ids in order;
//! every bad body gets a status and a stable JSON code, and nothing of a refused batch is
//! published.

mod common;

use std::time::Duration;

use common::{config, token, Client, TestServer};
use serde_json::{json, Value};

async fn post(server: &TestServer, tok: &str, body: &Value) -> common::HttpResponse {
    server.http("POST", "/v1/events", &[("authorization", &format!("Bearer {tok}"))], Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_and_batch_publish_answer_202_with_ordered_ids() {
    let server = TestServer::default().await;
    let mut sub = Client::as_user(&server, "acme", "watcher").await;
    sub.subscribe("all", json!({})).await;
    let publisher = token("acme", "svc", &["publisher"], 60);

    let r = post(&server, &publisher, &json!({"event_type": "incident_created", "severity": "P0"})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let one = r.json()["message_ids"].as_array().expect("ids").clone();
    assert_eq!(one.len(), 1);

    let batch: Vec<Value> = (0..5).map(|i| json!({"event_type": "comment_added", "n": i})).collect();
    let r = post(&server, &publisher, &Value::Array(batch)).await;
    assert_eq!(r.status, 202);
    let ids: Vec<String> =
        r.json()["message_ids"].as_array().expect("ids").iter().map(|v| v.as_str().expect("s").to_owned()).collect();
    assert_eq!(ids.len(), 5);
    let seqs: Vec<u64> = ids.iter().map(|i| i.split('-').nth(1).and_then(|s| s.parse().ok()).expect("seq")).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "ids follow publish order: {ids:?}");

    assert_eq!(sub.recv().await["message_id"], one[0]);
    for (i, id) in ids.iter().enumerate() {
        let m = sub.recv().await;
        assert_eq!(m["message_id"], id.as_str());
        assert_eq!(m["event"]["n"], i);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_400_and_nothing_is_published() {
    let mut cfg = config();
    cfg.publish.max_batch = 3;
    let server = TestServer::start(cfg).await;
    let mut sub = Client::as_user(&server, "acme", "watcher").await;
    sub.subscribe("all", json!({})).await;
    let publisher = token("acme", "svc", &["publisher"], 60);
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"severity": "P1"}), 400, "missing_event_type"),
        (json!({"event_type": "incident_exploded"}), 400, "unknown_event_type"),
        (json!({"event_type": 12}), 400, "invalid_field"),
        (json!({"event_type": "escalated", "severity": 1}), 400, "invalid_field"),
        (json!({"event_type": "escalated", "severity": "P9"}), 400, "invalid_value"),
        (json!({"event_type": "escalated", "state": "Exploded"}), 400, "invalid_value"),
        (json!({"event_type": "escalated", "labels": ["a"]}), 400, "invalid_field"),
        (json!({"event_type": "escalated", "affected_resources": "db"}), 400, "invalid_field"),
        (json!("incident_created"), 400, "invalid_field"),
        (json!([]), 400, "empty_batch"),
        (
            json!([{"event_type": "escalated"}, {"event_type": "escalated"}, {"event_type": "escalated"}, {"event_type": "escalated"}]),
            400,
            "batch_too_large",
        ),
        // One bad event refuses the whole batch.
        (json!([{"event_type": "escalated"}, {"event_type": "nope"}]), 400, "unknown_event_type"),
        // A bound publisher cannot name another tenant, not even in the tenant label.
        (json!({"event_type": "escalated", "tenant": "globex"}), 403, "forbidden_tenant"),
        (json!({"event_type": "escalated", "labels": {"tenant": "globex"}}), 400, "tenant_mismatch"),
    ];
    for (body, status, code) in &cases {
        let r = post(&server, &publisher, body).await;
        assert_eq!(r.status, *status, "{body}: {}", r.body);
        let j = r.json();
        assert_eq!(j["code"], *code, "{body}: {j}");
        assert!(j["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let r = post(&server, &publisher, &json!([{"event_type": "escalated"}, {"event_type": "nope"}])).await;
    assert!(r.json()["message"].as_str().is_some_and(|m| m.starts_with("event 1:")), "{}", r.body);

    // Not JSON, wrong media type.
    let auth = format!("Bearer {publisher}");
    let r = server
        .raw_http(
            "POST",
            "/v1/events",
            &[("authorization", auth.as_str()), ("content-type", "application/json")],
            b"{nope",
        )
        .await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("invalid_json")));
    let r = server
        .raw_http("POST", "/v1/events", &[("authorization", auth.as_str()), ("content-type", "text/plain")], b"{}")
        .await;
    assert_eq!((r.status, r.json()["code"].as_str()), (415, Some("unsupported_media_type")));

    sub.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(server.metrics().await.get("websocket_events_broadcast_total"), 0.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let mut cfg = config();
    cfg.publish.max_body_bytes = 4096;
    let server = TestServer::start(cfg).await;
    let publisher = token("acme", "svc", &["publisher"], 60);
    let r = post(&server, &publisher, &json!({"event_type": "escalated", "pad": "x".repeat(10_000)})).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "payload_too_large");
    let r = post(&server, &publisher, &json!({"event_type": "escalated", "pad": "x".repeat(1000)})).await;
    assert_eq!(r.status, 202);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_needs_a_publisher_token_and_system_may_name_tenants() {
    let server = TestServer::default().await;
    let mut globex = Client::as_user(&server, "globex", "g").await;
    globex.subscribe("all", json!({})).await;
    let body = json!({"event_type": "system_event"});

    let r = server.http("POST", "/v1/events", &[], Some(&body)).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], "missing");
    assert!(r.header("www-authenticate").is_some_and(|h| h.starts_with("Bearer")));

    let r = post(&server, &token("acme", "reader", &[], 60), &body).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["code"], "forbidden");
    assert!(r.header("www-authenticate").is_some_and(|h| h.contains("insufficient_scope")));

    let r = post(&server, &token("acme", "svc", &["publisher"], -100), &body).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (401, Some("expired")));

    // A system publisher may publish for another tenant; it reaches only that tenant.
    let system = token("ops", "router", &["publisher", "system"], 60);
    let r = post(&server, &system, &json!({"event_type": "system_event", "tenant": "globex"})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let m = globex.recv().await;
    assert_eq!(m["event"]["tenant"], "globex");
    assert_eq!(m["event"]["labels"]["tenant"], "globex");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics_are_open() {
    let server = TestServer::default().await;
    let r = server.http("GET", "/health", &[], None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = server.http("GET", "/ready", &[], None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ready", "audit": "ok", "bus": "ok"})));
    let r = server.http("GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/plain")));
    assert!(r.body.contains("websocket_active_connections 0"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_idempotency_key_is_not_published_again() {
    let server = TestServer::default().await;
    common::check_idempotent_publishes(&server, &server).await;
    server.shutdown().await;
}

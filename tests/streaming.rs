//! A mixed stream over real sockets: all 14 event types, severities, states, sources, labels and
//! two tenants; several subscribers with different filters each receive exactly the matching
//! events of their own tenant, in publish order, once each. Metrics move as they should.

mod common;

use std::time::Duration;

use common::{reference_matches as matches, Client, TestServer};
use serde_json::{json, Value};

const TYPES: [&str; 14] = [
    "incident_created",
    "incident_updated",
    "incident_resolved",
    "incident_closed",
    "alert_received",
    "alert_converted",
    "escalated",
    "playbook_started",
    "playbook_action_executed",
    "playbook_completed",
    "notification_sent",
    "assignment_changed",
    "comment_added",
    "system_event",
];
const STATES: [&str; 6] = ["Detected", "Triaged", "Investigating", "Remediating", "Resolved", "Closed"];
const SOURCES: [&str; 3] = ["llm-sentinel", "llm-shield", "pager"];
const RESOURCES: [&str; 4] = ["api-gateway", "db", "cache", "queue"];

fn event(i: usize) -> Value {
    let mut e = json!({
        "event_type": TYPES[i % 14],
        "source": SOURCES[i % 3],
        "affected_resources": [RESOURCES[i % 4], RESOURCES[(i / 4) % 4]],
        "incident_id": format!("i-{}", i % 5),
        "labels": {"environment": if i % 2 == 0 { "production" } else { "staging" }},
        "incident": {"id": format!("i-{}", i % 5), "title": format!("event {i}")}
    });
    if i % 7 != 0 {
        e["severity"] = json!(format!("P{}", i % 5));
    }
    if i % 6 != 5 {
        e["state"] = json!(STATES[i % 6]);
    }
    e
}

struct Sub {
    client: Client,
    tenant: &'static str,
    filters: Vec<Value>,
    expected: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_subscriber_gets_exactly_its_matching_events_in_order_once() {
    let server = TestServer::default().await;
    let specs: Vec<(&'static str, Vec<Value>)> = vec![
        ("acme", vec![json!({})]),
        (
            "acme",
            vec![
                json!({"event_types": ["incident_created", "incident_resolved", "escalated"], "severities": ["P0", "P1"]}),
            ],
        ),
        ("acme", vec![json!({"labels": {"environment": "production"}, "states": ["Detected", "Investigating"]})]),
        ("acme", vec![json!({"sources": ["llm-shield"], "affected_resources": ["db"]})]),
        // Two overlapping subscriptions: an event matching both arrives once.
        ("acme", vec![json!({"incident_ids": ["i-2"]}), json!({"event_types": ["escalated", "comment_added"]})]),
        ("globex", vec![json!({})]),
        ("globex", vec![json!({"severities": ["P0"], "states": ["Detected", "Resolved"]})]),
    ];
    let mut subs = Vec::new();
    for (n, (tenant, filters)) in specs.into_iter().enumerate() {
        let mut client = Client::as_user(&server, tenant, &format!("user-{n}")).await;
        assert_eq!(client.welcome["tenant"], tenant);
        for (k, f) in filters.iter().enumerate() {
            let r = client.subscribe(&format!("s{k}"), f.clone()).await;
            assert_eq!(r["filters"]["labels"]["tenant"], tenant, "effective filter carries the tenant: {r}");
        }
        subs.push(Sub { client, tenant, filters, expected: Vec::new() });
    }

    // 168 events, 12 per type, published in batches that alternate tenants.
    let mut published: Vec<(String, &'static str, Value)> = Vec::new();
    for batch in 0..14 {
        let tenant = if batch % 3 == 2 { "globex" } else { "acme" };
        let events: Vec<Value> = (0..12).map(|k| event(batch * 12 + k)).collect();
        let ids = server.publish(tenant, &Value::Array(events.clone())).await;
        assert_eq!(ids.len(), 12);
        for (id, mut ev) in ids.into_iter().zip(events) {
            ev["tenant"] = json!(tenant);
            ev["labels"]["tenant"] = json!(tenant);
            published.push((id, tenant, ev));
        }
    }
    let covered: std::collections::BTreeSet<&str> =
        published.iter().filter_map(|(_, _, e)| e["event_type"].as_str()).collect();
    assert_eq!(covered.len(), 14, "all 14 types published");

    let mut total_expected = 0;
    for s in &mut subs {
        s.expected = published
            .iter()
            .filter(|(_, t, ev)| *t == s.tenant && s.filters.iter().any(|f| matches(f, ev)))
            .map(|(id, _, _)| id.clone())
            .collect();
        assert!(!s.expected.is_empty(), "each filter matches something");
        total_expected += s.expected.len();
    }
    assert!(subs[1].expected.len() < subs[0].expected.len(), "filters actually filter");

    for s in &mut subs {
        let mut got = Vec::new();
        while got.len() < s.expected.len() {
            let m = s.client.recv().await;
            assert_eq!(m["type"], "event", "{m}");
            let ev = &m["event"];
            assert_eq!(ev["tenant"], s.tenant, "never another tenant's event: {m}");
            assert_eq!(ev["labels"]["tenant"], s.tenant);
            let id = m["message_id"].as_str().expect("id").to_owned();
            let (_, _, sent) = published.iter().find(|(pid, _, _)| *pid == id).expect("a published id");
            assert_eq!(ev, sent, "the subscriber receives exactly the published object");
            assert!(m["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
            got.push(id);
        }
        assert_eq!(got, s.expected, "exact events, publish order, once each");
        s.client.expect_silence(Duration::from_millis(300)).await;
    }

    let m = server.metrics().await;
    assert_eq!(m.get("websocket_active_connections"), 7.0);
    assert_eq!(m.get("websocket_total_connections"), 7.0);
    assert_eq!(m.get("websocket_active_subscriptions"), 8.0);
    assert_eq!(m.get("websocket_events_broadcast_total"), 168.0);
    assert_eq!(m.get("websocket_events_delivered_total"), total_expected as f64);
    assert_eq!(m.get("websocket_message_latency_seconds_count"), total_expected as f64);
    assert_eq!(m.get("websocket_messages_received_total"), 8.0);
    // welcome + subscribed + events
    assert_eq!(m.get("websocket_messages_sent_total"), (7 + 8 + total_expected) as f64);
    assert_eq!(m.get("websocket_events_dropped_total"), 0.0);
    assert_eq!(m.get("websocket_session_duration_seconds_count"), 0.0);

    for s in subs {
        let mut ws = s.client.ws;
        ws.close(None).await.expect("close");
        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
    }
    let mut m = server.metrics().await;
    for _ in 0..100 {
        if m.get("websocket_active_connections") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = server.metrics().await;
    }
    assert_eq!(m.get("websocket_active_connections"), 0.0);
    assert_eq!(m.get("websocket_active_subscriptions"), 0.0);
    assert_eq!(m.get("websocket_session_duration_seconds_count"), 7.0);
    assert_eq!(m.get("websocket_connection_errors_total"), 0.0);
    assert_eq!(m.get("websocket_send_errors_total"), 0.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery_and_resubscribe_resumes_live() {
    let server = TestServer::default().await;
    let mut c = Client::as_user(&server, "acme", "u").await;
    c.subscribe("a", json!({"event_types": ["escalated"]})).await;
    let id1 = server.publish("acme", &json!({"event_type": "escalated"})).await;
    assert_eq!(c.recv().await["message_id"], id1[0].as_str());
    c.send(json!({"type": "unsubscribe", "subscription_id": "a"})).await;
    assert_eq!(c.recv().await, json!({"type": "unsubscribed", "subscription_id": "a"}));
    server.publish("acme", &json!({"event_type": "escalated"})).await;
    c.expect_silence(Duration::from_millis(300)).await;
    c.subscribe("a", json!({})).await;
    let id3 = server.publish("acme", &json!({"event_type": "comment_added"})).await;
    assert_eq!(c.recv().await["message_id"], id3[0].as_str());
    server.shutdown().await;
}

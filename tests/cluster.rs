//! Scale-out over NATS JetStream, black-box: a real `nats-server` on loopback (started and
//! stopped by PID), gateway nodes on it speaking TLS with real tokens, real WebSocket clients.
//!
//! - An event published through node A reaches subscribers on A and B, as the same frame.
//! - A client dropped from A resumes on B with every missed event exactly once, in order, while a
//!   seeded publisher keeps publishing through both nodes.
//! - Node B restarted mid-stream: its clients resume on the new B and lose nothing; the same with
//!   each gateway its own process of the binary and B killed with SIGKILL.
//! - NATS outage: `/ready` fails, publishes get 503 `broker_unavailable`, live sessions stay; when
//!   NATS is back, delivery resumes with no gap.
//! - The stream is a trust boundary: a message injected with one tenant's subject and another
//!   tenant's body reaches nobody.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::nats::{wait_ready, GatewayProcess, NatsServer};
use common::{token, Client, TestServer, WAIT};
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const TYPES: [&str; 4] = ["escalated", "incident_created", "comment_added", "alert_received"];
const WANTED: [&str; 2] = ["escalated", "incident_created"];

async fn node(nats: &NatsServer) -> TestServer {
    let s = TestServer::start(nats.gateway_config()).await;
    wait_ready(&s, 200).await;
    s
}

/// Reads what arrives until the server closes the connection (a node shutting down).
async fn events_until_closed(c: &mut Client, got: &mut Vec<String>) {
    loop {
        match tokio::time::timeout(WAIT, c.ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Text(t))) => {
                let m: Value = serde_json::from_str(&t).expect("json");
                if m["type"] == "event" {
                    got.push(m["message_id"].as_str().expect("id").to_owned());
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
            Some(Ok(_)) => {}
        }
    }
}

fn resume(c: &str, from: &str) -> Value {
    json!({"type": "subscribe", "subscription_id": c, "filters": {"event_types": WANTED}, "resume_from": from})
}

/// A seeded publisher: `batches` batches of 1–`max` events of random types, acme (80 %) and
/// globex, each batch through one of `nodes`; returns acme's ids of the wanted types in order.
fn publisher(
    nodes: Vec<Arc<TestServer>>,
    seed: u64,
    batches: usize,
    max: usize,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut expected = Vec::new();
        for b in 0..batches {
            let tenant = if rng.random_bool(0.8) { "acme" } else { "globex" };
            let n = rng.random_range(1..=max);
            let evs: Vec<Value> =
                (0..n).map(|_| json!({"event_type": TYPES[rng.random_range(0..TYPES.len())]})).collect();
            let ids = nodes[b % nodes.len()].publish(tenant, &Value::Array(evs.clone())).await;
            if tenant == "acme" {
                for (id, ev) in ids.into_iter().zip(evs) {
                    if WANTED.iter().any(|w| ev["event_type"] == *w) {
                        expected.push(id);
                    }
                }
            }
            if rng.random_bool(0.3) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..20))).await;
            }
        }
        expected
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_through_one_node_reaches_subscribers_on_both() {
    let nats = NatsServer::start();
    let (a, b) = (node(&nats).await, node(&nats).await);
    let mut on_a = Client::as_user(&a, "acme", "on-a").await;
    let mut on_b = Client::as_user(&b, "acme", "on-b").await;
    let mut globex_b = Client::as_user(&b, "globex", "g-on-b").await;
    for c in [&mut on_a, &mut on_b, &mut globex_b] {
        c.subscribe("all", json!({})).await;
    }
    let body = json!([{"event_type": "escalated", "severity": "P1", "labels": {"team": "db"}}, {"event_type": "comment_added"}]);
    let ids = a.publish("acme", &body).await;
    assert_eq!(ids.len(), 2);
    let (ea, eb) = ((on_a.recv().await, on_a.recv().await), (on_b.recv().await, on_b.recv().await));
    assert_eq!(ea, eb, "both nodes send the same frames");
    assert_eq!(ea.0["message_id"], ids[0].as_str());
    assert_eq!(ea.1["message_id"], ids[1].as_str());
    assert_eq!(ea.0["event"]["tenant"], "acme");
    assert_eq!(ea.0["event"]["labels"], json!({"team": "db", "tenant": "acme"}));
    // And the other way round, B to A.
    let back = b.publish("globex", &json!({"event_type": "incident_created"})).await;
    let g = globex_b.recv().await;
    assert_eq!(g["message_id"], back[0].as_str());
    // Ids are one sequence of the stream, whichever node took the publish.
    let seq = |id: &str| id.split_once('-').and_then(|(_, s)| s.parse::<u64>().ok()).expect("id");
    assert_eq!(seq(&back[0]), seq(&ids[1]) + 1);
    on_a.expect_silence(Duration::from_millis(200)).await;
    on_b.expect_silence(Duration::from_millis(50)).await;
    globex_b.expect_silence(Duration::from_millis(50)).await;
    // A replay of the whole stream for globex, on A: only globex's event.
    let epoch = back[0].split_once('-').expect("id").0;
    let mut g_a = Client::as_user(&a, "globex", "g-on-a").await;
    g_a.send(json!({"type": "subscribe", "subscription_id": "r", "filters": {}, "resume_from": format!("{epoch}-0")}))
        .await;
    assert_eq!(g_a.recv().await["type"], "subscribed");
    let r = g_a.recv().await;
    assert_eq!(r["message_id"], back[0].as_str(), "{r}");
    g_a.expect_silence(Duration::from_millis(200)).await;
    for s in [a, b] {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropped_from_one_node_resumes_on_the_other_with_nothing_missed_or_repeated() {
    let nats = NatsServer::start();
    let (a, b) = (Arc::new(node(&nats).await), Arc::new(node(&nats).await));
    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let t = token("acme", "roamer", &[], 300);
        let mut c = Client::connect(&a, &t).await;
        c.subscribe("s", json!({"event_types": WANTED})).await;
        let drop_after = rng.random_range(1..120);
        let publishing = publisher(vec![Arc::clone(&a), Arc::clone(&b)], seed, 40, 60);
        let mut got = Vec::new();
        c.read_events(&mut got, drop_after).await;
        drop(c);
        // Events keep being published while the client is away.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
        let from = got.last().cloned().expect("events arrived before the drop");
        let mut c = Client::connect(&b, &t).await;
        c.send(resume("s", &from)).await;
        let r = c.recv().await;
        assert_eq!(r["type"], "subscribed", "seed {seed}: {r}");
        let expected = publishing.await.expect("publisher");
        c.read_events(&mut got, expected.len()).await;
        assert_eq!(got, expected, "seed {seed}: every event once, in order, across the nodes");
        c.expect_silence(Duration::from_millis(150)).await;
    }
    for s in [a, b] {
        Arc::into_inner(s).expect("sole owner").shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_mid_stream_loses_nothing_for_clients_that_resume() {
    let nats = NatsServer::start();
    let a = Arc::new(node(&nats).await);
    let b = node(&nats).await;
    let t = token("acme", "on-b", &[], 300);
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = Client::connect(&b, &t).await;
        c.subscribe(&format!("s{i}"), json!({"event_types": WANTED})).await;
        clients.push(c);
    }
    let publishing = publisher(vec![Arc::clone(&a)], 77, 60, 40);
    let mut got: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    for (c, g) in clients.iter_mut().zip(&mut got) {
        c.read_events(g, 20).await;
    }
    // B goes away while A keeps taking publishes; its clients read what was sent before the close.
    b.shutdown().await;
    for (c, g) in clients.iter_mut().zip(&mut got) {
        events_until_closed(c, g).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = node(&nats).await;
    let mut resumed = Vec::new();
    for (i, g) in got.iter().enumerate() {
        let mut c = Client::connect(&b, &t).await;
        let from = g.last().expect("read before the restart");
        c.send(resume(&format!("s{i}"), from)).await;
        assert_eq!(c.recv().await["type"], "subscribed");
        resumed.push(c);
    }
    let expected = publishing.await.expect("publisher");
    for (i, (c, g)) in resumed.iter_mut().zip(&mut got).enumerate() {
        c.read_events(g, expected.len()).await;
        assert_eq!(*g, expected, "client {i}: every event once, in order, over the restart");
        c.expect_silence(Duration::from_millis(100)).await;
    }
    b.shutdown().await;
    Arc::into_inner(a).expect("sole owner").shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_fails_ready_and_publishes_keeps_sessions_and_resumes_without_a_gap() {
    let mut nats = NatsServer::start();
    let a = node(&nats).await;
    let mut c = Client::as_user(&a, "acme", "steady").await;
    c.subscribe("all", json!({})).await;
    let mut published = a.publish("acme", &json!([{"event_type": "escalated"}, {"event_type": "comment_added"}])).await;
    let mut got = Vec::new();
    c.read_events(&mut got, 2).await;
    assert_eq!(a.metrics().await.get("bus_connected"), 1.0);

    nats.stop();
    wait_ready(&a, 503).await;
    let ready = a.http("GET", "/ready", &[], None).await;
    assert_eq!(ready.json()["bus"], "unavailable", "{}", ready.body);
    let pt = token("acme", "publisher-1", &["publisher"], 300);
    let auth = format!("Bearer {pt}");
    let r = a.http("POST", "/v1/events", &[("authorization", &auth)], Some(&json!({"event_type": "escalated"}))).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["code"], "broker_unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.json().get("message_ids").is_none(), "nothing was stored: {}", r.body);
    // The session stays: it answers, and nothing spurious arrives.
    c.assert_alive().await;
    c.expect_silence(Duration::from_millis(300)).await;

    nats.restart();
    wait_ready(&a, 200).await;
    c.assert_alive().await;
    for _ in 0..3 {
        published
            .extend(a.publish("acme", &json!([{"event_type": "incident_created"}, {"event_type": "escalated"}])).await);
    }
    c.read_events(&mut got, published.len()).await;
    assert_eq!(got, published, "delivery resumed where it stopped");
    let seqs: Vec<u64> =
        got.iter().map(|id| id.split_once('-').and_then(|(_, s)| s.parse().ok()).expect("id")).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap in the stream's sequence");
    assert_eq!(a.metrics().await.get("bus_events_lost_total"), 0.0);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_subject_and_body_name_different_tenants_reaches_nobody() {
    let nats = NatsServer::start();
    let a = node(&nats).await;
    let mut acme = Client::as_user(&a, "acme", "a").await;
    let mut globex = Client::as_user(&a, "globex", "g").await;
    for c in [&mut acme, &mut globex] {
        c.subscribe("all", json!({})).await;
    }
    let client = async_nats::connect(nats.url()).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let forged = json!({"event_type": "escalated", "tenant": "globex", "labels": {"tenant": "globex"}});
    js.publish("incidents.acme.escalated", forged.to_string().into()).await.expect("send").await.expect("stored");
    let forged_label = json!({"event_type": "escalated", "labels": {"tenant": "globex"}});
    js.publish("incidents.acme.escalated", forged_label.to_string().into()).await.expect("send").await.expect("stored");
    // A well-formed message written by another producer straight into the stream is delivered:
    // the refusals above are about the mismatch, not about the path.
    let direct = json!({"event_type": "escalated", "tenant": "acme"});
    let ack =
        js.publish("incidents.acme.escalated", direct.to_string().into()).await.expect("send").await.expect("stored");
    let m = acme.recv().await;
    assert!(m["message_id"].as_str().expect("id").ends_with(&format!("-{}", ack.sequence)), "{m}");
    assert_eq!(m["event"]["tenant"], "acme");
    acme.expect_silence(Duration::from_millis(200)).await;
    globex.expect_silence(Duration::from_millis(50)).await;
    assert_eq!(a.metrics().await.get("bus_invalid_messages_total"), 2.0);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_nats_delivers_what_others_published_meanwhile_once_back() {
    let nats = NatsServer::start();
    let proxy = common::nats::Proxy::start(nats.port).await;
    let mut config = nats.gateway_config();
    config.bus.nats.url = proxy.url();
    let a = TestServer::start(config).await;
    wait_ready(&a, 200).await;
    let b = node(&nats).await;
    let mut c = Client::as_user(&a, "acme", "behind-the-cut").await;
    c.subscribe("all", json!({})).await;
    let three: Vec<Value> = (0..3).map(|_| json!({"event_type": "escalated"})).collect();
    let mut published = b.publish("acme", &Value::Array(three.clone())).await;
    let mut got = Vec::new();
    c.read_events(&mut got, 3).await;

    proxy.cut();
    wait_ready(&a, 503).await;
    // Held until A gave its consumer up (it does on the disconnection), so the way back is the
    // recreation from the last delivered sequence.
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.metrics().await.get("bus_connected") != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the consumer was never given up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // B still reaches NATS: these are stored while A cannot read them.
    for _ in 0..4 {
        published.extend(b.publish("acme", &Value::Array(three.clone())).await);
    }
    c.assert_alive().await;
    c.expect_silence(Duration::from_millis(200)).await;

    proxy.restore();
    wait_ready(&a, 200).await;
    published.extend(b.publish("acme", &Value::Array(three)).await);
    c.read_events(&mut got, published.len()).await;
    assert_eq!(got, published, "the node resumed from the last event it delivered: no gap, no repeat");
    c.expect_silence(Duration::from_millis(100)).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_the_stream_cannot_serve_get_resume_unavailable_and_continue_live() {
    let nats = NatsServer::start();
    let mut config = nats.gateway_config();
    config.bus.replay_window = 5;
    config.bus.nats.max_age_secs = 2;
    let a = TestServer::start(config).await;
    wait_ready(&a, 200).await;
    let ev = |n: usize| Value::Array((0..n).map(|_| json!({"event_type": "escalated"})).collect());
    let old = a.publish("acme", &ev(3)).await;
    // Let the first three age out of the stream, then publish eight more.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ids = a.publish("acme", &ev(8)).await;
    let expect_unavailable = |e: &Value, sub: &str| {
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("resume_unavailable")), "{e}");
        assert_eq!(e["subscription_id"], sub);
    };
    let mut clients = Vec::new();
    // Evicted by the stream's age limit: told the oldest id the stream still holds.
    let mut c = Client::as_user(&a, "acme", "evicted").await;
    c.send(json!({"type": "subscribe", "subscription_id": "e", "filters": {}, "resume_from": old[0]})).await;
    assert_eq!(c.recv().await["type"], "subscribed");
    let e = c.recv().await;
    expect_unavailable(&e, "e");
    assert_eq!(e["oldest_message_id"].as_str(), Some(ids[0].as_str()));
    clients.push(c);
    // More events follow the position than one replay sends (bus.replay_window = 5).
    let mut c = Client::as_user(&a, "acme", "too-far").await;
    c.send(json!({"type": "subscribe", "subscription_id": "f", "filters": {}, "resume_from": ids[0]})).await;
    assert_eq!(c.recv().await["type"], "subscribed");
    let e = c.recv().await;
    expect_unavailable(&e, "f");
    assert!(e["message"].as_str().unwrap_or_default().contains("7 events"), "{e}");
    clients.push(c);
    // Another epoch (a stream created again, or the local bus's ids).
    let mut c = Client::as_user(&a, "acme", "other-epoch").await;
    c.send(json!({"type": "subscribe", "subscription_id": "x", "filters": {}, "resume_from": "1-1"})).await;
    assert_eq!(c.recv().await["type"], "subscribed");
    let e = c.recv().await;
    expect_unavailable(&e, "x");
    assert!(e["message"].as_str().unwrap_or_default().contains("epoch"), "{e}");
    clients.push(c);
    // Within what one replay sends: exactly the events after the position.
    let mut c = Client::as_user(&a, "acme", "fine").await;
    c.send(json!({"type": "subscribe", "subscription_id": "ok", "filters": {}, "resume_from": ids[3]})).await;
    assert_eq!(c.recv().await["type"], "subscribed");
    let mut got = Vec::new();
    c.read_events(&mut got, 4).await;
    assert_eq!(got, ids[4..].to_vec());
    clients.push(c);
    // Every one of them continues live.
    let live = a.publish("acme", &ev(1)).await;
    for c in &mut clients {
        assert_eq!(c.recv().await["message_id"].as_str(), Some(live[0].as_str()));
    }
    a.shutdown().await;
}

/// The same as above with every gateway its own process, and node B killed (SIGKILL: a crash,
/// no goodbye to its clients) while events keep coming through node A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_processes_share_the_stream_and_a_killed_one_loses_nothing_for_clients_that_resume() {
    let nats = NatsServer::start();
    let config = nats.gateway_config();
    let a = GatewayProcess::spawn(&config);
    let mut b = GatewayProcess::spawn(&config);
    wait_ready(&a.server, 200).await;
    wait_ready(&b.server, 200).await;
    let t = token("acme", "on-b", &[], 300);
    let mut on_a = Client::connect(&a.server, &t).await;
    let mut on_b = Client::connect(&b.server, &t).await;
    on_a.subscribe("s", json!({"event_types": WANTED})).await;
    on_b.subscribe("s", json!({"event_types": WANTED})).await;
    let via_a = Arc::new(TestServer::at(a.server.addr, Some(&config.tls.cert.with_file_name("ca.crt"))));
    let publishing = publisher(vec![via_a], 5, 60, 40);
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    on_b.read_events(&mut got_b, 15).await;
    b.stop("-KILL");
    events_until_closed(&mut on_b, &mut got_b).await;
    let b = GatewayProcess::spawn(&config);
    wait_ready(&b.server, 200).await;
    let mut on_b = Client::connect(&b.server, &t).await;
    on_b.send(resume("s", got_b.last().expect("read before the kill"))).await;
    assert_eq!(on_b.recv().await["type"], "subscribed");
    let expected = publishing.await.expect("publisher");
    on_b.read_events(&mut got_b, expected.len()).await;
    assert_eq!(got_b, expected, "the client of the killed node: every event once, in order");
    on_a.read_events(&mut got_a, expected.len()).await;
    assert_eq!(got_a, expected, "the client of the other node saw the same stream");
    on_b.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_idempotency_key_on_another_node_is_stored_once() {
    let nats = NatsServer::start();
    let (a, b) = (node(&nats).await, node(&nats).await);
    common::check_idempotent_publishes(&a, &b).await;
    a.shutdown().await;
    b.shutdown().await;
}

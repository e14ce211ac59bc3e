//! The tenancy invariant under attack, over many seeds: several tenants, random filters (some
//! naming another tenant's label, some naming incident ids other tenants use too, some empty),
//! a random stream of events for all tenants; every subscriber receives exactly its own tenant's
//! matching events, in order, once, and nothing else. Run on the local bus and again over NATS
//! JetStream with the subscribers on two gateway nodes.

mod common;

use std::time::Duration;

use common::nats::{wait_ready, NatsServer};
use common::{reference_matches, token, Client, TestServer};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const TYPES: [&str; 5] = ["incident_created", "alert_received", "escalated", "comment_added", "system_event"];
const SEVERITIES: [&str; 5] = ["P0", "P1", "P2", "P3", "P4"];
const INCIDENTS: [&str; 4] = ["inc-1", "inc-2", "inc-3", "inc-4"];
const ENVS: [&str; 2] = ["production", "staging"];

fn pick_some(rng: &mut StdRng, pool: &[&str]) -> Vec<String> {
    let n = rng.random_range(0..=2);
    (0..n).map(|_| (*pool.choose(rng).expect("pool")).to_owned()).collect()
}

fn random_filter(rng: &mut StdRng, own: &str) -> Value {
    let mut f = json!({});
    match rng.random_range(0..6) {
        0 => {}                                                                // empty: everything the session may see
        1 => f["labels"] = json!({"tenant": TENANTS.choose(rng).expect("t")}), // maybe another tenant: forbidden
        2 => f["incident_ids"] = json!(pick_some(rng, &INCIDENTS)),
        3 => f["labels"] = json!({"environment": ENVS.choose(rng).expect("e")}),
        4 => {
            f["event_types"] = json!(pick_some(rng, &TYPES));
            f["severities"] = json!(pick_some(rng, &SEVERITIES));
        }
        _ => f["labels"] = json!({"tenant": own, "environment": ENVS.choose(rng).expect("e")}),
    }
    f
}

fn random_event(rng: &mut StdRng, n: usize) -> (&'static str, Value) {
    let tenant = *TENANTS.choose(rng).expect("t");
    let mut e = json!({
        "event_type": TYPES.choose(rng).expect("t"),
        "incident_id": INCIDENTS.choose(rng).expect("i"),
        "labels": {"environment": ENVS.choose(rng).expect("e")},
        "n": n,
    });
    if rng.random_bool(0.8) {
        e["severity"] = json!(SEVERITIES.choose(rng).expect("s"));
    }
    (tenant, e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_subscriber_ever_sees_another_tenants_event() {
    let server = TestServer::default().await;
    attack(&server, &[&server], 0..10).await;
    server.shutdown().await;
}

/// The same attack over the NATS JetStream bus: subscribers spread over two gateway nodes, the
/// events published through one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_subscriber_ever_sees_another_tenants_event_across_nats_nodes() {
    let nats = NatsServer::start();
    let a = TestServer::start(nats.gateway_config()).await;
    let b = TestServer::start(nats.gateway_config()).await;
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;
    attack(&a, &[&a, &b], 100..106).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Per seed: six subscribers (two per tenant) with random filters, spread over `nodes`; four
/// batches of 15 random events for every tenant published through `publish_on` by a system
/// publisher; each subscriber must get exactly its own tenant's matching events, in order.
async fn attack(publish_on: &TestServer, nodes: &[&TestServer], seeds: std::ops::Range<u64>) {
    let server = publish_on;
    let system = token("ops", "router", &["publisher", "system"], 600);
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        struct Sub {
            c: Client,
            tenant: &'static str,
            filters: Vec<Value>,
        }
        let mut subs = Vec::new();
        for (i, tenant) in TENANTS.iter().cycle().take(6).enumerate() {
            let mut c = Client::as_user(nodes[i % nodes.len()], tenant, &format!("s{seed}-{i}")).await;
            let mut accepted = Vec::new();
            for k in 0..rng.random_range(1..=3) {
                let f = random_filter(&mut rng, tenant);
                c.send(json!({"type": "subscribe", "subscription_id": format!("f{k}"), "filters": f})).await;
                let r = c.recv().await;
                let names_other = f["labels"]["tenant"].as_str().is_some_and(|t| t != *tenant);
                if names_other {
                    assert_eq!(r["code"], "forbidden_filter", "seed {seed}: {f} -> {r}");
                } else {
                    assert_eq!(r["type"], "subscribed", "seed {seed}: {f} -> {r}");
                    assert_eq!(r["filters"]["labels"]["tenant"], *tenant);
                    let mut eff = f.clone();
                    eff["labels"]["tenant"] = json!(tenant);
                    accepted.push(eff);
                }
            }
            subs.push(Sub { c, tenant, filters: accepted });
        }
        let mut published: Vec<(String, &'static str, Value)> = Vec::new();
        for batch in 0..4 {
            let events: Vec<(&'static str, Value)> = (0..15).map(|k| random_event(&mut rng, batch * 15 + k)).collect();
            let body: Vec<Value> = events
                .iter()
                .map(|(t, e)| {
                    let mut e = e.clone();
                    e["tenant"] = json!(t);
                    e
                })
                .collect();
            let auth = format!("Bearer {system}");
            let r = server.http("POST", "/v1/events", &[("authorization", &auth)], Some(&Value::Array(body))).await;
            assert_eq!(r.status, 202, "{}", r.body);
            let ids = r.json()["message_ids"].as_array().expect("ids").clone();
            for (id, (t, mut e)) in ids.into_iter().zip(events) {
                e["tenant"] = json!(t);
                e["labels"]["tenant"] = json!(t);
                published.push((id.as_str().expect("id").to_owned(), t, e));
            }
        }
        for s in &mut subs {
            let expected: Vec<&str> = published
                .iter()
                .filter(|(_, t, e)| *t == s.tenant && s.filters.iter().any(|f| reference_matches(f, e)))
                .map(|(id, _, _)| id.as_str())
                .collect();
            let mut got = Vec::new();
            while got.len() < expected.len() {
                let m = s.c.recv().await;
                assert_eq!(m["type"], "event", "seed {seed}: {m}");
                assert_eq!(m["event"]["tenant"], s.tenant, "seed {seed}: crossed tenants: {m}");
                got.push(m["message_id"].as_str().expect("id").to_owned());
            }
            assert_eq!(got, expected, "seed {seed}, tenant {}", s.tenant);
            s.c.expect_silence(Duration::from_millis(100)).await;
        }
    }
}

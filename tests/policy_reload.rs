//! Live policy reloads, black-box: a real TLS server watching a policy directory the test edits.
//! A good edit changes limits for live sessions and new connections at once; a bad edit (syntax
//! error, unknown key, bad limit, unknown event type) is rejected as a whole and the old policies
//! stay in force; disabling a tenant or revoking a subject or token closes exactly those sessions
//! with 4003; narrowing the allowed event types removes the subscriptions that asked for others.
//! Every reload is counted and audited with the files' SHA-256 and who triggered it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{policy_config, reloads, token, try_connect, wait_audit, wait_reloads, write_tenant, Client, TestServer};
use serde_json::json;
use sha2::Digest;

async fn watched(tenants: &[(&str, &str)]) -> (TestServer, std::path::PathBuf, std::path::PathBuf) {
    let mut cfg = policy_config(tenants);
    cfg.policies.watch_interval_ms = 100;
    let (dir, audit) = (cfg.policies.dir.clone(), cfg.audit.path.clone());
    (TestServer::start(cfg).await, dir, audit)
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read");
    sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_good_edit_changes_limits_live_and_is_audited_with_file_hashes() {
    let (server, dir, audit) = watched(&[("acme", "[limits]\nmax_subscriptions_per_connection = 1\n")]).await;
    let mut c = Client::as_user(&server, "acme", "alice").await;
    c.subscribe("a", json!({})).await;
    c.send(json!({"type": "subscribe", "subscription_id": "b", "filters": {}})).await;
    assert_eq!(c.recv().await["code"], "too_many_subscriptions");

    write_tenant(&dir, "acme", "[limits]\nmax_subscriptions_per_connection = 3\nmax_connections = 1\n");
    wait_reloads(&server, "ok", 1.0).await;
    // The live session takes the new limit at its next message.
    c.subscribe("b", json!({})).await;
    c.subscribe("c", json!({})).await;
    // New connections meet the new cap at once (alice holds the one place).
    let r = try_connect(&server, &token("acme", "bob", &[], 60), &[], None).await.expect_err("cap of 1");
    assert_eq!(r.code(), "too_many_connections");

    let rec = wait_audit(&audit, "reloaded", |r| r["kind"] == "policy.reloaded").await;
    assert_eq!((rec["trigger"].as_str(), rec["reason"].as_str()), (Some("file_watch"), Some("ok")));
    assert_eq!(rec["changed_tenants"], json!(["acme"]));
    assert_eq!(rec["files"]["acme.toml"], sha256_hex(&dir.join("acme.toml")));
    assert_eq!(rec["files"]["_defaults.toml"], sha256_hex(&dir.join("_defaults.toml")));
    assert_eq!(rec["files"]["globex.toml"], sha256_hex(&dir.join("globex.toml")));
    server.shutdown().await;
}

#[tokio::test]
async fn a_bad_edit_is_rejected_whole_and_the_old_policies_stay() {
    let (server, dir, audit) = watched(&[("acme", "[limits]\nmax_subscriptions_per_connection = 1\n")]).await;
    let mut c = Client::as_user(&server, "acme", "alice").await;
    c.subscribe("a", json!({})).await;
    let bad_edits: [(&str, &str, &str); 4] = [
        ("acme", "[limits]\nmax_subscriptions_per_connection = 5\nmax_connections = [\n", "acme.toml"),
        ("acme", "[limits]\nmax_subscriptions_per_connection = 5\nmax_conections = 2\n", "max_conections"),
        ("acme", "[limits]\nmax_subscriptions_per_connection = 0\n", "limits.max_subscriptions_per_connection"),
        ("acme", "allowed_event_types = [\"escalated\", \"exploded\"]\n", "exploded"),
    ];
    for (n, (tenant, text, needle)) in bad_edits.iter().enumerate() {
        // A valid edit of another file in the same change must not slip through either.
        write_tenant(&dir, "globex", &format!("# edit {n}\nenabled = false\n"));
        write_tenant(&dir, tenant, text);
        wait_reloads(&server, "rejected", (n + 1) as f64).await;
        let rec = wait_audit(&audit, "rejected", |r| {
            r["kind"] == "policy.rejected" && r["errors"].to_string().contains(needle)
        })
        .await;
        assert_eq!(rec["trigger"], "file_watch");
        let errors = rec["errors"].to_string();
        assert!(errors.contains("acme.toml") && errors.contains("line"), "{errors}");
        // Old policies in force: acme still capped at one subscription, globex still enabled.
        c.send(json!({"type": "subscribe", "subscription_id": format!("x{n}"), "filters": {}})).await;
        assert_eq!(c.recv().await["code"], "too_many_subscriptions", "after bad edit {n}");
        let mut g = Client::as_user(&server, "globex", "gina").await;
        g.assert_alive().await;
    }
    assert_eq!(reloads(&server.metrics().await, "ok"), 0.0);
    // The admin API reports the same errors and changes nothing.
    let admin = token("ops", "root", &["admin"], 60);
    let r = server.http("POST", "/admin/policies/reload", &[("authorization", &format!("Bearer {admin}"))], None).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (422, Some("invalid_policy")));
    assert!(r.json()["errors"].to_string().contains("exploded"), "{}", r.body);
    // Fixing the file applies the whole change, globex's edit included.
    write_tenant(&dir, "acme", "[limits]\nmax_subscriptions_per_connection = 5\n");
    wait_reloads(&server, "ok", 1.0).await;
    c.subscribe("y", json!({})).await;
    let r = try_connect(&server, &token("globex", "gina", &[], 60), &[], None).await.expect_err("globex disabled");
    assert_eq!(r.code(), "tenant_disabled");
    server.shutdown().await;
}

#[tokio::test]
async fn disabling_a_tenant_closes_its_sessions_with_4003_and_no_one_elses() {
    let (server, dir, audit) = watched(&[]).await;
    let mut a1 = Client::as_user(&server, "acme", "alice").await;
    let mut a2 = Client::as_user(&server, "acme", "bob").await;
    let mut g = Client::as_user(&server, "globex", "gina").await;
    a1.subscribe("s", json!({})).await;
    g.subscribe("s", json!({})).await;
    write_tenant(&dir, "acme", "enabled = false\n");
    for c in [&mut a1, &mut a2] {
        let (seen, code, reason) = c.read_until_close().await;
        assert_eq!((code, reason.as_str()), (4003, "tenant_disabled"));
        assert_eq!(seen.last().map(|m| m["type"].clone()), Some(json!("closing")));
    }
    g.assert_alive().await;
    server.publish("globex", &json!({"event_type": "escalated"})).await;
    assert_eq!(g.recv().await["type"], "event");
    let r = try_connect(&server, &token("acme", "alice", &[], 60), &[], None).await.expect_err("disabled");
    assert_eq!((r.status, r.code()), (403, "tenant_disabled"));
    let rec = wait_audit(&audit, "closed", |r| r["kind"] == "connection.closed" && r["subject"] == "alice").await;
    assert_eq!((rec["close_code"].as_u64(), rec["reason"].as_str()), (Some(4003), Some("tenant_disabled")));
    server.shutdown().await;
}

#[tokio::test]
async fn revoking_a_subject_or_a_token_closes_exactly_those_sessions() {
    let (server, dir, _audit) = watched(&[]).await;
    let now = jsonwebtoken::get_current_timestamp();
    let jti = |sub: &str, id: &str| common::sign(json!({"sub": sub, "tenant": "acme", "jti": id, "exp": now + 300}));
    let mut mallory = Client::connect(&server, &jti("mallory", "m-1")).await;
    let mut stolen = Client::connect(&server, &jti("alice", "stolen-1")).await;
    let mut alice = Client::connect(&server, &jti("alice", "a-2")).await;
    let mut other = Client::as_user(&server, "globex", "mallory").await;
    write_tenant(&dir, "acme", "revoked_subjects = [\"mallory\"]\nrevoked_token_ids = [\"stolen-1\"]\n");
    let (_, code, reason) = mallory.read_until_close().await;
    assert_eq!((code, reason.as_str()), (4003, "subject_revoked"));
    let (_, code, reason) = stolen.read_until_close().await;
    assert_eq!((code, reason.as_str()), (4003, "token_revoked"));
    alice.assert_alive().await;
    other.assert_alive().await;
    server.shutdown().await;
}

#[tokio::test]
async fn narrowing_event_types_removes_the_subscriptions_that_asked_for_others() {
    let (server, dir, audit) = watched(&[]).await;
    let mut c = Client::as_user(&server, "acme", "alice").await;
    c.subscribe("created", json!({"event_types": ["incident_created"]})).await;
    c.subscribe("esc", json!({"event_types": ["escalated"]})).await;
    c.subscribe("all", json!({})).await;
    write_tenant(&dir, "acme", "allowed_event_types = [\"escalated\", \"incident_resolved\"]\n");
    let e = c.recv().await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("forbidden_filter")));
    assert_eq!(e["subscription_id"], "created");
    assert!(e["message"].as_str().unwrap_or_default().contains("incident_created"), "{e}");
    let u = c.recv().await;
    assert_eq!((u["type"].as_str(), u["subscription_id"].as_str()), (Some("unsubscribed"), Some("created")));
    let rec = wait_audit(&audit, "removed", |r| r["kind"] == "subscription.removed").await;
    assert_eq!((rec["subscription_id"].as_str(), rec["reason"].as_str()), (Some("created"), Some("forbidden_filter")));
    // `all` follows the tenant's allowed types; `esc` stays as it was.
    server
        .publish(
            "acme",
            &json!([{"event_type": "incident_created"}, {"event_type": "escalated"}, {"event_type": "incident_resolved"}]),
        )
        .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let ev = c.recv().await;
        got.push(ev["event"]["event_type"].as_str().unwrap_or_default().to_owned());
    }
    c.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(got, vec!["escalated", "incident_resolved"], "incident_created is no longer delivered");
    // New subscriptions: a forbidden type is refused, an empty filter is narrowed.
    c.send(json!({"type": "subscribe", "subscription_id": "new", "filters": {"event_types": ["incident_created"]}}))
        .await;
    assert_eq!(c.recv().await["code"], "forbidden_filter");
    let s = c.subscribe("any", json!({})).await;
    assert_eq!(s["filters"]["event_types"], json!(["incident_resolved", "escalated"]));
    server.shutdown().await;
}

#[tokio::test]
async fn policy_mandatory_labels_bind_subscriptions_and_a_change_closes_sessions() {
    let (server, dir, _audit) = watched(&[("acme", "[mandatory_labels]\nteam = \"team\"\n")]).await;
    let now = jsonwebtoken::get_current_timestamp();
    let with_team =
        |team: &str| common::sign(json!({"sub": "alice", "tenant": "acme", "team": team, "exp": now + 300}));
    // A token without the claim the policy maps is refused at the door.
    let r = try_connect(&server, &token("acme", "alice", &[], 60), &[], None).await.expect_err("no team claim");
    assert_eq!((r.status, r.code()), (401, "missing_claim"));
    let mut red = Client::connect(&server, &with_team("red")).await;
    let s = red.subscribe("mine", json!({})).await;
    assert_eq!(s["filters"]["labels"], json!({"team": "red", "tenant": "acme"}));
    red.send(json!({"type": "subscribe", "subscription_id": "theirs", "filters": {"labels": {"team": "blue"}}})).await;
    assert_eq!(red.recv().await["code"], "forbidden_filter");
    server.publish("acme", &json!([{"event_type": "escalated", "labels": {"team": "blue"}}, {"event_type": "escalated", "labels": {"team": "red"}}])).await;
    let ev = red.recv().await;
    assert_eq!(ev["event"]["labels"]["team"], "red");
    red.expect_silence(Duration::from_millis(200)).await;
    // Other tenants are not bound by acme's labels.
    let mut g = Client::as_user(&server, "globex", "gina").await;
    assert_eq!(g.subscribe("all", json!({})).await["filters"]["labels"], json!({"tenant": "globex"}));
    // Changing the mapping closes acme's sessions so they come back with the new labels.
    write_tenant(&dir, "acme", "[mandatory_labels]\nteam = \"squad\"\n");
    let (_, code, reason) = red.read_until_close().await;
    assert_eq!((code, reason.as_str()), (4003, "policy_changed"));
    g.assert_alive().await;
    server.shutdown().await;
}

#[tokio::test]
async fn removing_an_origin_closes_the_sessions_that_came_from_it() {
    let (server, dir, _audit) =
        watched(&[("acme", "allowed_origins = [\"https://a.example\", \"https://b.example\"]\n")]).await;
    let t = token("acme", "alice", &[], 300);
    let mut from_a = try_connect(&server, &t, &[("origin", "https://a.example")], None).await.expect("a");
    let mut from_b = try_connect(&server, &t, &[("origin", "https://b.example")], None).await.expect("b");
    let mut program = try_connect(&server, &t, &[], None).await.expect("no origin");
    write_tenant(&dir, "acme", "allowed_origins = [\"https://b.example\"]\n");
    let (_, code, reason) = from_a.read_until_close().await;
    assert_eq!((code, reason.as_str()), (4003, "origin_not_allowed"));
    from_b.assert_alive().await;
    program.assert_alive().await;
    server.shutdown().await;
}

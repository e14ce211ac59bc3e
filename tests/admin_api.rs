//! The admin API, black-box over TLS with real tokens: every route with an admin token, without
//! a token (401) and with a token lacking the role (403), each call on record as `admin.action`;
//! policy reads and writes (a bad body changes nothing and gets 422 with the errors; a good one is
//! on disk and in force at once); a race of concurrent writes where the last valid write wins and
//! no file is ever half-written; sessions listed and kicked (4003 `kicked`).

mod common;

use std::path::Path;

use common::{policy_config, token, try_connect, wait_audit, Client, HttpResponse, TestServer};
use serde_json::{json, Value};

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn admin() -> String {
    token("ops", "root", &["admin"], 300)
}

async fn call(server: &TestServer, method: &str, path: &str, tok: Option<&str>, body: Option<&str>) -> HttpResponse {
    let auth = tok.map(bearer);
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    if body.is_some() {
        headers.push(("content-type", "application/toml"));
    }
    server.raw_http(method, path, &headers, body.unwrap_or_default().as_bytes()).await
}

#[tokio::test]
async fn every_route_needs_an_admin_token_and_every_call_is_audited() {
    let cfg = policy_config(&[]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let routes: [(&str, &str, Option<&str>); 6] = [
        ("GET", "/admin/tenants", None),
        ("GET", "/admin/tenants/acme/policy", None),
        ("PUT", "/admin/tenants/acme/policy", Some("tenant = \"acme\"\n")),
        ("POST", "/admin/policies/reload", None),
        ("GET", "/admin/sessions?tenant=acme", None),
        ("DELETE", "/admin/sessions/no-such-session", None),
    ];
    let user = token("acme", "alice", &["publisher", "auditor"], 300);
    for (method, path, body) in routes {
        let r = call(&server, method, path, None, body).await;
        assert_eq!((r.status, r.json()["code"].as_str()), (401, Some("missing")), "{method} {path}");
        let r = call(&server, method, path, Some(&user), body).await;
        assert_eq!((r.status, r.json()["code"].as_str()), (403, Some("forbidden")), "{method} {path}: {}", r.body);
        assert!(r.header("www-authenticate").is_some_and(|h| h.contains("insufficient_scope")));
        let r = call(&server, method, path, Some(&admin()), body).await;
        let expected = if method == "DELETE" { 404 } else { 200 };
        assert_eq!(r.status, expected, "{method} {path}: {}", r.body);
    }
    // Six refused and six allowed calls on record (the unauthenticated ones as rejections).
    let rec = wait_audit(&audit, "last admin call", |r| r["action"] == "session.kick" && r["status"] == 404).await;
    assert_eq!((rec["subject"].as_str(), rec["target"].as_str()), (Some("root"), Some("no-such-session")));
    let records = common::audit_records(&audit);
    let actions: Vec<(String, u64)> = records
        .iter()
        .filter(|r| r["kind"] == "admin.action")
        .map(|r| (r["action"].as_str().unwrap_or_default().to_owned(), r["status"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(actions.len(), 12, "{actions:?}");
    assert_eq!(actions.iter().filter(|(_, s)| *s == 403).count(), 6);
    let unauthenticated =
        records.iter().filter(|r| r["kind"] == "connection.rejected" && r["reason"] == "missing").count();
    assert_eq!(unauthenticated, 6);
    server.shutdown().await;
}

#[tokio::test]
async fn tenants_and_policies_can_be_read() {
    let cfg = policy_config(&[("acme", "allowed_event_types = [\"escalated\"]\n[limits]\nmax_connections = 7\n")]);
    let dir = cfg.policies.dir.clone();
    let server = TestServer::start(cfg).await;
    let mut a = Client::as_user(&server, "acme", "alice").await;
    a.subscribe("one", json!({})).await;
    a.subscribe("two", json!({})).await;
    let _b = Client::as_user(&server, "acme", "bob").await;
    let r = call(&server, "GET", "/admin/tenants", Some(&admin()), None).await;
    let tenants = r.json()["tenants"].clone();
    let acme = tenants.as_array().expect("list").iter().find(|t| t["tenant"] == "acme").cloned().expect("acme");
    assert_eq!(acme, json!({"tenant": "acme", "enabled": true, "connections": 2, "subscriptions": 2}));
    let globex = tenants.as_array().expect("list").iter().find(|t| t["tenant"] == "globex").cloned().expect("globex");
    assert_eq!((globex["connections"].as_u64(), globex["subscriptions"].as_u64()), (Some(0), Some(0)));

    let r = call(&server, "GET", "/admin/tenants/acme/policy", Some(&admin()), None).await;
    let p = r.json();
    assert_eq!(p["file"].as_str(), Some(std::fs::read_to_string(dir.join("acme.toml")).expect("file").as_str()));
    assert_eq!(p["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(p["effective"]["limits"]["max_connections"], 7);
    assert_eq!(p["effective"]["limits"]["publishes_per_second"], 1_000_000, "from the defaults");
    assert_eq!(p["effective"]["allowed_event_types"], json!(["escalated"]));
    assert_eq!(p["effective"]["allowed_origins"], json!(["https://app.example"]));
    let r = call(&server, "GET", "/admin/tenants/umbrella/policy", Some(&admin()), None).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (404, Some("unknown_tenant")));
    let r = call(&server, "GET", "/admin/tenants/not%20valid/policy", Some(&admin()), None).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("invalid_tenant")));
    server.shutdown().await;
}

fn file(dir: &Path, tenant: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{tenant}.toml"))).expect("policy file")
}

#[tokio::test]
async fn a_put_is_validated_with_the_whole_set_written_atomically_and_in_force_at_once() {
    let mut cfg = policy_config(&[]);
    cfg.policies.watch = false;
    let (dir, audit) = (cfg.policies.dir.clone(), cfg.audit.path.clone());
    let server = TestServer::start(cfg).await;
    let before = file(&dir, "acme");
    let bad: [(&str, &str); 5] = [
        ("tenant = \"acme\"\n[limits]\nmax_connections = 0\n", "line 3, key `limits.max_connections`"),
        ("tenant = \"acme\"\nsurprise = true\n", "surprise"),
        ("tenant = \"globex\"\n", "does not match"),
        ("tenant = \"acme\"\nallowed_event_types = [\"nope\"]\n", "nope"),
        ("tenant = [\n", "acme.toml"),
    ];
    for (body, needle) in bad {
        let r = call(&server, "PUT", "/admin/tenants/acme/policy", Some(&admin()), Some(body)).await;
        assert_eq!((r.status, r.json()["code"].as_str()), (422, Some("invalid_policy")), "{body}");
        assert!(r.json()["errors"].to_string().contains(needle), "{needle}: {}", r.body);
        assert_eq!(file(&dir, "acme"), before, "nothing written");
    }
    // The directory's own files cannot be written through the API.
    let r =
        call(&server, "PUT", "/admin/tenants/_defaults/policy", Some(&admin()), Some("tenant = \"_defaults\"\n")).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("invalid_tenant")));
    assert!(std::fs::read_to_string(dir.join("_defaults.toml")).expect("defaults").starts_with("enabled = true"));
    let rec =
        wait_audit(&audit, "rejected put", |r| r["kind"] == "policy.rejected" && r["trigger"] == "admin_put").await;
    assert_eq!(rec["subject"], "root");

    // A good body: on disk, in force, audited, and no temporary file left behind.
    let mut c = Client::as_user(&server, "acme", "alice").await;
    let good = "tenant = \"acme\"\nenabled = false\n";
    let r = call(&server, "PUT", "/admin/tenants/acme/policy", Some(&admin()), Some(good)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changed_tenants"], json!(["acme"]));
    assert_eq!(file(&dir, "acme"), good);
    let (_, code, reason) = c.read_until_close().await;
    assert_eq!((code, reason.as_str()), (4003, "tenant_disabled"));
    let r = try_connect(&server, &token("acme", "alice", &[], 60), &[], None).await.expect_err("disabled");
    assert_eq!(r.code(), "tenant_disabled");
    let rec = wait_audit(&audit, "put reload", |r| r["kind"] == "policy.reloaded" && r["trigger"] == "admin_put").await;
    assert_eq!(rec["files"]["acme.toml"], r_sha(good));
    // Onboarding a tenant is a PUT too.
    let r =
        call(&server, "PUT", "/admin/tenants/umbrella/policy", Some(&admin()), Some("tenant = \"umbrella\"\n")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    Client::as_user(&server, "umbrella", "u1").await.assert_alive().await;
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    server.shutdown().await;
}

fn r_sha(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn concurrent_puts_race_to_one_whole_valid_file_and_the_last_valid_write_wins() {
    let cfg = policy_config(&[]);
    let (dir, audit_path) = (cfg.policies.dir.clone(), cfg.audit.path.clone());
    let server = std::sync::Arc::new(TestServer::start(cfg).await);
    let mut tasks = Vec::new();
    for i in 0..24u32 {
        let server = std::sync::Arc::clone(&server);
        tasks.push(tokio::spawn(async move {
            // Every third body is invalid; the valid ones differ in a limit and a padding comment.
            let body = if i % 3 == 2 {
                format!("tenant = \"acme\"\n[limits]\nmax_connections = -{i}\n")
            } else {
                format!(
                    "# writer {i}: {}\ntenant = \"acme\"\n[limits]\nmax_connections = {}\n",
                    "x".repeat(4096),
                    100 + i
                )
            };
            let r = call(&server, "PUT", "/admin/tenants/acme/policy", Some(&admin()), Some(&body)).await;
            (i, r.status, body)
        }));
    }
    let mut ok = Vec::new();
    for t in tasks {
        let (i, status, body) = t.await.expect("task");
        match status {
            200 => ok.push(body),
            422 => assert_eq!(i % 3, 2, "only the invalid bodies are refused"),
            s => panic!("writer {i}: status {s}"),
        }
    }
    assert_eq!(ok.len(), 16);
    // The file is exactly one of the accepted bodies, and it is what is in force.
    let on_disk = file(&dir, "acme");
    assert!(ok.contains(&on_disk), "the file is one whole accepted body");
    let r = call(&server, "GET", "/admin/tenants/acme/policy", Some(&admin()), None).await;
    assert_eq!(r.json()["sha256"].as_str(), Some(r_sha(&on_disk).as_str()));
    assert_eq!(r.json()["file"].as_str(), Some(on_disk.as_str()));
    let limit = on_disk.lines().find_map(|l| l.strip_prefix("max_connections = ")).expect("limit");
    assert_eq!(r.json()["effective"]["limits"]["max_connections"].to_string(), limit);
    // The last write the server applied is the one whose reload record comes last.
    let audit = common::audit_records(&audit_path);
    let last = audit.iter().rev().find(|r| r["kind"] == "policy.reloaded").expect("reload records");
    assert_eq!(last["files"]["acme.toml"].as_str(), Some(r_sha(&on_disk).as_str()));
    match std::sync::Arc::try_unwrap(server) {
        Ok(s) => s.shutdown().await,
        Err(_) => panic!("server still shared"),
    }
}

#[tokio::test]
async fn sessions_are_listed_and_kicked_with_4003() {
    let cfg = policy_config(&[]);
    let audit = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let mut a = Client::as_user(&server, "acme", "alice").await;
    a.subscribe("s", json!({})).await;
    let mut b = Client::as_user(&server, "acme", "bob").await;
    let mut g = Client::as_user(&server, "globex", "gina").await;
    let r = call(&server, "GET", "/admin/sessions?tenant=acme", Some(&admin()), None).await;
    let sessions = r.json()["sessions"].as_array().cloned().expect("list");
    assert_eq!(sessions.len(), 2);
    let alice = sessions.iter().find(|s| s["subject"] == "alice").cloned().expect("alice");
    assert_eq!(alice["session_id"], a.welcome["session_id"]);
    assert_eq!(
        (alice["tenant"].as_str(), alice["subscriptions"].as_u64(), alice["queue_depth"].as_u64()),
        (Some("acme"), Some(1), Some(0))
    );
    assert!(alice["remote_addr"].as_str().unwrap_or_default().starts_with("127.0.0.1:"));
    assert!(alice["connected_since"].as_str().unwrap_or_default().ends_with('Z'));
    let all = call(&server, "GET", "/admin/sessions", Some(&admin()), None).await;
    assert_eq!(all.json()["sessions"].as_array().map(Vec::len), Some(3));
    let bad = call(&server, "GET", "/admin/sessions?tenant=acme&colour=red", Some(&admin()), None).await;
    assert_eq!((bad.status, bad.json()["code"].as_str()), (400, Some("invalid_query")));

    let id = alice["session_id"].as_str().expect("id").to_owned();
    let r = call(&server, "DELETE", &format!("/admin/sessions/{id}"), Some(&admin()), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"session_id": id, "tenant": "acme", "subject": "alice", "closing": true}));
    let (seen, code, reason) = a.read_until_close().await;
    assert_eq!((code, reason.as_str()), (4003, "kicked"));
    assert_eq!(seen.last().map(|m| m["reason"].clone()), Some(Value::from("kicked")));
    b.assert_alive().await;
    g.assert_alive().await;
    let rec = wait_audit(&audit, "kick", |r| r["action"] == "session.kick").await;
    assert_eq!((rec["target"].as_str(), rec["status"].as_u64()), (Some(id.as_str()), Some(200)));
    let closed = wait_audit(&audit, "closed", |r| r["kind"] == "connection.closed" && r["subject"] == "alice").await;
    assert_eq!((closed["close_code"].as_u64(), closed["reason"].as_str()), (Some(4003), Some("kicked")));
    let r = call(&server, "DELETE", &format!("/admin/sessions/{id}"), Some(&admin()), None).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (404, Some("unknown_session")));
    server.shutdown().await;
}

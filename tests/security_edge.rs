//! The security edge over real TLS sockets: every refusal before the upgrade with its status,
//! challenge and code (and no session created); token sources (browser subprotocol, query token
//! off by default and never logged); claim-mapped mandatory labels; protected metrics.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{config, sign, token, Client, TestServer, KID, SECRET};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ISS: &str = "https://id.example";
const AUD: &str = "incident-stream";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn good() -> Value {
    json!({"sub": "alice", "tenant": "acme", "iss": ISS, "aud": AUD, "exp": now() + 300})
}

fn with(f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut c = good();
    f(c.as_object_mut().expect("object"));
    sign(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_reason_before_the_upgrade() {
    let mut cfg = config();
    cfg.auth.issuer = Some(ISS.into());
    cfg.auth.audience = Some(AUD.into());
    cfg.auth.leeway_secs = 0;
    let server = TestServer::start(cfg).await;
    let unknown_kid = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("who-knows".into());
        jsonwebtoken::encode(&h, &good(), &EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
    };
    let wrong_alg = {
        let mut h = Header::new(Algorithm::HS384);
        h.kid = Some(KID.into());
        jsonwebtoken::encode(&h, &good(), &EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
    };
    let forged = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(KID.into());
        jsonwebtoken::encode(&h, &good(), &EncodingKey::from_secret(b"not-the-secret-not-the-secret-xx")).expect("sign")
    };
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing"),
        (Some("Bearer abc.def".into()), "malformed"),
        (Some("Basic YWxpY2U6cHc=".into()), "malformed"),
        (Some(format!("Bearer {forged}")), "bad_signature"),
        (Some(format!("Bearer {unknown_kid}")), "unknown_kid"),
        (Some(format!("Bearer {wrong_alg}")), "algorithm_not_allowed"),
        (
            Some(format!(
                "Bearer {}",
                with(|m| {
                    m.insert("exp".into(), json!(now() - 60));
                })
            )),
            "expired",
        ),
        (
            Some(format!(
                "Bearer {}",
                with(|m| {
                    m.insert("nbf".into(), json!(now() + 600));
                })
            )),
            "not_yet_valid",
        ),
        (
            Some(format!(
                "Bearer {}",
                with(|m| {
                    m.insert("iss".into(), json!("https://evil.example"));
                })
            )),
            "wrong_issuer",
        ),
        (
            Some(format!(
                "Bearer {}",
                with(|m| {
                    m.insert("aud".into(), json!("other-service"));
                })
            )),
            "wrong_audience",
        ),
        (
            Some(format!(
                "Bearer {}",
                with(|m| {
                    m.remove("sub");
                })
            )),
            "missing_claim",
        ),
        (
            Some(format!(
                "Bearer {}",
                with(|m| {
                    m.remove("tenant");
                })
            )),
            "missing_claim",
        ),
        (
            Some(format!(
                "Bearer {}",
                with(|m| {
                    m.remove("iss");
                })
            )),
            "missing_claim",
        ),
        (
            Some(format!(
                "Bearer {}",
                with(|m| {
                    m.remove("aud");
                })
            )),
            "missing_claim",
        ),
        (
            Some(format!(
                "Bearer {}",
                with(|m| {
                    m.insert("tenant".into(), json!("../etc"));
                })
            )),
            "invalid_claim",
        ),
    ];
    for (auth, code) in &cases {
        let extra: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("authorization", a)]).unwrap_or_default();
        let r = server.upgrade_request("/ws", &extra).await;
        assert_eq!(r.status, 401, "{code}: {}", r.body);
        let body = r.json();
        assert_eq!(body["code"], *code, "{body}");
        let message = body["message"].as_str().expect("message");
        assert!(!message.contains(SECRET), "no key material in answers");
        let challenge = r.header("www-authenticate").expect("challenge");
        assert!(challenge.starts_with("Bearer realm=\"incident-stream\""), "{challenge}");
        if *code == "missing" {
            assert!(!challenge.contains("error="), "RFC 6750: no error code without a token: {challenge}");
        } else {
            assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
            assert!(challenge.contains("error_description=\""), "{challenge}");
        }
        if *code == "unknown_kid" {
            assert!(message.contains("who-knows") && !message.contains(KID), "only the client's kid: {message}");
        }
    }
    let m = server.metrics().await;
    assert_eq!(m.get("websocket_total_connections"), 0.0, "no session was created");
    assert_eq!(m.get("websocket_active_connections"), 0.0);
    for (code, n) in [("missing", 1.0), ("malformed", 2.0), ("missing_claim", 4.0), ("wrong_audience", 1.0)] {
        assert_eq!(m.get(&format!("auth_failures_total{{reason=\"{code}\"}}")), n, "{code}");
    }
    // The good token gets in.
    Client::connect(&server, &sign(good())).await.assert_alive().await;
    assert_eq!(server.metrics().await.get("websocket_total_connections"), 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_authenticate_through_the_subprotocol() {
    let server = TestServer::default().await;
    let t = token("acme", "browser", &[], 300);
    let mut req = server.ws_url().into_client_request().expect("request");
    req.headers_mut()
        .insert("sec-websocket-protocol", format!("incident-stream.v1, bearer.{t}").parse().expect("header"));
    let connector = server.tls.as_ref().map(|c| tokio_tungstenite::Connector::Rustls(std::sync::Arc::clone(c)));
    let (mut ws, resp) =
        tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector).await.expect("upgrade");
    assert_eq!(resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()), Some("incident-stream.v1"));
    let welcome = ws.next().await.expect("frame").expect("ok");
    let welcome: Value = serde_json::from_str(welcome.to_text().expect("text")).expect("json");
    assert_eq!(welcome["subject"], "browser");

    // A bad token in the subprotocol is refused like any other.
    let r = server.upgrade_request("/ws", &[("sec-websocket-protocol", "incident-stream.v1, bearer.nonsense")]).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (401, Some("malformed")));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_tokens_are_off_by_default() {
    let server = TestServer::default().await;
    let t = token("acme", "alice", &[], 300);
    let r = server.upgrade_request(&format!("/ws?access_token={t}"), &[]).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (401, Some("missing")));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_mapped_labels_are_mandatory_too() {
    let mut cfg = config();
    cfg.auth.claim_labels.insert("team".into(), "team".into());
    let server = TestServer::start(cfg).await;
    let blue = sign(json!({"sub": "b", "tenant": "acme", "team": "blue", "exp": now() + 300}));
    let mut c = Client::connect(&server, &blue).await;
    let r = c.subscribe("all", json!({})).await;
    assert_eq!(r["filters"]["labels"], json!({"tenant": "acme", "team": "blue"}));
    c.send(json!({"type": "subscribe", "subscription_id": "red", "filters": {"labels": {"team": "red"}}})).await;
    let e = c.recv().await;
    assert_eq!(e["code"], "forbidden_filter", "{e}");
    server.publish("acme", &json!({"event_type": "escalated", "labels": {"team": "red"}})).await;
    let ids = server.publish("acme", &json!({"event_type": "escalated", "labels": {"team": "blue"}})).await;
    assert_eq!(c.recv().await["message_id"], ids[0].as_str(), "only team blue's event");
    // A token without the mapped claim is refused at the upgrade.
    let r =
        server.upgrade_request("/ws", &[("authorization", &format!("Bearer {}", token("acme", "x", &[], 300)))]).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (401, Some("missing_claim")));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_metrics_token() {
    let mut cfg = config();
    cfg.metrics.require_token = true;
    let server = TestServer::start(cfg).await;
    assert_eq!(server.http("GET", "/metrics", &[], None).await.status, 401);
    let reader = format!("Bearer {}", token("acme", "x", &[], 60));
    assert_eq!(server.http("GET", "/metrics", &[("authorization", &reader)], None).await.status, 403);
    let scraper = format!("Bearer {}", token("ops", "prometheus", &["metrics"], 60));
    let r = server.http("GET", "/metrics", &[("authorization", &scraper)], None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("websocket_active_connections"));
    assert_eq!(server.http("GET", "/health", &[], None).await.status, 200, "health stays open");
    server.shutdown().await;
}

/// The binary with `allow_query_token` on: a token in the URL works and appears in no log line
/// and no file the service wrote (the audit log included), accepted or refused.
#[test]
fn query_tokens_never_reach_the_logs() {
    let dir = common::dev_certs();
    let cfg = dir.join("q.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 2\n[websocket]\nenable_compression = false\n\
             [tls]\ncert = \"{d}/server.crt\"\nkey = \"{d}/server.key\"\n[policies]\ndir = \"{policies}\"\n[audit]\npath = \"{audit}\"\n\
             [auth]\nallow_query_token = true\n[[auth.keys]]\nkid = \"{KID}\"\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\"\n\
             [log]\nlevel = \"debug\"\n",
            d = dir.display(),
            policies = common::policies(&[("acme", true)]).display(),
            audit = dir.join("audit/audit.log").display(),
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_incident-stream"))
        .args(["--config", cfg.to_str().expect("utf8"), "serve"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while !first.ends_with(b"\n") && stdout.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
        first.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&first).into_owned();
    let addr: std::net::SocketAddr =
        line.rsplit("https://").next().and_then(|a| a.trim().parse().ok()).expect("address");
    let good = token("acme", "alice", &[], 300);
    let expired = token("acme", "alice", &[], -300);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let server = TestServer::at(addr, Some(&dir.join("ca.crt")));
        let mut req =
            format!("wss://localhost:{}/ws?access_token={good}", addr.port()).into_client_request().expect("req");
        req.headers_mut().remove("authorization");
        let connector = server.tls.as_ref().map(|c| tokio_tungstenite::Connector::Rustls(std::sync::Arc::clone(c)));
        let (mut ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector).await.expect("upgrade");
        assert!(ws.next().await.is_some(), "welcome");
        let r = server.upgrade_request("/ws", &[]).await;
        assert_eq!(r.status, 401);
        let refused = server.upgrade_request(&format!("/ws?access_token={expired}"), &[]).await;
        assert_eq!((refused.status, refused.json()["code"].as_str()), (401, Some("expired")));
        drop(ws);
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("exit");
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("session opened"), "the accepted session is logged: {logs}");
    assert!(logs.contains("access_token=REDACTED"), "the refusal names the redacted URI: {logs}");
    let audit = std::fs::read_to_string(dir.join("audit/audit.log")).expect("the audit log was written");
    assert!(audit.contains("connection.accepted") && audit.contains("connection.rejected"), "{audit}");
    let written = files_under(&dir);
    assert!(written.len() >= 4, "certificates, config and audit log: {written:?}");
    for t in [&good, &expired] {
        let signature = t.rsplit('.').next().expect("signature");
        assert!(!logs.contains(signature), "a token leaked into the logs");
        for (path, bytes) in &written {
            let text = String::from_utf8_lossy(bytes);
            assert!(!text.contains(signature), "a token leaked into {}", path.display());
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).expect("read file")));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_disabled_tenants_are_refused_with_403() {
    let mut cfg = config();
    cfg.policies.dir = common::policies(&[("acme", true), ("ops", true), ("globex", false)]);
    let server = TestServer::start(cfg).await;
    for (tenant, code) in [("globex", "tenant_disabled"), ("initech", "unknown_tenant")] {
        let r = server
            .upgrade_request("/ws", &[("authorization", &format!("Bearer {}", token(tenant, "u", &[], 60)))])
            .await;
        assert_eq!((r.status, r.json()["code"].as_str()), (403, Some(code)), "{}", r.body);
        let publisher = format!("Bearer {}", token(tenant, "p", &["publisher"], 60));
        let r = server
            .http("POST", "/v1/events", &[("authorization", &publisher)], Some(&json!({"event_type": "escalated"})))
            .await;
        assert_eq!((r.status, r.json()["code"].as_str()), (403, Some(code)), "{}", r.body);
        // A system publisher cannot publish for them either.
        let system = format!("Bearer {}", token("ops", "router", &["publisher", "system"], 60));
        let body =
            json!([{"event_type": "escalated", "tenant": "acme"}, {"event_type": "escalated", "tenant": tenant}]);
        let r = server.http("POST", "/v1/events", &[("authorization", &system)], Some(&body)).await;
        assert_eq!((r.status, r.json()["code"].as_str()), (403, Some(code)), "{}", r.body);
    }
    let m = server.metrics().await;
    assert_eq!(m.get("auth_failures_total{reason=\"tenant_disabled\"}"), 2.0);
    assert_eq!(m.get("auth_failures_total{reason=\"unknown_tenant\"}"), 2.0);
    assert_eq!(m.get("websocket_total_connections"), 0.0);
    assert_eq!(m.get("websocket_events_broadcast_total"), 0.0, "nothing of a refused batch was published");
    Client::as_user(&server, "acme", "fine").await.assert_alive().await;
    server.shutdown().await;
}

#[test]
fn a_server_with_invalid_policies_does_not_start() {
    let mut cfg = config();
    let dir = common::policies(&[("acme", true)]);
    std::fs::write(dir.join("globex.toml"), "tenant = \"acme\"\n").expect("write");
    cfg.policies.dir = dir;
    let err = incident_stream::Server::builder().config(cfg).build().err().expect("refused").to_string();
    assert!(err.contains("globex.toml") && err.contains("does not match"), "{err}");
}

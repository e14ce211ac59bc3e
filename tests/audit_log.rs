//! The audit log, black-box: a real server on TLS with real tokens drives every kind of session
//! fact, and the test reads the JSON lines the server wrote, checks their exact sequence and
//! fields, runs `incident-stream audit verify` and `audit query` on them, tampers with copies,
//! and breaks the sink under a running server (fail closed, nothing lost).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{config, sign, token, Client, TestServer, WAIT};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Every complete record of the log at `path` (rotated files first).
fn records(path: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for (file, _) in incident_stream::audit::log_files(path).expect("list") {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            out.push(serde_json::from_str(line).expect("every line is JSON"));
        }
    }
    out
}

/// Waits (bounded) until the log holds at least `n` records.
async fn wait_records(path: &Path, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = records(path);
        if r.len() >= n || tokio::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kinds(recs: &[Value]) -> Vec<&str> {
    recs.iter().map(|r| r["kind"].as_str().unwrap_or("?")).collect()
}

/// Runs the binary with these arguments; returns (exit code, stdout).
fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_incident-stream")).args(args).output().expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn verify(files: &[PathBuf]) -> (i32, String) {
    let mut args = vec!["audit", "verify"];
    args.extend(files.iter().map(|f| f.to_str().expect("utf8")));
    cli(&args)
}

fn with_jti(tenant: &str, sub: &str, jti: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    sign(json!({"sub": sub, "tenant": tenant, "roles": [], "exp": now + 300, "iat": now, "jti": jti}))
}

async fn close(mut c: Client) {
    let frame = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
    c.ws.send(Message::Close(Some(frame))).await.expect("close");
    let _ = c.read_until_close().await;
}

/// One scripted session history, and the exact records it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_history_leaves_exactly_these_records_and_verifies() {
    let mut cfg = config();
    cfg.policies.dir = common::policies(&[("acme", true), ("ops", true), ("globex", false)]);
    cfg.websocket.messages_per_second = 1;
    cfg.websocket.message_burst = 8;
    let log = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    let m = server.metrics().await;
    assert_eq!(m.get("audit_records_total{kind=\"connection.rejected\"}"), 0.0, "registered at zero");

    // Refusals before the upgrade, each with its reason.
    assert_eq!(server.upgrade_request("/ws", &[]).await.status, 401);
    let expired = token("acme", "alice", &[], -300);
    assert_eq!(server.refusal(&expired).await, (401, "expired".into()));
    let forged = {
        let now = jsonwebtoken::get_current_timestamp();
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(common::KID.into());
        let claims = json!({"sub": "alice", "tenant": "acme", "exp": now + 60});
        let key = jsonwebtoken::EncodingKey::from_secret(b"another-secret-0123456789abcdef-0123");
        jsonwebtoken::encode(&h, &claims, &key).expect("sign")
    };
    assert_eq!(server.refusal(&forged).await, (401, "bad_signature".into()));
    assert_eq!(server.refusal(&token("globex", "mallory", &[], 60)).await, (403, "tenant_disabled".into()));
    let not_upgrade = server
        .http("GET", "/ws", &[("authorization", &format!("Bearer {}", token("acme", "carol", &[], 60)))], None)
        .await;
    assert_eq!((not_upgrade.status, not_upgrade.json()["code"].as_str()), (400, Some("not_a_websocket_upgrade")));

    // An accepted session with subscriptions, a refused one, a refresh and a refused refresh.
    let ua = [("user-agent", "audit-test/1.0"), ("origin", "https://app.example")];
    let mut alice = Client::connect_with(&server, &with_jti("acme", "alice", "alice-1"), &ua).await;
    let session = alice.welcome["session_id"].as_str().expect("session id").to_owned();
    alice.subscribe("s1", json!({"event_types": ["incident_created"]})).await;
    alice
        .send(json!({"type": "subscribe", "subscription_id": "s2", "filters": {"labels": {"tenant": "globex"}}}))
        .await;
    assert_eq!(alice.recv().await["code"], "forbidden_filter");
    alice.send(json!({"type": "unsubscribe", "subscription_id": "s1"})).await;
    assert_eq!(alice.recv().await["type"], "unsubscribed");
    alice.send(json!({"type": "refresh", "token": with_jti("acme", "alice", "alice-2")})).await;
    assert_eq!(alice.recv().await["type"], "refreshed");
    alice.send(json!({"type": "refresh", "token": "not-a-token"})).await;
    assert_eq!(alice.recv().await["code"], "token_invalid");
    alice.subscribe("s3", json!({})).await;
    server.publish("acme", &json!([{"event_type": "escalated"}, {"event_type": "incident_resolved"}])).await;
    assert_eq!(alice.recv().await["type"], "event");
    assert_eq!(alice.recv().await["type"], "event");

    // A client that floods trips the message limit once (not once per refused message).
    let mut bob = Client::connect(&server, &with_jti("acme", "bob", "bob-1")).await;
    for i in 0..14 {
        bob.send(json!({"type": "ping", "timestamp": i.to_string()})).await;
    }
    let mut refused = 0;
    for _ in 0..14 {
        if bob.recv().await["type"] == "error" {
            refused += 1;
        }
    }
    assert!(refused >= 1, "the flood was refused");
    close(bob).await;
    wait_records(&log, 15).await;
    close(alice).await;

    let recs = wait_records(&log, 16).await;
    assert_eq!(
        kinds(&recs),
        [
            "connection.rejected",
            "connection.rejected",
            "connection.rejected",
            "connection.rejected",
            "connection.rejected",
            "connection.accepted",
            "subscription.created",
            "subscription.rejected",
            "subscription.removed",
            "token.refreshed",
            "token.refreshed",
            "subscription.created",
            "connection.accepted",
            "rate_limit.tripped",
            "connection.closed",
            "connection.closed",
        ],
        "{recs:#?}"
    );
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        for key in incident_stream::audit::COMMON_FIELDS {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
        let ts = r["ts"].as_str().expect("ts");
        assert!(ts.ends_with('Z') && ts.len() == "2026-12-01T00:00:00.000000Z".len(), "{ts}");
        assert_eq!(r["remote_addr"].as_str().map(|a| a.starts_with("127.0.0.1:")), Some(true), "{r}");
    }
    let reasons: Vec<&str> = recs[..5].iter().map(|r| r["reason"].as_str().expect("reason")).collect();
    assert_eq!(reasons, ["missing", "expired", "bad_signature", "tenant_disabled", "not_a_websocket_upgrade"]);
    let statuses: Vec<u64> = recs[..5].iter().map(|r| r["status"].as_u64().expect("status")).collect();
    assert_eq!(statuses, [401, 401, 401, 403, 400]);
    assert_eq!(recs[0]["token_id"], Value::Null, "no token, no token id");
    assert_eq!(recs[1]["token_id"].as_str().map(str::len), Some(16), "a short hash of the refused token");
    assert_eq!((recs[3]["tenant"].as_str(), recs[3]["subject"].as_str()), (Some("globex"), Some("mallory")));

    let accepted = &recs[5];
    assert_eq!(accepted["session_id"], session.as_str());
    assert_eq!(
        (accepted["tenant"].as_str(), accepted["subject"].as_str(), accepted["token_id"].as_str()),
        (Some("acme"), Some("alice"), Some("alice-1"))
    );
    assert_eq!(accepted["user_agent"], "audit-test/1.0");
    assert_eq!(accepted["origin"], "https://app.example");
    assert_eq!(recs[6]["subscription_id"], "s1");
    assert_eq!(recs[6]["filters"], json!({"event_types": ["incident_created"], "labels": {"tenant": "acme"}}));
    assert_eq!(recs[6]["user_agent"], "audit-test/1.0", "session records carry the client fields");
    assert_eq!(
        (recs[7]["reason"].as_str(), recs[7]["subscription_id"].as_str()),
        (Some("forbidden_filter"), Some("s2"))
    );
    assert_eq!((recs[8]["reason"].as_str(), recs[8]["subscription_id"].as_str()), (Some("unsubscribed"), Some("s1")));
    assert_eq!(
        (recs[9]["result"].as_str(), recs[9]["token_id"].as_str(), recs[9]["previous_token_id"].as_str()),
        (Some("ok"), Some("alice-2"), Some("alice-1"))
    );
    assert_eq!((recs[10]["result"].as_str(), recs[10]["reason"].as_str()), (Some("refused"), Some("malformed")));
    assert_eq!((recs[13]["subject"].as_str(), recs[13]["scope"].as_str()), (Some("bob"), Some("message")));
    let bob_closed = &recs[14];
    assert_eq!((bob_closed["subject"].as_str(), bob_closed["messages_received"].as_u64()), (Some("bob"), Some(14)));
    let closed = &recs[15];
    assert_eq!(closed["session_id"], session.as_str());
    assert_eq!((closed["reason"].as_str(), closed["close_code"].as_u64()), (Some("client_closed"), Some(1000)));
    assert_eq!(
        (closed["messages_received"].as_u64(), closed["events_delivered"].as_u64(), closed["events_dropped"].as_u64()),
        (Some(6), Some(2), Some(0))
    );
    assert!(closed["duration_ms"].as_u64().is_some(), "{closed}");
    assert_eq!(closed["token_id"], "alice-2", "the session's current token");

    let m = server.metrics().await;
    assert_eq!(m.get("audit_records_total{kind=\"connection.rejected\"}"), 5.0);
    assert_eq!(m.get("audit_records_total{kind=\"connection.closed\"}"), 2.0);
    assert_eq!(m.get("audit_write_errors_total"), 0.0);

    let (code, out) = verify(std::slice::from_ref(&log));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 16 records"), "{out}");
    let (code, out) = cli(&[
        "audit",
        "query",
        "--path",
        log.to_str().expect("utf8"),
        "--subject",
        "alice",
        "--kind",
        "connection.closed",
    ]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["session_id"], session.as_str());
    server.shutdown().await;
}

/// `GET /admin/audit`: who may read what, filters and paging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_audit_api_is_for_auditors_of_their_tenant_and_admins() {
    let cfg = config();
    let log = cfg.audit.path.clone();
    let server = TestServer::start(cfg).await;
    // Something to read: two tenants' sessions and a refusal without a tenant.
    close(Client::as_user(&server, "acme", "alice").await).await;
    close(Client::as_user(&server, "globex", "gina").await).await;
    assert_eq!(server.upgrade_request("/ws", &[]).await.status, 401);
    wait_records(&log, 5).await;

    let get = |t: Option<String>, q: &str| {
        let server = &server;
        let q = q.to_owned();
        async move {
            let auth = t.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
            server.http("GET", &format!("/admin/audit{q}"), &headers, None).await
        }
    };
    assert_eq!(get(None, "").await.status, 401);
    let plain = get(Some(token("acme", "alice", &[], 60)), "").await;
    assert_eq!((plain.status, plain.json()["code"].as_str()), (403, Some("forbidden")));

    let auditor = token("acme", "sec", &["auditor"], 60);
    let r = get(Some(auditor.clone()), "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let recs = r.json()["records"].as_array().expect("records").clone();
    assert!(!recs.is_empty());
    assert!(recs.iter().all(|r| r["tenant"] == "acme"), "an auditor sees only its tenant: {recs:?}");
    let r = get(Some(auditor.clone()), "?tenant=globex").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (403, Some("forbidden_tenant")));
    let r = get(Some(auditor), "?kind=nope").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("invalid_query")));

    let admin = token("ops", "root", &["admin"], 60);
    let r = get(Some(admin.clone()), "?kind=connection.rejected").await;
    let recs = r.json()["records"].as_array().expect("records").clone();
    assert!(recs.iter().any(|r| r["tenant"].is_null() && r["reason"] == "missing"), "{recs:?}");
    let r = get(Some(admin.clone()), "?tenant=globex&kind=connection.accepted").await;
    let recs = r.json()["records"].as_array().expect("records").clone();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["subject"], "gina");

    // Paging: two at a time until the end, in order, no record twice.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let r = get(Some(admin.clone()), &format!("?limit=2&after_seq={after}")).await;
        let body = r.json();
        for rec in body["records"].as_array().expect("records") {
            seen.push(rec["seq"].as_u64().expect("seq"));
        }
        match body["next_after_seq"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    let expected: Vec<u64> = (1..=seen.len() as u64).collect();
    assert_eq!(seen, expected);

    // Reading the audit trail is on record too.
    let recs = wait_records(&log, seen.len() + 1).await;
    assert!(recs.iter().any(|r| r["kind"] == "admin.action" && r["action"] == "audit.read" && r["status"] == 403));
    server.shutdown().await;
}

/// A log produced by two server runs on the same path, rotated several times.
async fn rotated_log() -> (PathBuf, Vec<PathBuf>) {
    let mut cfg = config();
    cfg.audit.max_file_bytes = 4096;
    let log = cfg.audit.path.clone();
    for run in 0..2 {
        let server = TestServer::start(cfg.clone()).await;
        for i in 0..15 {
            let t = token("acme", &format!("user-{run}-{i}"), &[], -300);
            assert_eq!(server.refusal(&t).await.0, 401);
        }
        server.shutdown().await;
    }
    let files: Vec<PathBuf> =
        incident_stream::audit::log_files(&log).expect("list").into_iter().map(|(p, _)| p).collect();
    (log, files)
}

/// Copies the files into a fresh directory, keeping their names.
fn copy(files: &[PathBuf]) -> Vec<PathBuf> {
    let dir = common::fresh_dir();
    files
        .iter()
        .map(|f| {
            let to = dir.join(f.file_name().expect("name"));
            std::fs::copy(f, &to).expect("copy");
            to
        })
        .collect()
}

fn edit_line(file: &Path, line: usize, f: impl FnOnce(&str) -> String) {
    let text = std::fs::read_to_string(file).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[line] = f(&lines[line]);
    std::fs::write(file, lines.join("\n") + "\n").expect("write");
}

fn seq_at(file: &Path, line: usize) -> u64 {
    let text = std::fs::read_to_string(file).expect("read");
    let v: Value = serde_json::from_str(text.lines().nth(line).expect("line")).expect("json");
    v["seq"].as_u64().expect("seq")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_restarts_continue_the_chain_and_every_tampering_is_named() {
    let (_, files) = rotated_log().await;
    assert!(files.len() >= 3, "rotated: {files:?}");
    let (code, out) = verify(&files);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 30 records"), "two runs continue one chain: {out}");
    // Any order on the command line: the files are put in chain order.
    let mut shuffled = files.clone();
    shuffled.reverse();
    assert_eq!(verify(&shuffled).0, 0);

    let middle = 1;
    let seq = |f: &Path, l| seq_at(f, l);

    // Edit one field.
    let c = copy(&files);
    let s = seq(&c[middle], 1);
    edit_line(&c[middle], 1, |l| l.replace("\"status\":401", "\"status\":200"));
    let (code, out) = verify(&c);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("seq {s} ")) && out.contains("edited"), "{out}");

    // Delete a line.
    let c = copy(&files);
    let s = seq(&c[middle], 2);
    let text = std::fs::read_to_string(&c[middle]).expect("read");
    let kept: Vec<&str> = text.lines().enumerate().filter(|(i, _)| *i != 2).map(|(_, l)| l).collect();
    std::fs::write(&c[middle], kept.join("\n") + "\n").expect("write");
    let (code, out) = verify(&c);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("seq {s} ")) && out.contains("missing"), "{out}");

    // Swap two lines.
    let c = copy(&files);
    let s = seq(&c[middle], 1);
    let text = std::fs::read_to_string(&c[middle]).expect("read");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.swap(1, 2);
    std::fs::write(&c[middle], lines.join("\n") + "\n").expect("write");
    let (code, out) = verify(&c);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("seq {s} ")) && out.contains("reordered"), "{out}");

    // Truncate the last line.
    let c = copy(&files);
    let last = c.last().expect("last file");
    let bytes = std::fs::read(last).expect("read");
    std::fs::write(last, &bytes[..bytes.len() - 20]).expect("write");
    let (code, out) = verify(&c);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("truncated mid-line"), "{out}");

    // A rotated file left out.
    let mut c = copy(&files);
    let s = seq(&c[middle], 0);
    c.remove(middle);
    let (code, out) = verify(&c);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("seq {s} ")) && out.contains("missing"), "{out}");

    // Splice two files: the head of this log and the tail of another one, seqs continuing.
    let (_, other) = rotated_log().await;
    let c = copy(&files);
    let o = copy(&other);
    let first = std::fs::read_to_string(&c[0]).expect("read");
    let n = first.lines().count();
    let theirs: String = o.iter().map(|f| std::fs::read_to_string(f).expect("read")).collect();
    let after_n = |l: &&str| serde_json::from_str::<Value>(l).is_ok_and(|v| v["seq"].as_u64() > Some(n as u64));
    let tail: Vec<&str> = theirs.lines().filter(after_n).collect();
    let spliced = c[0].with_file_name("spliced.log");
    std::fs::write(&spliced, first + &tail.join("\n") + "\n").expect("write");
    let (code, out) = verify(&[spliced]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("seq {} ", n + 1)) && out.contains("broken chain"), "{out}");
}

/// The sink becomes unwritable under a running server: new connections get 503, live sessions
/// go on and lose no record; when the sink is back, everything held is written, in order, and
/// connections are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_sink_refuses_new_connections_and_loses_nothing() {
    let mut cfg = config();
    cfg.audit.retry_interval_ms = 100;
    let log = cfg.audit.path.clone();
    let dir = log.parent().expect("dir").to_owned();
    let server = TestServer::start(cfg).await;
    let mut alice = Client::as_user(&server, "acme", "alice").await;
    alice.subscribe("s1", json!({})).await;
    assert_eq!(wait_records(&log, 2).await.len(), 2);

    // Break the sink: the directory is moved away and a file takes its place.
    let moved = dir.with_file_name("audit.moved");
    std::fs::rename(&dir, &moved).expect("move the audit directory");
    std::fs::write(&dir, b"not a directory").expect("block the path");

    let r =
        server.upgrade_request("/ws", &[("authorization", &format!("Bearer {}", token("acme", "bob", &[], 60)))]).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (503, Some("audit_unavailable")), "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    let ready = server.http("GET", "/ready", &[], None).await;
    assert_eq!((ready.status, ready.json()["audit"].as_str()), (503, Some("unavailable")));
    assert!(server.metrics().await.get("audit_write_errors_total") >= 1.0);
    // The live session goes on; its records are held.
    alice.send(json!({"type": "unsubscribe", "subscription_id": "s1"})).await;
    assert_eq!(alice.recv().await["type"], "unsubscribed");
    close(alice).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r =
        server.upgrade_request("/ws", &[("authorization", &format!("Bearer {}", token("acme", "bob", &[], 60)))]).await;
    assert_eq!(r.status, 503, "still down");
    assert!(server.metrics().await.get("audit_queue_depth") >= 2.0, "records are held");

    // Restore the sink.
    std::fs::remove_file(&dir).expect("unblock");
    std::fs::rename(&moved, &dir).expect("move back");
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.http("GET", "/ready", &[], None).await.status != 200 {
        assert!(tokio::time::Instant::now() < deadline, "the sink recovered in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bob = Client::as_user(&server, "acme", "bob").await;
    close(bob).await;

    let recs = wait_records(&log, 8).await;
    assert_eq!(
        kinds(&recs),
        [
            "connection.accepted",
            "subscription.created",
            "connection.rejected",
            "subscription.removed",
            "connection.closed",
            "connection.rejected",
            "connection.accepted",
            "connection.closed",
        ],
        "{recs:#?}"
    );
    assert_eq!(recs[2]["reason"], "audit_unavailable");
    let (code, out) = verify(std::slice::from_ref(&log));
    assert_eq!(code, 0, "{out}");
    server.shutdown().await;
}

/// A crash can leave half a line at the end: the next start cuts it off and continues the chain.
/// A last line that is not a valid record (edited) stops the start: the chain cannot be
/// continued honestly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_cuts_a_torn_line_and_refuses_an_edited_tail() {
    let cfg = config();
    let log = cfg.audit.path.clone();
    let server = TestServer::start(cfg.clone()).await;
    assert_eq!(server.upgrade_request("/ws", &[]).await.status, 401);
    server.shutdown().await;
    let whole = std::fs::read(&log).expect("read");
    // A torn write: the start of a second record without its end.
    let mut torn = whole.clone();
    torn.extend_from_slice(b"{\"kind\":\"connection.rejected\",\"prev\":\"");
    std::fs::write(&log, &torn).expect("write");
    let server = TestServer::start(cfg.clone()).await;
    assert_eq!(server.upgrade_request("/ws", &[]).await.status, 401);
    server.shutdown().await;
    let recs = records(&log);
    assert_eq!(recs.iter().map(|r| r["seq"].as_u64().unwrap_or(0)).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(verify(std::slice::from_ref(&log)).0, 0);

    let text = std::fs::read_to_string(&log).expect("read");
    std::fs::write(&log, text.replace("\"status\":401", "\"status\":200")).expect("write");
    let err = incident_stream::Server::builder().config(cfg).build().err().expect("refused to start");
    assert!(err.to_string().contains("seq 2") && err.to_string().contains("edited"), "{err}");
}

/// `audit.fail_closed = false`: connections go on while the sink is down (their records are
/// held and written when it recovers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_keeps_accepting_and_writes_the_backlog_later() {
    let mut cfg = config();
    cfg.audit.fail_closed = false;
    cfg.audit.retry_interval_ms = 100;
    let log = cfg.audit.path.clone();
    let dir = log.parent().expect("dir").to_owned();
    let server = TestServer::start(cfg).await;
    close(Client::as_user(&server, "acme", "alice").await).await;
    wait_records(&log, 2).await;
    let moved = dir.with_file_name("audit.moved");
    std::fs::rename(&dir, &moved).expect("move");
    std::fs::write(&dir, b"blocked").expect("block");
    close(Client::as_user(&server, "acme", "bob").await).await;
    let ready = server.http("GET", "/ready", &[], None).await;
    assert_eq!((ready.status, ready.json()["audit"].as_str()), (200, Some("unavailable")));
    std::fs::remove_file(&dir).expect("unblock");
    std::fs::rename(&moved, &dir).expect("move back");
    let recs = wait_records(&log, 4).await;
    assert_eq!(
        recs.iter()
            .map(|r| (r["kind"].as_str().unwrap_or(""), r["subject"].as_str().unwrap_or("")))
            .collect::<Vec<_>>(),
        [
            ("connection.accepted", "alice"),
            ("connection.closed", "alice"),
            ("connection.accepted", "bob"),
            ("connection.closed", "bob")
        ]
    );
    assert_eq!(verify(std::slice::from_ref(&log)).0, 0);
    server.shutdown().await;
}

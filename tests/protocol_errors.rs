//! Every client error code and close code, each produced by sending the bad input over a real
//! socket, with the connection's state asserted afterwards (alive after errors, closed with the
//! right code and a `closing` message after violations).

mod common;

use std::time::Duration;

use common::{config, sign, token, Client, TestServer};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn expect_error(c: &mut Client, code: &str) -> Value {
    let e = c.recv().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], code, "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_invalid_message_and_the_connection_stays() {
    let server = TestServer::default().await;
    let mut c = Client::as_user(&server, "acme", "alice").await;
    for bad in [
        "{not json",
        "[1,2,3]",
        "\"just a string\"",
        r#"{"subscription_id":"s1"}"#,
        r#"{"type":42}"#,
        r#"{"type":"subscribe"}"#,
        r#"{"type":"subscribe","subscription_id":7}"#,
        r#"{"type":"subscribe","subscription_id":"s1","colour":"red"}"#,
        r#"{"type":"subscribe","subscription_id":"s1","filters":{"severity":["P0"]}}"#,
        r#"{"type":"subscribe","subscription_id":"s1","filters":{"severities":"P0"}}"#,
        r#"{"type":"ping","timestamp":12}"#,
        r#"{"type":"ack","message_id":"not-an-id"}"#,
    ] {
        c.send_text(bad).await;
        expect_error(&mut c, "invalid_message").await;
        c.assert_alive().await;
    }
    c.ws.send(Message::Binary(vec![1, 2, 3].into())).await.expect("send");
    expect_error(&mut c, "invalid_message").await;
    c.assert_alive().await;
    // The subscription id is echoed when it could be read.
    c.send_text(r#"{"type":"subscribe","subscription_id":"s9","colour":"red"}"#).await;
    assert_eq!(expect_error(&mut c, "invalid_message").await["subscription_id"], "s9");
    let m = server.metrics().await;
    assert_eq!(m.get("websocket_connection_errors_total"), 14.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_types_filters_and_subscription_ids() {
    let server = TestServer::default().await;
    let mut c = Client::as_user(&server, "acme", "alice").await;

    c.send(json!({"type": "publish", "event": {}})).await;
    expect_error(&mut c, "unknown_type").await;
    c.assert_alive().await;

    for f in [
        json!({"event_types": ["incident_deleted"]}),
        json!({"severities": ["P7"]}),
        json!({"states": ["Open"]}),
        json!({"sources": (0..65).map(|i| format!("s{i}")).collect::<Vec<_>>()}),
        json!({"labels": {"k": "v".repeat(300)}}),
    ] {
        c.send(json!({"type": "subscribe", "subscription_id": "f", "filters": f})).await;
        let e = expect_error(&mut c, "invalid_filter").await;
        assert_eq!(e["subscription_id"], "f");
        c.assert_alive().await;
    }

    // Naming the mandatory tenant label with another value is refused, never widened.
    c.send(json!({"type": "subscribe", "subscription_id": "x", "filters": {"labels": {"tenant": "globex"}}})).await;
    expect_error(&mut c, "forbidden_filter").await;
    // Naming it with the session's own tenant is fine.
    let r = c.subscribe("own", json!({"labels": {"tenant": "acme"}})).await;
    assert_eq!(r["filters"]["labels"], json!({"tenant": "acme"}));

    c.send(json!({"type": "subscribe", "subscription_id": "own", "filters": {}})).await;
    expect_error(&mut c, "duplicate_subscription").await;
    c.send(json!({"type": "unsubscribe", "subscription_id": "nope"})).await;
    expect_error(&mut c, "unknown_subscription").await;

    // A resume position that is not a message id is refused (a valid one is tests/resume.rs).
    c.send(json!({"type": "subscribe", "subscription_id": "r", "filters": {}, "resume_from": "last tuesday"})).await;
    let e = expect_error(&mut c, "invalid_message").await;
    assert_eq!(e["subscription_id"], "r");

    // An ack of an id never delivered here is refused (a good ack is tests/resume.rs).
    c.send(json!({"type": "ack", "message_id": "1-1"})).await;
    expect_error(&mut c, "invalid_message").await;
    c.assert_alive().await;

    // The failed subscriptions never took effect: exactly one subscription is active.
    assert_eq!(server.metrics().await.get("websocket_active_subscriptions"), 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_subscriptions() {
    let mut cfg = config();
    cfg.websocket.max_subscriptions_per_connection = 2;
    let server = TestServer::start(cfg).await;
    let mut c = Client::as_user(&server, "acme", "alice").await;
    c.subscribe("a", json!({})).await;
    c.subscribe("b", json!({})).await;
    c.send(json!({"type": "subscribe", "subscription_id": "c", "filters": {}})).await;
    expect_error(&mut c, "too_many_subscriptions").await;
    c.send(json!({"type": "unsubscribe", "subscription_id": "a"})).await;
    assert_eq!(c.recv().await["type"], "unsubscribed");
    c.subscribe("c", json!({})).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_gets_rate_limited_then_closed_4029() {
    let mut cfg = config();
    cfg.websocket.messages_per_second = 1;
    cfg.websocket.message_burst = 3;
    let server = TestServer::start(cfg).await;
    let mut calm = Client::as_user(&server, "acme", "calm").await;
    let mut c = Client::as_user(&server, "acme", "flood").await;
    for _ in 0..3 {
        c.assert_alive().await;
    }
    c.send(json!({"type": "ping"})).await;
    expect_error(&mut c, "rate_limited").await;
    for _ in 0..20 {
        c.send(json!({"type": "ping"})).await;
    }
    let (seen, code, reason) = c.read_until_close().await;
    assert_eq!(code, 4029);
    assert_eq!(reason, "rate_limited");
    assert_eq!(seen.last().expect("closing"), &json!({"type": "closing", "reason": "rate_limited"}));
    assert!(seen.iter().filter(|m| m["type"] == "error").all(|m| m["code"] == "rate_limited"));
    // Binary frames count against the same limit.
    let mut b = Client::as_user(&server, "acme", "binary-flood").await;
    for _ in 0..20 {
        b.ws.send(Message::Binary(vec![0u8; 8].into())).await.expect("send");
    }
    let (_, code, _) = b.read_until_close().await;
    assert_eq!(code, 4029);
    // Another connection is unaffected.
    calm.assert_alive().await;
    assert!(server.metrics().await.get("rate_limited_total{scope=\"message\"}") >= 10.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_1009() {
    let mut cfg = config();
    cfg.server.max_frame_bytes = 2048;
    let server = TestServer::start(cfg).await;
    let mut c = Client::as_user(&server, "acme", "alice").await;
    let big = json!({"type": "ping", "timestamp": "x".repeat(4096)});
    c.send(big).await;
    let (seen, code, _) = c.read_until_close().await;
    assert_eq!(code, 1009);
    assert_eq!(seen.last().expect("closing")["reason"], "frame_too_large");
    // Below the limit is fine on a new connection.
    let mut d = Client::as_user(&server, "acme", "alice").await;
    d.send(json!({"type": "ping", "timestamp": "x".repeat(1500)})).await;
    assert_eq!(d.recv().await["type"], "pong");
    // Far beyond the limit (past the hard cap) the connection is dropped at once.
    let mut e = Client::as_user(&server, "acme", "alice").await;
    // The server may reset the connection while the frame is still being sent.
    let sent =
        e.ws.send(Message::Text(json!({"type": "ping", "timestamp": "x".repeat(64 * 1024)}).to_string().into())).await;
    let end = tokio::time::timeout(common::WAIT, async {
        if sent.is_err() {
            return None;
        }
        loop {
            match futures_util::StreamExt::next(&mut e.ws).await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("connection ends");
    assert!(end.is_none() || end == Some(1009), "{end:?}");
    d.assert_alive().await;
    assert_eq!(server.metrics().await.get("websocket_connection_errors_total"), 2.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_is_answered_1000() {
    let server = TestServer::default().await;
    let mut c = Client::as_user(&server, "acme", "alice").await;
    c.ws.close(None).await.expect("close");
    let next = tokio::time::timeout(common::WAIT, futures_util::StreamExt::next(&mut c.ws)).await.expect("in time");
    match next {
        Some(Ok(Message::Close(_))) | None => {}
        other => panic!("expected the close reply, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_closes_4001_and_refresh_extends() {
    let mut cfg = config();
    cfg.auth.leeway_secs = 0;
    let server = TestServer::start(cfg).await;

    // Expires in 2 s, no refresh: closing token_expired + 4001.
    let mut short = Client::connect(&server, &token("acme", "alice", &[], 2)).await;
    let started = std::time::Instant::now();
    let (seen, code, _) = short.read_until_close().await;
    assert_eq!(code, 4001);
    assert_eq!(seen.last().expect("closing"), &json!({"type": "closing", "reason": "token_expired"}));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited <= Duration::from_secs(4), "closed after {waited:?}");

    // Refreshed in time: the session outlives its first token.
    let mut c = Client::connect(&server, &token("acme", "alice", &[], 2)).await;
    c.send(json!({"type": "refresh", "token": token("acme", "alice", &[], 120)})).await;
    let r = c.recv().await;
    assert_eq!(r["type"], "refreshed", "{r}");
    assert_ne!(r["expires_at"], c.welcome["expires_at"]);
    c.expect_silence(Duration::from_secs(3)).await;
    c.assert_alive().await;

    // A refresh never shortens the session.
    c.send(json!({"type": "refresh", "token": token("acme", "alice", &[], 1)})).await;
    let r2 = c.recv().await;
    assert_eq!(r2["expires_at"], r["expires_at"], "{r2}");
    c.expect_silence(Duration::from_secs(2)).await;
    // A refresh with an invalid token is refused; the session continues.
    c.send(json!({"type": "refresh", "token": "garbage"})).await;
    expect_error(&mut c, "token_invalid").await;
    let expired = sign(json!({"sub": "alice", "tenant": "acme", "exp": 1}));
    c.send(json!({"type": "refresh", "token": expired})).await;
    expect_error(&mut c, "token_invalid").await;
    c.assert_alive().await;

    // A refresh for another subject closes with 4003.
    c.send(json!({"type": "refresh", "token": token("acme", "mallory", &[], 120)})).await;
    let (seen, code, _) = c.read_until_close().await;
    assert_eq!(code, 4003);
    assert_eq!(seen[0]["code"], "token_invalid");
    assert_eq!(seen.last().expect("closing")["type"], "closing");

    // Another tenant too.
    let mut d = Client::connect(&server, &token("acme", "alice", &[], 120)).await;
    d.send(json!({"type": "refresh", "token": token("globex", "alice", &[], 120)})).await;
    let (_, code, _) = d.read_until_close().await;
    assert_eq!(code, 4003);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_without_a_valid_token_are_refused_before_any_session() {
    let server = TestServer::default().await;
    let ws_headers = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let expired = token("acme", "alice", &[], -120);
    let forged = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(common::KID.into());
        let claims = json!({"sub": "a", "tenant": "acme", "exp": jsonwebtoken::get_current_timestamp() + 60});
        jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(b"another-secret-another-secret-xx"))
            .expect("sign")
    };
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing"),
        (Some("Bearer not.a.jwt".into()), "malformed"),
        (Some("Basic abc".into()), "malformed"),
        (Some(format!("Bearer {forged}")), "bad_signature"),
        (Some(format!("Bearer {expired}")), "expired"),
        (
            Some(format!("Bearer {}", sign(json!({"sub": "a", "exp": jsonwebtoken::get_current_timestamp() + 60})))),
            "missing_claim",
        ),
    ];
    for (auth, code) in &cases {
        let mut headers = ws_headers.to_vec();
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let r = server.http("GET", "/ws", &headers, None).await;
        assert_eq!(r.status, 401, "{code}: {}", r.body);
        assert_eq!(r.json()["code"], *code);
        let challenge = r.header("www-authenticate").expect("challenge");
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        if *code != "missing" {
            assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
        }
    }
    let m = server.metrics().await;
    assert_eq!(m.get("websocket_total_connections"), 0.0, "a rejected upgrade is not a connection");
    assert_eq!(m.get("websocket_active_connections"), 0.0);
    assert_eq!(m.get("auth_failures_total{reason=\"malformed\"}"), 2.0);
    assert_eq!(m.get("auth_failures_total{reason=\"expired\"}"), 1.0);
    // A valid token with a plain GET (no upgrade headers) is a clear 400, not a session.
    let t = token("acme", "alice", &[], 60);
    let r = server.http("GET", "/ws", &[("authorization", &format!("Bearer {t}"))], None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "not_a_websocket_upgrade");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_but_never_reads_is_cut_off_by_the_write_timeout() {
    use tokio::io::AsyncWriteExt;
    let mut cfg = config();
    cfg.websocket.write_timeout_secs = 1;
    cfg.websocket.messages_per_second = 1000;
    cfg.websocket.message_burst = 1000;
    let server = TestServer::start(cfg).await;
    let t = token("acme", "hog", &[], 300);
    let mut s = server.connect_io().await;
    let req = format!(
        "GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nauthorization: Bearer {t}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("handshake");
    // Masked text frames: pings whose 60 KB timestamps come back as pongs nobody reads.
    let payload = json!({"type": "ping", "timestamp": "x".repeat(60_000)}).to_string().into_bytes();
    let mut frame = vec![0x81u8, 0xFF];
    frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]); // mask key of zeros: payload unchanged
    frame.extend_from_slice(&payload);
    let mut cut_off = false;
    for _ in 0..2000 {
        if tokio::time::timeout(Duration::from_secs(2), s.write_all(&frame)).await.map_or(true, |r| r.is_err()) {
            break;
        }
        if server.metrics().await.get("websocket_active_connections") == 0.0 {
            cut_off = true;
            break;
        }
    }
    for _ in 0..100 {
        if cut_off {
            break;
        }
        cut_off = server.metrics().await.get("websocket_active_connections") == 0.0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut_off, "the session outlived a write that could not progress");
    server.shutdown().await;
}

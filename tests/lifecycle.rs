//! Session lifecycle over real sockets: heartbeats (a client that never answers pings is closed
//! with 4002, one that does stays), the idle sweep, and graceful shutdown both in-process and of
//! the real binary on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{config, token, Client, TestServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a WebSocket by hand and then never reads or writes: a peer that ignores pings.
async fn mute_client(server: &TestServer, token: &str) -> Box<dyn common::Io> {
    let mut s = server.connect_io().await;
    let req = format!(
        "GET /ws HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nauthorization: Bearer {token}\r\n\r\n",
        server.addr
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("response");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// Server frames (unmasked) as (opcode, payload).
fn parse_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let op = b[0] & 0x0f;
        let (len, hdr) = match b[1] & 0x7f {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize, 10),
            n => (n as usize, 2),
        };
        if b.len() < hdr + len {
            break;
        }
        out.push((op, b[hdr..hdr + len].to_vec()));
        b = &b[hdr + len..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_pings_is_closed_4002_and_a_live_one_stays() {
    let mut cfg = config();
    cfg.websocket.heartbeat_interval_secs = 1;
    let server = TestServer::start(cfg).await;
    let mut live = Client::as_user(&server, "acme", "live").await;
    let mut mute = mute_client(&server, &token("acme", "mute", &[], 300)).await;
    let started = Instant::now();
    let mut bytes = Vec::new();
    // The live client keeps reading meanwhile (its library answers pings while it reads).
    let read_until_close = async {
        let mut buf = [0u8; 4096];
        while !parse_frames(&bytes).iter().any(|f| f.0 == 0x8) {
            match mute.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    };
    let (read, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), read_until_close),
        live.expect_silence(Duration::from_secs(4)),
    );
    read.expect("closed in time");
    let took = started.elapsed();
    let frames = parse_frames(&bytes);
    let ops: Vec<u8> = frames.iter().map(|f| f.0).collect();
    // welcome (text), ping, closing (text), close.
    assert_eq!(ops, vec![0x1, 0x9, 0x1, 0x8], "{frames:?}");
    let closing: Value = serde_json::from_slice(&frames[2].1).expect("json");
    assert_eq!(closing, json!({"type": "closing", "reason": "heartbeat_timeout"}));
    assert_eq!(u16::from_be_bytes([frames[3].1[0], frames[3].1[1]]), 4002);
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(9), "closed after {took:?}");

    // The live client answered every ping and is still here.
    live.assert_alive().await;
    assert_eq!(live.welcome["heartbeat_interval_secs"], 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_without_subscriptions_are_swept() {
    let mut cfg = config();
    cfg.websocket.session_timeout_secs = 1;
    cfg.websocket.cleanup_interval_secs = 1;
    let server = TestServer::start(cfg).await;
    let mut idle = Client::as_user(&server, "acme", "idle").await;
    let mut busy = Client::as_user(&server, "acme", "busy").await;
    busy.subscribe("all", json!({})).await;
    let (seen, code, _) = idle.read_until_close().await;
    assert_eq!(code, 1000);
    assert_eq!(seen, vec![json!({"type": "closing", "reason": "idle_timeout"})]);
    busy.expect_silence(Duration::from_millis(1500)).await;
    busy.assert_alive().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_closing_with_reconnect_delay_and_stops_accepting() {
    let server = TestServer::default().await;
    let addr = server.addr;
    let mut a = Client::as_user(&server, "acme", "a").await;
    let mut b = Client::as_user(&server, "globex", "b").await;
    b.subscribe("all", json!({})).await;
    let readers = [a.read_until_close(), b.read_until_close()];
    let shutdown = tokio::spawn(server.shutdown());
    let results = futures_util::future::join_all(readers).await;
    for (seen, code, reason) in results {
        assert_eq!(code, 1001);
        assert_eq!(reason, "server_shutdown");
        let closing = seen.last().expect("closing");
        assert_eq!(closing["type"], "closing");
        assert_eq!(closing["reason"], "server_shutdown");
        let delay = closing["reconnect_after_ms"].as_u64().expect("reconnect_after_ms");
        assert!((500..5000).contains(&delay), "{delay}");
    }
    tokio::time::timeout(Duration::from_secs(10), shutdown).await.expect("shutdown in time").expect("task");
    assert!(TcpStream::connect(addr).await.is_err(), "no longer accepting");
}

#[test]
fn the_binary_drains_and_exits_0_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("incident-stream-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let cfg = dir.join("test.toml");
    // The real default path: TLS with dev certificates the binary generates itself.
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 3\n[websocket]\nenable_compression = false\n\
             [tls]\ncert = \"{dir}/server.crt\"\nkey = \"{dir}/server.key\"\ngenerate = true\n[policies]\ndir = \"{policies}\"\n[audit]\npath = \"{audit}\"\n\
             [[auth.keys]]\nkid = \"{}\"\nalgorithm = \"HS256\"\nsecret = \"{}\"\n",
            common::KID,
            common::SECRET,
            dir = dir.display(),
            policies = common::policies(&[("acme", true)]).display(),
            audit = dir.join("audit/audit.log").display(),
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_incident-stream"))
        .args(["--config", cfg.to_str().expect("utf8"), "serve"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf8");
    let addr: std::net::SocketAddr = first
        .rsplit("https://")
        .next()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));

    let ca = dir.join("ca.crt");
    assert!(ca.exists(), "the binary generated its dev certificates");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let result = rt.block_on(async move {
        let server = TestServer::at(addr, Some(&ca));
        let mut c = Client::as_user(&server, "acme", "alice").await;
        c.subscribe("all", json!({})).await;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
        assert!(status.success());
        c.read_until_close().await
    });
    let (seen, code, _) = result;
    assert_eq!(code, 1001);
    assert_eq!(seen.last().expect("closing")["reason"], "server_shutdown");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_or_reports_every_accepted_event() {
    let server = TestServer::default().await;
    let mut c = Client::as_user(&server, "acme", "a").await;
    c.subscribe("all", json!({})).await;
    let events: Vec<Value> = (0..200).map(|i| json!({"event_type": "alert_received", "n": i})).collect();
    let ids = server.publish("acme", &Value::Array(events)).await;
    let shutdown = tokio::spawn(server.shutdown());
    let (seen, code, _) = c.read_until_close().await;
    assert_eq!(code, 1001);
    let delivered: Vec<&str> =
        seen.iter().filter(|m| m["type"] == "event").filter_map(|m| m["message_id"].as_str()).collect();
    let lost: u64 = seen.iter().filter(|m| m["type"] == "lagged").filter_map(|m| m["dropped"].as_u64()).sum();
    assert_eq!(delivered.len() as u64 + lost, ids.len() as u64, "every accepted event is delivered or reported");
    assert_eq!(delivered, ids[..delivered.len()].iter().map(String::as_str).collect::<Vec<_>>(), "in order, no gaps");
    tokio::time::timeout(Duration::from_secs(10), shutdown).await.expect("in time").expect("task");
}

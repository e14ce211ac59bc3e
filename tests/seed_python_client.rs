//! The seed's Python client example runs against the real TLS server and receives a published
//! `incident_created` event: once unchanged but for its URL (`wss://…?access_token=`), once with
//! only its URL and an `Authorization` header added. Python trusts the dev CA through
//! `SSL_CERT_FILE`.
//!
//! Needs a Python with `websockets`: `scripts/test.sh` creates `.venv` with it; otherwise set
//! `INCIDENT_STREAM_PYTHON` to such an interpreter. Without one this test fails and says so:
//! it never passes silently.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{config, token, TestServer};
use serde_json::json;

const SEED_URL: &str = "'ws://localhost:8080/ws'";

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("INCIDENT_STREAM_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with `websockets`: run scripts/test.sh (it creates .venv) or set INCIDENT_STREAM_PYTHON"
    );
    venv
}

/// Runs the (URL-substituted) seed client against a TLS server and returns the
/// first line it prints after an `incident_created` event is published.
async fn run_seed(server: &TestServer, ca: &std::path::Path, script: String) -> String {
    let path =
        std::env::temp_dir().join(format!("incident-stream-seed-{}-{}.py", std::process::id(), server.addr.port()));
    std::fs::write(&path, script).expect("write script");
    let mut child = Command::new(python())
        .arg(&path)
        .env("PYTHONUNBUFFERED", "1")
        // Python's default TLS context trusts this CA file: no code change needed for wss.
        .env("SSL_CERT_FILE", ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");

    // Wait for its subscription to be active, then publish.
    let mut subscribed = false;
    for _ in 0..200 {
        if server.metrics().await.get("websocket_active_subscriptions") == 1.0 {
            subscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !subscribed {
        child.kill().ok();
        let out = child.wait_with_output().expect("output");
        panic!("the Python client never subscribed: {}", String::from_utf8_lossy(&out.stderr));
    }
    server.publish("acme", &json!({"event_type": "comment_added", "comment": "not for this filter"})).await;
    server
        .publish(
            "acme",
            &json!({"event_type": "incident_created", "severity": "P0",
                    "incident": {"id": "550e8400", "title": "API Gateway Timeout Spike", "severity": "P0"}}),
        )
        .await;

    let stdout = child.stdout.take().expect("stdout");
    let reader = tokio::task::spawn_blocking(move || BufReader::new(stdout).lines().next());
    // Bounded: on timeout the child is killed, which ends the blocking read.
    let line = tokio::time::timeout(common::WAIT, reader).await;
    child.kill().ok();
    child.wait().ok();
    std::fs::remove_file(&path).ok();
    let line = line.expect("the Python client printed the event in time").expect("reader");
    line.expect("a line").expect("utf8")
}

fn seed() -> String {
    let seed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/seed_client.py")).expect("seed");
    assert_eq!(seed.matches(SEED_URL).count(), 1, "the seed's URL appears once");
    seed
}

fn assert_incident_line(line: &str) {
    assert!(line.starts_with("Incident: {"), "{line}");
    assert!(line.contains("'event_type': 'incident_created'"), "{line}");
    assert!(line.contains("API Gateway Timeout Spike"), "{line}");
    assert!(line.contains("'tenant': 'acme'"), "{line}");
    assert!(!line.contains("comment_added"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_python_client_unchanged_but_its_url_receives_an_incident() {
    let mut cfg = config();
    // The unchanged client cannot set headers; its token rides in the URL, enabled for this test.
    cfg.auth.allow_query_token = true;
    let ca = cfg.tls.cert.with_file_name("ca.crt");
    let server = TestServer::start(cfg).await;
    let url =
        format!("'wss://localhost:{}/ws?access_token={}'", server.addr.port(), token("acme", "python-seed", &[], 300));
    let line = run_seed(&server, &ca, seed().replace(SEED_URL, &url)).await;
    assert_incident_line(&line);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_python_client_with_an_authorization_header_receives_an_incident() {
    let cfg = config();
    let ca = cfg.tls.cert.with_file_name("ca.crt");
    let server = TestServer::start(cfg).await;
    let url = format!("'wss://localhost:{}/ws'", server.addr.port());
    let connect = "websockets.connect(client.url)";
    let script = seed().replace(SEED_URL, &url);
    assert_eq!(script.matches(connect).count(), 1);
    let header = format!(
        "websockets.connect(client.url, additional_headers={{'Authorization': 'Bearer {}'}})",
        token("acme", "python-seed", &[], 300)
    );
    let line = run_seed(&server, &ca, script.replace(connect, &header)).await;
    assert_incident_line(&line);
    server.shutdown().await;
}

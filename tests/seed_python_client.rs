//! The seed's Python client example runs unchanged but for its URL against the real server and
//! receives a published `incident_created` event.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_python_client_receives_a_published_incident() {
    let mut cfg = config();
    // The seed client cannot set headers; it carries its token in the URL, which this test enables.
    cfg.auth.allow_query_token = true;
    let server = TestServer::start(cfg).await;

    let seed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/seed_client.py")).expect("seed");
    assert_eq!(seed.matches(SEED_URL).count(), 1, "the seed's URL appears once");
    let url = format!("'ws://{}/ws?access_token={}'", server.addr, token("acme", "python-seed", &[], 300));
    let script = seed.replace(SEED_URL, &url);
    let path = std::env::temp_dir().join(format!("incident-stream-seed-{}.py", std::process::id()));
    std::fs::write(&path, script).expect("write script");

    let mut child = Command::new(python())
        .arg(&path)
        .env("PYTHONUNBUFFERED", "1")
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
    let ids = server
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
    let line = line.expect("the Python client printed the event in time").expect("reader");
    child.wait().ok();
    std::fs::remove_file(&path).ok();
    let line = line.expect("a line").expect("utf8");
    assert!(line.starts_with("Incident: {"), "{line}");
    assert!(line.contains("'event_type': 'incident_created'"), "{line}");
    assert!(line.contains("API Gateway Timeout Spike"), "{line}");
    assert!(!line.contains("comment_added"));
    assert_eq!(ids.len(), 1);
    server.shutdown().await;
}

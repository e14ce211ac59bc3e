//! The load generator's regression guard, run by the test command: a small fan-out over TLS that
//! fails on loss (never on time). Timing figures are printed for a human, not asserted.

mod common;

use std::process::Command;

use common::{config, TestServer, KID, SECRET};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fanout_loses_nothing() {
    let cfg = config();
    let ca = cfg.tls.cert.with_file_name("ca.crt");
    let server = TestServer::start(cfg).await;
    let addr = server.addr.to_string();
    let pid = std::process::id().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["--addr", &addr, "--ca", ca.to_str().expect("utf8"), "--secret", SECRET, "--kid", KID])
            .args(["--connections", "50", "--source-ips", "4", "--rate", "200", "--batch", "10", "--duration", "2"])
            .args(["--subs-per-conn", "3", "--server-pid", &pid, "--name", "guard", "--drain-secs", "20"])
            .output()
            .expect("run loadgen")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed: {stderr}");
    let r: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("json");
    eprintln!("{r}");
    assert_eq!(r["connections"], 50, "{r}");
    assert_eq!(r["connect_failures"], 0, "{r}");
    assert!(r["events_published"].as_u64().is_some_and(|n| n >= 100), "{r}");
    assert_eq!(r["deliveries_received"], r["deliveries_expected"], "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["lagged_messages"], 0, "{r}");
    assert_eq!(r["closed_by_server"], 0, "{r}");
    server.shutdown().await;
}

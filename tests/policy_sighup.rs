//! Reloads by SIGHUP and by `POST /admin/policies/reload`, with the file watcher off. In its own
//! test binary: the signal reaches every server of the process, and the reload tests beside it
//! count their reloads exactly.

mod common;

use std::time::Duration;

use common::{policy_config, reloads, token, wait_audit, wait_reloads, write_tenant, TestServer};
use serde_json::json;

#[tokio::test]
async fn sighup_and_the_admin_api_reload_too() {
    let mut cfg = policy_config(&[("acme", "[limits]\nmax_subscriptions_per_connection = 1\n")]);
    cfg.policies.watch = false;
    let (dir, audit) = (cfg.policies.dir.clone(), cfg.audit.path.clone());
    let server = TestServer::start(cfg).await;
    write_tenant(&dir, "acme", "[limits]\nmax_subscriptions_per_connection = 2\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reloads(&server.metrics().await, "ok"), 0.0, "no watcher: nothing yet");
    let status =
        std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().expect("kill -HUP");
    assert!(status.success());
    wait_reloads(&server, "ok", 1.0).await;
    let rec = wait_audit(&audit, "sighup", |r| r["trigger"] == "sighup").await;
    assert_eq!(rec["kind"], "policy.reloaded");

    write_tenant(&dir, "acme", "[limits]\nmax_subscriptions_per_connection = 3\n");
    let admin = token("ops", "root", &["admin"], 60);
    let r = server.http("POST", "/admin/policies/reload", &[("authorization", &format!("Bearer {admin}"))], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changed_tenants"], json!(["acme"]));
    let rec = wait_audit(&audit, "admin reload", |r| r["trigger"] == "admin_reload").await;
    assert_eq!((rec["subject"].as_str(), rec["tenant"].as_str()), (Some("root"), Some("ops")));
    server.shutdown().await;
}

//! Embedding: the seeds' builder methods, and the streaming routes mounted in an existing axum
//! app beside its own routes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use common::{plain_config, Client, TestServer};
use incident_stream::Server;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_mount_into_an_existing_app() {
    let base = plain_config();
    let server = Server::builder()
        .config(base)
        .max_pending_messages(500)
        .heartbeat_interval_secs(60)
        .session_timeout_secs(600)
        .broadcast_capacity(5000)
        .build()
        .expect("builds");
    assert_eq!(server.config().websocket.max_pending_messages, 500);
    assert_eq!(server.config().websocket.heartbeat_interval_secs, 60);
    let embedded = server.embed();
    let app =
        Router::new().route("/app/hello", get(|| async { "hello from the host app" })).merge(embedded.router.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let serve = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.expect("serve");
    });

    let host = TestServer::at(addr, None);
    let r = host.http("GET", "/app/hello", &[], None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "hello from the host app"));
    let mut c = Client::as_user(&host, "acme", "alice").await;
    assert_eq!(c.welcome["heartbeat_interval_secs"], 60);
    c.subscribe("all", json!({})).await;
    let ids = host.publish("acme", &json!({"event_type": "escalated"})).await;
    assert_eq!(c.recv().await["message_id"], ids[0].as_str());

    let reader = tokio::spawn(async move { c.read_until_close().await });
    embedded.shutdown(Duration::from_secs(3)).await;
    let (_, code, _) = reader.await.expect("reader");
    assert_eq!(code, 1001);
    serve.abort();
}

#[test]
fn builder_validates_like_the_config_file() {
    let err = Server::builder().config(plain_config()).max_pending_messages(0).build().err().expect("refused");
    assert!(err.to_string().contains("websocket.max_pending_messages"), "{err}");
}

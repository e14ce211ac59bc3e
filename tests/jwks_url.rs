//! A JWKS URL served by a local HTTPS server that rotates its keys: new kids are picked up, removed
//! ones stop verifying, refetches are rate-limited, redirects and oversized documents are refused.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use axum::Router;
use common::keys::{claims, generate};
use common::{config, dev_certs, Client, TestServer};
use incident_stream::config::JwksConfig;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

#[derive(Default)]
struct Idp {
    doc: Mutex<Value>,
    jwks_hits: AtomicUsize,
    /// When each JWKS fetch arrived, to check the refetch rate against the clock rather than
    /// against how fast this test runs.
    fetched_at: Mutex<Vec<Instant>>,
    redirect_hits: AtomicUsize,
}

impl Idp {
    /// No two fetches arrived closer together than the refetch interval (less a margin for the
    /// time a request takes to arrive, which varies on a loaded machine).
    fn assert_rate_limited(&self, interval: Duration) {
        let at = self.fetched_at.lock().expect("times");
        for w in at.windows(2) {
            let gap = w[1] - w[0];
            assert!(gap >= interval.mul_f64(0.7), "two JWKS fetches {gap:?} apart: {at:?}");
        }
    }
}

async fn start_idp(idp: Arc<Idp>) -> (SocketAddr, std::path::PathBuf) {
    let dir = dev_certs();
    let app = Router::new()
        .route(
            "/jwks.json",
            get(|State(idp): State<Arc<Idp>>| async move {
                idp.jwks_hits.fetch_add(1, Ordering::SeqCst);
                idp.fetched_at.lock().expect("times").push(Instant::now());
                let doc = idp.doc.lock().expect("doc").clone();
                axum::Json(doc)
            }),
        )
        .route(
            "/redirect",
            get(|State(idp): State<Arc<Idp>>| async move {
                idp.redirect_hits.fetch_add(1, Ordering::SeqCst);
                Redirect::temporary("/jwks.json").into_response()
            }),
        )
        .route("/big", get(|| async { format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(200_000)) }))
        .with_state(idp);
    let tls = incident_stream::tls::server_config(&dir.join("server.crt"), &dir.join("server.key")).expect("tls");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let server =
        axum_server::from_tcp_rustls(listener, axum_server::tls_rustls::RustlsConfig::from_config(tls)).expect("idp");
    tokio::spawn(server.serve(app.into_make_service()));
    (addr, dir.join("ca.crt"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_keys_are_followed_with_rate_limited_refetches() {
    let k1 = generate(Algorithm::ES256, "k1");
    let k2 = generate(Algorithm::ES256, "k2");
    let idp = Arc::new(Idp::default());
    *idp.doc.lock().expect("doc") = json!({"keys": [k1.jwk]});
    let (idp_addr, idp_ca) = start_idp(Arc::clone(&idp)).await;
    let source = |issuer: &str, path: &str| JwksConfig {
        issuer: issuer.into(),
        url: Some(format!("https://localhost:{}{path}", idp_addr.port())),
        algorithms: vec!["ES256".into()],
        refresh_min_interval_secs: 1,
        ca_file: Some(idp_ca.clone()),
        ..JwksConfig::default()
    };
    let mut cfg = config();
    cfg.auth.audience = Some(common::keys::AUDIENCE.into());
    cfg.auth.jwks = vec![
        source("https://idp.example", "/jwks.json"),
        source("https://redirecting.example", "/redirect"),
        source("https://big.example", "/big"),
    ];
    let server = TestServer::start(cfg).await;
    let iss = Some("https://idp.example");
    let hits = || idp.jwks_hits.load(Ordering::SeqCst);

    // First use fetches the set.
    Client::connect(&server, &k1.sign(&claims("acme", "u1", iss))).await;
    assert_eq!(hits(), 1);
    Client::connect(&server, &k1.sign(&claims("acme", "u1", iss))).await;
    assert_eq!(hits(), 1, "cached");

    // Rotation: k2 replaces k1. Right after a fetch, an unknown kid does not refetch yet.
    *idp.doc.lock().expect("doc") = json!({"keys": [k2.jwk]});
    assert_eq!(server.refusal(&k2.sign(&claims("acme", "u2", iss))).await, (401, "unknown_kid".into()));
    assert_eq!(hits(), 1, "refetch is rate-limited");

    // After the interval, the unknown kid refetches and k2 is picked up.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    Client::connect(&server, &k2.sign(&claims("acme", "u2", iss))).await;
    assert_eq!(hits(), 2);

    // k1 was removed from the set: it no longer verifies, even after another refetch. (The
    // first refusal refetches too if it comes more than the interval after the last fetch, as
    // it can on a loaded machine; the clock check below holds either way.)
    assert_eq!(server.refusal(&k1.sign(&claims("acme", "u1", iss))).await, (401, "unknown_kid".into()));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(server.refusal(&k1.sign(&claims("acme", "u1", iss))).await, (401, "unknown_kid".into()));
    assert!(hits() >= 3, "a refetch after the interval");
    idp.assert_rate_limited(Duration::from_secs(1));

    // A burst of unknown kids costs at most one fetch per interval.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before_burst = hits();
    let stranger = generate(Algorithm::ES256, "k9");
    let burst = (0..10).map(|i| {
        let t = stranger.sign(&claims("acme", &format!("s{i}"), iss));
        let server = &server;
        async move { server.refusal(&t).await }
    });
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r, (401, "unknown_kid".into()));
    }
    assert!(hits() > before_burst, "the burst refetched");
    // One refetch for the whole burst, unless the burst itself outlasted the interval.
    idp.assert_rate_limited(Duration::from_secs(1));

    // A URL that redirects is not followed; an oversized document is refused.
    let before = hits();
    let r = server.refusal(&k2.sign(&claims("acme", "u", Some("https://redirecting.example")))).await;
    assert_eq!(r, (401, "unknown_kid".into()));
    assert_eq!(idp.redirect_hits.load(Ordering::SeqCst), 1);
    assert_eq!(hits(), before, "the redirect target was not fetched");
    let r = server.refusal(&k2.sign(&claims("acme", "u", Some("https://big.example")))).await;
    assert_eq!(r, (401, "unknown_kid".into()));
    server.shutdown().await;
}

#[test]
fn jwks_urls_must_be_https_and_need_an_audience() {
    let mut cfg = config();
    cfg.auth.jwks = vec![JwksConfig {
        issuer: "https://idp.example".into(),
        url: Some("http://127.0.0.1:1/jwks.json".into()),
        algorithms: vec!["ES256".into()],
        ..JwksConfig::default()
    }];
    let err = incident_stream::Server::builder().config(cfg.clone()).build().err().expect("refused").to_string();
    assert!(err.contains("auth.audience"), "{err}");
    cfg.auth.audience = Some("incident-stream".into());
    let err = incident_stream::Server::builder().config(cfg).build().err().expect("refused").to_string();
    assert!(err.contains("https"), "{err}");
}

//! Shared harness of the black-box tests: a real server on 127.0.0.1:0 speaking TLS with freshly
//! generated dev certificates (plain only where a test says so), real signed tokens, real
//! WebSocket clients trusting the dev CA, and a minimal HTTP/1.1 client. Every wait is bounded.
#![allow(dead_code, unreachable_pub)]

pub mod keys;
pub mod nats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use incident_stream::config::{Config, KeyConfig};
use incident_stream::{Running, Server};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer, ClientConfig};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
pub const KID: &str = "test";
/// Upper bound of any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A fresh, empty directory under the system's temporary directory.
pub fn fresh_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "incident-stream-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A fresh directory with a dev CA and a server certificate for localhost/127.0.0.1/::1.
pub fn dev_certs() -> PathBuf {
    let dir = fresh_dir();
    incident_stream::tls::generate_dev_certs(&dir.join("server.crt"), &dir.join("server.key")).expect("dev certs");
    dir
}

/// A test configuration: TLS with fresh dev certs, loopback port 0, one HS256 test key.
pub fn config() -> Config {
    let mut c = plain_config();
    let dir = dev_certs();
    c.tls.enabled = true;
    c.tls.generate = false;
    c.tls.cert = dir.join("server.crt");
    c.tls.key = dir.join("server.key");
    c
}

/// Defaults of the test policies: limits well above what the tests that are not about limits
/// reach, and the one browser origin the tests use.
pub const TEST_DEFAULTS: &str = "enabled = true
allowed_origins = [\"https://app.example\"]
[limits]
max_connections = 100000
max_connections_per_subject = 100000
connects_per_minute_per_subject = 100000
messages_per_second = 100000
message_burst = 100000
max_subscriptions_per_connection = 100000
publishes_per_second = 1000000
publish_burst = 1000000
";

/// A fresh policy directory: `_defaults.toml` and one file per `(tenant, enabled)`.
pub fn policies(tenants: &[(&str, bool)]) -> PathBuf {
    let dir = dev_certs().join("policies");
    std::fs::create_dir_all(&dir).expect("policy dir");
    std::fs::write(dir.join("_defaults.toml"), TEST_DEFAULTS).expect("defaults");
    for (t, enabled) in tenants {
        std::fs::write(dir.join(format!("{t}.toml")), format!("tenant = \"{t}\"\nenabled = {enabled}\n"))
            .expect("policy");
    }
    dir
}

/// The tenants every test configuration knows.
pub const TENANTS: [&str; 4] = ["acme", "globex", "initech", "ops"];

/// The same without TLS (`ws://`), for the few tests about the plain listener.
pub fn plain_config() -> Config {
    let mut c = Config::default();
    c.tls.enabled = false;
    c.policies.dir = policies(&TENANTS.map(|t| (t, true)));
    c.server.listen = "127.0.0.1:0".parse().expect("addr");
    c.server.shutdown_grace_secs = 3;
    c.websocket.enable_compression = false;
    c.audit.path = fresh_dir().join("audit").join("audit.log");
    // The per-address limit is off except in the tests about it: every test client is 127.0.0.1.
    c.limits.handshakes_per_second_per_ip = 0;
    c.auth.keys = vec![KeyConfig {
        kid: KID.into(),
        algorithm: "HS256".into(),
        secret: Some(SECRET.into()),
        ..KeyConfig::default()
    }];
    c
}

/// A client TLS configuration trusting only the given CA certificate.
pub fn client_tls(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(cert.expect("ca pem")).expect("ca cert");
    }
    let config = ClientConfig::builder_with_provider(incident_stream::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// Client TLS trusting the server's dev CA; `None` for a plain listener.
    pub tls: Option<Arc<ClientConfig>>,
    running: Option<Running>,
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let tls = config.tls.enabled.then(|| client_tls(&config.tls.cert.with_file_name("ca.crt")));
        let server = Server::builder().config(config).build().expect("server builds");
        let running = server.start().await.expect("server starts");
        TestServer { addr: running.local_addr(), tls, running: Some(running) }
    }

    /// A server started elsewhere (e.g. the binary), known by its address and CA (if TLS).
    pub fn at(addr: SocketAddr, ca: Option<&Path>) -> TestServer {
        TestServer { addr, tls: ca.map(client_tls), running: None }
    }

    pub async fn default() -> TestServer {
        TestServer::start(config()).await
    }

    pub fn ws_url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://localhost:{}/ws", self.addr.port())
    }

    /// A raw byte stream to the server: TCP, wrapped in TLS when the server speaks it.
    pub async fn connect_io(&self) -> Box<dyn Io> {
        let tcp =
            tokio::time::timeout(WAIT, TcpStream::connect(self.addr)).await.expect("connect in time").expect("connect");
        match &self.tls {
            None => Box::new(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(cfg)).connect(name, tcp);
                Box::new(tokio::time::timeout(WAIT, tls).await.expect("TLS in time").expect("TLS handshake"))
            }
        }
    }

    pub async fn http(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> HttpResponse {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut extra: Vec<(&str, &str)> = headers.to_vec();
        if !body.is_empty() && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
            extra.push(("content-type", "application/json"));
        }
        self.raw_http(method, path, &extra, body.as_bytes()).await
    }

    /// A WebSocket upgrade request made by hand (no client library), for asserting refusals.
    pub async fn upgrade_request(&self, path: &str, extra: &[(&str, &str)]) -> HttpResponse {
        let mut headers = vec![
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        headers.extend_from_slice(extra);
        self.http("GET", path, &headers, None).await
    }

    /// The status and JSON `code` of an upgrade with this bearer token.
    pub async fn refusal(&self, token: &str) -> (u16, String) {
        let auth = format!("Bearer {token}");
        let r = self.upgrade_request("/ws", &[("authorization", auth.as_str())]).await;
        (r.status, r.json()["code"].as_str().unwrap_or_default().to_owned())
    }

    pub async fn raw_http(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        let io = self.connect_io().await;
        exchange(io, self.addr, method, path, headers, body).await
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }

    /// Publishes with a fresh publisher token of `tenant`; asserts 202 and returns the ids.
    pub async fn publish(&self, tenant: &str, body: &Value) -> Vec<String> {
        let t = token(tenant, "publisher-1", &["publisher"], 300);
        let r = self.http("POST", "/v1/events", &[("authorization", &format!("Bearer {t}"))], Some(body)).await;
        assert_eq!(r.status, 202, "publish failed: {}", r.body);
        r.json()["message_ids"].as_array().expect("ids").iter().map(|v| v.as_str().expect("id").to_owned()).collect()
    }

    pub async fn metrics(&self) -> Metrics {
        let r = self.http("GET", "/metrics", &[], None).await;
        assert_eq!(r.status, 200);
        Metrics::parse(&r.body)
    }
}

/// Signs a token with the test key.
pub fn token(tenant: &str, sub: &str, roles: &[&str], ttl_secs: i64) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    sign(json!({"sub": sub, "tenant": tenant, "roles": roles, "exp": now + ttl_secs, "iat": now}))
}

pub fn sign(claims: Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(KID.into());
    jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
}

/// Prometheus text parsed into `name{labels}` → value.
pub struct Metrics(pub HashMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let map = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| v.parse().ok().map(|v| (k.to_owned(), v))))
            .collect();
        Metrics(map)
    }

    pub fn get(&self, key: &str) -> f64 {
        *self.0.get(key).unwrap_or_else(|| panic!("metric {key} missing"))
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A minimal HTTP/1.1 exchange (Connection: close) over any stream, enough for the API under test.
pub async fn exchange(
    mut stream: Box<dyn Io>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    // A server may answer (413) before reading the whole body and close; tolerate a failed write.
    let _ignored = stream.write_all(&bytes).await;
    let _ignored = stream.flush().await;
    let mut out = Vec::new();
    // A TLS peer may close without close_notify after the response; what was read still counts.
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await.expect("response in time");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status line");
    let headers =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))).collect();
    HttpResponse { status, headers, body: body.to_owned() }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol client over a real WebSocket.
pub struct Client {
    pub ws: Ws,
    pub welcome: Value,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.welcome)
    }
}

impl Client {
    /// Connects with a bearer token and waits for `welcome`.
    pub async fn connect(server: &TestServer, token: &str) -> Client {
        Client::connect_with(server, token, &[]).await
    }

    /// The same with extra request headers (`User-Agent`, `Origin`, …).
    pub async fn connect_with(server: &TestServer, token: &str, headers: &[(&'static str, &str)]) -> Client {
        let mut req = server.ws_url().into_client_request().expect("request");
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
        for (k, v) in headers {
            req.headers_mut().insert(*k, v.parse().expect("header value"));
        }
        let connector = server.tls.as_ref().map(|c| Connector::Rustls(Arc::clone(c)));
        let connect = tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector);
        let (ws, _) = tokio::time::timeout(WAIT, connect).await.expect("in time").expect("upgrade");
        let mut c = Client { ws, welcome: Value::Null };
        let w = c.recv().await;
        assert_eq!(w["type"], "welcome", "{w}");
        c.welcome = w;
        c
    }

    /// Connects as `sub` of `tenant` with a 5-minute token.
    pub async fn as_user(server: &TestServer, tenant: &str, sub: &str) -> Client {
        Client::connect(server, &token(tenant, sub, &[], 300)).await
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.expect("send");
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::Text(t.to_owned().into())).await.expect("send");
    }

    /// Next JSON text frame (pings are answered by the library).
    pub async fn recv(&mut self) -> Value {
        self.recv_within(WAIT).await.unwrap_or_else(|| panic!("no message within {WAIT:?}"))
    }

    pub async fn recv_within(&mut self, d: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()?;
            match next {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).expect("server sends JSON")),
                Some(Ok(Message::Close(f))) => panic!("unexpected close: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("read error: {e}"),
                None => panic!("stream ended"),
            }
        }
    }

    /// Asserts nothing arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Some(v) = self.recv_within(d).await {
            panic!("expected nothing, got {v}");
        }
    }

    pub async fn subscribe(&mut self, id: &str, filters: Value) -> Value {
        self.send(json!({"type": "subscribe", "subscription_id": id, "filters": filters})).await;
        let r = self.recv().await;
        assert_eq!(r["type"], "subscribed", "{r}");
        assert_eq!(r["subscription_id"], id);
        r
    }

    /// Reads until a close frame; returns the text frames seen before it and the close code.
    pub async fn read_until_close(&mut self) -> (Vec<Value>, u16, String) {
        let mut seen = Vec::new();
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next()).await.expect("close in time");
            match next {
                Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(&t).expect("json")),
                Some(Ok(Message::Close(Some(f)))) => return (seen, u16::from(f.code), f.reason.to_string()),
                Some(Ok(Message::Close(None))) => return (seen, 1005, String::new()),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("read error before close: {e} (after {} frames)", seen.len()),
                None => panic!("stream ended without a close frame"),
            }
        }
    }

    /// Reads events into `got` (their ids) until it holds `want` or the wait ends; any other
    /// message fails the test.
    pub async fn read_events(&mut self, got: &mut Vec<String>, want: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < want {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(m) = self.recv_within(left).await else { break };
            assert_eq!(m["type"], "event", "{m}");
            got.push(m["message_id"].as_str().expect("id").to_owned());
        }
    }

    /// Ping/pong round trip: proves the connection is alive and in order.
    pub async fn assert_alive(&mut self) {
        self.send(json!({"type": "ping", "timestamp": "alive-check"})).await;
        let p = self.recv().await;
        assert_eq!(p, json!({"type": "pong", "timestamp": "alive-check"}));
    }
}

pub fn close_code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// The seed semantics over JSON, independent of the server's matcher.
pub fn reference_matches(filter: &Value, ev: &Value) -> bool {
    let any = |fk: &str, ek: &str| {
        let wanted: Vec<&Value> =
            filter.get(fk).and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
        wanted.is_empty() || ev.get(ek).is_some_and(|v| wanted.contains(&v))
    };
    let res = {
        let wanted: Vec<&Value> =
            filter.get("affected_resources").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
        wanted.is_empty()
            || ev["affected_resources"].as_array().is_some_and(|have| have.iter().any(|h| wanted.contains(&h)))
    };
    let labels = filter
        .get("labels")
        .and_then(Value::as_object)
        .is_none_or(|m| m.iter().all(|(k, v)| ev["labels"].get(k) == Some(v)));
    any("event_types", "event_type")
        && any("severities", "severity")
        && any("states", "state")
        && any("sources", "source")
        && any("incident_ids", "incident_id")
        && res
        && labels
}

/// Every complete record of the audit log at `path` (rotated files first).
pub fn audit_records(path: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for (file, _) in incident_stream::audit::log_files(path).unwrap_or_default() {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
    }
    out
}

/// Waits (bounded) for an audit record matching `pred` and returns it.
pub async fn wait_audit(path: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(r) = audit_records(path).into_iter().rev().find(|r| pred(r)) {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "no audit record: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A test configuration (TLS) whose policy directory holds the test defaults, every test
/// tenant, and the given tenant files (`(tenant, TOML after its tenant key)`).
pub fn policy_config(tenants: &[(&str, &str)]) -> Config {
    let mut c = config();
    let dir = fresh_dir().join("policies");
    std::fs::create_dir_all(&dir).expect("policy dir");
    std::fs::write(dir.join("_defaults.toml"), TEST_DEFAULTS).expect("defaults");
    for t in TENANTS {
        write_tenant(&dir, t, "");
    }
    for (t, extra) in tenants {
        write_tenant(&dir, t, extra);
    }
    c.policies.dir = dir;
    c
}

/// Writes `<tenant>.toml` with `extra` after the tenant key.
pub fn write_tenant(dir: &Path, tenant: &str, extra: &str) {
    std::fs::write(dir.join(format!("{tenant}.toml")), format!("tenant = \"{tenant}\"\n{extra}")).expect("tenant file");
}

/// How an upgrade attempt ended when it was refused: status, JSON body, `Retry-After`.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
}

impl Refused {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or_default()
    }
}

/// Tries to open a session (from `local`, when given, e.g. 127.0.0.2) with a bearer token and
/// extra headers: the welcomed client, or the refusal.
pub async fn try_connect(
    server: &TestServer,
    token: &str,
    headers: &[(&'static str, &str)],
    local: Option<std::net::IpAddr>,
) -> Result<Client, Refused> {
    use tokio_tungstenite::tungstenite::Error;
    let mut req = server.ws_url().into_client_request().expect("request");
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().expect("header value"));
    }
    let socket = if server.addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
    let socket = socket.expect("socket");
    if let Some(ip) = local {
        socket.bind(SocketAddr::new(ip, 0)).expect("bind the client address");
    }
    let tcp = tokio::time::timeout(WAIT, socket.connect(server.addr)).await.expect("connect in time").expect("connect");
    let connector = server.tls.as_ref().map(|c| Connector::Rustls(Arc::clone(c)));
    let attempt = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, connector);
    match tokio::time::timeout(WAIT, attempt).await.expect("upgrade in time") {
        Ok((ws, _)) => {
            let mut c = Client { ws, welcome: Value::Null };
            let w = c.recv().await;
            assert_eq!(w["type"], "welcome", "{w}");
            c.welcome = w;
            Ok(c)
        }
        Err(Error::Http(resp)) => {
            let body = resp.body().as_deref().map(|b| serde_json::from_slice(b).unwrap_or(Value::Null));
            let retry_after =
                resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            Err(Refused { status: resp.status().as_u16(), body: body.unwrap_or(Value::Null), retry_after })
        }
        Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
    }
}

/// `policy_reloads_total{result}`.
pub fn reloads(m: &Metrics, result: &str) -> f64 {
    m.get(&format!("policy_reloads_total{{result=\"{result}\"}}"))
}

/// Waits (bounded) until `policy_reloads_total{result}` reaches `n`.
pub async fn wait_reloads(server: &TestServer, result: &str, n: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while reloads(&server.metrics().await, result) < n {
        assert!(tokio::time::Instant::now() < deadline, "no {result} reload #{n}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn post(server: &TestServer, tenant: &str, key: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {}", token(tenant, "idem-publisher", &["publisher"], 300));
    let r = server.http("POST", "/v1/events", &[("authorization", &auth), ("idempotency-key", key)], Some(&body)).await;
    (r.status, r.json())
}

/// Keyed publishes, whichever bus: a retry with the same `Idempotency-Key` (through `retry`,
/// which may be another node) answers the first attempt's ids and publishes nothing; the same
/// key of another tenant, or another key, publishes; a malformed key is refused with 400.
pub async fn check_idempotent_publishes(first: &TestServer, retry: &TestServer) {
    let mut watcher = Client::as_user(retry, "acme", "idem-watcher").await;
    watcher.subscribe("all", json!({})).await;
    let batch = json!([{"event_type": "escalated"}, {"event_type": "comment_added"}]);
    let (status, a) = post(first, "acme", "order-42", batch.clone()).await;
    assert_eq!(status, 202, "{a}");
    let (status, again) = post(retry, "acme", "order-42", batch.clone()).await;
    assert_eq!((status, &again), (202, &a), "a retry gets the first attempt's answer");
    let (status, globex) = post(retry, "globex", "order-42", batch.clone()).await;
    assert_eq!(status, 202);
    assert_ne!(globex, a, "keys are per tenant");
    let (status, other) = post(retry, "acme", "order-43", json!({"event_type": "escalated"})).await;
    assert_eq!(status, 202);
    let mut got = Vec::new();
    watcher.read_events(&mut got, 3).await;
    let mut expected: Vec<String> =
        a["message_ids"].as_array().expect("ids").iter().map(|v| v.as_str().expect("id").to_owned()).collect();
    expected.push(other["message_ids"][0].as_str().expect("id").to_owned());
    assert_eq!(got, expected, "the retried batch was delivered once");
    watcher.expect_silence(Duration::from_millis(200)).await;
    for bad in ["has space", &"k".repeat(129)] {
        let (status, r) = post(first, "acme", bad, json!({"event_type": "escalated"})).await;
        assert_eq!((status, r["code"].as_str()), (400, Some("invalid_idempotency_key")), "{bad:?}: {r}");
    }
    watcher.expect_silence(Duration::from_millis(100)).await;
}

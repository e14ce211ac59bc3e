//! `loadgen`: the project's load generator. Opens N WebSocket connections (wss with a given CA,
//! or ws), each authenticated with a token it mints from a given HS key, spread over source
//! addresses 127.0.0.1…127.0.0.x; subscribes each; publishes events at a rate (or closed-loop)
//! with their send time inside; records publish-to-receive latency in an HDR histogram; reads the
//! server's CPU time and RSS from /proc/<pid> so the figure that counts, server CPU per delivery,
//! does not depend on the load generator's own speed. Prints one JSON line and a table.
//!
//! Loopback only: the target must be a 127.0.0.0/8 or ::1 address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer, ClientConfig};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", about = "Load generator for incident-stream (loopback only)")]
struct Args {
    /// Server address (loopback), e.g. 127.0.0.1:8443.
    #[arg(long)]
    addr: SocketAddr,
    /// Speak TLS, trusting this CA (PEM); without it, plain ws:// and http://.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Subscribing connections to open.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Spread connections over 127.0.0.1 … 127.0.0.N source addresses.
    #[arg(long, default_value_t = 20)]
    source_ips: u8,
    /// HS256 secret to mint tokens with (or --secret-file).
    #[arg(long)]
    secret: Option<String>,
    /// File holding the HS256 secret.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Key id of the secret.
    #[arg(long, default_value = "dev")]
    kid: String,
    /// Sign tokens with ES256 using this PKCS#8 PEM private key instead of an HS256 secret.
    #[arg(long)]
    es256_key: Option<PathBuf>,
    /// Write a fresh ES256 key pair to PATH (private) and PATH.pub (public), then exit.
    #[arg(long)]
    gen_es256_key: Option<PathBuf>,
    /// Spread subscribers over this many tenants t0…t{n-1} (1: all in --tenant).
    #[arg(long, default_value_t = 1)]
    tenants: usize,
    /// The tenant when --tenants is 1.
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// Subscriptions per connection (filter-heavy scenario: varied filters, one matches all).
    #[arg(long, default_value_t = 1)]
    subs_per_conn: usize,
    /// Events per second to publish (0 = closed loop: as fast as deliveries keep up).
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Seconds to publish for (after all connections are up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Events per publish request.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Publish requests in flight at most.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Approximate size of each event's JSON.
    #[arg(long, default_value_t = 512)]
    event_bytes: usize,
    /// Publish to this tenant (default: the first subscriber tenant).
    #[arg(long)]
    publish_tenant: Option<String>,
    /// Only open connections, wait this many seconds, measure memory, close (idle scenario).
    #[arg(long)]
    idle_secs: Option<f64>,
    /// PID of the server, to read its CPU time and RSS from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Label of the run in the JSON output.
    #[arg(long, default_value = "run")]
    name: String,
    /// Seconds to wait for the last deliveries after publishing stopped.
    #[arg(long, default_value_t = 5.0)]
    drain_secs: f64,
    /// Read the server's /metrics before and after connecting, to report the audit records
    /// written during the connection phase (and per second).
    #[arg(long)]
    scrape_audit: bool,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    lagged: AtomicU64,
    dropped: AtomicU64,
    closed: AtomicU64,
    /// Publishes the server refused with 503 (overloaded or broker unavailable): shed, not lost,
    /// and reported so that shedding is never silent.
    publishes_refused: AtomicU64,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The process's CPU seconds so far: (user, system).
fn proc_cpu_secs(pid: u32, ticks: f64) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime / ticks, stime / ticks))
}

fn proc_mem_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

struct Ctx {
    args: Args,
    tls: Option<Arc<ClientConfig>>,
    signing: (jsonwebtoken::Algorithm, jsonwebtoken::EncodingKey),
    counters: Counters,
    latency: Mutex<Histogram<u64>>,
}

impl Ctx {
    fn token(&self, tenant: &str, sub: &str, roles: &[&str]) -> Result<String> {
        let now = now_us() / 1_000_000;
        let claims = json!({"sub": sub, "tenant": tenant, "roles": roles, "iat": now, "exp": now + 3600});
        let mut h = jsonwebtoken::Header::new(self.signing.0);
        h.kid = Some(self.args.kid.clone());
        Ok(jsonwebtoken::encode(&h, &claims, &self.signing.1)?)
    }

    fn tenant_of(&self, i: usize) -> String {
        if self.args.tenants <= 1 {
            self.args.tenant.clone()
        } else {
            format!("t{}", i % self.args.tenants)
        }
    }

    async fn connect_io(&self, source: Option<IpAddr>) -> Result<Box<dyn Io>> {
        let socket =
            if self.args.addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let tcp = socket.connect(self.args.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            None => Box::new(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                Box::new(tokio_rustls::TlsConnector::from(Arc::clone(cfg)).connect(name, tcp).await?)
            }
        })
    }
}

/// Varied filters for the filter-heavy scenario; the last one matches every published event.
fn filter_for(k: usize, total: usize) -> Value {
    if k + 1 == total {
        return json!({});
    }
    match k % 4 {
        0 => json!({"event_types": ["incident_created", "escalated"], "severities": ["P0"]}),
        1 => json!({"labels": {"environment": "staging"}}),
        2 => json!({"sources": ["nobody"], "affected_resources": ["db"]}),
        _ => json!({"incident_ids": [format!("inc-{k}")], "states": ["Resolved"]}),
    }
}

async fn subscriber(
    ctx: Arc<Ctx>,
    i: usize,
    ready: tokio::sync::mpsc::Sender<Result<()>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let setup = async {
        let source = (ctx.args.source_ips > 0 && ctx.args.addr.is_ipv4())
            .then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % ctx.args.source_ips as usize) as u8)));
        let io = ctx.connect_io(source).await?;
        let scheme = if ctx.tls.is_some() { "wss" } else { "ws" };
        let url = format!("{scheme}://localhost:{}/ws", ctx.args.addr.port());
        let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
        let token = ctx.token(&ctx.tenant_of(i), &format!("lg-{i}"), &[])?;
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
        let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, io, Some(config)).await?;
        let welcome = ws.next().await.context("closed before welcome")??;
        if !welcome.to_text()?.contains("\"welcome\"") {
            bail!("expected welcome");
        }
        for k in 0..ctx.args.subs_per_conn {
            let f = filter_for(k, ctx.args.subs_per_conn);
            ws.send(Message::Text(
                json!({"type": "subscribe", "subscription_id": format!("s{k}"), "filters": f}).to_string().into(),
            ))
            .await?;
            let r = ws.next().await.context("closed before subscribed")??;
            if !r.to_text()?.contains("\"subscribed\"") {
                bail!("subscribe refused: {}", r.to_text()?);
            }
        }
        Ok(ws)
    };
    let mut ws = match setup.await {
        Ok(ws) => {
            let _ = ready.send(Ok(())).await;
            ws
        }
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return;
        }
    };
    drop(ready);
    let mut stop = stop;
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Some(p) = t.find("\"sent_us\":") {
                        let digits: String = t[p + 10..].chars().take_while(char::is_ascii_digit).collect();
                        if let (Ok(sent), Some(h)) = (digits.parse::<u64>(), local.as_mut()) {
                            let _ = h.record(now_us().saturating_sub(sent).max(1));
                        }
                        ctx.counters.received.fetch_add(1, Ordering::Relaxed);
                    } else if t.contains("\"lagged\"") {
                        ctx.counters.lagged.fetch_add(1, Ordering::Relaxed);
                        if let Ok(v) = serde_json::from_str::<Value>(&t) {
                            ctx.counters.dropped.fetch_add(v["dropped"].as_u64().unwrap_or(0), Ordering::Relaxed);
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    ctx.counters.closed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => break,
        }
    }
    if let Some(h) = local {
        if let Ok(mut global) = ctx.latency.lock() {
            let _ = global.add(&h);
        }
    }
    let _ = ws.close(None).await;
}

/// One keep-alive HTTP/1.1 publisher connection; returns events published.
async fn publisher(
    ctx: Arc<Ctx>,
    ticks: Arc<tokio::sync::Semaphore>,
    deadline: Instant,
    token: String,
    tenant: String,
) -> Result<u64> {
    let io = ctx.connect_io(None).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let pad = "x".repeat(ctx.args.event_bytes.saturating_sub(180));
    let mut published = 0u64;
    while Instant::now() < deadline {
        let permit = match tokio::time::timeout(Duration::from_millis(100), ticks.acquire()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => break,
            Err(_) => continue,
        };
        permit.forget();
        let sent = now_us();
        let events: Vec<Value> = (0..ctx.args.batch)
            .map(|_| {
                json!({"event_type": "alert_received", "severity": "P2", "state": "Detected", "source": "loadgen",
                       "labels": {"environment": "production"}, "sent_us": sent, "alert": {"detail": pad}})
            })
            .collect();
        let body = serde_json::to_vec(&events)?;
        let req = axum::http::Request::post("/v1/events")
            .header("host", "localhost")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        let resp = sender.send_request(req).await.context("publish request failed")?;
        let status = resp.status();
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        if status.as_u16() == 202 {
            published += ctx.args.batch as u64;
        } else if status.as_u16() == 503 {
            ctx.counters.publishes_refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            bail!("publish answered {status} for tenant {tenant}");
        }
    }
    Ok(published)
}

/// The sum of `audit_records_total` over every kind, from the server's `/metrics`.
async fn audit_records(ctx: &Ctx) -> Result<f64> {
    let io = ctx.connect_io(None).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = axum::http::Request::get("/metrics")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("/metrics answered {}", resp.status());
    }
    let body = http_body_util::BodyExt::collect(resp.into_body()).await?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("audit_records_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        bail!("loadgen only targets loopback addresses, not {}", args.addr);
    }
    if let Some(path) = &args.gen_es256_key {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        std::fs::write(path, pair.serialize_pem())?;
        let mut public = path.clone().into_os_string();
        public.push(".pub");
        std::fs::write(PathBuf::from(public), pair.public_key_pem())?;
        return Ok(());
    }
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let signing = match (&args.es256_key, &args.secret, &args.secret_file) {
        (Some(k), _, _) => {
            let pem = std::fs::read(k).with_context(|| format!("{}", k.display()))?;
            (jsonwebtoken::Algorithm::ES256, jsonwebtoken::EncodingKey::from_ec_pem(&pem)?)
        }
        (None, Some(s), _) => (jsonwebtoken::Algorithm::HS256, jsonwebtoken::EncodingKey::from_secret(s.as_bytes())),
        (None, None, Some(f)) => {
            let s = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
            (jsonwebtoken::Algorithm::HS256, jsonwebtoken::EncodingKey::from_secret(s.trim().as_bytes()))
        }
        (None, None, None) => bail!("--secret, --secret-file or --es256-key is required"),
    };
    let tls = match &args.ca {
        None => None,
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)? {
                roots.add(c?)?;
            }
            let cfg = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(Arc::new(cfg))
        }
    };
    let ticks_per_sec = clock_ticks();
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        tls,
        signing,
        counters: Counters::default(),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
    });
    let pid = args.server_pid;
    let rss_before = pid.and_then(|p| proc_mem_kib(p, "VmRSS:"));

    // Connect everything, at most 256 handshakes in flight.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Room for every connection: the spawn loop only reads readiness after spawning them all.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.connections.max(1));
    let audit0 = if args.scrape_audit { Some(audit_records(&ctx).await?) } else { None };
    let started = Instant::now();
    let cpu_hs0 = pid.and_then(|p| proc_cpu_secs(p, ticks_per_sec));
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut handles = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let (ctx, ready, stop) = (Arc::clone(&ctx), ready_tx.clone(), stop_rx.clone());
        handles.push(tokio::spawn(async move {
            let (inner_tx, mut inner_rx) = tokio::sync::mpsc::channel(1);
            let run = tokio::spawn(subscriber(ctx, i, inner_tx, stop));
            if let Some(r) = inner_rx.recv().await {
                let _ = ready.send(r).await;
            }
            drop(permit);
            let _ = run.await;
        }));
    }
    drop(ready_tx);
    let mut up = 0usize;
    let mut failures = 0usize;
    let mut first_error = None;
    while up + failures < args.connections {
        match ready_rx.recv().await {
            Some(Ok(())) => up += 1,
            Some(Err(e)) => {
                failures += 1;
                first_error.get_or_insert(e.to_string());
            }
            None => break,
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let cpu_hs1 = pid.and_then(|p| proc_cpu_secs(p, ticks_per_sec));
    let audit1 = if args.scrape_audit { Some(audit_records(&ctx).await?) } else { None };
    let rss_connected = pid.and_then(|p| proc_mem_kib(p, "VmRSS:"));

    let mut result = json!({
        "name": args.name, "connections": up, "connect_failures": failures, "first_error": first_error,
        "open_file_limit": nofile, "tls": args.ca.is_some(),
        "handshakes_per_sec": up as f64 / connect_secs.max(1e-9),
        "server_cpu_us_per_handshake": match (cpu_hs0, cpu_hs1) { (Some(a), Some(b)) if up > 0 => json!((b.0 + b.1 - a.0 - a.1) * 1e6 / up as f64), _ => Value::Null },
    });

    if let (Some(a), Some(b)) = (audit0, audit1) {
        result["audit_records_connect"] = json!(b - a);
        result["audit_records_per_sec"] = json!((b - a) / connect_secs.max(1e-9));
    }

    if let Some(idle) = args.idle_secs {
        tokio::time::sleep(Duration::from_secs_f64(idle)).await;
        let rss_idle = pid.and_then(|p| proc_mem_kib(p, "VmRSS:"));
        if let (Some(b), Some(a)) = (rss_before, rss_idle) {
            result["server_rss_kib_before"] = json!(b);
            result["server_rss_kib_idle"] = json!(a);
            result["server_kib_per_idle_connection"] = json!((a.saturating_sub(b)) as f64 / up.max(1) as f64);
        }
    } else {
        // Publish.
        let publish_tenant = args.publish_tenant.clone().unwrap_or_else(|| ctx.tenant_of(0));
        let token = ctx.token(&publish_tenant, "loadgen-publisher", &["publisher"])?;
        let subscribers_of_tenant = (0..up).filter(|i| ctx.tenant_of(*i) == publish_tenant).count() as u64;
        let ticks = Arc::new(tokio::sync::Semaphore::new(0));
        let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
        let cpu0 = pid.and_then(|p| proc_cpu_secs(p, ticks_per_sec));
        let received0 = ctx.counters.received.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let ticker = {
            let ticks = Arc::clone(&ticks);
            let ctx = Arc::clone(&ctx);
            let rate = args.rate;
            tokio::spawn(async move {
                if rate <= 0.0 {
                    // Closed loop: a new batch whenever the previous one was delivered to every
                    // subscriber (tracked by received counts), bounded by in_flight batches.
                    let per_batch = ctx.args.batch as u64 * subscribers_of_tenant;
                    let mut issued = 0u64;
                    while Instant::now() < deadline {
                        let delivered = ctx.counters.received.load(Ordering::Relaxed) - received0;
                        let outstanding = issued.saturating_sub(delivered / per_batch.max(1));
                        if outstanding < ctx.args.in_flight as u64 {
                            ticks.add_permits(1);
                            issued += 1;
                        } else {
                            tokio::time::sleep(Duration::from_micros(200)).await;
                        }
                    }
                } else {
                    let interval = Duration::from_secs_f64(ctx.args.batch as f64 / rate);
                    let mut tick = tokio::time::interval(interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    while Instant::now() < deadline {
                        tick.tick().await;
                        ticks.add_permits(1);
                    }
                }
                ticks.close();
            })
        };
        let pubs: Vec<_> = (0..args.in_flight)
            .map(|_| {
                tokio::spawn(publisher(
                    Arc::clone(&ctx),
                    Arc::clone(&ticks),
                    deadline,
                    token.clone(),
                    publish_tenant.clone(),
                ))
            })
            .collect();
        let mut published = 0u64;
        for p in pubs {
            published += p.await??;
        }
        let _ = ticker.await;
        let publish_secs = t0.elapsed().as_secs_f64();
        let expected = published * subscribers_of_tenant;
        // Wait for the last deliveries.
        let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain_secs);
        while ctx.counters.received.load(Ordering::Relaxed) - received0 < expected && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu1 = pid.and_then(|p| proc_cpu_secs(p, ticks_per_sec));
        let received = ctx.counters.received.load(Ordering::Relaxed) - received0;
        result["events_published"] = json!(published);
        result["publish_secs"] = json!(publish_secs);
        result["events_per_sec"] = json!(published as f64 / publish_secs.max(1e-9));
        result["deliveries_expected"] = json!(expected);
        result["deliveries_received"] = json!(received);
        result["lost"] = json!(expected.saturating_sub(received));
        result["deliveries_per_sec"] = json!(received as f64 / elapsed.max(1e-9));
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            let (user, system) = (b.0 - a.0, b.1 - a.1);
            let per_delivery = |secs: f64| secs * 1e6 / received.max(1) as f64;
            result["server_cpu_secs"] = json!(user + system);
            result["server_cpu_us_per_delivery"] = json!(per_delivery(user + system));
            // The split says how much is the kernel's (system: TCP send, loopback delivery).
            result["server_cpu_user_us_per_delivery"] = json!(per_delivery(user));
            result["server_cpu_system_us_per_delivery"] = json!(per_delivery(system));
        }
    }
    let _ = stop_tx.send(true);
    for h in handles {
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
    let c = &ctx.counters;
    result["lagged_messages"] = json!(c.lagged.load(Ordering::Relaxed));
    result["dropped_reported"] = json!(c.dropped.load(Ordering::Relaxed));
    result["closed_by_server"] = json!(c.closed.load(Ordering::Relaxed));
    result["publishes_refused"] = json!(c.publishes_refused.load(Ordering::Relaxed));
    if let Ok(h) = ctx.latency.lock() {
        if !h.is_empty() {
            result["latency_ms"] =
                json!({"p50": pct(&h, 0.5), "p90": pct(&h, 0.9), "p99": pct(&h, 0.99), "max": h.max() as f64 / 1000.0});
        }
    }
    if let Some(p) = pid {
        result["server_rss_kib_peak"] = json!(proc_mem_kib(p, "VmHWM:"));
        result["server_rss_kib_connected"] = json!(rss_connected);
        result["server_rss_kib_end"] = json!(proc_mem_kib(p, "VmRSS:"));
    }
    println!("{result}");
    if let Some(obj) = result.as_object() {
        for (k, v) in obj {
            eprintln!("{k:>32}  {v}");
        }
    }
    Ok(())
}

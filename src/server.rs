//! Assembling and running the service: [`Server::builder`] for embedding with the seeds'
//! builder methods, [`Server::start`] to bind and serve, [`Server::embed`] to mount the routes in
//! an existing axum app, and [`Running::shutdown`] for the graceful stop (stop accepting, send
//! `closing` with `reconnect_after_ms` to every session, drain within the grace period).

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::RustlsConfig;

use crate::listener::FirstByteTimeout;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::audit::{AuditLog, AuditWriter};
use crate::auth::{Authenticator, KeyError};
use crate::bus::{Bus, LocalBus, NatsBus, Published};
use crate::config::BusKind;
use crate::config::{Config, ConfigError};
use crate::fanout::{self, Hub};
use crate::http::{self, AppState};
use crate::limits::Limiters;
use crate::metrics::Metrics;
use crate::policy::store::PolicyStore;
use crate::reload::Reloader;
use crate::session::SessionSettings;

/// How long a closing handshake with one client may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A key could not be loaded.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The tenant policies are invalid.
    #[error("policies:\n{0}")]
    Policy(#[from] crate::policy::PolicyErrors),
    /// The audit log could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The listener could not be bound or served.
    #[error("listener {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

type EnvLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Builds a [`Server`]; the seeds' `WebSocketStateBuilder` methods are here.
pub struct ServerBuilder {
    config: Config,
    env: EnvLookup,
}

impl ServerBuilder {
    /// Starts from a whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }
    /// Outbound queue bound per connection.
    pub fn max_pending_messages(mut self, n: usize) -> Self {
        self.config.websocket.max_pending_messages = n;
        self
    }
    /// WebSocket ping interval.
    pub fn heartbeat_interval_secs(mut self, secs: u64) -> Self {
        self.config.websocket.heartbeat_interval_secs = secs;
        self
    }
    /// Idle session timeout.
    pub fn session_timeout_secs(mut self, secs: u64) -> Self {
        self.config.websocket.session_timeout_secs = secs;
        self
    }
    /// Cleanup sweep interval.
    pub fn cleanup_interval_secs(mut self, secs: u64) -> Self {
        self.config.websocket.cleanup_interval_secs = secs;
        self
    }
    /// Queue between the bus and the fan-out.
    pub fn broadcast_capacity(mut self, n: usize) -> Self {
        self.config.websocket.broadcast_capacity = n;
        self
    }
    /// Listen address (port 0 picks one).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.server.listen = addr;
        self
    }
    /// How `secret_env` names are resolved (default: the process environment).
    pub fn env(mut self, lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        self.env = Box::new(lookup);
        self
    }
    /// Validates the configuration, loads the keys and assembles the server.
    pub fn build(self) -> Result<Server, ServerError> {
        Server::new(self.config, &*self.env)
    }
}

/// An assembled, not yet running server.
pub struct Server {
    config: Config,
    state: Arc<AppState>,
    bus_rx: mpsc::Receiver<Arc<Published>>,
    audit_writer: Option<AuditWriter>,
}

/// The routes and background tasks of a server mounted in someone else's axum app.
pub struct Embedded {
    /// Merge this into the host app (it needs `into_make_service_with_connect_info::<SocketAddr>()`).
    pub router: Router,
    hub: Arc<Hub>,
    audit: AuditLog,
    tasks: Vec<JoinHandle<()>>,
}

impl Embedded {
    /// Closes every session with `closing` (1001), writes the last audit records and stops the
    /// background tasks.
    pub async fn shutdown(self, grace: Duration) {
        drain(&self.hub, grace).await;
        self.audit.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

/// A running server.
pub struct Running {
    local_addr: SocketAddr,
    tls: bool,
    handle: axum_server::Handle<SocketAddr>,
    hub: Arc<Hub>,
    audit: AuditLog,
    serve: JoinHandle<std::io::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
}

async fn drain(hub: &Hub, grace: Duration) {
    let sessions = hub.session_count();
    tracing::info!(sessions, grace_secs = grace.as_secs_f64(), "shutting down: closing sessions");
    hub.begin_shutdown();
    let deadline = tokio::time::Instant::now() + grace;
    while hub.session_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = hub.session_count();
    if left > 0 {
        tracing::warn!(sessions = left, "grace period over with sessions still open");
    }
}

impl Running {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the listener terminates TLS (`wss://`) or is plain (`ws://`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Graceful shutdown: stop accepting, close every session with `closing` + 1001, wait for
    /// them within the grace period, stop.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.handle.graceful_shutdown(Some(self.grace));
        drain(&self.hub, self.grace).await;
        // After the sessions: their `connection.closed` records are the last ones written.
        self.audit.shutdown().await;
        for t in &self.tasks {
            t.abort();
        }
        let addr = self.local_addr;
        match tokio::time::timeout(self.grace + Duration::from_secs(1), self.serve).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(source))) => Err(ServerError::Io { addr, source }),
            Ok(Err(join)) => Err(ServerError::Io { addr, source: std::io::Error::other(join) }),
            Err(_) => {
                tracing::warn!("listener did not stop within the grace period");
                Ok(())
            }
        }
    }

    /// Serves until `signal` completes, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
        signal.await;
        self.shutdown().await
    }
}

impl Server {
    /// A builder over the embedded defaults.
    pub fn builder() -> ServerBuilder {
        ServerBuilder { config: Config::default(), env: Box::new(|k| std::env::var(k).ok()) }
    }

    /// Assembles a server from a configuration.
    pub fn new(config: Config, env: &dyn Fn(&str) -> Option<String>) -> Result<Server, ServerError> {
        config.validate()?;
        let nz = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
        let metrics = Arc::new(Metrics::new()?);
        let auth = Arc::new(Authenticator::new(&config.auth, env)?);
        let policies = Arc::new(PolicyStore::load(&config.policies.dir)?);
        let (audit, audit_writer) = AuditLog::open(&config.audit, Arc::clone(&metrics))?;
        let ws = &config.websocket;
        let hub = Arc::new(Hub::new(
            Arc::clone(&metrics),
            ws.max_pending_messages,
            Duration::from_secs(ws.heartbeat_interval_secs),
        ));
        let l = &config.limits;
        let ip_quota = NonZeroU32::new(l.handshakes_per_second_per_ip)
            .map(|rate| governor::Quota::per_second(rate).allow_burst(nz(l.handshake_burst)));
        let limiters = Arc::new(Limiters::new(ip_quota, l.max_tracked_keys));
        let reloader = Arc::new(Reloader::new(
            Arc::clone(&policies),
            Arc::clone(&hub),
            Arc::clone(&limiters),
            audit.clone(),
            Arc::clone(&metrics),
        ));
        let window = crate::bus::WindowLimits {
            events: config.bus.replay_window,
            bytes: config.bus.replay_max_bytes,
            age: Duration::from_secs(config.bus.replay_max_age_secs),
        };
        let (bus, bus_rx) = match config.bus.kind {
            BusKind::Local => {
                let (mut bus, rx) = LocalBus::with_window(ws.broadcast_capacity, window);
                bus.set_idempotency_window(Duration::from_secs(config.publish.idempotency_window_secs));
                metrics.bus_connected.set(1);
                (Bus::Local(Box::new(bus)), rx)
            }
            BusKind::Nats => {
                let (bus, rx) = NatsBus::new(
                    config.bus.nats.clone(),
                    config.bus.replay_window,
                    Duration::from_secs(config.publish.idempotency_window_secs),
                    ws.broadcast_capacity,
                    Arc::clone(&metrics),
                );
                (Bus::Nats(bus), rx)
            }
        };
        let heartbeat = Duration::from_secs(ws.heartbeat_interval_secs);
        let settings = SessionSettings {
            heartbeat,
            idle_timeout: Duration::from_secs(ws.session_timeout_secs),
            leeway: Duration::from_secs(config.auth.leeway_secs),
            write_timeout: Duration::from_secs(ws.write_timeout_secs),
            max_subscriptions: ws.max_subscriptions_per_connection,
            messages_per_second: nz(ws.messages_per_second),
            message_burst: nz(ws.message_burst),
            max_frame_bytes: config.server.max_frame_bytes,
            close_timeout: CLOSE_TIMEOUT,
            epoch: std::time::Instant::now(),
        };
        let bus = Arc::new(bus);
        let sessions = Arc::new(crate::session::Services {
            hub: Arc::clone(&hub),
            bus: Arc::clone(&bus),
            auth: Arc::clone(&auth),
            policies: Arc::clone(&policies),
            metrics: Arc::clone(&metrics),
            audit: audit.clone(),
            settings,
        });
        let state = Arc::new(AppState {
            hub,
            bus,
            auth,
            policies,
            reloader,
            limiters,
            metrics,
            audit,
            audit_path: config.audit.enabled.then(|| config.audit.path.clone()),
            sessions,
            publish: config.publish.clone(),
            metrics_require_token: config.metrics.require_token,
            max_frame_bytes: config.server.max_frame_bytes,
        });
        Ok(Server { config, state, bus_rx, audit_writer })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn spawn_tasks(self) -> (Config, Arc<AppState>, Vec<JoinHandle<()>>) {
        let ws = &self.config.websocket;
        let hub = Arc::clone(&self.state.hub);
        let dispatcher = tokio::spawn(fanout::run_dispatcher(Arc::clone(&hub), self.bus_rx));
        let clock = tokio::spawn(fanout::run_clock(Arc::clone(&hub)));
        let cleanup = tokio::spawn(fanout::run_cleanup(
            hub,
            Duration::from_secs(ws.cleanup_interval_secs),
            Duration::from_secs(ws.session_timeout_secs),
        ));
        if ws.enable_compression {
            tracing::warn!(
                "websocket.enable_compression is set, but permessage-deflate is not supported: frames are sent uncompressed"
            );
        }
        let limiters = Arc::clone(&self.state.limiters);
        let metrics = Arc::clone(&self.state.metrics);
        let bus = Arc::clone(&self.state.bus);
        let sweep_every = Duration::from_secs(self.config.limits.sweep_interval_secs);
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                limiters.sweep();
                metrics.limiter_keys.set(limiters.tracked_keys() as i64);
                bus.trim();
            }
        });
        let mut tasks = vec![dispatcher, clock, cleanup, sweeper];
        if let Bus::Nats(nats) = &*self.state.bus {
            tasks.push(tokio::spawn(Arc::clone(nats).run()));
        }
        if self.config.policies.watch {
            let every = Duration::from_millis(self.config.policies.watch_interval_ms);
            tasks.push(tokio::spawn(crate::reload::run_watcher(Arc::clone(&self.state.reloader), every)));
        }
        if let Some(w) = self.audit_writer {
            tasks.push(tokio::spawn(w.run()));
        }
        (self.config, self.state, tasks)
    }

    /// Starts the background tasks and returns the routes for mounting in an existing app.
    pub fn embed(self) -> Embedded {
        let (_, state, tasks) = self.spawn_tasks();
        let hub = Arc::clone(&state.hub);
        let audit = state.audit.clone();
        Embedded { router: http::router(state), hub, audit, tasks }
    }

    /// Binds the configured address and serves: TLS by default, plain HTTP only when
    /// `tls.enabled = false` (behind a TLS-terminating proxy).
    pub async fn start(self) -> Result<Running, ServerError> {
        let addr = self.config.server.listen;
        let io = |source| ServerError::Io { addr, source };
        let tls_config = &self.config.tls;
        let tls = if tls_config.enabled {
            Some(RustlsConfig::from_config(crate::tls::server_config(&tls_config.cert, &tls_config.key)?))
        } else {
            tracing::warn!(
                "TLS is DISABLED (tls.enabled = false): tokens and events cross the network in clear text; \
                 only run this behind a TLS-terminating proxy"
            );
            None
        };
        let listener = std::net::TcpListener::bind(addr).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let local_addr = listener.local_addr().map_err(io)?;
        let (config, state, mut tasks) = self.spawn_tasks();
        // Only a server that owns the process listens for SIGHUP; an embedded one leaves the
        // process's signals to its host (reload through the watcher or the admin API).
        #[cfg(unix)]
        tasks.push(tokio::spawn(crate::reload::run_sighup(Arc::clone(&state.reloader))));
        let hub = Arc::clone(&state.hub);
        let audit = state.audit.clone();
        let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
        let handle = axum_server::Handle::new();
        let mut server = axum_server::from_tcp(listener).map_err(io)?.handle(handle.clone());
        server
            .http_builder()
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(config.server.header_read_timeout_secs));
        let first_byte = Duration::from_secs(config.server.header_read_timeout_secs);
        // TCP_NODELAY on every connection: a session already writes each wake-up's frames in one
        // call, so Nagle's algorithm could only hold a burst back until the client's (delayed)
        // ACK of the previous one, up to tens of milliseconds on a real-time stream.
        let serve = match tls {
            Some(rustls) => {
                let acceptor = FirstByteTimeout::new(
                    crate::tls::stream::TlsAcceptor::new(
                        rustls.clone(),
                        Duration::from_secs(config.tls.handshake_timeout_secs),
                    ),
                    first_byte,
                );
                tasks.push(tokio::spawn(crate::tls::watch(
                    rustls,
                    config.tls.cert.clone(),
                    config.tls.key.clone(),
                    Duration::from_secs(config.tls.reload_interval_secs),
                )));
                tracing::info!(addr = %local_addr, "listening (TLS)");
                tokio::spawn(server.acceptor(acceptor).serve(app))
            }
            None => {
                tracing::info!(addr = %local_addr, "listening (plain HTTP)");
                tokio::spawn(server.acceptor(FirstByteTimeout::new(NoDelayAcceptor::new(), first_byte)).serve(app))
            }
        };
        Ok(Running {
            local_addr,
            tls: config.tls.enabled,
            handle,
            hub,
            audit,
            serve,
            tasks,
            grace: Duration::from_secs(config.server.shutdown_grace_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyConfig;
    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    const SECRET: &str = "unit-test-secret-0123456789abcdef0123";

    /// With the dispatcher stopped, the queue to the fan-out fills: a batch that does not fit is
    /// refused whole with 503 and `Retry-After`, and nothing of it is queued.
    #[tokio::test]
    async fn a_full_fanout_queue_answers_503_and_queues_nothing() {
        let mut config = Config::default();
        config.websocket.broadcast_capacity = 3;
        config.publish.max_batch = 3;
        config.audit.enabled = false;
        config.auth.keys = vec![KeyConfig {
            kid: "k".into(),
            algorithm: "HS256".into(),
            secret: Some(SECRET.into()),
            ..KeyConfig::default()
        }];
        let mut server = Server::new(config, &|_| None).expect("server");
        let claims = serde_json::json!({"sub": "p", "tenant": "acme", "roles": ["publisher"],
            "exp": crate::time::unix_now() + 60});
        let token = server.state.auth.mint("k", claims.as_object().expect("object")).expect("token");
        let router = http::router(Arc::clone(&server.state));
        let post = |n: usize| {
            let body: Vec<_> = (0..n).map(|_| serde_json::json!({"event_type": "escalated"})).collect();
            let mut req = Request::post("/v1/events")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
                .expect("request");
            req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 1))));
            router.clone().oneshot(req)
        };
        assert_eq!(post(2).await.expect("response").status(), StatusCode::ACCEPTED);
        let refused = post(2).await.expect("response");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
        let body = axum::body::to_bytes(refused.into_body(), 4096).await.expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["code"], "overloaded");
        assert_eq!(post(1).await.expect("response").status(), StatusCode::ACCEPTED);
        let mut queued = 0;
        while server.bus_rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 3, "only the accepted batches were queued");
    }
}

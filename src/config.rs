//! The one typed configuration: a TOML file, overridden key by key from the environment
//! (`INCIDENT_STREAM__SECTION__KEY=value`), with the seeds' defaults.
//!
//! Loading is strict: unknown keys are errors and every error names the key (`websocket.
//! max_pending_messages: invalid type…`). The environment is passed in, never read here, so the
//! library has no hidden inputs. Each subsystem receives its own section at construction.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "INCIDENT_STREAM__";

/// Why a configuration was refused. The message always names the file or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key is unknown or has a value of the wrong type.
    #[error("config key `{key}`: {message}")]
    Key {
        /// Dotted path of the key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value has the right type but is out of range.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listener and HTTP limits.
    pub server: ServerConfig,
    /// TLS termination.
    pub tls: TlsConfig,
    /// Streaming sessions (the seeds' defaults).
    pub websocket: WebSocketConfig,
    /// Token validation.
    pub auth: AuthConfig,
    /// The publish API.
    pub publish: PublishConfig,
    /// Tenant policies.
    pub policies: PoliciesConfig,
    /// Pre-authentication limits per client address, and the bound on limiter state.
    pub limits: LimitsConfig,
    /// The event bus.
    pub bus: BusConfig,
    /// Logging.
    pub log: LogConfig,
    /// The `/metrics` endpoint.
    pub metrics: MetricsConfig,
    /// The audit log.
    pub audit: AuditConfig,
}

/// `[audit]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Record security-relevant facts (on by default).
    pub enabled: bool,
    /// The active file; rotated files sit beside it as `<path>.<first seq>`.
    pub path: PathBuf,
    /// Refuse new connections (503 `audit_unavailable`) while the log cannot be written, and
    /// let a connection in only once its `connection.accepted` record is written.
    pub fail_closed: bool,
    /// Written records are fsynced at most this long after their write (and at rotation and
    /// shutdown).
    pub fsync_interval_ms: u64,
    /// While the sink is down, how often the writer tries again.
    pub retry_interval_ms: u64,
    /// The active file is rotated before it would grow past this size.
    pub max_file_bytes: u64,
    /// Records waiting for the writer.
    pub queue_capacity: usize,
    /// Records held in memory while the sink is down; beyond this they are dropped and counted
    /// (`audit_records_dropped_total`).
    pub max_pending_records: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            path: PathBuf::from("audit/audit.log"),
            fail_closed: true,
            fsync_interval_ms: 1000,
            retry_interval_ms: 1000,
            max_file_bytes: 100 << 20,
            queue_capacity: 65536,
            max_pending_records: 100_000,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Require a bearer token with role `metrics` on `/metrics` (open by default).
    pub require_token: bool,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port (the bound address is logged).
    pub listen: SocketAddr,
    /// Largest WebSocket frame or message a client may send; larger closes with 1009.
    pub max_frame_bytes: usize,
    /// How long shutdown waits for sessions to drain.
    pub shutdown_grace_secs: u64,
    /// A client must finish sending its request headers within this time (slowloris guard).
    pub header_read_timeout_secs: u64,
    /// Threads running connections and the fan-out; 0 means one per core. Fewer than the cores
    /// when the host shares them with other busy processes (see docs/BENCHMARKS.md).
    pub worker_threads: usize,
}

/// More worker threads than this is a typo, not a deployment.
pub const MAX_WORKER_THREADS: usize = 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            max_frame_bytes: 65536,
            shutdown_grace_secs: 10,
            header_read_timeout_secs: 10,
            worker_threads: 0,
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Terminate TLS in the server. `false` only behind a TLS-terminating proxy (warns loudly).
    pub enabled: bool,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Dev only: when both files are missing, generate a dev CA and a localhost certificate
    /// next to `cert`.
    pub generate: bool,
    /// A client must complete the TLS handshake within this time.
    pub handshake_timeout_secs: u64,
    /// How often certificate and key are checked for changes (reloaded without dropping
    /// connections).
    pub reload_interval_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: true,
            cert: PathBuf::from("certs/server.crt"),
            key: PathBuf::from("certs/server.key"),
            generate: false,
            handshake_timeout_secs: 10,
            reload_interval_secs: 10,
        }
    }
}

/// `[websocket]`: the seeds' `WebSocketConfig`, plus per-connection message limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Outbound queue bound per connection, in events.
    pub max_pending_messages: usize,
    /// Interval of WebSocket pings; a ping unanswered for one interval closes with 4002.
    pub heartbeat_interval_secs: u64,
    /// A session with no subscription and no client message for this long is closed.
    pub session_timeout_secs: u64,
    /// How often the cleanup task sweeps sessions.
    pub cleanup_interval_secs: u64,
    /// Capacity of the queue between the bus and the fan-out, in events.
    pub broadcast_capacity: usize,
    /// permessage-deflate; not supported by this server (a warning says so at start-up).
    pub enable_compression: bool,
    /// Most subscriptions one connection may hold.
    pub max_subscriptions_per_connection: usize,
    /// A write to a client that makes no progress for this long closes it with 4008.
    pub write_timeout_secs: u64,
    /// Client messages allowed per second on one connection.
    pub messages_per_second: u32,
    /// Burst of client messages allowed above the rate.
    pub message_burst: u32,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_pending_messages: 1000,
            heartbeat_interval_secs: 30,
            session_timeout_secs: 300,
            cleanup_interval_secs: 60,
            broadcast_capacity: 10000,
            enable_compression: true,
            max_subscriptions_per_connection: 100,
            write_timeout_secs: 10,
            messages_per_second: 50,
            message_burst: 100,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Name of the claim that holds the tenant id.
    pub tenant_claim: String,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Accept `?access_token=` on the upgrade (off by default; always redacted from logs).
    pub allow_query_token: bool,
    /// Verification keys.
    pub keys: Vec<KeyConfig>,
    /// Key sets (JWKS), each bound to one issuer.
    pub jwks: Vec<JwksConfig>,
    /// Further mandatory labels from token claims: `label = "claim"` (beside `tenant`).
    pub claim_labels: BTreeMap<String, String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tenant_claim: "tenant".to_owned(),
            issuer: None,
            audience: None,
            leeway_secs: 30,
            allow_query_token: false,
            keys: Vec::new(),
            jwks: Vec::new(),
            claim_labels: BTreeMap::new(),
        }
    }
}

/// `[[auth.jwks]]`: a key set from a file or an HTTPS URL, bound to one issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwksConfig {
    /// The issuer whose tokens these keys verify (required; tokens must carry this `iss`).
    pub issuer: String,
    /// A JWKS file.
    pub file: Option<PathBuf>,
    /// A JWKS URL (https only; never taken from a token).
    pub url: Option<String>,
    /// Algorithms the keys of this set may use (RS*, PS*, ES256/384, EdDSA; never HS*).
    pub algorithms: Vec<String>,
    /// An unknown `kid` refetches the set at most once per this interval.
    pub refresh_min_interval_secs: u64,
    /// Keys older than this are refetched on next use (served meanwhile, refreshed in the
    /// background).
    pub cache_ttl_secs: u64,
    /// Keys not refreshed for this long (the provider unreachable) stop verifying: fail closed.
    pub max_stale_secs: u64,
    /// Fetch timeout.
    pub timeout_secs: u64,
    /// Largest key set document accepted.
    pub max_bytes: usize,
    /// A PEM CA to trust for the URL besides the public roots (private identity providers).
    pub ca_file: Option<PathBuf>,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            issuer: String::new(),
            file: None,
            url: None,
            algorithms: Vec::new(),
            refresh_min_interval_secs: 30,
            cache_ttl_secs: 300,
            max_stale_secs: 86_400,
            timeout_secs: 5,
            max_bytes: 64 * 1024,
            ca_file: None,
        }
    }
}

/// `[[auth.keys]]`: one verification key with its algorithm.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyConfig {
    /// Key id; a token's `kid` header selects the key.
    pub kid: String,
    /// The only algorithm this key verifies (HS256/384/512, RS*, PS*, ES256/384, EdDSA).
    pub algorithm: String,
    /// HS*: the secret inline (discouraged outside tests).
    pub secret: Option<String>,
    /// HS*: name of an environment variable holding the secret.
    pub secret_env: Option<String>,
    /// HS*: a file holding the secret.
    pub secret_file: Option<PathBuf>,
    /// HS* with `secret_file`: create a random secret there when the file is missing (dev only).
    pub generate: bool,
    /// RS*/PS*/ES*/EdDSA: path of a PEM public key.
    pub public_key: Option<PathBuf>,
    /// When set, the key only verifies tokens whose `iss` is this issuer.
    pub issuer: Option<String>,
}

/// `[publish]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// Most events in one `POST /v1/events` body.
    pub max_batch: usize,
    /// Largest body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// How long a publish's `Idempotency-Key` is remembered: a retry within it is answered with
    /// the first attempt's ids and not published again (on NATS: the duplicate window of a
    /// stream this service creates).
    pub idempotency_window_secs: u64,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig { max_batch: 1000, max_body_bytes: 1 << 20, idempotency_window_secs: 120 }
    }
}

/// `[policies]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoliciesConfig {
    /// Directory holding `_defaults.toml` and one `<tenant>.toml` per tenant.
    pub dir: PathBuf,
    /// Reload when the files change (besides SIGHUP and `POST /admin/policies/reload`).
    pub watch: bool,
    /// How often the directory is looked at; a change is applied once it held still for one
    /// interval (editors write in several steps).
    pub watch_interval_ms: u64,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        PoliciesConfig { dir: PathBuf::from("policies"), watch: true, watch_interval_ms: 1000 }
    }
}

/// `[limits]`: configuration, not policy, because it protects the token check itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests to the authenticated routes per second per client address (IPv6: per /64),
    /// before any token is looked at; 0 turns the limit off.
    pub handshakes_per_second_per_ip: u32,
    /// Burst of the above.
    pub handshake_burst: u32,
    /// Most keys (addresses, subjects) one keyed limiter tracks; past it new keys share one bucket.
    pub max_tracked_keys: usize,
    /// How often keys indistinguishable from fresh ones are dropped.
    pub sweep_interval_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            handshakes_per_second_per_ip: 20,
            handshake_burst: 40,
            max_tracked_keys: 100_000,
            sweep_interval_secs: 10,
        }
    }
}

/// Which event bus backs the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusKind {
    /// In-process: the embedded default.
    #[default]
    Local,
    /// NATS JetStream, shared by every gateway node (`[bus.nats]`).
    Nats,
}

/// Where JetStream keeps the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatsStorage {
    /// On disk: survives a restart of the NATS server.
    #[default]
    File,
    /// In memory: lost (a new epoch) when the NATS server restarts.
    Memory,
}

/// `[bus.nats]`: the JetStream stream every node publishes to and consumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (`nats://host:4222`, `tls://host:4222`).
    pub url: String,
    /// The stream's name; created with the settings below when missing.
    pub stream: String,
    /// Events go to `<subject_prefix>.<tenant>.<event_type>`.
    pub subject_prefix: String,
    /// Events older than this leave the stream (0: no age limit).
    pub max_age_secs: u64,
    /// Most bytes the stream holds; the oldest events go first.
    pub max_bytes: u64,
    /// File or memory storage.
    pub storage: NatsStorage,
    /// Stream replicas (1 for a single NATS server; 3 for a NATS cluster).
    pub replicas: usize,
    /// A NATS credentials file (JWT + nkey seed), when the server requires one.
    pub credentials_file: Option<PathBuf>,
    /// How long a publish waits for the stream's acknowledgement, and a replay for its events.
    pub request_timeout_ms: u64,
    /// Longest wait between two reconnection attempts (the backoff doubles up to it).
    pub max_reconnect_delay_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            stream: "INCIDENTS".to_owned(),
            subject_prefix: "incidents".to_owned(),
            max_age_secs: 86_400,
            max_bytes: 1 << 30,
            storage: NatsStorage::File,
            replicas: 1,
            credentials_file: None,
            request_timeout_ms: 5_000,
            max_reconnect_delay_ms: 5_000,
        }
    }
}

/// `[bus]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// The backend.
    pub kind: BusKind,
    /// Events retained per tenant for `resume_from` (0: no replay).
    pub replay_window: usize,
    /// Retained events older than this are dropped from the window.
    pub replay_max_age_secs: u64,
    /// Most bytes of event frames retained per tenant (the oldest go first).
    pub replay_max_bytes: usize,
    /// The JetStream settings, used when `kind = "nats"`.
    pub nats: NatsConfig,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            kind: BusKind::Local,
            replay_window: 10_000,
            replay_max_age_secs: 3600,
            replay_max_bytes: 16 << 20,
            nats: NatsConfig::default(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `incident_stream=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".to_owned() }
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    // Numbers, booleans and arrays parse as TOML; anything else is taken as a plain string.
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn apply_env(table: &mut toml::Table, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else { continue };
        let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        let key = parts.join(".");
        if parts.len() < 2 || parts.iter().any(String::is_empty) {
            return Err(ConfigError::Key {
                key,
                message: format!("environment variable {name} must name SECTION__KEY"),
            });
        }
        let (last, sections) =
            parts.split_last().ok_or_else(|| ConfigError::Key { key: key.clone(), message: "empty key".into() })?;
        let mut cur = &mut *table;
        for s in sections {
            let entry = cur.entry(s.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(ConfigError::Key { key, message: format!("`{s}` is not a section") }),
            };
        }
        cur.insert(last.clone(), parse_env_value(raw));
    }
    Ok(())
}

impl Config {
    /// The embedded development default: [`Config::default`] plus a dev HS256 key whose random
    /// secret is generated into `certs/dev-jwt.secret`, and dev TLS certificates generated into
    /// `certs/` when missing. Used only when no configuration file exists; a file starts from
    /// [`Config::default`], which has no keys and generates nothing, so a production file can
    /// never inherit the dev key.
    pub fn dev() -> Config {
        let mut c = Config::default();
        c.tls.generate = true;
        c.auth.keys = vec![KeyConfig {
            kid: "dev".to_owned(),
            algorithm: "HS256".to_owned(),
            secret_file: Some(PathBuf::from("certs/dev-jwt.secret")),
            generate: true,
            ..KeyConfig::default()
        }];
        c
    }

    /// Loads a configuration: the TOML text (if any) with environment overrides applied, then
    /// validated. `origin` names the text in error messages.
    pub fn from_sources(text: Option<(&str, &Path)>, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let mut table = match text {
            Some((text, path)) => toml::from_str::<toml::Table>(text)
                .map_err(|e| ConfigError::Syntax { path: path.to_owned(), message: e.to_string() })?,
            None => toml::Table::try_from(Config::dev())
                .map_err(|e| ConfigError::Key { key: String::new(), message: e.to_string() })?,
        };
        apply_env(&mut table, env)?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Key { key, message: e.into_inner().to_string() }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `path` (if given and present) and applies `env`. A missing default file means the
    /// embedded development default ([`Config::dev`]); a missing explicit file is an error.
    pub fn load(path: &Path, explicit: bool, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_sources(Some((&text, path)), env),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Config::from_sources(None, env),
            Err(source) => Err(ConfigError::Read { path: path.to_owned(), source }),
        }
    }

    /// Range checks that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn at_least(key: &'static str, v: u64, min: u64) -> Result<(), ConfigError> {
            if v < min {
                return Err(ConfigError::Invalid { key, message: format!("must be at least {min}, got {v}") });
            }
            Ok(())
        }
        let w = &self.websocket;
        at_least("server.max_frame_bytes", self.server.max_frame_bytes as u64, 1024)?;
        at_least("server.header_read_timeout_secs", self.server.header_read_timeout_secs, 1)?;
        if self.server.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError::Invalid {
                key: "server.worker_threads",
                message: format!("must be at most {MAX_WORKER_THREADS} (0 means one per core)"),
            });
        }
        at_least("tls.handshake_timeout_secs", self.tls.handshake_timeout_secs, 1)?;
        at_least("tls.reload_interval_secs", self.tls.reload_interval_secs, 1)?;
        at_least("websocket.max_pending_messages", w.max_pending_messages as u64, 1)?;
        at_least("websocket.heartbeat_interval_secs", w.heartbeat_interval_secs, 1)?;
        at_least("websocket.session_timeout_secs", w.session_timeout_secs, 1)?;
        at_least("websocket.cleanup_interval_secs", w.cleanup_interval_secs, 1)?;
        at_least("websocket.broadcast_capacity", w.broadcast_capacity as u64, 1)?;
        at_least("websocket.write_timeout_secs", w.write_timeout_secs, 1)?;
        at_least("websocket.max_subscriptions_per_connection", w.max_subscriptions_per_connection as u64, 1)?;
        at_least("websocket.messages_per_second", u64::from(w.messages_per_second), 1)?;
        at_least("websocket.message_burst", u64::from(w.message_burst), 1)?;
        at_least("policies.watch_interval_ms", self.policies.watch_interval_ms, 50)?;
        at_least("limits.handshake_burst", u64::from(self.limits.handshake_burst), 1)?;
        at_least("limits.max_tracked_keys", self.limits.max_tracked_keys as u64, 1)?;
        at_least("limits.sweep_interval_secs", self.limits.sweep_interval_secs, 1)?;
        at_least("publish.max_batch", self.publish.max_batch as u64, 1)?;
        at_least("audit.fsync_interval_ms", self.audit.fsync_interval_ms, 1)?;
        at_least("audit.retry_interval_ms", self.audit.retry_interval_ms, 10)?;
        at_least("audit.max_file_bytes", self.audit.max_file_bytes, 4096)?;
        at_least("audit.queue_capacity", self.audit.queue_capacity as u64, 16)?;
        at_least("audit.max_pending_records", self.audit.max_pending_records as u64, 16)?;
        at_least("publish.max_body_bytes", self.publish.max_body_bytes as u64, 256)?;
        at_least("publish.idempotency_window_secs", self.publish.idempotency_window_secs, 1)?;
        if self.publish.max_batch > w.broadcast_capacity {
            return Err(ConfigError::Invalid {
                key: "publish.max_batch",
                message: format!(
                    "must not exceed websocket.broadcast_capacity ({}), or such a batch could never be accepted",
                    w.broadcast_capacity
                ),
            });
        }
        if self.bus.kind == BusKind::Nats {
            let n = &self.bus.nats;
            at_least("bus.nats.request_timeout_ms", n.request_timeout_ms, 100)?;
            at_least("bus.nats.max_reconnect_delay_ms", n.max_reconnect_delay_ms, 100)?;
            at_least("bus.nats.replicas", n.replicas as u64, 1)?;
            at_least("bus.nats.max_bytes", n.max_bytes, 1 << 20)?;
            let token =
                |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !n.subject_prefix.split('.').all(token) {
                return Err(ConfigError::Invalid {
                    key: "bus.nats.subject_prefix",
                    message: format!(
                        "`{}` must be dot-separated tokens of A-Z, a-z, 0-9, '_' or '-'",
                        n.subject_prefix
                    ),
                });
            }
            if !token(&n.stream) {
                return Err(ConfigError::Invalid {
                    key: "bus.nats.stream",
                    message: format!("`{}` must be a name of A-Z, a-z, 0-9, '_' or '-'", n.stream),
                });
            }
            if n.url.trim().is_empty() {
                return Err(ConfigError::Invalid { key: "bus.nats.url", message: "must name a server".into() });
            }
        }
        if self.auth.keys.is_empty() && self.auth.jwks.is_empty() {
            return Err(ConfigError::Invalid {
                key: "auth.keys",
                message: "at least one key or key set ([[auth.jwks]]) is required".into(),
            });
        }
        if !self.auth.jwks.is_empty() && self.auth.audience.is_none() {
            return Err(ConfigError::Invalid {
                key: "auth.audience",
                message: "is required with [[auth.jwks]]: an identity provider also issues tokens for other services"
                    .into(),
            });
        }
        if self.auth.leeway_secs > 600 {
            return Err(ConfigError::Invalid { key: "auth.leeway_secs", message: "must be at most 600".into() });
        }
        for j in &self.auth.jwks {
            at_least("auth.jwks.refresh_min_interval_secs", j.refresh_min_interval_secs, 1)?;
            at_least("auth.jwks.timeout_secs", j.timeout_secs, 1)?;
            at_least("auth.jwks.max_bytes", j.max_bytes as u64, 256)?;
            at_least("auth.jwks.cache_ttl_secs", j.cache_ttl_secs, j.refresh_min_interval_secs)?;
            at_least("auth.jwks.max_stale_secs", j.max_stale_secs, j.cache_ttl_secs)?;
            if j.timeout_secs > 60 || j.max_bytes > 10 << 20 {
                return Err(ConfigError::Invalid {
                    key: "auth.jwks",
                    message: "timeout_secs must be at most 60 and max_bytes at most 10 MiB".into(),
                });
            }
        }
        if self.auth.claim_labels.contains_key("tenant") {
            return Err(ConfigError::Invalid {
                key: "auth.claim_labels",
                message: "`tenant` is always mandatory and comes from auth.tenant_claim".into(),
            });
        }
        if self.auth.tenant_claim.is_empty() {
            return Err(ConfigError::Invalid { key: "auth.tenant_claim", message: "must not be empty".into() });
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::Invalid {
                key: "log.level",
                message: format!("`{}` is not a valid log filter", self.log.level),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn load_raw(text: &str, e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_sources(Some((text, Path::new("test.toml"))), &env(e))
    }

    /// A file with the test's text plus one key (a configuration without keys is refused).
    fn load(text: &str, e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        load_raw(&format!("{text}\n[[auth.keys]]\nkid = \"k\"\nalgorithm = \"HS256\"\nsecret_env = \"K\"\n"), e)
    }

    #[test]
    fn defaults_are_the_seeds() {
        let c = Config::default();
        assert_eq!(c.websocket.max_pending_messages, 1000);
        assert_eq!(c.websocket.heartbeat_interval_secs, 30);
        assert_eq!(c.websocket.session_timeout_secs, 300);
        assert_eq!(c.websocket.cleanup_interval_secs, 60);
        assert_eq!(c.websocket.broadcast_capacity, 10000);
        assert!(c.websocket.enable_compression);
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8443");
        assert!(c.server.listen.ip().is_loopback());
    }

    #[test]
    fn shipped_config_file_equals_the_embedded_default() {
        let text = include_str!("../incident-stream.toml");
        assert_eq!(load_raw(text, &[]).expect("shipped config loads"), Config::dev());
        let embedded = Config::from_sources(None, &BTreeMap::new()).expect("embedded default");
        assert_eq!(embedded, Config::dev());
    }

    #[test]
    fn a_config_file_never_inherits_the_dev_key_or_dev_certificates() {
        // A production file that forgets its keys is refused, instead of trusting the dev key.
        let err = load_raw("[server]\nlisten = \"127.0.0.1:8443\"\n", &[]).expect_err("no keys").to_string();
        assert!(err.contains("auth.keys"), "{err}");
        let c = load("", &[]).expect("ok");
        assert_eq!(c.auth.keys.len(), 1);
        assert!(!c.tls.generate, "dev certificates are generated only by the embedded default");
        assert!(Config::dev().tls.generate && Config::dev().auth.keys[0].generate);
    }

    #[test]
    fn env_overrides_file() {
        let c = load(
            "[websocket]\nmax_pending_messages = 10\n",
            &[
                ("INCIDENT_STREAM__WEBSOCKET__MAX_PENDING_MESSAGES", "500"),
                ("INCIDENT_STREAM__SERVER__LISTEN", "127.0.0.1:0"),
                ("INCIDENT_STREAM__LOG__FORMAT", "json"),
                ("INCIDENT_STREAM_DEV_SECRET", "not an override"),
            ],
        )
        .expect("ok");
        assert_eq!(c.websocket.max_pending_messages, 500);
        assert_eq!(c.server.listen.port(), 0);
        assert_eq!(c.server.worker_threads, 0, "one per core unless set");
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("[websocket]\nmax_pending = 1\n", &[], "websocket"),
            ("[websocket]\nmax_pending_messages = \"lots\"\n", &[], "websocket.max_pending_messages"),
            ("[sever]\nlisten = \"x\"\n", &[], "sever"),
            ("[server]\nlisten = \"nowhere\"\n", &[], "server.listen"),
            (
                "",
                &[("INCIDENT_STREAM__WEBSOCKET__HEARTBEAT_INTERVAL_SECS", "soon")],
                "websocket.heartbeat_interval_secs",
            ),
            ("", &[("INCIDENT_STREAM__WEBSOCKET__MAX_PENDING_MESSAGES", "0")], "websocket.max_pending_messages"),
            ("[log]\nformat = \"xml\"\n", &[], "log.format"),
            ("[bus]\nkind = \"kafka\"\n", &[], "bus.kind"),
            ("[bus]\nkind = \"nats\"\n[bus.nats]\nsubject_prefix = \"a.*\"\n", &[], "bus.nats.subject_prefix"),
            ("[bus]\nkind = \"nats\"\n[bus.nats]\nstream = \"A.B\"\n", &[], "bus.nats.stream"),
            ("[bus.nats]\nstorage = \"tape\"\n", &[], "bus.nats.storage"),
            ("[publish]\nmax_batch = 20000\n", &[], "publish.max_batch"),
            ("[server]\nworker_threads = 5000\n", &[], "server.worker_threads"),
            ("[auth]\nleeway_secs = 100000\n", &[], "auth.leeway_secs"),
            ("[[auth.jwks]]\nissuer = \"i\"\nfile = \"f\"\nalgorithms = [\"ES256\"]\n", &[], "auth.audience"),
        ];
        for (text, e, key) in cases {
            let err = load(text, e).expect_err("must fail").to_string();
            assert!(err.contains(key), "{text:?} {e:?}: {err}");
        }
        let err = load("[server\n", &[]).expect_err("syntax").to_string();
        assert!(err.contains("test.toml"), "{err}");
    }
}

//! incident-stream: a secure, multi-tenant, real-time incident event streaming service.
//!
//! # Layout
//!
//! Pure code (no sockets, no clocks beyond formatting):
//! - [`event`]: event types, severities, states, priorities, tenant and message ids.
//! - [`filter`]: subscription filters and matching.
//! - [`protocol`]: wire messages, error codes, close codes.
//! - [`config`]: the typed configuration.
//! - [`auth`]: token verification into a principal.
//! - [`policy`]: tenant policy files, parsed and validated as a whole (and the store in force).
//!
//! Runtime:
//! - [`bus`]: where events get ids and their one serialized frame.
//! - `fanout` (hub, dispatcher, cleanup) and `outbox` (per-connection bounded queue).
//! - `session`: one connection's lifecycle.
//! - [`limits`]: governor rate limits with a bounded number of keys.
//! - `reload`: live policy reloads (watcher, SIGHUP, admin API), all or nothing.
//! - `http`: the axum routes.
//! - [`server`]: assembling, running, embedding, shutting down.
//! - [`tls`]: rustls configuration, dev certificates, live certificate reload.
//! - [`listener`]: the first-byte deadline on accepted connections.
//! - [`metrics`]: the Prometheus registry.
//! - [`audit`]: the hash-chained audit log, its writer task, verification and queries.
//!
//! See `docs/ARCHITECTURE.md` for the map and the invariants.

pub mod audit;
pub mod auth;
pub mod bus;
pub mod config;
pub mod event;
mod fanout;
pub mod filter;
pub mod http;
pub mod limits;
pub mod listener;
pub mod metrics;
mod outbox;
pub mod policy;
pub mod protocol;
mod reload;
pub mod server;
mod session;
mod short_str;
pub mod time;
pub mod tls;
mod ws;

pub use config::Config;
pub use server::{Embedded, Running, Server, ServerBuilder, ServerError};

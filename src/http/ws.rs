//! `GET /ws`: the upgrade. Runs only after the authentication layer accepted the token; sets the
//! frame limits, selects the `incident-stream.v1` subprotocol when offered, and hands the socket
//! and the principal to a session.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::error::ApiError;
use super::AppState;
use crate::auth::Principal;
use crate::protocol::SUBPROTOCOL;
use crate::session::{self, SessionContext};

/// Client read buffer: small, because most client frames are tiny and there may be many
/// thousands of idle connections.
const READ_BUFFER_BYTES: usize = 4096;
/// The WebSocket layer reads whole messages up to this multiple of `max_frame_bytes`, so the
/// session can refuse an oversized one with a clean 1009 close (the bytes were consumed, so no
/// reset cuts the close frame off). Beyond it the connection is dropped at once.
const HARD_CAP_FACTOR: usize = 4;
/// Writes are batched up to this many bytes before a syscall.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

pub(crate) async fn upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Extension(principal): Extension<Principal>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let mandatory = match state.auth.mandatory_labels(&principal) {
        Ok(m) => m,
        Err(e) => {
            state.metrics.auth_failures.with_label_values(&[e.code()]).inc();
            tracing::warn!(remote = %remote, reason = e.code(), detail = ?e, "authentication refused");
            return ApiError::from(&e).into_response();
        }
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "not_a_websocket_upgrade", e.body_text()).into_response()
        }
    };
    let ctx = SessionContext {
        hub: Arc::clone(&state.hub),
        auth: Arc::clone(&state.auth),
        policies: Arc::clone(&state.policies),
        metrics: Arc::clone(&state.metrics),
        settings: Arc::clone(&state.sessions),
        principal,
        mandatory,
        remote,
    };
    upgrade
        .protocols([SUBPROTOCOL])
        .max_frame_size(state.max_frame_bytes * HARD_CAP_FACTOR)
        .max_message_size(state.max_frame_bytes * HARD_CAP_FACTOR)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| session::run(socket, ctx))
}

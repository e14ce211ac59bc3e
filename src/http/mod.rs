//! The axum router: `/ws` (upgrade), `/v1/events` (publish), `/admin/*`, `/health`, `/ready`,
//! `/metrics`.
//!
//! Routes that need a token sit behind the authentication layer, so nothing unauthenticated
//! reaches a session or the bus. Handlers translate between HTTP and the library's typed
//! operations and own no state of their own.

mod admin;
mod audit;
mod authn;
pub mod error;
mod publish;
mod ws;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::config::PublishConfig;
use crate::fanout::Hub;
use crate::metrics::Metrics;

/// Shared state of every handler.
pub(crate) struct AppState {
    pub(crate) hub: Arc<Hub>,
    pub(crate) bus: Arc<Bus>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) policies: Arc<crate::policy::store::PolicyStore>,
    pub(crate) reloader: Arc<crate::reload::Reloader>,
    pub(crate) limiters: Arc<crate::limits::Limiters>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) audit: AuditLog,
    /// The active audit file, for `GET /admin/audit` (`None` when the log is disabled).
    pub(crate) audit_path: Option<std::path::PathBuf>,
    /// What every session shares.
    pub(crate) sessions: Arc<crate::session::Services>,
    pub(crate) publish: PublishConfig,
    /// `/metrics` needs a token with role `metrics`.
    pub(crate) metrics_require_token: bool,
    pub(crate) max_frame_bytes: usize,
}

/// Builds the router over the shared state.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    // Layers run outside-in: the per-address limit, then the token and the tenant policy.
    let authn = || {
        tower::ServiceBuilder::new()
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), authn::pre_auth_limit))
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), authn::require_token))
    };
    let mut authenticated = Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/v1/events", post(publish::publish))
        .route("/admin/audit", get(audit::list))
        .route("/admin/tenants", get(admin::tenants))
        .route("/admin/tenants/{id}/policy", get(admin::get_policy).put(admin::put_policy))
        .route("/admin/policies/reload", post(admin::reload))
        .route("/admin/sessions", get(admin::sessions))
        .route("/admin/sessions/{id}", delete(admin::kick))
        .route_layer(authn());
    let mut open = Router::new().route("/health", get(health)).route("/ready", get(ready));
    if state.metrics_require_token {
        authenticated =
            authenticated.merge(Router::new().route("/metrics", get(protected_metrics)).route_layer(authn()));
    } else {
        open = open.route("/metrics", get(metrics));
    }
    Router::new().merge(authenticated).merge(open).with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let audit = if state.audit.is_available() { "ok" } else { "unavailable" };
    let bus_ready = state.bus.is_ready();
    let bus = if bus_ready { "ok" } else { "unavailable" };
    if bus_ready && !state.audit.refuses_connections() {
        Json(serde_json::json!({"status": "ready", "audit": audit, "bus": bus})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "not_ready", "audit": audit, "bus": bus})))
            .into_response()
    }
}

async fn protected_metrics(
    state: State<Arc<AppState>>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
) -> Response {
    if !principal.roles.contains(crate::auth::Roles::METRICS) {
        return error::ApiError::insufficient_role("metrics").into_response();
    }
    metrics(state).await
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render metrics");
            error::ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "metrics unavailable").into_response()
        }
    }
}

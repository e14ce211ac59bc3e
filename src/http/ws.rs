//! `GET /ws`: the upgrade. Runs only after the edge layers accepted the address and the token;
//! checks the handshake, then the tenant policy's connection limits (new connections per minute
//! per subject: 429; concurrent connections per tenant and per subject: 503), selects the
//! `incident-stream.v1` subprotocol when offered, answers 101 and hands the upgraded connection
//! and the principal to a session. The connection is let in only once its `connection.accepted`
//! audit record is written (fail closed: 503 `audit_unavailable`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::{Either, FutureExt};
use hyper_util::rt::TokioIo;

use super::audit;
use super::error::ApiError;
use super::AppState;
use crate::audit::Kind;
use crate::auth::Principal;
use crate::fanout::CapExceeded;
use crate::protocol::SUBPROTOCOL;
use crate::session::{self, Admitted, SessionContext};
use crate::ws::{handshake, WebSocket};

/// Client messages up to this multiple of `max_frame_bytes` are read and discarded, so the
/// session can refuse an oversized one with a clean 1009 close (the bytes were consumed, so no
/// reset cuts the close frame off). Beyond it the connection is dropped at once.
const HARD_CAP_FACTOR: usize = 4;

pub(crate) async fn upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let Some(mut principal) = req.extensions_mut().remove::<Principal>() else {
        // The authentication layer always inserts it; without it nothing may pass.
        return ApiError::new(StatusCode::UNAUTHORIZED, "token_missing", "no verified principal").into_response();
    };
    let refuse = |e: ApiError, principal: &Principal, req: &Request| {
        let record = audit::rejected(req.headers(), remote, req.uri().path(), &e, Some(principal), None);
        (e, record)
    };
    // The generation first, then the set: a reload in between makes the session re-check at once.
    let policy_generation = state.policies.generation();
    let set = state.policies.current();
    // Checked again on this snapshot: a reload since the authentication layer's check must not
    // let a principal in under a generation it was never checked against.
    let origin = req.headers().get(header::ORIGIN).map(|v| v.to_str().unwrap_or("(not text)"));
    let admitted = super::authn::admit_request(&set, &principal, origin).and_then(|()| {
        set.get(&principal.tenant).cloned().ok_or_else(|| {
            ApiError::new(StatusCode::FORBIDDEN, "unknown_tenant", "the tenant has no policy on this service")
        })
    });
    let policy = match admitted {
        Ok(p) => p,
        Err(e) => {
            state.metrics.auth_failures.with_label_values(&[e.code]).inc();
            let (e, record) = refuse(e, &principal, &req);
            state.audit.record(record).await;
            return e.into_response();
        }
    };
    // The tenant id the connection and its labels keep is the policy set's, not a copy.
    if let Some(id) = set.shared_id(&principal.tenant) {
        principal.tenant = id.clone();
    }
    drop(set);
    let mandatory = match session::mandatory_labels(&state.auth, &policy, &principal) {
        Ok(m) => m,
        Err(e) => {
            state.metrics.auth_failures.with_label_values(&[e.code()]).inc();
            tracing::warn!(remote = %remote, reason = e.code(), detail = ?e, "authentication refused");
            let (e, record) = refuse(ApiError::from(&e), &principal, &req);
            state.audit.record(record).await;
            return e.into_response();
        }
    };
    let checked = handshake::check(req.method(), req.version(), req.headers(), SUBPROTOCOL)
        .map_err(|e| e.to_string())
        .and_then(|a| {
            let up = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
            up.map(|u| (a, u)).ok_or_else(|| "connection cannot be upgraded".to_owned())
        });
    let (accepted, on_upgrade) = match checked {
        Ok(ok) => ok,
        Err(message) => {
            let (e, record) =
                refuse(ApiError::new(StatusCode::BAD_REQUEST, "not_a_websocket_upgrade", message), &principal, &req);
            state.audit.record(record).await;
            return e.into_response();
        }
    };
    let limits = &policy.limits;
    if let Err(r) = state.limiters.check_connect(&principal.tenant, &principal.subject, limits) {
        state.metrics.rate_limited.with_label_values(&["connect"]).inc();
        tracing::info!(remote = %remote, tenant = %principal.tenant, subject = %principal.subject, "new connections per minute exceeded");
        let e = ApiError::rate_limited(
            r.retry_after_secs(),
            format!("more than {} new connections per minute for this subject", limits.connects_per_minute_per_subject),
        );
        let (e, record) = refuse(e, &principal, &req);
        state.audit.record(record.field("scope", "connect")).await;
        return e.into_response();
    }
    let reservation = match state.hub.reserve(&principal.tenant, &principal.subject, limits) {
        Ok(r) => r,
        Err(cap) => {
            let (scope, message) = match cap {
                CapExceeded::Tenant(n) => ("tenant_connections", format!("the tenant has its {n} connections open")),
                CapExceeded::Subject(n) => {
                    ("subject_connections", format!("this subject has its {n} connections open"))
                }
            };
            state.metrics.rate_limited.with_label_values(&[scope]).inc();
            tracing::info!(remote = %remote, tenant = %principal.tenant, subject = %principal.subject, scope, "connection cap reached");
            let e = ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_connections", message)
            };
            let (e, record) = refuse(e, &principal, &req);
            state.audit.record(record.field("scope", scope)).await;
            return e.into_response();
        }
    };
    let session_id = uuid::Uuid::new_v4();
    let (user_agent, origin) = audit::client_headers(req.headers());
    let record = audit::from_request(Kind::ConnectionAccepted, req.headers(), remote)
        .session(session_id.to_string())
        .tenant(principal.tenant.to_string())
        .subject(principal.subject.clone())
        .token_id(principal.token_id.clone())
        .field("token_expires_at", crate::time::rfc3339_from_unix(principal.expires_at))
        .field("subprotocol", accepted.protocol);
    // Fail closed: the connection proceeds only once its record is written.
    if state.audit.admit(record).await.is_err() {
        tracing::warn!(remote = %remote, tenant = %principal.tenant, "audit log unavailable: connection refused");
        let e = ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", "the audit log cannot be written")
        };
        let (e, record) = refuse(e, &principal, &req);
        state.audit.record(record).await;
        return e.into_response();
    }
    let ctx = SessionContext {
        shared: Arc::clone(&state.sessions),
        principal,
        user_agent: user_agent.map(Into::into),
        origin: origin.map(Into::into),
    };
    let max = state.max_frame_bytes;
    // Boxed: the task keeps what it captured for its whole life; the session takes the context
    // out of the box (freeing it) when it starts.
    let admitted = Admitted { session_id, remote, mandatory, reservation, policy, policy_generation };
    let ctx = Box::new((ctx, admitted));
    // A combinator rather than an `async` block: the task's future is then either the wait for
    // the upgrade or the session, never both side by side, and every idle connection keeps it.
    let task = on_upgrade.then(move |upgraded| match upgraded {
        Ok(upgraded) => {
            let socket = WebSocket::new(TokioIo::new(upgraded), max, max.saturating_mul(HARD_CAP_FACTOR));
            Either::Left(session::run(socket, ctx))
        }
        Err(e) => {
            tracing::debug!(remote = %remote, error = %e, "upgrade did not complete");
            Either::Right(std::future::ready(()))
        }
    });
    tokio::spawn(task);
    let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accepted.accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = accepted.protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    res
}

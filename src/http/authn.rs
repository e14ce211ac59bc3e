//! The authentication layer on `/ws` and `/v1/events`: finds the bearer token, verifies it and
//! puts the [`Principal`] in the request's extensions, or answers 401 before anything else runs
//! (no upgrade, no body read). Refusals are counted by reason and logged without the token.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::audit;
use super::error::ApiError;
use super::AppState;
use crate::auth::{token, AuthError};
use crate::event::TenantId;
use crate::policy::Admission;
use axum::http::StatusCode;

/// The tenant policy's verdict: 403 `unknown_tenant` (no policy file) or `tenant_disabled`.
pub(crate) fn admit(state: &AppState, tenant: &TenantId) -> Result<(), ApiError> {
    match state.policies.admit(tenant) {
        Admission::Allowed => Ok(()),
        Admission::UnknownTenant => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "unknown_tenant",
            format!("tenant `{tenant}` has no policy on this service"),
        )),
        Admission::Disabled => {
            Err(ApiError::new(StatusCode::FORBIDDEN, "tenant_disabled", format!("tenant `{tenant}` is disabled")))
        }
    }
}

/// Middleware: authenticate or refuse. Every refusal is counted, logged and audited.
pub(crate) async fn require_token(
    State(state): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let found = token::extract(req.headers(), req.uri(), state.auth.allow_query_token());
    let presented = found.as_ref().ok().and_then(|t| t.as_deref()).map(str::to_owned);
    let verified = match found {
        Ok(Some(t)) => state.auth.verify(&t).await,
        Ok(None) => Err(AuthError::Missing),
        Err(e) => Err(e),
    };
    let path = req.uri().path().to_owned();
    match verified {
        Ok(principal) => {
            if let Err(e) = admit(&state, &principal.tenant) {
                state.metrics.auth_failures.with_label_values(&[e.code]).inc();
                tracing::warn!(
                    remote = %remote, tenant = %principal.tenant, subject = %principal.subject,
                    reason = e.code, "tenant refused"
                );
                let record = audit::rejected(req.headers(), remote, &path, &e, Some(&principal), None);
                state.audit.record(record).await;
                return e.into_response();
            }
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => {
            state.metrics.auth_failures.with_label_values(&[e.code()]).inc();
            tracing::warn!(
                remote = %remote, path = %token::redact_uri(req.uri()), reason = e.code(), detail = ?e,
                "authentication refused"
            );
            let answer = ApiError::from(&e);
            let record = audit::rejected(req.headers(), remote, &path, &answer, None, presented.as_deref());
            state.audit.record(record).await;
            answer.into_response()
        }
    }
}

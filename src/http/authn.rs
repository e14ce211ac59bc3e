//! The edge layers of the authenticated routes, in the order a request meets them:
//!
//! 1. [`pre_auth_limit`]: requests per second per client address, before any token is looked
//!    at, so a flood cannot make the service verify signatures (429 + `Retry-After`).
//! 2. [`require_token`]: finds the bearer token, verifies it and checks the tenant policy
//!    (tenant known and enabled, subject and token not revoked, browser `Origin` allowed), then
//!    puts the [`crate::auth::Principal`] in the request's extensions; otherwise 401/403 before
//!    anything else runs (no upgrade, no body read).
//!
//! Every refusal is counted by reason, logged without the token, and audited.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::audit;
use super::error::ApiError;
use super::AppState;
use crate::auth::{token, AuthError, Principal};
use crate::event::TenantId;
use crate::policy::{Admission, PolicySet};

/// The refusal of a policy verdict: 403 with the admission's code.
fn refusal(admission: Admission, tenant: &TenantId) -> Result<(), ApiError> {
    let message = match admission {
        Admission::Allowed => return Ok(()),
        Admission::UnknownTenant => format!("tenant `{tenant}` has no policy on this service"),
        Admission::Disabled => format!("tenant `{tenant}` is disabled"),
        Admission::SubjectRevoked => "this subject's access has been revoked".to_owned(),
        Admission::TokenRevoked => "this token has been revoked".to_owned(),
    };
    Err(ApiError::new(StatusCode::FORBIDDEN, admission.code().unwrap_or("forbidden"), message))
}

/// May this tenant publish or be published to at all? 403 `unknown_tenant` or `tenant_disabled`.
pub(crate) fn admit(state: &AppState, tenant: &TenantId) -> Result<(), ApiError> {
    refusal(state.policies.current().admit(tenant), tenant)
}

/// The whole policy check of a verified principal on a request.
pub(super) fn admit_request(set: &PolicySet, p: &Principal, origin: Option<&str>) -> Result<(), ApiError> {
    refusal(set.admit_principal(&p.tenant, &p.subject, &p.token_id), &p.tenant)?;
    let allowed = set.get(&p.tenant).is_some_and(|policy| policy.allows_origin(origin));
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!("origin `{}` is not allowed for tenant `{}`", origin.unwrap_or_default(), p.tenant),
        ));
    }
    Ok(())
}

/// Middleware: the per-address limit in front of the token check.
pub(crate) async fn pre_auth_limit(
    State(state): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let Err(refused) = state.limiters.check_ip(remote.ip()) else {
        return next.run(req).await;
    };
    state.metrics.rate_limited.with_label_values(&["ip"]).inc();
    tracing::info!(remote = %remote, path = %token::redact_uri(req.uri()), "rate limited before authentication");
    let e = ApiError::rate_limited(refused.retry_after_secs(), "too many requests from this address; slow down");
    let record = audit::rejected(req.headers(), remote, req.uri().path(), &e, None, None).field("scope", "ip");
    state.audit.record(record).await;
    e.into_response()
}

/// Middleware: authenticate and apply the tenant policy, or refuse.
pub(crate) async fn require_token(
    State(state): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let found = token::extract(req.headers(), req.uri(), state.auth.allow_query_token());
    let presented = found.as_ref().ok().and_then(|t| t.as_deref()).map(str::to_owned);
    let verified = match found {
        Ok(Some(t)) => {
            state.metrics.token_verifications.inc();
            state.auth.verify(&t).await
        }
        Ok(None) => Err(AuthError::Missing),
        Err(e) => Err(e),
    };
    let path = req.uri().path().to_owned();
    match verified {
        Ok(principal) => {
            let origin = req.headers().get(header::ORIGIN).map(|v| v.to_str().unwrap_or("(not text)"));
            if let Err(e) = admit_request(&state.policies.current(), &principal, origin) {
                state.metrics.auth_failures.with_label_values(&[e.code]).inc();
                tracing::warn!(
                    remote = %remote, tenant = %principal.tenant, subject = %principal.subject,
                    token_id = %principal.token_id, reason = e.code, "refused by tenant policy"
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

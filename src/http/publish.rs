//! `POST /v1/events`: one event or an array of them, for a token with role `publisher`.
//! Every event of the batch is validated before any is published (all or nothing); the answer is
//! `202 {"message_ids": [...]}` in the order of the body. A batch counts as many events against
//! the tenant's `publishes_per_second` (429 + `Retry-After` when over, audited).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::auth::{Principal, Roles};
use crate::bus::{BusError, IdempotencyKey};
use crate::event::{Event, ParseEventError, TenantScope};

pub(crate) async fn publish(
    State(state): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    Extension(principal): Extension<Principal>,
    req: Request<Body>,
) -> Response {
    let headers = req.headers().clone();
    match accept(&state, &principal, req).await {
        Ok(ids) => (StatusCode::ACCEPTED, Json(serde_json::json!({ "message_ids": ids }))).into_response(),
        Err(e) => {
            if e.code == "rate_limited" {
                let record = super::audit::from_request(crate::audit::Kind::RateLimitTripped, &headers, remote)
                    .tenant(principal.tenant.to_string())
                    .subject(principal.subject.clone())
                    .token_id(principal.token_id.clone())
                    .reason("rate_limited")
                    .field("scope", "publish")
                    .field("status", e.status.as_u16());
                state.audit.record(record).await;
            }
            tracing::info!(tenant = %principal.tenant, subject = %principal.subject, code = e.code, status = e.status.as_u16(), "publish refused");
            e.into_response()
        }
    }
}

async fn accept(state: &AppState, principal: &Principal, req: Request<Body>) -> Result<Vec<String>, ApiError> {
    if !principal.roles.contains(Roles::PUBLISHER) {
        return Err(ApiError::insufficient_role("publisher"));
    }
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default();
        if !ct.trim_start().to_ascii_lowercase().starts_with("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be application/json",
            ));
        }
    }
    let key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => {
            let bad = |e: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_idempotency_key", e);
            let v = v.to_str().map_err(|_| bad(crate::bus::idempotency::InvalidKey.to_string()))?;
            Some(IdempotencyKey::new(&principal.tenant, v).map_err(|e| bad(e.to_string()))?)
        }
    };
    let limit = state.publish.max_body_bytes;
    let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
        if e.into_inner().is::<http_body_util::LengthLimitError>() {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("the body exceeds {limit} bytes"))
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "the request body could not be read")
        }
    })?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("the body is not JSON: {e}")))?;
    let (items, single) = match value {
        Value::Array(items) => (items, false),
        other => (vec![other], true),
    };
    if items.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty_batch", "the array holds no events"));
    }
    if items.len() > state.publish.max_batch {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "batch_too_large",
            format!("at most {} events per request, got {}", state.publish.max_batch, items.len()),
        ));
    }
    let scope = if principal.roles.contains(Roles::SYSTEM) {
        TenantScope::System(&principal.tenant)
    } else {
        TenantScope::Bound(&principal.tenant)
    };
    let events = items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            Event::parse(v, scope).map_err(|e| {
                let at = if single { String::new() } else { format!("event {i}: ") };
                match e {
                    ParseEventError::Invalid(e) => ApiError::new(StatusCode::BAD_REQUEST, e.code(), format!("{at}{e}")),
                    ParseEventError::Foreign(e) => {
                        ApiError::new(StatusCode::FORBIDDEN, "forbidden_tenant", format!("{at}{e}"))
                    }
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A system publisher may name other tenants: each must be admitted too (before any quota is
    // spent on a batch that is refused anyway).
    for ev in &events {
        if ev.routing.tenant != principal.tenant {
            super::authn::admit(state, &ev.routing.tenant)?;
        }
    }
    // The batch is charged to the publishing token's tenant: its rate bounds what its publishers send.
    if let Some(policy) = state.policies.current().get(&principal.tenant) {
        let limits = &policy.limits;
        match state.limiters.check_publish(&principal.tenant, events.len(), limits) {
            Ok(()) => {}
            Err(crate::limits::Refused::TooLarge { burst }) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "batch_too_large",
                    format!("{} events exceed the tenant's publish_burst of {burst}; split the batch", events.len()),
                ))
            }
            Err(r) => {
                state.metrics.rate_limited.with_label_values(&["publish"]).inc();
                return Err(ApiError::rate_limited(
                    r.retry_after_secs(),
                    format!(
                        "more than {} events per second (burst {}) for this tenant",
                        limits.publishes_per_second, limits.publish_burst
                    ),
                ));
            }
        }
    }
    let ids = state.bus.publish(events, key.as_ref()).await.map_err(|e| match e {
        BusError::Overloaded { .. } => ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
        },
        BusError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", e.to_string()),
        BusError::Unavailable { ref stored, .. } => {
            // Part of a batch may be stored: say which, so a retry can leave those out.
            let any = stored.iter().any(Option::is_some);
            let message_ids = any.then(|| stored.iter().map(|s| s.map(|id| id.to_string())).collect());
            ApiError {
                retry_after: Some(1),
                message_ids,
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", e.to_string())
            }
        }
    })?;
    Ok(ids.into_iter().map(|id| id.to_string()).collect())
}

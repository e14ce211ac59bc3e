//! Audit at the HTTP edge: the client fields of a record (remote address, `User-Agent`,
//! `Origin`), the `connection.rejected` record of every refusal, and `GET /admin/audit`.
//!
//! `GET /admin/audit` answers tokens with role `admin` (every tenant) or `auditor` (its own
//! tenant only, unless it also has `system`): the tenancy invariant holds for the audit trail
//! too. Query: `tenant`, `subject`, `kind`, `session_id`, `since`, `until` (RFC 3339),
//! `after_seq` and `limit` (paging: the answer's `next_after_seq` continues).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query as QueryParams, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::audit::{self, Kind, Query, Record};
use crate::auth::{Principal, Roles};

/// Most records one page returns.
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The `User-Agent` and `Origin` of a request.
pub(crate) fn client_headers(headers: &HeaderMap) -> (Option<&str>, Option<&str>) {
    (header_str(headers, header::USER_AGENT), header_str(headers, header::ORIGIN))
}

/// A record with the request's client fields.
pub(crate) fn from_request(kind: Kind, headers: &HeaderMap, remote: SocketAddr) -> Record {
    let (ua, origin) = client_headers(headers);
    Record::new(kind).remote(remote).user_agent(ua).origin(origin)
}

/// The record of a refusal before the upgrade: the reason code, the status, the path, who the
/// token said it was (when it was verified) and the token's id (never the token).
pub(crate) fn rejected(
    headers: &HeaderMap,
    remote: SocketAddr,
    path: &str,
    error: &ApiError,
    principal: Option<&Principal>,
    token: Option<&str>,
) -> Record {
    let mut r = from_request(Kind::ConnectionRejected, headers, remote)
        .reason(error.code)
        .field("status", error.status.as_u16())
        .field("path", path);
    if let Some(p) = principal {
        r = r.tenant(p.tenant.to_string()).subject(p.subject.clone()).token_id(p.token_id.clone());
    } else if let Some(t) = token {
        r = r.token_id(crate::auth::short_hash(t));
    }
    r
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Params {
    tenant: Option<String>,
    subject: Option<String>,
    kind: Option<String>,
    session_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after_seq: Option<u64>,
    limit: Option<usize>,
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
}

/// `GET /admin/audit`.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    uri: Uri,
    params: Result<QueryParams<Params>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let answer = read(&state, &principal, params).await;
    let (status, code) = match &answer {
        Ok(_) => (StatusCode::OK, "ok"),
        Err(e) => (e.status, e.code),
    };
    // Reading the audit trail is itself on record.
    let record = from_request(Kind::AdminAction, &headers, remote)
        .tenant(principal.tenant.to_string())
        .subject(principal.subject.clone())
        .token_id(principal.token_id.clone())
        .reason(code)
        .field("action", "audit.read")
        .field("status", status.as_u16())
        .field("request", crate::auth::token::redact_uri(&uri));
    state.audit.record(record).await;
    match answer {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn read(
    state: &AppState,
    principal: &Principal,
    params: Result<QueryParams<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Value, ApiError> {
    let all_tenants = principal.roles.contains(Roles::ADMIN)
        || (principal.roles.contains(Roles::AUDITOR) && principal.roles.contains(Roles::SYSTEM));
    if !all_tenants && !principal.roles.contains(Roles::AUDITOR) {
        return Err(ApiError::insufficient_role("auditor"));
    }
    let QueryParams(p) = params.map_err(|e| bad_request(e.body_text()))?;
    let own = principal.tenant.to_string();
    if !all_tenants && p.tenant.as_ref().is_some_and(|t| *t != own) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_tenant",
            "an auditor reads its own tenant's records",
        ));
    }
    let mut q = Query {
        tenant: if all_tenants { p.tenant } else { Some(own) },
        subject: p.subject,
        session_id: p.session_id,
        after_seq: p.after_seq,
        ..Query::default()
    };
    let parsed = (|| -> Result<(), audit::QueryError> {
        q.kind = p.kind.as_deref().map(audit::parse_kind).transpose()?;
        q.since = p.since.as_deref().map(|s| audit::parse_time("since", s)).transpose()?;
        q.until = p.until.as_deref().map(|s| audit::parse_time("until", s)).transpose()?;
        Ok(())
    })();
    parsed.map_err(|e| bad_request(e.to_string()))?;
    let limit = p.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let Some(path) = state.audit_path.clone() else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "audit_disabled", "the audit log is disabled"));
    };
    // Reading files blocks: off the runtime's workers.
    let read = tokio::task::spawn_blocking(move || {
        let files = audit::log_files(&path)?;
        let mut records = Vec::new();
        let mut more = false;
        audit::query_files(&files, &q, |_, rec| {
            if records.len() == limit {
                more = true;
                return false;
            }
            records.push(Value::Object(rec.clone()));
            true
        })?;
        Ok::<_, audit::FileError>((records, more))
    })
    .await;
    let (records, more) = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot read the audit log");
            let m = "the audit log cannot be read";
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", m));
        }
        Err(e) => {
            tracing::error!(error = %e, "audit read task failed");
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "audit read failed"));
        }
    };
    let next = if more { records.last().and_then(|r| r.get("seq")).and_then(Value::as_u64) } else { None };
    Ok(serde_json::json!({"records": records, "next_after_seq": next}))
}

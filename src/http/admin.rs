//! The admin API, for tokens with role `admin` (others: 401 from the authentication layer, 403
//! here). Every call, allowed or not, is audited as `admin.action` with its status.
//!
//! - `GET /admin/tenants`: tenants with their live connection and subscription counts.
//! - `GET /admin/tenants/{id}/policy`: the tenant file's text, its SHA-256 and the effective policy.
//! - `PUT /admin/tenants/{id}/policy`: a new tenant file (TOML). Validated together with the rest
//!   of the directory; a bad body changes nothing and gets 422 with every error; a good one is
//!   written atomically and applied at once.
//! - `POST /admin/policies/reload`: reload the directory (422 with the errors when it is invalid).
//! - `GET /admin/sessions?tenant=…`: live sessions.
//! - `DELETE /admin/sessions/{id}`: close a session with 4003 `kicked`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::audit::from_request;
use super::error::ApiError;
use super::AppState;
use crate::audit::Kind;
use crate::auth::{Principal, Roles};
use crate::event::TenantId;
use crate::policy::{PolicyErrors, TenantPolicy};
use crate::protocol::CloseReason;
use crate::reload::{PutError, Trigger};

/// Largest tenant file a `PUT` accepts.
pub(crate) const MAX_POLICY_BYTES: usize = 64 * 1024;

/// What a handler answers: a status and a JSON body, or an error.
type Answer = Result<(StatusCode, Value), Refusal>;

/// A refusal, with the policy errors when a body or the directory was invalid.
enum Refusal {
    Api(ApiError),
    Invalid(PolicyErrors),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::Api(e)
    }
}

impl Refusal {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Refusal::Api(e) => (e.status, e.code),
            Refusal::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_policy"),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Api(e) => e.into_response(),
            Refusal::Invalid(errors) => {
                let list: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                let body = json!({
                    "code": "invalid_policy",
                    "message": "the policies are invalid; nothing was changed",
                    "errors": list,
                });
                (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
            }
        }
    }
}

/// The request facts every admin handler needs for its audit record.
pub(crate) struct Caller {
    principal: Principal,
    remote: SocketAddr,
    headers: HeaderMap,
    uri: Uri,
}

impl Caller {
    fn trigger(&self, action: &'static str) -> Trigger {
        Trigger::Admin {
            tenant: self.principal.tenant.to_string(),
            subject: self.principal.subject.clone(),
            token_id: self.principal.token_id.clone(),
            remote: self.remote.to_string(),
            action,
        }
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        let principal = parts.extensions.get::<Principal>().cloned();
        let remote = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        match (principal, remote) {
            (Some(principal), Some(remote)) => {
                Ok(Caller { principal, remote, headers: parts.headers.clone(), uri: parts.uri.clone() })
            }
            _ => Err(ApiError::new(StatusCode::UNAUTHORIZED, "token_missing", "no verified principal")),
        }
    }
}

/// Audits the call, then answers.
async fn finish(
    state: &AppState,
    caller: &Caller,
    action: &'static str,
    target: Option<&str>,
    answer: Answer,
) -> Response {
    let (status, code) = match &answer {
        Ok((status, _)) => (*status, "ok"),
        Err(r) => r.status_and_code(),
    };
    let mut record = from_request(Kind::AdminAction, &caller.headers, caller.remote)
        .tenant(caller.principal.tenant.to_string())
        .subject(caller.principal.subject.clone())
        .token_id(caller.principal.token_id.clone())
        .reason(code)
        .field("action", action)
        .field("status", status.as_u16())
        .field("request", crate::auth::token::redact_uri(&caller.uri));
    if let Some(t) = target {
        record = record.field("target", t);
    }
    state.audit.record(record).await;
    tracing::info!(
        action, status = status.as_u16(), admin = %caller.principal.subject, target = target.unwrap_or(""),
        "admin action"
    );
    match answer {
        Ok((status, body)) => (status, Json(body)).into_response(),
        Err(r) => r.into_response(),
    }
}

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.principal.roles.contains(Roles::ADMIN) {
        Ok(())
    } else {
        Err(ApiError::insufficient_role("admin"))
    }
}

/// A tenant id from the path. Names starting with `_` are reserved for the directory's own files
/// (`_defaults.toml`): a `PUT` must never be able to replace them.
fn tenant_id(id: &str) -> Result<TenantId, ApiError> {
    if id.starts_with('_') {
        let m = format!("`{id}`: tenant ids starting with `_` are reserved");
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_tenant", m));
    }
    TenantId::new(id).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_tenant", e.to_string()))
}

fn effective(p: &TenantPolicy) -> Value {
    let l = &p.limits;
    json!({
        "enabled": p.enabled,
        "limits": {
            "max_connections": l.max_connections,
            "max_connections_per_subject": l.max_connections_per_subject,
            "connects_per_minute_per_subject": l.connects_per_minute_per_subject,
            "messages_per_second": l.messages_per_second,
            "message_burst": l.message_burst,
            "max_subscriptions_per_connection": l.max_subscriptions_per_connection,
            "publishes_per_second": l.publishes_per_second,
            "publish_burst": l.publish_burst,
        },
        "allowed_event_types": p.allowed_event_types.map(|_| p.allowed_event_type_names()),
        "mandatory_labels": p.mandatory_labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "allowed_origins": p.allowed_origins,
        "revoked_subjects": p.revoked_subjects,
        "revoked_token_ids": p.revoked_token_ids,
    })
}

/// `GET /admin/tenants`.
pub(crate) async fn tenants(State(state): State<Arc<AppState>>, caller: Caller) -> Response {
    let answer = (|| {
        require_admin(&caller)?;
        let set = state.policies.current();
        let connections = state.hub.connection_counts();
        let subscriptions = state.hub.subscription_counts();
        let list: Vec<Value> = set
            .tenants()
            .map(|t| {
                let p = set.get(t);
                json!({
                    "tenant": t.as_str(),
                    "enabled": p.is_some_and(|p| p.enabled),
                    "connections": connections.get(t).copied().unwrap_or(0),
                    "subscriptions": subscriptions.get(t).copied().unwrap_or(0),
                })
            })
            .collect();
        Ok((StatusCode::OK, json!({ "tenants": list })))
    })();
    finish(&state, &caller, "tenants.list", None, answer).await
}

/// `GET /admin/tenants/{id}/policy`.
pub(crate) async fn get_policy(State(state): State<Arc<AppState>>, caller: Caller, Path(id): Path<String>) -> Response {
    let answer = read_policy(&state, &caller, &id).await;
    finish(&state, &caller, "policy.read", Some(&id), answer).await
}

async fn read_policy(state: &AppState, caller: &Caller, id: &str) -> Answer {
    require_admin(caller)?;
    let tenant = tenant_id(id)?;
    let set = state.policies.current();
    let Some(policy) = set.get(&tenant).cloned() else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_tenant", format!("no policy for `{tenant}`")).into());
    };
    let path = state.policies.dir().join(format!("{tenant}.toml"));
    let text = tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await;
    let text = match text {
        Ok(Ok(t)) => Some(t),
        _ => None,
    };
    Ok((
        StatusCode::OK,
        json!({
            "tenant": tenant.as_str(),
            "sha256": policy.file_sha256,
            "file": text,
            "effective": effective(&policy),
        }),
    ))
}

/// `PUT /admin/tenants/{id}/policy` with the tenant file as the body.
pub(crate) async fn put_policy(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let answer = write_policy(&state, &caller, &id, body).await;
    finish(&state, &caller, "policy.write", Some(&id), answer).await
}

async fn write_policy(state: &AppState, caller: &Caller, id: &str, body: Bytes) -> Answer {
    require_admin(caller)?;
    let tenant = tenant_id(id)?;
    if body.len() > MAX_POLICY_BYTES {
        let m = format!("a policy file is at most {MAX_POLICY_BYTES} bytes");
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m).into());
    }
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "the policy must be UTF-8 TOML"))?;
    match state.reloader.put_tenant(&tenant, text, &caller.trigger("put")).await {
        Ok(r) => {
            let sha = state.policies.current().get(&tenant).map(|p| p.file_sha256.clone());
            Ok((
                StatusCode::OK,
                json!({"tenant": tenant.as_str(), "sha256": sha, "changed_tenants": r.changed_tenants}),
            ))
        }
        Err(PutError::Invalid(errors)) => Err(Refusal::Invalid(errors)),
        Err(PutError::Write(e)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "write_failed",
            format!("the policy file could not be written: {e}"),
        )
        .into()),
    }
}

/// `POST /admin/policies/reload`.
pub(crate) async fn reload(State(state): State<Arc<AppState>>, caller: Caller) -> Response {
    let answer = async {
        require_admin(&caller)?;
        match state.reloader.reload(&caller.trigger("reload")).await {
            Ok(r) => Ok((StatusCode::OK, json!({"changed_tenants": r.changed_tenants, "files": r.files}))),
            Err(errors) => Err(Refusal::Invalid(errors)),
        }
    }
    .await;
    finish(&state, &caller, "policies.reload", None, answer).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SessionParams {
    tenant: Option<String>,
}

/// `GET /admin/sessions?tenant=…`.
pub(crate) async fn sessions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    params: Result<Query<SessionParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let answer = (|| {
        require_admin(&caller)?;
        let Query(p) = params.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
        let tenant = p.tenant.as_deref().map(tenant_id).transpose()?;
        let list = state.hub.list_sessions(tenant.as_ref());
        Ok((StatusCode::OK, json!({ "sessions": list })))
    })();
    finish(&state, &caller, "sessions.list", None, answer).await
}

/// `DELETE /admin/sessions/{id}`: close 4003 `kicked`.
pub(crate) async fn kick(State(state): State<Arc<AppState>>, caller: Caller, Path(id): Path<String>) -> Response {
    let answer = (|| {
        require_admin(&caller)?;
        match state.hub.close_session(&id, CloseReason::Kicked) {
            Some(conn) => Ok((
                StatusCode::OK,
                json!({"session_id": id, "tenant": conn.tenant.as_str(), "subject": &*conn.subject, "closing": true}),
            )),
            None => {
                Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_session", format!("no live session `{id}`")).into())
            }
        }
    })();
    finish(&state, &caller, "session.kick", Some(&id), answer).await
}

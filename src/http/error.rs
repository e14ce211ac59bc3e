//! The one place where failures become HTTP answers: a status, a stable JSON body
//! `{"code","message"}`, and for token failures the RFC 6750 `WWW-Authenticate` header.
//! Internal details never reach the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::auth::AuthError;

/// An HTTP error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// `Retry-After` seconds (503 `overloaded`).
    pub retry_after: Option<u64>,
    /// RFC 6750 challenge, for 401 and 403 on bearer-protected routes.
    pub challenge: Option<String>,
    /// For a publish that failed part-way: per event, its id when it was stored.
    pub message_ids: Option<Vec<Option<String>>>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_ids: Option<&'a [Option<String>]>,
}

impl ApiError {
    /// An error without extra headers.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None, challenge: None, message_ids: None }
    }

    /// 429 `rate_limited` with `Retry-After`.
    pub fn rate_limited(retry_after_secs: u64, message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(retry_after_secs.max(1)),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    /// 403 for a valid token that lacks a role.
    pub fn insufficient_role(role: &str) -> ApiError {
        let message = format!("the token lacks the role `{role}`");
        ApiError {
            challenge: Some(format!(
                "Bearer realm=\"incident-stream\", error=\"insufficient_scope\", error_description=\"{message}\""
            )),
            ..ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
        }
    }
}

fn quote_safe(s: &str) -> String {
    s.chars().filter(|c| *c != '"' && *c != '\\' && !c.is_control()).collect()
}

impl From<&AuthError> for ApiError {
    fn from(e: &AuthError) -> ApiError {
        let message = e.to_string();
        let challenge = match e {
            // RFC 6750 §3.1: no error code when the request carried no token.
            AuthError::Missing => "Bearer realm=\"incident-stream\"".to_owned(),
            _ => format!(
                "Bearer realm=\"incident-stream\", error=\"invalid_token\", error_description=\"{}\"",
                quote_safe(&message)
            ),
        };
        ApiError { challenge: Some(challenge), ..ApiError::new(StatusCode::UNAUTHORIZED, e.code(), message) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(Body { code: self.code, message: &self.message, message_ids: self.message_ids.as_deref() }),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(c) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, c);
        }
        resp
    }
}

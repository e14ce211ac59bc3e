//! The catalogues of error codes and close codes: stable, snake_case on the wire, one doc line
//! each saying what the client should do. PROTOCOL.md mirrors this file.

use serde::Serialize;

/// Codes of `error` messages. The connection stays open after every one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, a wrong field type, a missing or unknown field. Fix the client.
    InvalidMessage,
    /// The `type` is not one of the client message types. Fix the client.
    UnknownType,
    /// A filter names an unknown event type, severity or state, or is larger than allowed.
    InvalidFilter,
    /// A filter names a mandatory label with another value. Never retried with success.
    ForbiddenFilter,
    /// A subscription with this id already exists on the connection.
    DuplicateSubscription,
    /// No subscription with this id exists on the connection.
    UnknownSubscription,
    /// The connection holds the maximum number of subscriptions.
    TooManySubscriptions,
    /// The client sends messages faster than allowed; slow down (persisting closes with 4029).
    RateLimited,
    /// The requested `resume_from` position cannot be served.
    ResumeUnavailable,
    /// A `refresh` token is invalid or belongs to another tenant or subject.
    TokenInvalid,
    /// The request is valid protocol v1 but this server does not support it yet.
    NotSupported,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidFilter => "invalid_filter",
            ErrorCode::ForbiddenFilter => "forbidden_filter",
            ErrorCode::DuplicateSubscription => "duplicate_subscription",
            ErrorCode::UnknownSubscription => "unknown_subscription",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ResumeUnavailable => "resume_unavailable",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::NotSupported => "not_supported",
        }
    }
}

/// WebSocket close codes the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure (an idle session). Reconnect when needed.
    Normal,
    /// 1001: the server is shutting down. Reconnect after `reconnect_after_ms`.
    GoingAway,
    /// 1002: the client broke the WebSocket framing rules. Fix the client.
    ProtocolError,
    /// 1007: a text message or close reason that is not UTF-8. Fix the client.
    InvalidPayload,
    /// 1008: policy violation. Do not reconnect unchanged.
    PolicyViolation,
    /// 1009: a frame larger than `max_frame_bytes`. Do not resend it.
    MessageTooBig,
    /// 1011: internal server error. Reconnect with backoff.
    InternalError,
    /// 4001: the session's token expired. Reconnect with a fresh token.
    TokenExpired,
    /// 4002: no pong within the heartbeat interval. Reconnect with backoff.
    HeartbeatTimeout,
    /// 4003: access revoked (tenant disabled, subject or token revoked, kicked, wrong refresh).
    AccessRevoked,
    /// 4008: slow consumer: the connection fell too far behind. Reconnect (and resume).
    SlowConsumer,
    /// 4029: persistent rate-limit violation. Reconnect later, sending less.
    RateLimited,
}

impl CloseCode {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::TokenExpired => 4001,
            CloseCode::HeartbeatTimeout => 4002,
            CloseCode::AccessRevoked => 4003,
            CloseCode::SlowConsumer => 4008,
            CloseCode::RateLimited => 4029,
        }
    }
}

/// Why the server ends a session: decides the `closing` reason, the close code and whether a
/// reconnect delay is suggested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The server is shutting down; reconnect after the given delay.
    Shutdown {
        /// Suggested delay before reconnecting, spread per session to avoid a stampede.
        reconnect_after_ms: u64,
    },
    /// No subscription and no client message for `session_timeout_secs`.
    IdleTimeout,
    /// No pong (or any frame) within a heartbeat interval after a ping.
    HeartbeatTimeout,
    /// The outbound queue overflowed past the limit.
    SlowConsumer,
    /// The client kept sending past its rate limit.
    RateLimited,
    /// The token expired without a refresh.
    TokenExpired,
    /// A refresh named another tenant or subject.
    RefreshMismatch,
    /// A policy reload disabled the tenant (or removed its policy).
    TenantDisabled,
    /// A policy reload revoked the session's subject.
    SubjectRevoked,
    /// A policy reload revoked the session's token.
    TokenRevoked,
    /// A policy reload changed the tenant's mandatory labels: reconnect to get the new ones.
    PolicyChanged,
    /// An admin ended the session (`DELETE /admin/sessions/{id}`).
    Kicked,
    /// A policy reload removed the browser origin the session connected from.
    OriginNotAllowed,
    /// A frame exceeded `max_frame_bytes`.
    FrameTooLarge,
    /// The client broke the WebSocket framing rules (unmasked frame, reserved bits, bad opcode…).
    ProtocolViolation,
    /// A text message that is not valid UTF-8.
    InvalidUtf8,
    /// The server failed internally for this session.
    Internal,
}

impl CloseReason {
    /// The `reason` of the `closing` message and of the close frame.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Shutdown { .. } => "server_shutdown",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RefreshMismatch => "token_invalid",
            CloseReason::TenantDisabled => "tenant_disabled",
            CloseReason::SubjectRevoked => "subject_revoked",
            CloseReason::TokenRevoked => "token_revoked",
            CloseReason::PolicyChanged => "policy_changed",
            CloseReason::Kicked => "kicked",
            CloseReason::OriginNotAllowed => "origin_not_allowed",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::ProtocolViolation => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::Internal => "internal_error",
        }
    }

    /// The close code sent with this reason.
    pub fn close_code(self) -> CloseCode {
        match self {
            CloseReason::Shutdown { .. } => CloseCode::GoingAway,
            CloseReason::IdleTimeout => CloseCode::Normal,
            CloseReason::HeartbeatTimeout => CloseCode::HeartbeatTimeout,
            CloseReason::SlowConsumer => CloseCode::SlowConsumer,
            CloseReason::RateLimited => CloseCode::RateLimited,
            CloseReason::TokenExpired => CloseCode::TokenExpired,
            CloseReason::RefreshMismatch
            | CloseReason::TenantDisabled
            | CloseReason::SubjectRevoked
            | CloseReason::TokenRevoked
            | CloseReason::PolicyChanged
            | CloseReason::Kicked
            | CloseReason::OriginNotAllowed => CloseCode::AccessRevoked,
            CloseReason::FrameTooLarge => CloseCode::MessageTooBig,
            CloseReason::ProtocolViolation => CloseCode::ProtocolError,
            CloseReason::InvalidUtf8 => CloseCode::InvalidPayload,
            CloseReason::Internal => CloseCode::InternalError,
        }
    }

    /// The suggested reconnect delay, if any.
    pub fn reconnect_after_ms(self) -> Option<u64> {
        match self {
            CloseReason::Shutdown { reconnect_after_ms } => Some(reconnect_after_ms),
            _ => None,
        }
    }
}

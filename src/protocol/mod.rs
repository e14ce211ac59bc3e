//! Wire protocol v1: every frame is a JSON text with a `type` field.
//!
//! Client frames are parsed once into [`ClientMessage`]; anything else is a [`ProtocolError`] with
//! a stable [`ErrorCode`] (unknown `type` → `unknown_type`; not JSON, wrong field type, missing or
//! unknown field → `invalid_message`). Server frames are [`ServerMessage`]s, except events, whose
//! frame is built once per event by [`encode_event`] and shared by every receiving connection.
//! This module is pure: no sockets, no clocks.

mod codes;

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use codes::{CloseCode, CloseReason, ErrorCode};

/// The protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u8 = 1;

/// The subprotocol a browser offers (beside `bearer.<token>`); the only one the server selects.
pub const SUBPROTOCOL: &str = "incident-stream.v1";

/// Longest subscription id, in bytes.
pub const MAX_SUBSCRIPTION_ID_BYTES: usize = 128;

/// A subscription filter in wire form. Every field is optional; see [`crate::filter`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterSpec {
    /// Event types (OR).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// Severities P0–P4 (OR).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub severities: Vec<String>,
    /// Incident states (OR).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<String>,
    /// Sources (OR).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// Affected resources (any overlap).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub affected_resources: Vec<String>,
    /// Labels (every pair must match exactly).
    pub labels: BTreeMap<String, String>,
    /// Incident ids (OR).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub incident_ids: Vec<String>,
}

/// `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    /// Client-chosen id, unique on the connection.
    pub subscription_id: String,
    /// The filter; absent means "everything the session may see".
    #[serde(default)]
    pub filters: FilterSpec,
    /// Replay from after this message id.
    #[serde(default)]
    pub resume_from: Option<String>,
}

/// `unsubscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribe {
    /// The id given to `subscribe`.
    pub subscription_id: String,
}

/// `ping` (application level).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    /// Echoed unchanged in `pong`.
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// `ack`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The last message id the client has processed.
    pub message_id: String,
}

/// `refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    /// A new token for the same tenant and subject.
    pub token: String,
}

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// Add a subscription.
    Subscribe(Subscribe),
    /// Remove a subscription.
    Unsubscribe(Unsubscribe),
    /// Application-level ping.
    Ping(Ping),
    /// Acknowledge processed events.
    Ack(Ack),
    /// Extend the session with a new token.
    Refresh(Refresh),
}

/// A client frame that could not be parsed: answered with `error` and the connection stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProtocolError {
    /// The error code sent to the client.
    pub code: ErrorCode,
    /// A human-readable explanation (never echoes more than a short prefix of input).
    pub message: String,
    /// The subscription the frame was about, when it could be read.
    pub subscription_id: Option<String>,
}

impl ProtocolError {
    fn invalid(message: impl Into<String>) -> ProtocolError {
        ProtocolError { code: ErrorCode::InvalidMessage, message: message.into(), subscription_id: None }
    }
}

fn body<T: DeserializeOwned>(ty: &str, map: Map<String, Value>) -> Result<T, ProtocolError> {
    let sub = map.get("subscription_id").and_then(Value::as_str).map(str::to_owned);
    serde_json::from_value(Value::Object(map)).map_err(|e| ProtocolError {
        code: ErrorCode::InvalidMessage,
        message: format!("invalid `{ty}` message: {e}"),
        subscription_id: sub,
    })
}

fn check_subscription_id(id: &str) -> Result<(), ProtocolError> {
    if id.is_empty() || id.len() > MAX_SUBSCRIPTION_ID_BYTES {
        return Err(ProtocolError::invalid(format!("subscription_id must be 1 to {MAX_SUBSCRIPTION_ID_BYTES} bytes")));
    }
    Ok(())
}

impl ClientMessage {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<ClientMessage, ProtocolError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ProtocolError::invalid(format!("not valid JSON: {e}")))?;
        let Value::Object(mut map) = value else {
            return Err(ProtocolError::invalid("a message must be a JSON object"));
        };
        let ty = match map.remove("type") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(ProtocolError::invalid("field `type` must be a string")),
            None => return Err(ProtocolError::invalid("missing field `type`")),
        };
        let msg = match ty.as_str() {
            "subscribe" => {
                let s: Subscribe = body(&ty, map)?;
                check_subscription_id(&s.subscription_id)?;
                ClientMessage::Subscribe(s)
            }
            "unsubscribe" => {
                let u: Unsubscribe = body(&ty, map)?;
                check_subscription_id(&u.subscription_id)?;
                ClientMessage::Unsubscribe(u)
            }
            "ping" => ClientMessage::Ping(body(&ty, map)?),
            "ack" => ClientMessage::Ack(body(&ty, map)?),
            "refresh" => ClientMessage::Refresh(body(&ty, map)?),
            other => {
                return Err(ProtocolError {
                    code: ErrorCode::UnknownType,
                    message: format!("unknown message type `{}`", other.chars().take(64).collect::<String>()),
                    subscription_id: None,
                })
            }
        };
        Ok(msg)
    }
}

/// Server frames other than `event`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// First frame of every session.
    Welcome {
        /// Unique id of this session (also in logs and, later, the audit log).
        session_id: String,
        /// Server clock, RFC 3339 UTC.
        server_time: String,
        /// The tenant of the token.
        tenant: String,
        /// The subject of the token.
        subject: String,
        /// When the session's token expires, RFC 3339 UTC.
        expires_at: String,
        /// Interval of the server's WebSocket pings.
        heartbeat_interval_secs: u64,
        /// Always 1.
        protocol: u8,
    },
    /// A subscription was added; `filters` is the effective filter.
    Subscribed {
        /// The client's id.
        subscription_id: String,
        /// Effective filter, mandatory labels included.
        filters: FilterSpec,
    },
    /// A subscription was removed.
    Unsubscribed {
        /// The client's id.
        subscription_id: String,
    },
    /// Answer to `ping`.
    Pong {
        /// The client's timestamp, unchanged (server time if the ping had none).
        timestamp: String,
    },
    /// Answer to a good `refresh`.
    Refreshed {
        /// The new expiry, RFC 3339 UTC.
        expires_at: String,
    },
    /// Events were dropped for this connection.
    Lagged {
        /// How many events were dropped since the last `lagged`.
        dropped: u64,
        /// The id of the first dropped event.
        since_message_id: String,
        /// The last event written to this connection before the loss: subscribing again with
        /// `resume_from` set to it replays the lost events (absent when none was written yet).
        #[serde(skip_serializing_if = "Option::is_none")]
        resume_from: Option<String>,
    },
    /// A client error; the connection stays open.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Explanation.
        message: String,
        /// The subscription concerned, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        subscription_id: Option<String>,
        /// With `resume_unavailable`: the oldest message id still retained for the tenant
        /// (`null` when none is).
        #[serde(skip_serializing_if = "Option::is_none")]
        oldest_message_id: Option<Option<String>>,
    },
    /// Sent before every server-initiated close.
    Closing {
        /// Why.
        reason: &'static str,
        /// Suggested delay before reconnecting.
        #[serde(skip_serializing_if = "Option::is_none")]
        reconnect_after_ms: Option<u64>,
    },
}

impl ServerMessage {
    /// Serializes the frame. Serialization of these plain types cannot fail; should it ever, the
    /// frame degrades to a fixed internal-error message rather than panicking.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"invalid_message","message":"internal encoding error"}"#.to_owned()
        })
    }

    /// The `error` frame for a protocol error.
    pub fn from_error(e: ProtocolError) -> ServerMessage {
        ServerMessage::Error {
            code: e.code,
            message: e.message,
            subscription_id: e.subscription_id,
            oldest_message_id: None,
        }
    }
}

/// Builds the `event` frame once per event:
/// `{"type":"event","message_id":…,"timestamp":…,"event":{…}}`, around the event object already
/// serialized as JSON. `message_id` and `timestamp` are JSON-escaped here.
pub fn encode_event(message_id: &str, timestamp: &str, event_json: &str) -> Bytes {
    let id = Value::String(message_id.to_owned());
    let ts = Value::String(timestamp.to_owned());
    let mut out = String::with_capacity(event_json.len() + message_id.len() + timestamp.len() + 64);
    out.push_str(r#"{"type":"event","message_id":"#);
    out.push_str(&id.to_string());
    out.push_str(r#","timestamp":"#);
    out.push_str(&ts.to_string());
    out.push_str(r#","event":"#);
    out.push_str(event_json);
    out.push('}');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code_of(text: &str) -> ErrorCode {
        ClientMessage::parse(text).expect_err("must fail").code
    }

    #[test]
    fn parses_every_client_message() {
        let m = ClientMessage::parse(
            r#"{"type":"subscribe","subscription_id":"s1","filters":{"event_types":["escalated"],"labels":{"a":"b"}}}"#,
        )
        .expect("ok");
        match m {
            ClientMessage::Subscribe(s) => {
                assert_eq!(s.subscription_id, "s1");
                assert_eq!(s.filters.event_types, vec!["escalated"]);
                assert_eq!(s.resume_from, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"subscribe","subscription_id":"s1"}"#),
            Ok(ClientMessage::Subscribe(_))
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"unsubscribe","subscription_id":"s1"}"#),
            Ok(ClientMessage::Unsubscribe(_))
        ));
        assert_eq!(
            ClientMessage::parse(r#"{"type":"ping","timestamp":"2025-11-12T10:40:00Z"}"#).expect("ok"),
            ClientMessage::Ping(Ping { timestamp: Some("2025-11-12T10:40:00Z".into()) })
        );
        assert!(matches!(ClientMessage::parse(r#"{"type":"ack","message_id":"1-2"}"#), Ok(ClientMessage::Ack(_))));
        assert!(matches!(ClientMessage::parse(r#"{"type":"refresh","token":"x"}"#), Ok(ClientMessage::Refresh(_))));
    }

    #[test]
    fn bad_frames_get_the_listed_codes() {
        use ErrorCode::*;
        let cases = [
            ("not json", InvalidMessage),
            ("[1,2]", InvalidMessage),
            (r#"{"subscription_id":"s"}"#, InvalidMessage),
            (r#"{"type":7}"#, InvalidMessage),
            (r#"{"type":"subscribe"}"#, InvalidMessage),
            (r#"{"type":"subscribe","subscription_id":5}"#, InvalidMessage),
            (r#"{"type":"subscribe","subscription_id":""}"#, InvalidMessage),
            (r#"{"type":"subscribe","subscription_id":"s","extra":1}"#, InvalidMessage),
            (r#"{"type":"subscribe","subscription_id":"s","filters":{"severity":["P0"]}}"#, InvalidMessage),
            (r#"{"type":"subscribe","subscription_id":"s","filters":{"severities":"P0"}}"#, InvalidMessage),
            (r#"{"type":"ping","timestamp":5}"#, InvalidMessage),
            (r#"{"type":"ack"}"#, InvalidMessage),
            (r#"{"type":"publish"}"#, UnknownType),
            (r#"{"type":"Subscribe","subscription_id":"s"}"#, UnknownType),
        ];
        for (text, code) in cases {
            assert_eq!(code_of(text), code, "{text}");
        }
        let e = ClientMessage::parse(r#"{"type":"subscribe","subscription_id":"s9","bogus":true}"#).expect_err("bad");
        assert_eq!(e.subscription_id.as_deref(), Some("s9"));
    }

    #[test]
    fn server_messages_have_the_documented_shape() {
        let v: Value = serde_json::from_str(
            &ServerMessage::Error {
                code: ErrorCode::InvalidFilter,
                message: "m".into(),
                subscription_id: None,
                oldest_message_id: None,
            }
            .to_text(),
        )
        .expect("json");
        assert_eq!(v, json!({"type": "error", "code": "invalid_filter", "message": "m"}));
        let v: Value = serde_json::from_str(
            &ServerMessage::Closing { reason: "server_shutdown", reconnect_after_ms: Some(1500) }.to_text(),
        )
        .expect("json");
        assert_eq!(v, json!({"type": "closing", "reason": "server_shutdown", "reconnect_after_ms": 1500}));
        let v: Value = serde_json::from_str(
            &ServerMessage::Lagged { dropped: 3, since_message_id: "1-5".into(), resume_from: None }.to_text(),
        )
        .expect("json");
        assert_eq!(v, json!({"type": "lagged", "dropped": 3, "since_message_id": "1-5"}));
    }

    #[test]
    fn event_frames_have_the_seed_shape() {
        let mut ev = Map::new();
        ev.insert("event_type".into(), json!("incident_created"));
        ev.insert("incident".into(), json!({"id": "x"}));
        let frame = encode_event("1-1", "2025-11-12T10:35:00Z", &Value::Object(ev).to_string());
        let v: Value = serde_json::from_slice(&frame).expect("json");
        assert_eq!(
            v,
            json!({"type": "event", "message_id": "1-1", "timestamp": "2025-11-12T10:35:00Z",
                   "event": {"event_type": "incident_created", "incident": {"id": "x"}}})
        );
    }
}

//! Audit records and their place in the hash chain: the kinds, the fields, the canonical
//! serialization that is hashed, and sealing a record into its line. Pure: no files, no clock.
//!
//! A line is the canonical JSON of the record (object keys sorted, no whitespace) with `seq`,
//! `ts`, `prev` (the previous record's hash) and `hash`, where `hash` is the SHA-256 of the
//! canonical JSON of everything but `hash`. Sorting keys makes the hash independent of how a
//! reader re-serializes a parsed line, so any JSON tool can recompute it.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev` of the very first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened. The metric `audit_records_total{kind}` is labelled with these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A WebSocket upgrade was accepted (the record is written before the 101 is sent).
    ConnectionAccepted,
    /// A request was refused before the upgrade (bad token, tenant, capacity, audit down, …).
    ConnectionRejected,
    /// A session ended: close code and reason, duration, counts.
    ConnectionClosed,
    /// A subscription was created, with its effective filters.
    SubscriptionCreated,
    /// A subscription was refused, with the error code.
    SubscriptionRejected,
    /// A subscription was removed.
    SubscriptionRemoved,
    /// A session presented a new token (`result`: `ok` or `refused`).
    TokenRefreshed,
    /// A rate limit started refusing a client.
    RateLimitTripped,
    /// Tenant policies were loaded or reloaded.
    PolicyReloaded,
    /// A policy edit was refused as a whole.
    PolicyRejected,
    /// An admin API call.
    AdminAction,
}

impl Kind {
    /// Every kind (metric labels are registered at zero from this list).
    pub const ALL: [Kind; 11] = [
        Kind::ConnectionAccepted,
        Kind::ConnectionRejected,
        Kind::ConnectionClosed,
        Kind::SubscriptionCreated,
        Kind::SubscriptionRejected,
        Kind::SubscriptionRemoved,
        Kind::TokenRefreshed,
        Kind::RateLimitTripped,
        Kind::PolicyReloaded,
        Kind::PolicyRejected,
        Kind::AdminAction,
    ];

    /// The `kind` field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ConnectionAccepted => "connection.accepted",
            Kind::ConnectionRejected => "connection.rejected",
            Kind::ConnectionClosed => "connection.closed",
            Kind::SubscriptionCreated => "subscription.created",
            Kind::SubscriptionRejected => "subscription.rejected",
            Kind::SubscriptionRemoved => "subscription.removed",
            Kind::TokenRefreshed => "token.refreshed",
            Kind::RateLimitTripped => "rate_limit.tripped",
            Kind::PolicyReloaded => "policy.reloaded",
            Kind::PolicyRejected => "policy.rejected",
            Kind::AdminAction => "admin.action",
        }
    }

    /// The kind with this name.
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// Fields every record has (`null` when not known for this record).
pub const COMMON_FIELDS: [&str; 13] = [
    "seq",
    "ts",
    "kind",
    "session_id",
    "tenant",
    "subject",
    "token_id",
    "remote_addr",
    "user_agent",
    "origin",
    "reason",
    "prev",
    "hash",
];

/// Longest `user_agent` or `origin` kept; longer values are cut (client input, bounded).
const MAX_CLIENT_FIELD: usize = 256;

/// A fact to record, before it has a place in the chain.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    /// What happened (`None` only in `Default`; every constructor sets it).
    kind: Option<Kind>,
    /// The common fields, by name (only those that are known).
    common: Map<String, Value>,
    /// Kind-specific fields (`close_code`, `filters`, …), flattened into the line.
    fields: Map<String, Value>,
}

impl Record {
    /// A record of this kind with every common field unknown.
    pub fn new(kind: Kind) -> Record {
        Record { kind: Some(kind), ..Record::default() }
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind.unwrap_or(Kind::AdminAction)
    }

    fn set_common(mut self, key: &'static str, value: Option<impl Into<String>>) -> Record {
        match value {
            Some(v) => {
                self.common.insert(key.to_owned(), Value::String(v.into()));
            }
            None => {
                self.common.remove(key);
            }
        }
        self
    }

    /// `session_id`.
    pub fn session(self, id: impl Into<String>) -> Record {
        self.set_common("session_id", Some(id))
    }
    /// `tenant`.
    pub fn tenant(self, tenant: impl Into<String>) -> Record {
        self.set_common("tenant", Some(tenant))
    }
    /// `subject`.
    pub fn subject(self, subject: impl Into<String>) -> Record {
        self.set_common("subject", Some(subject))
    }
    /// `token_id` (`jti` or a short hash of the token; never the token).
    pub fn token_id(self, id: impl Into<String>) -> Record {
        self.set_common("token_id", Some(id))
    }
    /// `remote_addr`.
    pub fn remote(self, addr: impl std::fmt::Display) -> Record {
        self.set_common("remote_addr", Some(addr.to_string()))
    }
    /// `user_agent` (cut to a bounded length).
    pub fn user_agent(self, ua: Option<&str>) -> Record {
        self.set_common("user_agent", ua.map(bounded))
    }
    /// `origin` (cut to a bounded length).
    pub fn origin(self, origin: Option<&str>) -> Record {
        self.set_common("origin", origin.map(bounded))
    }
    /// `reason`: a stable code.
    pub fn reason(self, reason: impl Into<String>) -> Record {
        self.set_common("reason", Some(reason))
    }

    /// A kind-specific field. Common field names are refused (they would be overwritten).
    pub fn field(mut self, key: &'static str, value: impl Into<Value>) -> Record {
        debug_assert!(!COMMON_FIELDS.contains(&key), "`{key}` is a common field");
        if !COMMON_FIELDS.contains(&key) {
            self.fields.insert(key.to_owned(), value.into());
        }
        self
    }

    /// A common or kind-specific field's value, if set.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.common.get(key).or_else(|| self.fields.get(key))
    }
}

fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_CLIENT_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// A record with its place in the chain: the line to write (without newline) and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The canonical JSON line.
    pub line: String,
    /// Its `hash`.
    pub hash: String,
}

/// Gives a record its sequence number, timestamp and link to the previous record.
pub fn seal(record: &Record, seq: u64, ts: &str, prev: &str) -> Sealed {
    let mut obj = Map::new();
    for key in COMMON_FIELDS {
        obj.insert(key.to_owned(), Value::Null);
    }
    for (k, v) in &record.fields {
        obj.insert(k.clone(), v.clone());
    }
    for (k, v) in &record.common {
        obj.insert(k.clone(), v.clone());
    }
    obj.insert("seq".into(), seq.into());
    obj.insert("ts".into(), ts.into());
    obj.insert("kind".into(), record.kind().as_str().into());
    obj.insert("prev".into(), prev.into());
    obj.remove("hash");
    let hash = hash_of(&obj);
    obj.insert("hash".into(), hash.clone().into());
    Sealed { line: canonical(&Value::Object(obj)), hash }
}

/// The SHA-256 (lowercase hex) of the canonical JSON of `obj`, which must not hold `hash`.
pub fn hash_of(obj: &Map<String, Value>) -> String {
    let digest = Sha256::digest(canonical_object(obj).as_bytes());
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        hex.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
    }
    hex
}

/// JSON with object keys sorted and no whitespace.
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn canonical_object(obj: &Map<String, Value>) -> String {
    let mut out = String::new();
    write_object(obj, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => write_object(m, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        // Scalars serialize the same whichever way they were built or parsed.
        other => out.push_str(&other.to_string()),
    }
}

fn write_object(m: &Map<String, Value>, out: &mut String) {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    out.push('{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        if let Some(v) = m.get(k) {
            write_canonical(v, out);
        }
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Map<String, Value> {
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => m,
            other => panic!("not an object: {other:?}"),
        }
    }

    #[test]
    fn a_sealed_line_has_every_common_field_and_a_hash_over_the_rest() {
        let r = Record::new(Kind::ConnectionClosed)
            .session("s1")
            .tenant("acme")
            .subject("alice")
            .reason("client_closed")
            .field("close_code", 1000)
            .field("duration_ms", 1234);
        let s = seal(&r, 7, "2026-12-01T00:00:00.000001Z", GENESIS);
        let mut m = parse(&s.line);
        for key in COMMON_FIELDS {
            assert!(m.contains_key(key), "{key} missing in {}", s.line);
        }
        assert_eq!(m["seq"], 7);
        assert_eq!(m["kind"], "connection.closed");
        assert_eq!(m["user_agent"], Value::Null);
        assert_eq!(m["close_code"], 1000);
        assert_eq!(m.remove("hash"), Some(Value::String(s.hash.clone())));
        assert_eq!(hash_of(&m), s.hash);
        assert_eq!(s.hash.len(), 64);
    }

    #[test]
    fn the_hash_covers_prev_and_every_field() {
        let r = Record::new(Kind::SubscriptionCreated).tenant("acme");
        let a = seal(&r, 1, "t", GENESIS);
        assert_ne!(a.hash, seal(&r, 1, "t", &a.hash).hash, "prev is hashed");
        assert_ne!(a.hash, seal(&r, 2, "t", GENESIS).hash, "seq is hashed");
        assert_ne!(a.hash, seal(&r.clone().tenant("acmf"), 1, "t", GENESIS).hash, "fields are hashed");
        assert_eq!(a, seal(&r, 1, "t", GENESIS), "sealing is deterministic");
    }

    #[test]
    fn canonical_form_does_not_depend_on_key_order_or_spacing() {
        let a: Value = serde_json::from_str(r#"{"b": [1, {"y": 2, "x": "é\n"}], "a": null}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{"a":null,"b":[1,{"x":"é\n","y":2}]}"#).expect("json");
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(canonical(&a), r#"{"a":null,"b":[1,{"x":"é\n","y":2}]}"#);
    }

    #[test]
    fn a_reparsed_line_reserializes_to_itself() {
        let r = Record::new(Kind::SubscriptionCreated)
            .user_agent(Some("curl/8 \"quoted\" \u{1}"))
            .field("filters", serde_json::json!({"labels": {"tenant": "acme"}, "event_types": ["x"]}));
        let s = seal(&r, 3, "t", GENESIS);
        assert_eq!(canonical(&serde_json::from_str(&s.line).expect("json")), s.line);
    }

    #[test]
    fn client_fields_are_bounded() {
        let long = "é".repeat(300);
        let r = Record::new(Kind::ConnectionAccepted).user_agent(Some(&long)).origin(None);
        let ua = r.get("user_agent").and_then(Value::as_str).expect("ua");
        assert!(ua.len() <= MAX_CLIENT_FIELD && long.starts_with(ua));
        assert!(r.get("origin").is_none());
    }

    #[test]
    fn kinds_round_trip_by_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("connection"), None);
    }
}

//! Domain types of an incident event: the 14 event types of the seed, severities, incident
//! states, the derived delivery priority, tenant ids and message ids.
//!
//! This module is pure: it parses and validates a published JSON object into an [`Event`]
//! whose routing fields are typed (so filters never look at strings twice), and keeps the
//! object itself so subscribers receive exactly what the producer sent (plus the tenant the
//! server stamped on it). It knows nothing of sockets, tokens or the bus.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde_json::{Map, Value};

/// Declares a closed set of wire names as an enum with `as_str`, `FromStr`, `ALL` and a bit index,
/// so filters can hold a set of them as a bit mask.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name used on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            /// A bit unique to this value, for set membership in filters.
            pub(crate) fn bit(self) -> u32 {
                1u32 << (self as u32)
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(UnknownName { kind: stringify!($name), value: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// A name that is not one of a closed set (event type, severity, state).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownName {
    /// Which set the name was looked up in.
    pub kind: &'static str,
    /// The name as received.
    pub value: String,
}

wire_enum! {
    /// The 14 event types of the seed protocol.
    EventType {
        IncidentCreated => "incident_created",
        IncidentUpdated => "incident_updated",
        IncidentResolved => "incident_resolved",
        IncidentClosed => "incident_closed",
        AlertReceived => "alert_received",
        AlertConverted => "alert_converted",
        Escalated => "escalated",
        PlaybookStarted => "playbook_started",
        PlaybookActionExecuted => "playbook_action_executed",
        PlaybookCompleted => "playbook_completed",
        NotificationSent => "notification_sent",
        AssignmentChanged => "assignment_changed",
        CommentAdded => "comment_added",
        SystemEvent => "system_event",
    }
}

wire_enum! {
    /// Incident severity, P0 (most severe) to P4.
    Severity { P0 => "P0", P1 => "P1", P2 => "P2", P3 => "P3", P4 => "P4" }
}

wire_enum! {
    /// Incident lifecycle state.
    IncidentState {
        Detected => "Detected",
        Triaged => "Triaged",
        Investigating => "Investigating",
        Remediating => "Remediating",
        Resolved => "Resolved",
        Closed => "Closed",
    }
}

/// Delivery priority, derived from an event; decides what a lagging connection sheds first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// P4 events and events that carry no severity (informational).
    Low = 0,
    /// P2 and P3.
    Normal = 1,
    /// P1.
    High = 2,
    /// P0 and every `escalated` event: never shed.
    Critical = 3,
}

impl Priority {
    /// Number of priority levels.
    pub const COUNT: usize = 4;

    /// Derives the priority: P0 or `escalated` → critical, P1 → high, P2/P3 → normal,
    /// P4 or no severity (informational) → low.
    pub fn derive(event_type: EventType, severity: Option<Severity>) -> Priority {
        if event_type == EventType::Escalated {
            return Priority::Critical;
        }
        match severity {
            Some(Severity::P0) => Priority::Critical,
            Some(Severity::P1) => Priority::High,
            Some(Severity::P2 | Severity::P3) => Priority::Normal,
            Some(Severity::P4) | None => Priority::Low,
        }
    }

    /// The name used in logs and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }
}

/// A tenant identifier: 1 to 64 characters of `[A-Za-z0-9_-]`, so it is safe in file names,
/// metric labels and broker subjects. Cheap to clone (shared string).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

/// A string that is not a valid tenant id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a valid tenant id (1-64 characters of A-Z, a-z, 0-9, '_' or '-')")]
pub struct InvalidTenant(pub String);

impl TenantId {
    /// Validates and wraps a tenant id.
    pub fn new(s: &str) -> Result<TenantId, InvalidTenant> {
        let ok =
            !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(TenantId(Arc::from(s)))
        } else {
            Err(InvalidTenant(s.chars().take(80).collect()))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's shared string (no copy: labels and filters hold the tenant's own).
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies one published event: the bus epoch it was published in and its sequence number
/// within that epoch. Sequence numbers grow with publish order, so ids are ordered within a
/// tenant. On the wire: `"<epoch>-<seq>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// Changes whenever the bus loses its history (e.g. a restart of the local bus).
    pub epoch: u64,
    /// Position in the epoch, starting at 1.
    pub seq: u64,
}

/// A string that is not a message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a message id (expected <epoch>-<seq>)")]
pub struct InvalidMessageId(pub String);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

impl FromStr for MessageId {
    type Err = InvalidMessageId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidMessageId(s.chars().take(80).collect());
        let (epoch, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(MessageId { epoch: epoch.parse().map_err(|_| bad())?, seq: seq.parse().map_err(|_| bad())? })
    }
}

/// Why a published object is not a valid event. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The event is not a JSON object.
    #[error("an event must be a JSON object")]
    NotAnObject,
    /// `event_type` is absent.
    #[error("missing field `event_type`")]
    MissingEventType,
    /// `event_type` is not one of the 14 types.
    #[error("unknown event_type `{0}`")]
    UnknownEventType(String),
    /// A routing field has the wrong JSON type.
    #[error("field `{field}` must be {expected}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// A routing field has a value outside its set (severity, state).
    #[error("field `{field}`: {source}")]
    BadValue {
        /// The field's name.
        field: &'static str,
        /// What was wrong.
        source: UnknownName,
    },
    /// The event names a tenant that is not a valid id.
    #[error("field `tenant`: {0}")]
    BadTenant(InvalidTenant),
    /// A label would override the server-set `tenant` label with another value.
    #[error("label `tenant` must equal the event's tenant")]
    TenantLabelMismatch,
}

impl EventError {
    /// Stable snake_case code for API answers.
    pub fn code(&self) -> &'static str {
        match self {
            EventError::NotAnObject | EventError::WrongType { .. } => "invalid_field",
            EventError::MissingEventType => "missing_event_type",
            EventError::UnknownEventType(_) => "unknown_event_type",
            EventError::BadValue { .. } => "invalid_value",
            EventError::BadTenant(_) => "invalid_tenant",
            EventError::TenantLabelMismatch => "tenant_mismatch",
        }
    }
}

/// The typed routing fields of an event: everything a filter reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// The tenant that owns the event.
    pub tenant: TenantId,
    /// One of the 14 types.
    pub event_type: EventType,
    /// P0–P4, when the event carries one.
    pub severity: Option<Severity>,
    /// Incident state, when the event carries one.
    pub state: Option<IncidentState>,
    /// The producing system, when given.
    pub source: Option<String>,
    /// Resources the event concerns (may be empty).
    pub affected_resources: Vec<String>,
    /// The incident the event belongs to, when given.
    pub incident_id: Option<String>,
    /// Labels, always including `tenant`.
    pub labels: BTreeMap<String, String>,
}

impl Routing {
    /// The delivery priority of the event.
    pub fn priority(&self) -> Priority {
        Priority::derive(self.event_type, self.severity)
    }
}

/// A validated event: typed routing plus the JSON object subscribers receive.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// What filters match on.
    pub routing: Routing,
    /// The object as published, with `tenant` and `labels.tenant` set by the server.
    pub body: Map<String, Value>,
}

/// Who the publisher is allowed to publish for; decided by the caller from the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantScope<'a> {
    /// The event belongs to this tenant; naming another one is refused.
    Bound(&'a TenantId),
    /// A `system` publisher: the event names its tenant, or falls back to the default.
    System(&'a TenantId),
}

/// Why an event was refused for its tenant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event names tenant `{named}` but the publisher is bound to `{bound}`")]
pub struct ForeignTenant {
    /// The tenant the event named.
    pub named: String,
    /// The tenant of the publisher.
    pub bound: String,
}

/// Either a malformed event or one for a tenant the publisher may not publish to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseEventError {
    /// The body is malformed.
    #[error(transparent)]
    Invalid(#[from] EventError),
    /// The body names another tenant.
    #[error(transparent)]
    Foreign(#[from] ForeignTenant),
}

fn opt_str<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<Option<&'a str>, EventError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(EventError::WrongType { field, expected: "a string" }),
    }
}

fn parse_named<T: FromStr<Err = UnknownName>>(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<T>, EventError> {
    opt_str(obj, field)?.map(|s| s.parse::<T>().map_err(|source| EventError::BadValue { field, source })).transpose()
}

impl Event {
    /// Validates one published JSON value. The tenant is decided by `scope`; the server sets
    /// `tenant` and `labels.tenant` in the body so every subscriber sees them.
    pub fn parse(value: Value, scope: TenantScope<'_>) -> Result<Event, ParseEventError> {
        let Value::Object(mut body) = value else {
            return Err(EventError::NotAnObject.into());
        };
        let event_type = match body.get("event_type") {
            None | Some(Value::Null) => return Err(EventError::MissingEventType.into()),
            Some(Value::String(s)) => {
                s.parse::<EventType>().map_err(|_| EventError::UnknownEventType(s.chars().take(80).collect()))?
            }
            Some(_) => return Err(EventError::WrongType { field: "event_type", expected: "a string" }.into()),
        };
        let named = opt_str(&body, "tenant")?;
        let tenant = match (scope, named) {
            (TenantScope::Bound(t), None) | (TenantScope::System(t), None) => t.clone(),
            (TenantScope::Bound(t), Some(n)) if n == t.as_str() => t.clone(),
            (TenantScope::Bound(t), Some(n)) => {
                return Err(ForeignTenant { named: n.chars().take(80).collect(), bound: t.to_string() }.into())
            }
            (TenantScope::System(_), Some(n)) => TenantId::new(n).map_err(EventError::BadTenant)?,
        };
        let severity = parse_named::<Severity>(&body, "severity")?;
        let state = parse_named::<IncidentState>(&body, "state")?;
        let source = opt_str(&body, "source")?.map(str::to_owned);
        let incident_id = opt_str(&body, "incident_id")?.map(str::to_owned);
        let affected_resources = match body.get("affected_resources") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(EventError::WrongType { field: "affected_resources", expected: "an array of strings" })?,
            Some(_) => {
                return Err(
                    EventError::WrongType { field: "affected_resources", expected: "an array of strings" }.into()
                )
            }
        };
        let mut labels = match body.get("labels") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect::<Option<BTreeMap<_, _>>>()
                .ok_or(EventError::WrongType { field: "labels", expected: "an object of string values" })?,
            Some(_) => {
                return Err(EventError::WrongType { field: "labels", expected: "an object of string values" }.into())
            }
        };
        match labels.get("tenant") {
            Some(l) if l != tenant.as_str() => return Err(EventError::TenantLabelMismatch.into()),
            _ => {}
        }
        labels.insert("tenant".to_owned(), tenant.as_str().to_owned());

        body.insert("tenant".to_owned(), Value::String(tenant.as_str().to_owned()));
        let label_obj = labels.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        body.insert("labels".to_owned(), Value::Object(label_obj));

        Ok(Event {
            routing: Routing { tenant, event_type, severity, state, source, affected_resources, incident_id, labels },
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn acme() -> TenantId {
        TenantId::new("acme").expect("valid")
    }

    #[test]
    fn all_fourteen_event_types_round_trip() {
        assert_eq!(EventType::ALL.len(), 14);
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(*t));
        }
        assert!("incident_deleted".parse::<EventType>().is_err());
    }

    #[test]
    fn priority_is_derived_as_documented() {
        use EventType::*;
        assert_eq!(Priority::derive(IncidentCreated, Some(Severity::P0)), Priority::Critical);
        assert_eq!(Priority::derive(Escalated, Some(Severity::P4)), Priority::Critical);
        assert_eq!(Priority::derive(Escalated, None), Priority::Critical);
        assert_eq!(Priority::derive(AlertReceived, Some(Severity::P1)), Priority::High);
        assert_eq!(Priority::derive(AlertReceived, Some(Severity::P2)), Priority::Normal);
        assert_eq!(Priority::derive(AlertReceived, Some(Severity::P3)), Priority::Normal);
        assert_eq!(Priority::derive(AlertReceived, Some(Severity::P4)), Priority::Low);
        assert_eq!(Priority::derive(CommentAdded, None), Priority::Low);
    }

    #[test]
    fn tenant_ids_are_restricted() {
        assert!(TenantId::new("acme-corp_2").is_ok());
        for bad in ["", "a b", "a.b", "a/b", "ü", &"x".repeat(65)] {
            assert!(TenantId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn message_ids_round_trip_and_order() {
        let a = MessageId { epoch: 7, seq: 9 };
        let b = MessageId { epoch: 7, seq: 10 };
        assert_eq!(a.to_string(), "7-9");
        assert_eq!("7-9".parse::<MessageId>(), Ok(a));
        assert!(a < b);
        for bad in ["", "7", "7-", "-9", "x-1", "1-2-3"] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parse_stamps_tenant_and_label() {
        let t = acme();
        let ev = Event::parse(
            json!({"event_type": "incident_created", "severity": "P1", "state": "Detected",
                   "labels": {"env": "prod"}, "incident": {"title": "x"}}),
            TenantScope::Bound(&t),
        )
        .expect("valid");
        assert_eq!(ev.routing.tenant, t);
        assert_eq!(ev.routing.severity, Some(Severity::P1));
        assert_eq!(ev.routing.state, Some(IncidentState::Detected));
        assert_eq!(ev.body["tenant"], "acme");
        assert_eq!(ev.body["labels"], json!({"env": "prod", "tenant": "acme"}));
        assert_eq!(ev.body["incident"], json!({"title": "x"}));
    }

    #[test]
    fn parse_rejects_bad_bodies_with_named_fields() {
        let t = acme();
        let cases = [
            (json!([1]), "invalid_field"),
            (json!({}), "missing_event_type"),
            (json!({"event_type": 3}), "invalid_field"),
            (json!({"event_type": "nope"}), "unknown_event_type"),
            (json!({"event_type": "escalated", "severity": "P9"}), "invalid_value"),
            (json!({"event_type": "escalated", "severity": 0}), "invalid_field"),
            (json!({"event_type": "escalated", "state": "Open"}), "invalid_value"),
            (json!({"event_type": "escalated", "affected_resources": "db"}), "invalid_field"),
            (json!({"event_type": "escalated", "affected_resources": [1]}), "invalid_field"),
            (json!({"event_type": "escalated", "labels": {"a": 1}}), "invalid_field"),
            (json!({"event_type": "escalated", "labels": {"tenant": "globex"}}), "tenant_mismatch"),
            (json!({"event_type": "escalated", "source": ["x"]}), "invalid_field"),
        ];
        for (body, code) in cases {
            match Event::parse(body.clone(), TenantScope::Bound(&t)) {
                Err(ParseEventError::Invalid(e)) => assert_eq!(e.code(), code, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn bound_publishers_cannot_name_other_tenants() {
        let t = acme();
        let err = Event::parse(json!({"event_type": "escalated", "tenant": "globex"}), TenantScope::Bound(&t));
        assert!(matches!(err, Err(ParseEventError::Foreign(_))));
        let ok = Event::parse(json!({"event_type": "escalated", "tenant": "acme"}), TenantScope::Bound(&t));
        assert!(ok.is_ok());
        let sys = Event::parse(json!({"event_type": "escalated", "tenant": "globex"}), TenantScope::System(&t))
            .expect("system may name a tenant");
        assert_eq!(sys.routing.tenant.as_str(), "globex");
        assert_eq!(sys.routing.labels["tenant"], "globex");
        let bad = Event::parse(json!({"event_type": "escalated", "tenant": "a b"}), TenantScope::System(&t));
        assert!(matches!(bad, Err(ParseEventError::Invalid(EventError::BadTenant(_)))));
    }
}

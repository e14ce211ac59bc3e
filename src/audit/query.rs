//! Which records a query selects: `audit query` and `GET /admin/audit` share this. Pure.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::record::Kind;

/// Why a query cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `since` or `until` is not an RFC 3339 time.
    #[error("`{field}` must be an RFC 3339 time such as 2026-12-01T10:00:00Z, got `{value}`")]
    BadTime {
        /// `since` or `until`.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// `kind` names no record kind.
    #[error("unknown kind `{0}`")]
    UnknownKind(String),
}

/// A conjunction of optional conditions; an empty query selects everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    /// `tenant` equals.
    pub tenant: Option<String>,
    /// `subject` equals.
    pub subject: Option<String>,
    /// `kind` equals.
    pub kind: Option<Kind>,
    /// `session_id` equals.
    pub session_id: Option<String>,
    /// `ts` at or after.
    pub since: Option<OffsetDateTime>,
    /// `ts` before.
    pub until: Option<OffsetDateTime>,
    /// `seq` greater than (paging).
    pub after_seq: Option<u64>,
}

/// Parses an RFC 3339 time for `since`/`until`.
pub fn parse_time(field: &'static str, value: &str) -> Result<OffsetDateTime, QueryError> {
    OffsetDateTime::parse(value, &Rfc3339).map_err(|_| QueryError::BadTime { field, value: value.to_owned() })
}

/// Parses a kind name.
pub fn parse_kind(value: &str) -> Result<Kind, QueryError> {
    Kind::parse(value).ok_or_else(|| QueryError::UnknownKind(value.to_owned()))
}

fn eq(rec: &Map<String, Value>, key: &str, want: Option<&String>) -> bool {
    want.is_none_or(|w| rec.get(key).and_then(Value::as_str) == Some(w.as_str()))
}

impl Query {
    /// Does this record match?
    pub fn matches(&self, rec: &Map<String, Value>) -> bool {
        if !(eq(rec, "tenant", self.tenant.as_ref())
            && eq(rec, "subject", self.subject.as_ref())
            && eq(rec, "session_id", self.session_id.as_ref()))
        {
            return false;
        }
        if self.kind.is_some_and(|k| rec.get("kind").and_then(Value::as_str) != Some(k.as_str())) {
            return false;
        }
        if let Some(after) = self.after_seq {
            if rec.get("seq").and_then(Value::as_u64).is_none_or(|s| s <= after) {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(ts) = rec.get("ts").and_then(Value::as_str).and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            else {
                return false;
            };
            if self.since.is_some_and(|s| ts < s) || self.until.is_some_and(|u| ts >= u) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn conditions_combine() {
        let r = rec(serde_json::json!({"seq": 5, "ts": "2026-12-01T10:00:00.5Z", "kind": "connection.accepted",
            "tenant": "acme", "subject": "alice", "session_id": "s"}));
        assert!(Query::default().matches(&r));
        let q = Query {
            tenant: Some("acme".into()),
            subject: Some("alice".into()),
            kind: Some(Kind::ConnectionAccepted),
            since: Some(parse_time("since", "2026-12-01T10:00:00Z").expect("time")),
            until: Some(parse_time("until", "2026-12-01T11:30:00+01:00").expect("time")),
            after_seq: Some(4),
            ..Query::default()
        };
        assert!(q.matches(&r));
        assert!(!Query { tenant: Some("globex".into()), ..q.clone() }.matches(&r));
        assert!(!Query { kind: Some(Kind::ConnectionClosed), ..q.clone() }.matches(&r));
        assert!(!Query { after_seq: Some(5), ..q.clone() }.matches(&r));
        assert!(!Query { until: q.since, ..q.clone() }.matches(&r), "until is exclusive");
        assert!(!Query { session_id: Some("t".into()), ..q }.matches(&r));
    }

    #[test]
    fn a_record_without_the_field_does_not_match_a_condition_on_it() {
        let r = rec(serde_json::json!({"seq": 1, "tenant": null}));
        assert!(!Query { tenant: Some("acme".into()), ..Query::default() }.matches(&r));
        assert!(!Query { since: Some(OffsetDateTime::UNIX_EPOCH), ..Query::default() }.matches(&r));
    }

    #[test]
    fn bad_inputs_are_named() {
        assert_eq!(
            parse_time("since", "yesterday"),
            Err(QueryError::BadTime { field: "since", value: "yesterday".into() })
        );
        assert_eq!(parse_kind("nope"), Err(QueryError::UnknownKind("nope".into())));
    }
}

//! Filter tests: table cases for the seed semantics, and a property test that checks the typed
//! matcher against a naive reference that reads the JSON of the event and of the filter directly.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::event::{Event, TenantId, TenantScope};

fn spec(v: Value) -> FilterSpec {
    serde_json::from_value(v).expect("valid spec")
}

fn event(v: Value) -> Event {
    let t = TenantId::new("acme").expect("tenant");
    Event::parse(v, TenantScope::Bound(&t)).expect("valid event")
}

fn check(filter: Value, ev: Value) -> bool {
    SubscriptionFilter::from_spec(&spec(filter)).expect("valid filter").matches(&event(ev).routing)
}

#[test]
fn seed_semantics_as_data() {
    let base = json!({"event_type": "incident_created", "severity": "P0", "state": "Detected",
        "source": "llm-sentinel", "affected_resources": ["api-gateway", "db"], "incident_id": "i-1",
        "labels": {"environment": "production", "team": "platform"}});
    let bare = json!({"event_type": "comment_added"});
    let cases: &[(Value, &Value, bool)] = &[
        (json!({}), &base, true),
        (json!({}), &bare, true),
        (json!({"event_types": []}), &base, true),
        (json!({"event_types": ["incident_created", "alert_received"]}), &base, true),
        (json!({"event_types": ["alert_received"]}), &base, false),
        (json!({"severities": ["P0", "P1"]}), &base, true),
        (json!({"severities": ["P1"]}), &base, false),
        (json!({"severities": ["P0"]}), &bare, false),
        (json!({"states": ["Detected"]}), &base, true),
        (json!({"states": ["Resolved"]}), &base, false),
        (json!({"states": ["Detected"]}), &bare, false),
        (json!({"sources": ["llm-shield", "llm-sentinel"]}), &base, true),
        (json!({"sources": ["llm-shield"]}), &base, false),
        (json!({"sources": ["llm-shield"]}), &bare, false),
        (json!({"affected_resources": ["db", "cache"]}), &base, true),
        (json!({"affected_resources": ["cache"]}), &base, false),
        (json!({"affected_resources": ["db"]}), &bare, false),
        (json!({"incident_ids": ["i-1"]}), &base, true),
        (json!({"incident_ids": ["i-2"]}), &base, false),
        (json!({"incident_ids": ["i-1"]}), &bare, false),
        (json!({"labels": {"environment": "production"}}), &base, true),
        (json!({"labels": {"environment": "production", "team": "platform"}}), &base, true),
        (json!({"labels": {"environment": "production", "team": "core"}}), &base, false),
        (json!({"labels": {"environment": "staging"}}), &base, false),
        (json!({"labels": {"environment": "production"}}), &bare, false),
        (json!({"labels": {"tenant": "acme"}}), &bare, true),
        (json!({"labels": {"tenant": "globex"}}), &bare, false),
        (json!({"labels": {"tenant": "acme", "team": "platform"}}), &base, true),
        (json!({"labels": {"tenant": "globex", "team": "platform"}}), &base, false),
        (json!({"labels": {"tenant": "acm"}}), &base, false),
        (json!({"event_types": ["incident_created"], "severities": ["P0"], "sources": ["llm-sentinel"]}), &base, true),
        (json!({"event_types": ["incident_created"], "severities": ["P1"]}), &base, false),
    ];
    for (f, ev, want) in cases {
        assert_eq!(check(f.clone(), (*ev).clone()), *want, "filter {f} on {ev}");
    }
}

#[test]
fn unknown_names_are_refused_with_the_field() {
    for (f, field) in [
        (json!({"event_types": ["incident_deleted"]}), "event_types"),
        (json!({"severities": ["P5"]}), "severities"),
        (json!({"states": ["Open"]}), "states"),
    ] {
        match SubscriptionFilter::from_spec(&spec(f.clone())) {
            Err(FilterError::Unknown { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{f}: {other:?}"),
        }
    }
}

#[test]
fn oversized_filters_are_refused() {
    let many: Vec<String> = (0..=MAX_VALUES_PER_FIELD).map(|i| format!("s{i}")).collect();
    let long = "x".repeat(MAX_VALUE_BYTES + 1);
    let labels: BTreeMap<String, String> = (0..=MAX_LABELS).map(|i| (format!("k{i}"), "v".into())).collect();
    for f in [
        json!({"sources": many}),
        json!({"incident_ids": [long]}),
        json!({"labels": {"k": long}}),
        json!({"labels": labels}),
    ] {
        assert!(matches!(SubscriptionFilter::from_spec(&spec(f)), Err(FilterError::TooLarge { .. })));
    }
}

#[test]
fn mandatory_labels_are_added_and_never_widened() {
    let pair = |k: &str, v: &str| -> LabelPair { (Arc::from(k), Arc::from(v)) };
    let mandatory: Arc<[LabelPair]> = Arc::from([pair("tenant", "acme")]);
    let f = SubscriptionFilter::from_spec(&spec(json!({}))).expect("ok");
    let eff = f.with_mandatory_labels(&mandatory).expect("ok");
    assert_eq!(eff.to_spec().labels, BTreeMap::from([("tenant".to_owned(), "acme".to_owned())]));
    // Several mandatory labels merge into the client's own, in label order.
    let two: Arc<[LabelPair]> = Arc::from([pair("region", "eu"), pair("tenant", "acme")]);
    let f = SubscriptionFilter::from_spec(&spec(json!({"labels": {"team": "core", "env": "prod"}}))).expect("ok");
    let eff = f.with_mandatory_labels(&two).expect("ok").to_spec().labels;
    assert_eq!(eff.keys().collect::<Vec<_>>(), ["env", "region", "team", "tenant"]);

    let same = SubscriptionFilter::from_spec(&spec(json!({"labels": {"tenant": "acme"}}))).expect("ok");
    assert!(same.with_mandatory_labels(&mandatory).is_ok());

    let other = SubscriptionFilter::from_spec(&spec(json!({"labels": {"tenant": "globex"}}))).expect("ok");
    assert_eq!(
        other.with_mandatory_labels(&mandatory),
        Err(FilterError::ForbiddenLabel { label: "tenant".into(), required: "acme".into() })
    );
}

#[test]
fn effective_filter_round_trips_through_its_spec() {
    let f = SubscriptionFilter::from_spec(&spec(json!({
        "event_types": ["escalated", "incident_created", "escalated"], "severities": ["P3", "P0"],
        "states": ["Closed"], "sources": ["b", "a"], "labels": {"x": "y"}
    })))
    .expect("ok");
    let s = f.to_spec();
    assert_eq!(s.event_types, vec!["incident_created", "escalated"]);
    assert_eq!(s.severities, vec!["P0", "P3"]);
    assert_eq!(s.sources, vec!["a", "b"]);
    assert_eq!(SubscriptionFilter::from_spec(&s).expect("ok"), f);
}

// ---- property test against a naive reference over the raw JSON ----

const SOURCES: &[&str] = &["llm-sentinel", "llm-shield", "pager"];
const RESOURCES: &[&str] = &["api-gateway", "db", "cache", "queue"];
const INCIDENTS: &[&str] = &["i-1", "i-2", "i-3"];
const LABEL_KEYS: &[&str] = &["environment", "team"];
const LABEL_VALUES: &[&str] = &["production", "staging", "platform"];

fn pick(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(pool.to_vec()).prop_map(str::to_owned)
}

fn names(all: Vec<&'static str>) -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(proptest::sample::select(all).prop_map(str::to_owned), 0..3)
}

fn label_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(pick(LABEL_KEYS), pick(LABEL_VALUES), 0..3)
}

fn arb_event() -> impl Strategy<Value = Value> {
    let types: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
    (
        proptest::sample::select(types),
        proptest::option::of(proptest::sample::select(Severity::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>())),
        proptest::option::of(proptest::sample::select(
            IncidentState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        )),
        proptest::option::of(pick(SOURCES)),
        proptest::collection::vec(pick(RESOURCES), 0..3),
        proptest::option::of(pick(INCIDENTS)),
        label_map(),
    )
        .prop_map(|(t, sev, st, src, res, inc, labels)| {
            let mut o = serde_json::Map::new();
            o.insert("event_type".into(), json!(t));
            if let Some(v) = sev {
                o.insert("severity".into(), json!(v));
            }
            if let Some(v) = st {
                o.insert("state".into(), json!(v));
            }
            if let Some(v) = src {
                o.insert("source".into(), json!(v));
            }
            if !res.is_empty() {
                o.insert("affected_resources".into(), json!(res));
            }
            if let Some(v) = inc {
                o.insert("incident_id".into(), json!(v));
            }
            o.insert("labels".into(), json!(labels));
            Value::Object(o)
        })
}

fn arb_filter() -> impl Strategy<Value = Value> {
    (
        names(EventType::ALL.iter().map(|t| t.as_str()).collect()),
        names(Severity::ALL.iter().map(|s| s.as_str()).collect()),
        names(IncidentState::ALL.iter().map(|s| s.as_str()).collect()),
        proptest::collection::vec(pick(SOURCES), 0..3),
        proptest::collection::vec(pick(RESOURCES), 0..3),
        proptest::collection::vec(pick(INCIDENTS), 0..3),
        label_map(),
    )
        .prop_map(|(t, sev, st, src, res, inc, labels)| {
            json!({"event_types": t, "severities": sev, "states": st, "sources": src,
                   "affected_resources": res, "incident_ids": inc, "labels": labels})
        })
}

/// The seed semantics written as plainly as possible over the JSON texts.
fn naive(filter: &Value, ev: &Value) -> bool {
    let list = |k: &str| -> Vec<String> {
        filter[k]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let scalar_field = |fk: &str, ek: &str| {
        let wanted = list(fk);
        wanted.is_empty() || ev.get(ek).and_then(Value::as_str).is_some_and(|v| wanted.iter().any(|w| w == v))
    };
    let resources_ok = {
        let wanted = list("affected_resources");
        let have: Vec<&str> = ev
            .get("affected_resources")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        wanted.is_empty() || have.iter().any(|h| wanted.iter().any(|w| w == h))
    };
    let labels_ok =
        filter["labels"].as_object().map(|m| m.iter().all(|(k, v)| ev["labels"].get(k) == Some(v))).unwrap_or(true);
    scalar_field("event_types", "event_type")
        && scalar_field("severities", "severity")
        && scalar_field("states", "state")
        && scalar_field("sources", "source")
        && scalar_field("incident_ids", "incident_id")
        && resources_ok
        && labels_ok
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn matcher_agrees_with_naive_reference(f in arb_filter(), ev in arb_event()) {
        let typed = SubscriptionFilter::from_spec(&spec(f.clone())).expect("generated filters are valid");
        let parsed = event(ev);
        // The reference reads the body the subscriber would receive.
        let body = Value::Object(parsed.body.clone());
        prop_assert_eq!(typed.matches(&parsed.routing), naive(&f, &body), "filter {} event {}", f, body);
        // The fan-out's shortcut never claims a match the matcher would refuse.
        if typed.matches_all_of(&parsed.routing.tenant) {
            prop_assert!(typed.matches(&parsed.routing), "filter {} event {}", f, body);
        }
    }
}

#[test]
fn matches_all_of_is_only_for_filters_that_constrain_nothing_but_the_tenant() {
    let acme = TenantId::new("acme").expect("tenant");
    let globex = TenantId::new("globex").expect("tenant");
    let all = |v: Value, t: &TenantId| SubscriptionFilter::from_spec(&spec(v)).expect("valid").matches_all_of(t);
    assert!(all(json!({}), &acme));
    assert!(all(json!({"labels": {"tenant": "acme"}}), &acme));
    assert!(!all(json!({"labels": {"tenant": "acme"}}), &globex));
    assert!(!all(json!({"labels": {"tenant": "acme", "team": "core"}}), &acme));
    assert!(!all(json!({"labels": {"team": "core"}}), &acme));
    for f in [
        json!({"event_types": ["escalated"]}),
        json!({"severities": ["P0"]}),
        json!({"states": ["Detected"]}),
        json!({"sources": ["x"]}),
        json!({"affected_resources": ["db"]}),
        json!({"incident_ids": ["i-1"]}),
    ] {
        assert!(!all(f.clone(), &acme), "{f}");
    }
    // With the session's mandatory labels, as the server builds every subscription.
    let mandatory: Arc<[LabelPair]> = Arc::from([(Arc::from("tenant"), Arc::from("acme"))]);
    let eff =
        SubscriptionFilter::from_spec(&spec(json!({}))).expect("ok").with_mandatory_labels(&mandatory).expect("ok");
    assert!(eff.matches_all_of(&acme));
    assert!(!eff.matches_all_of(&globex));
}

//! Subscription filters and their matching: pure, no I/O, heavily tested.
//!
//! Semantics (seed): within one field any listed value matches (OR); across fields all must match
//! (AND); an empty or absent field matches everything, while a non-empty field never matches an
//! event that lacks that field; `labels` is an exact match of every pair. Closed sets (event types,
//! severities, states) are bit masks so matching an event costs a few instructions per field.
//!
//! A filter is built from its wire form ([`crate::protocol::FilterSpec`]) once, validated and
//! bounded in size, and then the server adds the mandatory labels of the principal: a filter that
//! names a mandatory label with another value is refused, never widened.

use std::sync::{Arc, LazyLock};

use crate::event::{EventType, IncidentState, Routing, Severity, TenantId, UnknownName};
use crate::protocol::FilterSpec;

/// Most values one list field of a filter may hold.
pub const MAX_VALUES_PER_FIELD: usize = 64;
/// Most label pairs a filter may hold (mandatory labels included).
pub const MAX_LABELS: usize = 32;
/// Longest string (in bytes) a filter value, label key or label value may be.
pub const MAX_VALUE_BYTES: usize = 256;

/// Why a filter was refused. `Invalid` maps to `invalid_filter`, `Forbidden` to `forbidden_filter`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A name outside its closed set.
    #[error("{field}: {source}")]
    Unknown {
        /// The filter field.
        field: &'static str,
        /// The unknown name.
        source: UnknownName,
    },
    /// The filter is larger than the documented bounds.
    #[error("{field}: {what}")]
    TooLarge {
        /// The filter field.
        field: &'static str,
        /// Which bound was crossed.
        what: String,
    },
    /// The filter names a mandatory label with another value.
    #[error("label `{label}` is fixed to `{required}` for this session")]
    ForbiddenLabel {
        /// The label.
        label: String,
        /// The value the server enforces.
        required: String,
    },
}

/// A label and its value. Shared strings: the mandatory labels that every subscription of a
/// session carries are the session's own, not copies (every idle subscription keeps them).
pub type LabelPair = (Arc<str>, Arc<str>);

/// The name of the label that carries the tenant, shared by every session.
pub static TENANT_LABEL: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("tenant"));

/// A validated subscription filter. Every subscription keeps one for its whole life, so it is
/// small: 40 bytes, plus its labels and, rarely, the value lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionFilter {
    event_types: u32,
    severities: u32,
    states: u32,
    /// Exact label pairs, sorted by label and unique: a slice, because a map's first node costs
    /// half a kilobyte per subscription and filters hold one to a few labels. A filter that
    /// names no label of its own shares the session's mandatory slice itself.
    labels: Arc<[LabelPair]>,
    /// Sources, affected resources and incident ids; boxed, and absent when all are empty.
    values: Option<Box<Values>>,
}

/// The value lists of a filter, each sorted and unique (empty: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Values {
    sources: Vec<String>,
    affected_resources: Vec<String>,
    incident_ids: Vec<String>,
}

fn mask<T: std::str::FromStr<Err = UnknownName> + Copy>(
    field: &'static str,
    values: &[String],
    bit: impl Fn(T) -> u32,
) -> Result<u32, FilterError> {
    check_len(field, values)?;
    values.iter().try_fold(0u32, |acc, v| {
        let t = v.parse::<T>().map_err(|source| FilterError::Unknown { field, source })?;
        Ok(acc | bit(t))
    })
}

fn check_len(field: &'static str, values: &[String]) -> Result<(), FilterError> {
    if values.len() > MAX_VALUES_PER_FIELD {
        return Err(FilterError::TooLarge { field, what: format!("more than {MAX_VALUES_PER_FIELD} values") });
    }
    check_strings(field, values.iter())
}

fn check_strings<'a>(field: &'static str, mut values: impl Iterator<Item = &'a String>) -> Result<(), FilterError> {
    if values.any(|v| v.len() > MAX_VALUE_BYTES) {
        return Err(FilterError::TooLarge { field, what: format!("a value longer than {MAX_VALUE_BYTES} bytes") });
    }
    Ok(())
}

impl Values {
    fn matches(&self, r: &Routing) -> bool {
        (self.sources.is_empty() || r.source.as_ref().is_some_and(|s| self.sources.contains(s)))
            && (self.affected_resources.is_empty()
                || r.affected_resources.iter().any(|x| self.affected_resources.contains(x)))
            && (self.incident_ids.is_empty() || r.incident_id.as_ref().is_some_and(|i| self.incident_ids.contains(i)))
    }
}

fn dedup(values: &[String]) -> Vec<String> {
    let mut v = values.to_vec();
    v.sort();
    v.dedup();
    v
}

fn names_of<T: Copy>(all: &[T], m: u32, bit: impl Fn(T) -> u32, name: impl Fn(T) -> &'static str) -> Vec<String> {
    all.iter().filter(|t| m & bit(**t) != 0).map(|t| name(*t).to_owned()).collect()
}

impl SubscriptionFilter {
    /// Validates a wire filter. Values are deduplicated; order does not matter.
    pub fn from_spec(spec: &FilterSpec) -> Result<SubscriptionFilter, FilterError> {
        check_len("sources", &spec.sources)?;
        check_len("affected_resources", &spec.affected_resources)?;
        check_len("incident_ids", &spec.incident_ids)?;
        if spec.labels.len() > MAX_LABELS {
            return Err(FilterError::TooLarge { field: "labels", what: format!("more than {MAX_LABELS} labels") });
        }
        check_strings("labels", spec.labels.keys().chain(spec.labels.values()))?;
        let values = Values {
            sources: dedup(&spec.sources),
            affected_resources: dedup(&spec.affected_resources),
            incident_ids: dedup(&spec.incident_ids),
        };
        let any = values.sources.is_empty() && values.affected_resources.is_empty() && values.incident_ids.is_empty();
        Ok(SubscriptionFilter {
            event_types: mask::<EventType>("event_types", &spec.event_types, EventType::bit)?,
            severities: mask::<Severity>("severities", &spec.severities, Severity::bit)?,
            states: mask::<IncidentState>("states", &spec.states, IncidentState::bit)?,
            labels: spec.labels.iter().map(|(k, v)| (Arc::from(k.as_str()), Arc::from(v.as_str()))).collect(),
            values: (!any).then(|| Box::new(values)),
        })
    }

    /// Adds the server-enforced labels. A filter naming one of them with another value is
    /// refused; naming it with the same value is allowed (and changes nothing).
    pub fn with_mandatory_labels(mut self, mandatory: &Arc<[LabelPair]>) -> Result<Self, FilterError> {
        if self.labels.is_empty() && mandatory.len() <= MAX_LABELS {
            self.labels = Arc::clone(mandatory);
            return Ok(self);
        }
        let mut labels = self.labels.to_vec();
        for (label, required) in mandatory.iter() {
            match labels.binary_search_by(|(k, _)| k.cmp(label)) {
                Ok(i) if labels[i].1 != *required => {
                    return Err(FilterError::ForbiddenLabel {
                        label: label.to_string(),
                        required: required.to_string(),
                    })
                }
                // The session's strings replace the client's equal copies.
                Ok(i) => labels[i] = (Arc::clone(label), Arc::clone(required)),
                Err(i) => labels.insert(i, (Arc::clone(label), Arc::clone(required))),
            }
        }
        if labels.len() > MAX_LABELS {
            return Err(FilterError::TooLarge { field: "labels", what: format!("more than {MAX_LABELS} labels") });
        }
        self.labels = labels.into();
        Ok(self)
    }

    /// The event types asked for, as a bit mask (0: every type).
    pub(crate) fn event_type_mask(&self) -> u32 {
        self.event_types
    }

    /// Replaces the event types (a bit mask; 0: every type). The server narrows a filter that
    /// names no type to the types the tenant's policy allows.
    pub(crate) fn with_event_type_mask(mut self, mask: u32) -> Self {
        self.event_types = mask;
        self
    }

    /// Does the event match? See the module docs for the semantics.
    pub fn matches(&self, r: &Routing) -> bool {
        (self.event_types == 0 || self.event_types & r.event_type.bit() != 0)
            && (self.severities == 0 || r.severity.is_some_and(|s| self.severities & s.bit() != 0))
            && (self.states == 0 || r.state.is_some_and(|s| self.states & s.bit() != 0))
            && self.values.as_deref().is_none_or(|v| v.matches(r))
            && self.labels.iter().all(|(k, v)| label_matches(r, k, v))
    }

    /// Does the filter match every event of `tenant`? True when it constrains nothing but the
    /// `tenant` label, to that tenant: the common subscription ("everything I may see"), for
    /// which the fan-out, which already holds only that tenant's events, skips matching.
    pub fn matches_all_of(&self, tenant: &TenantId) -> bool {
        self.event_types == 0
            && self.severities == 0
            && self.states == 0
            && self.values.is_none()
            && self.labels.iter().all(|(k, v)| &**k == "tenant" && &**v == tenant.as_str())
    }

    /// The filter in wire form, as echoed in `subscribed` (the effective filter).
    pub fn to_spec(&self) -> FilterSpec {
        FilterSpec {
            event_types: names_of(EventType::ALL, self.event_types, EventType::bit, EventType::as_str),
            severities: names_of(Severity::ALL, self.severities, Severity::bit, Severity::as_str),
            states: names_of(IncidentState::ALL, self.states, IncidentState::bit, IncidentState::as_str),
            sources: self.values.as_ref().map(|v| v.sources.clone()).unwrap_or_default(),
            affected_resources: self.values.as_ref().map(|v| v.affected_resources.clone()).unwrap_or_default(),
            labels: self.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            incident_ids: self.values.as_ref().map(|v| v.incident_ids.clone()).unwrap_or_default(),
        }
    }
}

/// Does the event carry label `key` with `value`? The `tenant` label is the event's tenant
/// ([`crate::event::Event::parse`] sets it from the tenant and refuses one that differs), so it
/// is compared with the tenant without a map look-up: every subscription carries it, and a
/// fan-out checks it once per subscriber per event.
fn label_matches(r: &Routing, key: &str, value: &str) -> bool {
    if key == "tenant" {
        return r.tenant.as_str() == value;
    }
    r.labels.get(key).is_some_and(|x| x.as_str() == value)
}

#[cfg(test)]
mod tests;

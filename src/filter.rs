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

use crate::event::{EventType, IncidentState, Routing, Severity, UnknownName};
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

/// A validated subscription filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionFilter {
    event_types: u32,
    severities: u32,
    states: u32,
    sources: Vec<String>,
    affected_resources: Vec<String>,
    /// Exact label pairs, sorted by label and unique: a small vector, because a map's first
    /// node costs half a kilobyte per subscription and filters hold one to a few labels.
    labels: Vec<(String, String)>,
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
        Ok(SubscriptionFilter {
            event_types: mask::<EventType>("event_types", &spec.event_types, EventType::bit)?,
            severities: mask::<Severity>("severities", &spec.severities, Severity::bit)?,
            states: mask::<IncidentState>("states", &spec.states, IncidentState::bit)?,
            sources: dedup(&spec.sources),
            affected_resources: dedup(&spec.affected_resources),
            labels: spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            incident_ids: dedup(&spec.incident_ids),
        })
    }

    /// Adds the server-enforced labels. A filter naming one of them with another value is
    /// refused; naming it with the same value is allowed (and changes nothing).
    pub fn with_mandatory_labels(mut self, mandatory: &[(String, String)]) -> Result<Self, FilterError> {
        for (label, required) in mandatory {
            match self.labels.binary_search_by(|(k, _)| k.cmp(label)) {
                Ok(i) if self.labels[i].1 != *required => {
                    return Err(FilterError::ForbiddenLabel { label: label.clone(), required: required.clone() })
                }
                Ok(_) => {}
                Err(i) => self.labels.insert(i, (label.clone(), required.clone())),
            }
        }
        self.labels.shrink_to_fit();
        if self.labels.len() > MAX_LABELS {
            return Err(FilterError::TooLarge { field: "labels", what: format!("more than {MAX_LABELS} labels") });
        }
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
            && (self.sources.is_empty() || r.source.as_ref().is_some_and(|s| self.sources.contains(s)))
            && (self.affected_resources.is_empty()
                || r.affected_resources.iter().any(|x| self.affected_resources.contains(x)))
            && (self.incident_ids.is_empty() || r.incident_id.as_ref().is_some_and(|i| self.incident_ids.contains(i)))
            && self.labels.iter().all(|(k, v)| r.labels.get(k) == Some(v))
    }

    /// The filter in wire form, as echoed in `subscribed` (the effective filter).
    pub fn to_spec(&self) -> FilterSpec {
        FilterSpec {
            event_types: names_of(EventType::ALL, self.event_types, EventType::bit, EventType::as_str),
            severities: names_of(Severity::ALL, self.severities, Severity::bit, Severity::as_str),
            states: names_of(IncidentState::ALL, self.states, IncidentState::bit, IncidentState::as_str),
            sources: self.sources.clone(),
            affected_resources: self.affected_resources.clone(),
            labels: self.labels.iter().cloned().collect(),
            incident_ids: self.incident_ids.clone(),
        }
    }
}

#[cfg(test)]
mod tests;

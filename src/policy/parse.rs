//! The policy file format and its validation. Values that can be wrong after they parsed (a
//! limit of zero, an unknown event type, a malformed origin) are read with their position, so
//! the error names the line and the key like the parser's own errors do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::{Limits, PolicyError, PolicyErrors, PolicySet, TenantPolicy};
use crate::event::{EventType, TenantId};

/// Longest label, claim, subject or token id a policy may name.
const MAX_NAME_BYTES: usize = 256;
/// Most mandatory labels besides `tenant` (a filter holds at most `filter::MAX_LABELS` in all).
const MAX_MANDATORY_LABELS: usize = 16;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    tenant: Option<Spanned<String>>,
    enabled: Option<bool>,
    limits: Option<RawLimits>,
    allowed_event_types: Option<Spanned<Vec<Spanned<String>>>>,
    mandatory_labels: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    allowed_origins: Option<Vec<Spanned<String>>>,
    revoked_subjects: Option<Vec<Spanned<String>>>,
    revoked_token_ids: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<Spanned<i64>>,
    max_connections_per_subject: Option<Spanned<i64>>,
    connects_per_minute_per_subject: Option<Spanned<i64>>,
    messages_per_second: Option<Spanned<i64>>,
    message_burst: Option<Spanned<i64>>,
    max_subscriptions_per_connection: Option<Spanned<i64>>,
    publishes_per_second: Option<Spanned<i64>>,
    publish_burst: Option<Spanned<i64>>,
}

/// One file's validated values (each `None` when the file does not set it).
#[derive(Debug, Default)]
struct Checked {
    enabled: Option<bool>,
    limits: [Option<u32>; 8],
    allowed_event_types: Option<u32>,
    mandatory_labels: BTreeMap<String, String>,
    allowed_origins: Option<BTreeSet<String>>,
    revoked_subjects: Option<BTreeSet<String>>,
    revoked_token_ids: Option<BTreeSet<String>>,
}

const LIMIT_KEYS: [&str; 8] = [
    "max_connections",
    "max_connections_per_subject",
    "connects_per_minute_per_subject",
    "messages_per_second",
    "message_burst",
    "max_subscriptions_per_connection",
    "publishes_per_second",
    "publish_burst",
];

/// Collects the problems of one file.
struct FileCheck<'a> {
    path: &'a Path,
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl FileCheck<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        self.text.get(..span.start).map_or(1, |s| s.matches('\n').count() + 1)
    }

    fn error(&mut self, span: std::ops::Range<usize>, key: &str, message: impl std::fmt::Display) {
        let line = self.line(span);
        self.errors.push(PolicyError::Invalid {
            path: self.path.to_owned(),
            message: format!("line {line}, key `{key}`: {message}"),
        });
    }

    fn names(&mut self, key: &str, values: Option<Vec<Spanned<String>>>) -> Option<BTreeSet<String>> {
        let values = values?;
        let mut out = BTreeSet::new();
        for v in values {
            if v.get_ref().is_empty() || v.get_ref().len() > MAX_NAME_BYTES {
                self.error(v.span(), key, format!("entries must be 1 to {MAX_NAME_BYTES} bytes"));
            } else {
                out.insert(v.into_inner());
            }
        }
        Some(out)
    }

    fn check(&mut self, raw: RawPolicy) -> Checked {
        let mut c = Checked { enabled: raw.enabled, ..Checked::default() };
        let l = raw.limits.unwrap_or_default();
        let limits = [
            l.max_connections,
            l.max_connections_per_subject,
            l.connects_per_minute_per_subject,
            l.messages_per_second,
            l.message_burst,
            l.max_subscriptions_per_connection,
            l.publishes_per_second,
            l.publish_burst,
        ];
        for (i, v) in limits.into_iter().enumerate() {
            let Some(v) = v else { continue };
            match u32::try_from(*v.get_ref()) {
                Ok(n) if n >= 1 => c.limits[i] = Some(n),
                _ => self.error(
                    v.span(),
                    &format!("limits.{}", LIMIT_KEYS[i]),
                    format!("must be a whole number from 1 to {}, got {}", u32::MAX, v.get_ref()),
                ),
            }
        }
        if let Some(types) = raw.allowed_event_types {
            if types.get_ref().is_empty() {
                self.error(
                    types.span(),
                    "allowed_event_types",
                    "must list at least one event type (leave the key out to allow every type)",
                );
            }
            let mut mask = 0u32;
            for t in types.into_inner() {
                match t.get_ref().parse::<EventType>() {
                    Ok(e) => mask |= e.bit(),
                    Err(e) => self.error(t.span(), "allowed_event_types", e),
                }
            }
            c.allowed_event_types = Some(mask);
        }
        for (label, claim) in raw.mandatory_labels.unwrap_or_default() {
            let key = format!("mandatory_labels.{}", label.get_ref());
            let (l, v) = (label.get_ref(), claim.get_ref());
            if l == "tenant" {
                if v != "tenant" {
                    self.error(claim.span(), &key, "the `tenant` label always comes from the token's tenant claim");
                }
                continue;
            }
            if l.is_empty() || l.len() > MAX_NAME_BYTES || v.is_empty() || v.len() > MAX_NAME_BYTES {
                self.error(claim.span(), &key, format!("label and claim must be 1 to {MAX_NAME_BYTES} bytes"));
                continue;
            }
            c.mandatory_labels.insert(label.into_inner(), claim.into_inner());
        }
        if c.mandatory_labels.len() > MAX_MANDATORY_LABELS {
            self.errors.push(PolicyError::Invalid {
                path: self.path.to_owned(),
                message: format!("key `mandatory_labels`: at most {MAX_MANDATORY_LABELS} labels besides `tenant`"),
            });
        }
        if let Some(origins) = raw.allowed_origins {
            let mut out = BTreeSet::new();
            for o in origins {
                match normalize_origin(o.get_ref()) {
                    Ok(n) => {
                        out.insert(n);
                    }
                    Err(why) => self.error(o.span(), "allowed_origins", why),
                }
            }
            c.allowed_origins = Some(out);
        }
        c.revoked_subjects = self.names("revoked_subjects", raw.revoked_subjects);
        c.revoked_token_ids = self.names("revoked_token_ids", raw.revoked_token_ids);
        c
    }
}

/// An origin as browsers send it: `scheme://host[:port]`, no path, compared in lower case.
fn normalize_origin(o: &str) -> Result<String, String> {
    let lower = o.trim_end_matches('/').to_ascii_lowercase();
    let rest = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://"));
    let ok = rest.is_some_and(|host| {
        !host.is_empty() && !host.contains(['/', '?', '#', '@', ' ', '*']) && host.bytes().all(|b| b.is_ascii_graphic())
    });
    if ok {
        Ok(lower)
    } else {
        Err(format!("`{o}` is not an origin like `https://app.example.com` or `http://localhost:8080`"))
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses one file; `None` (with errors recorded) when it does not parse at all.
fn parse_file<'a>(path: &'a Path, text: &'a str) -> (FileCheck<'a>, Option<RawPolicy>) {
    let mut fc = FileCheck { path, text, errors: Vec::new() };
    match toml::from_str::<RawPolicy>(text) {
        Ok(raw) => (fc, Some(raw)),
        Err(e) => {
            fc.errors
                .push(PolicyError::Invalid { path: path.to_owned(), message: e.to_string().trim_end().to_owned() });
            (fc, None)
        }
    }
}

pub(super) fn parse_set(
    defaults: (&Path, &str),
    tenant_files: &[(PathBuf, String)],
) -> Result<PolicySet, PolicyErrors> {
    let mut errors = Vec::new();
    let (mut fc, raw) = parse_file(defaults.0, defaults.1);
    let base = match raw {
        Some(mut raw) => {
            if let Some(t) = raw.tenant.take() {
                fc.error(t.span(), "tenant", "the defaults file applies to every tenant and names none");
            }
            fc.check(raw)
        }
        None => Checked::default(),
    };
    errors.append(&mut fc.errors);
    let builtin = Limits::default();
    let mut tenants = BTreeMap::new();
    for (path, text) in tenant_files {
        let (mut fc, raw) = parse_file(path, text);
        let Some(mut raw) = raw else {
            errors.append(&mut fc.errors);
            continue;
        };
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let id = match raw.tenant.take() {
            Some(t) if stem.starts_with('_') => {
                fc.error(t.span(), "tenant", "file names starting with `_` are reserved for the service's own files");
                None
            }
            None => {
                fc.errors.push(PolicyError::Invalid {
                    path: path.clone(),
                    message: format!("key `tenant`: missing; a tenant file names its tenant (`tenant = \"{stem}\"`)"),
                });
                None
            }
            Some(t) if t.get_ref() != stem => {
                let msg = format!("`{}` does not match the file name `{stem}.toml`", t.get_ref());
                fc.error(t.span(), "tenant", msg);
                None
            }
            Some(t) => match TenantId::new(t.get_ref()) {
                Ok(id) => Some(id),
                Err(e) => {
                    fc.error(t.span(), "tenant", e);
                    None
                }
            },
        };
        let own = fc.check(raw);
        errors.append(&mut fc.errors);
        let Some(id) = id else { continue };
        let pick = |i: usize, builtin: u32| own.limits[i].or(base.limits[i]).unwrap_or(builtin);
        let limits = Limits {
            max_connections: pick(0, builtin.max_connections),
            max_connections_per_subject: pick(1, builtin.max_connections_per_subject),
            connects_per_minute_per_subject: pick(2, builtin.connects_per_minute_per_subject),
            messages_per_second: pick(3, builtin.messages_per_second),
            message_burst: pick(4, builtin.message_burst),
            max_subscriptions_per_connection: pick(5, builtin.max_subscriptions_per_connection),
            publishes_per_second: pick(6, builtin.publishes_per_second),
            publish_burst: pick(7, builtin.publish_burst),
        };
        let mut labels = base.mandatory_labels.clone();
        labels.extend(own.mandatory_labels.clone());
        let policy = TenantPolicy {
            enabled: own.enabled.or(base.enabled).unwrap_or(true),
            limits,
            allowed_event_types: own.allowed_event_types.or(base.allowed_event_types),
            mandatory_labels: labels.into_iter().collect::<Vec<_>>().into(),
            allowed_origins: own.allowed_origins.or_else(|| base.allowed_origins.clone()).unwrap_or_default(),
            revoked_subjects: own.revoked_subjects.or_else(|| base.revoked_subjects.clone()).unwrap_or_default(),
            revoked_token_ids: own.revoked_token_ids.or_else(|| base.revoked_token_ids.clone()).unwrap_or_default(),
            file_sha256: sha256_hex(text),
        };
        tenants.insert(id, Arc::new(policy));
    }
    if errors.is_empty() {
        Ok(PolicySet { tenants, defaults_sha256: sha256_hex(defaults.1) })
    } else {
        Err(PolicyErrors(errors))
    }
}

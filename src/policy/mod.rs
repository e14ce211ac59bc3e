//! Tenant policies: `policies/_defaults.toml` plus one `<tenant>.toml` per tenant, parsed and
//! validated as a whole into a [`PolicySet`]. Pure apart from [`PolicySet::load_dir`], which
//! only reads the directory and hands the texts to [`PolicySet::parse`].
//!
//! A token for a tenant with no policy file is refused (`unknown_tenant`): onboarding a tenant is
//! an admin act. A tenant file overrides the defaults key by key (inside `[limits]` and
//! `[mandatory_labels]` too; lists are replaced whole). Unknown keys, a file name that does not
//! match its `tenant`, a limit below 1, an unknown event type or a malformed origin are errors
//! naming the file, the line and the key; every error of every file is reported, and one bad file
//! refuses the whole set, so a reload is all or nothing. [`store::PolicyStore`] holds the set in
//! force and swaps it atomically.

mod parse;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::event::{EventType, TenantId};

/// Name of the defaults file in the policy directory.
pub const DEFAULTS_FILE: &str = "_defaults.toml";

/// One problem in one policy file. Every variant names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The directory or a file could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// A file does not parse, or has an unknown key or a bad value (with line and key).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the line and the key.
        message: String,
    },
    /// `_defaults.toml` is missing.
    #[error("{dir}: missing {DEFAULTS_FILE}")]
    NoDefaults {
        /// The directory.
        dir: PathBuf,
    },
}

/// Every problem found in a policy directory (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl From<PolicyError> for PolicyErrors {
    fn from(e: PolicyError) -> Self {
        PolicyErrors(vec![e])
    }
}

/// A tenant's limits (every value at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent connections of the whole tenant.
    pub max_connections: u32,
    /// Concurrent connections of one subject.
    pub max_connections_per_subject: u32,
    /// New connections per minute of one subject.
    pub connects_per_minute_per_subject: u32,
    /// Client messages per second on one connection.
    pub messages_per_second: u32,
    /// Burst of client messages on one connection.
    pub message_burst: u32,
    /// Subscriptions one connection may hold.
    pub max_subscriptions_per_connection: u32,
    /// Published events per second of the tenant.
    pub publishes_per_second: u32,
    /// Burst of published events of the tenant.
    pub publish_burst: u32,
}

impl Default for Limits {
    /// The built-in values, used for keys neither the defaults file nor the tenant file sets.
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_subject: 100,
            connects_per_minute_per_subject: 600,
            messages_per_second: 50,
            message_burst: 100,
            max_subscriptions_per_connection: 100,
            publishes_per_second: 1_000,
            publish_burst: 2_000,
        }
    }
}

/// The effective policy of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPolicy {
    /// Whether the tenant may connect and publish at all.
    pub enabled: bool,
    /// The tenant's limits.
    pub limits: Limits,
    /// Event types its subscribers may receive, as a bit mask (`None`: every type).
    pub allowed_event_types: Option<u32>,
    /// Mandatory labels beside `tenant`: label → claim whose value it takes, sorted by label.
    pub mandatory_labels: Arc<[(String, String)]>,
    /// Browser origins allowed to connect (exact, lower-case `scheme://host[:port]`).
    pub allowed_origins: BTreeSet<String>,
    /// Subjects refused at once, live sessions included.
    pub revoked_subjects: BTreeSet<String>,
    /// Token ids (`jti` or the short hash) refused at once, live sessions included.
    pub revoked_token_ids: BTreeSet<String>,
    /// SHA-256 (hex) of the tenant file, for `policy.reloaded`.
    pub file_sha256: String,
}

impl TenantPolicy {
    /// Is this event type allowed to the tenant's subscribers?
    pub fn allows_event_type(&self, t: EventType) -> bool {
        self.allowed_event_types.is_none_or(|m| m & t.bit() != 0)
    }

    /// The allowed event types by name (every type when unrestricted).
    pub fn allowed_event_type_names(&self) -> Vec<&'static str> {
        EventType::ALL.iter().filter(|t| self.allows_event_type(**t)).map(|t| t.as_str()).collect()
    }

    /// May a request with this `Origin` header connect? Requests without one are not browsers.
    pub fn allows_origin(&self, origin: Option<&str>) -> bool {
        origin.is_none_or(|o| self.allowed_origins.contains(&o.trim_end_matches('/').to_ascii_lowercase()))
    }
}

/// Every tenant's effective policy, plus the file hashes it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicySet {
    tenants: BTreeMap<TenantId, Arc<TenantPolicy>>,
    defaults_sha256: String,
}

/// What a policy lookup decided for a principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The principal may proceed.
    Allowed,
    /// No policy file: refused as `unknown_tenant`.
    UnknownTenant,
    /// `enabled = false`: refused as `tenant_disabled`.
    Disabled,
    /// The subject is in `revoked_subjects`: `subject_revoked`.
    SubjectRevoked,
    /// The token id is in `revoked_token_ids`: `token_revoked`.
    TokenRevoked,
}

impl Admission {
    /// The stable reason code of a refusal (`None` when allowed).
    pub fn code(self) -> Option<&'static str> {
        match self {
            Admission::Allowed => None,
            Admission::UnknownTenant => Some("unknown_tenant"),
            Admission::Disabled => Some("tenant_disabled"),
            Admission::SubjectRevoked => Some("subject_revoked"),
            Admission::TokenRevoked => Some("token_revoked"),
        }
    }
}

impl PolicySet {
    /// Parses and validates a whole set from file texts: `(path, text)` of the defaults and of
    /// each tenant file. All or nothing; every problem of every file is reported.
    pub fn parse(defaults: (&Path, &str), tenant_files: &[(PathBuf, String)]) -> Result<PolicySet, PolicyErrors> {
        parse::parse_set(defaults, tenant_files)
    }

    /// Reads `dir`: `_defaults.toml` and every other `*.toml`, then [`PolicySet::parse`].
    /// Hidden files and editor leftovers (names starting with `.`) are ignored.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyErrors> {
        let (defaults, files) = read_dir(dir)?;
        PolicySet::parse((&defaults.0, &defaults.1), &files)
    }

    /// The policy of a tenant, if it has one.
    pub fn get(&self, tenant: &TenantId) -> Option<&Arc<TenantPolicy>> {
        self.tenants.get(tenant)
    }

    /// The set's own copy of a tenant id (a connection keeps it rather than a copy of its own).
    pub fn shared_id(&self, tenant: &TenantId) -> Option<&TenantId> {
        self.tenants.get_key_value(tenant).map(|(k, _)| k)
    }

    /// May this tenant connect or publish at all?
    pub fn admit(&self, tenant: &TenantId) -> Admission {
        match self.tenants.get(tenant) {
            None => Admission::UnknownTenant,
            Some(p) if !p.enabled => Admission::Disabled,
            Some(_) => Admission::Allowed,
        }
    }

    /// May this principal (tenant, subject, token id) connect or keep its session?
    pub fn admit_principal(&self, tenant: &TenantId, subject: &str, token_id: &str) -> Admission {
        match self.tenants.get(tenant) {
            None => Admission::UnknownTenant,
            Some(p) if !p.enabled => Admission::Disabled,
            Some(p) if p.revoked_subjects.contains(subject) => Admission::SubjectRevoked,
            Some(p) if p.revoked_token_ids.contains(token_id) => Admission::TokenRevoked,
            Some(_) => Admission::Allowed,
        }
    }

    /// The tenants with a policy.
    pub fn tenants(&self) -> impl Iterator<Item = &TenantId> {
        self.tenants.keys()
    }

    /// `(file name, SHA-256)` of every file the set was built from, defaults first.
    pub fn file_hashes(&self) -> Vec<(String, String)> {
        let mut out = vec![(DEFAULTS_FILE.to_owned(), self.defaults_sha256.clone())];
        out.extend(self.tenants.iter().map(|(t, p)| (format!("{t}.toml"), p.file_sha256.clone())));
        out
    }
}

type Texts = ((PathBuf, String), Vec<(PathBuf, String)>);

/// Reads the defaults and every tenant file of a policy directory, sorted by name.
pub fn read_dir(dir: &Path) -> Result<Texts, PolicyErrors> {
    let read_err = |path: &Path, e: std::io::Error| PolicyError::Read { path: path.to_owned(), message: e.to_string() };
    let defaults_path = dir.join(DEFAULTS_FILE);
    let defaults = match std::fs::read_to_string(&defaults_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PolicyError::NoDefaults { dir: dir.to_owned() }.into())
        }
        Err(e) => return Err(read_err(&defaults_path, e).into()),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
        let path = entry.map_err(|e| read_err(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if !name.ends_with(".toml") || name.starts_with('.') || name == DEFAULTS_FILE {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
        files.push((path, text));
    }
    files.sort();
    Ok(((defaults_path, defaults), files))
}

#[cfg(test)]
mod tests;

//! Tenant policies: `policies/_defaults.toml` plus one `<tenant>.toml` per tenant, parsed and
//! validated as a whole into a [`PolicySet`]. Pure: reading the directory is the caller's
//! (`load_dir`), parsing and validation work on texts.
//!
//! A token for a tenant with no policy file is refused (`unknown_tenant`): onboarding a tenant is
//! an admin act. A tenant file overrides the defaults key by key. Unknown keys, a file name that
//! does not match its `tenant`, or a bad value are errors naming the file, line and key; one bad
//! file refuses the whole set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::event::TenantId;

/// Name of the defaults file in the policy directory.
pub const DEFAULTS_FILE: &str = "_defaults.toml";

/// Why a policy set was refused. Every variant names the file.
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
    /// A file does not parse or has an unknown key or a bad value (with line and column).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming line, column and key.
        message: String,
    },
    /// A tenant file's `tenant` does not match its name, or is not a valid tenant id.
    #[error("{path}: key `tenant`: {message}")]
    Tenant {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `_defaults.toml` is missing.
    #[error("{dir}: missing {DEFAULTS_FILE}")]
    NoDefaults {
        /// The directory.
        dir: PathBuf,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsFile {
    enabled: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    tenant: String,
    enabled: Option<bool>,
}

/// The effective policy of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPolicy {
    /// Whether the tenant may connect and publish at all.
    pub enabled: bool,
}

/// Every tenant's effective policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicySet {
    tenants: BTreeMap<TenantId, TenantPolicy>,
}

/// What a policy lookup decided for a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The tenant may proceed.
    Allowed,
    /// No policy file: refused as `unknown_tenant`.
    UnknownTenant,
    /// `enabled = false`: refused as `tenant_disabled`.
    Disabled,
}

impl PolicySet {
    /// Parses and validates a whole set from file texts: `(path, text)` of the defaults and of
    /// each tenant file. All or nothing.
    pub fn parse(defaults: (&Path, &str), tenant_files: &[(PathBuf, String)]) -> Result<PolicySet, PolicyError> {
        let invalid =
            |path: &Path, e: toml::de::Error| PolicyError::Invalid { path: path.to_owned(), message: e.to_string() };
        let d: DefaultsFile = toml::from_str(defaults.1).map_err(|e| invalid(defaults.0, e))?;
        let mut tenants = BTreeMap::new();
        for (path, text) in tenant_files {
            let f: TenantFile = toml::from_str(text).map_err(|e| invalid(path, e))?;
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if f.tenant != stem {
                return Err(PolicyError::Tenant {
                    path: path.clone(),
                    message: format!("`{}` does not match the file name `{stem}.toml`", f.tenant),
                });
            }
            let id = TenantId::new(&f.tenant)
                .map_err(|e| PolicyError::Tenant { path: path.clone(), message: e.to_string() })?;
            let policy = TenantPolicy { enabled: f.enabled.or(d.enabled).unwrap_or(true) };
            tenants.insert(id, policy);
        }
        Ok(PolicySet { tenants })
    }

    /// Reads `dir`: `_defaults.toml` and every other `*.toml`, then [`PolicySet::parse`].
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        let read_err =
            |path: &Path, e: std::io::Error| PolicyError::Read { path: path.to_owned(), message: e.to_string() };
        let defaults_path = dir.join(DEFAULTS_FILE);
        let defaults = match std::fs::read_to_string(&defaults_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PolicyError::NoDefaults { dir: dir.to_owned() })
            }
            Err(e) => return Err(read_err(&defaults_path, e)),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
            let path = entry.map_err(|e| read_err(dir, e))?.path();
            let is_toml = path.extension().is_some_and(|x| x == "toml");
            if !is_toml || path.file_name().is_some_and(|n| n == DEFAULTS_FILE) {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
            files.push((path, text));
        }
        files.sort();
        PolicySet::parse((&defaults_path, &defaults), &files)
    }

    /// May this tenant connect or publish?
    pub fn admit(&self, tenant: &TenantId) -> Admission {
        match self.tenants.get(tenant) {
            None => Admission::UnknownTenant,
            Some(p) if !p.enabled => Admission::Disabled,
            Some(_) => Admission::Allowed,
        }
    }

    /// The tenants with a policy.
    pub fn tenants(&self) -> impl Iterator<Item = &TenantId> {
        self.tenants.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        list.iter().map(|(n, t)| (PathBuf::from(format!("policies/{n}")), t.to_string())).collect()
    }

    fn parse(defaults: &str, list: &[(&str, &str)]) -> Result<PolicySet, PolicyError> {
        PolicySet::parse((Path::new("policies/_defaults.toml"), defaults), &files(list))
    }

    fn t(s: &str) -> TenantId {
        TenantId::new(s).expect("tenant")
    }

    #[test]
    fn tenants_inherit_defaults_and_override_them() {
        let set = parse(
            "enabled = true\n",
            &[("acme.toml", "tenant = \"acme\"\n"), ("globex.toml", "tenant = \"globex\"\nenabled = false\n")],
        )
        .expect("valid");
        assert_eq!(set.admit(&t("acme")), Admission::Allowed);
        assert_eq!(set.admit(&t("globex")), Admission::Disabled);
        assert_eq!(set.admit(&t("initech")), Admission::UnknownTenant);
        let off = parse("enabled = false\n", &[("acme.toml", "tenant = \"acme\"\n")]).expect("valid");
        assert_eq!(off.admit(&t("acme")), Admission::Disabled);
    }

    #[test]
    fn bad_files_are_named_with_line_and_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("enabled = true\nbogus = 1\n", &[], "_defaults.toml"),
            ("", &[("acme.toml", "tenant = \"acme\"\ncolour = \"red\"\n")], "colour"),
            ("", &[("acme.toml", "tenant = \"acme\"\nenabled = \"yes\"\n")], "line 2"),
            ("", &[("acme.toml", "tenant = \"globex\"\n")], "does not match"),
            ("", &[("acme.toml", "enabled = true\n")], "tenant"),
            ("", &[("a b.toml", "tenant = \"a b\"\n")], "valid tenant id"),
            ("", &[("acme.toml", "tenant = [\n")], "acme.toml"),
        ];
        for (d, list, needle) in cases {
            let err = parse(d, list).expect_err("refused").to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}

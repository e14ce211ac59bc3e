//! Token validation: configured keys, each with exactly one algorithm, turning a bearer token into
//! a [`Principal`] or a typed [`AuthError`] with a stable reason code.
//!
//! The token's header never chooses how it is verified: the `kid` selects a configured key, and
//! the key's own algorithm must equal the header's (`alg: none` and HS/RS confusion cannot
//! happen). `exp`, `sub` and the tenant claim are required; `nbf` is enforced when present;
//! `iss`/`aud` are required when configured, and a key bound to an issuer verifies only that
//! issuer's tokens. Tokens are never logged or stored: only `jti` or a short hash leave here.

mod jwks;
pub mod token;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, KeyConfig};
use crate::event::TenantId;
pub use jwks::JwksError;
use jwks::JwksSource;

/// Why a token was refused. `code()` is the stable reason sent to the client and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token on the request.
    #[error("no bearer token")]
    Missing,
    /// Not a JWT, or a badly formed header.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The `kid` names no configured key.
    #[error("no key with kid `{0}`")]
    UnknownKid(String),
    /// The header's algorithm is not the key's.
    #[error("algorithm not allowed for this key")]
    AlgorithmNotAllowed,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer (or the key's).
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` is not the configured audience.
    #[error("wrong audience")]
    WrongAudience,
    /// A required claim is absent.
    #[error("missing claim `{0}`")]
    MissingClaim(String),
    /// A claim has an unusable value.
    #[error("invalid claim `{0}`")]
    InvalidClaim(String),
}

impl AuthError {
    /// Stable reason code (the `code` of the 401 body and the `reason` label of the metric).
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::UnknownKid(_) => "unknown_kid",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::InvalidClaim(_) => "invalid_claim",
        }
    }
}

/// Why the key configuration cannot be used. Names the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Something about one key is wrong.
    #[error("auth key `{kid}`: {message}")]
    Key {
        /// The key id.
        kid: String,
        /// What is wrong.
        message: String,
    },
}

/// Roles a token may carry in its `roles` claim (an array of strings, or one space-separated string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles(u8);

impl Roles {
    /// May publish events for its tenant.
    pub const PUBLISHER: Roles = Roles(1);
    /// May publish for any tenant (with `publisher`).
    pub const SYSTEM: Roles = Roles(2);
    /// May use the admin API.
    pub const ADMIN: Roles = Roles(4);
    /// May read the audit log.
    pub const AUDITOR: Roles = Roles(8);
    /// May read `/metrics` when `metrics.require_token` is set.
    pub const METRICS: Roles = Roles(16);

    fn from_name(name: &str) -> Roles {
        match name {
            "publisher" => Roles::PUBLISHER,
            "system" => Roles::SYSTEM,
            "admin" => Roles::ADMIN,
            "auditor" => Roles::AUDITOR,
            "metrics" => Roles::METRICS,
            _ => Roles(0),
        }
    }

    /// Does this set hold every role of `other`?
    pub fn contains(self, other: Roles) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Who a request or session acts for; derived from a verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The tenant claim.
    pub tenant: TenantId,
    /// The `sub` claim.
    pub subject: String,
    /// Known roles from the `roles` claim.
    pub roles: Roles,
    /// `jti`, or the first 16 hex digits of the token's SHA-256.
    pub token_id: String,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Every claim, for mapping further claims to mandatory labels.
    pub claims: Map<String, Value>,
}

struct Key {
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
}

/// The verification keys and rules; built once from [`AuthConfig`].
pub struct Authenticator {
    /// Configured keys by (bound issuer, kid); `None` = not bound to an issuer.
    keys: HashMap<(Option<String>, String), Key>,
    jwks: Vec<Arc<JwksSource>>,
    tenant_claim: String,
    /// label → claim: further mandatory labels taken from the token (beside `tenant`).
    claim_labels: Vec<(String, String)>,
    allow_query_token: bool,
}

fn key_err(kid: &str, message: impl Into<String>) -> KeyError {
    KeyError::Key { kid: kid.to_owned(), message: message.into() }
}

fn hs_secret(k: &KeyConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<u8>, KeyError> {
    let secret = match (&k.secret, &k.secret_env, &k.secret_file) {
        (Some(s), None, None) => s.clone(),
        (None, Some(var), None) => {
            env(var).ok_or_else(|| key_err(&k.kid, format!("environment variable {var} is not set")))?
        }
        (None, None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| key_err(&k.kid, format!("cannot read secret_file {}: {e}", path.display())))?
            .trim()
            .to_owned(),
        _ => return Err(key_err(&k.kid, "HS keys take exactly one of secret, secret_env, secret_file")),
    };
    if secret.len() < 32 {
        return Err(key_err(&k.kid, "HS secrets must be at least 32 bytes"));
    }
    Ok(secret.into_bytes())
}

fn public_pem(k: &KeyConfig) -> Result<Vec<u8>, KeyError> {
    let path = k.public_key.as_ref().ok_or_else(|| key_err(&k.kid, "asymmetric keys need public_key (a PEM file)"))?;
    if k.secret.is_some() || k.secret_env.is_some() || k.secret_file.is_some() {
        return Err(key_err(&k.kid, "asymmetric keys take public_key, not a secret"));
    }
    std::fs::read(path).map_err(|e| key_err(&k.kid, format!("cannot read public_key {}: {e}", path.display())))
}

impl Authenticator {
    /// Builds the key set. `env` resolves `secret_env` names (the caller passes the process
    /// environment; tests pass a map).
    pub fn new(config: &AuthConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Authenticator, KeyError> {
        let mut keys = HashMap::new();
        for k in &config.keys {
            if k.kid.is_empty() {
                return Err(key_err("", "every key needs a kid"));
            }
            let alg: Algorithm =
                k.algorithm.parse().map_err(|_| key_err(&k.kid, format!("unknown algorithm `{}`", k.algorithm)))?;
            let (decoding, encoding) = match alg {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    let secret = hs_secret(k, env)?;
                    (DecodingKey::from_secret(&secret), Some(EncodingKey::from_secret(&secret)))
                }
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => {
                    let pem = public_pem(k)?;
                    (
                        DecodingKey::from_rsa_pem(&pem)
                            .map_err(|e| key_err(&k.kid, format!("bad RSA public key: {e}")))?,
                        None,
                    )
                }
                Algorithm::ES256 | Algorithm::ES384 => {
                    let pem = public_pem(k)?;
                    (
                        DecodingKey::from_ec_pem(&pem)
                            .map_err(|e| key_err(&k.kid, format!("bad EC public key: {e}")))?,
                        None,
                    )
                }
                Algorithm::EdDSA => {
                    let pem = public_pem(k)?;
                    (
                        DecodingKey::from_ed_pem(&pem)
                            .map_err(|e| key_err(&k.kid, format!("bad Ed25519 public key: {e}")))?,
                        None,
                    )
                }
                other => return Err(key_err(&k.kid, format!("algorithm {other:?} is not supported"))),
            };
            let mut validation = Validation::new(alg);
            validation.leeway = config.leeway_secs;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            let mut required = vec!["exp", "sub"];
            let issuer = k.issuer.as_ref().or(config.issuer.as_ref());
            if let Some(iss) = issuer {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            match &config.audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    required.push("aud");
                }
                None => validation.validate_aud = false,
            }
            validation.set_required_spec_claims(&required);
            if keys.insert((k.issuer.clone(), k.kid.clone()), Key { decoding, encoding, validation }).is_some() {
                return Err(key_err(&k.kid, "duplicate kid"));
            }
        }
        let jwks = config
            .jwks
            .iter()
            .map(|j| JwksSource::new(j, config.audience.as_deref(), config.leeway_secs).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() && jwks.is_empty() {
            return Err(key_err("", "no keys: configure [[auth.keys]] or [[auth.jwks]]"));
        }
        let claim_labels = config.claim_labels.iter().map(|(l, c)| (l.clone(), c.clone())).collect();
        Ok(Authenticator {
            keys,
            jwks,
            tenant_claim: config.tenant_claim.clone(),
            claim_labels,
            allow_query_token: config.allow_query_token,
        })
    }

    /// Whether `?access_token=` is accepted.
    pub fn allow_query_token(&self) -> bool {
        self.allow_query_token
    }

    /// Verifies a token and builds its principal. Looks keys up by `kid`: the configured keys
    /// first, then the key sets of the token's issuer (which may refetch, rate-limited).
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        use jsonwebtoken::errors::ErrorKind as K;
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed("not a JWT"))?;
        let jwk;
        let (decoding, validation) = match &header.kid {
            Some(kid) => {
                // The unverified issuer only routes the lookup to its own keys: keys are bound
                // to (issuer, kid), and the verification below then requires that issuer.
                let issuer = unverified_issuer(token)?;
                let bound = issuer.as_ref().and_then(|i| self.keys.get(&(Some(i.clone()), kid.clone())));
                match bound {
                    Some(k) => (&k.decoding, &k.validation),
                    None => match self.jwks_key(issuer.as_deref(), kid).await {
                        Some(k) => {
                            jwk = k;
                            (&jwk.decoding, &jwk.validation)
                        }
                        None => match self.keys.get(&(None, kid.clone())) {
                            Some(k) => (&k.decoding, &k.validation),
                            None => return Err(AuthError::UnknownKid(kid.chars().take(64).collect())),
                        },
                    },
                }
            }
            None if self.keys.len() == 1 && self.jwks.is_empty() => {
                let k = self.keys.values().next().ok_or(AuthError::Malformed("no kid"))?;
                (&k.decoding, &k.validation)
            }
            None => return Err(AuthError::Malformed("token has no kid")),
        };
        if !validation.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, decoding, validation).map_err(|e| match e.kind() {
                K::InvalidSignature => AuthError::BadSignature,
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidIssuer => AuthError::WrongIssuer,
                K::InvalidAudience => AuthError::WrongAudience,
                K::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
                K::InvalidClaimFormat(c) => AuthError::InvalidClaim(c.clone()),
                K::InvalidAlgorithm => AuthError::AlgorithmNotAllowed,
                _ => AuthError::Malformed("token does not decode"),
            })?;
        self.principal(token, data.claims)
    }

    /// A key of the key sets bound to `issuer` (which may refetch, rate-limited).
    async fn jwks_key(&self, issuer: Option<&str>, kid: &str) -> Option<Arc<jwks::JwkKey>> {
        let issuer = issuer?;
        for source in self.jwks.iter().filter(|s| s.issuer == issuer) {
            if let Some(k) = source.key(kid).await {
                return Some(k);
            }
        }
        None
    }

    /// The labels every subscription of this principal must carry: `tenant`, plus the
    /// configured claim mappings. A mapped claim the token lacks refuses the token. Sorted by
    /// label, each label once (a vector: every session keeps one, and a map costs far more).
    pub fn mandatory_labels(&self, p: &Principal) -> Result<Vec<(String, String)>, AuthError> {
        let mut labels = std::collections::BTreeMap::from([("tenant".to_owned(), p.tenant.as_str().to_owned())]);
        for (label, claim) in &self.claim_labels {
            match p.claims.get(claim) {
                Some(Value::String(v)) if !v.is_empty() && v.len() <= 256 => {
                    labels.insert(label.clone(), v.clone());
                }
                Some(_) => return Err(AuthError::InvalidClaim(claim.clone())),
                None => return Err(AuthError::MissingClaim(claim.clone())),
            }
        }
        Ok(labels.into_iter().collect())
    }

    fn principal(&self, token: &str, claims: Map<String, Value>) -> Result<Principal, AuthError> {
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
            Some(_) => return Err(AuthError::InvalidClaim("sub".into())),
            None => return Err(AuthError::MissingClaim("sub".into())),
        };
        let tenant = match claims.get(&self.tenant_claim) {
            Some(Value::String(s)) => {
                TenantId::new(s).map_err(|_| AuthError::InvalidClaim(self.tenant_claim.clone()))?
            }
            Some(_) => return Err(AuthError::InvalidClaim(self.tenant_claim.clone())),
            None => return Err(AuthError::MissingClaim(self.tenant_claim.clone())),
        };
        let roles = match claims.get("roles") {
            None => Roles::default(),
            Some(Value::String(s)) => {
                s.split_whitespace().fold(Roles::default(), |acc, r| Roles(acc.0 | Roles::from_name(r).0))
            }
            Some(Value::Array(a)) => a.iter().try_fold(Roles::default(), |acc, r| {
                r.as_str()
                    .map(|r| Roles(acc.0 | Roles::from_name(r).0))
                    .ok_or_else(|| AuthError::InvalidClaim("roles".into()))
            })?,
            Some(_) => return Err(AuthError::InvalidClaim("roles".into())),
        };
        let expires_at =
            claims.get("exp").and_then(Value::as_u64).ok_or_else(|| AuthError::InvalidClaim("exp".into()))?;
        let token_id = match claims.get("jti") {
            Some(Value::String(j)) if !j.is_empty() && j.len() <= 128 => j.clone(),
            _ => short_hash(token),
        };
        Ok(Principal { tenant, subject, roles, token_id, expires_at, claims })
    }

    /// Signs a token with a configured HS key (dev tokens, tests, the load generator).
    pub fn mint(&self, kid: &str, claims: &Map<String, Value>) -> Result<String, KeyError> {
        let key = self
            .keys
            .iter()
            .find(|((_, k), _)| k == kid)
            .map(|(_, key)| key)
            .ok_or_else(|| key_err(kid, "no such key"))?;
        let enc = key.encoding.as_ref().ok_or_else(|| key_err(kid, "only HS keys can mint tokens here"))?;
        let alg = key.validation.algorithms.first().copied().unwrap_or(Algorithm::HS256);
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, enc).map_err(|e| key_err(kid, format!("cannot sign: {e}")))
    }
}

/// The `iss` claim of a token before verification: used only to pick which keys to try.
fn unverified_issuer(token: &str) -> Result<Option<String>, AuthError> {
    let claims: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|_| AuthError::Malformed("token does not decode"))?;
    Ok(match claims.get("iss") {
        Some(Value::String(i)) => Some(i.clone()),
        _ => None,
    })
}

/// First 16 hex digits of the SHA-256 of a token: identifies it in logs without revealing it.
pub fn short_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Writes a random 256-bit hex secret to `path` (mode 0600) unless the file exists. Returns
/// whether it wrote one. For the dev key only.
pub fn ensure_dev_secret(path: &Path) -> std::io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    opts.open(path)?.write_all(hex.as_bytes())?;
    Ok(true)
}

#[cfg(test)]
mod tests;

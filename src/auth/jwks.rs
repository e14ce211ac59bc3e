//! JWKS key sources: a file or an HTTPS URL named in the configuration (never in a token), each
//! bound to one issuer, so keys are cached by (issuer, kid) and a key of one issuer never verifies
//! another issuer's token.
//!
//! A URL is fetched over HTTPS only, without following redirects, with a size cap and a timeout.
//! An unknown `kid` triggers a refetch at most once per `refresh_min_interval_secs`; keys older than
//! `cache_ttl_secs` are refetched on next use (same limit), so a key removed from the set stops
//! verifying. A failed fetch keeps the keys already cached. Symmetric (`oct`) keys and keys
//! marked for encryption are never taken from a key set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer, ClientConfig};

use super::KeyError;
use crate::config::JwksConfig;

/// Why a key set could not be fetched or read (logged; the cached keys stay in force).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("cannot read {0}")]
    File(String),
    /// The URL could not be fetched.
    #[error("fetching the key set of {issuer}: {message}")]
    Fetch {
        /// The issuer (the URL is not logged: it may carry credentials).
        issuer: String,
        /// What failed.
        message: String,
    },
    /// The document is not a JWK set.
    #[error("{origin}: not a JWK set: {message}")]
    Parse {
        /// File or URL.
        origin: String,
        /// The parser's message.
        message: String,
    },
}

/// One verification key taken from a key set, with the validation rules of its issuer.
pub(crate) struct JwkKey {
    pub(crate) decoding: DecodingKey,
    pub(crate) validation: Validation,
}

enum Origin {
    File(PathBuf),
    Url { url: String, tls: Arc<ClientConfig> },
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Origin::File(p) => p.display().to_string(),
            Origin::Url { url, .. } => url.clone(),
        }
    }
}

struct Cache {
    keys: HashMap<String, Arc<JwkKey>>,
    fetched_at: Option<Instant>,
}

/// One configured key set.
pub(crate) struct JwksSource {
    pub(crate) issuer: String,
    origin: Origin,
    algorithms: Vec<Algorithm>,
    base: Validation,
    refresh_min: Duration,
    ttl: Duration,
    max_stale: Duration,
    timeout: Duration,
    max_bytes: usize,
    cache: RwLock<Cache>,
    /// Serializes refetches and remembers when the last one was attempted.
    refetch: tokio::sync::Mutex<Option<Instant>>,
}

fn key_err(issuer: &str, message: impl Into<String>) -> KeyError {
    KeyError::Key { kid: format!("jwks for {issuer}"), message: message.into() }
}

/// The algorithms a key of this shape can verify.
fn family_allows(params: &AlgorithmParameters, alg: Algorithm) -> bool {
    use Algorithm::*;
    match params {
        AlgorithmParameters::RSA(_) => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => alg == ES256,
            EllipticCurve::P384 => alg == ES384,
            _ => false,
        },
        AlgorithmParameters::OctetKeyPair(p) => p.curve == EllipticCurve::Ed25519 && alg == EdDSA,
        // Symmetric keys never come from a key set.
        _ => false,
    }
}

/// A client TLS configuration for fetching key sets: the public web roots, plus a private CA
/// when configured.
fn client_tls(ca_file: Option<&PathBuf>, issuer: &str) -> Result<Arc<ClientConfig>, KeyError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca_file {
        let certs =
            CertificateDer::pem_file_iter(ca).map_err(|e| key_err(issuer, format!("ca_file {}: {e}", ca.display())))?;
        for c in certs {
            let c = c.map_err(|e| key_err(issuer, format!("ca_file {}: {e}", ca.display())))?;
            roots.add(c).map_err(|e| key_err(issuer, format!("ca_file {}: {e}", ca.display())))?;
        }
    }
    let config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| key_err(issuer, e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// GETs an HTTPS URL: no redirects, at most `max_bytes` of body, within `timeout`.
async fn fetch_https(
    url: &str,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    max_bytes: usize,
) -> Result<Vec<u8>, String> {
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err("only https URLs are fetched".into());
    }
    let host = uri.host().ok_or("URL has no host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let work = async move {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(conn);
        let bracketed = if host.contains(':') { format!("[{host}]") } else { host.clone() };
        let authority = if port == 443 { bracketed } else { format!("{bracketed}:{port}") };
        let req = axum::http::Request::get(path)
            .header(axum::http::header::HOST, authority)
            .header(axum::http::header::ACCEPT, "application/json")
            .header(axum::http::header::USER_AGENT, "incident-stream")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let result = if status.is_redirection() {
            Err(format!("answered {status}: redirects are not followed"))
        } else if !status.is_success() {
            Err(format!("answered {status}"))
        } else {
            http_body_util::Limited::new(resp.into_body(), max_bytes)
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .map_err(|e| format!("body: {e} (limit {max_bytes} bytes)"))
        };
        driver.abort();
        result
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| format!("timed out after {timeout:?}"))?
}

impl JwksSource {
    /// Builds a source from its configuration; a file source is read at once (and must parse).
    pub(crate) fn new(c: &JwksConfig, audience: Option<&str>, leeway: u64) -> Result<JwksSource, KeyError> {
        let issuer = c.issuer.clone();
        if issuer.is_empty() {
            return Err(key_err("?", "every [[auth.jwks]] needs the issuer its keys are bound to"));
        }
        let origin = match (&c.file, &c.url) {
            (Some(f), None) => Origin::File(f.clone()),
            (None, Some(u)) => {
                if !u.starts_with("https://") {
                    return Err(key_err(&issuer, format!("url `{u}` must be https://")));
                }
                Origin::Url { url: u.clone(), tls: client_tls(c.ca_file.as_ref(), &issuer)? }
            }
            _ => return Err(key_err(&issuer, "exactly one of file or url is required")),
        };
        if c.algorithms.is_empty() {
            return Err(key_err(&issuer, "algorithms must list the algorithms its keys may use"));
        }
        let algorithms = c
            .algorithms
            .iter()
            .map(|a| match a.parse::<Algorithm>() {
                Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => {
                    Err(key_err(&issuer, "HS algorithms cannot come from a key set"))
                }
                Ok(alg) => Ok(alg),
                Err(_) => Err(key_err(&issuer, format!("unknown algorithm `{a}`"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut base = Validation::new(algorithms[0]);
        base.leeway = leeway;
        base.validate_nbf = true;
        base.set_issuer(&[&issuer]);
        let mut required = vec!["exp", "sub", "iss"];
        match audience {
            Some(aud) => {
                base.set_audience(&[aud]);
                required.push("aud");
            }
            None => base.validate_aud = false,
        }
        base.set_required_spec_claims(&required);
        let source = JwksSource {
            issuer,
            origin,
            algorithms,
            base,
            refresh_min: Duration::from_secs(c.refresh_min_interval_secs),
            ttl: Duration::from_secs(c.cache_ttl_secs),
            max_stale: Duration::from_secs(c.max_stale_secs),
            timeout: Duration::from_secs(c.timeout_secs),
            max_bytes: c.max_bytes,
            cache: RwLock::new(Cache { keys: HashMap::new(), fetched_at: None }),
            refetch: tokio::sync::Mutex::new(None),
        };
        if let Origin::File(path) = &source.origin {
            let bytes = std::fs::read(path)
                .map_err(|e| key_err(&source.issuer, format!("cannot read {}: {e}", path.display())))?;
            let keys = source.parse(&bytes).map_err(|e| key_err(&source.issuer, e.to_string()))?;
            source.store(keys);
        }
        Ok(source)
    }

    fn parse(&self, bytes: &[u8]) -> Result<HashMap<String, Arc<JwkKey>>, JwksError> {
        let set: JwkSet = serde_json::from_slice(bytes)
            .map_err(|e| JwksError::Parse { origin: self.origin.describe(), message: e.to_string() })?;
        let mut keys = HashMap::new();
        for jwk in set.keys {
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            // KeyAlgorithm's names are the JOSE names; encryption algorithms do not parse.
            let named = jwk.common.key_algorithm.map(|a| format!("{a:?}").parse::<Algorithm>());
            let allowed: Vec<Algorithm> = match named {
                // The key names its algorithm: it must be on the allowlist and fit the key.
                Some(Ok(alg)) => {
                    if self.algorithms.contains(&alg) && family_allows(&jwk.algorithm, alg) {
                        vec![alg]
                    } else {
                        vec![]
                    }
                }
                Some(Err(_)) => vec![],
                None => self.algorithms.iter().copied().filter(|a| family_allows(&jwk.algorithm, *a)).collect(),
            };
            if allowed.is_empty() {
                tracing::debug!(issuer = %self.issuer, kid = %kid, "JWK skipped: no allowed algorithm fits it");
                continue;
            }
            let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
                tracing::warn!(issuer = %self.issuer, kid = %kid, "JWK skipped: cannot be decoded");
                continue;
            };
            let mut validation = self.base.clone();
            validation.algorithms = allowed;
            keys.insert(kid, Arc::new(JwkKey { decoding, validation }));
        }
        Ok(keys)
    }

    fn store(&self, keys: HashMap<String, Arc<JwkKey>>) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        cache.keys = keys;
        cache.fetched_at = Some(Instant::now());
    }

    /// The cached key (None once the cache is older than `max_stale`: fail closed) and whether
    /// the cache is fresh.
    fn cached(&self, kid: &str) -> (Option<Arc<JwkKey>>, bool) {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let age = cache.fetched_at.map(|t| t.elapsed());
        let usable = age.is_some_and(|a| a < self.max_stale);
        let fresh = age.is_some_and(|a| a < self.ttl);
        (cache.keys.get(kid).filter(|_| usable).cloned(), fresh)
    }

    async fn load(&self) -> Result<HashMap<String, Arc<JwkKey>>, JwksError> {
        let bytes = match &self.origin {
            Origin::File(path) => {
                tokio::fs::read(path).await.map_err(|e| JwksError::File(format!("{}: {e}", path.display())))?
            }
            Origin::Url { url, tls } => fetch_https(url, Arc::clone(tls), self.timeout, self.max_bytes)
                .await
                .map_err(|message| JwksError::Fetch { issuer: self.issuer.clone(), message })?,
        };
        self.parse(&bytes)
    }

    /// The key for `kid`. A known key is served at once (a stale cache is refreshed in the
    /// background); an unknown kid waits for a refetch. Refetches happen at most once per
    /// `refresh_min_interval_secs`.
    pub(crate) async fn key(self: &Arc<Self>, kid: &str) -> Option<Arc<JwkKey>> {
        let (hit, fresh) = self.cached(kid);
        if let Some(k) = hit {
            if !fresh {
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    if let Ok(last) = me.refetch.try_lock() {
                        me.refetch_locked(last).await;
                    }
                });
            }
            return Some(k);
        }
        let last = self.refetch.lock().await;
        // Someone else may have refetched while this request waited.
        if let (Some(k), _) = self.cached(kid) {
            return Some(k);
        }
        self.refetch_locked(last).await;
        self.cached(kid).0
    }

    async fn refetch_locked(&self, mut last: tokio::sync::MutexGuard<'_, Option<Instant>>) {
        if last.is_some_and(|t| t.elapsed() < self.refresh_min) {
            return;
        }
        *last = Some(Instant::now());
        match self.load().await {
            Ok(keys) => {
                tracing::info!(issuer = %self.issuer, keys = keys.len(), "JWKS refreshed");
                self.store(keys);
            }
            Err(e) => tracing::warn!(issuer = %self.issuer, error = %e, "JWKS refresh failed; keeping cached keys"),
        }
    }
}

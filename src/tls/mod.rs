//! TLS termination in the server: the rustls configuration (TLS 1.2 and 1.3 only, ALPN
//! `http/1.1`, the aws-lc-rs provider passed explicitly so no process-wide default is needed),
//! the dev certificate generator, and the watcher that reloads certificate and key when they
//! change on disk without touching live connections; [`stream`] is the TLS stream itself, on
//! rustls's unbuffered API so an idle connection holds no TLS buffer.
//!
//! A reload that fails (a half-written file, a key that does not match) keeps the certificate in
//! force and logs why; the next change is tried again.

pub mod stream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS material could not be loaded or generated. Names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the certificate and key.
    #[error("certificate {cert} with key {key}: {message}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        message: String,
    },
    /// Generating dev certificates failed.
    #[error("generating dev certificates: {0}")]
    Generate(String),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_owned(), message: e.to_string() }
}

/// The crypto provider used for every TLS context of the service.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the server configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, e))?;
    if chain.is_empty() {
        return Err(file_err(cert, "no certificate in the file"));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let config_err =
        |e: rustls::Error| TlsError::Config { cert: cert.to_owned(), key: key.to_owned(), message: e.to_string() };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(config_err)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Paths written by [`generate_dev_certs`].
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The dev CA certificate (trust this in clients).
    pub ca_cert: PathBuf,
    /// The dev CA key.
    pub ca_key: PathBuf,
    /// The server certificate (for localhost, 127.0.0.1 and ::1), signed by the CA.
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
}

fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path).and_then(|mut f| f.write_all(contents.as_bytes())).map_err(|e| file_err(path, e))
}

/// Writes a server certificate for `localhost`, `127.0.0.1` and `::1` (ECDSA P-256) and its key
/// to the given paths, signed by a fresh dev CA written beside them as `ca.crt` and `ca.key`.
/// Keys are written with mode 0600.
pub fn generate_dev_certs(server_cert: &Path, server_key: &Path) -> Result<DevCerts, TlsError> {
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let dir = server_cert.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    if let Some(kdir) = server_key.parent() {
        std::fs::create_dir_all(kdir).map_err(|e| file_err(kdir, e))?;
    }
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "incident-stream dev CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate().map_err(gen)?;
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let mut server = CertificateParams::new(names).map_err(gen)?;
    server.distinguished_name.push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let leaf_cert = server.signed_by(&leaf_key, &issuer).map_err(gen)?;

    let out = DevCerts {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        server_cert: server_cert.to_owned(),
        server_key: server_key.to_owned(),
    };
    write_private(&out.ca_key, &ca_key_pem)?;
    write_private(&out.server_key, &leaf_key.serialize_pem())?;
    std::fs::write(&out.ca_cert, ca_cert.pem()).map_err(|e| file_err(&out.ca_cert, e))?;
    std::fs::write(&out.server_cert, leaf_cert.pem()).map_err(|e| file_err(&out.server_cert, e))?;
    Ok(out)
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// Polls certificate and key every `interval`; when either changed, loads both and swaps them
/// in for new handshakes. Live connections keep the session they negotiated.
pub async fn watch(config: RustlsConfig, cert: PathBuf, key: PathBuf, interval: Duration) {
    let mut last = (stamp(&cert), stamp(&key));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = (stamp(&cert), stamp(&key));
        if now == last {
            continue;
        }
        match server_config(&cert, &key) {
            Ok(c) => {
                config.reload_from_config(c);
                last = now;
                tracing::info!(cert = %cert.display(), key = %key.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate changed but cannot be loaded; keeping the current one")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_dev_certs_load_and_bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("incident-stream-tls-unit-{}", std::process::id()));
        let certs = generate_dev_certs(&dir.join("server.crt"), &dir.join("server.key")).expect("generate");
        assert!(server_config(&certs.server_cert, &certs.server_key).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&certs.server_key).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
        }
        let err = server_config(&dir.join("missing.crt"), &certs.server_key).expect_err("refused").to_string();
        assert!(err.contains("missing.crt"), "{err}");
        // A key that does not belong to the certificate.
        let err = server_config(&certs.server_cert, &certs.ca_key).expect_err("refused").to_string();
        assert!(err.contains("server.crt"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! The `incident-stream` command line: `serve` (the default), `certs generate`, `policy check`,
//! `audit verify` and `audit query`, `token` (mint a dev token).
//! Parsing arguments, loading the configuration and wiring signals live here; everything else is
//! in the library.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use incident_stream::config::{Config, LogFormat};
use incident_stream::Server;

#[derive(Parser)]
#[command(name = "incident-stream", version, about = "Secure multi-tenant incident event streaming")]
struct Cli {
    /// Configuration file (default: ./incident-stream.toml, or the embedded defaults if absent).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Tenant policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The audit log: verify its hash chain, query its records.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Mint a token with a configured HS key (for development and the walkthrough).
    Token {
        /// Tenant claim.
        #[arg(long)]
        tenant: String,
        /// Subject (`sub`).
        #[arg(long)]
        sub: String,
        /// Comma-separated roles (publisher, system, admin, auditor, metrics).
        #[arg(long, default_value = "")]
        roles: String,
        /// Lifetime: e.g. 3600, 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Key id to sign with (default: the first HS key).
        #[arg(long)]
        kid: Option<String>,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a dev CA and a server certificate for localhost, 127.0.0.1 and ::1.
    Generate {
        /// Directory to write `ca.crt`, `ca.key`, `server.crt`, `server.key` into.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory exactly as the server loads it; non-zero exit on any error.
    Check {
        /// The directory (default: `[policies] dir` of the configuration).
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the hash chain across the given files (any order; default: the configured log and
    /// its rotated files). Exit 0 with a count, or 1 naming the first bad seq and what is wrong.
    Verify {
        /// Audit files (the active one and rotated ones).
        files: Vec<PathBuf>,
        /// Accept a log that does not start at seq 1 (earlier files archived or deleted).
        #[arg(long)]
        partial: bool,
    },
    /// Print the records that match every given condition, as JSON lines, across rotated files.
    Query {
        /// The active audit file (default: `[audit] path` of the configuration).
        #[arg(long)]
        path: Option<PathBuf>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        /// A record kind, e.g. connection.rejected.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        session: Option<String>,
        /// RFC 3339, inclusive.
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339, exclusive.
        #[arg(long)]
        until: Option<String>,
    },
}

fn audit_verify(config: &Config, files: Vec<PathBuf>, partial: bool) -> Result<bool> {
    use incident_stream::audit;
    let files = if files.is_empty() {
        audit::log_files(&config.audit.path)?.into_iter().map(|(p, _)| p).collect()
    } else {
        audit::chain_order(&files)
    };
    if files.is_empty() {
        bail!("no audit files at {}", config.audit.path.display());
    }
    match audit::verify(&files, partial)? {
        Ok(v) => {
            match &v.span {
                Some((first, last)) => println!(
                    "ok: {} records in {} file(s), seq {first}..{}, last hash {}",
                    v.records, v.files, last.seq, last.hash
                ),
                None => println!("ok: no records in {} file(s)", v.files),
            }
            Ok(true)
        }
        Err(broken) => {
            println!("FAILED: {broken}");
            Ok(false)
        }
    }
}

struct QueryArgs {
    path: Option<PathBuf>,
    tenant: Option<String>,
    subject: Option<String>,
    kind: Option<String>,
    session: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

fn audit_query(config: &Config, a: QueryArgs) -> Result<()> {
    use incident_stream::audit;
    use std::io::Write;
    let q = audit::Query {
        tenant: a.tenant,
        subject: a.subject,
        session_id: a.session,
        kind: a.kind.as_deref().map(audit::parse_kind).transpose()?,
        since: a.since.as_deref().map(|s| audit::parse_time("since", s)).transpose()?,
        until: a.until.as_deref().map(|s| audit::parse_time("until", s)).transpose()?,
        after_seq: None,
    };
    let path = a.path.unwrap_or_else(|| config.audit.path.clone());
    let files = audit::log_files(&path)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut failed = None;
    audit::query_files(&files, &q, |line, _| match writeln!(out, "{line}") {
        Ok(()) => true,
        Err(e) => {
            failed = Some(e);
            false
        }
    })?;
    if let Some(e) = failed {
        // A closed pipe (`| head`) is a normal end.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    let _ = out.flush();
    Ok(())
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let (path, explicit) = match path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("incident-stream.toml"), false),
    };
    Ok(Config::load(&path, explicit, &env)?)
}

fn parse_ttl(s: &str) -> Result<Duration> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().with_context(|| format!("bad --ttl `{s}`"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("bad --ttl unit in `{s}` (use s, m, h or d)"),
    };
    if secs == 0 {
        bail!("--ttl must be positive");
    }
    Ok(Duration::from_secs(secs))
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn ensure_dev_secrets(config: &Config) -> Result<()> {
    for key in config.auth.keys.iter().filter(|k| k.generate) {
        if let Some(path) = &key.secret_file {
            if incident_stream::auth::ensure_dev_secret(path)
                .with_context(|| format!("cannot create dev secret {}", path.display()))?
            {
                tracing::info!(kid = %key.kid, path = %path.display(), "generated a random dev signing secret (missing)");
            }
        }
    }
    Ok(())
}

fn ensure_dev_certs(config: &Config) -> Result<()> {
    let tls = &config.tls;
    if tls.enabled && tls.generate && !tls.cert.exists() && !tls.key.exists() {
        let certs = incident_stream::tls::generate_dev_certs(&tls.cert, &tls.key)?;
        tracing::info!(
            cert = %certs.server_cert.display(), ca = %certs.ca_cert.display(),
            "generated dev TLS certificates (missing); clients trust the dev CA"
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

async fn serve(config: Config) -> Result<()> {
    init_logging(&config);
    ensure_dev_secrets(&config)?;
    ensure_dev_certs(&config)?;
    let ca = config.tls.cert.parent().map(|d| d.join("ca.crt")).unwrap_or_else(|| PathBuf::from("ca.crt"));
    let audit = config.audit.enabled.then(|| config.audit.path.clone());
    let server = Server::builder().config(config).build()?;
    let running = server.start().await?;
    let addr = running.local_addr();
    let (http, ws, cacert) = if running.tls() {
        ("https", "wss", format!("--cacert {} ", ca.display()))
    } else {
        ("http", "ws", String::new())
    };
    println!("incident-stream is listening on {http}://{addr}");
    println!("  mint a publisher token:   incident-stream token --tenant acme --sub alice --roles publisher");
    println!("  publish:                  curl {cacert}-H \"Authorization: Bearer $TOKEN\" \\");
    println!("                              -H 'Content-Type: application/json' \\");
    println!("                              -d '{{\"event_type\":\"incident_created\",\"severity\":\"P1\"}}' {http}://{addr}/v1/events");
    println!("  subscribe (WebSocket):    {ws}://{addr}/ws with header Authorization: Bearer <token>");
    println!("  health / metrics:         {http}://{addr}/health  {http}://{addr}/metrics");
    if let Some(path) = audit {
        println!("  audit log:                {} (check it: incident-stream audit verify)", path.display());
    }
    running.run_until(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

fn mint(config: &Config, tenant: &str, sub: &str, roles: &str, ttl: &str, kid: Option<&str>) -> Result<String> {
    ensure_dev_secrets(config)?;
    let auth = incident_stream::auth::Authenticator::new(&config.auth, &|k| std::env::var(k).ok())?;
    let kid = match kid {
        Some(k) => k.to_owned(),
        None => config
            .auth
            .keys
            .iter()
            .find(|k| k.algorithm.starts_with("HS"))
            .map(|k| k.kid.clone())
            .context("no HS key configured to mint with")?,
    };
    let ttl = parse_ttl(ttl)?;
    let now = incident_stream::time::unix_now();
    let roles: Vec<&str> = roles.split(',').map(str::trim).filter(|r| !r.is_empty()).collect();
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), sub.into());
    claims.insert(config.auth.tenant_claim.clone(), tenant.into());
    claims.insert("roles".into(), roles.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + ttl.as_secs()).into());
    claims.insert("jti".into(), uuid::Uuid::new_v4().to_string().into());
    if let Some(iss) = &config.auth.issuer {
        claims.insert("iss".into(), iss.clone().into());
    }
    if let Some(aud) = &config.auth.audience {
        claims.insert("aud".into(), aud.clone().into());
    }
    Ok(auth.mint(&kid, &claims)?)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let config = load_config(cli.config.as_ref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if config.server.worker_threads > 0 {
                rt.worker_threads(config.server.worker_threads);
            }
            let rt = rt.enable_all().build()?;
            rt.block_on(serve(config))
        }
        Command::Certs { command: CertsCommand::Generate { dir, force } } => {
            let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
            if !force && (cert.exists() || key.exists() || dir.join("ca.key").exists()) {
                bail!("{} already holds certificates; pass --force to replace them", dir.display());
            }
            let certs = incident_stream::tls::generate_dev_certs(&cert, &key)?;
            println!("wrote {} (trust this in clients)", certs.ca_cert.display());
            println!("wrote {} and {}", certs.server_cert.display(), certs.server_key.display());
            Ok(())
        }
        Command::Policy { command: PolicyCommand::Check { dir } } => {
            let dir = dir.unwrap_or_else(|| config.policies.dir.clone());
            // Exactly what a reload would do: the whole directory, every error reported.
            match incident_stream::policy::PolicySet::load_dir(&dir) {
                Ok(set) => {
                    let tenants: Vec<String> = set.tenants().map(ToString::to_string).collect();
                    println!("{}: ok, {} tenants: {}", dir.display(), tenants.len(), tenants.join(", "));
                    Ok(())
                }
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{e}");
                    }
                    eprintln!("{}: {} error(s); a reload would change nothing", dir.display(), errors.0.len());
                    std::process::exit(1);
                }
            }
        }
        Command::Audit { command: AuditCommand::Verify { files, partial } } => {
            if audit_verify(&config, files, partial)? {
                Ok(())
            } else {
                std::process::exit(1);
            }
        }
        Command::Audit { command: AuditCommand::Query { path, tenant, subject, kind, session, since, until } } => {
            audit_query(&config, QueryArgs { path, tenant, subject, kind, session, since, until })
        }
        Command::Token { tenant, sub, roles, ttl, kid } => {
            println!("{}", mint(&config, &tenant, &sub, &roles, &ttl, kid.as_deref())?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90").expect("ok").as_secs(), 90);
        assert_eq!(parse_ttl("30m").expect("ok").as_secs(), 1800);
        assert_eq!(parse_ttl("1h").expect("ok").as_secs(), 3600);
        assert_eq!(parse_ttl("2d").expect("ok").as_secs(), 172800);
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
    }
}

//! Live policy reloads: from the file watcher, SIGHUP, `POST /admin/policies/reload` and an
//! admin's `PUT` of one tenant file. All or nothing: the whole directory parses and validates, or
//! nothing changes and the errors are logged, counted (`policy_reloads_total{result}`) and
//! audited (`policy.rejected`). A good reload is installed at once, audited (`policy.reloaded`
//! with every file's SHA-256 and who triggered it) and every session is woken so it applies the
//! new policy itself (close 4003, new limits, subscriptions narrowed or removed).
//!
//! Every change holds the store's edit lock from reading the files to installing the set, so two
//! admins' writes and a watcher reload never interleave; the last valid write wins.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::audit::{AuditLog, Kind, Record};
use crate::event::TenantId;
use crate::fanout::Hub;
use crate::limits::Limiters;
use crate::metrics::Metrics;
use crate::policy::store::PolicyStore;
use crate::policy::{self, PolicyError, PolicyErrors, PolicySet};

/// Who asked for a reload.
#[derive(Debug, Clone)]
pub(crate) enum Trigger {
    /// The file watcher saw the directory change.
    Watch,
    /// SIGHUP.
    Signal,
    /// An admin through the API (`POST /admin/policies/reload` or `PUT .../policy`).
    Admin {
        /// The admin's tenant, subject and token id.
        tenant: String,
        subject: String,
        token_id: String,
        remote: String,
        /// `reload` or `put`.
        action: &'static str,
    },
}

impl Trigger {
    fn name(&self) -> &'static str {
        match self {
            Trigger::Watch => "file_watch",
            Trigger::Signal => "sighup",
            Trigger::Admin { action: "put", .. } => "admin_put",
            Trigger::Admin { .. } => "admin_reload",
        }
    }

    fn stamp(&self, record: Record) -> Record {
        let record = record.field("trigger", self.name());
        match self {
            Trigger::Admin { tenant, subject, token_id, remote, .. } => {
                record.tenant(tenant.clone()).subject(subject.clone()).token_id(token_id.clone()).remote(remote)
            }
            _ => record,
        }
    }
}

/// What a successful reload changed.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Reloaded {
    /// Tenants whose effective policy changed, was added or removed.
    pub(crate) changed_tenants: Vec<String>,
    /// `(file, sha256)` of every file in force.
    pub(crate) files: Vec<(String, String)>,
}

/// What the watcher compares: every policy file's name, size and modification time.
type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".toml") || name.starts_with('.') {
            continue;
        }
        // Follows symlinks: a Kubernetes ConfigMap re-points `..data`, not the file names.
        let meta = std::fs::metadata(e.path()).ok();
        out.push((name, meta.as_ref().map_or(0, |m| m.len()), meta.and_then(|m| m.modified().ok())));
    }
    out.sort();
    out
}

/// Applies policy changes. Cheap to share.
pub(crate) struct Reloader {
    store: Arc<PolicyStore>,
    hub: Arc<Hub>,
    limiters: Arc<Limiters>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    /// The directory state last loaded (good or bad), so the watcher reacts to changes only.
    seen: Mutex<Fingerprint>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

impl Reloader {
    pub(crate) fn new(
        store: Arc<PolicyStore>,
        hub: Arc<Hub>,
        limiters: Arc<Limiters>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        let seen = Mutex::new(fingerprint(store.dir()));
        Reloader { store, hub, limiters, audit, metrics, seen }
    }

    pub(crate) fn store(&self) -> &Arc<PolicyStore> {
        &self.store
    }

    fn note_seen(&self, fp: Fingerprint) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = fp;
    }

    /// Reloads the whole directory.
    pub(crate) async fn reload(&self, trigger: &Trigger) -> Result<Reloaded, PolicyErrors> {
        let _edit = self.store.lock_edits().await;
        let dir = self.store.dir().to_owned();
        let (fp, loaded) = blocking(move || (fingerprint(&dir), PolicySet::load_dir(&dir)))
            .await
            .unwrap_or_else(|| (Vec::new(), Err(internal(self.store.dir()))));
        self.note_seen(fp);
        match loaded {
            Ok(set) => Ok(self.install(set, trigger).await),
            Err(errors) => {
                self.rejected(&errors, trigger).await;
                Err(errors)
            }
        }
    }

    /// Validates `text` as `<tenant>.toml` together with the rest of the directory; if the whole
    /// set is valid, writes the file atomically (temporary file, fsync, rename) and installs the
    /// set. A bad text changes nothing.
    pub(crate) async fn put_tenant(
        &self,
        tenant: &TenantId,
        text: String,
        trigger: &Trigger,
    ) -> Result<Reloaded, PutError> {
        let _edit = self.store.lock_edits().await;
        let dir = self.store.dir().to_owned();
        let file = dir.join(format!("{tenant}.toml"));
        let candidate = file.clone();
        let validated = blocking(move || {
            let ((defaults_path, defaults), mut files) = policy::read_dir(&dir)?;
            files.retain(|(p, _)| *p != candidate);
            files.push((candidate, text.clone()));
            files.sort();
            PolicySet::parse((&defaults_path, &defaults), &files).map(|set| (set, text))
        })
        .await
        .unwrap_or_else(|| Err(internal(self.store.dir())));
        let (set, text) = match validated {
            Ok(v) => v,
            Err(errors) => {
                self.rejected(&errors, trigger).await;
                return Err(PutError::Invalid(errors));
            }
        };
        let dir = self.store.dir().to_owned();
        let written = blocking(move || write_atomically(&file, text.as_bytes()).map(|()| fingerprint(&dir)))
            .await
            .unwrap_or_else(|| Err(std::io::Error::other("writer task failed")));
        match written {
            Ok(fp) => {
                self.note_seen(fp);
                Ok(self.install(set, trigger).await)
            }
            Err(e) => {
                tracing::error!(tenant = %tenant, error = %e, "cannot write the policy file");
                Err(PutError::Write(e.to_string()))
            }
        }
    }

    async fn install(&self, set: PolicySet, trigger: &Trigger) -> Reloaded {
        let old = self.store.current();
        let mut changed: Vec<String> = set
            .tenants()
            .filter(|t| old.get(t).map(|p| p.as_ref()) != set.get(t).map(|p| p.as_ref()))
            .chain(old.tenants().filter(|t| set.get(t).is_none()))
            .map(ToString::to_string)
            .collect();
        changed.sort();
        changed.dedup();
        let files = set.file_hashes();
        self.limiters.sync(&set);
        self.store.install(set);
        self.hub.wake_all();
        self.metrics.policy_reloads.with_label_values(&["ok"]).inc();
        tracing::info!(trigger = trigger.name(), changed = ?changed, "policies reloaded");
        let hashes: serde_json::Map<String, serde_json::Value> =
            files.iter().map(|(f, h)| (f.clone(), serde_json::Value::from(h.clone()))).collect();
        let record = trigger
            .stamp(Record::new(Kind::PolicyReloaded))
            .reason("ok")
            .field("files", hashes)
            .field("changed_tenants", changed.clone());
        self.audit.record(record).await;
        Reloaded { changed_tenants: changed, files }
    }

    async fn rejected(&self, errors: &PolicyErrors, trigger: &Trigger) {
        self.metrics.policy_reloads.with_label_values(&["rejected"]).inc();
        tracing::error!(trigger = trigger.name(), errors = %errors, "policy reload rejected; the previous policies stay in force");
        let list: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        let record = trigger.stamp(Record::new(Kind::PolicyRejected)).reason("invalid").field("errors", list);
        self.audit.record(record).await;
    }

    /// Has the directory changed since it was last loaded?
    fn changed_since_seen(&self, fp: &Fingerprint) -> bool {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) != *fp
    }
}

/// Why a `PUT` of a tenant policy did not take effect.
#[derive(Debug)]
pub(crate) enum PutError {
    /// The text (or the set with it) is invalid: nothing was written.
    Invalid(PolicyErrors),
    /// Writing the file failed: nothing was installed.
    Write(String),
}

fn internal(dir: &Path) -> PolicyErrors {
    PolicyError::Read { path: dir.to_owned(), message: "the loader task failed".into() }.into()
}

/// Writes `path` so that readers see the old or the new contents, never a mix: a uniquely named
/// hidden temporary file in the same directory (ignored by the loader), fsynced, then renamed
/// over the target, then the directory fsynced.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("policy.toml");
    let tmp: PathBuf = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // The new file is in place (and what readers see) from the rename on; a failed directory
    // fsync only weakens its durability across a power loss, so it is reported, not failed.
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "policy directory not fsynced after a write");
    }
    Ok(())
}

/// The file watcher: looks at the directory every `interval` and reloads once a change has held
/// still for one interval (editors and `cp` write in several steps).
pub(crate) async fn run_watcher(reloader: Arc<Reloader>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<Fingerprint> = None;
    loop {
        tick.tick().await;
        let dir = reloader.store().dir().to_owned();
        let Some(fp) = blocking(move || fingerprint(&dir)).await else { continue };
        if !reloader.changed_since_seen(&fp) {
            pending = None;
            continue;
        }
        if pending.as_ref() == Some(&fp) {
            pending = None;
            let _ = reloader.reload(&Trigger::Watch).await;
        } else {
            pending = Some(fp);
        }
    }
}

/// Reloads on every SIGHUP.
#[cfg(unix)]
pub(crate) async fn run_sighup(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: reload through the watcher or the admin API");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading policies");
        let _ = reloader.reload(&Trigger::Signal).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporaries() {
        let dir = std::env::temp_dir().join(format!("incident-stream-atomic-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("acme.toml");
        write_atomically(&path, b"tenant = \"acme\"\n").expect("write");
        write_atomically(&path, b"tenant = \"acme\"\nenabled = false\n").expect("rewrite");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "tenant = \"acme\"\nenabled = false\n");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .flatten()
            .map(|e| e.file_name().into_string().unwrap_or_default())
            .collect();
        assert_eq!(names, vec!["acme.toml"]);
        let fp = fingerprint(&dir);
        assert_eq!(fp.len(), 1);
        assert_eq!(fp[0].0, "acme.toml");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The policy set in force: read lock-free on every request and message (`ArcSwap`), replaced
//! whole by a reload, with a generation number so a session notices a change with one atomic
//! load. Reloads and admin writes are serialized by one async lock, so two edits never
//! interleave their read-validate-swap steps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{PolicyErrors, PolicySet};

/// Holds the current [`PolicySet`].
pub struct PolicyStore {
    dir: PathBuf,
    current: ArcSwap<PolicySet>,
    generation: AtomicU64,
    edits: tokio::sync::Mutex<()>,
}

impl PolicyStore {
    /// Loads `dir` once; the service does not start on an invalid set.
    pub fn load(dir: &Path) -> Result<PolicyStore, PolicyErrors> {
        let set = PolicySet::load_dir(dir)?;
        Ok(PolicyStore::with_set(dir, set))
    }

    /// A store over an already validated set.
    pub fn with_set(dir: &Path, set: PolicySet) -> PolicyStore {
        PolicyStore {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(set),
            generation: AtomicU64::new(1),
            edits: tokio::sync::Mutex::new(()),
        }
    }

    /// The directory the policies come from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The set in force.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Bumped by every successful reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Takes the edit lock: reloads and admin writes hold it for their whole read-validate-swap.
    pub async fn lock_edits(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.edits.lock().await
    }

    /// Replaces the set (the caller holds the edit lock and validated it). Returns the old one.
    pub fn install(&self, set: PolicySet) -> Arc<PolicySet> {
        let old = self.current.swap(Arc::new(set));
        self.generation.fetch_add(1, Ordering::AcqRel);
        old
    }
}

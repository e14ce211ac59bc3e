//! The audit log: one JSON line per security-relevant fact, hash-chained so that an edited,
//! dropped or reordered record is found by `incident-stream audit verify`.
//!
//! [`AuditLog`] is the one handle the rest of the service sees: `record` (wait for room in the
//! queue, never drop), `admit` (for `connection.accepted`: the connection proceeds only once its
//! record is written, so no connection is ever unaudited; fail closed), `is_available` (for
//! `/ready` and the fast refusal), `sync` and `shutdown`. Everything else (sealing, files,
//! rotation, recovery) belongs to the writer task. The pure parts (`record`, `chain`, `query`)
//! are what the command line and the admin API use to verify and read the files.

mod chain;
mod files;
mod query;
mod record;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use chain::{Link, Problem};
pub use files::{
    chain_order, log_files, query as query_files, rotated_name, verify, Broken, FileError, Verdict, Verified,
};
pub use query::{parse_kind, parse_time, Query, QueryError};
pub use record::{canonical, hash_of, seal, Kind, Record, Sealed, COMMON_FIELDS, GENESIS};

use crate::config::AuditConfig;
use crate::metrics::Metrics;

/// How long a connection waits for its `connection.accepted` record to be written before it is
/// refused (a sink that hangs must not hold upgrades forever).
const ADMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file or directory could not be read or written.
    #[error("audit log {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The last record is not valid, so the chain cannot be continued.
    #[error(
        "audit log {}: the last record (seq {seq}) is not valid ({problem}); run `incident-stream audit verify` \
         and move the file aside to start a new chain",
        path.display()
    )]
    Tail {
        /// The file.
        path: PathBuf,
        /// The record's seq.
        seq: u64,
        /// What is wrong.
        problem: Problem,
    },
}

/// The audit sink cannot take a record that must be written before a connection proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the audit log cannot be written")]
pub struct Unavailable;

struct Inner {
    tx: mpsc::Sender<writer::Msg>,
    available: Arc<AtomicBool>,
    fail_closed: bool,
}

/// The handle to the audit log; cheap to clone. A disabled log records nothing.
#[derive(Clone, Default)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

/// The writer task, to be spawned by the server.
pub struct AuditWriter(writer::Writer);

impl AuditWriter {
    /// Runs the writer until [`AuditLog::shutdown`].
    pub async fn run(self) {
        self.0.run().await;
    }
}

impl AuditLog {
    /// A log that records nothing (`audit.enabled = false`).
    pub fn disabled() -> AuditLog {
        AuditLog { inner: None }
    }

    /// Opens the log (resuming the chain of an existing file) and returns the handle and the
    /// writer task to spawn.
    pub fn open(config: &AuditConfig, metrics: Arc<Metrics>) -> Result<(AuditLog, Option<AuditWriter>), AuditError> {
        if !config.enabled {
            return Ok((AuditLog::disabled(), None));
        }
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let available = Arc::new(AtomicBool::new(false));
        let settings = writer::Settings {
            fsync_interval: Duration::from_millis(config.fsync_interval_ms),
            retry_interval: Duration::from_millis(config.retry_interval_ms),
            max_file_bytes: config.max_file_bytes,
            max_pending: config.max_pending_records,
        };
        let w = writer::Writer::open(&config.path, settings, rx, Arc::clone(&available), metrics)?;
        let inner = Inner { tx, available, fail_closed: config.fail_closed };
        Ok((AuditLog { inner: Some(Arc::new(inner)) }, Some(AuditWriter(w))))
    }

    /// Is the log on (`audit.enabled`)?
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Can records be written now? (Always true when disabled.)
    pub fn is_available(&self) -> bool {
        self.inner.as_ref().is_none_or(|i| i.available.load(Ordering::Acquire))
    }

    /// Would a new connection be refused now (fail closed and the sink is down)?
    pub fn refuses_connections(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.fail_closed && !i.available.load(Ordering::Acquire))
    }

    /// Records a fact. Waits for room in the queue (the writer drains it even while the sink is
    /// down), so nothing is dropped while memory allows.
    pub async fn record(&self, record: Record) {
        if let Some(i) = &self.inner {
            if i.tx.send(writer::Msg::Record(record)).await.is_err() {
                tracing::warn!("audit writer stopped: record not written");
            }
        }
    }

    /// Records the fact that lets a connection in. Fail closed: `Ok` only once the record is
    /// written. Fail open (`audit.fail_closed = false`): queued like any record.
    pub async fn admit(&self, record: Record) -> Result<(), Unavailable> {
        let Some(i) = &self.inner else { return Ok(()) };
        if !i.fail_closed {
            self.record(record).await;
            return Ok(());
        }
        if !i.available.load(Ordering::Acquire) {
            return Err(Unavailable);
        }
        let (tx, rx) = oneshot::channel();
        i.tx.send(writer::Msg::Confirm(record, tx)).await.map_err(|_| Unavailable)?;
        match tokio::time::timeout(ADMIT_TIMEOUT, rx).await {
            Ok(Ok(true)) => Ok(()),
            _ => Err(Unavailable),
        }
    }

    /// Writes and fsyncs everything recorded so far; `true` if it is all on disk.
    pub async fn sync(&self) -> bool {
        let Some(i) = &self.inner else { return true };
        let (tx, rx) = oneshot::channel();
        if i.tx.send(writer::Msg::Sync(tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Writes what is left, fsyncs, logs a checkpoint (last seq and hash) and stops the writer.
    pub async fn shutdown(&self) {
        let Some(i) = &self.inner else { return };
        let (tx, rx) = oneshot::channel();
        if i.tx.send(writer::Msg::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

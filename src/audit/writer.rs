//! The writer: the one task that gives records their place in the chain and puts them on disk.
//!
//! It owns the sequence number and the last hash, so the chain has a single author. Records
//! arrive through a bounded queue; each wake-up seals whatever is waiting into one buffer and
//! writes it with as few syscalls as the file takes, on the blocking pool (file I/O never runs
//! on the runtime's workers, so the fan-out never waits for a disk). Writes are flushed at once
//! and fsynced at an interval, at rotation and at shutdown.
//!
//! When the file cannot be written, the writer marks the log unavailable (new connections are
//! then refused, fail closed), keeps every record of existing sessions in memory in order,
//! retries at an interval and writes them when the sink recovers. A record that must be on disk
//! before its connection proceeds (`connection.accepted`) is answered only after its write.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::chain::{Chain, Link};
use super::files::{log_files, rotated_name, tail};
use super::record::{seal, Record, GENESIS};
use super::AuditError;
use crate::metrics::Metrics;

/// What producers send to the writer.
pub(super) enum Msg {
    /// Write when possible; never dropped while memory allows.
    Record(Record),
    /// Write now and say whether it is on disk; refused at once while the sink is down.
    Confirm(Record, oneshot::Sender<bool>),
    /// Flush and fsync, then answer whether everything so far is on disk.
    Sync(oneshot::Sender<bool>),
    /// Write what is left, fsync, log a checkpoint and stop.
    Shutdown(oneshot::Sender<()>),
}

/// The writer's settings.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) fsync_interval: Duration,
    pub(super) retry_interval: Duration,
    pub(super) max_file_bytes: u64,
    pub(super) max_pending: usize,
}

/// The open file and what the writer knows about it. Its methods block: they run on the
/// blocking pool.
struct Sink {
    path: PathBuf,
    file: Option<File>,
    /// (device, inode) of the open file: if the path stops naming it (moved, deleted, replaced),
    /// the writer reopens the path rather than write into a file nobody will read.
    id: (u64, u64),
    len: u64,
    /// Seq of the active file's first record (names the file when it is rotated).
    first_seq: Option<u64>,
    max_bytes: u64,
}

impl Sink {
    fn open(path: &Path, max_bytes: u64) -> io::Result<Sink> {
        let mut s = Sink { path: path.to_owned(), file: None, id: (0, 0), len: 0, first_seq: None, max_bytes };
        s.reopen()?;
        Ok(s)
    }

    fn reopen(&mut self) -> io::Result<()> {
        self.file = None;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new().create(true).append(true).open(&self.path)?;
        let m = f.metadata()?;
        if m.len() == 0 {
            self.first_seq = None;
        } else if self.id != (m.dev(), m.ino()) {
            self.first_seq = tail(&self.path)?.first_seq;
        }
        self.id = (m.dev(), m.ino());
        self.len = m.len();
        self.file = Some(f);
        Ok(())
    }

    /// Makes sure the path still names the open file.
    fn ensure_open(&mut self) -> io::Result<bool> {
        let same = self.file.is_some()
            && std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()) == self.id).unwrap_or(false);
        if !same {
            self.reopen()?;
        }
        Ok(!same)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        let first = self.first_seq.unwrap_or(0);
        std::fs::rename(&self.path, rotated_name(&self.path, first))?;
        self.reopen()
    }

    /// Writes `buf`; returns how many bytes reached the file, and the error that stopped it.
    fn write(&mut self, buf: &[u8], first_seq: u64, may_rotate: bool) -> (usize, io::Result<()>) {
        let prepared = self.ensure_open().and_then(|_| {
            if may_rotate && self.len > 0 && self.len + buf.len() as u64 > self.max_bytes {
                self.rotate()?;
            }
            Ok(())
        });
        if let Err(e) = prepared {
            self.file = None;
            return (0, Err(e));
        }
        self.first_seq.get_or_insert(first_seq);
        let Some(file) = self.file.as_mut() else { return (0, Err(io::Error::other("audit file not open"))) };
        let mut written = 0;
        while written < buf.len() {
            match file.write(&buf[written..]) {
                Ok(0) => return (written, Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    written += n;
                    self.len += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.file = None;
                    return (written, Err(e));
                }
            }
        }
        (written, Ok(()))
    }

    fn sync(&mut self) -> io::Result<()> {
        match &self.file {
            Some(f) => f.sync_data(),
            None => Err(io::Error::other("audit file not open")),
        }
    }
}

/// Where the chain continues after a restart: the last record of the active file, or of the
/// newest rotated file. A torn last line (a write cut short by a crash) is cut off; a last line
/// that is not a valid record stops the start, since the chain cannot be continued honestly.
fn resume(path: &Path) -> Result<Option<Link>, AuditError> {
    let files = log_files(path).map_err(|e| AuditError::Io { path: e.path, source: e.source })?;
    for (file, _) in files.iter().rev() {
        let io = |source| AuditError::Io { path: file.clone(), source };
        let t = tail(file).map_err(io)?;
        if t.len > t.complete_len && file == path {
            tracing::warn!(
                path = %file.display(), bytes = t.len - t.complete_len,
                "audit log ends with a torn line (a write cut short); cutting it off"
            );
            OpenOptions::new().write(true).open(file).and_then(|f| f.set_len(t.complete_len)).map_err(io)?;
        }
        if let Some(line) = t.last_line {
            return match Chain::partial().check(&line) {
                Ok(link) => Ok(Some(link.clone())),
                Err((seq, problem)) => Err(AuditError::Tail { path: file.clone(), seq, problem }),
            };
        }
    }
    Ok(None)
}

/// A line whose write was cut short.
struct Torn {
    bytes: Vec<u8>,
    /// Bytes that reached the file.
    done: usize,
    /// The file they reached.
    id: (u64, u64),
    seq: u64,
}

/// A sealed line waiting for its write.
struct Line {
    end: usize,
    seq: u64,
    hash: String,
    record: Record,
    confirm: Option<oneshot::Sender<bool>>,
}

/// The writer task's state.
pub(super) struct Writer {
    path: PathBuf,
    rx: mpsc::Receiver<Msg>,
    sink: Option<Sink>,
    next_seq: u64,
    prev: String,
    /// Records not yet sealed, in arrival order.
    pending: VecDeque<(Record, Option<oneshot::Sender<bool>>)>,
    /// A line whose write was cut short: its bytes and how many reached the file. It has its
    /// seq, so it is written (completed) before anything else.
    torn: Option<Torn>,
    available: Arc<AtomicBool>,
    dirty: bool,
    dropping: bool,
    settings: Settings,
    metrics: Arc<Metrics>,
}

impl Writer {
    /// Opens the log and finds where the chain continues.
    pub(super) fn open(
        path: &Path,
        settings: Settings,
        rx: mpsc::Receiver<Msg>,
        available: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> Result<Writer, AuditError> {
        let last = resume(path)?;
        let sink = Sink::open(path, settings.max_file_bytes)
            .map_err(|source| AuditError::Io { path: path.to_owned(), source })?;
        let (next_seq, prev) = match last {
            Some(l) => (l.seq + 1, l.hash),
            None => (1, GENESIS.to_owned()),
        };
        tracing::info!(path = %path.display(), next_seq, "audit log open");
        available.store(true, Ordering::Release);
        Ok(Writer {
            path: path.to_owned(),
            rx,
            sink: Some(sink),
            next_seq,
            prev,
            pending: VecDeque::new(),
            torn: None,
            available,
            dirty: false,
            dropping: false,
            settings,
            metrics,
        })
    }

    fn is_available(&self) -> bool {
        self.available.load(Ordering::Acquire)
    }

    fn enqueue(&mut self, record: Record, confirm: Option<oneshot::Sender<bool>>) {
        if let Some(tx) = confirm {
            if self.is_available() {
                self.pending.push_back((record, Some(tx)));
            } else {
                let _ = tx.send(false);
            }
            return;
        }
        if self.pending.len() >= self.settings.max_pending {
            self.metrics.audit_dropped.inc();
            if !self.dropping {
                self.dropping = true;
                tracing::error!(
                    max_pending = self.settings.max_pending,
                    "audit sink down and the in-memory backlog is full: audit records are being DROPPED"
                );
            }
            return;
        }
        self.pending.push_back((record, None));
    }

    /// Runs until shut down (or every producer is gone).
    pub(super) async fn run(mut self) {
        let mut msgs = Vec::with_capacity(256);
        let mut fsync_at: Option<Instant> = None;
        let mut retry_at = Instant::now();
        loop {
            let down = !self.is_available();
            let wake_fsync = fsync_at.unwrap_or_else(Instant::now);
            tokio::select! {
                n = self.rx.recv_many(&mut msgs, 256) => {
                    if n == 0 {
                        self.stop().await;
                        return;
                    }
                    let mut syncs = Vec::new();
                    let mut shutdown = None;
                    for m in msgs.drain(..) {
                        match m {
                            Msg::Record(r) => self.enqueue(r, None),
                            Msg::Confirm(r, tx) => self.enqueue(r, Some(tx)),
                            Msg::Sync(tx) => syncs.push(tx),
                            Msg::Shutdown(tx) => shutdown = Some(tx),
                        }
                    }
                    if self.is_available() {
                        self.write_pending().await;
                    }
                    if !syncs.is_empty() {
                        let ok = self.sync().await && self.pending.is_empty() && self.torn.is_none();
                        for tx in syncs {
                            let _ = tx.send(ok);
                        }
                    }
                    if let Some(tx) = shutdown {
                        self.stop().await;
                        let _ = tx.send(());
                        return;
                    }
                }
                () = tokio::time::sleep_until(retry_at), if down => {
                    self.write_pending().await;
                    if self.is_available() {
                        tracing::info!(backlog_written = true, "audit sink writable again: accepting connections");
                        self.dropping = false;
                    }
                    retry_at = Instant::now() + self.settings.retry_interval;
                }
                () = tokio::time::sleep_until(wake_fsync), if fsync_at.is_some() => {
                    fsync_at = None;
                    self.sync().await;
                }
            }
            if self.dirty && fsync_at.is_none() {
                fsync_at = Some(Instant::now() + self.settings.fsync_interval);
            }
            if !down && !self.is_available() {
                retry_at = Instant::now() + self.settings.retry_interval;
            }
            self.metrics.audit_queue_depth.set((self.rx.len() + self.pending.len()) as i64);
        }
    }

    async fn stop(&mut self) {
        self.write_pending().await;
        self.sync().await;
        if !self.pending.is_empty() || self.torn.is_some() {
            tracing::error!(records = self.pending.len(), "audit sink down at shutdown: records not written");
        }
        tracing::info!(last_seq = self.next_seq - 1, last_hash = %self.prev, "audit checkpoint at shutdown");
    }

    /// Runs a blocking operation on the sink on the blocking pool.
    async fn with_sink<T: Send + 'static>(&mut self, op: impl FnOnce(&mut Sink) -> T + Send + 'static) -> Option<T> {
        let mut sink = self.sink.take()?;
        match tokio::task::spawn_blocking(move || {
            let r = op(&mut sink);
            (sink, r)
        })
        .await
        {
            Ok((sink, r)) => {
                self.sink = Some(sink);
                Some(r)
            }
            Err(e) => {
                // The closure panicked: the sink is lost with it; reopen on the next attempt.
                tracing::error!(error = %e, "audit write task failed");
                None
            }
        }
    }

    async fn sync(&mut self) -> bool {
        if !self.dirty {
            return true;
        }
        match self.with_sink(Sink::sync).await {
            Some(Ok(())) => {
                self.dirty = false;
                true
            }
            Some(Err(e)) => {
                self.failed(&e);
                false
            }
            None => false,
        }
    }

    fn failed(&mut self, e: &io::Error) {
        self.metrics.audit_write_errors.inc();
        if self.available.swap(false, Ordering::AcqRel) {
            tracing::error!(
                error = %e,
                "audit sink cannot be written: refusing new connections until it recovers (records are held in memory)"
            );
        } else {
            tracing::warn!(error = %e, "audit sink still cannot be written");
        }
    }

    /// Completes a torn line, then seals and writes everything pending.
    async fn write_pending(&mut self) {
        if self.sink.is_none() {
            let (path, max) = (self.path.clone(), self.settings.max_file_bytes);
            match tokio::task::spawn_blocking(move || Sink::open(&path, max)).await {
                Ok(Ok(s)) => self.sink = Some(s),
                Ok(Err(e)) => return self.failed(&e),
                Err(e) => return tracing::error!(error = %e, "audit open task failed"),
            }
        }
        if let Some(mut t) = self.torn.take() {
            let r = self
                .with_sink(move |s| {
                    // In another file, the whole line is written again: a fragment in the old file
                    // shows as a torn line there, and the chain stays whole in the new one.
                    let reopened = s.ensure_open().unwrap_or(true);
                    let from = if reopened || s.id != t.id { 0 } else { t.done };
                    let (n, r) = s.write(&t.bytes[from..], t.seq, false);
                    t.done = from + n;
                    t.id = s.id;
                    (t, r)
                })
                .await;
            match r {
                Some((_, Ok(()))) => self.dirty = true,
                Some((t, Err(e))) => {
                    self.torn = Some(t);
                    return self.failed(&e);
                }
                None => return,
            }
        }
        if self.pending.is_empty() {
            if !self.is_available() {
                // Nothing to write: a successful reopen is the probe.
                match self.with_sink(|s| s.ensure_open().map(|_| ())).await {
                    Some(Ok(())) => self.available.store(true, Ordering::Release),
                    Some(Err(e)) => self.failed(&e),
                    None => {}
                }
            }
            return;
        }
        let ts = crate::time::rfc3339_micros_now();
        let mut buf = Vec::new();
        let mut lines = Vec::with_capacity(self.pending.len());
        let first_seq = self.next_seq;
        let start_prev = self.prev.clone();
        for (record, confirm) in self.pending.drain(..) {
            let sealed = seal(&record, self.next_seq, &ts, &self.prev);
            buf.extend_from_slice(sealed.line.as_bytes());
            buf.push(b'\n');
            lines.push(Line { end: buf.len(), seq: self.next_seq, hash: sealed.hash.clone(), record, confirm });
            self.next_seq += 1;
            self.prev = sealed.hash;
        }
        let Some((buf, written, id, result)) = self
            .with_sink(move |s| {
                let (n, r) = s.write(&buf, first_seq, true);
                (buf, n, s.id, r)
            })
            .await
        else {
            // The blocking task died: nothing is known to be written; put everything back.
            self.next_seq = first_seq;
            self.prev = start_prev;
            for l in lines.into_iter().rev() {
                if let Some(tx) = l.confirm {
                    let _ = tx.send(false);
                } else {
                    self.pending.push_front((l.record, None));
                }
            }
            return;
        };
        if written > 0 {
            self.dirty = true;
        }
        // Lines that started before the write stopped are in the chain (a line cut short is
        // completed first next time); the rest give their seqs back and wait, in order.
        let mut line_start = 0;
        let mut committed_prev = start_prev;
        let mut resume_at = None;
        let mut back = Vec::new();
        for l in lines {
            let begins = std::mem::replace(&mut line_start, l.end);
            if resume_at.is_none() && begins < written {
                if l.end > written {
                    let bytes = buf[begins..l.end].to_vec();
                    self.torn = Some(Torn { bytes, done: written - begins, id, seq: l.seq });
                }
                committed_prev = l.hash;
                self.metrics.audit_records.with_label_values(&[l.record.kind().as_str()]).inc();
                if let Some(tx) = l.confirm {
                    let _ = tx.send(true);
                }
                continue;
            }
            resume_at.get_or_insert(l.seq);
            match l.confirm {
                // The connection waiting for it is refused; its record is not kept.
                Some(tx) => {
                    let _ = tx.send(false);
                }
                None => back.push(l.record),
            }
        }
        if let Some(seq) = resume_at {
            self.next_seq = seq;
            self.prev = committed_prev;
            for r in back.into_iter().rev() {
                self.pending.push_front((r, None));
            }
        }
        match result {
            Err(e) => self.failed(&e),
            Ok(()) => self.available.store(true, Ordering::Release),
        }
    }
}

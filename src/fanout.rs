//! The fan-out: the per-tenant subscription index, the registry of live sessions, and the
//! dispatcher that hands each published event to every matching connection's outbox.
//!
//! Invariants: an event is only ever matched against its own tenant's connections (the index is
//! keyed by tenant); each connection gets an event at most once however many of its
//! subscriptions match; the same shared frame goes to every connection; the dispatcher never
//! awaits a socket (pushing to an outbox is a short synchronous lock), so one slow or dead
//! client cannot delay the others. Only connections that hold at least one subscription are in
//! the index, so idle connections cost nothing per event.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::bus::Published;
use crate::event::MessageId;
use crate::event::TenantId;
use crate::filter::SubscriptionFilter;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::policy::Limits;
use crate::protocol::CloseReason;

/// One live connection, shared by its session task, the index and the registry.
pub(crate) struct Conn {
    /// Process-unique number (index key).
    pub(crate) id: u64,
    /// The session id sent in `welcome` (16 bytes, formatted where it is shown).
    pub(crate) session_id: uuid::Uuid,
    pub(crate) tenant: TenantId,
    /// Shared with the subject's entry under the connection caps.
    pub(crate) subject: Arc<str>,
    pub(crate) remote: SocketAddr,
    /// The upgrade request's `User-Agent` and `Origin`, for audit records and origin checks.
    pub(crate) user_agent: Option<Box<str>>,
    pub(crate) origin: Option<Box<str>>,
    /// Milliseconds since the Unix epoch when the session started.
    pub(crate) connected_at_ms: u64,
    pub(crate) outbox: Outbox,
    /// Milliseconds since the hub started, of the last client application message.
    /// Seconds since the hub started, of the last client application message (a `u32`:
    /// 136 years; the idle timeout counts in seconds).
    last_message_secs: AtomicU32,
    /// Subscriptions currently held.
    subscriptions: AtomicU32,
    /// The connection's place in its tenant's index, or [`NOT_INDEXED`].
    index_slot: AtomicU32,
    /// Set by the cleanup sweep when the session looks idle; the session decides.
    idle_nudge: AtomicBool,
    /// What the hub's clock raised for the session ([`Timers`] bits), taken when it wakes.
    timers: AtomicU8,
    /// The last acknowledged message id (`epoch`, `seq`; epoch 0: none yet), for the admin view.
    acked: (AtomicU64, AtomicU64),
    /// Events delivered after the last ack (`u64::MAX`: the client never acked).
    unacked: AtomicU64,
}

impl Conn {
    /// Records client activity (for the idle sweep).
    pub(crate) fn touch(&self, hub: &Hub) {
        self.last_message_secs.store(hub.elapsed_secs_up(), Ordering::Relaxed);
    }

    /// How long since the client's last application message (or the session's start).
    pub(crate) fn quiet_for(&self, hub: &Hub) -> Duration {
        Duration::from_secs(u64::from(
            hub.elapsed_secs().saturating_sub(self.last_message_secs.load(Ordering::Relaxed)),
        ))
    }

    /// Publishes the session's acknowledgement state for the admin view.
    pub(crate) fn set_ack_state(&self, acked: MessageId, unacked: u64) {
        self.acked.0.store(acked.epoch, Ordering::Relaxed);
        self.acked.1.store(acked.seq, Ordering::Relaxed);
        self.unacked.store(unacked, Ordering::Relaxed);
    }

    fn ack_state(&self) -> (Option<MessageId>, Option<u64>) {
        let epoch = self.acked.0.load(Ordering::Relaxed);
        let acked = (epoch != 0).then(|| MessageId { epoch, seq: self.acked.1.load(Ordering::Relaxed) });
        let unacked = Some(self.unacked.load(Ordering::Relaxed)).filter(|n| *n != u64::MAX);
        (acked, unacked)
    }

    /// Subscriptions currently held.
    pub(crate) fn subscription_count(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed) as usize
    }

    /// Takes the cleanup sweep's hint that this session may be idle.
    pub(crate) fn take_idle_nudge(&self) -> bool {
        self.idle_nudge.swap(false, Ordering::Relaxed)
    }

    /// Takes what the hub's clock raised since the last look.
    pub(crate) fn take_timers(&self) -> Timers {
        Timers(self.timers.swap(0, Ordering::AcqRel))
    }
}

/// Timer events the hub's clock raises for a session: sessions hold no timer of their own, so an
/// idle connection costs no timer entry and no timer poll on every wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timers(u8);

impl Timers {
    const HEARTBEAT: u8 = 1;
    const EXPIRED: u8 = 2;

    /// A heartbeat interval has passed: ping, or close if the last ping went unanswered.
    pub(crate) fn heartbeat(self) -> bool {
        self.0 & Self::HEARTBEAT != 0
    }

    /// The token (plus leeway) has expired.
    pub(crate) fn expired(self) -> bool {
        self.0 & Self::EXPIRED != 0
    }
}

/// How often the hub's clock looks at every session's heartbeat and token deadlines: the
/// precision of both (a token expiry closes at most this much late).
pub(crate) const CLOCK_TICK: Duration = Duration::from_millis(250);

/// A live session in the registry, with the deadlines the hub's clock keeps for it.
struct Registered {
    conn: Arc<Conn>,
    /// Hub milliseconds at which the next heartbeat is due, and at which the token expires.
    next_ping_ms: u64,
    expires_ms: u64,
}

struct Entry {
    conn: Arc<Conn>,
    filters: Arc<[Arc<SubscriptionFilter>]>,
    /// One of the filters matches every event of the index's tenant
    /// ([`SubscriptionFilter::matches_all_of`]): the fan-out hands this connection every event
    /// without reading its filters.
    all: bool,
}

/// A tenant's subscribed connections. Each connection's place in `entries` is kept in the
/// connection itself ([`Conn::index_slot`], changed only under this index's write lock) rather
/// than in a map beside the vector: a map costs about 28 bytes per connection at 10,000.
#[derive(Default)]
struct TenantIndex {
    entries: Vec<Entry>,
}

impl TenantIndex {
    /// Sets a connection's filters in the index of `tenant` (the connection's own tenant).
    fn set(&mut self, tenant: &TenantId, conn: &Arc<Conn>, filters: Arc<[Arc<SubscriptionFilter>]>) {
        let all = filters.iter().any(|f| f.matches_all_of(tenant));
        let slot = conn.index_slot.load(Ordering::Relaxed) as usize;
        let at = (slot != NOT_INDEXED as usize && self.entries.get(slot).is_some_and(|e| Arc::ptr_eq(&e.conn, conn)))
            .then_some(slot);
        match (at, filters.is_empty()) {
            (Some(i), false) => {
                let entry = &mut self.entries[i];
                entry.filters = filters;
                entry.all = all;
            }
            (Some(i), true) => {
                self.entries.swap_remove(i);
                conn.index_slot.store(NOT_INDEXED, Ordering::Relaxed);
                if let Some(moved) = self.entries.get(i) {
                    moved.conn.index_slot.store(slot_number(i), Ordering::Relaxed);
                }
            }
            (None, false) => {
                conn.index_slot.store(slot_number(self.entries.len()), Ordering::Relaxed);
                if self.entries.len() == self.entries.capacity() {
                    // Grows by a quarter rather than doubling: the index is per connection, so
                    // doubling's slack (up to half the vector) is memory every connection pays.
                    self.entries.reserve_exact(self.entries.len() / 4 + 16);
                }
                self.entries.push(Entry { conn: Arc::clone(conn), filters, all });
            }
            (None, true) => {}
        }
    }
}

/// [`Conn::index_slot`] of a connection that is in no tenant index.
const NOT_INDEXED: u32 = u32::MAX;

/// A slot as stored in a connection: connections are bounded by open files, far below 2³².
fn slot_number(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(NOT_INDEXED)
}

/// The fan-out hub. Cheap to share (`Arc<Hub>`).
pub(crate) struct Hub {
    tenants: RwLock<HashMap<TenantId, Arc<RwLock<TenantIndex>>>>,
    sessions: Mutex<HashMap<u64, Registered>>,
    next_id: AtomicU64,
    started: Instant,
    metrics: Arc<Metrics>,
    max_pending: usize,
    /// Set once shutdown begins: sessions registering later are closed at once.
    shutting_down: AtomicBool,
    /// Live and admitted-but-not-yet-started connections per tenant and subject (the caps).
    counts: Mutex<HashMap<TenantId, TenantCount>>,
    /// Every session's heartbeat interval.
    heartbeat_ms: u64,
}

#[derive(Default)]
struct TenantCount {
    total: u32,
    subjects: HashMap<Arc<str>, u32>,
}

/// Which connection cap refused a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapExceeded {
    /// `max_connections` of the tenant.
    Tenant(u32),
    /// `max_connections_per_subject`.
    Subject(u32),
}

/// A place under the tenant's and the subject's connection caps, taken before the upgrade
/// answers 101 and handed to [`Hub::register`]. Dropped unused (the upgrade failed), it frees
/// the place.
pub(crate) struct Reservation {
    hub: Arc<Hub>,
    tenant: TenantId,
    subject: Arc<str>,
    armed: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.hub.release(&self.tenant, &self.subject);
        }
    }
}

/// What the admin API shows of a session.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct SessionInfo {
    pub(crate) session_id: String,
    pub(crate) tenant: String,
    pub(crate) subject: String,
    pub(crate) remote_addr: String,
    pub(crate) connected_since: String,
    pub(crate) subscriptions: usize,
    pub(crate) queue_depth: usize,
    /// The last `ack`, if the client sends them.
    pub(crate) last_acked_message_id: Option<String>,
    /// Events delivered after it (counted from the first `ack`).
    pub(crate) unacked: Option<u64>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    /// A hub whose connections queue at most `max_pending` events each and are pinged every
    /// `heartbeat`.
    pub(crate) fn new(metrics: Arc<Metrics>, max_pending: usize, heartbeat: Duration) -> Hub {
        Hub {
            tenants: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            metrics,
            max_pending,
            shutting_down: AtomicBool::new(false),
            counts: Mutex::new(HashMap::new()),
            heartbeat_ms: (heartbeat.as_millis() as u64).max(1),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, TenantCount>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place under the tenant's and the subject's connection caps.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        tenant: &TenantId,
        subject: &str,
        limits: &Limits,
    ) -> Result<Reservation, CapExceeded> {
        let mut counts = self.counts();
        let t = counts.entry(tenant.clone()).or_default();
        // Limits are at least 1, so a refusal never leaves an empty entry behind.
        if t.total >= limits.max_connections {
            return Err(CapExceeded::Tenant(limits.max_connections));
        }
        let (subject, per_subject) = match t.subjects.get_key_value(subject) {
            Some((k, n)) => (Arc::clone(k), *n),
            None => (Arc::from(subject), 0),
        };
        if per_subject >= limits.max_connections_per_subject {
            return Err(CapExceeded::Subject(limits.max_connections_per_subject));
        }
        t.total += 1;
        *t.subjects.entry(Arc::clone(&subject)).or_default() += 1;
        Ok(Reservation { hub: Arc::clone(self), tenant: tenant.clone(), subject, armed: true })
    }

    fn release(&self, tenant: &TenantId, subject: &str) {
        let mut counts = self.counts();
        let Some(t) = counts.get_mut(tenant) else { return };
        t.total = t.total.saturating_sub(1);
        if let Some(n) = t.subjects.get_mut(subject) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.subjects.remove(subject);
            }
        }
        if t.total == 0 {
            counts.remove(tenant);
        }
    }

    /// Connections counted against each tenant's cap (live and about to start).
    pub(crate) fn connection_counts(&self) -> HashMap<TenantId, u32> {
        self.counts().iter().map(|(t, c)| (t.clone(), c.total)).collect()
    }

    /// The live sessions, optionally of one tenant, oldest first.
    pub(crate) fn list_sessions(&self, tenant: Option<&TenantId>) -> Vec<SessionInfo> {
        let mut conns: Vec<Arc<Conn>> = self
            .sessions()
            .values()
            .map(|r| &r.conn)
            .filter(|c| tenant.is_none_or(|t| c.tenant == *t))
            .cloned()
            .collect();
        conns.sort_by_key(|c| c.id);
        conns
            .iter()
            .map(|c| {
                let (acked, unacked) = c.ack_state();
                (c, acked, unacked)
            })
            .map(|(c, acked, unacked)| SessionInfo {
                last_acked_message_id: acked.map(|a| a.to_string()),
                unacked,
                session_id: c.session_id.to_string(),
                tenant: c.tenant.to_string(),
                subject: c.subject.to_string(),
                remote_addr: c.remote.to_string(),
                connected_since: crate::time::rfc3339_from_unix_ms(c.connected_at_ms),
                subscriptions: c.subscription_count(),
                queue_depth: c.outbox.len(),
            })
            .collect()
    }

    /// Subscriptions held per tenant.
    pub(crate) fn subscription_counts(&self) -> HashMap<TenantId, usize> {
        let mut out: HashMap<TenantId, usize> = HashMap::new();
        for c in self.sessions().values().map(|r| &r.conn) {
            *out.entry(c.tenant.clone()).or_default() += c.subscription_count();
        }
        out
    }

    /// Asks one session to close; false when no live session has this id.
    pub(crate) fn close_session(&self, session_id: &str, reason: CloseReason) -> Option<Arc<Conn>> {
        // Only the id as it was shown (hyphenated, lower case) names a session.
        let id = session_id.parse::<uuid::Uuid>().ok().filter(|u| u.hyphenated().to_string() == session_id)?;
        let conn = self.sessions().values().map(|r| &r.conn).find(|c| c.session_id == id).cloned()?;
        let discarded = conn.outbox.request_close(reason);
        self.metrics.events_dropped.inc_by(discarded);
        Some(conn)
    }

    /// Wakes every session so it re-reads the policies (after a reload).
    pub(crate) fn wake_all(&self) {
        let conns: Vec<Arc<Conn>> = self.sessions().values().map(|r| Arc::clone(&r.conn)).collect();
        for c in conns {
            c.outbox.wake();
        }
    }

    /// Whole seconds since the hub started, rounded down: "now" when measuring quiet time.
    fn elapsed_secs(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// The same rounded up: when something happened, so a quiet time measured from it in whole
    /// seconds is never longer than the real one (an idle close comes up to a second late,
    /// never early).
    fn elapsed_secs_up(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_millis().div_ceil(1000)).unwrap_or(u32::MAX)
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Registered>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new session under its reservation; it receives nothing until it subscribes.
    /// [`Hub::unregister`] frees the reservation's place.
    pub(crate) fn register(
        &self,
        session_id: uuid::Uuid,
        mut reservation: Reservation,
        remote: SocketAddr,
        user_agent: Option<Box<str>>,
        origin: Option<Box<str>>,
    ) -> Arc<Conn> {
        reservation.armed = false;
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            session_id,
            tenant: reservation.tenant.clone(),
            subject: Arc::clone(&reservation.subject),
            remote,
            user_agent,
            origin,
            connected_at_ms: crate::time::unix_now_ms(),
            outbox: Outbox::new(self.max_pending),
            last_message_secs: AtomicU32::new(self.elapsed_secs_up()),
            subscriptions: AtomicU32::new(0),
            index_slot: AtomicU32::new(NOT_INDEXED),
            idle_nudge: AtomicBool::new(false),
            timers: AtomicU8::new(0),
            acked: (AtomicU64::new(0), AtomicU64::new(0)),
            unacked: AtomicU64::new(u64::MAX),
        });
        let registered = Registered {
            conn: Arc::clone(&conn),
            next_ping_ms: self.elapsed_ms() + self.heartbeat_ms,
            expires_ms: u64::MAX,
        };
        self.sessions().insert(conn.id, registered);
        if self.shutting_down.load(Ordering::SeqCst) {
            conn.outbox.request_close(shutdown_reason());
        }
        conn
    }

    /// Removes a session and its subscriptions from the hub, and frees its place under the caps.
    pub(crate) fn unregister(&self, conn: &Arc<Conn>) {
        self.set_filters(conn, Arc::from(Vec::new()));
        if self.sessions().remove(&conn.id).is_some() {
            self.release(&conn.tenant, &conn.subject);
        }
    }

    /// Replaces a connection's set of subscription filters (empty removes it from the index).
    pub(crate) fn set_filters(&self, conn: &Arc<Conn>, filters: Arc<[Arc<SubscriptionFilter>]>) {
        let count = filters.len();
        let index = {
            let tenants = read(&self.tenants);
            tenants.get(&conn.tenant).cloned()
        };
        let index = match index {
            Some(i) => i,
            None if count == 0 => return,
            None => Arc::clone(write(&self.tenants).entry(conn.tenant.clone()).or_default()),
        };
        write(&index).set(&conn.tenant, conn, filters);
        let before = conn.subscriptions.swap(u32::try_from(count).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.metrics.active_subscriptions.add(count as i64 - before as i64);
    }

    /// Hands a batch of events (in publish order) to every matching connection of each event's
    /// tenant. Each connection gets its share of the batch in one push, so it is woken once and
    /// writes the burst in one syscall.
    pub(crate) fn dispatch_batch(&self, evs: &[Arc<Published>]) {
        self.metrics.events_broadcast.inc_by(evs.len() as u64);
        let mut dropped = 0;
        let mut matched: Vec<&Arc<Published>> = Vec::new();
        // Runs of consecutive events of one tenant share one pass over that tenant's index.
        for run in evs.chunk_by(|a, b| a.routing.tenant == b.routing.tenant) {
            let index = {
                let tenants = read(&self.tenants);
                tenants.get(&run[0].routing.tenant).cloned()
            };
            let Some(index) = index else { continue };
            for entry in read(&index).entries.iter() {
                if entry.all {
                    dropped += entry.conn.outbox.push_all(run).dropped;
                    continue;
                }
                matched.clear();
                matched.extend(run.iter().filter(|ev| entry.filters.iter().any(|f| f.matches(&ev.routing))));
                if !matched.is_empty() {
                    dropped += entry.conn.outbox.push_all(matched.iter().copied()).dropped;
                }
            }
        }
        if dropped > 0 {
            self.metrics.events_dropped.inc_by(dropped);
        }
    }

    /// Begins shutdown: every live session, and any that registers from now on, is asked to
    /// close with `closing` (1001) and a spread-out reconnect delay, after its queued events.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let conns: Vec<Arc<Conn>> = self.sessions().values().map(|r| Arc::clone(&r.conn)).collect();
        for c in conns {
            c.outbox.request_close(shutdown_reason());
        }
    }

    /// Number of live sessions.
    pub(crate) fn session_count(&self) -> usize {
        self.sessions().len()
    }

    /// Sets when the hub's clock raises [`Timers::expired`] for this session (a refresh moves it).
    pub(crate) fn set_expiry(&self, conn: &Conn, left: Duration) {
        let at = self.elapsed_ms().saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX));
        if let Some(r) = self.sessions().get_mut(&conn.id) {
            r.expires_ms = at;
        }
    }

    /// One tick of the hub's clock: raises the heartbeat and the token expiry of every session
    /// whose time has come and wakes it. The deadlines sit in the registry's own table, so a
    /// tick reads that table front to back and touches a session only when its time has come.
    /// Returns how many sessions were woken.
    pub(crate) fn tick_clock(&self) -> usize {
        let now = self.elapsed_ms();
        let mut sessions = self.sessions();
        let mut n = 0;
        for r in sessions.values_mut() {
            let mut raised = 0;
            if now >= r.next_ping_ms {
                r.next_ping_ms = now + self.heartbeat_ms;
                raised |= Timers::HEARTBEAT;
            }
            if now >= r.expires_ms {
                raised |= Timers::EXPIRED;
            }
            if raised != 0 {
                r.conn.timers.fetch_or(raised, Ordering::AcqRel);
                r.conn.outbox.wake();
                n += 1;
            }
        }
        n
    }

    /// One sweep of the cleanup task: nudges sessions that hold no subscription and sent no
    /// message for `idle`; each session re-checks its own state before closing (so a subscribe
    /// racing the sweep wins). Returns how many were nudged.
    pub(crate) fn sweep_idle(&self, idle: Duration) -> usize {
        let now = self.elapsed_secs();
        let idle_secs = u32::try_from(idle.as_secs()).unwrap_or(u32::MAX);
        let sessions = self.sessions();
        let mut n = 0;
        for c in sessions.values().map(|r| &r.conn) {
            if c.subscriptions.load(Ordering::Relaxed) == 0
                && now.saturating_sub(c.last_message_secs.load(Ordering::Relaxed)) >= idle_secs
            {
                c.idle_nudge.store(true, Ordering::Relaxed);
                c.outbox.wake();
                n += 1;
            }
        }
        n
    }
}

fn shutdown_reason() -> CloseReason {
    CloseReason::Shutdown { reconnect_after_ms: rand::random_range(500..5000) }
}

/// Events the dispatcher takes from the bus at once (whatever is waiting, up to this many).
const DISPATCH_BATCH: usize = 256;

/// The dispatcher task: takes events from the bus in order and fans them out, a batch of
/// whatever is waiting at a time.
pub(crate) async fn run_dispatcher(hub: Arc<Hub>, mut rx: mpsc::Receiver<Arc<Published>>) {
    let mut batch = Vec::with_capacity(DISPATCH_BATCH);
    while rx.recv_many(&mut batch, DISPATCH_BATCH).await > 0 {
        hub.dispatch_batch(&batch);
        batch.clear();
    }
}

/// The hub's clock: heartbeats and token expiries of every session, every [`CLOCK_TICK`].
pub(crate) async fn run_clock(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(CLOCK_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        hub.tick_clock();
    }
}

/// The cleanup task: every `interval`, closes idle sessions.
pub(crate) async fn run_cleanup(hub: Arc<Hub>, interval: Duration, idle: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let n = hub.sweep_idle(idle);
        if n > 0 {
            tracing::debug!(sessions = n, "cleanup: idle candidates nudged");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub_and_conn(heartbeat: Duration) -> (Arc<Hub>, Arc<Conn>) {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let hub = Arc::new(Hub::new(metrics, 16, heartbeat));
        let tenant = TenantId::new("acme").expect("tenant");
        let reservation = hub.reserve(&tenant, "alice", &Limits::default()).expect("place");
        let conn = hub.register(uuid::Uuid::new_v4(), reservation, "127.0.0.1:1".parse().expect("addr"), None, None);
        (hub, conn)
    }

    #[test]
    fn the_clock_raises_nothing_before_its_time() {
        let (hub, conn) = hub_and_conn(Duration::from_secs(30));
        hub.set_expiry(&conn, Duration::from_secs(60));
        assert_eq!(hub.tick_clock(), 0);
        let t = conn.take_timers();
        assert!(!t.heartbeat() && !t.expired());
    }

    #[test]
    fn the_clock_raises_an_expired_token_and_keeps_raising_it() {
        let (hub, conn) = hub_and_conn(Duration::from_secs(30));
        hub.set_expiry(&conn, Duration::ZERO);
        assert_eq!(hub.tick_clock(), 1);
        let t = conn.take_timers();
        assert!(t.expired() && !t.heartbeat());
        // Taken means cleared; the next tick raises it again (the session is closing anyway).
        assert!(!conn.take_timers().expired());
        assert_eq!(hub.tick_clock(), 1);
        assert!(conn.take_timers().expired());
        // A refresh moves the deadline out.
        hub.set_expiry(&conn, Duration::from_secs(60));
        assert_eq!(hub.tick_clock(), 0);
    }

    #[test]
    fn the_clock_raises_a_heartbeat_once_per_interval() {
        let (hub, conn) = hub_and_conn(Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(hub.tick_clock(), 1);
        assert!(conn.take_timers().heartbeat());
        // The next one is an interval later, not on every tick.
        assert_eq!(hub.tick_clock(), 0);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(hub.tick_clock(), 1);
        assert!(conn.take_timers().heartbeat());
    }

    #[test]
    fn an_unregistered_session_is_no_longer_ticked() {
        let (hub, conn) = hub_and_conn(Duration::from_secs(30));
        hub.set_expiry(&conn, Duration::ZERO);
        hub.unregister(&conn);
        assert_eq!(hub.tick_clock(), 0);
    }
}

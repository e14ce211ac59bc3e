//! One connection's lifecycle after the upgrade: `welcome`, client messages, subscriptions,
//! draining the outbox into the socket, heartbeats, token expiry and every way of closing.
//!
//! One task per connection runs a `select!` over the socket and the outbox; heartbeats and the
//! token deadline arrive as outbox wake-ups raised by the hub's clock ([`crate::fanout::run_clock`]),
//! so a connection costs one task and no timer. Every write also races the outbox's close
//! signal, the token deadline and a write timeout, so a client that stopped reading can neither
//! hold a session past its token nor block its close. Every server-initiated close sends
//! `closing` and a typed close code, preceded by `lagged` if events were lost. The session never
//! touches another tenant's state: its only route to events is its own outbox, and its filters
//! always carry the mandatory labels of its principal.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::audit::{AuditLog, Kind, Record};
use crate::auth::{Authenticator, Principal};
use crate::bus::{Bus, Published};
use crate::event::MessageId;
use crate::fanout::{Conn, Hub, Reservation};
use crate::filter::{FilterError, LabelPair, SubscriptionFilter, TENANT_LABEL};
use crate::limits::Gcra;
use crate::metrics::Metrics;
use crate::outbox::Drain;
use crate::policy::store::PolicyStore;
use crate::policy::{Admission, TenantPolicy};
use crate::protocol::{self, ClientMessage, CloseReason, ErrorCode, ProtocolError, ServerMessage};
use crate::short_str::ShortStr;
use crate::ws::{Message, WebSocket, WsError};

/// The socket of one session: the lean WebSocket over hyper's upgraded connection.
pub(crate) type Socket = WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Events written per drain before the task looks at the socket again.
const BATCH: usize = 64;
/// The drain buffer a thread keeps between drains (larger ones, from a replay, are freed).
const KEEP_BATCH_CAPACITY: usize = BATCH;

/// What one drain of the outbox did.
enum Drained<'a> {
    /// The batch (possibly empty) was written at once: the close to make now, if one was
    /// requested and nothing is left before it, and whether more is queued.
    Written { close: Option<CloseReason>, more: bool },
    /// The write failed.
    Failed(End),
    /// The boxed rest of a write that could not complete at once.
    Slow(std::pin::Pin<Box<dyn Future<Output = Result<(), End>> + Send + 'a>>),
}

/// Returns a drain's vector to this thread's spare, unless a replay grew it large.
fn give_back(mut batch: Vec<Arc<Published>>) {
    batch.clear();
    if batch.capacity() <= KEEP_BATCH_CAPACITY {
        SPARE_BATCH.set(batch);
    }
}

thread_local! {
    /// The vector a drain collects its batch in: taken by the draining session for the drain and
    /// its write, then given back, so no session keeps one of its own while it idles.
    static SPARE_BATCH: std::cell::Cell<Vec<Arc<Published>>> = const { std::cell::Cell::new(Vec::new()) };
}
/// Wake-ups by the outbox after which the socket is polled first once (see `main_loop`).
const FAIR_EVERY: u32 = 8;
/// Refused messages within [`REFUSAL_WINDOW`] after which the connection is closed with 4029.
const PERSISTENT_REFUSALS: u32 = 10;
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);
/// Token deadlines further out than this are clamped (a huge `exp` must not overflow a timer).
const MAX_SESSION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Session settings derived once from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct SessionSettings {
    pub(crate) heartbeat: Duration,
    /// No subscription and no client message for this long: the session is closed.
    pub(crate) idle_timeout: Duration,
    /// Service-wide ceilings; a tenant's policy may set lower limits, never higher ones.
    pub(crate) max_subscriptions: usize,
    pub(crate) messages_per_second: NonZeroU32,
    pub(crate) message_burst: NonZeroU32,
    /// Largest client message; larger closes with 1009.
    pub(crate) max_frame_bytes: usize,
    /// Clock skew tolerated on `exp`, also applied to the session deadline.
    pub(crate) leeway: Duration,
    /// A write that makes no progress for this long marks the client as stuck (4008).
    pub(crate) write_timeout: Duration,
    /// How long a closing handshake may take before the socket is dropped.
    pub(crate) close_timeout: Duration,
    /// The origin of every session's message-limiter timestamps.
    pub(crate) epoch: Instant,
}

/// What every session shares: the services it talks to and the settings, behind one pointer per
/// session (every idle connection keeps its session's state, so it is kept small).
pub(crate) struct Services {
    pub(crate) hub: Arc<Hub>,
    pub(crate) bus: Arc<Bus>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) policies: Arc<PolicyStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) audit: AuditLog,
    pub(crate) settings: SessionSettings,
}

/// What a session keeps of its upgrade for its whole life.
pub(crate) struct SessionContext {
    pub(crate) shared: Arc<Services>,
    pub(crate) principal: Principal,
    /// For the audit records' common fields.
    pub(crate) user_agent: Option<Box<str>>,
    pub(crate) origin: Option<Box<str>>,
}

/// What the admission decided, handed to the session with its context and consumed as it starts.
pub(crate) struct Admitted {
    /// The id sent in `welcome` (already in the `connection.accepted` record).
    pub(crate) session_id: uuid::Uuid,
    pub(crate) remote: SocketAddr,
    /// Labels every subscription must carry (`tenant`, the configured and the policy's claims).
    pub(crate) mandatory: Arc<[LabelPair]>,
    /// The place under the connection caps.
    pub(crate) reservation: Reservation,
    /// The tenant's policy the connection was admitted under, and its generation.
    pub(crate) policy: Arc<TenantPolicy>,
    pub(crate) policy_generation: u64,
}

/// How a session ends.
enum End {
    /// The server closes with this reason.
    Close(CloseReason),
    /// The client closed (with its code) or vanished.
    ClientGone(Option<u16>),
    /// Writing failed, or the client must be cut off without a close handshake.
    Abort,
}

/// What woke the session's loop: the outbox (events, a close request, the hub's clock, a policy
/// reload) or the socket. What the socket read is boxed: this value sits in the loop's state
/// while events are written, and every idle session pays for that state (a client message is
/// rare next to the events a session writes).
enum Wake {
    Outbox,
    Incoming(Box<Result<Message, WsError>>),
}

/// Unregisters the session and settles its gauges however the task ends (even by a panic).
struct Registration {
    shared: Arc<Services>,
    conn: Arc<Conn>,
}

impl Registration {
    /// How long the session has lived (from the connection state's start time).
    fn elapsed(&self) -> Duration {
        Duration::from_millis(crate::time::unix_now_ms().saturating_sub(self.conn.connected_at_ms))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.hub.unregister(&self.conn);
        self.shared.metrics.active_connections.dec();
        self.shared.metrics.session_duration.observe(self.elapsed().as_secs_f64());
    }
}

/// Restricts a filter to the event types the tenant's policy allows: a filter that named no
/// type gets the allowed ones, a filter naming a type outside them is refused.
fn narrow_to_policy(
    filter: SubscriptionFilter,
    all_types: bool,
    policy: &TenantPolicy,
) -> Result<SubscriptionFilter, String> {
    let Some(allowed) = policy.allowed_event_types else {
        return Ok(if all_types { filter.with_event_type_mask(0) } else { filter });
    };
    if all_types {
        return Ok(filter.with_event_type_mask(allowed));
    }
    let outside = filter.event_type_mask() & !allowed;
    if outside == 0 {
        return Ok(filter);
    }
    let names: Vec<&str> =
        crate::event::EventType::ALL.iter().filter(|t| outside & t.bit() != 0).map(|t| t.as_str()).collect();
    Err(format!(
        "event types not allowed for this tenant: {} (allowed: {})",
        names.join(", "),
        policy.allowed_event_type_names().join(", ")
    ))
}

/// Every label a session's subscriptions must carry: `tenant`, the configured claim labels and
/// the tenant policy's `mandatory_labels`, each taking its claim's value.
pub(crate) fn mandatory_labels(
    auth: &Authenticator,
    policy: &TenantPolicy,
    p: &Principal,
) -> Result<Arc<[LabelPair]>, crate::auth::AuthError> {
    use crate::auth::AuthError;
    let mut labels = auth.mandatory_labels(p)?;
    for (label, claim) in policy.mandatory_labels.iter() {
        let value = match p.claims.get(claim) {
            Some(serde_json::Value::String(v)) if !v.is_empty() && v.len() <= 256 => v.clone(),
            Some(_) => return Err(AuthError::InvalidClaim(claim.clone())),
            None => return Err(AuthError::MissingClaim(claim.clone())),
        };
        match labels.binary_search_by(|(l, _)| l.as_str().cmp(label)) {
            Ok(i) if labels[i].1 != value => return Err(AuthError::InvalidClaim(claim.clone())),
            Ok(_) => {}
            Err(i) => labels.insert(i, (label.clone(), value)),
        }
    }
    // Shared strings where there is one to share: the tenant's own, and one `tenant` name.
    let shared = |label: String, value: String| -> LabelPair {
        if label.as_str() == &**TENANT_LABEL && value == p.tenant.as_str() {
            (Arc::clone(&TENANT_LABEL), p.tenant.shared())
        } else {
            (label.into(), value.into())
        }
    };
    Ok(labels.into_iter().map(|(l, v)| shared(l, v)).collect())
}

/// When a token expiring at `expires_at` (Unix seconds) runs out with `leeway` of tolerated
/// skew, in Unix milliseconds.
fn deadline_ms(expires_at: u64, leeway: Duration) -> u64 {
    let leeway_ms = u64::try_from(leeway.as_millis()).unwrap_or(u64::MAX);
    expires_at.saturating_mul(1000).saturating_add(leeway_ms)
}

/// The same deadline on tokio's clock.
fn deadline_for(expires_at: u64, leeway: Duration) -> tokio::time::Instant {
    let left = Duration::from_millis(deadline_ms(expires_at, leeway).saturating_sub(crate::time::unix_now_ms()));
    tokio::time::Instant::now() + left.min(MAX_SESSION)
}

/// A subscription that resumed: live events it could have replayed are not written twice.
struct Resumed {
    /// The subscription's `Sub::key`; the entry outlives an unsubscribe until the seam passes,
    /// because the events it replayed stay replayed.
    key: u64,
    filter: Arc<SubscriptionFilter>,
    /// The client's position: it has everything matching up to here.
    after: MessageId,
    /// Every matching event up to here was replayed (if after `after`) or is the client's.
    through: MessageId,
}

/// Did a resumed subscription already cover this live event? Yes if the event is within the
/// replay's snapshot (`through`) and matches the resumed filter, and either it was replayed
/// (after the client's position) or it is at or before the position and no other subscription
/// of the connection wants it.
fn already_covered(e: &Published, resumed: &[Resumed], subs: &[Sub]) -> bool {
    // A subscription "has" the event when it resumed from a position at or after it.
    let has = |key: u64| resumed.iter().any(|r| r.key == key && e.id <= r.after);
    resumed.iter().any(|r| {
        e.id <= r.through
            && r.filter.matches(&e.routing)
            && (e.id > r.after || !subs.iter().any(|s| s.key != r.key && s.filter.matches(&e.routing) && !has(s.key)))
    })
}

/// Queues the events' frames (one serialization per event, shared by every connection) in one
/// reserved buffer; nothing is written until the flush.
fn queue_events(socket: &mut Socket, batch: &[Arc<Published>]) {
    socket.reserve_frames(batch.len(), batch.iter().map(|ev| ev.frame.len()).sum());
    for ev in batch {
        socket.queue_text(&ev.frame);
    }
}

/// The position to resume from to get every event lost from `first_lost` on: the one before it.
/// Events after it that did arrive (shedding drops low priorities first) come again.
fn resume_point(first_lost: MessageId) -> Option<String> {
    (first_lost.seq > 1).then(|| MessageId { epoch: first_lost.epoch, seq: first_lost.seq - 1 }.to_string())
}

/// Most unacknowledged events a session tracks one by one; beyond, the oldest are only counted.
const MAX_TRACKED_UNACKED: usize = 4096;

/// A session's acknowledgement state, from its first `ack` on.
#[derive(Default)]
struct AckState {
    /// Delivered, unacknowledged message ids, oldest first.
    pending: std::collections::VecDeque<MessageId>,
    /// Unacknowledged events older than `pending` whose ids were not kept.
    untracked: u64,
    last: Option<MessageId>,
}

impl AckState {
    fn depth(&self) -> u64 {
        self.untracked + self.pending.len() as u64
    }

    /// Records delivered events; returns how many were added to the depth.
    fn delivered(&mut self, batch: &[Arc<Published>]) -> u64 {
        for e in batch {
            if self.pending.len() == MAX_TRACKED_UNACKED {
                self.pending.pop_front();
                self.untracked += 1;
            }
            self.pending.push_back(e.id);
        }
        batch.len() as u64
    }

    /// Applies an ack (ids only move forward); returns how many left the depth.
    fn ack(&mut self, id: MessageId) -> u64 {
        if self.last.is_some_and(|l| id <= l) {
            return 0;
        }
        self.last = Some(id);
        let before = self.depth();
        if self.pending.front().is_some_and(|f| *f <= id) {
            // Everything older than the oldest kept id was delivered before it: acked too.
            self.untracked = 0;
        }
        while self.pending.front().is_some_and(|f| *f <= id) {
            self.pending.pop_front();
        }
        before - self.depth()
    }
}

/// One subscription of a session.
struct Sub {
    /// Unique for the session's life (ids can be reused after an unsubscribe).
    key: u64,
    /// Inline when short (ids never grow, and most are a few bytes).
    id: ShortStr,
    filter: Arc<SubscriptionFilter>,
    /// The client named no event type: the filter follows the types the policy allows.
    all_types: bool,
}

struct Session {
    /// What every session shares (the hub, the bus, auth, policies, metrics, audit, settings).
    shared: Arc<Services>,
    /// The current token's id and `exp` (the tenant and subject are the connection state's).
    token_id: ShortStr,
    token_expires_at: u64,
    conn: Arc<Conn>,
    /// Subscriptions by id: a short vector (a handful per connection, bounded by the limit).
    subs: Vec<Sub>,
    /// Shared with every subscription filter that names no label of its own.
    mandatory: Arc<[LabelPair]>,
    /// The policy in force for this session (replaced when a reload changes it).
    policy: Arc<TenantPolicy>,
    policy_generation: u64,
    /// The `iss` claim of the session's token: a refresh must come from the same issuer. Boxed:
    /// compared only on a refresh, and 24 bytes less in every idle session.
    issuer: Option<Box<serde_json::Value>>,
    /// The client's message rate (limits from [`Session::message_limits`]).
    limiter: Gcra,
    refusals: u32,
    /// Start of the current refusal window, in ms since [`SessionSettings::epoch`].
    refusal_window_ms: u64,
    /// After an unsubscribe, events queued up to this id are re-checked against the current
    /// subscriptions before they are written.
    /// Boxed: rare, and 16 bytes less in every idle session.
    recheck_until: Option<Box<MessageId>>,
    /// Resumed subscriptions whose seam with the live stream is not yet passed.
    /// Boxed: most sessions never resume, and each byte here is kept by every idle one.
    // The box is the point: 8 bytes inline instead of a vector's 24.
    #[allow(clippy::box_collection)]
    resumed: Option<Box<Vec<Resumed>>>,
    /// The last `Sub::key` handed out.
    next_sub_key: u64,
    /// The newest event written to the client (the resume point a `lagged` names).
    last_written: Option<MessageId>,
    /// Delivered events not yet acknowledged, once the client acks (boxed: most never do).
    acks: Option<Box<AckState>>,
    /// For `connection.closed`: application messages received, events written, events lost.
    received: u64,
    delivered: u64,
    dropped: u64,
}

/// Runs a session to its end. Setup happens here, synchronously, so the returned future (which
/// every idle connection keeps for its whole life) holds only the session and its socket.
// Boxed on purpose: the spawning task keeps its captures for its whole life, so it holds a
// pointer, and the allocation is freed here as the session takes the context out.
#[allow(clippy::boxed_local)]
pub(crate) fn run(mut socket: Socket, boxed: Box<(SessionContext, Admitted)>) -> impl Future<Output = ()> + Send {
    let (mut ctx, admitted) = *boxed;
    let conn = ctx.shared.hub.register(
        admitted.session_id,
        admitted.reservation,
        admitted.remote,
        ctx.user_agent.take(),
        ctx.origin.take(),
    );
    if ctx.shared.policies.generation() != admitted.policy_generation {
        // A reload landed between admission and registration; its wake-up missed this session.
        conn.outbox.wake();
    }
    ctx.shared.metrics.active_connections.inc();
    ctx.shared.metrics.total_connections.inc();
    let registration = Registration { shared: Arc::clone(&ctx.shared), conn: Arc::clone(&conn) };
    tracing::info!(
        session_id = %conn.session_id, tenant = %conn.tenant, subject = %conn.subject,
        remote = %conn.remote, token_id = %ctx.principal.token_id, "session opened"
    );
    let mandatory = admitted.mandatory;
    // The claims were needed to derive the mandatory labels; a refresh only compares the issuer.
    let issuer = ctx.principal.claims.get("iss").cloned().map(Box::new);
    ctx.principal.claims = serde_json::Map::new();
    let welcome = ServerMessage::Welcome {
        session_id: conn.session_id.to_string(),
        server_time: crate::time::rfc3339_now(),
        tenant: ctx.principal.tenant.to_string(),
        subject: ctx.principal.subject.clone(),
        expires_at: crate::time::rfc3339_from_unix(ctx.principal.expires_at),
        heartbeat_interval_secs: ctx.shared.settings.heartbeat.as_secs(),
        protocol: protocol::PROTOCOL_VERSION,
    };
    socket.queue_text(welcome.to_text().as_bytes());
    ctx.shared.metrics.messages_sent.inc();
    let mut s = Session {
        limiter: Gcra::default(),
        conn,
        subs: Vec::new(),
        mandatory,
        policy: admitted.policy,
        policy_generation: admitted.policy_generation,
        issuer,
        refusals: 0,
        refusal_window_ms: 0,
        recheck_until: None,
        resumed: None,
        next_sub_key: 0,
        last_written: None,
        acks: None,
        received: 0,
        delivered: 0,
        dropped: 0,
        token_id: std::mem::take(&mut ctx.principal.token_id).into(),
        token_expires_at: ctx.principal.expires_at,
        shared: ctx.shared,
    };
    s.arm_expiry();
    async move {
        // Rare paths are boxed, so the future stays small.
        let end = match Box::pin(s.flush(&mut socket)).await {
            Ok(()) => s.main_loop(&mut socket).await,
            Err(end) => end,
        };
        Box::pin(s.finish(&mut socket, end, registration)).await;
    }
}

impl Drop for Session {
    /// However the session ends (a panic or an aborted task too), its unacknowledged depth
    /// leaves the gauge.
    fn drop(&mut self) {
        if let Some(state) = self.acks.take() {
            self.shared.metrics.unacked_events.sub(state.depth() as i64);
        }
    }
}

impl Session {
    /// Ends the session: the close handshake the ending calls for, TLS close_notify, then the
    /// hub forgets it.
    async fn finish(&mut self, socket: &mut Socket, end: End, registration: Registration) {
        let (code, reason) = match end {
            End::Close(reason) => {
                self.close(socket, reason).await;
                (Some(reason.close_code().code()), reason.as_str())
            }
            End::ClientGone(code) => {
                // The reply to the client's close is queued; push it out.
                if tokio::time::timeout(self.shared.settings.close_timeout, socket.flush()).await.is_err() {
                    tracing::debug!(session_id = %self.conn.session_id, "close reply not flushed in time");
                }
                (code, if code.is_some() { "client_closed" } else { "connection_lost" })
            }
            End::Abort => (None, "aborted"),
        };
        // Whatever was still queued or lost unreported never reached the client.
        let mut nothing = Vec::new();
        let left = self.conn.outbox.len() as u64;
        let unreported = self.conn.outbox.drain(&mut nothing, 0).lagged.map_or(0, |(n, _)| n);
        self.dropped += left + unreported;
        if code.is_some() {
            // Ends TLS with close_notify, so a client can tell a clean end from a cut connection.
            let _ = tokio::time::timeout(self.shared.settings.close_timeout, socket.shutdown()).await;
        }
        let elapsed = registration.elapsed();
        drop(registration);

        tracing::info!(
            session_id = %self.conn.session_id, tenant = %self.conn.tenant, subject = %self.conn.subject,
            close_code = code, reason, duration_secs = elapsed.as_secs_f64(), "session closed"
        );
        let record = self
            .audit_record(Kind::ConnectionClosed)
            .reason(reason)
            .field("close_code", code)
            .field("duration_ms", u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
            .field("messages_received", self.received)
            .field("events_delivered", self.delivered)
            .field("events_dropped", self.dropped);
        self.shared.audit.record(record).await;
    }

    async fn main_loop(&mut self, socket: &mut Socket) -> End {
        let mut awaiting_pong = false;
        // Wake-ups by the outbox since the socket was last polled first.
        let mut outbox_streak = 0u32;
        loop {
            // The outbox is looked at first, so a wake-up for events does not also poll the socket
            // (a read that would block and a waker to register, on every delivery). Every
            // FAIR_EVERY wake-ups the socket goes first, so a client sent a steady stream is still
            // read (its pongs, its close). The poll only says what happened; the work happens
            // after it. It is written by hand rather than with `select!`, so the loop's state
            // holds two references instead of two futures (the outbox and the socket keep their
            // own progress).
            let socket_first = outbox_streak >= FAIR_EVERY;
            if socket_first {
                outbox_streak = 0;
            }
            let outbox = &self.conn.outbox;
            let wake = std::future::poll_fn(|cx| {
                if socket_first {
                    if let Poll::Ready(incoming) = socket.poll_recv(cx) {
                        return Poll::Ready(Wake::Incoming(Box::new(incoming)));
                    }
                }
                if outbox.poll_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Outbox);
                }
                if !socket_first {
                    if let Poll::Ready(incoming) = socket.poll_recv(cx) {
                        return Poll::Ready(Wake::Incoming(Box::new(incoming)));
                    }
                }
                Poll::Pending
            })
            .await;
            let step = match wake {
                Wake::Outbox => {
                    outbox_streak += 1;
                    // Heartbeats and the token deadline come from the hub's clock, as wake-ups.
                    let timers = self.conn.take_timers();
                    // Raised before a refresh that this session handled since: not expired.
                    if timers.expired() && self.token_expired() {
                        return End::Close(CloseReason::TokenExpired);
                    }
                    if timers.heartbeat() {
                        if awaiting_pong {
                            return End::Close(CloseReason::HeartbeatTimeout);
                        }
                        awaiting_pong = true;
                        // A quiet connection gives its queues' memory back once per heartbeat.
                        self.conn.outbox.release_idle();
                        socket.queue_ping();
                        if let Err(end) = self.flush(socket).await {
                            return end;
                        }
                    }
                    // A quiet session still re-checks the policy here, at least once per heartbeat.
                    self.flush_outbox(socket).await
                }
                Wake::Incoming(incoming) => {
                    outbox_streak = 0;
                    awaiting_pong = false;
                    match *incoming {
                        Ok(Message::Ping) => self.flush(socket).await,
                        Ok(Message::Pong) => Ok(()),
                        Ok(Message::Close(code)) => Err(End::ClientGone(code)),
                        Ok(m) => Box::pin(self.on_message(socket, m)).await,
                        Err(e) => Err(self.read_failed(e)),
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// When the token, with the tolerated skew, runs out (from `exp`, so not kept: every idle
    /// session would keep 16 bytes more).
    fn expiry(&self) -> tokio::time::Instant {
        deadline_for(self.token_expires_at, self.shared.settings.leeway)
    }

    /// Has the token, with the tolerated skew, run out?
    fn token_expired(&self) -> bool {
        crate::time::unix_now_ms() >= deadline_ms(self.token_expires_at, self.shared.settings.leeway)
    }

    /// Hands the token deadline to the hub's clock, which wakes the session when it passes.
    fn arm_expiry(&self) {
        let left = self.expiry().saturating_duration_since(tokio::time::Instant::now());
        self.shared.hub.set_expiry(&self.conn, left);
    }

    /// Drains the outbox into the socket, a few batches at a time.
    async fn flush_outbox(&mut self, socket: &mut Socket) -> Result<(), End> {
        self.follow_policy(socket).await?;
        if self.conn.take_idle_nudge()
            && self.subs.is_empty()
            && self.conn.quiet_for(&self.shared.hub) >= self.shared.settings.idle_timeout
        {
            return Err(End::Close(CloseReason::IdleTimeout));
        }
        for _ in 0..4 {
            // Only a pointer, to a write that has to wait, is kept across the await (each byte of
            // this future is paid by every idle connection); that write ends with the drain's
            // close, if it returned one.
            match self.drain_once(socket) {
                Drained::Written { close: Some(reason), .. } => return Err(End::Close(reason)),
                Drained::Written { more: false, .. } => return Ok(()),
                Drained::Written { .. } => {}
                Drained::Failed(end) => return Err(end),
                Drained::Slow(slow) => slow.await?,
            }
        }
        // More is queued: come back after giving the socket and timers a turn.
        self.conn.outbox.wake();
        Ok(())
    }

    /// Drops events of a removed subscription that were queued before it was removed.
    fn recheck(&mut self, batch: &mut Vec<Arc<Published>>) {
        let Some(limit) = self.recheck_until.as_deref().copied() else { return };
        let passed = batch.last().is_some_and(|e| e.id >= limit) || self.conn.outbox.len() == 0;
        batch.retain(|e| e.id > limit || self.subs.iter().any(|s| s.filter.matches(&e.routing)));
        if passed {
            self.recheck_until = None;
        }
    }

    /// Drops live events a resumed subscription already covered: those it replayed, and those
    /// at or before the client's position that no other subscription asked for. Once the live
    /// stream passes a seam (an event after `through` was drained), that seam is forgotten.
    fn skip_replayed(&mut self, batch: &mut Vec<Arc<Published>>) {
        let Some(resumed) = self.resumed.as_deref_mut() else { return };
        let subs = &self.subs;
        batch.retain(|e| !already_covered(e, resumed, subs));
        if let Some(last) = batch.last().map(|e| e.id) {
            resumed.retain(|r| last <= r.through);
            if resumed.is_empty() {
                self.resumed = None;
            }
        }
    }

    /// Maps a read failure to how the session ends.
    fn read_failed(&self, e: WsError) -> End {
        if !matches!(e, WsError::Eof) {
            self.shared.metrics.connection_errors.inc();
        }
        tracing::debug!(session_id = %self.conn.session_id, error = %e, "read ended");
        match e {
            WsError::TooLarge { fatal: false, .. } => End::Close(CloseReason::FrameTooLarge),
            WsError::Protocol(_) => End::Close(CloseReason::ProtocolViolation),
            WsError::InvalidUtf8 => End::Close(CloseReason::InvalidUtf8),
            WsError::Eof => End::ClientGone(None),
            WsError::TooLarge { fatal: true, .. } | WsError::Io(_) => End::Abort,
        }
    }

    /// Runs a flush of queued frames, racing the close signal, the token deadline and the
    /// write timeout.
    /// Writes what the socket has queued. Most writes complete at once (the socket buffer has
    /// room): no timers, no allocation. Only the boxed slow path holds a write future and its
    /// timers, so this future, which every event write of every session embeds, stays small.
    async fn flush(&mut self, socket: &mut Socket) -> Result<(), End> {
        // `WebSocket::flush` keeps its progress in the socket, so a first attempt that cannot
        // finish is dropped and the slow path carries on with a fresh one.
        if let Some(r) = futures_util::FutureExt::now_or_never(socket.flush()) {
            return r.map_err(|e| self.write_failed(e));
        }
        Box::pin(self.flush_slow(socket)).await
    }

    /// Takes one batch from the outbox and writes it, if the socket takes it at once (the usual
    /// case: no allocation, no future). Otherwise, or when a `lagged` notice must go first, the
    /// rest is returned boxed, holding the batch, for the caller to await.
    fn drain_once<'a>(&'a mut self, socket: &'a mut Socket) -> Drained<'a> {
        let mut batch = SPARE_BATCH.take();
        debug_assert!(batch.is_empty());
        let Drain { close, lagged } = self.conn.outbox.drain(&mut batch, BATCH);
        self.recheck(&mut batch);
        self.skip_replayed(&mut batch);
        if lagged.is_none() {
            if batch.is_empty() {
                give_back(batch);
                return self.written(close);
            }
            queue_events(socket, &batch);
            if let Some(r) = futures_util::FutureExt::now_or_never(socket.flush()) {
                let r = r.map_err(|e| self.write_failed(e));
                self.events_written(&batch, true, &r);
                give_back(batch);
                return match r {
                    Ok(()) => self.written(close),
                    Err(end) => Drained::Failed(end),
                };
            }
        }
        Drained::Slow(Box::pin(self.write_drained_slow(socket, lagged, batch, close)))
    }

    fn written(&self, close: Option<CloseReason>) -> Drained<'static> {
        Drained::Written { close, more: self.conn.outbox.len() > 0 }
    }

    /// The rare part of [`Session::drain_once`]: a `lagged` notice before the batch, or a write
    /// the socket could not take at once (already queued). Ends with the drain's close, if it
    /// returned one: the next drain would report events lost since as another `lagged` and
    /// come back here, so the close must not wait for it.
    async fn write_drained_slow(
        &mut self,
        socket: &mut Socket,
        lagged: Option<(u64, MessageId)>,
        batch: Vec<Arc<Published>>,
        close: Option<CloseReason>,
    ) -> Result<(), End> {
        if let Some((dropped, first)) = lagged {
            self.dropped += dropped;
            let resume_from = resume_point(first);
            self.send(socket, ServerMessage::Lagged { dropped, since_message_id: first.to_string(), resume_from })
                .await?;
            if !batch.is_empty() {
                queue_events(socket, &batch);
            }
        }
        if !batch.is_empty() {
            let r = self.flush(socket).await;
            self.events_written(&batch, true, &r);
            r?;
        }
        give_back(batch);
        match close {
            Some(reason) => Err(End::Close(reason)),
            None => Ok(()),
        }
    }

    /// A write that has to wait: bounded by the close signal, the token and the write timeout.
    async fn flush_slow(&mut self, socket: &mut Socket) -> Result<(), End> {
        let conn = Arc::clone(&self.conn);
        tokio::select! {
            r = socket.flush() => r.map_err(|e| self.write_failed(e)),
            () = conn.outbox.closing() => {
                Err(End::Close(conn.outbox.close_reason().unwrap_or(CloseReason::SlowConsumer)))
            }
            () = tokio::time::sleep_until(self.expiry()) => Err(End::Close(CloseReason::TokenExpired)),
            () = tokio::time::sleep(self.shared.settings.write_timeout) => {
                tracing::info!(session_id = %conn.session_id, "write made no progress within the write timeout");
                Err(End::Close(CloseReason::SlowConsumer))
            }
        }
    }

    fn write_failed(&self, e: std::io::Error) -> End {
        self.shared.metrics.send_errors.inc();
        tracing::debug!(session_id = %self.conn.session_id, error = %e, "write failed");
        End::Abort
    }

    /// Writes events; `live` ones (not replayed) feed the publish-to-delivery latency histogram.
    async fn write_events(&mut self, socket: &mut Socket, batch: &[Arc<Published>], live: bool) -> Result<(), End> {
        queue_events(socket, batch);
        let r = self.flush(socket).await;
        self.events_written(batch, live, &r);
        r
    }

    /// Books a write of `batch`: delivered (and, for live events, their latency) or not known to
    /// have reached the client (reported in the final `lagged`).
    fn events_written(&mut self, batch: &[Arc<Published>], live: bool, r: &Result<(), End>) {
        let metrics = &self.shared.metrics;
        let n = batch.len() as u64;
        match r {
            Ok(()) => {
                self.delivered += n;
                if let Some(last) = batch.last() {
                    self.last_written = Some(self.last_written.map_or(last.id, |w| w.max(last.id)));
                }
                if let Some(state) = self.acks.as_mut() {
                    metrics.unacked_events.add(state.delivered(batch) as i64);
                    if let Some(last) = state.last {
                        self.conn.set_ack_state(last, state.depth());
                    }
                }
                metrics.events_delivered.inc_by(n);
                metrics.messages_sent.inc_by(n);
                if live {
                    // One clock read per write, not per event.
                    metrics.message_latency.observe_since(Instant::now(), batch.iter().map(|ev| ev.published_at));
                }
            }
            Err(_) => {
                self.conn.outbox.record_unsent(batch);
                metrics.events_dropped.inc_by(n);
            }
        }
    }

    async fn send(&mut self, socket: &mut Socket, msg: ServerMessage) -> Result<(), End> {
        socket.queue_text(msg.to_text().as_bytes());
        self.flush(socket).await?;
        self.shared.metrics.messages_sent.inc();
        Ok(())
    }

    async fn client_error(&mut self, socket: &mut Socket, e: ProtocolError) -> Result<(), End> {
        self.shared.metrics.connection_errors.inc();
        tracing::debug!(session_id = %self.conn.session_id, code = e.code.as_str(), message = %e.message, "client error");
        self.send(socket, ServerMessage::from_error(e)).await
    }

    /// The message rate and burst in force: the tenant's, capped by the service-wide ceiling.
    fn message_limits(&self) -> (u32, u32) {
        let (l, s) = (&self.policy.limits, &self.shared.settings);
        (l.messages_per_second.min(s.messages_per_second.get()), l.message_burst.min(s.message_burst.get()))
    }

    /// Subscriptions one connection may hold: the tenant's, capped by the service-wide ceiling.
    fn max_subscriptions(&self) -> usize {
        (self.policy.limits.max_subscriptions_per_connection as usize).min(self.shared.settings.max_subscriptions)
    }

    /// After a policy reload: ends the session if its tenant, subject or token is no longer
    /// admitted (4003) or its mandatory labels changed; otherwise takes the new limits and
    /// removes the subscriptions whose event types are no longer allowed (`error
    /// forbidden_filter` + `unsubscribed` each).
    async fn apply_policy(&mut self, socket: &mut Socket) -> Result<(), End> {
        let store = Arc::clone(&self.shared.policies);
        self.policy_generation = store.generation();
        let set = store.current();
        let admission = set.admit_principal(&self.conn.tenant, &self.conn.subject, &self.token_id);
        let reason = match admission {
            Admission::Allowed => None,
            Admission::UnknownTenant | Admission::Disabled => Some(CloseReason::TenantDisabled),
            Admission::SubjectRevoked => Some(CloseReason::SubjectRevoked),
            Admission::TokenRevoked => Some(CloseReason::TokenRevoked),
        };
        let Some(policy) = set.get(&self.conn.tenant).filter(|_| reason.is_none()) else {
            return Err(End::Close(reason.unwrap_or(CloseReason::TenantDisabled)));
        };
        if Arc::ptr_eq(policy, &self.policy) || **policy == *self.policy {
            return Ok(());
        }
        if policy.mandatory_labels != self.policy.mandatory_labels {
            return Err(End::Close(CloseReason::PolicyChanged));
        }
        if !policy.allows_origin(self.conn.origin.as_deref()) {
            return Err(End::Close(CloseReason::OriginNotAllowed));
        }
        let old_limits = self.message_limits();
        self.policy = Arc::clone(policy);
        if self.message_limits() != old_limits {
            // New limits start from a full bucket, as a new connection would.
            self.limiter = Gcra::default();
        }
        let mut removed = Vec::new();
        let mut changed = false;
        let mut kept = Vec::with_capacity(self.subs.len());
        for sub in std::mem::take(&mut self.subs) {
            let current = (*sub.filter).clone();
            match narrow_to_policy(current, sub.all_types, &self.policy) {
                Ok(f) if f == *sub.filter => kept.push(sub),
                Ok(f) => {
                    changed = true;
                    kept.push(Sub { filter: Arc::new(f), ..sub });
                }
                Err(message) => {
                    changed = true;
                    removed.push((sub.id.to_string(), message));
                }
            }
        }
        self.subs = kept;
        if !changed {
            return Ok(());
        }
        self.publish_filters();
        if let Some(last) = self.conn.outbox.last_queued() {
            self.recheck_until = Some(Box::new(self.recheck_until.as_deref().map_or(last, |r| (*r).max(last))));
        }
        for (id, message) in removed {
            tracing::info!(session_id = %self.conn.session_id, subscription_id = %id, "subscription removed by policy");
            let record = self
                .audit_record(Kind::SubscriptionRemoved)
                .reason("forbidden_filter")
                .field("subscription_id", id.clone())
                .field("by", "policy_reload");
            self.shared.audit.record(record).await;
            let e = ProtocolError {
                code: ErrorCode::ForbiddenFilter,
                message: format!("removed by a policy change: {message}"),
                subscription_id: Some(id.clone()),
            };
            self.client_error(socket, e).await?;
            self.send(socket, ServerMessage::Unsubscribed { subscription_id: id }).await?;
        }
        Ok(())
    }

    /// Applies a policy reload the session has not seen yet.
    async fn follow_policy(&mut self, socket: &mut Socket) -> Result<(), End> {
        if self.shared.policies.generation() == self.policy_generation {
            return Ok(());
        }
        Box::pin(self.apply_policy(socket)).await
    }

    /// Applies the per-connection message rate; persistent violation closes with 4029. The
    /// first refusal of a window is audited (`rate_limit.tripped`), not every one.
    async fn admit(&mut self) -> Result<bool, End> {
        let (per_second, burst) = self.message_limits();
        let now = u64::try_from(self.shared.settings.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if self.limiter.check(now, per_second, burst) {
            return Ok(true);
        }
        self.shared.metrics.rate_limited.with_label_values(&["message"]).inc();
        let now_ms = u64::try_from(self.shared.settings.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        if self.refusals == 0 || now_ms.saturating_sub(self.refusal_window_ms) > REFUSAL_WINDOW.as_millis() as u64 {
            self.refusal_window_ms = now_ms;
            self.refusals = 0;
            let record = self
                .audit_record(Kind::RateLimitTripped)
                .reason("rate_limited")
                .field("scope", "message")
                .field("limit_per_second", self.message_limits().0)
                .field("burst", self.message_limits().1);
            self.shared.audit.record(record).await;
        }
        self.refusals += 1;
        if self.refusals >= PERSISTENT_REFUSALS {
            return Err(End::Close(CloseReason::RateLimited));
        }
        Ok(false)
    }

    /// A record with this session's common fields.
    fn audit_record(&self, kind: Kind) -> Record {
        Record::new(kind)
            .session(self.conn.session_id.to_string())
            .tenant(self.conn.tenant.to_string())
            .subject(self.conn.subject.to_string())
            .token_id(self.token_id.to_string())
            .remote(self.conn.remote)
            .user_agent(self.conn.user_agent.as_deref())
            .origin(self.conn.origin.as_deref())
    }

    /// Answers a refused subscribe and audits it.
    async fn refuse_subscription(&mut self, socket: &mut Socket, e: ProtocolError) -> Result<(), End> {
        let record = self
            .audit_record(Kind::SubscriptionRejected)
            .reason(e.code.as_str())
            .field("subscription_id", e.subscription_id.clone());
        self.shared.audit.record(record).await;
        self.client_error(socket, e).await
    }

    async fn on_message(&mut self, socket: &mut Socket, msg: Message) -> Result<(), End> {
        let (text, size) = match msg {
            Message::Text(t) => {
                let n = t.len();
                (Some(t), n)
            }
            Message::Binary(n) => (None, n),
            Message::Ping | Message::Pong => return Ok(()),
            Message::Close(code) => return Err(End::ClientGone(code)),
        };
        self.shared.metrics.messages_received.inc();
        self.received += 1;
        if size > self.shared.settings.max_frame_bytes {
            self.shared.metrics.connection_errors.inc();
            return Err(End::Close(CloseReason::FrameTooLarge));
        }
        self.conn.touch(&self.shared.hub);
        self.follow_policy(socket).await?;
        if !self.admit().await? {
            let e = ProtocolError {
                code: ErrorCode::RateLimited,
                message: format!(
                    "more than {} messages per second (burst {}); slow down",
                    self.message_limits().0,
                    self.message_limits().1
                ),
                subscription_id: None,
            };
            return self.client_error(socket, e).await;
        }
        let Some(text) = text else {
            let e = ProtocolError {
                code: ErrorCode::InvalidMessage,
                message: "binary frames are not part of protocol v1; send JSON text".into(),
                subscription_id: None,
            };
            return self.client_error(socket, e).await;
        };
        match ClientMessage::parse(&text) {
            Ok(m) => self.handle(socket, m).await,
            Err(e) => self.client_error(socket, e).await,
        }
    }

    fn publish_filters(&self) {
        let filters: Arc<[Arc<SubscriptionFilter>]> = self.subs.iter().map(|s| Arc::clone(&s.filter)).collect();
        self.shared.hub.set_filters(&self.conn, filters);
    }

    async fn handle(&mut self, socket: &mut Socket, msg: ClientMessage) -> Result<(), End> {
        let err = |code, message: String, sub: Option<&str>| ProtocolError {
            code,
            message,
            subscription_id: sub.map(str::to_owned),
        };
        match msg {
            ClientMessage::Subscribe(sub) => {
                let id = sub.subscription_id;
                let resume_from = match sub.resume_from.as_deref().map(str::parse::<MessageId>).transpose() {
                    Ok(r) => r,
                    Err(e) => {
                        let e = err(ErrorCode::InvalidMessage, format!("resume_from: {e}"), Some(&id));
                        return self.refuse_subscription(socket, e).await;
                    }
                };
                if self.subs.iter().any(|s| *s.id == *id) {
                    let e =
                        err(ErrorCode::DuplicateSubscription, format!("subscription `{id}` already exists"), Some(&id));
                    return self.refuse_subscription(socket, e).await;
                }
                let max = self.max_subscriptions();
                if self.subs.len() >= max {
                    self.shared.metrics.rate_limited.with_label_values(&["subscriptions"]).inc();
                    let e = err(
                        ErrorCode::TooManySubscriptions,
                        format!("at most {max} subscriptions per connection"),
                        Some(&id),
                    );
                    return self.refuse_subscription(socket, e).await;
                }
                let filter =
                    SubscriptionFilter::from_spec(&sub.filters).and_then(|f| f.with_mandatory_labels(&self.mandatory));
                let filter = match filter {
                    Ok(f) => f,
                    Err(fe) => {
                        let code = match fe {
                            FilterError::ForbiddenLabel { .. } => ErrorCode::ForbiddenFilter,
                            _ => ErrorCode::InvalidFilter,
                        };
                        return self.refuse_subscription(socket, err(code, fe.to_string(), Some(&id))).await;
                    }
                };
                let all_types = filter.event_type_mask() == 0;
                let filter = match narrow_to_policy(filter, all_types, &self.policy) {
                    Ok(f) => f,
                    Err(message) => {
                        return self
                            .refuse_subscription(socket, err(ErrorCode::ForbiddenFilter, message, Some(&id)))
                            .await
                    }
                };
                let effective = filter.to_spec();
                let filter = Arc::new(filter);
                self.subs.reserve_exact(1);
                self.next_sub_key += 1;
                let key = self.next_sub_key;
                self.subs.push(Sub { key, id: id.as_str().into(), filter: Arc::clone(&filter), all_types });
                // Live first, then the window: whatever the snapshot misses arrives live.
                self.publish_filters();
                let replay = match resume_from {
                    Some(after) => Some((after, self.shared.bus.replay(&self.conn.tenant, after, &filter).await)),
                    None => None,
                };
                tracing::debug!(session_id = %self.conn.session_id, subscription_id = %id, "subscribed");
                let mut record = self
                    .audit_record(Kind::SubscriptionCreated)
                    .field("subscription_id", id.clone())
                    .field("filters", serde_json::to_value(&effective).unwrap_or_default());
                if let Some((after, r)) = &replay {
                    record = record
                        .field("resume_from", after.to_string())
                        .field("replayed", r.as_ref().map_or(serde_json::Value::Null, |r| r.events.len().into()));
                }
                self.shared.audit.record(record).await;
                self.send(socket, ServerMessage::Subscribed { subscription_id: id.clone(), filters: effective })
                    .await?;
                match replay {
                    None => Ok(()),
                    Some((after, Ok(r))) => {
                        self.resumed.get_or_insert_with(Box::default).push(Resumed {
                            key,
                            filter,
                            after,
                            through: r.through,
                        });
                        for (i, chunk) in r.events.chunks(BATCH).enumerate() {
                            if let Err(end) = self.write_events(socket, chunk, false).await {
                                // What was never attempted is lost too: the final `lagged` says so.
                                self.conn.outbox.record_unsent(r.events.get((i + 1) * BATCH..).unwrap_or_default());
                                return Err(end);
                            }
                        }
                        Ok(())
                    }
                    Some((_, Err(e))) => {
                        let msg = ServerMessage::Error {
                            code: ErrorCode::ResumeUnavailable,
                            message: format!("{e}; the subscription continues live from now"),
                            subscription_id: Some(id),
                            oldest_message_id: Some(e.oldest().map(|m| m.to_string())),
                        };
                        self.send(socket, msg).await
                    }
                }
            }
            ClientMessage::Unsubscribe(u) => {
                let id = u.subscription_id;
                let Some(at) = self.subs.iter().position(|s| *s.id == *id) else {
                    let e = err(ErrorCode::UnknownSubscription, format!("no subscription `{id}`"), Some(&id));
                    return self.client_error(socket, e).await;
                };
                self.subs.swap_remove(at);
                self.publish_filters();
                // Anything queued from now on was matched against the new set; what is already
                // queued is re-checked before it is written.
                if let Some(last) = self.conn.outbox.last_queued() {
                    self.recheck_until = Some(Box::new(self.recheck_until.as_deref().map_or(last, |r| (*r).max(last))));
                }
                let record = self
                    .audit_record(Kind::SubscriptionRemoved)
                    .reason("unsubscribed")
                    .field("subscription_id", id.clone());
                self.shared.audit.record(record).await;
                self.send(socket, ServerMessage::Unsubscribed { subscription_id: id }).await
            }
            ClientMessage::Ping(p) => {
                let timestamp = p.timestamp.unwrap_or_else(crate::time::rfc3339_now);
                self.send(socket, ServerMessage::Pong { timestamp }).await
            }
            ClientMessage::Ack(a) => match a.message_id.parse::<MessageId>() {
                Ok(id) if self.last_written.is_none_or(|w| id > w || id.epoch != w.epoch) => {
                    let e = err(ErrorCode::InvalidMessage, format!("ack of {id}, which was not delivered here"), None);
                    self.client_error(socket, e).await
                }
                Ok(id) => {
                    let state = self.acks.get_or_insert_with(Box::default);
                    let acked = state.ack(id);
                    self.shared.metrics.unacked_events.sub(acked as i64);
                    if let Some(last) = state.last {
                        self.conn.set_ack_state(last, state.depth());
                    }
                    Ok(())
                }
                Err(e) => self.client_error(socket, err(ErrorCode::InvalidMessage, e.to_string(), None)).await,
            },
            ClientMessage::Refresh(r) => self.refresh(socket, &r.token).await,
        }
    }

    async fn refresh(&mut self, socket: &mut Socket, token: &str) -> Result<(), End> {
        match self.shared.auth.verify(token).await {
            Err(e) => {
                let record = self
                    .audit_record(Kind::TokenRefreshed)
                    .reason(e.code())
                    .field("result", "refused")
                    .field("presented_token_id", crate::auth::short_hash(token));
                self.shared.audit.record(record).await;
                let e = ProtocolError {
                    code: ErrorCode::TokenInvalid,
                    message: format!("refresh refused: {}", e.code()),
                    subscription_id: None,
                };
                self.client_error(socket, e).await
            }
            Ok(p)
                if p.tenant != self.conn.tenant
                    || p.subject.as_str() != &*self.conn.subject
                    || p.claims.get("iss") != self.issuer.as_deref()
                    || self.shared.policies.current().admit_principal(&p.tenant, &p.subject, &p.token_id)
                        != Admission::Allowed
                    || mandatory_labels(&self.shared.auth, &self.policy, &p).ok().as_ref() != Some(&self.mandatory) =>
            {
                tracing::warn!(session_id = %self.conn.session_id, "refresh for another tenant or subject");
                let record = self
                    .audit_record(Kind::TokenRefreshed)
                    .reason(CloseReason::RefreshMismatch.as_str())
                    .field("result", "refused")
                    .field("presented_token_id", p.token_id.clone())
                    .field("presented_tenant", p.tenant.to_string())
                    .field("presented_subject", p.subject.clone());
                self.shared.audit.record(record).await;
                let e = ProtocolError {
                    code: ErrorCode::TokenInvalid,
                    message: "refresh token is for another issuer, tenant, subject or set of mandatory labels, \
                              or the tenant is no longer admitted"
                        .into(),
                    subscription_id: None,
                };
                self.client_error(socket, e).await?;
                Err(End::Close(CloseReason::RefreshMismatch))
            }
            Ok(mut p) => {
                // A refresh extends; a token expiring earlier than the current one changes nothing.
                p.expires_at = p.expires_at.max(self.token_expires_at);
                self.token_expires_at = p.expires_at;
                self.arm_expiry();
                let expires_at = crate::time::rfc3339_from_unix(p.expires_at);
                tracing::info!(session_id = %self.conn.session_id, token_id = %p.token_id, "token refreshed");
                let previous = std::mem::replace(&mut self.token_id, p.token_id.into()).to_string();
                let record = self
                    .audit_record(Kind::TokenRefreshed)
                    .reason("ok")
                    .field("result", "ok")
                    .field("previous_token_id", previous)
                    .field("token_expires_at", expires_at.clone());
                self.shared.audit.record(record).await;
                self.send(socket, ServerMessage::Refreshed { expires_at }).await
            }
        }
    }

    /// The closing handshake: `lagged` if events were lost, `closing`, the close frame, then wait
    /// (bounded) for the client's close so nothing in flight is cut off by a reset.
    async fn close(&mut self, socket: &mut Socket, reason: CloseReason) {
        // Stops further queueing (and discards what a cutting close leaves behind), so the lagged
        // notice below covers every event this connection lost.
        let discarded = self.conn.outbox.request_close(reason);
        self.shared.metrics.events_dropped.inc_by(discarded);
        let mut nothing = Vec::new();
        let lagged = self.conn.outbox.drain(&mut nothing, 0).lagged;
        let code = reason.close_code().code();
        tracing::info!(session_id = %self.conn.session_id, reason = reason.as_str(), code, "closing session");
        if let Some((dropped, first)) = lagged {
            self.dropped += dropped;
            socket.queue_text(
                ServerMessage::Lagged {
                    dropped,
                    since_message_id: first.to_string(),
                    resume_from: resume_point(first),
                }
                .to_text()
                .as_bytes(),
            );
            self.shared.metrics.messages_sent.inc();
        }
        let closing =
            ServerMessage::Closing { reason: reason.as_str(), reconnect_after_ms: reason.reconnect_after_ms() };
        socket.queue_text(closing.to_text().as_bytes());
        self.shared.metrics.messages_sent.inc();
        socket.queue_close(code, reason.as_str());
        let handshake = async {
            socket.flush().await?;
            // Read until the client's close (or the end of the stream), so nothing in flight is
            // cut off by a reset. A peer that stopped answering pings will not answer this either.
            if reason == CloseReason::HeartbeatTimeout {
                return Ok(());
            }
            while let Ok(m) = socket.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(self.shared.settings.close_timeout, handshake).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(session_id = %self.conn.session_id, error = %e, "close handshake failed"),
            Err(_) => tracing::debug!(session_id = %self.conn.session_id, "close handshake timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, TenantId, TenantScope};
    use crate::protocol::FilterSpec;

    fn event(seq: u64, event_type: &str) -> Published {
        let tenant = TenantId::new("acme").expect("tenant");
        let ev =
            Event::parse(serde_json::json!({"event_type": event_type}), TenantScope::Bound(&tenant)).expect("event");
        Published {
            id: MessageId { epoch: 7, seq },
            priority: ev.routing.priority(),
            routing: ev.routing,
            frame: bytes::Bytes::new(),
            published_at: Instant::now(),
        }
    }

    fn filter(types: &[&str]) -> Arc<SubscriptionFilter> {
        let spec = FilterSpec { event_types: types.iter().map(|t| (*t).to_owned()).collect(), ..FilterSpec::default() };
        Arc::new(SubscriptionFilter::from_spec(&spec).expect("filter"))
    }

    fn sub(id: &str, f: &Arc<SubscriptionFilter>) -> Sub {
        Sub { key: u64::from(id.as_bytes()[0]), id: id.into(), filter: Arc::clone(f), all_types: false }
    }

    #[test]
    fn acks_count_what_was_delivered_after_them() {
        let mut a = AckState::default();
        let batch: Vec<Arc<Published>> = (1..=5).map(|i| Arc::new(event(i, "escalated"))).collect();
        assert_eq!(a.delivered(&batch), 5);
        assert_eq!(a.ack(MessageId { epoch: 7, seq: 3 }), 3);
        assert_eq!(a.depth(), 2);
        assert_eq!(a.ack(MessageId { epoch: 7, seq: 2 }), 0, "acks only move forward");
        assert_eq!(a.depth(), 2);
        // Past the tracking bound the oldest are only counted, and an ack past them clears them.
        let many: Vec<Arc<Published>> =
            (6..6 + MAX_TRACKED_UNACKED as u64).map(|i| Arc::new(event(i, "escalated"))).collect();
        a.delivered(&many);
        assert_eq!(a.depth(), 2 + MAX_TRACKED_UNACKED as u64);
        assert_eq!(a.pending.len(), MAX_TRACKED_UNACKED);
        let last = many.last().map(|e| e.id).expect("last");
        assert_eq!(a.ack(last), 2 + MAX_TRACKED_UNACKED as u64);
        assert_eq!(a.depth(), 0);
    }

    /// The seam of a resume: the client has everything up to 10; the replay snapshot went
    /// through 20; live events up to 20 may still arrive from the fan-out queue.
    #[test]
    fn live_events_the_replay_covered_are_not_written_twice() {
        let resumed_f = filter(&["escalated"]);
        let other_f = filter(&["escalated", "comment_added"]);
        let resumed = [Resumed {
            key: u64::from(b'r'),
            filter: Arc::clone(&resumed_f),
            after: MessageId { epoch: 7, seq: 10 },
            through: MessageId { epoch: 7, seq: 20 },
        }];
        let alone = [sub("r", &resumed_f)];
        // Replayed (11..=20, matching): skipped.
        assert!(already_covered(&event(15, "escalated"), &resumed, &alone));
        assert!(already_covered(&event(20, "escalated"), &resumed, &alone));
        // After the snapshot: live, written.
        assert!(!already_covered(&event(21, "escalated"), &resumed, &alone));
        // Not matching the resumed filter: someone else's, written.
        assert!(!already_covered(&event(15, "comment_added"), &resumed, &alone));
        // At or before the client's position: the client has it...
        assert!(already_covered(&event(9, "escalated"), &resumed, &alone));
        // ...unless another subscription of the connection wants it.
        let both = [sub("r", &resumed_f), sub("o", &other_f)];
        assert!(!already_covered(&event(9, "escalated"), &resumed, &both));
        // Replayed events stay skipped even if another subscription also matches them.
        assert!(already_covered(&event(15, "escalated"), &resumed, &both));
        assert!(!already_covered(&event(15, "escalated"), &[], &both), "no resume, nothing skipped");
        // Two subscriptions resumed from the same position both have what precedes it.
        let twice = [
            Resumed {
                key: u64::from(b'r'),
                filter: Arc::clone(&resumed_f),
                after: MessageId { epoch: 7, seq: 10 },
                through: MessageId { epoch: 7, seq: 20 },
            },
            Resumed {
                key: u64::from(b'o'),
                filter: Arc::clone(&other_f),
                after: MessageId { epoch: 7, seq: 10 },
                through: MessageId { epoch: 7, seq: 20 },
            },
        ];
        assert!(already_covered(&event(9, "escalated"), &twice, &both));
        assert!(already_covered(&event(9, "comment_added"), &twice, &both));
        // A resumed subscription that was removed still covers what it replayed.
        let only_other = [sub("o", &other_f)];
        assert!(already_covered(&event(15, "escalated"), &resumed, &only_other));
        assert!(!already_covered(&event(9, "escalated"), &resumed, &only_other), "the other one wants it");
    }
}

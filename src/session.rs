//! One connection's lifecycle after the upgrade: `welcome`, client messages, subscriptions,
//! draining the outbox into the socket, heartbeats, token expiry and every way of closing.
//!
//! One task per connection runs a `select!` over the socket, the outbox, the heartbeat and the
//! token deadline, so a connection costs one task. Every write also races the outbox's close
//! signal, the token deadline and a write timeout, so a client that stopped reading can neither
//! hold a session past its token nor block its close. Every server-initiated close sends
//! `closing` and a typed close code, preceded by `lagged` if events were lost. The session never
//! touches another tenant's state: its only route to events is its own outbox, and its filters
//! always carry the mandatory labels of its principal.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::auth::{Authenticator, Principal};
use crate::bus::Published;
use crate::event::MessageId;
use crate::fanout::{Conn, Hub};
use crate::filter::{FilterError, SubscriptionFilter};
use crate::metrics::Metrics;
use crate::protocol::{self, ClientMessage, CloseReason, ErrorCode, ProtocolError, ServerMessage};

/// Events written per drain before the task looks at the socket again.
const BATCH: usize = 64;
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
}

/// Everything a session needs, handed over by the upgrade handler.
pub(crate) struct SessionContext {
    pub(crate) hub: Arc<Hub>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) policies: Arc<crate::policy::PolicySet>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: Arc<SessionSettings>,
    pub(crate) principal: Principal,
    /// Labels every subscription must carry (`tenant` and any mapped claims).
    pub(crate) mandatory: BTreeMap<String, String>,
    pub(crate) remote: SocketAddr,
}

/// How a session ends.
enum End {
    /// The server closes with this reason.
    Close(CloseReason),
    /// The client closed (with its code) or vanished.
    ClientGone(Option<u16>),
    /// Writing failed.
    WriteFailed,
}

/// Unregisters the session and settles its gauges however the task ends (even by a panic).
struct Registration {
    hub: Arc<Hub>,
    conn: Arc<Conn>,
    metrics: Arc<Metrics>,
    started: Instant,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(&self.conn);
        self.metrics.active_connections.dec();
        self.metrics.session_duration.observe(self.started.elapsed().as_secs_f64());
    }
}

fn deadline_for(expires_at: u64, leeway: Duration) -> tokio::time::Instant {
    let left = Duration::from_secs(expires_at.saturating_sub(crate::time::unix_now())).saturating_add(leeway);
    tokio::time::Instant::now() + left.min(MAX_SESSION)
}

struct Session {
    ctx: SessionContext,
    conn: Arc<Conn>,
    subs: HashMap<String, Arc<SubscriptionFilter>>,
    mandatory: BTreeMap<String, String>,
    limiter: DefaultDirectRateLimiter,
    refusals: u32,
    refusal_window: Instant,
    last_message: Instant,
    expiry: tokio::time::Instant,
    /// After an unsubscribe, events queued up to this id are re-checked against the current
    /// subscriptions before they are written.
    recheck_until: Option<MessageId>,
    batch: Vec<Arc<Published>>,
}

/// Runs a session to its end.
pub(crate) async fn run(mut socket: WebSocket, ctx: SessionContext) {
    let session_id = uuid::Uuid::new_v4().to_string();
    let conn =
        ctx.hub.register(session_id.clone(), ctx.principal.tenant.clone(), ctx.principal.subject.clone(), ctx.remote);
    ctx.metrics.active_connections.inc();
    ctx.metrics.total_connections.inc();
    let registration = Registration {
        hub: Arc::clone(&ctx.hub),
        conn: Arc::clone(&conn),
        metrics: Arc::clone(&ctx.metrics),
        started: Instant::now(),
    };
    tracing::info!(
        session_id = %session_id, tenant = %conn.tenant, subject = %conn.subject,
        remote = %conn.remote, token_id = %ctx.principal.token_id, "session opened"
    );
    let mandatory = ctx.mandatory.clone();
    let quota = Quota::per_second(ctx.settings.messages_per_second).allow_burst(ctx.settings.message_burst);
    let mut s = Session {
        expiry: deadline_for(ctx.principal.expires_at, ctx.settings.leeway),
        limiter: RateLimiter::direct(quota),
        conn: Arc::clone(&conn),
        subs: HashMap::new(),
        mandatory,
        refusals: 0,
        refusal_window: Instant::now(),
        last_message: Instant::now(),
        recheck_until: None,
        batch: Vec::new(),
        ctx,
    };
    let welcome = ServerMessage::Welcome {
        session_id: session_id.clone(),
        server_time: crate::time::rfc3339_now(),
        tenant: s.ctx.principal.tenant.to_string(),
        subject: s.ctx.principal.subject.clone(),
        expires_at: crate::time::rfc3339_from_unix(s.ctx.principal.expires_at),
        heartbeat_interval_secs: s.ctx.settings.heartbeat.as_secs(),
        protocol: protocol::PROTOCOL_VERSION,
    };
    let end = match s.send(&mut socket, welcome).await {
        Ok(()) => s.main_loop(&mut socket).await,
        Err(end) => end,
    };
    let code = match end {
        End::Close(reason) => {
            s.close(&mut socket, reason).await;
            Some(reason.close_code().code())
        }
        End::ClientGone(code) => {
            // tungstenite queued the reply to a client close; push it out.
            if tokio::time::timeout(s.ctx.settings.close_timeout, socket.flush()).await.is_err() {
                tracing::debug!(session_id = %session_id, "close reply not flushed in time");
            }
            code
        }
        End::WriteFailed => None,
    };
    let duration = registration.started.elapsed().as_secs_f64();
    drop(registration);
    tracing::info!(
        session_id = %session_id, tenant = %conn.tenant, subject = %conn.subject,
        close_code = code, duration_secs = duration, "session closed"
    );
}

fn is_too_large(e: axum::Error) -> bool {
    matches!(e.into_inner().downcast::<tungstenite::Error>().map(|b| *b), Ok(tungstenite::Error::Capacity(_)))
}

impl Session {
    async fn main_loop(&mut self, socket: &mut WebSocket) -> End {
        let hb = self.ctx.settings.heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + hb, hb);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut awaiting_pong = false;
        let expiry = tokio::time::sleep_until(self.expiry);
        tokio::pin!(expiry);
        loop {
            if expiry.deadline() != self.expiry {
                expiry.as_mut().reset(self.expiry);
            }
            let conn = Arc::clone(&self.conn);
            let step = tokio::select! {
                () = conn.outbox.ready() => self.flush_outbox(socket).await,
                incoming = socket.next() => {
                    awaiting_pong = false;
                    match incoming {
                        None => Err(End::ClientGone(None)),
                        Some(Ok(m)) => self.on_message(socket, m).await,
                        Some(Err(e)) => {
                            self.ctx.metrics.connection_errors.inc();
                            Err(if is_too_large(e) { End::Close(CloseReason::FrameTooLarge) } else { End::ClientGone(None) })
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if awaiting_pong {
                        Err(End::Close(CloseReason::HeartbeatTimeout))
                    } else {
                        awaiting_pong = true;
                        self.write(socket, Message::Ping(bytes::Bytes::new())).await
                    }
                }
                () = &mut expiry => Err(End::Close(CloseReason::TokenExpired)),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Drains the outbox into the socket, a few batches at a time.
    async fn flush_outbox(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        if self.conn.take_idle_nudge()
            && self.subs.is_empty()
            && self.last_message.elapsed() >= self.ctx.settings.idle_timeout
        {
            return Err(End::Close(CloseReason::IdleTimeout));
        }
        for _ in 0..4 {
            let mut batch = std::mem::take(&mut self.batch);
            batch.clear();
            let d = self.conn.outbox.drain(&mut batch, BATCH);
            if let Some((dropped, first)) = d.lagged {
                self.send(socket, ServerMessage::Lagged { dropped, since_message_id: first.to_string() }).await?;
            }
            self.recheck(&mut batch);
            let written = if batch.is_empty() { Ok(()) } else { self.write_events(socket, &batch).await };
            batch.clear();
            self.batch = batch;
            written?;
            if let Some(reason) = d.close {
                return Err(End::Close(reason));
            }
            if self.conn.outbox.len() == 0 {
                return Ok(());
            }
        }
        // More is queued: come back after giving the socket and timers a turn.
        self.conn.outbox.wake();
        Ok(())
    }

    /// Drops events of a removed subscription that were queued before it was removed.
    fn recheck(&mut self, batch: &mut Vec<Arc<Published>>) {
        let Some(limit) = self.recheck_until else { return };
        let passed = batch.last().is_some_and(|e| e.id >= limit) || self.conn.outbox.len() == 0;
        batch.retain(|e| e.id > limit || self.subs.values().any(|f| f.matches(&e.routing)));
        if passed {
            self.recheck_until = None;
        }
    }

    /// Writes one message and flushes, racing the close signal, the token deadline and the
    /// write timeout.
    async fn write(&mut self, socket: &mut WebSocket, msg: Message) -> Result<(), End> {
        self.guarded(socket.send(msg)).await
    }

    async fn guarded(&mut self, write: impl Future<Output = Result<(), axum::Error>>) -> Result<(), End> {
        let conn = Arc::clone(&self.conn);
        tokio::select! {
            r = write => r.map_err(|e| {
                self.ctx.metrics.send_errors.inc();
                tracing::debug!(session_id = %conn.session_id, error = %e, "write failed");
                End::WriteFailed
            }),
            () = conn.outbox.closing() => {
                Err(End::Close(conn.outbox.close_reason().unwrap_or(CloseReason::SlowConsumer)))
            }
            () = tokio::time::sleep_until(self.expiry) => Err(End::Close(CloseReason::TokenExpired)),
            () = tokio::time::sleep(self.ctx.settings.write_timeout) => {
                tracing::info!(session_id = %conn.session_id, "write made no progress within the write timeout");
                Err(End::Close(CloseReason::SlowConsumer))
            }
        }
    }

    async fn write_events(&mut self, socket: &mut WebSocket, batch: &[Arc<Published>]) -> Result<(), End> {
        let write = async {
            for ev in batch {
                socket.feed(Message::Text(ev.frame.clone())).await?;
            }
            socket.flush().await
        };
        let r = self.guarded(write).await;
        let metrics = &self.ctx.metrics;
        let n = batch.len() as u64;
        match &r {
            Ok(()) => {
                metrics.events_delivered.inc_by(n);
                metrics.messages_sent.inc_by(n);
                for ev in batch {
                    metrics.message_latency.observe(ev.published_at.elapsed().as_secs_f64());
                }
            }
            Err(_) => {
                // Not known to have reached the client: reported in the final `lagged`.
                self.conn.outbox.record_unsent(batch);
                metrics.events_dropped.inc_by(n);
            }
        }
        r
    }

    async fn send(&mut self, socket: &mut WebSocket, msg: ServerMessage) -> Result<(), End> {
        self.write(socket, Message::Text(Utf8Bytes::from(msg.to_text()))).await?;
        self.ctx.metrics.messages_sent.inc();
        Ok(())
    }

    async fn client_error(&mut self, socket: &mut WebSocket, e: ProtocolError) -> Result<(), End> {
        self.ctx.metrics.connection_errors.inc();
        tracing::debug!(session_id = %self.conn.session_id, code = e.code.as_str(), message = %e.message, "client error");
        self.send(socket, ServerMessage::from_error(e)).await
    }

    /// Applies the per-connection message rate; persistent violation closes with 4029.
    fn admit(&mut self) -> Result<bool, End> {
        if self.limiter.check().is_ok() {
            return Ok(true);
        }
        self.ctx.metrics.rate_limited.with_label_values(&["message"]).inc();
        if self.refusal_window.elapsed() > REFUSAL_WINDOW {
            self.refusal_window = Instant::now();
            self.refusals = 0;
        }
        self.refusals += 1;
        if self.refusals >= PERSISTENT_REFUSALS {
            return Err(End::Close(CloseReason::RateLimited));
        }
        Ok(false)
    }

    async fn on_message(&mut self, socket: &mut WebSocket, msg: Message) -> Result<(), End> {
        let (text, size) = match msg {
            Message::Text(t) => {
                let n = t.len();
                (Some(t), n)
            }
            Message::Binary(b) => (None, b.len()),
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(frame) => return Err(End::ClientGone(frame.map(|f| f.code))),
        };
        self.ctx.metrics.messages_received.inc();
        if size > self.ctx.settings.max_frame_bytes {
            self.ctx.metrics.connection_errors.inc();
            return Err(End::Close(CloseReason::FrameTooLarge));
        }
        self.last_message = Instant::now();
        self.conn.touch(&self.ctx.hub);
        if !self.admit()? {
            let e = ProtocolError {
                code: ErrorCode::RateLimited,
                message: format!(
                    "more than {} messages per second (burst {}); slow down",
                    self.ctx.settings.messages_per_second, self.ctx.settings.message_burst
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
        let filters: Arc<[Arc<SubscriptionFilter>]> = self.subs.values().cloned().collect();
        self.ctx.hub.set_filters(&self.conn, filters);
    }

    async fn handle(&mut self, socket: &mut WebSocket, msg: ClientMessage) -> Result<(), End> {
        let err = |code, message: String, sub: Option<&str>| ProtocolError {
            code,
            message,
            subscription_id: sub.map(str::to_owned),
        };
        match msg {
            ClientMessage::Subscribe(sub) => {
                let id = sub.subscription_id;
                if sub.resume_from.is_some() {
                    let e = err(ErrorCode::NotSupported, "resume_from is not supported yet".into(), Some(&id));
                    return self.client_error(socket, e).await;
                }
                if self.subs.contains_key(&id) {
                    let e =
                        err(ErrorCode::DuplicateSubscription, format!("subscription `{id}` already exists"), Some(&id));
                    return self.client_error(socket, e).await;
                }
                if self.subs.len() >= self.ctx.settings.max_subscriptions {
                    let e = err(
                        ErrorCode::TooManySubscriptions,
                        format!("at most {} subscriptions per connection", self.ctx.settings.max_subscriptions),
                        Some(&id),
                    );
                    return self.client_error(socket, e).await;
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
                        return self.client_error(socket, err(code, fe.to_string(), Some(&id))).await;
                    }
                };
                let effective = filter.to_spec();
                self.subs.insert(id.clone(), Arc::new(filter));
                self.publish_filters();
                tracing::debug!(session_id = %self.conn.session_id, subscription_id = %id, "subscribed");
                self.send(socket, ServerMessage::Subscribed { subscription_id: id, filters: effective }).await
            }
            ClientMessage::Unsubscribe(u) => {
                let id = u.subscription_id;
                if self.subs.remove(&id).is_none() {
                    let e = err(ErrorCode::UnknownSubscription, format!("no subscription `{id}`"), Some(&id));
                    return self.client_error(socket, e).await;
                }
                self.publish_filters();
                // Anything queued from now on was matched against the new set; what is already
                // queued is re-checked before it is written.
                if let Some(last) = self.conn.outbox.last_queued() {
                    self.recheck_until = Some(self.recheck_until.map_or(last, |r| r.max(last)));
                }
                self.send(socket, ServerMessage::Unsubscribed { subscription_id: id }).await
            }
            ClientMessage::Ping(p) => {
                let timestamp = p.timestamp.unwrap_or_else(crate::time::rfc3339_now);
                self.send(socket, ServerMessage::Pong { timestamp }).await
            }
            ClientMessage::Ack(a) => match a.message_id.parse::<MessageId>() {
                Ok(_) => Ok(()),
                Err(e) => self.client_error(socket, err(ErrorCode::InvalidMessage, e.to_string(), None)).await,
            },
            ClientMessage::Refresh(r) => self.refresh(socket, &r.token).await,
        }
    }

    async fn refresh(&mut self, socket: &mut WebSocket, token: &str) -> Result<(), End> {
        let current = &self.ctx.principal;
        match self.ctx.auth.verify(token).await {
            Err(e) => {
                let e = ProtocolError {
                    code: ErrorCode::TokenInvalid,
                    message: format!("refresh refused: {}", e.code()),
                    subscription_id: None,
                };
                self.client_error(socket, e).await
            }
            Ok(p)
                if p.tenant != current.tenant
                    || p.subject != current.subject
                    || p.claims.get("iss") != current.claims.get("iss")
                    || self.ctx.policies.admit(&p.tenant) != crate::policy::Admission::Allowed
                    || self.ctx.auth.mandatory_labels(&p).ok().as_ref() != Some(&self.mandatory) =>
            {
                tracing::warn!(session_id = %self.conn.session_id, "refresh for another tenant or subject");
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
                p.expires_at = p.expires_at.max(current.expires_at);
                self.expiry = deadline_for(p.expires_at, self.ctx.settings.leeway);
                let expires_at = crate::time::rfc3339_from_unix(p.expires_at);
                tracing::info!(session_id = %self.conn.session_id, token_id = %p.token_id, "token refreshed");
                self.ctx.principal = p;
                self.send(socket, ServerMessage::Refreshed { expires_at }).await
            }
        }
    }

    /// The closing handshake: `lagged` if events were lost, `closing`, the close frame, then wait
    /// (bounded) for the client's close so nothing in flight is cut off by a reset.
    async fn close(&mut self, socket: &mut WebSocket, reason: CloseReason) {
        // Stops further queueing (and discards what a cutting close leaves behind), so the lagged
        // notice below covers every event this connection lost.
        let discarded = self.conn.outbox.request_close(reason);
        self.ctx.metrics.events_dropped.inc_by(discarded);
        let mut nothing = Vec::new();
        let lagged = self.conn.outbox.drain(&mut nothing, 0).lagged;
        let code = reason.close_code().code();
        tracing::info!(session_id = %self.conn.session_id, reason = reason.as_str(), code, "closing session");
        let metrics = Arc::clone(&self.ctx.metrics);
        let handshake = async {
            let mut frames = Vec::new();
            if let Some((dropped, first)) = lagged {
                frames.push(ServerMessage::Lagged { dropped, since_message_id: first.to_string() });
            }
            frames.push(ServerMessage::Closing {
                reason: reason.as_str(),
                reconnect_after_ms: reason.reconnect_after_ms(),
            });
            for f in frames {
                socket.send(Message::Text(Utf8Bytes::from(f.to_text()))).await?;
                metrics.messages_sent.inc();
            }
            socket.send(Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(reason.as_str()) }))).await?;
            // Read until the client's close (or the end of the stream), so nothing in flight is
            // cut off by a reset. A peer that stopped answering pings will not answer this either.
            if reason == CloseReason::HeartbeatTimeout {
                return Ok(());
            }
            while let Some(Ok(m)) = socket.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
            Ok::<(), axum::Error>(())
        };
        match tokio::time::timeout(self.ctx.settings.close_timeout, handshake).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(session_id = %self.conn.session_id, error = %e, "close handshake failed"),
            Err(_) => tracing::debug!(session_id = %self.conn.session_id, "close handshake timed out"),
        }
    }
}

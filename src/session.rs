//! One connection's lifecycle after the upgrade: `welcome`, client messages, subscriptions,
//! draining the outbox into the socket, heartbeats, token expiry and every way of closing.
//!
//! One task per connection runs a `select!` over the socket, the outbox, the heartbeat and the
//! token deadline, so a connection costs one task. Every server-initiated close sends `closing`
//! and a typed close code. Every write races the outbox's close signal, so a client that stopped
//! reading can still be closed as a slow consumer. The session never touches another tenant's
//! state: its only route to events is its own outbox, and its filters always carry the mandatory
//! labels of its principal.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
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
/// Consecutive rate-limited messages after which the connection is closed with 4029.
const PERSISTENT_RATE_LIMIT_STRIKES: u32 = 10;

/// Session settings derived once from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct SessionSettings {
    pub(crate) heartbeat: Duration,
    pub(crate) max_subscriptions: usize,
    pub(crate) messages_per_second: NonZeroU32,
    pub(crate) message_burst: NonZeroU32,
    /// Largest client message; larger closes with 1009.
    pub(crate) max_frame_bytes: usize,
    /// How long a closing handshake may take before the socket is dropped.
    pub(crate) close_timeout: Duration,
}

/// Everything a session needs, handed over by the upgrade handler.
pub(crate) struct SessionContext {
    pub(crate) hub: Arc<Hub>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: Arc<SessionSettings>,
    pub(crate) principal: Principal,
    pub(crate) remote: SocketAddr,
}

/// How the main loop ended.
enum End {
    /// The server closes with this reason.
    Close(CloseReason, Option<(u64, MessageId)>),
    /// The client closed (with its code) or vanished.
    ClientGone(Option<u16>),
    /// Writing failed.
    WriteFailed,
}

/// Result of a write that races the close signal.
enum Wrote {
    Ok,
    Interrupted,
    Failed,
}

fn deadline_for(expires_at: u64) -> tokio::time::Instant {
    let left = expires_at.saturating_sub(crate::time::unix_now());
    tokio::time::Instant::now() + Duration::from_secs(left)
}

struct Session {
    ctx: SessionContext,
    conn: Arc<Conn>,
    subs: HashMap<String, SubscriptionFilter>,
    mandatory: BTreeMap<String, String>,
    limiter: DefaultDirectRateLimiter,
    strikes: u32,
    expiry: tokio::time::Instant,
    batch: Vec<Arc<Published>>,
}

/// Runs a session to its end.
pub(crate) async fn run(mut socket: WebSocket, ctx: SessionContext) {
    let session_id = uuid::Uuid::new_v4().to_string();
    let conn =
        ctx.hub.register(session_id.clone(), ctx.principal.tenant.clone(), ctx.principal.subject.clone(), ctx.remote);
    ctx.metrics.active_connections.inc();
    ctx.metrics.total_connections.inc();
    let started = Instant::now();
    tracing::info!(
        session_id = %session_id, tenant = %conn.tenant, subject = %conn.subject,
        remote = %conn.remote, token_id = %ctx.principal.token_id, "session opened"
    );
    let mandatory = BTreeMap::from([("tenant".to_owned(), ctx.principal.tenant.as_str().to_owned())]);
    let quota = Quota::per_second(ctx.settings.messages_per_second).allow_burst(ctx.settings.message_burst);
    let mut s = Session {
        expiry: deadline_for(ctx.principal.expires_at),
        limiter: RateLimiter::direct(quota),
        conn: Arc::clone(&conn),
        subs: HashMap::new(),
        mandatory,
        strikes: 0,
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
        Wrote::Ok => s.main_loop(&mut socket).await,
        Wrote::Interrupted => s.pending_close(),
        Wrote::Failed => End::WriteFailed,
    };
    let code = match end {
        End::Close(reason, lagged) => {
            s.close(&mut socket, reason, lagged).await;
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
    s.ctx.hub.unregister(&conn);
    s.ctx.metrics.active_connections.dec();
    s.ctx.metrics.session_duration.observe(started.elapsed().as_secs_f64());
    tracing::info!(
        session_id = %session_id, tenant = %conn.tenant, subject = %conn.subject,
        close_code = code, duration_secs = started.elapsed().as_secs_f64(), "session closed"
    );
}

fn is_too_large(e: axum::Error) -> bool {
    matches!(e.into_inner().downcast::<tungstenite::Error>().map(|b| *b), Ok(tungstenite::Error::Capacity(_)))
}

impl Session {
    fn pending_close(&mut self) -> End {
        let mut none = Vec::new();
        let d = self.conn.outbox.drain(&mut none, 0);
        End::Close(d.close.unwrap_or(CloseReason::Internal), d.lagged)
    }

    async fn main_loop(&mut self, socket: &mut WebSocket) -> End {
        let hb = self.ctx.settings.heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + hb, hb);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut awaiting_pong = false;
        loop {
            let conn = Arc::clone(&self.conn);
            let expiry = tokio::time::sleep_until(self.expiry);
            tokio::select! {
                () = conn.outbox.ready() => {
                    if let Some(end) = self.flush_outbox(socket).await {
                        return end;
                    }
                }
                incoming = futures_util::StreamExt::next(socket) => {
                    awaiting_pong = false;
                    let msg = match incoming {
                        None => return End::ClientGone(None),
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            self.ctx.metrics.connection_errors.inc();
                            if is_too_large(e) {
                                return End::Close(CloseReason::FrameTooLarge, None);
                            }
                            return End::ClientGone(None);
                        }
                    };
                    if let Some(end) = self.on_message(socket, msg).await {
                        return end;
                    }
                }
                _ = heartbeat.tick() => {
                    if awaiting_pong {
                        return End::Close(CloseReason::HeartbeatTimeout, None);
                    }
                    awaiting_pong = true;
                    match self.write(socket, Message::Ping(bytes::Bytes::new())).await {
                        Wrote::Ok => {}
                        Wrote::Interrupted => return self.pending_close(),
                        Wrote::Failed => return End::WriteFailed,
                    }
                }
                () = expiry => return End::Close(CloseReason::TokenExpired, None),
            }
        }
    }

    /// Drains the outbox into the socket, a few batches at a time.
    async fn flush_outbox(&mut self, socket: &mut WebSocket) -> Option<End> {
        for _ in 0..4 {
            let mut batch = std::mem::take(&mut self.batch);
            batch.clear();
            let d = self.conn.outbox.drain(&mut batch, BATCH);
            if let Some(reason) = d.close {
                return Some(End::Close(reason, d.lagged));
            }
            if let Some((dropped, first)) = d.lagged {
                let lagged = ServerMessage::Lagged { dropped, since_message_id: first.to_string() };
                match self.send(socket, lagged).await {
                    Wrote::Ok => {}
                    Wrote::Interrupted => return Some(self.pending_close()),
                    Wrote::Failed => return Some(End::WriteFailed),
                }
            }
            if batch.is_empty() {
                self.batch = batch;
                return None;
            }
            let result = self.write_events(socket, &batch).await;
            batch.clear();
            self.batch = batch;
            match result {
                Wrote::Ok => {}
                Wrote::Interrupted => return Some(self.pending_close()),
                Wrote::Failed => return Some(End::WriteFailed),
            }
        }
        // More may be queued: come back after giving the socket and timers a turn.
        if self.conn.outbox.len() > 0 {
            self.conn.outbox.wake();
        }
        None
    }

    async fn write_events(&mut self, socket: &mut WebSocket, batch: &[Arc<Published>]) -> Wrote {
        let metrics = Arc::clone(&self.ctx.metrics);
        let conn = Arc::clone(&self.conn);
        let write = async {
            for ev in batch {
                socket.feed(Message::Text(ev.frame.clone())).await?;
            }
            socket.flush().await
        };
        tokio::select! {
            r = write => match r {
                Ok(()) => {
                    let n = batch.len() as u64;
                    metrics.events_delivered.inc_by(n);
                    metrics.messages_sent.inc_by(n);
                    for ev in batch {
                        metrics.message_latency.observe(ev.published_at.elapsed().as_secs_f64());
                    }
                    Wrote::Ok
                }
                Err(e) => {
                    metrics.send_errors.inc();
                    tracing::debug!(session_id = %conn.session_id, error = %e, "event write failed");
                    Wrote::Failed
                }
            },
            () = conn.outbox.closing() => Wrote::Interrupted,
        }
    }

    async fn write(&mut self, socket: &mut WebSocket, msg: Message) -> Wrote {
        let conn = Arc::clone(&self.conn);
        tokio::select! {
            r = socket.send(msg) => match r {
                Ok(()) => Wrote::Ok,
                Err(e) => {
                    self.ctx.metrics.send_errors.inc();
                    tracing::debug!(session_id = %conn.session_id, error = %e, "write failed");
                    Wrote::Failed
                }
            },
            () = conn.outbox.closing() => Wrote::Interrupted,
        }
    }

    async fn send(&mut self, socket: &mut WebSocket, msg: ServerMessage) -> Wrote {
        let r = self.write(socket, Message::Text(Utf8Bytes::from(msg.to_text()))).await;
        if matches!(r, Wrote::Ok) {
            self.ctx.metrics.messages_sent.inc();
        }
        r
    }

    async fn reply(&mut self, socket: &mut WebSocket, msg: ServerMessage) -> Option<End> {
        match self.send(socket, msg).await {
            Wrote::Ok => None,
            Wrote::Interrupted => Some(self.pending_close()),
            Wrote::Failed => Some(End::WriteFailed),
        }
    }

    async fn client_error(&mut self, socket: &mut WebSocket, e: ProtocolError) -> Option<End> {
        self.ctx.metrics.connection_errors.inc();
        tracing::debug!(session_id = %self.conn.session_id, code = e.code.as_str(), message = %e.message, "client error");
        self.reply(socket, ServerMessage::from_error(e)).await
    }

    async fn on_message(&mut self, socket: &mut WebSocket, msg: Message) -> Option<End> {
        let size = match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        };
        if size > self.ctx.settings.max_frame_bytes {
            self.ctx.metrics.connection_errors.inc();
            return Some(End::Close(CloseReason::FrameTooLarge, None));
        }
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                self.ctx.metrics.messages_received.inc();
                let e = ProtocolError {
                    code: ErrorCode::InvalidMessage,
                    message: "binary frames are not part of protocol v1; send JSON text".into(),
                    subscription_id: None,
                };
                return self.client_error(socket, e).await;
            }
            Message::Ping(_) | Message::Pong(_) => return None,
            Message::Close(frame) => return Some(End::ClientGone(frame.map(|f| f.code))),
        };
        self.ctx.metrics.messages_received.inc();
        self.conn.touch(&self.ctx.hub);
        if self.limiter.check().is_err() {
            self.ctx.metrics.rate_limited.with_label_values(&["message"]).inc();
            self.strikes += 1;
            if self.strikes >= PERSISTENT_RATE_LIMIT_STRIKES {
                return Some(End::Close(CloseReason::RateLimited, None));
            }
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
        self.strikes = 0;
        match ClientMessage::parse(&text) {
            Ok(m) => self.handle(socket, m).await,
            Err(e) => self.client_error(socket, e).await,
        }
    }

    fn publish_filters(&self) {
        let filters: Arc<[SubscriptionFilter]> = self.subs.values().cloned().collect::<Vec<_>>().into();
        self.ctx.hub.set_filters(&self.conn, filters);
    }

    async fn handle(&mut self, socket: &mut WebSocket, msg: ClientMessage) -> Option<End> {
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
                self.subs.insert(id.clone(), filter);
                self.publish_filters();
                tracing::debug!(session_id = %self.conn.session_id, subscription_id = %id, "subscribed");
                self.reply(socket, ServerMessage::Subscribed { subscription_id: id, filters: effective }).await
            }
            ClientMessage::Unsubscribe(u) => {
                let id = u.subscription_id;
                if self.subs.remove(&id).is_none() {
                    let e = err(ErrorCode::UnknownSubscription, format!("no subscription `{id}`"), Some(&id));
                    return self.client_error(socket, e).await;
                }
                self.publish_filters();
                self.reply(socket, ServerMessage::Unsubscribed { subscription_id: id }).await
            }
            ClientMessage::Ping(p) => {
                let timestamp = p.timestamp.unwrap_or_else(crate::time::rfc3339_now);
                self.reply(socket, ServerMessage::Pong { timestamp }).await
            }
            ClientMessage::Ack(a) => {
                if let Err(e) = a.message_id.parse::<MessageId>() {
                    return self.client_error(socket, err(ErrorCode::InvalidMessage, e.to_string(), None)).await;
                }
                None
            }
            ClientMessage::Refresh(r) => match self.ctx.auth.verify(&r.token) {
                Err(e) => {
                    let e = err(ErrorCode::TokenInvalid, format!("refresh refused: {}", e.code()), None);
                    self.client_error(socket, e).await
                }
                Ok(p) if p.tenant != self.ctx.principal.tenant || p.subject != self.ctx.principal.subject => {
                    tracing::warn!(session_id = %self.conn.session_id, "refresh for another tenant or subject");
                    let e = err(ErrorCode::TokenInvalid, "refresh token is for another tenant or subject".into(), None);
                    match self.client_error(socket, e).await {
                        Some(end) => Some(end),
                        None => Some(End::Close(CloseReason::RefreshMismatch, None)),
                    }
                }
                Ok(p) => {
                    self.expiry = deadline_for(p.expires_at);
                    let expires_at = crate::time::rfc3339_from_unix(p.expires_at);
                    self.ctx.principal = p;
                    self.reply(socket, ServerMessage::Refreshed { expires_at }).await
                }
            },
        }
    }

    /// The closing handshake: `lagged` if events were lost, `closing`, the close frame, then wait
    /// (bounded) for the client's close so nothing in flight is cut off by a reset.
    async fn close(&mut self, socket: &mut WebSocket, reason: CloseReason, lagged: Option<(u64, MessageId)>) {
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
            while let Some(Ok(m)) = futures_util::StreamExt::next(socket).await {
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

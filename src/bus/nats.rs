//! The NATS JetStream bus (`bus.kind = "nats"`): several gateway nodes serve one event stream.
//!
//! - **Publish**: every event goes to `<prefix>.<tenant>.<event_type>` in one stream; the publish
//!   API answers only once the stream acknowledged every event of the batch, so a `202` means
//!   stored. The acknowledgements are awaited together (pipelined), in order.
//! - **Fan-out**: each node consumes the whole stream with its own ephemeral consumer starting
//!   after the newest sequence at its start, and hands events to its local dispatcher in stream
//!   order. The handoff waits when the dispatcher's queue is full (backpressure on the consumer,
//!   never a drop).
//! - **Ids**: `<epoch>-<seq>` where `seq` is the stream sequence and `epoch` the stream's creation
//!   time in milliseconds, the same on every node: a client can resume on any node, and a stream
//!   that was deleted and created again is a new epoch.
//! - **Replay**: a `resume_from` reads the stream with a short-lived consumer filtered by the
//!   tenant's subjects, starting after the position, up to the stream's newest sequence when the
//!   replay began (`through`); newer events reach the session live.
//! - **Outage**: the client reconnects by itself; the consumer is recreated with backoff from the
//!   sequence after the last one delivered, so nothing is skipped (events the stream discarded
//!   meanwhile are counted in `bus_events_lost_total` and logged). While the broker is
//!   unreachable `/ready` fails, publishes get 503 and live sessions stay open.
//!
//! The stream is a trust boundary: a message whose subject names one tenant and whose body names
//! another is not delivered (counted in `bus_invalid_messages_total`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_nats::connection::State;
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{BusError, IdempotencyKey, Published, Replayed, ResumeError};
use crate::config::{NatsConfig, NatsStorage};
use crate::event::{Event, MessageId, Routing, TenantId, TenantScope};
use crate::filter::SubscriptionFilter;
use crate::metrics::Metrics;
use crate::protocol;

/// Most messages one pull asks for, live or in a replay.
const PULL_BATCH: usize = 1000;
/// How long a node's fan-out consumer lives on the server after the node is gone.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(60);
/// How long a replay consumer lives on the server if a replay is abandoned.
const REPLAY_CONSUMER_INACTIVE: Duration = Duration::from_secs(10);
/// The idle heartbeat of the fan-out consumer: two missed ones and it is recreated.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Replays one node runs against the broker at once: after a node restart thousands of clients
/// resume together, and each replay creates a consumer; the others wait their turn (within the
/// replay's time limit).
const MAX_CONCURRENT_REPLAYS: usize = 32;
/// Publishes of one node awaiting the stream's acknowledgement; beyond, a publish gets 503.
const MAX_ACKS_IN_FLIGHT: usize = 20_000;

/// The subject an event is published to.
pub fn subject_for(prefix: &str, routing: &Routing) -> String {
    format!("{prefix}.{}.{}", routing.tenant, routing.event_type)
}

/// Why a stream message is not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The subject is not `<prefix>.<tenant>.<event_type>`.
    #[error("subject `{0}` is not <prefix>.<tenant>.<event_type>")]
    Subject(String),
    /// The payload is not a valid event of the subject's tenant.
    #[error("payload: {0}")]
    Payload(String),
    /// The payload's event type is not the subject's.
    #[error("the payload's event type `{payload}` is not the subject's `{subject}`")]
    EventType {
        /// From the subject.
        subject: String,
        /// From the payload.
        payload: String,
    },
}

/// Turns a stored message into what the fan-out sends: the routing is parsed from the payload
/// bound to the subject's tenant (another tenant in the body is refused), and the frame carries
/// the stream's id and publish time, so every node builds the same frame.
pub fn decode(
    prefix: &str,
    subject: &str,
    payload: &[u8],
    id: MessageId,
    published_unix_ms: u64,
) -> Result<(Routing, bytes::Bytes), DecodeError> {
    let bad_subject = || DecodeError::Subject(subject.chars().take(200).collect());
    let rest = subject.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')).ok_or_else(bad_subject)?;
    let (tenant, event_type) = rest.split_once('.').ok_or_else(bad_subject)?;
    let tenant = TenantId::new(tenant).map_err(|_| bad_subject())?;
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| DecodeError::Payload(e.to_string()))?;
    let event = Event::parse(value, TenantScope::Bound(&tenant)).map_err(|e| DecodeError::Payload(e.to_string()))?;
    if event.routing.event_type.as_str() != event_type {
        return Err(DecodeError::EventType {
            subject: event_type.chars().take(64).collect(),
            payload: event.routing.event_type.to_string(),
        });
    }
    let json = serde_json::to_string(&event.body).map_err(|e| DecodeError::Payload(e.to_string()))?;
    let timestamp = crate::time::rfc3339_from_unix_ms(published_unix_ms);
    let frame = protocol::encode_event(&id.to_string(), &timestamp, &json);
    Ok((event.routing, frame))
}

/// What a node holds once it reached the broker and found (or created) the stream.
struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
    epoch: u64,
}

/// The JetStream bus of one node.
pub struct NatsBus {
    config: NatsConfig,
    /// The most events one replay sends (`bus.replay_window`; 0: replay off).
    replay_limit: usize,
    /// The stream's duplicate window (for keyed publishes), when this node creates the stream.
    idempotency_window: Duration,
    tx: mpsc::Sender<Arc<Published>>,
    conn: ArcSwapOption<Conn>,
    consuming: AtomicBool,
    /// Counts the client's disconnections: the fan-out consumer is recreated after each, since
    /// a consumer without acks counts what was in flight when the link broke as delivered.
    disconnects: Arc<tokio::sync::watch::Sender<u64>>,
    /// The newest stream sequence handed to the fan-out.
    delivered: AtomicU64,
    replay_slots: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
}

fn unix_ms(t: time::OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// Doubling delays from 100 ms up to a ceiling.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff { next: Duration::from_millis(100), max }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

impl NatsBus {
    /// A bus that is not connected yet ([`NatsBus::run`] connects); the receiver goes to the
    /// dispatcher, whose queue holds `capacity` events.
    pub fn new(
        config: NatsConfig,
        replay_limit: usize,
        idempotency_window: Duration,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> (Arc<NatsBus>, mpsc::Receiver<Arc<Published>>) {
        let (tx, rx) = mpsc::channel(capacity);
        metrics.bus_connected.set(0);
        let bus = NatsBus {
            config,
            replay_limit,
            idempotency_window,
            tx,
            conn: ArcSwapOption::empty(),
            consuming: AtomicBool::new(false),
            disconnects: Arc::new(tokio::sync::watch::Sender::new(0)),
            delivered: AtomicU64::new(0),
            replay_slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_REPLAYS),
            metrics,
        };
        (Arc::new(bus), rx)
    }

    /// Connected, consuming the stream, and the fan-out still takes events.
    pub fn is_ready(&self) -> bool {
        let connected = self.conn.load().as_ref().is_some_and(|c| c.client.connection_state() == State::Connected);
        connected && self.consuming.load(Ordering::Acquire) && !self.tx.is_closed()
    }

    fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Release);
        self.metrics.bus_connected.set(i64::from(on));
    }

    async fn connect(&self) -> Result<async_nats::Client, String> {
        let max = Duration::from_millis(self.config.max_reconnect_delay_ms);
        let mut options = async_nats::ConnectOptions::new()
            .name("incident-stream")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_millis(self.config.request_timeout_ms))
            .reconnect_delay_callback(move |attempts| {
                let exp = u32::try_from(attempts.min(16)).unwrap_or(16);
                Duration::from_millis(100).saturating_mul(2u32.saturating_pow(exp)).min(max)
            })
            .event_callback({
                let disconnects = Arc::clone(&self.disconnects);
                move |event| {
                    let disconnects = Arc::clone(&disconnects);
                    async move {
                        match event {
                            async_nats::Event::Connected => tracing::info!("connected to NATS"),
                            async_nats::Event::Disconnected => {
                                disconnects.send_modify(|n| *n += 1);
                                tracing::warn!("disconnected from NATS; reconnecting");
                            }
                            other => tracing::info!(event = %other, "NATS client event"),
                        }
                    }
                }
            });
        if let Some(path) = &self.config.credentials_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| format!("cannot read bus.nats.credentials_file {}: {e}", path.display()))?;
        }
        let servers: Vec<&str> = self.config.url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        let addrs = servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bus.nats.url: {e}"))?;
        options.connect(addrs).await.map_err(|e| format!("cannot connect to NATS at {}: {e}", self.config.url))
    }

    fn stream_config(&self) -> stream::Config {
        let c = &self.config;
        stream::Config {
            name: c.stream.clone(),
            subjects: vec![format!("{}.>", c.subject_prefix)],
            max_age: Duration::from_secs(c.max_age_secs),
            max_bytes: i64::try_from(c.max_bytes).unwrap_or(i64::MAX),
            storage: match c.storage {
                NatsStorage::File => stream::StorageType::File,
                NatsStorage::Memory => stream::StorageType::Memory,
            },
            num_replicas: c.replicas,
            discard: stream::DiscardPolicy::Old,
            // JetStream refuses a duplicate window longer than the stream keeps events.
            duplicate_window: match c.max_age_secs {
                0 => self.idempotency_window,
                age => self.idempotency_window.min(Duration::from_secs(age)),
            },
            retention: stream::RetentionPolicy::Limits,
            description: Some("incident-stream events: <prefix>.<tenant>.<event_type>".to_owned()),
            ..Default::default()
        }
    }

    /// Connects, makes sure the stream exists, and feeds the fan-out from it until the fan-out
    /// stops; every failure on the way is logged and retried with backoff.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(self.config.max_reconnect_delay_ms));
        let client = loop {
            match self.connect().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(error = %e, "NATS bus: cannot connect");
                    tokio::time::sleep(backoff.step()).await;
                }
            }
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(self.config.request_timeout_ms))
            // Never wait for an in-flight slot: a full window answers 503 at once (waiting could
            // deadlock concurrent batches that each hold slots while waiting for more).
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .backpressure_on_inflight(false)
            .build(client.clone());
        let mut first = true;
        loop {
            if self.tx.is_closed() {
                return;
            }
            let info = match js.get_or_create_stream(self.stream_config()).await {
                Ok(mut s) => match s.info().await {
                    Ok(i) => i.clone(),
                    Err(e) => {
                        tracing::warn!(error = %e, "NATS bus: cannot read the stream's state; retrying");
                        tokio::time::sleep(backoff.step()).await;
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, stream = %self.config.stream, "NATS bus: stream unavailable; retrying");
                    tokio::time::sleep(backoff.step()).await;
                    continue;
                }
            };
            let epoch = unix_ms(info.created);
            let known = self.conn.load().as_ref().map(|c| c.epoch);
            let mut next = match known {
                Some(e) if e == epoch => self.delivered.load(Ordering::Acquire) + 1,
                Some(old) => {
                    tracing::warn!(old, epoch, "NATS bus: the stream was created again; ids start a new epoch");
                    // An empty stream reports 0 as its first sequence; sequences start at 1.
                    info.state.first_sequence.max(1)
                }
                // A node starts with what is published from now on; older events are replayed
                // on request.
                None => info.state.last_sequence + 1,
            };
            if next < info.state.first_sequence {
                let lost = info.state.first_sequence - next;
                self.metrics.bus_events_lost.inc_by(lost);
                tracing::error!(
                    lost,
                    from = next,
                    "NATS bus: events were discarded by the stream's retention before this node delivered them"
                );
                next = info.state.first_sequence;
            }
            self.delivered.store(next.saturating_sub(1), Ordering::Release);
            self.conn.store(Some(Arc::new(Conn { client: client.clone(), js: js.clone(), epoch })));
            if first {
                tracing::info!(stream = %self.config.stream, epoch, from = next, "NATS bus: consuming the stream");
                first = false;
            }
            match self.consume(&js, epoch, next, &mut backoff).await {
                Ok(()) => return,
                Err(e) => {
                    self.set_consuming(false);
                    tracing::warn!(error = %e, after = self.delivered.load(Ordering::Acquire), "NATS bus: consumer lost; recreating it after the last delivered event");
                    tokio::time::sleep(backoff.step()).await;
                }
            }
        }
    }

    /// Feeds the fan-out from `next` on; `Ok` when the fan-out is gone (shutdown). The consumer
    /// is given up (and deleted, best effort) on any error, a disconnection, or a gap in its own
    /// delivery sequence; the caller recreates it after the last delivered event.
    async fn consume(
        &self,
        js: &jetstream::Context,
        epoch: u64,
        next: u64,
        backoff: &mut Backoff,
    ) -> Result<(), String> {
        // Watched from before the consumer exists: a disconnection during its creation counts.
        let gone = self.disconnects.subscribe();
        let stream = js.get_stream_no_info(&self.config.stream).await.map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                description: Some("incident-stream node fan-out".to_owned()),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: next },
                ack_policy: consumer::AckPolicy::None,
                filter_subject: format!("{}.>", self.config.subject_prefix),
                inactive_threshold: CONSUMER_INACTIVE,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let result = self.feed(&consumer, epoch, gone, backoff).await;
        if result.is_err() {
            let name = consumer.cached_info().name.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.delete_consumer(&name)).await;
            });
        }
        result
    }

    async fn feed(
        &self,
        consumer: &consumer::Consumer<consumer::pull::Config>,
        epoch: u64,
        mut gone: tokio::sync::watch::Receiver<u64>,
        backoff: &mut Backoff,
    ) -> Result<(), String> {
        if gone.has_changed().unwrap_or(true) {
            return Err("disconnected from NATS while the consumer was created".to_owned());
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .heartbeat(HEARTBEAT)
            .expires(HEARTBEAT * 5)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        self.set_consuming(true);
        backoff.reset();
        let prefix = &self.config.subject_prefix;
        // The consumer numbers what it sends 1, 2, 3…; a jump means messages were sent and lost
        // (a broken link, or the client's buffer overflowing), and without acks they count as
        // delivered: start again from the last event actually handed on.
        let mut expected = 1;
        loop {
            let m = tokio::select! {
                m = messages.next() => m,
                _ = gone.changed() => return Err("disconnected from NATS".to_owned()),
            };
            let Some(m) = m else { break };
            let m = m.map_err(|e| e.to_string())?;
            let info = m.info().map_err(|e| e.to_string())?;
            if info.consumer_sequence != expected {
                return Err(format!(
                    "the consumer skipped from its delivery {} to {}",
                    expected.saturating_sub(1),
                    info.consumer_sequence
                ));
            }
            expected += 1;
            let seq = info.stream_sequence;
            if seq <= self.delivered.load(Ordering::Acquire) {
                continue;
            }
            let id = MessageId { epoch, seq };
            let published = unix_ms(info.published);
            match decode(prefix, m.subject.as_str(), &m.payload, id, published) {
                Ok((routing, frame)) => {
                    let p = Published {
                        id,
                        priority: routing.priority(),
                        routing,
                        frame,
                        published_at: since_wall(published),
                    };
                    if self.tx.send(Arc::new(p)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => {
                    self.metrics.bus_invalid_messages.inc();
                    tracing::warn!(seq, subject = %m.subject, error = %e, "NATS bus: message not delivered");
                }
            }
            self.delivered.store(seq, Ordering::Release);
        }
        Err("the consumer's message stream ended".to_owned())
    }

    fn unavailable(reason: impl Into<String>, n: usize) -> BusError {
        BusError::Unavailable { reason: reason.into(), stored: vec![None; n] }
    }

    /// Publishes a batch in order and waits for the stream to acknowledge every event. With a
    /// key, each event carries `Nats-Msg-Id` `<tenant>:<key>:<index>`: the stream stores a retry
    /// once and acknowledges it with the first copy's sequence.
    pub async fn publish(&self, events: Vec<Event>, key: Option<&IdempotencyKey>) -> Result<Vec<MessageId>, BusError> {
        let n = events.len();
        if self.tx.is_closed() {
            return Err(BusError::Closed);
        }
        let conn = self.conn.load_full().ok_or_else(|| Self::unavailable("not connected to NATS yet", n))?;
        if conn.client.connection_state() != State::Connected {
            return Err(Self::unavailable("disconnected from NATS", n));
        }
        let mut stored: Vec<Option<MessageId>> = vec![None; n];
        let mut failure: Option<String> = None;
        let mut acks = Vec::with_capacity(n);
        for (i, e) in events.iter().enumerate() {
            let subject = subject_for(&self.config.subject_prefix, &e.routing);
            let payload = match serde_json::to_vec(&e.body) {
                Ok(p) => p,
                Err(err) => {
                    failure = Some(err.to_string());
                    break;
                }
            };
            let mut message = jetstream::message::PublishMessage::build().payload(payload.into());
            if let Some(k) = key {
                message = message.message_id(k.message_id(i));
            }
            match conn.js.send_publish(subject, message).await {
                Ok(ack) => acks.push(ack),
                Err(err) => {
                    failure = Some(err.to_string());
                    break;
                }
            }
        }
        for (slot, ack) in stored.iter_mut().zip(acks) {
            match ack.await {
                Ok(a) if a.stream == self.config.stream => {
                    *slot = Some(MessageId { epoch: conn.epoch, seq: a.sequence })
                }
                Ok(a) => {
                    failure.get_or_insert_with(|| {
                        format!("stored by stream `{}`, not `{}`", a.stream, self.config.stream)
                    });
                }
                Err(err) => {
                    failure.get_or_insert_with(|| err.to_string());
                }
            }
        }
        match failure {
            None => Ok(stored.into_iter().flatten().collect()),
            Some(reason) => {
                tracing::warn!(reason = %reason, stored = stored.iter().flatten().count(), of = n, "NATS bus: publish failed");
                Err(BusError::Unavailable { reason, stored })
            }
        }
    }

    /// The tenant's events after `after` matching `filter`, read from the stream.
    pub async fn replay(
        &self,
        tenant: &TenantId,
        after: MessageId,
        filter: &SubscriptionFilter,
    ) -> Result<Replayed, ResumeError> {
        let limit = Duration::from_millis(self.config.request_timeout_ms) * 2;
        let read = async {
            let _slot = self
                .replay_slots
                .acquire()
                .await
                .map_err(|_| ResumeError::Unavailable { reason: "the bus is shutting down".to_owned() })?;
            self.read_history(tenant, after, filter).await
        };
        match tokio::time::timeout(limit, read).await {
            Ok(r) => r,
            Err(_) => Err(ResumeError::Unavailable {
                reason: format!(
                    "the stream could not be read within {limit:?} (at most {MAX_CONCURRENT_REPLAYS} replays run at once)"
                ),
            }),
        }
    }

    async fn read_history(
        &self,
        tenant: &TenantId,
        after: MessageId,
        filter: &SubscriptionFilter,
    ) -> Result<Replayed, ResumeError> {
        let unavailable = |reason: String| ResumeError::Unavailable { reason };
        let conn = self.conn.load_full().ok_or_else(|| unavailable("not connected to NATS yet".into()))?;
        if conn.client.connection_state() != State::Connected {
            return Err(unavailable("disconnected from NATS".into()));
        }
        let mut stream = conn.js.get_stream(&self.config.stream).await.map_err(|e| unavailable(e.to_string()))?;
        let info = stream.info().await.map_err(|e| unavailable(e.to_string()))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let epoch = conn.epoch;
        if unix_ms(info.created) != epoch {
            // The stream was created again and this node has not caught up yet: its sequences
            // are not the ones the node's ids speak of.
            return Err(unavailable("the stream was created again; this node is switching to it".into()));
        }
        let oldest = (first <= last && last > 0).then_some(MessageId { epoch, seq: first });
        if after.epoch != epoch {
            return Err(ResumeError::OtherEpoch { asked: after, epoch, oldest });
        }
        let through = MessageId { epoch, seq: last.max(after.seq) };
        if self.replay_limit == 0 {
            return Err(ResumeError::Evicted { asked: after, oldest: None });
        }
        if after.seq >= last {
            return Ok(Replayed { events: Vec::new(), through });
        }
        if after.seq.saturating_add(1) < first {
            return Err(ResumeError::Evicted { asked: after, oldest });
        }
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                description: Some("incident-stream resume".to_owned()),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: after.seq + 1 },
                ack_policy: consumer::AckPolicy::None,
                filter_subject: format!("{}.{tenant}.>", self.config.subject_prefix),
                inactive_threshold: REPLAY_CONSUMER_INACTIVE,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let name = consumer.cached_info().name.clone();
        let result = self.read_consumer(&consumer, tenant, after, through, filter).await;
        // Best effort: an abandoned consumer goes away by itself after its inactivity threshold.
        if let Err(e) = stream.delete_consumer(&name).await {
            tracing::debug!(error = %e, "NATS bus: replay consumer not deleted");
        }
        result.map(|events| Replayed { events, through })
    }

    async fn read_consumer(
        &self,
        consumer: &consumer::Consumer<consumer::pull::Config>,
        tenant: &TenantId,
        after: MessageId,
        through: MessageId,
        filter: &SubscriptionFilter,
    ) -> Result<Vec<Arc<Published>>, ResumeError> {
        let unavailable = |reason: String| ResumeError::Unavailable { reason };
        // Pending counts the tenant's events up to the stream's end, some newer than `through`:
        // the limit applies to what the replay would send, counted as it is read.
        let mut left = consumer.cached_info().num_pending;
        let mut counted: usize = 0;
        let prefix = &self.config.subject_prefix;
        let expires = Duration::from_millis(self.config.request_timeout_ms);
        let mut events = Vec::new();
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(PULL_BATCH).min(PULL_BATCH);
            let mut batch = consumer
                .batch()
                .max_messages(want)
                .expires(expires)
                .messages()
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| unavailable(e.to_string()))?;
                let info = m.info().map_err(|e| unavailable(e.to_string()))?;
                got += 1;
                left = info.pending;
                let seq = info.stream_sequence;
                if seq > through.seq {
                    // Newer than the replay's snapshot: it reaches the session live.
                    left = 0;
                    break;
                }
                counted += 1;
                if counted > self.replay_limit {
                    let pending = consumer.cached_info().num_pending;
                    return Err(ResumeError::TooMany { asked: after, pending, limit: self.replay_limit });
                }
                let id = MessageId { epoch: through.epoch, seq };
                let published = unix_ms(info.published);
                match decode(prefix, m.subject.as_str(), &m.payload, id, published) {
                    Ok((routing, frame)) if routing.tenant == *tenant => {
                        if filter.matches(&routing) {
                            let priority = routing.priority();
                            let p = Published { id, routing, priority, frame, published_at: Instant::now() };
                            events.push(Arc::new(p));
                        }
                    }
                    Ok(_) | Err(_) => {
                        self.metrics.bus_invalid_messages.inc();
                        tracing::warn!(seq, subject = %m.subject, "NATS bus: message not replayed (invalid or another tenant's)");
                    }
                }
            }
            if got == 0 {
                return Err(unavailable(format!("{left} events of the tenant did not arrive within {expires:?}")));
            }
        }
        Ok(events)
    }
}

/// The instant a wall-clock time in the past corresponds to (for the latency histogram; clocks
/// of other machines may be ahead, so it is never later than now).
fn since_wall(unix_ms_then: u64) -> Instant {
    let age = Duration::from_millis(crate::time::unix_now_ms().saturating_sub(unix_ms_then));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> MessageId {
        MessageId { epoch: 1_700_000_000_000, seq: 42 }
    }

    #[test]
    fn a_stored_event_decodes_to_the_frame_every_node_builds() {
        let body =
            br#"{"event_type":"escalated","tenant":"acme","labels":{"tenant":"acme","team":"db"},"severity":"P1"}"#;
        let (routing, frame) =
            decode("incidents", "incidents.acme.escalated", body, id(), 1_700_000_000_123).expect("valid");
        assert_eq!(routing.tenant.as_str(), "acme");
        let frame: serde_json::Value = serde_json::from_slice(&frame).expect("json frame");
        assert_eq!(frame["message_id"], "1700000000000-42");
        assert_eq!(frame["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(frame["event"]["labels"]["team"], "db");
        let again = decode("incidents", "incidents.acme.escalated", body, id(), 1_700_000_000_123).expect("valid");
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&again.1).expect("json"), frame, "deterministic");
    }

    #[test]
    fn a_message_naming_another_tenant_than_its_subject_is_refused() {
        let body = br#"{"event_type":"escalated","tenant":"globex"}"#;
        let err = decode("incidents", "incidents.acme.escalated", body, id(), 0).expect_err("foreign");
        assert!(matches!(err, DecodeError::Payload(_)), "{err}");
        let body = br#"{"event_type":"escalated","labels":{"tenant":"globex"}}"#;
        assert!(decode("incidents", "incidents.acme.escalated", body, id(), 0).is_err(), "label names another tenant");
    }

    #[test]
    fn malformed_subjects_and_payloads_are_refused() {
        let ok = br#"{"event_type":"escalated"}"#;
        for subject in [
            "incidents",
            "incidents.acme",
            "other.acme.escalated",
            "incidentsX.acme.escalated",
            "incidents.a b.escalated",
        ] {
            assert!(matches!(decode("incidents", subject, ok, id(), 0), Err(DecodeError::Subject(_))), "{subject}");
        }
        assert!(matches!(
            decode("incidents", "incidents.acme.comment_added", ok, id(), 0),
            Err(DecodeError::EventType { .. })
        ));
        for payload in [&b"not json"[..], br#"[1]"#, br#"{"event_type":"nope"}"#] {
            assert!(matches!(
                decode("incidents", "incidents.acme.escalated", payload, id(), 0),
                Err(DecodeError::Payload(_))
            ));
        }
        assert!(decode("a.b", "a.b.acme.escalated", ok, id(), 0).is_ok(), "a prefix of several tokens");
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let steps: Vec<u64> = (0..5).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(steps, vec![100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }
}

//! The in-process bus (the embedded default). A publish is all-or-nothing: a batch is
//! accepted only if the queue to the fan-out (`broadcast_capacity`) has room for all of it, so a
//! `202` always means every event of the batch will be dispatched; otherwise the publisher gets
//! `Overloaded` (HTTP 503) and nothing is queued. The bus never waits on a subscriber.
//!
//! It also keeps a bounded replay window per tenant (`bus.replay_window` events and
//! `bus.replay_max_bytes` of frames, at most `bus.replay_max_age_secs` old), filled under the
//! same lock that assigns ids, so a snapshot of it holds every event of the tenant published
//! before the snapshot and still retained, and nothing published after. [`LocalBus::replay`]
//! answers a `resume_from` from it, or says the position cannot be served (another epoch, or
//! events after it already evicted).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::idempotency::{IdempotencyKey, Remembered};
use super::{BusError, Published, Replayed, ResumeError, WindowLimits};
use crate::event::{Event, MessageId, TenantId};
use crate::filter::SubscriptionFilter;
use crate::protocol;

/// One tenant's retained events, oldest first.
#[derive(Default)]
struct Window {
    events: VecDeque<Arc<Published>>,
    /// Sum of the retained frames' lengths.
    bytes: usize,
    /// The newest id evicted so far: a resume from before it has a gap.
    evicted_through: Option<MessageId>,
}

impl Window {
    fn evict_front(&mut self) {
        if let Some(e) = self.events.pop_front() {
            self.bytes -= e.frame.len();
            self.evicted_through = Some(e.id);
        }
    }

    fn push(&mut self, e: Arc<Published>) {
        self.bytes += e.frame.len();
        self.events.push_back(e);
    }

    fn trim(&mut self, limits: &WindowLimits, now: Instant) {
        while self.events.len() > limits.events || self.bytes > limits.bytes {
            self.evict_front();
        }
        let max_age = limits.age;
        while self.events.front().is_some_and(|e| now.duration_since(e.published_at) > max_age) {
            self.evict_front();
        }
    }
}

struct Sequencer {
    epoch: u64,
    next_seq: u64,
    windows: HashMap<TenantId, Window>,
    /// Answers of keyed publishes, checked and filled under the lock that assigns ids.
    remembered: Remembered,
}

/// Keyed publishes remembered at most (the oldest go first beyond).
const MAX_REMEMBERED: usize = 100_000;

/// The in-process bus.
pub struct LocalBus {
    seq: Mutex<Sequencer>,
    tx: mpsc::Sender<Arc<Published>>,
    capacity: usize,
    window: WindowLimits,
}

impl LocalBus {
    /// A bus whose queue to the fan-out holds `capacity` events; the receiver goes to the
    /// dispatcher. The epoch is the start time in milliseconds, so ids of a previous run never
    /// look like ids of this one.
    pub fn new(capacity: usize) -> (LocalBus, mpsc::Receiver<Arc<Published>>) {
        LocalBus::with_window(capacity, WindowLimits { events: 0, bytes: 0, age: Duration::ZERO })
    }

    /// The same, retaining per tenant what `window` allows for replay.
    pub fn with_window(capacity: usize, window: WindowLimits) -> (LocalBus, mpsc::Receiver<Arc<Published>>) {
        let (tx, rx) = mpsc::channel(capacity);
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let remembered = Remembered::new(Duration::from_secs(120), MAX_REMEMBERED);
        let seq = Sequencer { epoch, next_seq: 1, windows: HashMap::new(), remembered };
        (LocalBus { seq: Mutex::new(seq), tx, capacity, window }, rx)
    }

    /// Drops what every tenant's window holds past its limits, the age limit included, so a
    /// tenant that stopped publishing does not keep its events forever (run periodically). The
    /// windows themselves stay: they remember what was evicted, so a later resume is told.
    pub fn trim_windows(&self) {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for w in seq.windows.values_mut() {
            w.trim(&self.window, now);
            w.events.shrink_to_fit();
        }
    }

    /// The retained events of `tenant` after `after` that match `filter`, in publish order; or
    /// why that position cannot be replayed exactly. Everything the tenant published before this
    /// call is either returned, older than `after`, or reported as evicted; everything published
    /// after it is not returned (it reaches the caller live).
    pub fn replay(
        &self,
        tenant: &TenantId,
        after: MessageId,
        filter: &SubscriptionFilter,
    ) -> Result<Replayed, ResumeError> {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = seq.epoch;
        let through = MessageId { epoch, seq: seq.next_seq - 1 };
        let limits = self.window;
        let window = seq.windows.get_mut(tenant);
        let oldest = |w: &Option<&mut Window>| w.as_ref().and_then(|w| w.events.front().map(|e| e.id));
        if after.epoch != epoch {
            return Err(ResumeError::OtherEpoch { asked: after, epoch, oldest: oldest(&window) });
        }
        if limits.events == 0 {
            // Replay is off: nothing after any position is retained.
            return Err(ResumeError::Evicted { asked: after, oldest: None });
        }
        let Some(window) = window else {
            // Nothing of this tenant was ever retained: nothing was evicted either.
            return Ok(Replayed { events: Vec::new(), through });
        };
        window.trim(&limits, Instant::now());
        if window.evicted_through.is_some_and(|ev| ev > after) {
            return Err(ResumeError::Evicted { asked: after, oldest: window.events.front().map(|e| e.id) });
        }
        let start = window.events.partition_point(|e| e.id <= after);
        let candidates: Vec<Arc<Published>> = window.events.range(start..).cloned().collect();
        // Matching runs after the lock is released: publishers of every tenant wait on it.
        drop(seq);
        let events = candidates.into_iter().filter(|e| filter.matches(&e.routing)).collect();
        Ok(Replayed { events, through })
    }

    /// Whether the fan-out still takes events.
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }

    /// How long the answers of keyed publishes are kept (default 120 s).
    pub fn set_idempotency_window(&mut self, ttl: Duration) {
        let seq = self.seq.get_mut().unwrap_or_else(|p| p.into_inner());
        seq.remembered = Remembered::new(ttl, MAX_REMEMBERED);
    }

    /// Publishes a batch atomically, in order; returns the ids.
    pub fn publish(&self, events: Vec<Event>) -> Result<Vec<MessageId>, BusError> {
        self.publish_keyed(events, None)
    }

    /// The same; with a key seen within the idempotency window, publishes nothing and answers
    /// the ids of the first publish under it.
    pub fn publish_keyed(&self, events: Vec<Event>, key: Option<&IdempotencyKey>) -> Result<Vec<MessageId>, BusError> {
        let timestamp = crate::time::rfc3339_now();
        // Serialize every body before taking the lock: the frame only needs the id prepended.
        let bodies: Vec<(Event, String)> = events
            .into_iter()
            .map(|e| {
                let json = serde_json::to_string(&e.body).unwrap_or_else(|_| "{}".to_owned());
                (e, json)
            })
            .collect();
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(ids) = key.and_then(|k| seq.remembered.get(k, now)) {
            return Ok(ids);
        }
        if self.tx.is_closed() {
            return Err(BusError::Closed);
        }
        if self.tx.capacity() < bodies.len() {
            return Err(BusError::Overloaded { capacity: self.capacity });
        }
        let ready: Vec<Arc<Published>> = bodies
            .into_iter()
            .map(|(event, json)| {
                let id = MessageId { epoch: seq.epoch, seq: seq.next_seq };
                seq.next_seq += 1;
                let frame = protocol::encode_event(&id.to_string(), &timestamp, &json);
                let priority = event.routing.priority();
                Arc::new(Published { id, routing: event.routing, priority, frame, published_at: now })
            })
            .collect();
        // Sent back to back, so the dispatcher tends to take the whole batch in one go (and each
        // connection writes it in one syscall). Capacity was checked under the lock, and only
        // this function sends.
        if self.window.events > 0 {
            for p in &ready {
                let window = seq.windows.entry(p.routing.tenant.clone()).or_default();
                window.push(Arc::clone(p));
                window.trim(&self.window, now);
            }
        }
        let ids: Vec<MessageId> = ready.iter().map(|p| p.id).collect();
        if let Some(k) = key {
            seq.remembered.put(k.clone(), ids.clone(), now);
        }
        for published in ready {
            self.tx.try_send(published).map_err(|_| BusError::Closed)?;
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TenantScope;
    use crate::protocol::FilterSpec;

    fn events(tenant: &TenantId, types: &[&str]) -> Vec<Event> {
        types
            .iter()
            .map(|t| Event::parse(serde_json::json!({"event_type": t}), TenantScope::Bound(tenant)).expect("event"))
            .collect()
    }

    fn all() -> SubscriptionFilter {
        SubscriptionFilter::default()
    }

    #[test]
    fn the_window_replays_what_follows_a_position_and_names_what_it_lost() {
        let limits = WindowLimits { events: 3, bytes: 1 << 20, age: Duration::from_secs(60) };
        let (bus, _rx) = LocalBus::with_window(100, limits);
        let (acme, globex) = (TenantId::new("acme").expect("t"), TenantId::new("globex").expect("t"));
        let a = bus.publish(events(&acme, &["escalated", "comment_added"])).expect("publish");
        let g = bus.publish(events(&globex, &["escalated"])).expect("publish");
        let r = bus.replay(&acme, a[0], &all()).expect("in the window");
        assert_eq!(r.events.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a[1]]);
        assert_eq!(r.through, g[0], "through the newest id of any tenant");
        let spec = FilterSpec { event_types: vec!["escalated".into()], ..FilterSpec::default() };
        let escalated = SubscriptionFilter::from_spec(&spec).expect("filter");
        let before_first = MessageId { epoch: a[0].epoch, seq: a[0].seq - 1 };
        let r = bus.replay(&acme, before_first, &escalated).expect("nothing evicted yet");
        assert_eq!(r.events.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a[0]], "filtered");
        assert!(bus
            .replay(&globex, before_first, &all())
            .expect("globex")
            .events
            .iter()
            .all(|e| e.routing.tenant == globex));
        // Two more for acme: the window keeps 3, so a[0] is evicted.
        let b = bus.publish(events(&acme, &["escalated", "escalated"])).expect("publish");
        assert_eq!(bus.replay(&acme, a[0], &all()).expect("a[0] itself may go").events.len(), 3);
        let err = bus.replay(&acme, before_first, &all()).expect_err("a[0] was evicted");
        assert_eq!(err, ResumeError::Evicted { asked: before_first, oldest: Some(a[1]) });
        assert_eq!(bus.replay(&acme, b[1], &all()).expect("up to date").events.len(), 0);
        let other = MessageId { epoch: 1, seq: 1 };
        assert!(matches!(bus.replay(&acme, other, &all()), Err(ResumeError::OtherEpoch { oldest: Some(_), .. })));
    }

    #[test]
    fn the_window_is_bounded_in_bytes_too() {
        let limits = WindowLimits { events: 1000, bytes: 1000, age: Duration::from_secs(60) };
        let (bus, _rx) = LocalBus::with_window(1000, limits);
        let acme = TenantId::new("acme").expect("t");
        let ids = bus.publish(events(&acme, &["escalated"; 100])).expect("publish");
        let frame = bus.replay(&acme, ids[98], &all()).expect("the newest is kept").events[0].frame.len();
        let kept = 1000 / frame;
        let first_kept = ids[100 - kept];
        let before_it = MessageId { epoch: first_kept.epoch, seq: first_kept.seq - 1 };
        assert_eq!(bus.replay(&acme, before_it, &all()).expect("within bytes").events.len(), kept);
        let older = MessageId { epoch: first_kept.epoch, seq: first_kept.seq - 2 };
        assert!(matches!(bus.replay(&acme, older, &all()), Err(ResumeError::Evicted { .. })));
    }

    #[test]
    fn an_idle_tenants_window_ages_out_and_says_so() {
        let limits = WindowLimits { events: 100, bytes: 1 << 20, age: Duration::from_millis(30) };
        let (bus, _rx) = LocalBus::with_window(100, limits);
        let acme = TenantId::new("acme").expect("t");
        let ids = bus.publish(events(&acme, &["escalated", "escalated"])).expect("publish");
        std::thread::sleep(Duration::from_millis(60));
        bus.trim_windows();
        let before = MessageId { epoch: ids[0].epoch, seq: ids[0].seq - 1 };
        assert_eq!(
            bus.replay(&acme, before, &all()).expect_err("aged out"),
            ResumeError::Evicted { asked: before, oldest: None }
        );
        assert!(bus.replay(&acme, ids[1], &all()).expect("nothing after the newest").events.is_empty());
    }

    #[test]
    fn without_a_window_every_resume_is_unavailable() {
        let (bus, _rx) = LocalBus::new(10);
        let acme = TenantId::new("acme").expect("t");
        let ids = bus.publish(events(&acme, &["escalated"])).expect("publish");
        let err = bus.replay(&acme, ids[0], &all()).expect_err("replay is off");
        assert_eq!(err, ResumeError::Evicted { asked: ids[0], oldest: None });
    }
}

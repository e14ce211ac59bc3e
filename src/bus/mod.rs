//! The event bus: where published events get their message id and their one serialized frame,
//! and from where they reach the fan-out in publish order.
//!
//! `local` is the in-process bus (the embedded default). A publish is all-or-nothing: a batch is
//! accepted only if the queue to the fan-out (`broadcast_capacity`) has room for all of it, so a
//! `202` always means every event of the batch will be dispatched; otherwise the publisher gets
//! `Overloaded` (HTTP 503) and nothing is queued. The bus never waits on a subscriber.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::event::{Event, MessageId, Priority, Routing};
use crate::protocol;

/// An event ready for the fan-out: its id, routing, priority and the one frame every receiving
/// connection is sent (shared, never re-encoded).
#[derive(Debug)]
pub struct Published {
    /// The message id.
    pub id: MessageId,
    /// What filters match on.
    pub routing: Routing,
    /// What is shed first.
    pub priority: Priority,
    /// The complete `event` frame.
    pub frame: Bytes,
    /// When the bus accepted it (for the latency histogram).
    pub published_at: Instant,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The queue to the fan-out is full; retry later.
    #[error("the event queue is full ({capacity} events); retry later")]
    Overloaded {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The fan-out has stopped (shutting down).
    #[error("the service is shutting down")]
    Closed,
}

struct Sequencer {
    epoch: u64,
    next_seq: u64,
}

/// The in-process bus.
pub struct LocalBus {
    seq: Mutex<Sequencer>,
    tx: mpsc::Sender<Arc<Published>>,
    capacity: usize,
}

impl LocalBus {
    /// A bus whose queue to the fan-out holds `capacity` events; the receiver goes to the
    /// dispatcher. The epoch is the start time in milliseconds, so ids of a previous run never
    /// look like ids of this one.
    pub fn new(capacity: usize) -> (LocalBus, mpsc::Receiver<Arc<Published>>) {
        let (tx, rx) = mpsc::channel(capacity);
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        (LocalBus { seq: Mutex::new(Sequencer { epoch, next_seq: 1 }), tx, capacity }, rx)
    }

    /// Whether the fan-out still takes events.
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Publishes a batch atomically, in order; returns the ids.
    pub fn publish(&self, events: Vec<Event>) -> Result<Vec<MessageId>, BusError> {
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
        if self.tx.is_closed() {
            return Err(BusError::Closed);
        }
        if self.tx.capacity() < bodies.len() {
            return Err(BusError::Overloaded { capacity: self.capacity });
        }
        let now = Instant::now();
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
        let ids = ready.iter().map(|p| p.id).collect();
        for published in ready {
            self.tx.try_send(published).map_err(|_| BusError::Closed)?;
        }
        Ok(ids)
    }
}

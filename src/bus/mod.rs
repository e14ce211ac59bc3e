//! The event bus: where published events get their message id and their one serialized frame,
//! and from where they reach the fan-out in publish order, and where a `resume_from` is served.
//!
//! Two backends behind one enum ([`Bus`]):
//! - [`local`]: in-process, the embedded default, with a bounded replay window per tenant in
//!   memory. Ids are `<epoch>-<seq>` with the epoch taken at start, so a restart is a new epoch.
//! - [`nats`]: NATS JetStream, shared by several gateway nodes. The stream stores every event;
//!   each node consumes it and fans out locally; ids are the stream sequences (the epoch is the
//!   stream's creation time), so a client can resume on any node.
//!
//! Both hand the dispatcher the same [`Published`] values through one channel, so the fan-out,
//! the sessions and the seam rule of a resume do not know which backend runs. An enum rather than
//! a trait object: two closed variants with async methods, no boxing of futures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::event::{Event, MessageId, Priority, Routing, TenantId};
use crate::filter::SubscriptionFilter;

pub mod idempotency;
pub mod local;
pub mod nats;

pub use idempotency::IdempotencyKey;
pub use local::LocalBus;
pub use nats::NatsBus;

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
    /// The broker is unreachable or did not acknowledge in time; nothing of the batch was stored
    /// by this attempt as far as the node knows (`stored` says which events were).
    #[error("the event broker is unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
        /// Per event of the batch, its id when the broker acknowledged it (a batch over NATS is
        /// not atomic: a failure part-way leaves the first events stored).
        stored: Vec<Option<MessageId>>,
    },
}

/// Why a `resume_from` position cannot be replayed exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// The id is from another epoch (the history it belongs to is gone, e.g. a restart).
    #[error("message id {asked} is from another epoch; this server's history starts over at epoch {epoch}")]
    OtherEpoch {
        /// The position asked for.
        asked: MessageId,
        /// The current epoch.
        epoch: u64,
        /// The oldest id still retained for the tenant, if any.
        oldest: Option<MessageId>,
    },
    /// Events after the id were already evicted from the window.
    #[error("events after {asked} are no longer retained")]
    Evicted {
        /// The position asked for.
        asked: MessageId,
        /// The oldest id still retained for the tenant, if any.
        oldest: Option<MessageId>,
    },
    /// More events follow the position than one replay may send (`bus.replay_window`).
    #[error("{pending} events of the tenant follow {asked}, more than one replay sends ({limit})")]
    TooMany {
        /// The position asked for.
        asked: MessageId,
        /// Events of the tenant after it.
        pending: u64,
        /// The most one replay sends.
        limit: usize,
    },
    /// The broker could not be read (unreachable, or too slow).
    #[error("the event history cannot be read now: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
    },
}

impl ResumeError {
    /// The oldest id the client could still resume after (exclusive) to lose nothing more.
    pub fn oldest(&self) -> Option<MessageId> {
        match self {
            ResumeError::OtherEpoch { oldest, .. } | ResumeError::Evicted { oldest, .. } => *oldest,
            ResumeError::TooMany { .. } | ResumeError::Unavailable { .. } => None,
        }
    }
}

/// What a replay found.
#[derive(Debug)]
pub struct Replayed {
    /// The matching retained events after the position, in publish order.
    pub events: Vec<Arc<Published>>,
    /// The newest id assigned (to any tenant) when the window was read: every event of the
    /// tenant up to it was either retained and considered, or older than the position.
    pub through: MessageId,
}

/// How much one tenant's replay window may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    /// Events (0: no replay).
    pub events: usize,
    /// Bytes of retained frames.
    pub bytes: usize,
    /// Age of the oldest retained event.
    pub age: Duration,
}

/// The backend in use.
pub enum Bus {
    /// In-process (boxed: its id lock and windows are larger than the NATS handle).
    Local(Box<LocalBus>),
    /// NATS JetStream.
    Nats(Arc<NatsBus>),
}

impl Bus {
    /// Publishes a batch in order; the ids, or why it was refused. A local batch is atomic; a
    /// JetStream batch is acknowledged event by event, so [`BusError::Unavailable`] says which
    /// were stored. With a key, a batch published under the same key within the idempotency
    /// window is not published again: its ids are answered.
    pub async fn publish(&self, events: Vec<Event>, key: Option<&IdempotencyKey>) -> Result<Vec<MessageId>, BusError> {
        match self {
            Bus::Local(b) => b.publish_keyed(events, key),
            Bus::Nats(b) => b.publish(events, key).await,
        }
    }

    /// The retained events of `tenant` after `after` matching `filter`, in order, and the
    /// position through which every event of the tenant was considered (see [`Replayed`]).
    pub async fn replay(
        &self,
        tenant: &TenantId,
        after: MessageId,
        filter: &SubscriptionFilter,
    ) -> Result<Replayed, ResumeError> {
        match self {
            Bus::Local(b) => b.replay(tenant, after, filter),
            Bus::Nats(b) => b.replay(tenant, after, filter).await,
        }
    }

    /// Whether events flow: the fan-out runs and, for NATS, the broker is connected and this
    /// node consumes the stream.
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Local(b) => b.is_open(),
            Bus::Nats(b) => b.is_ready(),
        }
    }

    /// Periodic housekeeping (the local windows' age limit).
    pub fn trim(&self) {
        if let Bus::Local(b) = self {
            b.trim_windows();
        }
    }
}

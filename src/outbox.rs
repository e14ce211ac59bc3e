//! One connection's bounded outbound queue, shared by the fan-out (which pushes without ever
//! waiting) and the session task (which drains it into the socket).
//!
//! Overflow is a counted, typed outcome, never a silent drop: when the queue is full the oldest
//! event of the lowest queued priority is shed if the new one outranks it, otherwise the new one is
//! shed; the next drain reports the loss as `lagged`. A connection that loses more than a whole
//! queue's worth without catching up, or that would have to shed a critical event, is marked
//! for closing as a slow consumer (4008). The lock is a short synchronous one, never held across
//! `.await`.
//!
//! Every idle connection keeps one of these, so it is kept small: the per-priority queues are
//! allocated on the first push and released on a heartbeat that finds them empty, and the session
//! is woken through one waker slot and a flag rather than two `Notify`s (one task, the session's,
//! ever waits on an outbox).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::bus::Published;
use crate::event::{MessageId, Priority};
use crate::protocol::CloseReason;

/// What happened to one pushed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PushOutcome {
    /// Was the event queued?
    pub(crate) queued: bool,
    /// Events dropped by this push (the new one, an evicted one, or the whole queue when the
    /// connection was just marked slow).
    pub(crate) dropped: u64,
}

/// What a drain hands the session task, in the order it must be written.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    /// A close requested by the server (slow consumer, shutdown, idle…): write it and stop.
    pub(crate) close: Option<CloseReason>,
    /// Events were dropped since the last drain: `(count, first dropped id)`.
    pub(crate) lagged: Option<(u64, MessageId)>,
}

type Queues = [VecDeque<Arc<Published>>; Priority::COUNT];

#[derive(Default)]
struct State {
    /// One queue per priority; `None` until the first push, and again after a heartbeat found
    /// them empty (see [`Outbox::release_idle`]).
    queues: Option<Box<Queues>>,
    /// Events queued (bounded by the capacity, a `u32`).
    len: u32,
    dropped: u64,
    first_dropped: Option<MessageId>,
    dropped_since_caught_up: u32,
    /// Id of the most recent event queued (for re-checking queued events after an unsubscribe).
    last_queued: Option<MessageId>,
    close: Option<CloseReason>,
}

impl State {
    fn note_loss(&mut self, id: MessageId) {
        self.dropped += 1;
        self.first_dropped = Some(self.first_dropped.map_or(id, |f| f.min(id)));
    }

    fn record_drop(&mut self, id: MessageId, capacity: u32) {
        self.note_loss(id);
        self.dropped_since_caught_up += 1;
        if self.dropped_since_caught_up > capacity {
            self.close.get_or_insert(CloseReason::SlowConsumer);
        }
    }

    /// Empties the queue, recording every discarded event as lost; returns how many.
    fn discard_all(&mut self) -> u64 {
        let n = u64::from(self.len);
        let queues = self.queues.take();
        for e in queues.iter().flat_map(|q| q.iter()).flatten() {
            self.note_loss(e.id);
        }
        self.len = 0;
        n
    }
}

/// Whether a close lets the queued events go out first (a graceful shutdown) or discards them
/// (the connection is being cut off; the loss is reported in the final `lagged`).
fn drains_first(reason: CloseReason) -> bool {
    matches!(reason, CloseReason::Shutdown { .. } | CloseReason::IdleTimeout)
}

/// The queue itself. See the module docs.
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Set when there may be something to drain (events, lagged, a close, a timer); taken by
    /// [`Outbox::poll_ready`].
    ready: AtomicBool,
    /// The session task, woken whenever `ready` is set or a close is requested (a close also
    /// interrupts a write blocked on a full socket, see [`Outbox::poll_closing`]).
    waker: AtomicWaker,
    /// Events queued at most (a `u32`: every idle connection keeps one of these).
    capacity: u32,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            ready: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent in a way that
        // matters more than losing the connection, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one event; never blocks beyond the short lock.
    #[cfg(test)]
    pub(crate) fn push(&self, ev: &Arc<Published>) -> PushOutcome {
        self.push_all([ev])
    }

    /// Queues several events in order under one lock, waking the session at most once, so a
    /// burst reaches the socket as one write. Returns the combined outcome (`queued` if any was).
    /// The queue takes its own reference to each event; the caller's are only borrowed (a
    /// fan-out to 10,000 connections would otherwise clone and drop every event's shared
    /// reference count once more per connection).
    pub(crate) fn push_all<'e>(&self, evs: impl IntoIterator<Item = &'e Arc<Published>>) -> PushOutcome {
        let mut st = self.lock();
        let was_empty = st.len == 0;
        let mut total = PushOutcome { queued: false, dropped: 0 };
        for ev in evs {
            let o = self.push_locked(&mut st, ev);
            total.queued |= o.queued;
            total.dropped += o.dropped;
        }
        let closing = st.close.is_some_and(|r| !drains_first(r));
        drop(st);
        if closing {
            self.signal_close();
        } else if (was_empty && total.queued) || total.dropped > 0 {
            self.signal();
        }
        total
    }

    fn push_locked(&self, st: &mut State, ev: &Arc<Published>) -> PushOutcome {
        if st.close.is_some() {
            // Closing: nothing new is queued, but the loss is still counted and reported.
            st.note_loss(ev.id);
            return PushOutcome { queued: false, dropped: 1 };
        }
        let prio = ev.priority as usize;
        let mut outcome = PushOutcome { queued: true, dropped: 0 };
        let capacity = self.capacity;
        if st.len < capacity {
            st.queues.get_or_insert_with(Box::default)[prio].push_back(Arc::clone(ev));
            st.len += 1;
        } else {
            let queues = st.queues.get_or_insert_with(Box::default);
            let lowest = queues.iter().position(|q| !q.is_empty()).unwrap_or(prio);
            if lowest < prio {
                let evicted = queues[lowest].pop_front();
                queues[prio].push_back(Arc::clone(ev));
                if let Some(evicted) = evicted {
                    st.record_drop(evicted.id, capacity);
                }
                outcome.dropped = 1;
            } else {
                if ev.priority == Priority::Critical {
                    // Nothing left to shed but critical events: the client cannot keep up.
                    st.close.get_or_insert(CloseReason::SlowConsumer);
                }
                st.record_drop(ev.id, capacity);
                outcome = PushOutcome { queued: false, dropped: 1 };
            }
        }
        if outcome.queued {
            st.last_queued = Some(ev.id);
        }
        if st.close.is_some() {
            outcome.dropped += st.discard_all();
        }
        outcome
    }

    /// Asks the session to close (the first reason wins). A graceful close lets queued events
    /// go out first; any other discards them (recorded for the final `lagged`) and interrupts a
    /// blocked write. Returns the number of events discarded.
    pub(crate) fn request_close(&self, reason: CloseReason) -> u64 {
        let mut st = self.lock();
        let reason = *st.close.get_or_insert(reason);
        let graceful = drains_first(reason);
        let n = if graceful { 0 } else { st.discard_all() };
        drop(st);
        self.signal_close();
        n
    }

    /// Records events that were taken from the queue but could not be written (the write was
    /// cut off), so the final `lagged` covers them.
    pub(crate) fn record_unsent(&self, events: &[Arc<Published>]) {
        let mut st = self.lock();
        for e in events {
            st.note_loss(e.id);
        }
    }

    /// Takes up to `max` events in publish order into `out`, with any pending lagged notice. A
    /// close request is returned once nothing more is to be written before it: at once for a
    /// discarding close, after the queue is empty for a graceful one.
    pub(crate) fn drain(&self, out: &mut Vec<Arc<Published>>, max: usize) -> Drain {
        let mut st = self.lock();
        let mut d = Drain::default();
        if st.dropped > 0 {
            if let Some(first) = st.first_dropped.take() {
                d.lagged = Some((st.dropped, first));
            }
            st.dropped = 0;
        }
        if let Some(queues) = st.queues.as_deref_mut() {
            let mut taken = 0u32;
            while out.len() < max {
                // The next event in publish order is the smallest id among the queue heads.
                let next =
                    queues.iter().enumerate().filter_map(|(i, q)| q.front().map(|e| (e.id, i))).min().map(|(_, i)| i);
                let Some(e) = next.and_then(|i| queues[i].pop_front()) else { break };
                out.push(e);
                taken += 1;
            }
            st.len -= taken;
        }
        if st.len == 0 {
            st.dropped_since_caught_up = 0;
            d.close = st.close;
        }
        d
    }

    /// The close requested so far, if any.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.lock().close
    }

    /// The id of the most recent event queued, if any was.
    pub(crate) fn last_queued(&self) -> Option<MessageId> {
        self.lock().last_queued
    }

    /// Wakes the session task so it drains again (used when a drain left events behind).
    pub(crate) fn wake(&self) {
        self.signal();
    }

    /// Releases the queues' memory if nothing is queued (called on heartbeats: a connection that
    /// was sent events and then went quiet returns to the size of one that never was).
    pub(crate) fn release_idle(&self) {
        let mut st = self.lock();
        if st.len == 0 {
            st.queues = None;
        }
    }

    /// Sets `ready` and wakes the session, unless `ready` was already set: then the session was
    /// woken for it and has not looked yet (it takes the flag before it waits again), so pushes
    /// into a connection whose write is blocked wake it once, not once each.
    fn signal(&self) {
        if !self.ready.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Sets `ready` and always wakes the session: a close must reach a session blocked in a
    /// write ([`Outbox::poll_closing`]), whether or not `ready` was already set.
    fn signal_close(&self) {
        self.ready.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Number of queued events.
    pub(crate) fn len(&self) -> usize {
        self.lock().len as usize
    }

    /// Ready when there may be something to drain; takes the signal. Only the session task
    /// polls its outbox (the waker slot holds one task).
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.ready.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        // Registered before the second look, so a signal between the two is not lost.
        self.waker.register(cx.waker());
        if self.ready.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Completes when there may be something to drain.
    #[cfg(test)]
    pub(crate) async fn ready(&self) {
        poll_fn(|cx| self.poll_ready(cx)).await;
    }

    /// Ready when a discarding close has been requested (a graceful one lets writes finish).
    /// Leaves the `ready` signal for the next [`Outbox::poll_ready`].
    pub(crate) fn poll_closing(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.lock().close.is_some_and(|r| !drains_first(r)) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Completes when a discarding close has been requested.
    pub(crate) async fn closing(&self) {
        poll_fn(|cx| self.poll_closing(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Routing, Severity, TenantId};
    use bytes::Bytes;
    use std::collections::BTreeMap;
    use std::time::Instant;

    fn ev(seq: u64, sev: Option<Severity>) -> Arc<Published> {
        let routing = Routing {
            tenant: TenantId::new("t").expect("tenant"),
            event_type: EventType::AlertReceived,
            severity: sev,
            state: None,
            source: None,
            affected_resources: vec![],
            incident_id: None,
            labels: BTreeMap::new(),
        };
        Arc::new(Published {
            id: MessageId { epoch: 1, seq },
            priority: routing.priority(),
            routing,
            frame: Bytes::from(format!("{seq}")),
            published_at: Instant::now(),
        })
    }

    fn seqs(v: &[Arc<Published>]) -> Vec<u64> {
        v.iter().map(|e| e.id.seq).collect()
    }

    #[test]
    fn drains_in_publish_order_across_priorities() {
        let o = Outbox::new(10);
        for (s, sev) in [(1, Severity::P4), (2, Severity::P0), (3, Severity::P2), (4, Severity::P4), (5, Severity::P1)]
        {
            assert!(o.push(&ev(s, Some(sev))).queued);
        }
        let mut out = vec![];
        let d = o.drain(&mut out, 3);
        assert!(d.close.is_none() && d.lagged.is_none());
        assert_eq!(seqs(&out), vec![1, 2, 3]);
        out.clear();
        o.drain(&mut out, 10);
        assert_eq!(seqs(&out), vec![4, 5]);
    }

    #[tokio::test]
    async fn a_burst_is_queued_in_order_with_one_wake_and_shedding_counted() {
        let o = Outbox::new(3);
        let burst: Vec<_> = (1..=5).map(|s| ev(s, Some(Severity::P2))).collect();
        assert_eq!(o.push_all(&burst), PushOutcome { queued: true, dropped: 2 });
        // One stored permit: the session wakes once, then finds nothing more to wait for.
        tokio::time::timeout(std::time::Duration::from_secs(1), o.ready()).await.expect("woken");
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), o.ready()).await.is_err());
        let mut out = vec![];
        let d = o.drain(&mut out, 10);
        assert_eq!(seqs(&out), vec![1, 2, 3]);
        assert_eq!(d.lagged, Some((2, MessageId { epoch: 1, seq: 4 })));
    }

    #[test]
    fn sheds_lowest_priority_first_and_reports_lagged() {
        let o = Outbox::new(3);
        o.push(&ev(1, Some(Severity::P4)));
        o.push(&ev(2, Some(Severity::P1)));
        o.push(&ev(3, Some(Severity::P4)));
        // Full: a P0 evicts the oldest low event (1).
        assert_eq!(o.push(&ev(4, Some(Severity::P0))), PushOutcome { queued: true, dropped: 1 });
        // A low event cannot evict anything of higher priority: it is the one shed.
        o.push(&ev(5, Some(Severity::P2)));
        assert_eq!(o.push(&ev(6, Some(Severity::P4))), PushOutcome { queued: false, dropped: 1 });
        let mut out = vec![];
        let d = o.drain(&mut out, 10);
        assert_eq!(seqs(&out), vec![2, 4, 5]);
        assert_eq!(d.lagged, Some((3, MessageId { epoch: 1, seq: 1 })));
        assert!(d.close.is_none());
        // Reported once.
        out.clear();
        assert!(o.drain(&mut out, 10).lagged.is_none());
    }

    #[test]
    fn a_connection_that_never_catches_up_is_closed_as_slow() {
        let o = Outbox::new(4);
        let mut dropped = 0;
        for s in 1..=9 {
            dropped += o.push(&ev(s, Some(Severity::P3))).dropped;
        }
        // 4 queued, 5 shed: more than a queue's worth, so it is closed and the queue discarded;
        // the final lagged covers every lost event from the first one on.
        let mut out = vec![];
        let d = o.drain(&mut out, 10);
        assert_eq!(d.close, Some(CloseReason::SlowConsumer));
        assert!(out.is_empty());
        assert_eq!(dropped, 9);
        assert_eq!(d.lagged, Some((9, MessageId { epoch: 1, seq: 1 })));
        let late = o.push(&ev(10, Some(Severity::P0)));
        assert_eq!(late, PushOutcome { queued: false, dropped: 1 });
        assert_eq!(o.drain(&mut out, 10).lagged, Some((1, MessageId { epoch: 1, seq: 10 })));
    }

    #[test]
    fn catching_up_resets_the_slow_budget() {
        let o = Outbox::new(2);
        for round in 0..10u64 {
            for s in 0..4 {
                o.push(&ev(round * 10 + s, Some(Severity::P3)));
            }
            let mut out = vec![];
            let d = o.drain(&mut out, 10);
            assert!(d.close.is_none(), "round {round}");
            assert_eq!(d.lagged.map(|l| l.0), Some(2));
        }
    }

    #[test]
    fn a_full_queue_of_critical_events_closes_on_the_next_critical() {
        let o = Outbox::new(2);
        o.push(&ev(1, Some(Severity::P0)));
        o.push(&ev(2, Some(Severity::P0)));
        let r = o.push(&ev(3, Some(Severity::P0)));
        assert!(!r.queued);
        assert_eq!(r.dropped, 3);
        let mut out = vec![];
        assert_eq!(o.drain(&mut out, 10).close, Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn a_cutting_close_discards_and_reports_the_queue() {
        let o = Outbox::new(4);
        o.push(&ev(1, None));
        o.push(&ev(2, None));
        assert_eq!(o.request_close(CloseReason::RateLimited), 2);
        o.request_close(CloseReason::SlowConsumer);
        let mut out = vec![];
        let d = o.drain(&mut out, 10);
        assert_eq!(d.close, Some(CloseReason::RateLimited), "the first reason wins");
        assert_eq!(d.lagged, Some((2, MessageId { epoch: 1, seq: 1 })));
        assert!(out.is_empty());
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn a_graceful_close_lets_queued_events_out_first() {
        let o = Outbox::new(4);
        o.push(&ev(1, None));
        o.push(&ev(2, None));
        let shutdown = CloseReason::Shutdown { reconnect_after_ms: 1000 };
        assert_eq!(o.request_close(shutdown), 0);
        // Nothing new is queued once closing; the loss is reported.
        assert!(!o.push(&ev(3, None)).queued);
        let mut out = vec![];
        let d = o.drain(&mut out, 1);
        assert_eq!((seqs(&out), d.close), (vec![1], None));
        assert_eq!(d.lagged, Some((1, MessageId { epoch: 1, seq: 3 })));
        out.clear();
        let d = o.drain(&mut out, 10);
        assert_eq!(seqs(&out), vec![2]);
        assert_eq!(d.close, Some(shutdown));
    }

    #[test]
    fn unsent_events_are_reported() {
        let o = Outbox::new(4);
        o.push(&ev(5, None));
        o.push(&ev(6, None));
        let mut out = vec![];
        o.drain(&mut out, 10);
        assert_eq!(o.last_queued(), Some(MessageId { epoch: 1, seq: 6 }));
        o.record_unsent(&out);
        out.clear();
        assert_eq!(o.drain(&mut out, 10).lagged, Some((2, MessageId { epoch: 1, seq: 5 })));
    }

    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl futures_util::task::ArcWake for CountWakes {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiting_session_is_woken_once_until_it_looks_and_always_for_a_close() {
        let o = Outbox::new(2);
        let wakes = Arc::new(CountWakes(std::sync::atomic::AtomicUsize::new(0)));
        let waker = futures_util::task::waker(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let woken = || wakes.0.load(Ordering::SeqCst);
        assert!(o.poll_ready(&mut cx).is_pending());
        assert!(o.push(&ev(1, None)).queued);
        assert_eq!(woken(), 1, "the first event wakes the session");
        // The session is now blocked in a write: it waits on the close signal, not on `ready`.
        assert!(o.poll_closing(&mut cx).is_pending());
        assert!(o.push(&ev(2, None)).queued);
        assert_eq!(o.push(&ev(3, None)).dropped, 1, "the queue holds 2");
        assert_eq!(woken(), 1, "pushes it has not looked at yet do not wake it again");
        // A close always gets through, and interrupts the write.
        o.request_close(CloseReason::SlowConsumer);
        assert_eq!(woken(), 2);
        assert!(o.poll_closing(&mut cx).is_ready());
        // What was signalled is still there for the loop.
        assert!(o.poll_ready(&mut cx).is_ready());
        assert!(o.poll_ready(&mut cx).is_pending(), "taken once");
    }

    #[test]
    fn the_queues_are_allocated_on_the_first_push_and_released_when_idle() {
        let o = Outbox::new(4);
        assert!(o.lock().queues.is_none(), "a connection that never got an event keeps no queue");
        o.push(&ev(1, Some(Severity::P0)));
        o.release_idle();
        assert!(o.lock().queues.is_some(), "not released while an event waits");
        let mut out = vec![];
        o.drain(&mut out, 10);
        assert_eq!(seqs(&out), [1]);
        o.release_idle();
        assert!(o.lock().queues.is_none());
        // And it works as before afterwards.
        o.push(&ev(2, None));
        out.clear();
        o.drain(&mut out, 10);
        assert_eq!(seqs(&out), [2]);
    }
}

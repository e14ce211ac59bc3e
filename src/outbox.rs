//! One connection's bounded outbound queue, shared by the fan-out (which pushes without ever
//! waiting) and the session task (which drains it into the socket).
//!
//! Overflow is a counted, typed outcome, never a silent drop: when the queue is full the oldest
//! event of the lowest queued priority is shed if the new one outranks it, otherwise the new one is
//! shed; the next drain reports the loss as `lagged`. A connection that loses more than a whole
//! queue's worth without catching up, or that would have to shed a critical event, is marked
//! for closing as a slow consumer (4008). The lock is a short synchronous one, never held across
//! `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

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

#[derive(Default)]
struct State {
    queues: [VecDeque<Arc<Published>>; Priority::COUNT],
    len: usize,
    dropped: u64,
    first_dropped: Option<MessageId>,
    dropped_since_caught_up: usize,
    close: Option<CloseReason>,
}

impl State {
    fn record_drop(&mut self, id: MessageId, capacity: usize) {
        self.dropped += 1;
        self.first_dropped = Some(self.first_dropped.map_or(id, |f| f.min(id)));
        self.dropped_since_caught_up += 1;
        if self.dropped_since_caught_up > capacity {
            self.close.get_or_insert(CloseReason::SlowConsumer);
        }
    }

    /// Empties the queue (on close); returns how many events were discarded.
    fn discard_all(&mut self) -> u64 {
        let n = self.len as u64;
        for q in &mut self.queues {
            *q = VecDeque::new();
        }
        self.len = 0;
        n
    }
}

/// The queue itself. See the module docs.
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Woken when there is something to drain (events, lagged, or a close).
    ready: Notify,
    /// Woken when a close is requested, to interrupt a write blocked on a full socket.
    closing: Notify,
    capacity: usize,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Outbox {
        Outbox { state: Mutex::new(State::default()), ready: Notify::new(), closing: Notify::new(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent in a way that
        // matters more than losing the connection, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event; never blocks beyond the short lock.
    pub(crate) fn push(&self, ev: &Arc<Published>) -> PushOutcome {
        let mut st = self.lock();
        if st.close.is_some() {
            return PushOutcome { queued: false, dropped: 0 };
        }
        let was_empty = st.len == 0;
        let prio = ev.priority as usize;
        let mut outcome = PushOutcome { queued: true, dropped: 0 };
        if st.len < self.capacity {
            st.queues[prio].push_back(Arc::clone(ev));
            st.len += 1;
        } else {
            let lowest = st.queues.iter().position(|q| !q.is_empty()).unwrap_or(prio);
            if lowest < prio {
                if let Some(evicted) = st.queues[lowest].pop_front() {
                    st.record_drop(evicted.id, self.capacity);
                }
                st.queues[prio].push_back(Arc::clone(ev));
                outcome.dropped = 1;
            } else if ev.priority == Priority::Critical {
                // Nothing left to shed but critical events: the client cannot keep up.
                st.close.get_or_insert(CloseReason::SlowConsumer);
                st.record_drop(ev.id, self.capacity);
                outcome = PushOutcome { queued: false, dropped: 1 };
            } else {
                st.record_drop(ev.id, self.capacity);
                outcome = PushOutcome { queued: false, dropped: 1 };
            }
        }
        let closing = st.close.is_some();
        if closing {
            outcome.dropped += st.discard_all();
        }
        drop(st);
        if closing {
            self.closing.notify_one();
            self.ready.notify_one();
        } else if was_empty || outcome.dropped > 0 {
            self.ready.notify_one();
        }
        outcome
    }

    /// Asks the session to close (the first reason wins). Returns the number of queued events
    /// discarded.
    pub(crate) fn request_close(&self, reason: CloseReason) -> u64 {
        let mut st = self.lock();
        st.close.get_or_insert(reason);
        let n = st.discard_all();
        drop(st);
        self.closing.notify_one();
        self.ready.notify_one();
        n
    }

    /// Takes up to `max` events in publish order into `out`, with any pending lagged notice or
    /// close request.
    pub(crate) fn drain(&self, out: &mut Vec<Arc<Published>>, max: usize) -> Drain {
        let mut st = self.lock();
        let mut d = Drain { close: st.close, ..Drain::default() };
        if st.dropped > 0 {
            if let Some(first) = st.first_dropped.take() {
                d.lagged = Some((st.dropped, first));
            }
            st.dropped = 0;
        }
        if d.close.is_some() {
            return d;
        }
        while out.len() < max && st.len > 0 {
            // The next event in publish order is the smallest id among the queue heads.
            let next =
                st.queues.iter().enumerate().filter_map(|(i, q)| q.front().map(|e| (e.id, i))).min().map(|(_, i)| i);
            let Some(i) = next else { break };
            if let Some(e) = st.queues[i].pop_front() {
                out.push(e);
                st.len -= 1;
            }
        }
        if st.len == 0 {
            st.dropped_since_caught_up = 0;
        }
        d
    }

    /// Wakes the session task so it drains again (used when a drain left events behind).
    pub(crate) fn wake(&self) {
        self.ready.notify_one();
    }

    /// Number of queued events.
    pub(crate) fn len(&self) -> usize {
        self.lock().len
    }

    /// Completes when there may be something to drain.
    pub(crate) async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Completes when a close has been requested.
    pub(crate) async fn closing(&self) {
        loop {
            let notified = self.closing.notified();
            if self.lock().close.is_some() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Routing, Severity, TenantId};
    use axum::extract::ws::Utf8Bytes;
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
            frame: Utf8Bytes::from(format!("{seq}")),
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
        // 4 queued, 5 shed: more than a queue's worth, so it is closed and the queue discarded.
        let mut out = vec![];
        let d = o.drain(&mut out, 10);
        assert_eq!(d.close, Some(CloseReason::SlowConsumer));
        assert!(out.is_empty());
        assert_eq!(dropped, 9);
        assert_eq!(d.lagged.map(|l| l.0), Some(5));
        assert!(!o.push(&ev(10, Some(Severity::P0))).queued);
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
    fn request_close_wins_over_queued_events() {
        let o = Outbox::new(4);
        o.push(&ev(1, None));
        assert_eq!(o.request_close(CloseReason::IdleTimeout), 1);
        o.request_close(CloseReason::SlowConsumer);
        let mut out = vec![];
        assert_eq!(o.drain(&mut out, 10).close, Some(CloseReason::IdleTimeout));
        assert_eq!(o.len(), 0);
    }
}

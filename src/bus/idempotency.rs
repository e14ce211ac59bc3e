//! Idempotent publishes: a publisher that did not get its answer (a timeout, a dropped
//! connection, a 503 after the broker may have stored the batch) retries with the same
//! `Idempotency-Key` and gets the ids of the first attempt instead of a second copy.
//!
//! Keys are scoped to the publishing token's tenant, so one tenant's key never matches another's.
//! On the NATS bus the stream deduplicates (`Nats-Msg-Id` = `<tenant>:<key>:<index>`, within the
//! stream's duplicate window); on the local bus [`Remembered`] keeps the answers for the same
//! window, bounded in count. This module is pure.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::event::{MessageId, TenantId};

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 128;

/// A validated key in its tenant's scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    tenant: TenantId,
    key: String,
}

/// A header value that cannot be a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters")]
pub struct InvalidKey;

impl IdempotencyKey {
    /// Validates `key` (1–128 visible ASCII characters, no spaces) for `tenant`.
    pub fn new(tenant: &TenantId, key: &str) -> Result<IdempotencyKey, InvalidKey> {
        let ok = !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(IdempotencyKey { tenant: tenant.clone(), key: key.to_owned() })
        } else {
            Err(InvalidKey)
        }
    }

    /// The broker's message id of the batch's `index`-th event.
    pub fn message_id(&self, index: usize) -> String {
        format!("{}:{}:{index}", self.tenant, self.key)
    }
}

/// The answers of keyed publishes for `ttl`, at most `capacity` of them (the oldest go first).
#[derive(Debug)]
pub struct Remembered {
    answers: HashMap<IdempotencyKey, Vec<MessageId>>,
    order: VecDeque<(Instant, IdempotencyKey)>,
    ttl: Duration,
    capacity: usize,
}

impl Remembered {
    /// Empty, keeping answers for `ttl`, at most `capacity` (0: keep none).
    pub fn new(ttl: Duration, capacity: usize) -> Remembered {
        Remembered { answers: HashMap::new(), order: VecDeque::new(), ttl, capacity }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) <= self.ttl && self.order.len() <= self.capacity {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.answers.remove(&key);
            }
        }
    }

    /// The ids a publish with this key got, if within the window.
    pub fn get(&mut self, key: &IdempotencyKey, now: Instant) -> Option<Vec<MessageId>> {
        self.expire(now);
        self.answers.get(key).cloned()
    }

    /// Remembers a publish's ids under its key.
    pub fn put(&mut self, key: IdempotencyKey, ids: Vec<MessageId>, now: Instant) {
        if self.capacity == 0 || self.answers.contains_key(&key) {
            return;
        }
        self.answers.insert(key.clone(), ids);
        self.order.push_back((now, key));
        self.expire(now);
    }

    /// Answers held.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).expect("tenant")
    }

    fn ids(n: u64) -> Vec<MessageId> {
        (1..=n).map(|seq| MessageId { epoch: 1, seq }).collect()
    }

    #[test]
    fn keys_are_visible_ascii_and_scoped_to_their_tenant() {
        assert!(IdempotencyKey::new(&t("acme"), "order-42/retry").is_ok());
        for bad in ["", "has space", "tab\there", "ünï", &"k".repeat(129)] {
            assert_eq!(IdempotencyKey::new(&t("acme"), bad), Err(InvalidKey), "{bad:?}");
        }
        let a = IdempotencyKey::new(&t("acme"), "k").expect("key");
        let g = IdempotencyKey::new(&t("globex"), "k").expect("key");
        assert_ne!(a, g);
        assert_eq!(a.message_id(3), "acme:k:3");
    }

    #[test]
    fn answers_are_kept_for_the_window_and_bounded_in_count() {
        let now = Instant::now();
        let mut r = Remembered::new(Duration::from_secs(10), 2);
        let key = |s: &str| IdempotencyKey::new(&t("acme"), s).expect("key");
        r.put(key("a"), ids(2), now);
        assert_eq!(r.get(&key("a"), now + Duration::from_secs(9)), Some(ids(2)));
        assert_eq!(r.get(&IdempotencyKey::new(&t("globex"), "a").expect("key"), now), None, "other tenant");
        r.put(key("a"), ids(5), now);
        assert_eq!(r.get(&key("a"), now), Some(ids(2)), "the first answer stays");
        assert_eq!(r.get(&key("a"), now + Duration::from_secs(11)), None, "expired");
        assert!(r.is_empty());
        r.put(key("b"), ids(1), now);
        r.put(key("c"), ids(1), now);
        r.put(key("d"), ids(1), now);
        assert_eq!(r.len(), 2, "the oldest goes beyond the capacity");
        assert_eq!(r.get(&key("b"), now), None);
        assert_eq!(r.get(&key("d"), now), Some(ids(1)));
    }
}

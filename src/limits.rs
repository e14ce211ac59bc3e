//! Rate limits with governor, keyed and bounded.
//!
//! A keyed limiter keeps one small state per key. Keys come from outside (client addresses,
//! token subjects), so their number is bounded here rather than trusted: a sweep drops every key
//! whose state is indistinguishable from a fresh one (governor's `retain_recent`), runs
//! periodically and whenever the table is full, and while it is still full after a sweep, keys
//! not in the table share one overflow bucket ([`BoundedStore`], a governor state store); keys
//! already tracked keep their own. A spray of distinct keys therefore costs at most `max_keys`
//! states, can only make the limit stricter for the sprayer, and cannot push clients that are
//! already tracked into the sprayer's bucket.
//!
//! IPv6 clients are keyed by their /64 (one subscriber line holds a whole /64).
//!
//! [`Limiters`] holds the service's keyed limiters: the pre-authentication one per client
//! address (from the configuration: it protects the token check itself) and per tenant, from the
//! tenant's policy, new connections per minute per subject and published events per second.
//! A tenant's limiters are rebuilt when its policy changes its quotas and kept (with their state)
//! otherwise.
//!
//! A connection's own message rate is a [`Gcra`]: the same algorithm governor implements, over
//! one 8-byte timestamp, because every connection keeps one for its whole life and governor's
//! direct limiter, with its clock, takes 72 bytes.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::direct::NotKeyed;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, StateStore};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::event::TenantId;
use crate::policy::{Limits, PolicySet};

/// How often a full table may be swept on the request path.
const SWEEP_ON_FULL_EVERY: Duration = Duration::from_secs(1);

/// Why a check refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Over the rate: try again after this long.
    Wait(Duration),
    /// The request is larger than the burst and can never pass (a batch over `publish_burst`).
    TooLarge {
        /// The burst.
        burst: u32,
    },
}

impl Refused {
    /// Whole seconds for `Retry-After` (at least 1).
    pub fn retry_after_secs(self) -> u64 {
        match self {
            Refused::Wait(d) => (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1),
            Refused::TooLarge { .. } => 1,
        }
    }
}

/// A governor state store holding at most `max_keys` keys (give or take the checks racing at the
/// moment it fills): a key it does not hold while full is measured against one shared overflow
/// state instead of being inserted.
pub struct BoundedStore<K: Hash + Eq + Clone> {
    keys: DashMapStateStore<K>,
    overflow: InMemoryState,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if self.keys.len() < self.max_keys || self.keys.contains_key(key) {
            self.keys.measure_and_replace(key, f)
        } else {
            self.overflow.measure_and_replace(&NotKeyed::NonKey, f)
        }
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.keys.retain_recent(drop_below);
    }
    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&self.keys);
    }
    fn len(&self) -> usize {
        self.keys.len()
    }
    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A keyed limiter with a bounded number of keys.
pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: RateLimiter<K, BoundedStore<K>, DefaultClock>,
    max_keys: usize,
    last_full_sweep: Mutex<Option<Instant>>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A limiter with `quota` per key, tracking at most `max_keys` keys.
    pub fn new(quota: Quota, max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        let store = BoundedStore { keys: DashMapStateStore::default(), overflow: InMemoryState::default(), max_keys };
        KeyedLimiter {
            limiter: RateLimiter::new(quota, store, DefaultClock::default()),
            max_keys,
            last_full_sweep: Mutex::new(None),
            clock: DefaultClock::default(),
        }
    }

    /// Takes `n` cells for `key`.
    pub fn check_n(&self, key: &K, n: NonZeroU32) -> Result<(), Refused> {
        if self.limiter.len() >= self.max_keys {
            self.sweep_when_full();
        }
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(not_until)) => Err(Refused::Wait(not_until.wait_time_from(self.clock.now()))),
            Err(governor::InsufficientCapacity(burst)) => Err(Refused::TooLarge { burst }),
        }
    }

    /// Takes one cell for `key`.
    pub fn check(&self, key: &K) -> Result<(), Refused> {
        self.check_n(key, NonZeroU32::MIN)
    }

    /// Sweeps a full table, at most once per [`SWEEP_ON_FULL_EVERY`].
    fn sweep_when_full(&self) {
        {
            let mut last = self.last_full_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < SWEEP_ON_FULL_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.sweep();
    }

    /// Drops every key whose state is the same as a fresh key's, and frees the room.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys currently held.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// The key of a client address: the address itself for IPv4, the /64 for IPv6.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// A tenant's limiters, built from its limits.
struct TenantLimiters {
    limits: Limits,
    connects: KeyedLimiter<Box<str>>,
    publish: DefaultDirectRateLimiter,
}

impl TenantLimiters {
    fn new(limits: Limits, max_keys: usize) -> Self {
        let per_minute = nz(limits.connects_per_minute_per_subject);
        // A full minute's allowance may be used at once; it then refills evenly over the minute.
        let connects = Quota::per_minute(per_minute).allow_burst(per_minute);
        let publish = Quota::per_second(nz(limits.publishes_per_second)).allow_burst(nz(limits.publish_burst));
        TenantLimiters {
            limits,
            connects: KeyedLimiter::new(connects, max_keys),
            publish: RateLimiter::direct(publish),
        }
    }

    fn same_quotas(&self, l: &Limits) -> bool {
        let a = &self.limits;
        a.connects_per_minute_per_subject == l.connects_per_minute_per_subject
            && a.publishes_per_second == l.publishes_per_second
            && a.publish_burst == l.publish_burst
    }
}

/// The service's keyed limiters.
pub(crate) struct Limiters {
    ip: Option<KeyedLimiter<IpAddr>>,
    tenants: RwLock<HashMap<TenantId, Arc<TenantLimiters>>>,
    max_keys: usize,
}

impl Limiters {
    /// `ip_quota`: the pre-authentication limit per client address (`None`: off).
    pub(crate) fn new(ip_quota: Option<Quota>, max_keys: usize) -> Limiters {
        Limiters {
            ip: ip_quota.map(|q| KeyedLimiter::new(q, max_keys)),
            tenants: RwLock::new(HashMap::new()),
            max_keys,
        }
    }

    /// The pre-authentication check for a client address.
    pub(crate) fn check_ip(&self, ip: IpAddr) -> Result<(), Refused> {
        self.ip.as_ref().map_or(Ok(()), |l| l.check(&ip_key(ip)))
    }

    /// The tenant's limiters, created on first use from `limits`. Quota changes are applied by
    /// [`Limiters::sync`] when a reload installs a set, not here: a request still holding the
    /// previous set must not rebuild (and so reset) the limiters back and forth.
    fn tenant(&self, tenant: &TenantId, limits: &Limits) -> Arc<TenantLimiters> {
        if let Some(t) = self.tenants.read().unwrap_or_else(|p| p.into_inner()).get(tenant) {
            return Arc::clone(t);
        }
        let mut map = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(tenant.clone()).or_insert_with(|| Arc::new(TenantLimiters::new(*limits, self.max_keys))))
    }

    /// A new connection of `subject`: `connects_per_minute_per_subject`.
    pub(crate) fn check_connect(&self, tenant: &TenantId, subject: &str, limits: &Limits) -> Result<(), Refused> {
        self.tenant(tenant, limits).connects.check(&Box::from(subject))
    }

    /// `n` published events of `tenant`: `publishes_per_second` with `publish_burst`.
    pub(crate) fn check_publish(&self, tenant: &TenantId, n: usize, limits: &Limits) -> Result<(), Refused> {
        let t = self.tenant(tenant, limits);
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        match t.publish.check_n(nz(n)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Refused::Wait(not_until.wait_time_from(t.publish.clock().now()))),
            Err(governor::InsufficientCapacity(burst)) => Err(Refused::TooLarge { burst }),
        }
    }

    /// When a reload installs `set`: forgets tenants that no longer have a policy and rebuilds
    /// the limiters whose quotas changed (the others keep their state).
    pub(crate) fn sync(&self, set: &PolicySet) {
        let mut map = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|t, _| set.get(t).is_some());
        for (t, limiters) in map.iter_mut() {
            if let Some(policy) = set.get(t) {
                if !limiters.same_quotas(&policy.limits) {
                    *limiters = Arc::new(TenantLimiters::new(policy.limits, self.max_keys));
                }
            }
        }
    }

    /// Drops stale keys everywhere (run periodically).
    pub(crate) fn sweep(&self) {
        if let Some(ip) = &self.ip {
            ip.sweep();
        }
        let tenants: Vec<_> = self.tenants.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for t in tenants {
            t.connects.sweep();
        }
    }

    /// Keys held by every keyed limiter (for the `rate_limiter_tracked_keys` gauge).
    pub(crate) fn tracked_keys(&self) -> usize {
        let tenants: usize =
            self.tenants.read().unwrap_or_else(|p| p.into_inner()).values().map(|t| t.connects.len()).sum();
        self.ip.as_ref().map_or(0, KeyedLimiter::len) + tenants
    }
}

/// A rate limit over one timestamp: the generic cell rate algorithm. A cell is admitted if the
/// bucket, refilled at `per_second` and holding `burst` cells, has one; the state is the
/// theoretical arrival time of the next cell. Limits are passed to each check, so a policy change
/// takes effect without rebuilding anything.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Gcra {
    /// Nanoseconds since the caller's epoch at which the bucket is full again.
    tat: u64,
}

impl Gcra {
    /// Admits one cell at `now_ns` (nanoseconds since the caller's fixed epoch, never going
    /// back). A limit of 0 counts as 1.
    pub(crate) fn check(&mut self, now_ns: u64, per_second: u32, burst: u32) -> bool {
        let interval = (1_000_000_000 / u64::from(per_second.max(1))).max(1);
        let capacity = interval.saturating_mul(u64::from(burst.max(1)));
        let next = self.tat.max(now_ns).saturating_add(interval);
        if next - now_ns > capacity {
            return false;
        }
        self.tat = next;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn a_key_gets_its_burst_then_waits() {
        let l = KeyedLimiter::new(Quota::per_second(nz(2)).allow_burst(nz(3)), 100);
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        for _ in 0..3 {
            assert_eq!(l.check(&a), Ok(()));
        }
        let Err(Refused::Wait(d)) = l.check(&a) else { panic!("the fourth is refused") };
        assert!(d > Duration::ZERO && d <= Duration::from_millis(500), "{d:?}");
        assert_eq!(Refused::Wait(d).retry_after_secs(), 1);
        assert_eq!(l.check(&b), Ok(()), "another key is unaffected");
    }

    #[test]
    fn a_spray_of_distinct_keys_stays_bounded_and_cannot_lift_the_limit() {
        const MAX: usize = 1_000;
        // 1 per minute, burst 1: a sprayed key stays "recent" for a minute, so sweeps cannot
        // make room and the table must cap itself.
        let l = KeyedLimiter::new(Quota::per_minute(nz(1)), MAX);
        let mut allowed = 0u32;
        for i in 0..200_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            if l.check(&ip).is_ok() {
                allowed += 1;
            }
            assert!(l.len() <= MAX + 1, "keys held: {} at {i}", l.len());
        }
        // Every tracked key got its one, then the overflow bucket let one more through.
        assert!(allowed as usize <= MAX + 2, "{allowed} passed");
        // Keys that are indistinguishable from fresh are swept.
        let fast = KeyedLimiter::new(Quota::per_second(nz(1_000_000)), MAX);
        for i in 0..10_000u32 {
            let _ = fast.check(&IpAddr::V4(Ipv4Addr::from(i)));
        }
        std::thread::sleep(Duration::from_millis(5));
        fast.sweep();
        assert_eq!(fast.len(), 0);
    }

    #[test]
    fn tracked_keys_keep_their_own_bucket_while_a_spray_fills_the_table() {
        const MAX: usize = 100;
        let l = KeyedLimiter::new(Quota::per_minute(nz(1)).allow_burst(nz(3)), MAX);
        let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(l.check(&client), Ok(()));
        for i in 0..10_000u32 {
            let _ = l.check(&IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert!(l.len() <= MAX + 1);
        // The overflow bucket is exhausted by the spray, the tracked client is not.
        assert!(l.check(&IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1))).is_err());
        assert_eq!(l.check(&client), Ok(()));
        assert_eq!(l.check(&client), Ok(()));
        assert!(l.check(&client).is_err(), "and its own limit still holds");
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        assert_eq!(ip_key(a), ip_key(b));
        assert_eq!(ip_key(a), IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 0)));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(ip_key(mapped), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
    }

    #[test]
    fn tenant_limiters_follow_policy_changes() {
        let limiters = Limiters::new(None, 100);
        let acme = TenantId::new("acme").expect("tenant");
        let mut limits = Limits {
            connects_per_minute_per_subject: 2,
            publishes_per_second: 1,
            publish_burst: 5,
            ..Limits::default()
        };
        assert!(limiters.check_connect(&acme, "alice", &limits).is_ok());
        assert!(limiters.check_connect(&acme, "alice", &limits).is_ok());
        assert!(matches!(limiters.check_connect(&acme, "alice", &limits), Err(Refused::Wait(_))));
        assert!(limiters.check_connect(&acme, "bob", &limits).is_ok());
        // A caller's limits never rebuild the limiters; a reload's sync does, and only when the
        // quotas changed.
        let set = |text: &str| {
            let defaults = std::path::Path::new("_defaults.toml");
            let files = vec![(std::path::PathBuf::from("acme.toml"), format!("tenant = \"acme\"\n{text}"))];
            PolicySet::parse((defaults, ""), &files).expect("valid")
        };
        limits.connects_per_minute_per_subject = 3;
        assert!(limiters.check_connect(&acme, "alice", &limits).is_err(), "no rebuild from a request");
        limiters.sync(&set("[limits]\nconnects_per_minute_per_subject = 2\npublishes_per_second = 1\npublish_burst = 5\nmax_connections = 7\n"));
        assert!(limiters.check_connect(&acme, "alice", &limits).is_err(), "same quotas: state kept");
        limiters
            .sync(&set("[limits]\nconnects_per_minute_per_subject = 3\npublishes_per_second = 1\npublish_burst = 5\n"));
        assert!(limiters.check_connect(&acme, "alice", &limits).is_ok(), "changed quotas: afresh");
        assert_eq!(limiters.check_publish(&acme, 6, &limits), Err(Refused::TooLarge { burst: 5 }));
        assert_eq!(limiters.check_publish(&acme, 5, &limits), Ok(()));
        assert!(matches!(limiters.check_publish(&acme, 1, &limits), Err(Refused::Wait(_))));
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn gcra_admits_the_burst_at_once_then_one_per_interval() {
        let mut g = Gcra::default();
        let t0 = 5 * S;
        assert!((0..3).all(|_| g.check(t0, 2, 3)), "a burst of 3");
        assert!(!g.check(t0, 2, 3), "the 4th at once is refused");
        assert!(!g.check(t0 + S / 2 - 1, 2, 3), "not before an interval (0.5 s) passed");
        assert!(g.check(t0 + S / 2, 2, 3), "one cell back after 0.5 s");
        assert!(!g.check(t0 + S / 2, 2, 3));
        // A refusal costs nothing: after a long quiet the whole burst is back, not more.
        let later = t0 + 100 * S;
        assert_eq!((0..10).filter(|_| g.check(later, 2, 3)).count(), 3);
    }

    #[test]
    fn gcra_at_a_steady_rate_never_refuses_and_above_it_refuses_the_excess() {
        let mut g = Gcra::default();
        // 10 per second, burst 1: one every 100 ms passes, for a minute.
        assert!((0..600u64).all(|i| g.check(S + i * S / 10, 10, 1)));
        // 20 per second offered for 10 s against 10 per second with burst 5: 100 + 5 pass.
        let mut g = Gcra::default();
        let start = 1000 * S;
        let passed = (0..200u64).filter(|i| g.check(start + i * S / 20, 10, 5)).count();
        assert!((104..=106).contains(&passed), "{passed}");
    }

    #[test]
    fn gcra_takes_new_limits_at_the_next_check_and_treats_zero_as_one() {
        let mut g = Gcra::default();
        assert!(g.check(S, 1, 1));
        assert!(!g.check(S, 1, 1));
        // A raised burst applies at once, to the same state.
        assert!(g.check(S, 1, 5));
        let mut z = Gcra::default();
        assert!(z.check(S, 0, 0));
        assert!(!z.check(S, 0, 0));
        assert!(z.check(2 * S, 0, 0));
        // A rate above a billion per second still advances (no zero interval).
        let mut fast = Gcra::default();
        assert!(fast.check(S, u32::MAX, 1));
        assert!(!fast.check(S, u32::MAX, 1));
    }
}

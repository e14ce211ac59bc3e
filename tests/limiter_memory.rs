//! Keyed limiter memory under a spray of distinct keys, measured as this process's resident
//! memory (`/proc/self/statm`; the only test of its binary, so nothing else allocates meanwhile).
//! One million distinct client addresses against the service's bounded limiter (10,000 keys),
//! beside the same spray into a plain governor keyed limiter for contrast. Prints the figures
//! (quoted in docs/BENCHMARKS.md); asserts the bound on keys and a generous bound on memory,
//! never a time.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;

use governor::{Quota, RateLimiter};
use incident_stream::limits::KeyedLimiter;

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("resident pages");
    pages * 4
}

fn addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

const MAX_KEYS: usize = 10_000;
const SPRAY: u32 = 1_000_000;

fn quota() -> Quota {
    // The service's default address limit: 20/s, burst 40.
    Quota::per_second(NonZeroU32::new(20).expect("nz")).allow_burst(NonZeroU32::new(40).expect("nz"))
}

#[test]
fn a_million_distinct_addresses_stay_within_the_bound() {
    let before = rss_kib();
    let limiter = KeyedLimiter::<IpAddr>::new(quota(), MAX_KEYS);
    let mut peak_keys = 0;
    for i in 0..SPRAY {
        let _ = limiter.check(&addr(i));
        if i % 4096 == 0 {
            peak_keys = peak_keys.max(limiter.len());
        }
    }
    peak_keys = peak_keys.max(limiter.len());
    let bounded = rss_kib().saturating_sub(before);

    let plain = RateLimiter::keyed(quota());
    let before_plain = rss_kib();
    for i in 0..SPRAY {
        let _ = plain.check_key(&addr(i));
    }
    let unbounded = rss_kib().saturating_sub(before_plain);
    println!(
        "limiter spray of {SPRAY} distinct addresses: bounded ({MAX_KEYS} keys) +{bounded} KiB resident, \
         peak {peak_keys} keys; plain governor keyed limiter +{unbounded} KiB, {} keys",
        plain.len()
    );
    assert!(peak_keys <= MAX_KEYS + 1, "keys held: {peak_keys}");
    assert_eq!(plain.len(), SPRAY as usize, "the contrast really holds every key");
    // 10,000 keys are well under a MiB; allow allocator slack, but nothing like the spray.
    assert!(bounded < 8 * 1024, "bounded limiter grew {bounded} KiB");
    assert!(bounded * 4 < unbounded, "bounded +{bounded} KiB vs plain +{unbounded} KiB");
}

//! A duration histogram for the delivery path: each thread records into its own shard, and a
//! scrape adds the shards up.
//!
//! Why not `prometheus::Histogram`: every observation there is four atomic read-modify-writes on
//! cache lines shared by every thread (the hot/cold shard counter, the bucket, the sum's
//! compare-and-swap loop, the count). The publish-to-write latency is observed once per delivered
//! frame, so at a fan-out to 10,000 connections those lines bounce between the cores on every
//! write: 2.6 % of the server's CPU in the `fanout-10k` profile. Here an observation is one
//! uncontended add to the observing thread's own shard, and the sum is added once per batch.
//!
//! A scrape reads the shards without stopping writers, so the sum may be one batch ahead of or
//! behind the buckets; the count is always the buckets' total.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto;

/// Shards per histogram: threads beyond this share one (still correct, only contended).
const SHARDS: usize = 8;
/// Most bucket bounds a histogram may have.
pub(super) const MAX_BOUNDS: usize = 15;

/// One thread's counts, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    /// Observations per bucket; the last one is `+Inf`.
    buckets: [AtomicU64; MAX_BOUNDS + 1],
    /// Sum of the observations in nanoseconds.
    sum_nanos: AtomicU64,
}

struct Inner {
    desc: Desc,
    /// Upper bounds in nanoseconds, increasing (for the look-up), and in seconds (for the scrape).
    bounds_nanos: Box<[u64]>,
    bounds_secs: Box<[f64]>,
    shards: Box<[Shard]>,
}

/// A histogram of durations, exposed in seconds. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct ShardedHistogram {
    inner: Arc<Inner>,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard index, handed out round robin on first use.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn shard_index() -> usize {
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        s.get()
    })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl ShardedHistogram {
    /// A histogram with these upper bounds in seconds (increasing, finite, at most
    /// [`MAX_BOUNDS`]); `+Inf` is implied.
    pub fn new(name: &str, help: &str, bounds: Vec<f64>) -> Result<ShardedHistogram, prometheus::Error> {
        if bounds.len() > MAX_BOUNDS {
            return Err(prometheus::Error::Msg(format!("at most {MAX_BOUNDS} buckets, got {}", bounds.len())));
        }
        if bounds.iter().any(|b| !b.is_finite() || *b < 0.0) || bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(prometheus::Error::Msg("bucket bounds must be finite, non-negative and increasing".into()));
        }
        let desc = Desc::new(name.to_owned(), help.to_owned(), vec![], Default::default())?;
        let bounds_nanos = bounds.iter().map(|b| nanos(Duration::from_secs_f64(*b))).collect();
        let shards = (0..SHARDS).map(|_| Shard::default()).collect();
        Ok(ShardedHistogram { inner: Arc::new(Inner { desc, bounds_nanos, bounds_secs: bounds.into(), shards }) })
    }

    fn bucket_of(&self, nanos: u64) -> usize {
        let b = &self.inner.bounds_nanos;
        b.iter().position(|&le| nanos <= le).unwrap_or(b.len())
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        self.observe_nanos([nanos(d)]);
    }

    /// Records `now - t` for every `t` (a time in the future counts as zero).
    pub fn observe_since(&self, now: Instant, times: impl IntoIterator<Item = Instant>) {
        self.observe_nanos(times.into_iter().map(|t| nanos(now.saturating_duration_since(t))));
    }

    /// One add per observation and one for the batch's sum, all on this thread's shard.
    fn observe_nanos(&self, values: impl IntoIterator<Item = u64>) {
        let shard = &self.inner.shards[shard_index()];
        let mut sum = 0u64;
        for n in values {
            sum = sum.saturating_add(n);
            shard.buckets[self.bucket_of(n)].fetch_add(1, Ordering::Relaxed);
        }
        if sum > 0 {
            shard.sum_nanos.fetch_add(sum, Ordering::Relaxed);
        }
    }

    /// Cumulative counts per bound (without `+Inf`), the total count and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let n = self.inner.bounds_nanos.len();
        let mut per_bucket = vec![0u64; n + 1];
        let mut sum_nanos = 0u64;
        for shard in self.inner.shards.iter() {
            for (total, b) in per_bucket.iter_mut().zip(&shard.buckets) {
                *total += b.load(Ordering::Relaxed);
            }
            sum_nanos = sum_nanos.saturating_add(shard.sum_nanos.load(Ordering::Relaxed));
        }
        let mut cumulative = Vec::with_capacity(n);
        let mut running = 0u64;
        for c in &per_bucket[..n] {
            running += c;
            cumulative.push(running);
        }
        let count = running + per_bucket[n];
        (cumulative, count, sum_nanos as f64 / 1e9)
    }
}

impl Collector for ShardedHistogram {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.inner.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let (cumulative, count, sum) = self.snapshot();
        let mut h = proto::Histogram::default();
        h.set_sample_count(count);
        h.set_sample_sum(sum);
        h.set_bucket(
            cumulative
                .iter()
                .zip(self.inner.bounds_secs.iter())
                .map(|(&c, &le)| {
                    let mut b = proto::Bucket::default();
                    b.set_cumulative_count(c);
                    b.set_upper_bound(le);
                    b
                })
                .collect(),
        );
        let mut m = proto::Metric::default();
        m.set_histogram(h);
        let mut family = proto::MetricFamily::default();
        family.set_name(self.inner.desc.fq_name.clone());
        family.set_help(self.inner.desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        family.set_metric(vec![m]);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn observations_land_in_inclusive_buckets_and_add_up_across_threads() {
        let h = ShardedHistogram::new("t_seconds", "test", vec![0.001, 0.01, 0.1]).expect("histogram");
        let now = Instant::now();
        // 0, 1 ms (on the bound: counted in it), 5 ms, 50 ms, 2 s, and one in the future (0).
        h.observe_since(now, [now, now - MS, now - 5 * MS, now - 50 * MS, now - 2000 * MS, now + MS]);
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        h.observe(Duration::from_micros(500));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let (cumulative, count, sum) = h.snapshot();
        assert_eq!(cumulative, vec![3 + 12_000, 4 + 12_000, 5 + 12_000]);
        assert_eq!(count, 6 + 12_000);
        let want = 0.001 + 0.005 + 0.05 + 2.0 + 12_000.0 * 0.0005;
        assert!((sum - want).abs() < 1e-3, "sum {sum}, want {want}");
    }

    #[test]
    fn it_renders_as_a_prometheus_histogram() {
        let r = prometheus::Registry::new();
        let h = ShardedHistogram::new("lat_seconds", "Latency", vec![0.5, 1.0]).expect("histogram");
        r.register(Box::new(h.clone())).expect("register");
        h.observe(Duration::from_millis(700));
        h.observe(Duration::from_secs(3));
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut buf).expect("encode");
        let text = String::from_utf8(buf).expect("utf-8");
        assert!(text.contains("# TYPE lat_seconds histogram"), "{text}");
        assert!(text.contains("lat_seconds_bucket{le=\"0.5\"} 0"), "{text}");
        assert!(text.contains("lat_seconds_bucket{le=\"1\"} 1"), "{text}");
        assert!(text.contains("lat_seconds_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("lat_seconds_count 2"), "{text}");
        assert!(text.contains("lat_seconds_sum 3.7\n"), "{text}");
    }

    #[test]
    fn bad_bounds_are_refused() {
        for bounds in [vec![1.0, 0.5], vec![0.1, 0.1], vec![f64::NAN], vec![-1.0], vec![1.0; MAX_BOUNDS + 1]] {
            assert!(ShardedHistogram::new("x_seconds", "x", bounds.clone()).is_err(), "{bounds:?}");
        }
    }
}

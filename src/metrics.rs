//! The Prometheus registry and every named metric.
//!
//! Each server owns its own registry (no process globals), so several servers can run in one
//! process (tests, embedding). Every metric of the seeds is registered at start-up and so appears
//! at zero. Label values are bounded sets (`&'static str` reasons), never client input.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

mod sharded;
pub use sharded::ShardedHistogram;

/// Handles to every metric; cheap to share behind an `Arc`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Sessions currently open.
    pub active_connections: IntGauge,
    /// Sessions opened since start (rejected upgrades are not connections).
    pub total_connections: IntCounter,
    /// Subscriptions currently held across sessions.
    pub active_subscriptions: IntGauge,
    /// `websocket_unacked_events`: events delivered and not yet acknowledged, over the sessions
    /// that acknowledge (counted from each session's first `ack`).
    pub unacked_events: IntGauge,
    /// Frames sent to clients (events and control messages).
    pub messages_sent: IntCounter,
    /// Application messages received from clients.
    pub messages_received: IntCounter,
    /// Events accepted by the bus and handed to the fan-out.
    pub events_broadcast: IntCounter,
    /// Event frames written to a client socket.
    pub events_delivered: IntCounter,
    /// Events dropped for a connection (shed or discarded when it was closed as slow).
    pub events_dropped: IntCounter,
    /// Errors on established connections (protocol errors, I/O errors).
    pub connection_errors: IntCounter,
    /// Failed socket writes.
    pub send_errors: IntCounter,
    /// Session lifetimes.
    pub session_duration: Histogram,
    /// Time from publish to the frame being written to the socket (observed once per delivered
    /// frame, so sharded per thread).
    pub message_latency: ShardedHistogram,
    /// Rejected authentications, by reason code.
    pub auth_failures: IntCounterVec,
    /// Rate-limit refusals, by scope.
    pub rate_limited: IntCounterVec,
    /// Audit records written, by kind.
    pub audit_records: IntCounterVec,
    /// Failed writes (and fsyncs) of the audit log.
    pub audit_write_errors: IntCounter,
    /// Audit records dropped because the sink was down and the in-memory backlog was full.
    pub audit_dropped: IntCounter,
    /// Audit records waiting for the writer (queued and held while the sink is down).
    pub audit_queue_depth: IntGauge,
    /// `policy_reloads_total{result}`: policy reloads, applied or rejected as a whole.
    pub policy_reloads: IntCounterVec,
    /// `rate_limiter_tracked_keys`: keys held by the keyed limiters (bounded by configuration).
    pub limiter_keys: IntGauge,
    /// `auth_token_verifications_total`: tokens checked (signature and claims), whatever the result.
    pub token_verifications: IntCounter,
    /// `bus_connected`: 1 while events flow from the bus to this node's fan-out (NATS: connected
    /// and consuming the stream; local: always).
    pub bus_connected: IntGauge,
    /// `bus_invalid_messages_total`: stream messages this node refused to deliver (not a valid
    /// event, or the subject's tenant differs from the event's).
    pub bus_invalid_messages: IntCounter,
    /// `bus_events_lost_total`: stream events this node never delivered because the stream had
    /// already discarded them when it reconnected (an outage longer than the retention).
    pub bus_events_lost: IntCounter,
}

/// The reasons `auth_failures_total` is labelled with; all pre-registered at zero.
pub const AUTH_FAILURE_REASONS: &[&str] = &[
    "missing",
    "malformed",
    "bad_signature",
    "unknown_kid",
    "algorithm_not_allowed",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "missing_claim",
    "invalid_claim",
    "unknown_tenant",
    "tenant_disabled",
    "subject_revoked",
    "token_revoked",
    "origin_not_allowed",
];

/// The scopes `rate_limited_total` is labelled with.
pub const RATE_LIMIT_SCOPES: &[&str] =
    &["ip", "connect", "tenant_connections", "subject_connections", "message", "subscriptions", "publish"];

/// The results `policy_reloads_total` is labelled with.
pub const POLICY_RELOAD_RESULTS: &[&str] = &["ok", "rejected"];

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Result<Histogram, prometheus::Error> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
    r.register(Box::new(c.clone()))?;
    for v in values {
        c.with_label_values(&[*v]);
    }
    Ok(c)
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let r = Registry::new();
        Ok(Metrics {
            active_connections: gauge(&r, "websocket_active_connections", "WebSocket sessions currently open")?,
            total_connections: counter(&r, "websocket_total_connections", "WebSocket sessions opened since start")?,
            active_subscriptions: gauge(&r, "websocket_active_subscriptions", "Subscriptions currently held")?,
            unacked_events: gauge(
                &r,
                "websocket_unacked_events",
                "Events delivered and not yet acknowledged (sessions that ack, from their first ack)",
            )?,
            messages_sent: counter(&r, "websocket_messages_sent_total", "Frames sent to clients")?,
            messages_received: counter(&r, "websocket_messages_received_total", "Messages received from clients")?,
            events_broadcast: counter(&r, "websocket_events_broadcast_total", "Events handed to the fan-out")?,
            events_delivered: counter(&r, "websocket_events_delivered_total", "Event frames written to clients")?,
            events_dropped: counter(&r, "websocket_events_dropped_total", "Events dropped for slow connections")?,
            connection_errors: counter(&r, "websocket_connection_errors_total", "Errors on established connections")?,
            send_errors: counter(&r, "websocket_send_errors_total", "Failed socket writes")?,
            session_duration: histogram(
                &r,
                "websocket_session_duration_seconds",
                "Lifetime of WebSocket sessions",
                vec![1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0],
            )?,
            message_latency: {
                let h = ShardedHistogram::new(
                    "websocket_message_latency_seconds",
                    "Time from publish to the event frame being written to the socket",
                    prometheus::exponential_buckets(0.0001, 2.5, 12)?,
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            auth_failures: counter_vec(
                &r,
                "auth_failures_total",
                "Refused authentications by reason",
                "reason",
                AUTH_FAILURE_REASONS,
            )?,
            rate_limited: counter_vec(
                &r,
                "rate_limited_total",
                "Rate-limit refusals by scope",
                "scope",
                RATE_LIMIT_SCOPES,
            )?,
            audit_records: counter_vec(
                &r,
                "audit_records_total",
                "Audit records written by kind",
                "kind",
                &crate::audit::Kind::ALL.map(crate::audit::Kind::as_str),
            )?,
            audit_write_errors: counter(&r, "audit_write_errors_total", "Failed writes of the audit log")?,
            audit_dropped: counter(
                &r,
                "audit_records_dropped_total",
                "Audit records dropped: sink down and in-memory backlog full",
            )?,
            audit_queue_depth: gauge(&r, "audit_queue_depth", "Audit records waiting to be written")?,
            policy_reloads: counter_vec(
                &r,
                "policy_reloads_total",
                "Policy reloads by result",
                "result",
                POLICY_RELOAD_RESULTS,
            )?,
            token_verifications: counter(
                &r,
                "auth_token_verifications_total",
                "Bearer tokens verified (signature and claims), whatever the result",
            )?,
            limiter_keys: gauge(&r, "rate_limiter_tracked_keys", "Keys held by the keyed rate limiters")?,
            bus_connected: gauge(&r, "bus_connected", "1 while events flow from the bus to this node's fan-out")?,
            bus_invalid_messages: counter(
                &r,
                "bus_invalid_messages_total",
                "Stream messages refused: not a valid event, or the subject's tenant is not the event's",
            )?,
            bus_events_lost: counter(
                &r,
                "bus_events_lost_total",
                "Stream events discarded by retention before this node could deliver them",
            )?,
            registry: r,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_metric_is_exposed_at_zero() {
        let m = Metrics::new().expect("metrics");
        let text = m.render().expect("render");
        for name in [
            "websocket_active_connections",
            "websocket_total_connections",
            "websocket_active_subscriptions",
            "websocket_messages_sent_total",
            "websocket_messages_received_total",
            "websocket_events_broadcast_total",
            "websocket_events_delivered_total",
            "websocket_connection_errors_total",
            "websocket_send_errors_total",
            "websocket_session_duration_seconds",
            "websocket_message_latency_seconds",
            "websocket_events_dropped_total",
            "auth_failures_total",
            "rate_limited_total",
            "policy_reloads_total",
            "rate_limiter_tracked_keys",
            "websocket_unacked_events",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains("auth_failures_total{reason=\"expired\"} 0"));
    }
}

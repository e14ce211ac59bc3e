//! One client stops reading while events keep coming: the others receive everything while it is
//! still stalled (the fan-out never waits on it), it is told `lagged` and closed with 4008, and
//! the server's memory does not grow with what it could not deliver.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, Client, TestServer};
use serde_json::{json, Value};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Reads until the close frame, counting events (in order) and keeping the other frames.
async fn read_counting(c: &mut Client) -> (usize, Vec<Value>, u16, String) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut events, mut others, mut last_seq) = (0, Vec::new(), 0u64);
    loop {
        match tokio::time::timeout(Duration::from_secs(30), c.ws.next()).await.expect("close in time") {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v["type"] == "event" {
                    assert!(others.is_empty(), "no event after lagged/closing");
                    let seq: u64 =
                        v["message_id"].as_str().and_then(|s| s.split('-').nth(1)?.parse().ok()).expect("id");
                    assert!(seq > last_seq, "in order");
                    last_seq = seq;
                    events += 1;
                } else {
                    others.push(v);
                }
            }
            Some(Ok(Message::Close(Some(f)))) => return (events, others, u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => {}
            other => panic!("stream ended without a close frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_shed_and_closed_4008_without_delaying_others() {
    let mut cfg = config();
    cfg.websocket.max_pending_messages = 300;
    // The replay window holds published events by design (bounded by bus.replay_window and
    // bus.replay_max_bytes, measured elsewhere); this test measures the per-connection queue.
    cfg.bus.replay_window = 0;
    let server = TestServer::start(cfg).await;
    let mut fast: Vec<Client> = Vec::new();
    for i in 0..2 {
        let mut c = Client::as_user(&server, "acme", &format!("fast-{i}")).await;
        c.subscribe("all", json!({})).await;
        fast.push(c);
    }
    let mut slow = Client::as_user(&server, "acme", "slow").await;
    slow.subscribe("all", json!({})).await;
    // From here on `slow` is not read until the server has shed more than a queue's worth for it;
    // then it starts reading while publishing goes on.
    let mut slow = Some(slow);
    let mut slow_reader = None;

    let padding = "x".repeat(1000);
    const BATCHES: usize = 400;
    const PER_BATCH: usize = 100;
    // The publisher stays at most this many events ahead of the fast clients: they keep up, so
    // none of their events may be shed. If the fan-out ever waited on the stalled client, the fast
    // clients would stop progressing and the publisher's wait would time out.
    const WINDOW: usize = 200;
    let total = BATCHES * PER_BATCH;
    let rss_before = rss_kib();
    let started = Instant::now();
    let progress: Vec<Arc<AtomicUsize>> = (0..fast.len()).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let readers: Vec<_> = fast
        .into_iter()
        .zip(progress.clone())
        .map(|(mut c, progress)| {
            tokio::spawn(async move {
                let mut last_seq = 0u64;
                let mut max_latency = Duration::ZERO;
                for _ in 0..total {
                    let m = c.recv().await;
                    assert_eq!(m["type"], "event", "a fast client is never told it lagged: {m}");
                    let seq: u64 =
                        m["message_id"].as_str().and_then(|s| s.split('-').nth(1)?.parse().ok()).expect("id");
                    assert!(seq > last_seq, "in order");
                    last_seq = seq;
                    let sent = m["event"]["sent_at_us"].as_u64().expect("sent_at_us");
                    let now =
                        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros()
                            as u64;
                    max_latency = max_latency.max(Duration::from_micros(now.saturating_sub(sent)));
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                (c, max_latency)
            })
        })
        .collect();
    for b in 0..BATCHES {
        let published = b * PER_BATCH;
        let waited = Instant::now();
        while progress.iter().map(|p| p.load(Ordering::Relaxed)).min().unwrap_or(0) + WINDOW < published + PER_BATCH {
            assert!(waited.elapsed() < Duration::from_secs(20), "fast clients stopped progressing at batch {b}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros() as u64;
        let events: Vec<Value> = (0..PER_BATCH)
            .map(|i| {
                let sev = ["P0", "P1", "P2", "P3", "P4"][(b * PER_BATCH + i) % 5];
                json!({"event_type": "alert_received", "severity": sev, "sent_at_us": now, "alert": {"detail": padding}})
            })
            .collect();
        server.publish("acme", &Value::Array(events)).await;
        if b % 10 == 9 && slow.is_some() && server.metrics().await.get("websocket_events_dropped_total") > 300.0 {
            let mut c = slow.take().expect("slow client");
            slow_reader = Some(tokio::spawn(async move { read_counting(&mut c).await }));
        }
    }
    for r in readers {
        let (c, max_latency) =
            tokio::time::timeout(Duration::from_secs(120), r).await.expect("fast clients finish").expect("reader");
        eprintln!("fast client received {total} events, max publish-to-receive latency {max_latency:?}");
        drop(c);
    }
    eprintln!("published and fanned out {total} events in {:?}", started.elapsed());
    let rss_after = rss_kib();
    let volume_kib = (total * 1100 / 1024) as u64;
    eprintln!("RSS {rss_before} KiB -> {rss_after} KiB while {volume_kib} KiB were published to a stalled client");
    assert!(
        rss_after.saturating_sub(rss_before) < volume_kib / 2,
        "memory grew by {} KiB, not bounded by the 300-event queue",
        rss_after.saturating_sub(rss_before)
    );

    let m = server.metrics().await;
    assert!(m.get("websocket_events_dropped_total") > 0.0);
    // The fast clients got everything: delivered = 2 * total + whatever reached the slow socket.
    assert!(m.get("websocket_events_delivered_total") >= (2 * total) as f64);

    // The slow client read what was in flight, then lagged, closing, 4008.
    let reader = slow_reader.expect("the server shed events for the stalled client");
    let (events, others, code, reason) = reader.await.expect("slow reader");
    assert_eq!(code, 4008, "after {events} events and {others:?}");
    assert_eq!(reason, "slow_consumer");
    assert_eq!(others.len(), 2, "{others:?}");
    let lagged = &others[0];
    assert_eq!(lagged["type"], "lagged", "{lagged}");
    assert!(lagged["dropped"].as_u64().is_some_and(|d| d > 300), "{lagged}");
    assert!(lagged["since_message_id"].as_str().is_some());
    // It names the last event written before the loss: the position to resume from.
    let seq = |v: &Value| v.as_str().and_then(|s| s.split_once('-')).and_then(|(_, n)| n.parse::<u64>().ok());
    let (resume, first_lost) = (seq(&lagged["resume_from"]), seq(&lagged["since_message_id"]));
    assert!(resume.is_some() && first_lost.is_some() && resume < first_lost, "{lagged}");
    assert_eq!(others[1], json!({"type": "closing", "reason": "slow_consumer"}));
    assert!(events > 0 && events < total, "the slow client got {events} of {total}");
    server.shutdown().await;
}

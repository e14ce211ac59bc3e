//! The TLS edge: certificates are reloaded live without dropping connections, and a client that
//! sends nothing, half a TLS handshake, or its headers one byte at a time is cut off within the
//! configured timeout and never becomes a session.

mod common;

use std::time::{Duration, Instant};

use common::{client_tls, config, plain_config, Client, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (EOF or reset); returns how long that took, or None if it is
/// still open after `limit`.
async fn closed_within<S: AsyncReadExt + Unpin>(s: &mut S, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(started + limit), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off_before_any_session() {
    let mut cfg = config();
    cfg.tls.handshake_timeout_secs = 1;
    cfg.server.header_read_timeout_secs = 1;
    let server = TestServer::start(cfg).await;
    let limit = Duration::from_secs(4);

    // 1. TCP open, nothing sent.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    // 2. Half a TLS handshake: a record header announcing 512 bytes, then only a few of them.
    let mut half = TcpStream::connect(server.addr).await.expect("connect");
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).await.expect("write");
    // 3. A finished TLS handshake, then nothing at all.
    let mut quiet = server.connect_io().await;
    // 4. A finished TLS handshake, then headers one byte at a time.
    let mut slow = server.connect_io().await;
    let dripping = async {
        let started = Instant::now();
        for b in b"GET /ws HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n" {
            if slow.write_all(&[*b]).await.is_err() || slow.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            if started.elapsed() > limit {
                break;
            }
        }
        closed_within(&mut slow, limit).await
    };
    let (a, b, c, d) = tokio::join!(
        closed_within(&mut silent, limit),
        closed_within(&mut half, limit),
        dripping,
        closed_within(&mut quiet, limit)
    );
    for (what, took) in [("silent", a), ("half handshake", b), ("dripping headers", c), ("quiet after TLS", d)] {
        let took = took.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(took < Duration::from_millis(3500), "{what}: cut off after {took:?}");
    }
    let m = server.metrics().await;
    assert_eq!(m.get("websocket_total_connections"), 0.0, "no session was created");
    // A well-behaved client still gets in.
    let mut ok = Client::as_user(&server, "acme", "alice").await;
    ok.assert_alive().await;
    server.shutdown().await;
}

/// Malformed TLS from a client that has not authenticated (garbage, a handshake message split
/// around another record, a record header announcing more than TLS allows) is refused at once:
/// the connection is closed, a TLS alert is the most it gets back, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tls_is_refused_at_once_and_the_server_keeps_serving() {
    let server = TestServer::start(config()).await;
    let limit = Duration::from_secs(3);
    let inputs: [(&str, &[u8]); 3] = [
        ("garbage", b"\x00\x01\x02 not TLS at all \r\n\r\n"),
        (
            "handshake split around a ChangeCipherSpec",
            &[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x01, 0x00, 0x00, 0x14, 0x03, 0x01, 0x00, 0x01, 0x01],
        ),
        ("oversized record", &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01]),
    ];
    for (what, bytes) in inputs {
        let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
        tcp.write_all(bytes).await.expect("write");
        let mut got = Vec::new();
        let closed = tokio::time::timeout(limit, async {
            let mut buf = [0u8; 256];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{what}: still open after {limit:?}");
        // Nothing but (at most) an alert record: content type 21.
        assert!(got.is_empty() || got[0] == 0x15, "{what}: answered with {got:?}");
    }
    let m = server.metrics().await;
    assert_eq!(m.get("websocket_total_connections"), 0.0, "no session was created");
    let mut ok = Client::as_user(&server, "acme", "alice").await;
    ok.assert_alive().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_of_the_plain_listener_are_cut_off_too() {
    let mut cfg = plain_config();
    cfg.server.header_read_timeout_secs = 1;
    let server = TestServer::start(cfg).await;
    let mut partial = TcpStream::connect(server.addr).await.expect("connect");
    partial.write_all(b"GET /health HTTP/1.1\r\nho").await.expect("write");
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let limit = Duration::from_secs(4);
    let (a, b) = tokio::join!(closed_within(&mut partial, limit), closed_within(&mut silent, limit));
    for (what, took) in [("partial headers", a), ("nothing sent", b)] {
        let took = took.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(took < Duration::from_millis(3500), "{what}: {took:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reloaded_without_dropping_live_connections() {
    let mut cfg = config();
    cfg.tls.reload_interval_secs = 1;
    let dir = cfg.tls.cert.parent().expect("dir").to_owned();
    let old_ca = dir.join("old-ca.crt");
    std::fs::copy(dir.join("ca.crt"), &old_ca).expect("keep old CA");
    let (cert, key) = (cfg.tls.cert.clone(), cfg.tls.key.clone());
    let mut server = TestServer::start(cfg).await;
    let mut before = Client::as_user(&server, "acme", "before").await;

    // Replace certificate and key with ones from a new CA.
    incident_stream::tls::generate_dev_certs(&cert, &key).expect("new certs");
    let new_ca = dir.join("ca.crt");

    // A client that trusts only the new CA gets in once the reload happened.
    server.tls = Some(client_tls(&new_ca));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let io = TcpStream::connect(server.addr).await.expect("tcp");
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let cfg = server.tls.clone().expect("tls");
        if tokio_rustls::TlsConnector::from(cfg).connect(name, io).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut after = Client::as_user(&server, "acme", "after").await;
    after.assert_alive().await;

    // A client that trusts only the old CA is now refused at the handshake.
    let io = TcpStream::connect(server.addr).await.expect("tcp");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
    assert!(tokio_rustls::TlsConnector::from(client_tls(&old_ca)).connect(name, io).await.is_err());

    // The connection made before the reload is still up.
    before.assert_alive().await;
    server.shutdown().await;
}

//! The server's own WebSocket layer, checked byte by byte over real TLS: frames written by hand
//! (no client library smoothing anything over), so fragmentation, control frames between
//! fragments, masking, reserved bits, UTF-8 and the opening handshake are each exercised as a
//! client on the wire would exercise them.

mod common;

use common::{token, Io, TestServer, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A connection after a successful upgrade, reading server frames.
struct Raw {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

/// One server frame.
#[derive(Debug)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5A, 0x01, 0xC3, 0x7E];
    let mut f = vec![first];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

impl Raw {
    async fn open(server: &TestServer) -> Raw {
        let mut io = server.connect_io().await;
        let t = token("acme", "alice", &[], 300);
        let req = format!(
            "GET /ws HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             sec-websocket-protocol: incident-stream.v1\r\nauthorization: Bearer {t}\r\n\r\n"
        );
        io.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Raw { io, buf: Vec::new() };
        let head = loop {
            if let Some(end) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw.buf[..end]).to_lowercase();
                raw.buf.drain(..end + 4);
                break head;
            }
            raw.fill().await;
        };
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
        assert!(head.contains("sec-websocket-protocol: incident-stream.v1"), "{head}");
        let welcome = raw.text().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        raw
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout(WAIT, self.io.read(&mut chunk)).await.expect("data in time") {
            Ok(n) => n,
            Err(e) => panic!("read failed: {e}"),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next server frame, or `None` when the stream ended.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are never masked");
                assert_eq!(self.buf[0] & 0x70, 0, "no reserved bits");
                let (len, at) = match self.buf[1] & 0x7F {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 => panic!("no server frame here is that large"),
                    126 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let f = Frame {
                        fin: self.buf[0] & 0x80 != 0,
                        opcode: self.buf[0] & 0x0F,
                        payload: self.buf[at..at + len].to_vec(),
                    };
                    self.buf.drain(..at + len);
                    return Some(f);
                }
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    async fn text(&mut self) -> Value {
        let f = self.frame().await.expect("a frame");
        assert!(f.fin && f.opcode == 1, "{f:?}");
        serde_json::from_slice(&f.payload).expect("JSON text")
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write");
        self.io.flush().await.expect("flush");
    }

    /// Expects `closing` with `reason`, then a close frame with `code`.
    async fn expect_close(&mut self, reason: &str, code: u16) {
        let closing = self.text().await;
        assert_eq!(closing["type"], "closing", "{closing}");
        assert_eq!(closing["reason"], reason, "{closing}");
        let f = self.frame().await.expect("close frame");
        assert_eq!(f.opcode, 8, "{f:?}");
        assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), code);
        assert_eq!(&f.payload[2..], reason.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_with_a_ping_between_them_make_one_message() {
    let server = TestServer::default().await;
    let mut c = Raw::open(&server).await;
    let sub = json!({"type": "subscribe", "subscription_id": "frag", "filters": {"severities": ["P0"]}}).to_string();
    let (a, rest) = sub.as_bytes().split_at(10);
    let (b, d) = rest.split_at(20);
    let mut bytes = masked(0x01, a); // text, not final
    bytes.extend(masked(0x89, b"are you there")); // ping between fragments
    bytes.extend(masked(0x00, b)); // continuation
    bytes.extend(masked(0x80, d)); // final continuation
                                   // Sent one byte at a time: the server must reassemble across reads.
    for byte in bytes {
        c.send(&[byte]).await;
    }
    let pong = c.frame().await.expect("pong");
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"are you there"[..]));
    let subscribed = c.text().await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["subscription_id"], "frag");
    // A normal close is echoed.
    let mut close = vec![0x03, 0xE8];
    close.extend_from_slice(b"done");
    c.send(&masked(0x88, &close)).await;
    let f = c.frame().await.expect("close reply");
    assert_eq!((f.opcode, &f.payload[..2]), (8, &[0x03, 0xE8][..]));
    assert!(c.frame().await.is_none(), "connection ends after the close handshake");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_violations_close_1002_and_bad_text_1007() {
    let server = TestServer::default().await;
    let mut unmasked = masked(0x81, b"{}");
    unmasked[1] &= 0x7F;
    let mut reserved = masked(0x81, b"{}");
    reserved[0] |= 0x40;
    let cases: Vec<(Vec<u8>, &str, u16)> = vec![
        (unmasked, "protocol_error", 1002),
        (reserved, "protocol_error", 1002),
        (masked(0x83, b"x"), "protocol_error", 1002),      // unknown opcode
        (masked(0x80, b"orphan"), "protocol_error", 1002), // continuation of nothing
        (masked(0x09, b""), "protocol_error", 1002),       // fragmented ping
        ([masked(0x01, b"a"), masked(0x81, b"b")].concat(), "protocol_error", 1002), // interleaved
        (masked(0x81, &[0x7B, 0xC3, 0x28, 0x7D]), "invalid_utf8", 1007),
    ];
    for (bytes, reason, code) in cases {
        let mut c = Raw::open(&server).await;
        c.send(&bytes).await;
        c.expect_close(reason, code).await;
        // The server waits for our close; answering ends the connection.
        c.send(&masked(0x88, &code.to_be_bytes())).await;
        let mut rest = Vec::new();
        while let Some(f) = c.frame().await {
            rest.push(f);
        }
        assert!(rest.is_empty(), "nothing after the close: {rest:?}");
    }
    let m = server.metrics().await;
    assert_eq!(m.get("websocket_connection_errors_total"), 7.0);
    // Other sessions are unaffected.
    let mut ok = Raw::open(&server).await;
    ok.send(&masked(0x81, br#"{"type":"ping","timestamp":"t"}"#)).await;
    assert_eq!(ok.text().await["type"], "pong");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_are_400_with_a_code() {
    let server = TestServer::default().await;
    let t = format!("Bearer {}", token("acme", "alice", &[], 300));
    let base = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    // `base` is a valid upgrade (Raw::open sends the same); each case breaks one header.
    for (name, value) in [("sec-websocket-version", "8"), ("sec-websocket-key", "c2hvcnQ="), ("upgrade", "h2c")] {
        let mut headers: Vec<(&str, &str)> = base.iter().filter(|(k, _)| *k != name).copied().collect();
        headers.push((name, value));
        headers.push(("authorization", t.as_str()));
        let r = server.http("GET", "/ws", &headers, None).await;
        assert_eq!(r.status, 400, "{name}: {value}: {}", r.body);
        assert_eq!(r.json()["code"], "not_a_websocket_upgrade", "{name}");
    }
    // Without the upgrade headers at all (a plain GET) it is refused the same way.
    let r = server.http("GET", "/ws", &[("authorization", t.as_str())], None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "not_a_websocket_upgrade");
    server.shutdown().await;
}

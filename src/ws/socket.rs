//! One server-side WebSocket over an upgraded connection: reads client messages, queues server
//! frames and writes them out in as few syscalls as the queue allows.
//!
//! Memory is the point. An idle connection holds no buffer at all: reads go through a
//! per-thread scratch buffer and only the bytes of an incomplete frame are kept; the outbound
//! buffer is released after every flush. Both futures, [`WebSocket::recv`] and
//! [`WebSocket::flush`], keep their progress in the socket, so they are cancel-safe in a
//! `select!`.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame::{self, FrameError, OpCode};

/// Bytes read from the socket per read call.
const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

/// A complete client message, or a control frame the session may want to know about.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message {
    /// A text message (valid UTF-8), reassembled if it was fragmented.
    Text(String),
    /// A binary message; only its size matters to the protocol (binary is refused).
    Binary(usize),
    /// A ping; the pong is already queued, so the caller should flush.
    Ping,
    /// A pong.
    Pong,
    /// The client's close, with its code; the reply is queued, so the caller should flush.
    Close(Option<u16>),
}

/// Why reading failed.
#[derive(Debug, Error)]
pub(crate) enum WsError {
    /// The client broke the framing rules (close 1002).
    #[error("protocol violation: {0}")]
    Protocol(#[from] FrameError),
    /// A text message that is not UTF-8 (close 1007).
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A message larger than the limit (close 1009). When `fatal`, it was beyond the hard cap
    /// and the connection should be dropped rather than closed politely.
    #[error("message of at least {size} bytes exceeds the limit")]
    TooLarge { size: u64, fatal: bool },
    /// The connection ended without a close frame.
    #[error("connection ended")]
    Eof,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Largest outbound buffer kept as a thread's spare; a larger one (a burst) is freed.
const KEEP_SPARE_WBUF: usize = 64 * 1024;

thread_local! {
    /// The outbound buffer a socket starts from when it has something to write, given back when
    /// the write completes: a connection keeps no buffer while idle (every idle connection would
    /// pay for it), and a fan-out does not allocate and free one per write.
    static SPARE_WBUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A server-side WebSocket. See the module docs.
pub(crate) struct WebSocket<S> {
    io: S,
    /// Bytes read but not yet parsed (an incomplete frame). Empty, unallocated, when idle.
    rbuf: Vec<u8>,
    /// A fragmented message being reassembled, and its opcode. Boxed: rare, and every idle
    /// connection keeps this struct.
    partial: Option<Box<(OpCode, Vec<u8>)>>,
    /// Bytes of an oversized frame still to be discarded, so a polite 1009 close is not cut off
    /// by a reset for unread data.
    skip: u64,
    /// Outbound bytes, written from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Message size limits (a `u32` each: frames and messages stay far below 4 GiB).
    max_message: u32,
    hard_cap: u32,
    close_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Wraps an upgraded connection. Messages above `max_message` bytes are refused with
    /// [`WsError::TooLarge`]; above `hard_cap` the refusal is fatal.
    pub(crate) fn new(io: S, max_message: usize, hard_cap: usize) -> WebSocket<S> {
        WebSocket {
            io,
            rbuf: Vec::new(),
            partial: None,
            skip: 0,
            wbuf: Vec::new(),
            wpos: 0,
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            hard_cap: u32::try_from(hard_cap.max(max_message)).unwrap_or(u32::MAX),
            close_sent: false,
        }
    }

    /// Reads the next message. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Result<Message, WsError> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Reads the next message, or registers for the socket's readiness. What was read stays
    /// buffered between polls, so dropping the poller loses nothing.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Message, WsError>> {
        loop {
            if let Some(m) = self.parse()? {
                return Poll::Ready(Ok(m));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(WsError::Eof));
            }
        }
    }

    /// One read into the scratch buffer; whatever arrived is appended to `rbuf`.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut rb = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            let got = rb.filled();
            self.rbuf.extend_from_slice(got);
            Poll::Ready(Ok(got.len()))
        })
    }

    /// Parses one message out of `rbuf`, if complete.
    fn parse(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            if self.skip > 0 {
                let k = self.rbuf.len().min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                self.consume(k);
                self.skip -= k as u64;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            let Some((h, at)) = frame::parse_header(&self.rbuf)? else { return Ok(None) };
            if !h.opcode.is_control() {
                match (h.opcode, self.partial.as_ref().map(|p| p.0)) {
                    (OpCode::Continuation, None) => return Err(FrameError::UnexpectedContinuation.into()),
                    (OpCode::Text | OpCode::Binary, Some(_)) => return Err(FrameError::ExpectedContinuation.into()),
                    _ => {}
                }
                let size = self.partial.as_ref().map_or(0, |p| p.1.len() as u64) + h.len;
                if size > u64::from(self.max_message) {
                    let fatal = size > u64::from(self.hard_cap);
                    self.partial = None;
                    if !fatal {
                        self.consume(at);
                        self.skip = h.len;
                    }
                    return Err(WsError::TooLarge { size, fatal });
                }
            }
            let len = h.len as usize; // bounded above for data frames, ≤125 for control frames
            if self.rbuf.len() < at + len {
                self.rbuf.reserve_exact(at + len - self.rbuf.len());
                return Ok(None);
            }
            let mut payload = self.rbuf[at..at + len].to_vec();
            self.consume(at + len);
            frame::unmask(&mut payload, h.mask);
            match h.opcode {
                OpCode::Ping => {
                    self.queue(OpCode::Pong, &payload);
                    return Ok(Some(Message::Ping));
                }
                OpCode::Pong => return Ok(Some(Message::Pong)),
                OpCode::Close => {
                    let code = frame::parse_close_code(&payload)?;
                    if !frame::close_reason_is_valid(&payload) {
                        return Err(WsError::InvalidUtf8);
                    }
                    // Echo the code (RFC 6455 §5.5.1), unless we already sent our own close.
                    self.queue_close(code.unwrap_or(1000), "");
                    return Ok(Some(Message::Close(code)));
                }
                OpCode::Text | OpCode::Binary if h.fin => return finish(h.opcode, payload).map(Some),
                OpCode::Text | OpCode::Binary => {
                    self.partial = Some(Box::new((h.opcode, payload)));
                }
                OpCode::Continuation => {
                    // A continuation without a fragmented message was refused above.
                    let Some(partial) = self.partial.as_mut() else { continue };
                    partial.1.extend_from_slice(&payload);
                    if h.fin {
                        if let Some(p) = self.partial.take() {
                            let (op, data) = *p;
                            return finish(op, data).map(Some);
                        }
                    }
                }
            }
        }
    }

    /// Drops `n` parsed bytes from the front of `rbuf`, releasing it when empty.
    fn consume(&mut self, n: usize) {
        if n >= self.rbuf.len() {
            self.rbuf = Vec::new();
        } else {
            self.rbuf.drain(..n);
        }
    }

    fn queue(&mut self, op: OpCode, payload: &[u8]) {
        self.reserve(frame::MAX_SERVER_HEADER + payload.len());
        frame::write_header(&mut self.wbuf, op, payload.len());
        self.wbuf.extend_from_slice(payload);
    }

    /// Makes room for `frames` frames of `payload_bytes` in all, so queueing them grows the
    /// outbound buffer once.
    pub(crate) fn reserve_frames(&mut self, frames: usize, payload_bytes: usize) {
        self.reserve(payload_bytes + frames * frame::MAX_SERVER_HEADER);
    }

    /// Makes room for `bytes` more outbound bytes, starting from this thread's spare buffer
    /// when nothing is queued (see [`SPARE_WBUF`]).
    fn reserve(&mut self, bytes: usize) {
        if self.wbuf.capacity() == 0 {
            self.wbuf = SPARE_WBUF.take();
        }
        self.wbuf.reserve(bytes);
    }

    /// Queues a text frame. Nothing is written until [`WebSocket::flush`].
    pub(crate) fn queue_text(&mut self, text: &[u8]) {
        if !self.close_sent {
            self.queue(OpCode::Text, text);
        }
    }

    /// Queues a ping with an empty payload.
    pub(crate) fn queue_ping(&mut self) {
        if !self.close_sent {
            self.queue(OpCode::Ping, &[]);
        }
    }

    /// Queues the close frame (once; later frames are not queued).
    pub(crate) fn queue_close(&mut self, code: u16, reason: &str) {
        if !self.close_sent {
            self.close_sent = true;
            self.queue(OpCode::Close, &frame::close_payload(code, reason));
        }
    }

    /// Writes everything queued, then releases the buffer. Cancel-safe: what was written stays
    /// written, the rest stays queued.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        let mut spare = std::mem::take(&mut self.wbuf);
        self.wpos = 0;
        if spare.capacity() <= KEEP_SPARE_WBUF {
            spare.clear();
            SPARE_WBUF.set(spare);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> WebSocket<S> {
    /// Ends the connection's write side (TLS `close_notify`, then FIN).
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        tokio::io::AsyncWriteExt::shutdown(&mut self.io).await
    }
}

fn finish(op: OpCode, payload: Vec<u8>) -> Result<Message, WsError> {
    if op == OpCode::Text {
        String::from_utf8(payload).map(Message::Text).map_err(|_| WsError::InvalidUtf8)
    } else {
        Ok(Message::Binary(payload.len()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [7, 1, 200, 33];
        let mut f = vec![first];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        frame::unmask(&mut p, mask);
        f.extend_from_slice(&p);
        f
    }

    fn pair(max: usize, cap: usize) -> (WebSocket<DuplexStream>, DuplexStream) {
        let (a, b) = tokio::io::duplex(1 << 16);
        (WebSocket::new(a, max, cap), b)
    }

    #[tokio::test]
    async fn reads_messages_split_across_reads_and_fragments() {
        let (mut ws, mut peer) = pair(1024, 4096);
        let mut bytes = masked(0x81, b"hello");
        bytes.extend(masked(0x01, b"wor"));
        bytes.extend(masked(0x89, b"p")); // a ping between fragments
        bytes.extend(masked(0x80, "ld é".as_bytes()));
        bytes.extend(masked(0x82, &[1, 2, 3]));
        let feeder = tokio::spawn(async move {
            for b in bytes {
                peer.write_all(&[b]).await.expect("write");
            }
            peer
        });
        assert_eq!(ws.recv().await.expect("msg"), Message::Text("hello".into()));
        assert_eq!(ws.recv().await.expect("ping"), Message::Ping);
        assert_eq!(ws.recv().await.expect("msg"), Message::Text("world é".into()));
        assert_eq!(ws.recv().await.expect("msg"), Message::Binary(3));
        assert!(ws.rbuf.capacity() == 0 && ws.partial.is_none(), "nothing kept when idle");
        let mut peer = feeder.await.expect("feeder");
        ws.flush().await.expect("flush");
        let mut pong = [0u8; 3];
        peer.read_exact(&mut pong).await.expect("pong");
        assert_eq!(pong, [0x8A, 1, b'p']);
    }

    #[tokio::test]
    async fn writes_queued_frames_in_one_go_and_releases_the_buffer() {
        let (mut ws, mut peer) = pair(1024, 4096);
        ws.queue_text(b"one");
        ws.queue_text(&[b'x'; 300]);
        ws.queue_close(4008, "slow_consumer");
        ws.queue_text(b"after close: dropped");
        ws.flush().await.expect("flush");
        assert_eq!(ws.wpos, 0);
        assert_eq!(ws.wbuf.capacity(), 0);
        drop(ws);
        let mut out = Vec::new();
        peer.read_to_end(&mut out).await.expect("read");
        let mut expected = vec![0x81, 3, b'o', b'n', b'e', 0x81, 126, 1, 44];
        expected.extend([b'x'; 300]);
        expected.extend([0x88, 15, 0x0F, 0xA8]);
        expected.extend(b"slow_consumer");
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn the_next_write_on_the_thread_reuses_the_buffer_and_a_burst_is_freed() {
        let (mut a, mut pa) = pair(1024, 1 << 20);
        let (mut b, _pb) = pair(1024, 1 << 20);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            pa.read_to_end(&mut all).await.expect("read");
            all
        });
        a.queue_text(&[b'x'; 500]);
        let first = a.wbuf.as_ptr();
        a.flush().await.expect("flush");
        assert_eq!(a.wbuf.capacity(), 0, "an idle socket keeps no buffer");
        b.queue_text(b"next");
        assert_eq!(b.wbuf.as_ptr(), first, "the spare buffer was taken");
        b.flush().await.expect("flush");
        // A burst above the spare's limit is freed after its write, not kept by the thread.
        a.queue_text(&vec![b'y'; KEEP_SPARE_WBUF + 1]);
        a.flush().await.expect("flush");
        let kept = SPARE_WBUF.take();
        assert!(kept.capacity() <= KEEP_SPARE_WBUF && kept.is_empty());
        drop(a);
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), 504 + 10 + KEEP_SPARE_WBUF + 1);
        assert_eq!(&got[..4], &[0x81, 126, 1, 244]);
    }

    #[tokio::test]
    async fn client_close_is_echoed() {
        let (mut ws, mut peer) = pair(1024, 4096);
        peer.write_all(&masked(0x88, &frame::close_payload(1001, "bye"))).await.expect("write");
        assert_eq!(ws.recv().await.expect("close"), Message::Close(Some(1001)));
        ws.flush().await.expect("flush");
        let mut reply = [0u8; 4];
        peer.read_exact(&mut reply).await.expect("reply");
        assert_eq!(reply, [0x88, 2, 0x03, 0xE9]);
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_and_skipped() {
        let (mut ws, mut peer) = pair(100, 400);
        peer.write_all(&masked(0x81, &[b'a'; 200])).await.expect("write");
        peer.write_all(&masked(0x81, b"next")).await.expect("write");
        match ws.recv().await {
            Err(WsError::TooLarge { size: 200, fatal: false }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(ws.recv().await.expect("next"), Message::Text("next".into()));
        // Fragments count together.
        peer.write_all(&masked(0x01, &[b'a'; 60])).await.expect("write");
        peer.write_all(&masked(0x80, &[b'a'; 60])).await.expect("write");
        assert!(matches!(ws.recv().await, Err(WsError::TooLarge { size: 120, fatal: false })));
        // Beyond the hard cap: fatal, nothing is skipped.
        peer.write_all(&masked(0x81, &[b'a'; 500])).await.expect("write");
        assert!(matches!(ws.recv().await, Err(WsError::TooLarge { size: 500, fatal: true })));
    }

    #[tokio::test]
    async fn protocol_violations_and_bad_text() {
        for (bytes, want_utf8) in [
            (masked(0x81, &[0xC3, 0x28]), true),
            (masked(0x88, &[0x03, 0xE8, 0xFF]), true),
            (masked(0x80, b"orphan continuation"), false),
            (masked(0x88, &[0x03, 0xED]), false), // 1005 may not be sent
            ([masked(0x01, b"a"), masked(0x81, b"b")].concat(), false),
        ] {
            let (mut ws, mut peer) = pair(1024, 4096);
            peer.write_all(&bytes).await.expect("write");
            match ws.recv().await {
                Err(WsError::InvalidUtf8) if want_utf8 => {}
                Err(WsError::Protocol(_)) if !want_utf8 => {}
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn eof_is_reported() {
        let (mut ws, peer) = pair(1024, 4096);
        drop(peer);
        assert!(matches!(ws.recv().await, Err(WsError::Eof)));
    }
}

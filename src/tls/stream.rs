//! The server side of a TLS connection, on rustls's unbuffered API, holding no buffer while idle.
//!
//! Why not `tokio-rustls` (what axum-server's `RustlsAcceptor` uses): its buffered
//! `ServerConnection` keeps a 4 KiB receive buffer for the life of the connection (rustls sizes
//! it to 4 KiB before every read, and a WebSocket server always has a read pending), which was
//! the largest single item of an idle `wss://` connection. Here rustls only ever sees our
//! buffers: ciphertext is read into a per-thread scratch buffer and decrypted there, and only
//! the bytes of an incomplete record are kept; records are encrypted into a second per-thread
//! scratch buffer and written from it, and only what the socket did not take is kept. An idle
//! connection holds the rustls state (keys, sequence numbers) and three empty `Vec`s.
//!
//! The stream is a buffered writer of at most one write: `poll_write` takes all of its input
//! and keeps what the socket refused, and the next `poll_write` (or `poll_flush`) first writes
//! that out, so callers that flush (hyper, our WebSocket) see ordinary back-pressure.
//!
//! Errors: a record rustls refuses (bad MAC, a protocol violation) fails the read with
//! `InvalidData` after the alert rustls queued for it has been offered to the socket, and every
//! later read and write fails too; the TLS handshake fails the same way, within the acceptor's
//! handshake timeout. A TCP close in the middle of a record is `UnexpectedEof`; between records
//! (without `close_notify`, as browsers often close) it is the end of the stream.
//!
//! rustls's handshake deframer keeps positions in the unprocessed input between calls, so every
//! call into rustls gets the bytes kept from the last one, never an empty slice in their place.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use axum_server::tls_rustls::RustlsConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Ciphertext read per read call: a full record (16 KiB of payload plus its overhead) fits.
const READ_SCRATCH_BYTES: usize = 18 * 1024;

/// What a write is encrypted into before it goes to the socket; larger writes grow it once.
const WRITE_SCRATCH_BYTES: usize = 18 * 1024;

/// Per-record overhead allowed for when sizing the output of an encryption (TLS 1.3 with
/// AES-GCM or ChaCha20-Poly1305 needs 22 bytes, TLS 1.2 GCM 29); rustls says when it needs more.
const RECORD_OVERHEAD: usize = 64;

/// rustls's largest plaintext fragment.
const MAX_FRAGMENT: usize = 16 * 1024;

/// Plaintext taken per `poll_write`: four full records.
const MAX_WRITE: usize = 4 * MAX_FRAGMENT;

thread_local! {
    static READ_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_SCRATCH_BYTES].into_boxed_slice());
    static WRITE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Accepts TLS connections for axum-server: sets `TCP_NODELAY` (see `server.rs`), then runs the
/// handshake with the configuration current at accept time (so a reloaded certificate applies to
/// the next handshake) within `handshake_timeout`.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: RustlsConfig,
    handshake_timeout: Duration,
}

impl TlsAcceptor {
    /// An acceptor over a (reloadable) rustls configuration.
    pub fn new(config: RustlsConfig, handshake_timeout: Duration) -> TlsAcceptor {
        TlsAcceptor { config, handshake_timeout }
    }
}

impl<S: Send + 'static> Accept<TcpStream, S> for TlsAcceptor {
    type Stream = TlsStream;
    type Service = S;
    type Future = Pin<Box<dyn Future<Output = io::Result<(TlsStream, S)>> + Send>>;

    fn accept(&self, tcp: TcpStream, service: S) -> Self::Future {
        let config = self.config.get_inner();
        let timeout = self.handshake_timeout;
        Box::pin(async move {
            tcp.set_nodelay(true)?;
            match tokio::time::timeout(timeout, TlsStream::accept(tcp, config)).await {
                Ok(stream) => Ok((stream?, service)),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
            }
        })
    }
}

/// A server-side TLS stream over a TCP socket. See the module docs.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext read but not yet processed: an incomplete record (or handshake message).
    /// Empty, unallocated, between records.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader had no room for, from `plain_at`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Ciphertext the socket has not taken yet, from `out_at`.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The peer sent `close_notify`, or closed TCP: reads return end of stream.
    read_eof: bool,
    /// We queued our `close_notify`.
    close_sent: bool,
    /// rustls refused the peer's input or our state: reads and writes fail from then on.
    broken: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("tcp", &self.tcp).field("read_eof", &self.read_eof).finish_non_exhaustive()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Encodes one handshake (or alert) record rustls has ready onto the end of `out`.
fn encode_onto<Data>(mut record: rustls::unbuffered::EncodeTlsData<'_, Data>, out: &mut Vec<u8>) {
    let start = out.len();
    let mut room = 1024;
    loop {
        out.resize(start + room, 0);
        match record.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
            Err(EncodeError::AlreadyEncoded) => {
                out.truncate(start);
                return;
            }
        }
    }
}

/// Runs rustls over `input` until it needs more bytes or reaches traffic; decrypted data goes to
/// `dst` while it has room, the rest to `plain`; handshake records it emits go to `outgoing`.
/// Returns how many bytes of `input` were consumed, also when rustls refused them: the rest must
/// be kept, unchanged, in front of whatever is read next (rustls's handshake deframer remembers
/// positions in it). It stops where rustls needs more bytes (a handshake waiting for the peer, an
/// incomplete record) or at the end of the connection (which sets `read_eof`).
fn process(
    conn: &mut UnbufferedServerConnection,
    input: &mut [u8],
    mut dst: Option<&mut ReadBuf<'_>>,
    plain: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
    read_eof: &mut bool,
) -> (usize, Result<(), rustls::Error>) {
    let mut used = 0;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut input[used..]);
        let state = match state {
            Ok(state) => state,
            Err(e) => return (used + discard, Err(e)),
        };
        match state {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let record = match record {
                        Ok(record) => record,
                        Err(e) => return (used + discard, Err(e)),
                    };
                    discard += record.discard;
                    let mut payload = record.payload;
                    if let Some(dst) = dst.as_deref_mut() {
                        if plain.is_empty() {
                            let take = dst.remaining().min(payload.len());
                            dst.put_slice(&payload[..take]);
                            payload = &payload[take..];
                        }
                    }
                    plain.extend_from_slice(payload);
                }
            }
            ConnectionState::EncodeTlsData(record) => encode_onto(record, outgoing),
            // What was encoded is in `outgoing`, which is written before anything encrypted
            // later: as far as ordering goes it is as good as sent.
            ConnectionState::TransmitTlsData(sent) => sent.done(),
            ConnectionState::PeerClosed => *read_eof = true,
            ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => return (used + discard, Ok(())),
            ConnectionState::Closed => {
                *read_eof = true;
                return (used + discard, Ok(()));
            }
            // Early data is not enabled (`max_early_data_size` is 0), so rustls never offers it;
            // any state a later rustls adds is refused rather than guessed at.
            other => return (used + discard, Err(rustls::Error::General(format!("unexpected TLS state {other:?}")))),
        }
        used += discard;
    }
}

/// The error every read and write returns once the connection failed.
fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the TLS connection failed earlier")
}

impl TlsStream {
    /// Runs the server handshake on `tcp`. No timeout of its own: the acceptor bounds it.
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = TlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            out_at: 0,
            read_eof: false,
            close_sent: false,
            broken: false,
        };
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_write_out(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.read_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                )));
            }
            ready!(self.poll_read_tls(cx, None))?;
        }
    }

    /// Writes out `outgoing`; releases it once empty.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.release_outgoing();
        Poll::Ready(Ok(()))
    }

    /// Writes what of `outgoing` the socket takes now, without registering for more.
    fn try_write_out(&mut self) -> io::Result<()> {
        while self.out_at < self.outgoing.len() {
            match self.tcp.try_write(&self.outgoing[self.out_at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.release_outgoing();
        Ok(())
    }

    fn release_outgoing(&mut self) {
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.out_at = 0;
        }
    }

    /// After rustls refused input or state: queues the alert rustls has for the peer behind
    /// whatever `outgoing` already holds, offers it to the socket without waiting, and marks the
    /// connection broken (nothing more is read or written on it).
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        self.broken = true;
        // Only while rustls has records queued: it hands those out before it looks at input
        // again, so the refused input is never processed twice. Bounded all the same.
        for _ in 0..4 {
            if !self.conn.wants_write() {
                break;
            }
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut self.incoming);
            match state {
                Ok(ConnectionState::EncodeTlsData(record)) => encode_onto(record, &mut self.outgoing),
                _ => break,
            }
        }
        let _ = self.try_write_out();
        tls_error(e)
    }

    /// Feeds freshly read ciphertext to rustls: in place when nothing is pending, otherwise
    /// behind the pending incomplete record. Keeps only what stays unprocessed.
    fn ingest(&mut self, fresh: &mut [u8], dst: Option<&mut ReadBuf<'_>>) -> io::Result<()> {
        let TlsStream { conn, incoming, plain, outgoing, read_eof, .. } = &mut *self;
        let result = if incoming.is_empty() {
            let (used, result) = process(conn, fresh, dst, plain, outgoing, read_eof);
            incoming.extend_from_slice(&fresh[used..]);
            result
        } else {
            incoming.extend_from_slice(fresh);
            let (used, result) = process(conn, incoming, dst, plain, outgoing, read_eof);
            incoming.drain(..used);
            if incoming.is_empty() {
                *incoming = Vec::new();
            } else if incoming.capacity() > READ_SCRATCH_BYTES && incoming.len() < incoming.capacity() / 4 {
                incoming.shrink_to_fit();
            }
            result
        };
        // rustls refuses a record longer than the protocol allows, so what stays unprocessed is
        // at most one record, or one handshake message of up to 64 KiB being joined.
        result.map_err(|e| self.fail(e))
    }

    /// One read from the socket, processed. Ready once something was read or the peer closed.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>, mut dst: Option<&mut ReadBuf<'_>>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let read = READ_SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                match self.tcp.try_read(&mut scratch[..]) {
                    Ok(0) => {
                        self.read_eof = true;
                        if self.incoming.is_empty() {
                            // TCP closed without close_notify, between records: the
                            // application's own framing (HTTP, the WebSocket close) tells a
                            // truncation; browsers often close this way.
                            Some(Ok(()))
                        } else {
                            Some(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the peer closed the connection in the middle of a TLS record",
                            )))
                        }
                    }
                    Ok(n) => Some(self.ingest(&mut scratch[..n], dst.as_deref_mut())),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    Err(e) => Some(Err(e)),
                }
            });
            if let Some(result) = read {
                return Poll::Ready(result);
            }
        }
    }

    /// Copies decrypted bytes kept from an earlier record into `buf`; true if it copied any.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.plain_at >= self.plain.len() {
            return false;
        }
        let take = buf.remaining().min(self.plain.len() - self.plain_at);
        buf.put_slice(&self.plain[self.plain_at..self.plain_at + take]);
        self.plain_at += take;
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
        true
    }

    /// Encrypts `data` (or, with `None`, a `close_notify`) into the write scratch buffer and
    /// hands the records to `emit`. Handshake records rustls still has queued are put in
    /// `outgoing` first.
    fn encrypt(&mut self, data: Option<&[u8]>, emit: impl FnOnce(&mut Self, &[u8])) -> io::Result<()> {
        loop {
            // The unprocessed input, not an empty slice: rustls may hold positions in it.
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(state) => state,
                Err(e) => return Err(self.fail(e)),
            };
            match state {
                ConnectionState::WriteTraffic(mut traffic) => {
                    // Taken out of its cell for the duration, so no borrow spans `emit`.
                    let mut scratch = WRITE_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
                    let len = data.map_or(0, <[u8]>::len);
                    let mut room = len + (len / MAX_FRAGMENT + 1) * RECORD_OVERHEAD;
                    let encrypted = loop {
                        if scratch.len() < room {
                            scratch.resize(room.max(WRITE_SCRATCH_BYTES), 0);
                        }
                        let result = match data {
                            Some(data) => traffic.encrypt(data, &mut scratch[..]),
                            None => traffic.queue_close_notify(&mut scratch[..]),
                        };
                        match result {
                            Err(EncryptError::InsufficientSize(s)) => room = s.required_size,
                            Ok(n) => break Ok(n),
                            Err(e) => break Err(io::Error::other(e.to_string())),
                        }
                    };
                    self.incoming.drain(..discard);
                    if let Ok(n) = encrypted {
                        emit(self, &scratch[..n]);
                    } else {
                        self.broken = true;
                    }
                    WRITE_SCRATCH.with(|s| *s.borrow_mut() = scratch);
                    return encrypted.map(|_| ());
                }
                ConnectionState::EncodeTlsData(record) => encode_onto(record, &mut self.outgoing),
                ConnectionState::TransmitTlsData(sent) => sent.done(),
                ConnectionState::ReadTraffic(mut records) => {
                    // Only reached if a read left decrypted data behind; keep it for the reader.
                    while let Some(record) = records.next_record() {
                        match record {
                            Ok(record) => self.plain.extend_from_slice(record.payload),
                            Err(e) => return Err(self.fail(e)),
                        }
                    }
                }
                ConnectionState::PeerClosed => self.read_eof = true,
                ConnectionState::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        format!("TLS not ready to write: {other:?}"),
                    ))
                }
            }
            self.incoming.drain(..discard);
        }
    }

    /// Writes `records` straight from the scratch buffer; keeps what the socket did not take.
    fn send_now(&mut self, cx: &mut Context<'_>, records: &[u8]) {
        debug_assert!(self.outgoing.is_empty());
        let sent = match Pin::new(&mut self.tcp).poll_write(cx, records) {
            Poll::Ready(Ok(n)) => n,
            // An error shows again on the flush that must follow; nothing was written.
            Poll::Ready(Err(_)) | Poll::Pending => 0,
        };
        if sent < records.len() {
            self.outgoing.extend_from_slice(&records[sent..]);
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.take_plain(buf) || this.read_eof {
                return Poll::Ready(Ok(()));
            }
            if this.broken {
                return Poll::Ready(Err(broken()));
            }
            // Records a read queued (an alert) go out with the next write or flush; offer them
            // now without registering this task for writability, so a reader never takes over
            // the writer's wake-up.
            this.try_write_out()?;
            let before = buf.filled().len();
            ready!(this.poll_read_tls(cx, Some(buf)))?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    /// Takes up to [`MAX_WRITE`] bytes per call (callers loop), so one large write neither
    /// holds the thread for long nor grows the scratch buffer without bound.
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.broken {
            return Poll::Ready(Err(broken()));
        }
        ready!(this.poll_write_out(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        let encrypted = this.encrypt(Some(data), |this, records| {
            if this.outgoing.is_empty() {
                this.send_now(cx, records);
            } else {
                this.outgoing.extend_from_slice(records);
            }
        });
        Poll::Ready(encrypted.map(|()| data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_write_out(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && !this.broken {
            ready!(this.poll_write_out(cx))?;
            this.close_sent = true;
            // A connection that is already broken has nobody to tell.
            let _ = this.encrypt(None, |this, records| this.outgoing.extend_from_slice(records));
        }
        if !this.broken {
            ready!(this.poll_write_out(cx))?;
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    use rustls::ClientConfig;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Pki {
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        client12: Arc<ClientConfig>,
    }

    /// Certificates made once per test process (tests run in parallel threads).
    fn pki() -> &'static Pki {
        static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
        PKI.get_or_init(make_pki)
    }

    fn make_pki() -> Pki {
        let dir = std::env::temp_dir().join(format!("incident-stream-tls-stream-{}", std::process::id()));
        let certs = crate::tls::generate_dev_certs(&dir.join("server.crt"), &dir.join("server.key")).expect("certs");
        let server = crate::tls::server_config(&certs.server_cert, &certs.server_key).expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&certs.ca_cert).expect("ca") {
            roots.add(cert.expect("ca cert")).expect("add");
        }
        let client = |versions: &[&'static rustls::SupportedProtocolVersion]| {
            Arc::new(
                ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_protocol_versions(versions)
                    .expect("versions")
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth(),
            )
        };
        let pki =
            Pki { server, client: client(&[&rustls::version::TLS13]), client12: client(&[&rustls::version::TLS12]) };
        std::fs::remove_dir_all(&dir).ok();
        pki
    }

    /// A connected pair: our server stream and a tokio-rustls client.
    async fn pair(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connect = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from("localhost").expect("name");
            tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.expect("client handshake")
        };
        let accept = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsStream::accept(tcp, server).await.expect("server handshake")
        };
        tokio::join!(accept, connect)
    }

    /// The client sends `request`, the server reads it whole and answers `reply`.
    async fn round_trip(
        server: &mut TlsStream,
        client: &mut tokio_rustls::client::TlsStream<TcpStream>,
        request: &[u8],
        reply: &[u8],
    ) {
        client.write_all(request).await.expect("client write");
        client.flush().await.expect("client flush");
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.expect("server read");
        assert_eq!(&buf[..n], request);
        server.write_all(reply).await.expect("server write");
        server.flush().await.expect("server flush");
        let n = client.read(&mut buf).await.expect("client read");
        assert_eq!(&buf[..n], reply);
    }

    fn idle(s: &TlsStream) -> bool {
        s.incoming.capacity() == 0 && s.plain.capacity() == 0 && s.outgoing.capacity() == 0
    }

    #[tokio::test]
    async fn both_ways_in_tls13_and_tls12_with_nothing_kept_between_messages() {
        let pki = pki();
        for client in [Arc::clone(&pki.client), Arc::clone(&pki.client12)] {
            let (mut server, mut client) = pair(Arc::clone(&pki.server), client).await;
            round_trip(
                &mut server,
                &mut client,
                b"GET / HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            )
            .await;
            assert!(idle(&server), "an idle stream holds no buffer");
        }
    }

    /// Messages larger than a record, than the scratch buffer, and reads far smaller than a
    /// record: every byte arrives once and in order, both ways.
    #[tokio::test]
    async fn large_messages_and_small_reads_lose_nothing() {
        let pki = pki();
        let (mut server, mut client) = pair(Arc::clone(&pki.server), Arc::clone(&pki.client)).await;
        let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (sent, got) = tokio::join!(
            async {
                client.write_all(&message).await.expect("write");
                client.flush().await.expect("flush");
            },
            async {
                let mut got = Vec::new();
                let mut small = [0u8; 7];
                while got.len() < message.len() {
                    let n = server.read(&mut small).await.expect("read");
                    assert!(n > 0, "early end of stream");
                    got.extend_from_slice(&small[..n]);
                }
                got
            }
        );
        let () = sent;
        assert!(got == message, "client to server");
        let (sent, got) = tokio::join!(
            async {
                server.write_all(&message).await.expect("write");
                server.flush().await.expect("flush");
            },
            async {
                let mut got = vec![0u8; message.len()];
                client.read_exact(&mut got).await.expect("read");
                got
            }
        );
        let () = sent;
        assert!(got == message, "server to client");
        assert!(idle(&server));
    }

    /// A client that updates its keys mid-stream (TLS 1.3 KeyUpdate): the server answers and
    /// keeps reading and writing.
    #[tokio::test]
    async fn a_key_update_from_the_client_is_followed() {
        let pki = pki();
        let (mut server, mut client) = pair(Arc::clone(&pki.server), Arc::clone(&pki.client)).await;
        client.get_mut().1.refresh_traffic_keys().expect("key update");
        round_trip(&mut server, &mut client, b"after update", b"reply").await;
    }

    /// Shutdown sends close_notify: the client sees a clean end of stream; the client's own
    /// close_notify ends the server's reads.
    #[tokio::test]
    async fn close_notify_both_ways() {
        let pki = pki();
        let (mut server, mut client) = pair(Arc::clone(&pki.server), Arc::clone(&pki.client)).await;
        server.write_all(b"bye").await.expect("write");
        server.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("clean end (close_notify received)");
        assert_eq!(got, b"bye");
        assert!(server.write_all(b"more").await.is_err(), "no writes after close_notify");
        client.shutdown().await.expect("client shutdown");
        let mut buf = [0u8; 8];
        assert_eq!(server.read(&mut buf).await.expect("read"), 0);
    }

    /// Tampered ciphertext is refused with InvalidData (the MAC check), not passed on.
    #[tokio::test]
    async fn a_tampered_record_is_refused() {
        let pki = pki();
        let (mut server, client) = pair(Arc::clone(&pki.server), Arc::clone(&pki.client)).await;
        let (mut tcp, _) = client.into_inner();
        // An application-data record header with garbage for a body.
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        record.extend_from_slice(&[0xAB; 0x40]);
        tcp.write_all(&record).await.expect("write");
        let mut buf = [0u8; 64];
        let err = server.read(&mut buf).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // Nothing is read or written on a connection after that.
        assert!(server.read(&mut buf).await.is_err());
        assert!(server.write(b"late").await.is_err());
    }

    /// A TCP close in the middle of a record is an error, not a clean end of stream; a close
    /// between records ends the stream.
    #[tokio::test]
    async fn a_close_inside_a_record_is_unexpected_eof() {
        let (mut server, client) = pair(Arc::clone(&pki().server), Arc::clone(&pki().client)).await;
        let (mut tcp, _) = client.into_inner();
        tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x40, 0x01, 0x02]).await.expect("write");
        // FIN, not a reset (dropping a socket with unread session tickets would reset it).
        tcp.shutdown().await.expect("shutdown");
        let mut buf = [0u8; 64];
        assert_eq!(server.read(&mut buf).await.expect_err("truncated").kind(), io::ErrorKind::UnexpectedEof);

        let (mut server, client) = pair(Arc::clone(&pki().server), Arc::clone(&pki().client)).await;
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.expect("shutdown");
        assert_eq!(server.read(&mut buf).await.expect("clean end"), 0);
    }

    /// A handshake message split across records, then something else: rustls refuses it, and the
    /// stream returns the error (it used to hand rustls an empty slice while rustls still held
    /// positions in the kept input, which panicked).
    #[tokio::test]
    async fn an_interleaved_record_during_the_handshake_is_refused_without_a_panic() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsStream::accept(tcp, Arc::clone(&pki().server)).await.map(|_| ())
        });
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        // The first 5 bytes of a ClientHello in one record, then a ChangeCipherSpec record.
        tcp.write_all(&[
            0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x01, 0x00, 0x00, 0x14, 0x03, 0x01, 0x00, 0x01, 0x01,
        ])
        .await
        .expect("write");
        let result = tokio::time::timeout(Duration::from_secs(5), server).await.expect("ends").expect("no panic");
        assert_eq!(result.expect_err("refused").kind(), io::ErrorKind::InvalidData);
    }

    /// TLS 1.3 record sealing by hand (the client's traffic secret), for records a real client
    /// would not send on its own.
    fn seal13(secrets: &rustls::ConnectionTrafficSecrets, seq: u64, inner: &[u8], content_type: u8) -> Vec<u8> {
        use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305};
        use rustls::ConnectionTrafficSecrets as S;
        let (alg, key, iv) = match secrets {
            S::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            S::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            S::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => panic!("unexpected cipher suite"),
        };
        let key = LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).expect("key"));
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(iv.as_ref());
        for (i, b) in seq.to_be_bytes().iter().enumerate() {
            nonce[4 + i] ^= b;
        }
        let mut body = inner.to_vec();
        body.push(content_type);
        let len = body.len() + 16;
        let header = [0x17, 0x03, 0x03, (len >> 8) as u8, len as u8];
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(header), &mut body).expect("seal");
        let mut record = header.to_vec();
        record.extend_from_slice(&body);
        record
    }

    /// A KeyUpdate split across records, the server writing while it waits for the rest: the
    /// write goes through (it used to panic), and the completed KeyUpdate is followed.
    #[tokio::test]
    async fn a_key_update_split_across_records_does_not_stop_writes() {
        let mut client = (*pki().client).clone();
        client.enable_secret_extraction = true;
        let (mut server, client) = pair(Arc::clone(&pki().server), Arc::new(client)).await;
        let (mut tcp, conn) = client.into_inner();
        let (seq, tx) = conn.dangerous_extract_secrets().expect("secrets").tx;
        let mut bytes = seal13(&tx, seq, b"GET / HTTP/1.1\r\n\r\n", 0x17);
        bytes.extend(seal13(&tx, seq + 1, &[0x18, 0x00, 0x00], 0x16));
        tcp.write_all(&bytes).await.expect("write");
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        // Let the half KeyUpdate arrive if it came in a separate segment.
        let _ = tokio::time::timeout(Duration::from_millis(100), server.read(&mut buf)).await;
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.expect("write while a KeyUpdate is half received");
        server.flush().await.expect("flush");
        // The rest of the KeyUpdate (update_not_requested), then data under the new key would
        // follow; the server must take the completion without error.
        tcp.write_all(&seal13(&tx, seq + 2, &[0x01, 0x00], 0x16)).await.expect("write");
        let read = tokio::time::timeout(Duration::from_millis(200), server.read(&mut buf)).await;
        assert!(read.is_err(), "nothing to read yet, and no error: {read:?}");
    }

    /// A client that is not speaking TLS fails the handshake with an error, not a hang.
    #[tokio::test]
    async fn a_client_not_speaking_tls_fails_the_handshake() {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = async {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
            tcp
        };
        let server = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsStream::accept(tcp, Arc::clone(&pki.server)).await
        };
        let (_tcp, result) = tokio::join!(client, server);
        assert_eq!(result.expect_err("refused").kind(), io::ErrorKind::InvalidData);
        // And one that hangs up half way ends the handshake too.
        let client = async {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.expect("write");
            drop(tcp);
        };
        let server = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsStream::accept(tcp, Arc::clone(&pki.server)).await
        };
        let ((), result) = tokio::join!(client, server);
        assert_eq!(result.expect_err("refused").kind(), io::ErrorKind::UnexpectedEof);
    }
}

//! Our TLS adapter: runs a rustls handshake over a monoio `TcpStream`, then protects the
//! connection's records itself ([`super::record`]) and exposes tokio's `AsyncRead`/`AsyncWrite`
//! (what h2 runs on). Owned by one worker task; not `Send`.
//!
//! Why records are ours: rustls' buffered connection copies every received byte twice before we
//! copy it into h2 (into its deframing buffer, then into a plaintext chunk), and every sent byte
//! into a fresh record before we copy it into the write buffer. Here received records are opened
//! in place in the read buffer and copied once, into h2's buffer; sent plaintext is copied once,
//! into the write buffer, and sealed there. rustls still does the handshake (its unbuffered API)
//! and derives the traffic secrets and their updates (its kernel-connection API).
//!
//! What must stay true:
//! - At most one read and one write operation in flight, each owning its buffer and its half of
//!   the stream (so nothing is borrowed across polls, and no buffer is touched while the kernel
//!   may write into it).
//! - Reads are large (64 KiB); bytes of a record not yet whole stay in the buffer and the next
//!   read appends to them.
//! - Writes are coalesced: everything sealed since the last write goes out in one write, while
//!   new plaintext fills the other buffer.
//! - What the socket has (or takes) right away moves by plain non-blocking `recv(2)`/`send(2)`;
//!   io_uring does the waiting (as the relays do: an io_uring operation costs a submission, a
//!   completion and a wake-up even when it could finish at once).
//! - Nothing a peer sends can panic: every violation becomes an `io::Error`, and the alert it
//!   owes the peer is sent on a best-effort basis.
//! - Key updates: a peer's is followed (and answered when it asks), and ours is sent before the
//!   cipher suite's confidentiality limit (2^24 records for AES-GCM) is reached.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use monoio::BufResult;
use monoio::buf::{IoBuf, Slice, SliceMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{CommonState, ConnectionTrafficSecrets, ExtractedSecrets};

use super::record::{
    self, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER, MAX_PLAINTEXT, MAX_RECORD, RecordKey, Violation, alert,
};

const READ_BUF: usize = 64 * 1024;
/// The most handshake bytes buffered while waiting for the rest of a message.
const MAX_HANDSHAKE_BUF: usize = 256 * 1024;
/// Sealed output that makes `poll_write` hand it to the socket before taking more.
const SEND_BUFFER: usize = 512 * 1024;
/// Plaintext accepted since the last write that starts a write before h2 asks for a flush.
const EAGER_WRITE: usize = 128 * 1024;

/// Post-handshake handshake message types (RFC 8446 section 4).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

type ReadOp = Pin<Box<dyn Future<Output = (OwnedReadHalf<TcpStream>, BufResult<usize, SliceMut<Vec<u8>>>)>>>;
type WriteOp = Pin<Box<dyn Future<Output = (OwnedWriteHalf<TcpStream>, BufResult<usize, Slice<Vec<u8>>>)>>>;

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "TLS stream failed earlier")
}

fn closed_early() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed during the TLS handshake")
}

/// A connection side rustls can hand its secrets over from.
pub trait Handshake: Sized {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &CommonState;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Handshake for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        self.dangerous_into_kernel_connection().map(|(s, k)| (s, Kernel::Client(k)))
    }
}

impl Handshake for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        self.dangerous_into_kernel_connection().map(|(s, k)| (s, Kernel::Server(k)))
    }
}

/// What rustls keeps after the handshake: the key schedule, for key updates.
pub enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn next_secrets(&mut self, transmit: bool) -> Result<(u64, ConnectionTrafficSecrets), Violation> {
        let res = match (self, transmit) {
            (Kernel::Client(k), true) => k.update_tx_secret(),
            (Kernel::Client(k), false) => k.update_rx_secret(),
            (Kernel::Server(k), true) => k.update_tx_secret(),
            (Kernel::Server(k), false) => k.update_rx_secret(),
        };
        res.map_err(|_| Violation::new(alert::INTERNAL_ERROR, "deriving the next traffic secret failed"))
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        suite.tls13().map_or(u64::MAX, |s| s.common.confidentiality_limit)
    }
}

enum Reader {
    Idle(OwnedReadHalf<TcpStream>),
    Reading(ReadOp),
    /// The peer closed its side (TCP end of stream).
    Eof,
    /// An operation failed; the stream is unusable.
    Failed,
}

enum Writer {
    Idle { half: OwnedWriteHalf<TcpStream>, buf: Vec<u8> },
    Writing(WriteOp),
    ShuttingDown(Pin<Box<dyn Future<Output = io::Result<()>>>>),
    Closed,
    Failed,
}

/// What the handshake loop does after one step of rustls.
enum Next {
    Go,
    Read,
    Established,
    Fail(rustls::Error),
    PeerClosed,
    Other(String),
}

/// How the peer's side of the TLS stream stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PeerSide {
    Open,
    /// close_notify received: a clean end.
    Closed,
    /// A violation, an alert from the peer or a failed read: nothing more is read.
    Failed,
}

pub struct TlsStream {
    reader: Reader,
    /// Ciphertext read so far (its length is how much); taken by a read in flight.
    rbuf: Vec<u8>,
    /// The first byte of `rbuf` not yet opened.
    start: usize,
    /// The last read left room in `rbuf`: it took all the socket had, so the next read waits
    /// on io_uring at once, without a direct `recv(2)` that would find nothing.
    drained: bool,
    /// Application data opened in place in `rbuf`, not yet handed to the reader.
    plain: Range<usize>,
    /// Application data rustls decrypted together with the handshake, handed out first.
    early: Vec<u8>,
    /// Post-handshake handshake bytes waiting for the rest of their message.
    hs: Vec<u8>,
    peer: PeerSide,
    rx: RecordKey,

    writer: Writer,
    /// Sealed records, then the record being filled (from `open`), waiting for the writer.
    out: Vec<u8>,
    /// Where the record being filled starts in `out` (its header is written when sealed).
    open: Option<usize>,
    /// Plaintext accepted since the last write was started.
    unsent: usize,
    tx: RecordKey,
    /// A key update is sent before `tx` protects this many records.
    tx_limit: u64,
    /// A key update answering the peer's request is queued: it leaves without waiting for h2.
    urgent: bool,
    /// close_notify or a fatal alert is queued: no more application data may follow.
    sealed_off: bool,

    kernel: Kernel,
    peer_certs: Option<Vec<CertificateDer<'static>>>,
}

impl TlsStream {
    /// Runs the handshake on `stream` and returns the established stream.
    pub async fn handshake<H: Handshake>(stream: TcpStream, mut conn: H) -> io::Result<TlsStream> {
        let (mut rhalf, mut whalf) = stream.into_split();
        let mut rbuf: Vec<u8> = Vec::with_capacity(READ_BUF);
        let mut out: Vec<u8> = Vec::new();
        let mut early = Vec::new();
        // close_notify can come in the same read as the handshake's end (after data or not).
        let mut peer_closed = false;
        loop {
            let (discard, next) = {
                let UnbufferedStatus { mut discard, state } = conn.process(&mut rbuf);
                let next = match state {
                    Err(e) => Next::Fail(e),
                    Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                        let at = out.len();
                        let mut room = 4096;
                        loop {
                            out.resize(at + room, 0);
                            match enc.encode(&mut out[at..]) {
                                Ok(n) => {
                                    out.truncate(at + n);
                                    break Next::Go;
                                }
                                Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
                                Err(e) => break Next::Other(format!("TLS handshake: {e}")),
                            }
                        }
                    }
                    Ok(ConnectionState::TransmitTlsData(t)) => {
                        let (res, buf) = whalf.write_all(std::mem::take(&mut out)).await;
                        res?;
                        out = buf;
                        out.clear();
                        t.done();
                        Next::Go
                    }
                    Ok(ConnectionState::ReadTraffic(mut r)) => {
                        // The peer's first records can share a read with the handshake's last.
                        while let Some(rec) = r.next_record() {
                            let rec = rec.map_err(tls_error)?;
                            discard += rec.discard;
                            early.extend_from_slice(rec.payload);
                        }
                        Next::Go
                    }
                    Ok(ConnectionState::BlockedHandshake) => Next::Read,
                    // A server may send before the client's Finished arrives: then it waits.
                    Ok(ConnectionState::WriteTraffic(_)) => Next::Established,
                    Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Next::PeerClosed,
                    Ok(_) => Next::Other("TLS handshake: unexpected early data".to_string()),
                };
                (discard, next)
            };
            rbuf.drain(..discard);
            match next {
                Next::Go => continue,
                Next::Read => {}
                Next::Established if conn.common().is_handshaking() => {}
                Next::Established => break,
                Next::Fail(e) => {
                    send_handshake_alert(&mut conn, &mut rbuf, &mut whalf).await;
                    return Err(tls_error(e));
                }
                Next::PeerClosed if conn.common().is_handshaking() => return Err(closed_early()),
                Next::PeerClosed => {
                    peer_closed = true;
                    break;
                }
                Next::Other(e) => return Err(io::Error::other(e)),
            }
            if rbuf.len() == rbuf.capacity() {
                if rbuf.len() >= MAX_HANDSHAKE_BUF {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS handshake message too long"));
                }
                rbuf.reserve(READ_BUF);
            }
            let (len, cap) = (rbuf.len(), rbuf.capacity());
            let (res, slice) = rhalf.read(SliceMut::new(rbuf, len, cap)).await;
            rbuf = slice.into_inner();
            if res? == 0 {
                return Err(closed_early());
            }
        }
        let peer_certs = conn.common().peer_certificates().map(<[_]>::to_vec);
        let (secrets, kernel) = conn.into_kernel().map_err(tls_error)?;
        let tx_limit = kernel.confidentiality_limit();
        Ok(TlsStream {
            reader: Reader::Idle(rhalf),
            rbuf,
            start: 0,
            drained: false,
            plain: 0..0,
            early,
            hs: Vec::new(),
            peer: if peer_closed { PeerSide::Closed } else { PeerSide::Open },
            rx: RecordKey::new(&secrets.rx.1, secrets.rx.0)?,
            writer: Writer::Idle { half: whalf, buf: Vec::new() },
            out: Vec::new(),
            open: None,
            unsent: 0,
            tx: RecordKey::new(&secrets.tx.1, secrets.tx.0)?,
            tx_limit,
            urgent: false,
            sealed_off: false,
            kernel,
            peer_certs,
        })
    }

    /// The peer's certificate chain, leaf first.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certs.as_deref()
    }

    /// Opens the whole record of `len` bytes at `start` and acts on its content.
    fn open_record(&mut self, len: usize) -> Result<(), Violation> {
        let at = self.start;
        let (content_type, range) = self.rx.open(&mut self.rbuf[at..at + len])?;
        self.start += len;
        let content = at + range.start..at + range.end;
        if content_type != HANDSHAKE && !self.hs.is_empty() {
            return Err(Violation::new(alert::UNEXPECTED_MESSAGE, "record inside a split handshake message"));
        }
        match content_type {
            APPLICATION_DATA => self.plain = content,
            ALERT => self.on_alert(content)?,
            HANDSHAKE => self.on_handshake(content)?,
            _ => return Err(Violation::new(alert::UNEXPECTED_MESSAGE, "record of an unknown content type")),
        }
        Ok(())
    }

    fn on_alert(&mut self, content: Range<usize>) -> Result<(), Violation> {
        let &[_level, description] = &self.rbuf[content] else {
            return Err(Violation::new(alert::DECODE_ERROR, "alert record is not exactly one alert"));
        };
        match description {
            alert::CLOSE_NOTIFY => self.peer = PeerSide::Closed,
            // Announces a close_notify; nothing to do yet.
            alert::USER_CANCELED => {}
            other => {
                self.peer = PeerSide::Failed;
                tracing::debug!(alert = other, "TLS peer sent an alert");
                return Err(Violation::new(other, "peer sent a fatal alert"));
            }
        }
        Ok(())
    }

    fn on_handshake(&mut self, content: Range<usize>) -> Result<(), Violation> {
        if content.is_empty() {
            return Err(Violation::new(alert::UNEXPECTED_MESSAGE, "empty handshake record"));
        }
        if self.hs.len() + content.len() > MAX_HANDSHAKE_BUF {
            return Err(Violation::new(alert::UNEXPECTED_MESSAGE, "post-handshake message too long"));
        }
        self.hs.extend_from_slice(&self.rbuf[content]);
        loop {
            let (typ, len, first, ends_record) = match &self.hs[..] {
                [typ, a, b, c, rest @ ..] => {
                    let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
                    if rest.len() < len {
                        return Ok(());
                    }
                    (*typ, len, rest.first().copied(), rest.len() == len)
                }
                _ => return Ok(()),
            };
            self.hs.drain(..4 + len);
            match typ {
                KEY_UPDATE => {
                    let requested = match (len, first) {
                        (1, Some(0)) => false,
                        (1, Some(1)) => true,
                        (1, _) => return Err(Violation::new(alert::ILLEGAL_PARAMETER, "bad key update request value")),
                        _ => return Err(Violation::new(alert::DECODE_ERROR, "malformed key update")),
                    };
                    // Handshake data must not straddle a key change.
                    if !ends_record {
                        return Err(Violation::new(alert::UNEXPECTED_MESSAGE, "data after a key update in its record"));
                    }
                    let (seq, secrets) = self.kernel.next_secrets(false)?;
                    self.rx = RecordKey::new(&secrets, seq)
                        .map_err(|_| Violation::new(alert::INTERNAL_ERROR, "new receive key"))?;
                    if requested {
                        self.send_key_update()?;
                        self.urgent = true;
                    }
                }
                // Resumption is off (see `WorkloadCert`): tickets are not kept.
                NEW_SESSION_TICKET if matches!(self.kernel, Kernel::Client(_)) => {}
                _ => return Err(Violation::new(alert::UNEXPECTED_MESSAGE, "unexpected post-handshake message")),
            }
        }
    }

    /// A violation: the peer gets its alert (best effort) and the stream fails.
    fn fail(&mut self, v: Violation, cx: &mut Context<'_>) -> io::Error {
        // An alert from the peer (already `Failed`) is not answered.
        if self.peer != PeerSide::Failed {
            self.peer = PeerSide::Failed;
            if !self.sealed_off && self.push_record(ALERT, &[2, v.alert]).is_ok() {
                self.sealed_off = true;
                // Usually sent at once (see `start_write`), which matters: the stream is mostly
                // dropped right after this error, and a write still in flight with it.
                if matches!(self.writer, Writer::Idle { .. }) && self.start_write().is_ok() {
                    let _ = self.poll_writer_idle(cx);
                }
            }
        }
        v.into()
    }

    /// Reads more ciphertext; `false` at the TCP end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            match &mut self.reader {
                Reader::Idle(_) => {
                    if self.start == self.rbuf.len() {
                        self.rbuf.clear();
                        self.start = 0;
                    } else if self.rbuf.capacity() - self.rbuf.len() < MAX_RECORD {
                        // Make room for a whole record after the part already here.
                        self.rbuf.drain(..self.start);
                        self.start = 0;
                    }
                    // What is queued already comes at once, by a plain non-blocking recv(2);
                    // io_uring only waits when nothing is. Right after a read that drained the
                    // socket, nothing is likely to be: wait at once (a read submitted when data
                    // has come meanwhile completes without waiting).
                    let Reader::Idle(half) = &self.reader else { unreachable!("matched Idle above") };
                    if !std::mem::take(&mut self.drained) {
                        match crate::sys::recv_now(crate::sys::half_fd(&half.0), &mut self.rbuf) {
                            Ok(0) => {
                                self.reader = Reader::Eof;
                                return Poll::Ready(Ok(false));
                            }
                            Ok(_) => {
                                self.drained = self.rbuf.len() < self.rbuf.capacity();
                                return Poll::Ready(Ok(true));
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => {
                                self.reader = Reader::Failed;
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
                    let Reader::Idle(mut half) = std::mem::replace(&mut self.reader, Reader::Failed) else {
                        unreachable!("matched Idle above")
                    };
                    let buf = std::mem::take(&mut self.rbuf);
                    let (len, cap) = (buf.len(), buf.capacity());
                    self.reader = Reader::Reading(Box::pin(async move {
                        let res = half.read(SliceMut::new(buf, len, cap)).await;
                        (half, res)
                    }));
                }
                Reader::Reading(op) => {
                    let (half, (res, slice)) = ready!(op.as_mut().poll(cx));
                    self.rbuf = slice.into_inner();
                    return Poll::Ready(match res {
                        Ok(0) => {
                            self.reader = Reader::Eof;
                            Ok(false)
                        }
                        Ok(_) => {
                            self.drained = self.rbuf.len() < self.rbuf.capacity();
                            self.reader = Reader::Idle(half);
                            Ok(true)
                        }
                        Err(e) => {
                            self.reader = Reader::Failed;
                            Err(e)
                        }
                    });
                }
                Reader::Eof => return Poll::Ready(Ok(false)),
                Reader::Failed => return Poll::Ready(Err(broken())),
            }
        }
    }

    /// Appends plaintext to the record being filled, sealing each one that becomes full.
    fn push_plain(&mut self, mut data: &[u8]) -> Result<(), Violation> {
        while !data.is_empty() {
            let at = match self.open {
                Some(at) => at,
                None => {
                    let at = self.out.len();
                    self.out.extend_from_slice(&[0; HEADER]);
                    self.open = Some(at);
                    at
                }
            };
            let room = MAX_PLAINTEXT - (self.out.len() - at - HEADER);
            let n = room.min(data.len());
            self.out.extend_from_slice(&data[..n]);
            data = &data[n..];
            if n == room {
                self.seal_open()?;
            }
        }
        Ok(())
    }

    /// Seals the record being filled, if any; then a key update if the key is due one.
    fn seal_open(&mut self) -> Result<(), Violation> {
        if let Some(at) = self.open.take() {
            self.tx.seal(&mut self.out, at, APPLICATION_DATA)?;
            if self.tx.seq() >= self.tx_limit {
                self.send_key_update()?;
            }
        }
        Ok(())
    }

    /// Queues a whole record of `content_type` after everything queued before it.
    fn push_record(&mut self, content_type: u8, content: &[u8]) -> Result<(), Violation> {
        self.seal_open()?;
        let at = self.out.len();
        self.out.extend_from_slice(&[0; HEADER]);
        self.out.extend_from_slice(content);
        self.tx.seal(&mut self.out, at, content_type)
    }

    /// Queues a key update (not asking the peer for one) and switches to the next send key.
    fn send_key_update(&mut self) -> Result<(), Violation> {
        self.push_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
        let (seq, secrets) = self.kernel.next_secrets(true)?;
        self.tx = RecordKey::new(&secrets, seq).map_err(|_| Violation::new(alert::INTERNAL_ERROR, "new send key"))?;
        Ok(())
    }

    /// Collects a finished write. Ready once no write is in flight.
    fn poll_writer_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.writer {
            Writer::Idle { .. } => Poll::Ready(Ok(())),
            Writer::Writing(op) => {
                let (half, (res, buf)) = ready!(op.as_mut().poll(cx));
                match res {
                    Ok(_) => {
                        self.writer = Writer::Idle { half, buf: buf.into_inner() };
                        Poll::Ready(Ok(()))
                    }
                    Err(e) => {
                        self.writer = Writer::Failed;
                        Poll::Ready(Err(e))
                    }
                }
            }
            Writer::ShuttingDown(_) | Writer::Closed => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS stream shut down")))
            }
            Writer::Failed => Poll::Ready(Err(broken())),
        }
    }

    /// Writes everything queued (the writer must be idle): as much as the socket takes at once
    /// by a plain non-blocking send(2), the rest by an io_uring write, for which `out` becomes
    /// the other buffer.
    fn start_write(&mut self) -> io::Result<()> {
        self.seal_open()?;
        if self.out.is_empty() {
            return Ok(());
        }
        self.unsent = 0;
        self.urgent = false;
        let Writer::Idle { half, .. } = &self.writer else { unreachable!("start_write with a write in flight") };
        let sent = match crate::sys::send_now(crate::sys::half_fd(&half.0), &self.out) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                self.writer = Writer::Failed;
                return Err(e);
            }
        };
        if sent == self.out.len() {
            self.out.clear();
            return Ok(());
        }
        let Writer::Idle { mut half, mut buf } = std::mem::replace(&mut self.writer, Writer::Failed) else {
            unreachable!("matched Idle above")
        };
        buf.clear();
        std::mem::swap(&mut buf, &mut self.out);
        self.writer = Writer::Writing(Box::pin(async move {
            let res = half.write_all(buf.slice(sent..)).await;
            (half, res)
        }));
        Ok(())
    }

    /// Writes everything queued. Ready once it is all written.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_writer_idle(cx))?;
            self.seal_open()?;
            if self.out.is_empty() {
                return Poll::Ready(Ok(()));
            }
            self.start_write()?;
        }
    }
}

/// After a failed handshake rustls has queued an alert; send it if the socket takes it now.
/// rustls hands it over from the first call after the error, before it looks at any input (a
/// second call would process the failed input again), and must see the same input buffer as
/// before, less what it said to discard.
async fn send_handshake_alert<H: Handshake>(conn: &mut H, rbuf: &mut [u8], whalf: &mut OwnedWriteHalf<TcpStream>) {
    let mut out = vec![0u8; 512];
    let n = match conn.process(rbuf).state {
        Ok(ConnectionState::EncodeTlsData(mut enc)) => enc.encode(&mut out).unwrap_or(0),
        _ => 0,
    };
    if n > 0 {
        out.truncate(n);
        // The caller's handshake deadline bounds this.
        let _ = whalf.write_all(out).await;
    }
}

impl tokio::io::AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut copied = false;
        loop {
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.early.is_empty() {
                let n = this.early.len().min(out.remaining());
                out.put_slice(&this.early[..n]);
                this.early.drain(..n);
                copied = true;
                continue;
            }
            if !this.plain.is_empty() {
                let n = this.plain.len().min(out.remaining());
                out.put_slice(&this.rbuf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                copied = true;
                continue;
            }
            match this.peer {
                PeerSide::Open => {}
                PeerSide::Closed => return Poll::Ready(Ok(())),
                PeerSide::Failed if copied => return Poll::Ready(Ok(())),
                PeerSide::Failed => return Poll::Ready(Err(broken())),
            }
            // While a read is in flight it owns `rbuf`.
            let reading = matches!(this.reader, Reader::Reading(_));
            let opened = match if reading { Ok(None) } else { record::whole_record(&this.rbuf[this.start..]) } {
                Ok(Some(len)) => this.open_record(len).map(|()| true),
                Ok(None) => Ok(false),
                Err(v) => Err(v),
            };
            match opened {
                Ok(true) => continue,
                Ok(false) => {}
                Err(v) => {
                    let err = this.fail(v, cx);
                    // Data opened before the violation is handed out first.
                    return Poll::Ready(if copied { Ok(()) } else { Err(err) });
                }
            }
            if copied {
                return Poll::Ready(Ok(()));
            }
            // A key update answer (or an alert) queued while reading goes out without waiting
            // for h2's next flush.
            if this.urgent && matches!(this.writer, Writer::Idle { .. }) {
                this.start_write()?;
                if let Poll::Ready(Err(e)) = this.poll_writer_idle(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if !ready!(this.poll_fill(cx))? {
                this.peer = PeerSide::Failed;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection without a TLS close_notify",
                )));
            }
        }
    }
}

impl tokio::io::AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    /// h2 hands a DATA frame over as header + payload: both go into the same record.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.sealed_off {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS stream closed for sending")));
        }
        if this.out.len() >= SEND_BUFFER {
            // The socket is behind: hand over what is queued once the write in flight is done.
            ready!(this.poll_writer_idle(cx))?;
            this.start_write()?;
            if let Poll::Ready(Err(e)) = this.poll_writer_idle(cx) {
                return Poll::Ready(Err(e));
            }
        }
        // At most up to the limit: what is queued stays bounded whatever h2 hands over.
        let room = SEND_BUFFER.saturating_sub(this.out.len());
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room - n);
            this.push_plain(&b[..take])?;
            n += take;
            if n == room {
                break;
            }
        }
        this.unsent += n;
        // Writes start at h2's flush; a large backlog starts one early so the socket stays busy
        // while h2 encodes more.
        if this.unsent >= EAGER_WRITE && matches!(this.writer, Writer::Idle { .. }) {
            this.start_write()?;
            if let Poll::Ready(Err(e)) = this.poll_writer_idle(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush_out(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.writer {
                Writer::Idle { .. } | Writer::Writing(_) => {
                    if !this.sealed_off {
                        this.push_record(ALERT, &[1, alert::CLOSE_NOTIFY])?;
                        this.sealed_off = true;
                    }
                    ready!(this.poll_flush_out(cx))?;
                    let Writer::Idle { mut half, .. } = std::mem::replace(&mut this.writer, Writer::Failed) else {
                        unreachable!("flushed")
                    };
                    this.writer = Writer::ShuttingDown(Box::pin(async move { half.shutdown().await }));
                }
                Writer::ShuttingDown(op) => {
                    let res = ready!(op.as_mut().poll(cx));
                    this.writer = Writer::Closed;
                    return Poll::Ready(res);
                }
                Writer::Closed => return Poll::Ready(Ok(())),
                Writer::Failed => return Poll::Ready(Err(broken())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use rustls::client::UnbufferedClientConnection;
    use rustls::pki_types::ServerName;
    use rustls::server::UnbufferedServerConnection;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::model::Identity;
    use crate::tls::WorkloadCert;
    use crate::tls::ca::LocalCa;

    fn id(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/ns/sa/{sa}").parse().unwrap()
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap().block_on(f)
    }

    fn block_on_epoll<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap().block_on(f)
    }

    /// Forwards between a client and `upstream` in random 1..=1500 byte pieces with random
    /// pauses, both ways, so TLS records arrive split at every possible boundary.
    fn chopper(upstream: SocketAddr) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let Ok((down, _)) = l.accept() else { return };
            let up = std::net::TcpStream::connect(upstream).unwrap();
            for (mut from, mut to) in [(down.try_clone().unwrap(), up.try_clone().unwrap()), (up, down)] {
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = [0u8; 1500];
                    loop {
                        let want = fastrand::usize(1..=buf.len());
                        match from.read(&mut buf[..want]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                if fastrand::u8(..) < 16 {
                                    std::thread::sleep(Duration::from_micros(fastrand::u64(..300)));
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        addr
    }

    /// A TLS echo server on its own thread and runtime; returns its address and a handle that
    /// yields what the server's last read said (Ok on a clean end).
    fn echo_server(cert: Arc<WorkloadCert>) -> (SocketAddr, std::thread::JoinHandle<io::Result<Option<Identity>>>) {
        echo_server_on(cert, false)
    }

    fn echo_server_on(
        cert: Arc<WorkloadCert>,
        epoll: bool,
    ) -> (SocketAddr, std::thread::JoinHandle<io::Result<Option<Identity>>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let serve = async move {
                let (s, _) = l.accept()?;
                let s = TcpStream::from_std(s)?;
                let conn = UnbufferedServerConnection::new(cert.server_config()).map_err(tls_error)?;
                let mut tls = TlsStream::handshake(s, conn).await?;
                let peer = crate::tls::peer_identity(tls.peer_certificates());
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = tls.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    tls.write_all(&buf[..n]).await?;
                    tls.flush().await?;
                }
                tls.shutdown().await?;
                Ok(peer)
            };
            if epoll { block_on_epoll(serve) } else { block_on(serve) }
        });
        (addr, handle)
    }

    /// A server and a client certificate from one fresh CA.
    fn server_and_client() -> (Arc<WorkloadCert>, WorkloadCert) {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let server = Arc::new(ca.issue(&id("server"), SystemTime::now()).unwrap());
        (server, ca.issue(&id("client"), SystemTime::now()).unwrap())
    }

    /// A blocking socket to `addr` whose reads give up after 30 s.
    fn blocking_to(addr: SocketAddr) -> std::net::TcpStream {
        let sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        sock
    }

    /// rustls' own (buffered) client connection, as a peer.
    fn rustls_client(cert: &WorkloadCert) -> rustls::ClientConnection {
        rustls::ClientConnection::new(cert.client_config(), loopback_name()).unwrap()
    }

    fn loopback_name() -> ServerName<'static> {
        ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into())
    }

    fn client_conn(cert: &WorkloadCert) -> UnbufferedClientConnection {
        UnbufferedClientConnection::new(cert.client_config(), loopback_name()).unwrap()
    }

    #[test]
    fn echo_survives_random_chunking_both_ways() {
        echo_with_chunking(false);
    }

    #[test]
    fn echo_survives_random_chunking_on_epoll() {
        echo_with_chunking(true);
    }

    fn echo_with_chunking(epoll: bool) {
        let (server_cert, client_cert) = server_and_client();
        let (server, server_done) = echo_server_on(server_cert.clone(), epoll);
        let via = chopper(server);
        let client = async move {
            let s = TcpStream::connect_addr(via).await.unwrap();
            let mut tls = TlsStream::handshake(s, client_conn(&client_cert)).await.unwrap();
            let expected = [server_cert.identity.clone()];
            assert!(crate::tls::check_server_identity(tls.peer_certificates(), &expected).is_ok());
            let mut total = 0usize;
            while total < 1024 * 1024 {
                let len = fastrand::usize(1..=40_000);
                let chunk: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
                tls.write_all(&chunk).await.unwrap();
                tls.flush().await.unwrap();
                let mut back = vec![0u8; len];
                tls.read_exact(&mut back).await.unwrap();
                assert!(back == chunk, "echo intact");
                total += len;
            }
            tls.shutdown().await.unwrap();
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "clean close_notify from the server");
            total
        };
        let received = if epoll { block_on_epoll(client) } else { block_on(client) };
        assert!(received >= 1024 * 1024);
        let peer = server_done.join().unwrap().expect("server saw a clean end");
        assert_eq!(peer, Some(id("client")), "the server knows who the client is");
    }

    /// rustls' own (buffered) connection as the peer: an echo server that asks for a key update
    /// every `refresh_every` messages. Returns how many messages it echoed.
    fn rustls_echo_server(
        cert: Arc<WorkloadCert>,
        refresh_every: usize,
    ) -> (SocketAddr, std::thread::JoinHandle<Result<usize, String>>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut sock, _) = l.accept().map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut conn = rustls::ServerConnection::new(cert.server_config()).map_err(|e| e.to_string())?;
            let mut tls = rustls::Stream::new(&mut conn, &mut sock);
            let mut buf = vec![0u8; 64 * 1024];
            let mut echoed = 0;
            loop {
                let n = tls.read(&mut buf).map_err(|e| format!("peer read: {e}"))?;
                if n == 0 {
                    break;
                }
                tls.write_all(&buf[..n]).map_err(|e| format!("peer write: {e}"))?;
                echoed += 1;
                if echoed % refresh_every == 0 {
                    tls.conn.refresh_traffic_keys().map_err(|e| e.to_string())?;
                }
            }
            tls.conn.send_close_notify();
            tls.flush().map_err(|e| e.to_string())?;
            Ok(echoed)
        });
        (addr, handle)
    }

    #[test]
    fn records_interoperate_with_rustls_across_key_updates_both_ways() {
        let (server_cert, client_cert) = server_and_client();
        let (server, server_done) = rustls_echo_server(server_cert, 3);
        let (sent, rx_seq, tx_seq) = block_on(async move {
            let s = TcpStream::connect_addr(server).await.unwrap();
            let mut tls = TlsStream::handshake(s, client_conn(&client_cert)).await.unwrap();
            // Our own key updates every 4 records instead of every 2^24.
            tls.tx_limit = 4;
            let mut sent = 0;
            for i in 0..60 {
                let len = if i % 5 == 0 { fastrand::usize(20_000..70_000) } else { fastrand::usize(1..2_000) };
                let chunk: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
                tls.write_all(&chunk).await.unwrap();
                tls.flush().await.unwrap();
                let mut back = vec![0u8; len];
                tls.read_exact(&mut back).await.unwrap();
                assert!(back == chunk, "echo intact after {i} messages");
                sent += 1;
            }
            tls.shutdown().await.unwrap();
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            (sent, tls.rx.seq(), tls.tx.seq())
        });
        let echoed = server_done.join().unwrap().unwrap();
        assert!(echoed >= sent, "rustls read every message ({echoed} of {sent})");
        // Both keys were replaced: the peer's asked-for updates (every 3 messages, each message
        // at least one record) and ours (every 4 records) reset the sequence numbers.
        assert!(rx_seq < 6, "receive key followed the peer's updates (sequence {rx_seq})");
        assert!(tx_seq <= 4, "send key was updated (sequence {tx_seq})");
    }

    #[test]
    fn application_data_sent_with_the_clients_finished_is_not_lost() {
        use std::io::{Read, Write};
        let (server_cert, client_cert) = server_and_client();
        let (server, server_done) = echo_server(server_cert);
        let mut sock = blocking_to(server);
        let mut conn = rustls_client(&client_cert);
        // Queued before the handshake: rustls sends it in the same write as its Finished.
        conn.writer().write_all(b"sent with the handshake").unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let mut back = [0u8; 23];
        tls.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"sent with the handshake");
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).unwrap();
        assert!(server_done.join().unwrap().is_ok(), "server saw a clean end");
    }

    /// A client whose Finished, first data and close_notify leave in one write: rustls' side of
    /// our handshake sees all three in one read. The data must come out, then a clean end.
    #[test]
    fn data_and_close_notify_in_the_handshakes_last_read_are_delivered() {
        use std::io::{Read, Write};

        use rustls::unbuffered::ConnectionState as S;
        let (server_cert, client_cert) = server_and_client();
        let (server, server_done) = echo_server(server_cert);
        let mut sock = blocking_to(server);
        let mut conn = client_conn(&client_cert);
        let (mut inbuf, mut used, mut out) = (vec![0u8; 64 * 1024], 0, vec![0u8; 64 * 1024]);
        let (mut queued, mut echoed, mut sent_data) = (0, Vec::new(), false);
        loop {
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut inbuf[..used]);
            match state.unwrap() {
                S::EncodeTlsData(mut e) => queued += e.encode(&mut out[queued..]).unwrap(),
                S::TransmitTlsData(mut t) => {
                    if let Some(mut w) = t.may_encrypt_app_data() {
                        queued += w.encrypt(b"with the finished", &mut out[queued..]).unwrap();
                        queued += w.queue_close_notify(&mut out[queued..]).unwrap();
                        sent_data = true;
                    }
                    sock.write_all(&out[..queued]).unwrap();
                    queued = 0;
                    t.done();
                }
                S::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.unwrap();
                        discard += rec.discard;
                        echoed.extend_from_slice(rec.payload);
                    }
                }
                S::PeerClosed | S::Closed => break,
                S::BlockedHandshake | S::WriteTraffic(_) => {
                    let n = sock.read(&mut inbuf[used..]).unwrap();
                    assert!(n > 0, "server closed before its close_notify");
                    used += n;
                }
                other => panic!("unexpected state {other:?}"),
            }
            inbuf.copy_within(discard..used, 0);
            used -= discard;
        }
        assert!(sent_data);
        assert_eq!(echoed, b"with the finished");
        assert!(server_done.join().unwrap().is_ok(), "server saw data, then a clean end");
    }

    #[test]
    fn a_tampered_record_fails_the_stream_and_the_peer_hears_why() {
        let flip_last_byte = |record: &mut Vec<u8>| {
            let last = record.len() - 1;
            record[last] ^= 0x40;
        };
        spoiled_record_is_refused(flip_last_byte, rustls::AlertDescription::BadRecordMac);
    }

    #[test]
    fn an_oversized_record_is_refused_from_its_header() {
        // 64 KiB announced: refused at once, not waited for (it could never fit the buffer).
        let oversized = |record: &mut Vec<u8>| *record = vec![23, 3, 3, 0xff, 0xff, 1, 2, 3];
        spoiled_record_is_refused(oversized, rustls::AlertDescription::RecordOverflow);
    }

    /// A client completes the handshake, then sends one record as `spoil` leaves it: the
    /// server's read fails as invalid data and the client receives `alert`.
    fn spoiled_record_is_refused(spoil: impl FnOnce(&mut Vec<u8>), alert: rustls::AlertDescription) {
        use std::io::{Read, Write};
        let (server_cert, client_cert) = server_and_client();
        let (server, server_done) = echo_server(server_cert);
        let mut sock = blocking_to(server);
        let mut conn = rustls_client(&client_cert);
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).unwrap();
        }
        conn.writer().write_all(b"hello").unwrap();
        let mut record = Vec::new();
        conn.write_tls(&mut record).unwrap();
        spoil(&mut record);
        sock.write_all(&record).unwrap();
        let err = server_done.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let mut seen = None;
        for _ in 0..10 {
            match conn.read_tls(&mut sock) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Err(e) = conn.process_new_packets() {
                seen = Some(e);
                break;
            }
        }
        assert_eq!(seen, Some(rustls::Error::AlertReceived(alert)));
        let _ = sock.read(&mut [0u8; 1]);
    }

    #[test]
    fn garbage_instead_of_tls_is_an_error_not_a_panic() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let (server, server_done) = echo_server(Arc::new(ca.issue(&id("server"), SystemTime::now()).unwrap()));
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(server).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reply = Vec::new();
        let _ = c.read_to_end(&mut reply);
        assert!(server_done.join().unwrap().is_err(), "handshake fails");
        // Whatever came back is at most a TLS alert record (content type 21), never plaintext.
        assert!(reply.is_empty() || reply[0] == 21, "{reply:?}");
    }

    #[test]
    fn abrupt_close_mid_stream_is_reported() {
        let (server_cert, client_cert) = server_and_client();
        let (server, server_done) = echo_server(server_cert);
        block_on(async move {
            let s = TcpStream::connect_addr(server).await.unwrap();
            let mut tls = TlsStream::handshake(s, client_conn(&client_cert)).await.unwrap();
            tls.write_all(b"partial").await.unwrap();
            tls.flush().await.unwrap();
            let mut back = [0u8; 7];
            tls.read_exact(&mut back).await.unwrap();
            // Dropped without close_notify: the TCP connection just ends.
        });
        let err = server_done.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn rejected_client_certificate_fails_both_handshakes() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let stranger_ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let (server, server_done) = echo_server(Arc::new(ca.issue(&id("server"), SystemTime::now()).unwrap()));
        let stranger = stranger_ca.issue(&id("client"), SystemTime::now()).unwrap();
        let client = block_on(async move {
            let s = TcpStream::connect_addr(server).await.unwrap();
            match TlsStream::handshake(s, client_conn(&stranger)).await {
                // The client may finish its side before the server's alert arrives; the first
                // read then reports it.
                Ok(mut tls) => tls.read(&mut [0u8; 1]).await.map(|_| ()),
                Err(e) => Err(e),
            }
        });
        assert!(client.is_err(), "client learns it was refused");
        assert!(server_done.join().unwrap().is_err(), "server refuses the foreign client");
    }
}

#[cfg(test)]
mod mutation {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use rustls::pki_types::ServerName;
    use rustls::server::UnbufferedServerConnection;

    use super::*;
    use crate::tls::ca::LocalCa;

    /// A stand-in for fuzzing on a stable toolchain: a real client's first flight, randomly
    /// mutated, truncated or extended, fed to the server side of the adapter. Every outcome
    /// must be an orderly `Ok`/`Err` (no panic, no hang).
    #[test]
    fn mutated_client_hellos_never_panic() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let server =
            Arc::new(ca.issue(&"spiffe://cluster.local/ns/a/sa/s".parse().unwrap(), SystemTime::now()).unwrap());
        let client = ca.issue(&"spiffe://cluster.local/ns/a/sa/c".parse().unwrap(), SystemTime::now()).unwrap();
        let mut hello = Vec::new();
        let mut c = rustls::ClientConnection::new(
            client.client_config(),
            ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
        )
        .unwrap();
        while c.wants_write() {
            c.write_tls(&mut hello).unwrap();
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let inputs: Vec<Vec<u8>> = (0..300)
            .map(|_| {
                let mut m = hello.clone();
                match rng.u8(..4) {
                    0 => {
                        for _ in 0..rng.usize(1..8) {
                            let i = rng.usize(..m.len());
                            m[i] = rng.u8(..);
                        }
                    }
                    1 => m.truncate(rng.usize(..m.len())),
                    2 => m.extend((0..rng.usize(1..2000)).map(|_| rng.u8(..))),
                    _ => m = (0..rng.usize(1..600)).map(|_| rng.u8(..)).collect(),
                }
                m
            })
            .collect();
        let count = inputs.len();
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            for input in inputs {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                let _ = s.write_all(&input);
                let _ = s.shutdown(std::net::Shutdown::Write);
                // Drain whatever the server answers, then close.
                let _ = std::io::copy(&mut s, &mut std::io::sink());
            }
        });
        let outcomes = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap().block_on(
            async move {
                let listener = monoio::net::TcpListener::from_std(listener).unwrap();
                let mut errors = 0;
                for _ in 0..count {
                    let (s, _) = listener.accept().await.unwrap();
                    let conn = UnbufferedServerConnection::new(server.server_config()).unwrap();
                    let res = monoio::time::timeout(Duration::from_secs(10), TlsStream::handshake(s, conn)).await;
                    match res {
                        Err(_) => panic!("handshake hung on a mutated hello"),
                        Ok(Err(_)) => errors += 1,
                        Ok(Ok(_)) => {}
                    }
                }
                errors
            },
        );
        sender.join().unwrap();
        assert_eq!(outcomes, count, "no mutated or truncated hello completes a mutual-TLS handshake");
    }

    /// Well-protected records with arbitrary content after a real handshake: every content
    /// type, post-handshake messages with any type and length, alerts of any size, padding.
    /// The server side must end each connection in order (no panic, no hang), and must not
    /// take anything but application data as data.
    #[test]
    fn arbitrary_protected_records_never_panic() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let server =
            Arc::new(ca.issue(&"spiffe://cluster.local/ns/a/sa/s".parse().unwrap(), SystemTime::now()).unwrap());
        let client = ca.issue(&"spiffe://cluster.local/ns/a/sa/c".parse().unwrap(), SystemTime::now()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        const CONNECTIONS: usize = 150;
        let server_side = std::thread::spawn(move || {
            monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap().block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let listener = monoio::net::TcpListener::from_std(listener).unwrap();
                let mut data_bytes = 0;
                for _ in 0..CONNECTIONS {
                    let (s, _) = listener.accept().await.unwrap();
                    let conn = UnbufferedServerConnection::new(server.server_config()).unwrap();
                    let run = async {
                        let mut tls = TlsStream::handshake(s, conn).await?;
                        // The client sends its records only after this, so they reach our record
                        // layer, not rustls' handshake (which fails the whole connection on a
                        // violation in the records that share its last read).
                        tls.write_all(b"r").await?;
                        tls.flush().await?;
                        let mut got = Vec::new();
                        let res = tls.read_to_end(&mut got).await;
                        data_bytes += got.len();
                        res
                    };
                    if monoio::time::timeout(Duration::from_secs(10), run).await.is_err() {
                        panic!("the adapter hung on arbitrary records");
                    }
                }
                data_bytes
            })
        });
        let mut rng = fastrand::Rng::with_seed(0x7ec0);
        let mut expected_data = 0;
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap().block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for _ in 0..CONNECTIONS {
                let s = TcpStream::connect_addr(addr).await.unwrap();
                let conn = rustls::client::UnbufferedClientConnection::new(
                    client.client_config(),
                    ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
                )
                .unwrap();
                let mut tls = TlsStream::handshake(s, conn).await.unwrap();
                tls.read_exact(&mut [0u8; 1]).await.unwrap();
                let mut fatal = false;
                for _ in 0..rng.usize(1..5) {
                    let (content_type, content) = arbitrary_record(&mut rng);
                    // Data counts only while nothing before it ended the connection.
                    if content_type == APPLICATION_DATA && !fatal {
                        expected_data += content.len();
                    } else if content_type != APPLICATION_DATA {
                        fatal = true;
                    }
                    tls.push_record(content_type, &content).unwrap();
                }
                let _ = tls.shutdown().await;
                let _ = tls.read_to_end(&mut Vec::new()).await;
            }
        });
        let data_bytes = server_side.join().unwrap();
        // Non-data records may be harmless (a key update, a user_canceled alert), so the server
        // can read more than the data before the first of them, never more than all data sent.
        assert!(
            data_bytes >= expected_data,
            "data before any other record is delivered: {data_bytes} < {expected_data}"
        );
    }

    fn arbitrary_record(rng: &mut fastrand::Rng) -> (u8, Vec<u8>) {
        fn bytes(rng: &mut fastrand::Rng, n: usize) -> Vec<u8> {
            (0..n).map(|_| rng.u8(..)).collect()
        }
        match rng.u8(..6) {
            0 => {
                let n = rng.usize(..3000);
                (APPLICATION_DATA, bytes(rng, n))
            }
            1 => {
                let n = rng.usize(..4);
                (ALERT, bytes(rng, n))
            }
            2 | 3 => {
                // A handshake message with a chosen type and a length field that may lie.
                let typ = [NEW_SESSION_TICKET, KEY_UPDATE, 1, 13, 20, rng.u8(..)][rng.usize(..6)];
                let n = [0, 1, 2, rng.usize(..300)][rng.usize(..4)];
                let body = bytes(rng, n);
                let claimed = if rng.bool() { body.len() } else { rng.usize(..70_000) };
                let mut m = vec![typ, (claimed >> 16) as u8, (claimed >> 8) as u8, claimed as u8];
                m.extend_from_slice(&body);
                (HANDSHAKE, m)
            }
            4 => {
                let typ = [20, 24, 0, rng.u8(..)][rng.usize(..4)];
                let n = rng.usize(..40);
                (typ, bytes(rng, n))
            }
            _ => (HANDSHAKE, Vec::new()),
        }
    }
}

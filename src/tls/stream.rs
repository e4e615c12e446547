//! Our TLS adapter: drives a `rustls` connection over a monoio `TcpStream` and exposes tokio's
//! `AsyncRead`/`AsyncWrite` (what h2 runs on). Owned by one worker task; not `Send`.
//!
//! What must stay true:
//! - At most one read and one write operation in flight, each owning its buffer and its half of
//!   the stream (so nothing is borrowed across polls, and no buffer is touched while the kernel
//!   may write into it).
//! - Reads are large (64 KiB); the bytes rustls has not taken yet stay in the buffer and are fed
//!   before the next read is issued.
//! - Writes are coalesced: everything rustls has queued goes out in one write.
//! - Nothing a peer sends can panic: every rustls error becomes an `io::Error`; the alert rustls
//!   queues for it is sent on a best-effort basis before the error is returned.

use std::future::{Future, poll_fn};
use std::io::{self, BufRead, Write};
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use monoio::BufResult;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use rustls::{ConnectionCommon, SideData};

const READ_BUF: usize = 64 * 1024;
/// Most TLS output gathered into one write.
const MAX_WRITE: usize = 256 * 1024;

type ReadOp = Pin<Box<dyn Future<Output = (OwnedReadHalf<TcpStream>, BufResult<usize, Vec<u8>>)>>>;
type WriteOp = Pin<Box<dyn Future<Output = (OwnedWriteHalf<TcpStream>, BufResult<usize, Vec<u8>>)>>>;

enum Reader {
    /// Holds `buf[start..end]`, bytes read but not yet taken by rustls.
    Idle {
        half: OwnedReadHalf<TcpStream>,
        buf: Vec<u8>,
        start: usize,
        end: usize,
    },
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

pub struct TlsStream<C> {
    conn: C,
    reader: Reader,
    writer: Writer,
    /// Plaintext accepted since the last write was started: writes start early only once this
    /// is large, so h2's frames coalesce into few records and few socket writes.
    unsent: usize,
}

/// rustls' limit on queued TLS output (its default is 64 KiB, less than one h2 window update
/// burst; a full limit makes `poll_write` wait for the socket).
const SEND_BUFFER: usize = 512 * 1024;
/// Queued plaintext that starts a write before h2 asks for a flush.
const EAGER_WRITE: usize = 128 * 1024;

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "TLS stream failed earlier")
}

impl<C, S> TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>> + Unpin,
    S: SideData,
{
    /// Runs the handshake on `stream` and returns the established stream.
    pub async fn handshake(stream: TcpStream, conn: C) -> io::Result<TlsStream<C>> {
        let (r, w) = stream.into_split();
        let mut conn = conn;
        conn.set_buffer_limit(Some(SEND_BUFFER));
        let mut tls = TlsStream {
            conn,
            reader: Reader::Idle { half: r, buf: Vec::with_capacity(READ_BUF), start: 0, end: 0 },
            writer: Writer::Idle { half: w, buf: Vec::new() },
            unsent: 0,
        };
        poll_fn(|cx| tls.poll_handshake(cx)).await?;
        Ok(tls)
    }

    /// The rustls connection: peer certificates, ALPN, cipher suite.
    pub fn conn(&self) -> &C {
        &self.conn
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.is_handshaking() {
            if self.conn.wants_write() || matches!(self.writer, Writer::Writing(_)) {
                ready!(self.poll_flush_tls(cx))?;
                continue;
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                )));
            }
        }
        // The last handshake flight (a client's Finished) must leave before application data.
        self.poll_flush_tls(cx)
    }

    /// Feeds buffered bytes to rustls, reading more from the socket when none are left.
    /// Returns how many bytes were fed (`usize::MAX`: rustls holds plaintext to drain first);
    /// 0 means the peer closed its side or sent close_notify.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            let fed = match &mut self.reader {
                Reader::Idle { buf, start, end, .. } if *start < *end => {
                    let mut pending = &buf[*start..*end];
                    let before = pending.len();
                    let res = self.conn.read_tls(&mut pending);
                    let fed = before - pending.len();
                    *start += fed;
                    match res {
                        // close_notify seen: whatever follows is ignored.
                        Ok(0) => {
                            *start = *end;
                            Ok(0)
                        }
                        Ok(_) => Ok(fed),
                        // The plaintext buffer is full: the application must read first.
                        Err(e) if e.kind() == io::ErrorKind::Other => Ok(usize::MAX),
                        Err(e) => Err(e),
                    }
                }
                Reader::Idle { .. } => {
                    let Reader::Idle { mut half, mut buf, .. } = std::mem::replace(&mut self.reader, Reader::Failed)
                    else {
                        unreachable!("matched Idle above")
                    };
                    buf.clear();
                    self.reader = Reader::Reading(Box::pin(async move {
                        let res = half.read(buf).await;
                        (half, res)
                    }));
                    continue;
                }
                Reader::Reading(op) => {
                    let (half, (res, buf)) = ready!(op.as_mut().poll(cx));
                    match res {
                        Ok(0) => {
                            drop(half);
                            self.reader = Reader::Eof;
                            // Tell rustls, so a missing close_notify is reported as such.
                            let _ = self.conn.read_tls(&mut &[][..]);
                            return Poll::Ready(Ok(0));
                        }
                        Ok(n) => self.reader = Reader::Idle { half, buf, start: 0, end: n },
                        Err(e) => {
                            self.reader = Reader::Failed;
                            return Poll::Ready(Err(e));
                        }
                    }
                    continue;
                }
                Reader::Eof => return Poll::Ready(Ok(0)),
                Reader::Failed => return Poll::Ready(Err(broken())),
            };
            let fed = match fed {
                Ok(fed) => fed,
                Err(e) => {
                    self.reader = Reader::Failed;
                    return Poll::Ready(Err(e));
                }
            };
            match self.conn.process_new_packets() {
                Ok(_) => {}
                Err(e) => {
                    self.send_alert_best_effort(cx);
                    self.reader = Reader::Failed;
                    return Poll::Ready(Err(tls_error(e)));
                }
            }
            return Poll::Ready(Ok(fed));
        }
    }

    /// Starts (or continues) writing what rustls has queued. Ready once nothing is in flight.
    fn poll_write_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.writer {
                Writer::Idle { .. } if !self.conn.wants_write() => return Poll::Ready(Ok(())),
                Writer::Idle { .. } => {
                    let Writer::Idle { mut half, mut buf } = std::mem::replace(&mut self.writer, Writer::Failed) else {
                        unreachable!("matched Idle above")
                    };
                    buf.clear();
                    self.unsent = 0;
                    while self.conn.wants_write() && buf.len() < MAX_WRITE {
                        if let Err(e) = self.conn.write_tls(&mut buf) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    self.writer = Writer::Writing(Box::pin(async move {
                        let res = half.write_all(buf).await;
                        (half, res)
                    }));
                }
                Writer::Writing(op) => {
                    let (half, (res, buf)) = ready!(op.as_mut().poll(cx));
                    match res {
                        Ok(_) => self.writer = Writer::Idle { half, buf },
                        Err(e) => {
                            self.writer = Writer::Failed;
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                Writer::ShuttingDown(_) | Writer::Closed => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS stream shut down")));
                }
                Writer::Failed => return Poll::Ready(Err(broken())),
            }
        }
    }

    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_write_tls(cx))?;
            if !self.conn.wants_write() {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Copies as much decrypted plaintext as fits into `out`, straight into its unfilled part
    /// (h2 hands in uninitialized spare capacity: zeroing it first showed in profiles). `Ok` with
    /// nothing copied: clean end of stream (close_notify) or no room; `WouldBlock`: nothing yet;
    /// `UnexpectedEof`: the peer closed without close_notify.
    fn take_plaintext(&mut self, out: &mut tokio::io::ReadBuf<'_>) -> io::Result<()> {
        let mut reader = self.conn.reader();
        let mut copied = false;
        while out.remaining() > 0 {
            let chunk = match reader.fill_buf() {
                Ok(chunk) => chunk,
                // Data first; the end (or the wait for more) is reported by the next call.
                Err(_) if copied => break,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                break;
            }
            let n = chunk.len().min(out.remaining());
            out.put_slice(&chunk[..n]);
            reader.consume(n);
            copied = true;
        }
        Ok(())
    }

    /// After a protocol error rustls queues an alert; start sending it without waiting.
    fn send_alert_best_effort(&mut self, cx: &mut Context<'_>) {
        if self.conn.wants_write() {
            let _ = self.poll_write_tls(cx);
        }
    }
}

impl<C, S> tokio::io::AsyncRead for TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>> + Unpin,
    S: SideData,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match this.take_plaintext(out) {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            // Keep queued output (key updates, alerts) moving while we wait for input.
            if this.conn.wants_write() {
                if let Poll::Ready(Err(e)) = this.poll_write_tls(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if ready!(this.poll_fill(cx))? == 0 {
                // End of stream: rustls reports whether it was clean on the next take.
                return match this.take_plaintext(out) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
                    res => Poll::Ready(res),
                };
            }
        }
    }
}

impl<C, S> tokio::io::AsyncWrite for TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>> + Unpin,
    S: SideData,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    /// h2 hands a DATA frame over as header + payload: written together they become one TLS
    /// record instead of a 9-byte record and a payload record.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        loop {
            let n = this.conn.writer().write_vectored(bufs)?;
            if n > 0 || total == 0 {
                this.unsent += n;
                // Writes start at h2's flush; a large backlog starts one early so the socket
                // stays busy while h2 encodes more.
                if this.unsent >= EAGER_WRITE {
                    if let Poll::Ready(Err(e)) = this.poll_write_tls(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                return Poll::Ready(Ok(n));
            }
            // rustls' send buffer is full: wait until it drains.
            ready!(this.poll_flush_tls(cx))?;
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush_tls(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.writer {
                Writer::Idle { .. } => {
                    this.conn.send_close_notify();
                    ready!(this.poll_flush_tls(cx))?;
                    let Writer::Idle { mut half, .. } = std::mem::replace(&mut this.writer, Writer::Failed) else {
                        continue;
                    };
                    this.writer = Writer::ShuttingDown(Box::pin(async move { half.shutdown().await }));
                }
                Writer::Writing(_) => ready!(this.poll_flush_tls(cx))?,
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

    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection};
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
                let conn = ServerConnection::new(cert.server_config()).map_err(tls_error)?;
                let mut tls = TlsStream::handshake(s, conn).await?;
                let peer = crate::tls::peer_identity(tls.conn().peer_certificates());
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

    fn client_conn(cert: &WorkloadCert) -> ClientConnection {
        ClientConnection::new(
            cert.client_config(),
            ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
        )
        .unwrap()
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
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let server_cert = Arc::new(ca.issue(&id("server"), SystemTime::now()).unwrap());
        let client_cert = ca.issue(&id("client"), SystemTime::now()).unwrap();
        let (server, server_done) = echo_server_on(server_cert.clone(), epoll);
        let via = chopper(server);
        let client = async move {
            let s = TcpStream::connect_addr(via).await.unwrap();
            let mut tls = TlsStream::handshake(s, client_conn(&client_cert)).await.unwrap();
            let expected = [server_cert.identity.clone()];
            assert!(crate::tls::check_server_identity(tls.conn().peer_certificates(), &expected).is_ok());
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
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let server_cert = Arc::new(ca.issue(&id("server"), SystemTime::now()).unwrap());
        let client_cert = ca.issue(&id("client"), SystemTime::now()).unwrap();
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

    use rustls::ServerConnection;
    use rustls::pki_types::ServerName;

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
                    let conn = ServerConnection::new(server.server_config()).unwrap();
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
}

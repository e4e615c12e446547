//! Bytes both ways between an HBONE (HTTP/2 CONNECT) stream and a TCP connection, on the
//! worker that owns both. The TCP side waits for readiness before taking a buffer (idle streams
//! hold none); the HTTP/2 side follows flow control: data is sent only within the capacity the
//! peer granted, and received capacity is released as bytes reach the TCP side.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::pin;
use std::task::Poll;

use bytes::Bytes;
use monoio::io::{AsyncWriteRent, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use crate::net::relay::{RelayEnd, read_queued_or_wait, write_now_or_wait};
use crate::sys;

/// Most bytes one read on the TCP side takes, and so the largest DATA frame we send. Taken
/// only after readiness, and only as much as is queued (see the copy below), so idle and slow
/// streams do not hold it. 256 KiB against 64: a single bulk stream moves in a quarter of the
/// reads, sends and frames (one HBONE stream, 3 repetitions: CPU per GB -10 to -19%, 8
/// streams within noise); a whole 1 MiB frame would pin more per stream for little more.
const CHUNK: usize = 256 * 1024;
/// Reads smaller than this are copied out of the chunk rather than kept in it.
const SMALL_READ: usize = 32 * 1024;

fn h2_err(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

/// Copies until both directions ended, one failed, or `close` completes. `to_tcp` and `to_h2`
/// count the bytes moved each way, as they move.
pub async fn relay(
    tcp: TcpStream,
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    to_tcp: &Cell<u64>,
    to_h2: &Cell<u64>,
    close: impl Future<Output = ()>,
) -> io::Result<RelayEnd> {
    let (r, w) = tcp.into_split();
    // The same join as net::relay's, written out again on purpose: a shared async helper taking
    // the two direction futures by value stores them twice (arguments, then pinned locals),
    // measured at +560 B per idle connection.
    let mut a = pin!(h2_to_tcp(recv, w, to_tcp));
    let mut b = pin!(tcp_to_h2(r, send, to_h2));
    let mut close = pin!(close);
    let (mut a_done, mut b_done) = (false, false);
    poll_fn(|cx| {
        if close.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(RelayEnd::Closed));
        }
        if !a_done {
            if let Poll::Ready(r) = a.as_mut().poll(cx) {
                r?;
                a_done = true;
            }
        }
        if !b_done {
            if let Poll::Ready(r) = b.as_mut().poll(cx) {
                r?;
                b_done = true;
            }
        }
        if a_done && b_done { Poll::Ready(Ok(RelayEnd::Done)) } else { Poll::Pending }
    })
    .await
}

async fn h2_to_tcp(mut recv: h2::RecvStream, mut w: OwnedWriteHalf<TcpStream>, counter: &Cell<u64>) -> io::Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_err)?;
        let n = chunk.len();
        // Most chunks fit the socket's buffer at once: a plain non-blocking send saves an
        // io_uring round; io_uring writes what it does not take.
        let mut sent = 0;
        while sent < n {
            let (res, _) = write_now_or_wait(&mut w, chunk.slice(sent..), sent == 0).await;
            match res? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                k => sent += k,
            }
        }
        counter.set(counter.get() + n as u64);
        // The peer may send more only once we give the window back.
        let _ = recv.flow_control().release_capacity(n);
    }
    // END_STREAM from the peer: half-close towards the pod.
    w.shutdown().await
}

async fn tcp_to_h2(
    mut r: OwnedReadHalf<TcpStream>,
    mut send: h2::SendStream<Bytes>,
    counter: &Cell<u64>,
) -> io::Result<()> {
    loop {
        sys::readable(&r).await?;
        // Queued bytes are taken with a plain recv(2), as in `net::relay`.
        let buf = Vec::with_capacity(CHUNK);
        let (res, mut buf) = read_queued_or_wait(&mut r, buf).await;
        let n = res?;
        if n == 0 {
            // The pod finished: END_STREAM, the other direction may go on.
            return send.send_data(Bytes::new(), true).map_err(h2_err);
        }
        // What goes into h2 stays queued until the peer's window lets it out: queue what was
        // read, not the whole read buffer (many small reads against a slow reader would
        // otherwise pin a whole chunk each). Small reads are copied; a middling one gives the
        // rest of its buffer back (glibc shrinks a block in place, without a copy).
        let mut data = if n < SMALL_READ {
            Bytes::copy_from_slice(&buf[..n])
        } else {
            // The read left `buf` holding exactly the `n` bytes read.
            if n < CHUNK / 2 {
                buf.shrink_to_fit();
            }
            Bytes::from(buf)
        };
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(h2_err(e)),
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed by the peer")),
            };
            if granted == 0 {
                continue;
            }
            let part = data.split_to(granted.min(data.len()));
            send.send_data(part, false).map_err(h2_err)?;
        }
        counter.set(counter.get() + n as u64);
    }
}

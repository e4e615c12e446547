//! Bidirectional copy between a downstream and an upstream stream.
//!
//! Runs on the worker that accepted the connection. Each direction waits for readiness without
//! a buffer, then reads into a pooled 256 KiB buffer; it keeps the buffer while reads fill it
//! (bulk) and returns it after a short read (chatty or idle). End of stream on one side is
//! propagated as a write shutdown to the other (half-close); an error on either side ends both.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::pin;
use std::task::Poll;

use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncWriteRent, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use super::bufpool;
use crate::sys;

/// Bytes moved so far, updated as they flow so live metrics can read them.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Downstream -> upstream.
    pub sent: Cell<u64>,
    /// Upstream -> downstream.
    pub received: Cell<u64>,
}

/// A stream split for the relay: two pointers to one shared stream. Passed instead of the
/// 80-byte stream itself, because an async function keeps its arguments for its whole life.
pub struct Halves(OwnedReadHalf<TcpStream>, OwnedWriteHalf<TcpStream>);

impl From<TcpStream> for Halves {
    fn from(s: TcpStream) -> Halves {
        let (r, w) = s.into_split();
        Halves(r, w)
    }
}

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions reached end of stream.
    Done,
    /// `close` fired first (drain deadline, or a policy change).
    Closed,
}

/// Copies both ways until both directions reached end of stream, one failed, or `close`
/// completes.
///
/// One flat future (both directions and `close` polled here) keeps an idle connection's
/// footprint small: nested async layers would each keep their arguments beside their inner
/// future.
///
/// With `splice`, a direction that turns out to be bulk (a read fills the whole buffer) moves
/// on to `splice(2)` through a pipe, so its bytes no longer cross into user space. Measured on
/// this project's bulk test: about 2.5x less proxy CPU per GB; for small messages the pipe
/// set-up costs more than it saves, which is why directions start with the buffer copy.
pub async fn relay(
    downstream: Halves,
    upstream: Halves,
    stats: &RelayStats,
    close: impl Future<Output = ()>,
    splice: bool,
) -> io::Result<RelayEnd> {
    let (Halves(down_r, down_w), Halves(up_r, up_w)) = (downstream, upstream);
    let mut to_up = pin!(copy_one_way(down_r, up_w, &stats.sent, splice));
    let mut to_down = pin!(copy_one_way(up_r, down_w, &stats.received, splice));
    let mut close = pin!(close);
    let (mut up_done, mut down_done) = (false, false);
    poll_fn(|cx| {
        if close.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(RelayEnd::Closed));
        }
        if !up_done {
            if let Poll::Ready(r) = to_up.as_mut().poll(cx) {
                r?;
                up_done = true;
            }
        }
        if !down_done {
            if let Poll::Ready(r) = to_down.as_mut().poll(cx) {
                r?;
                down_done = true;
            }
        }
        if up_done && down_done { Poll::Ready(Ok(RelayEnd::Done)) } else { Poll::Pending }
    })
    .await
}

async fn copy_one_way(
    mut src: OwnedReadHalf<TcpStream>,
    mut dst: OwnedWriteHalf<TcpStream>,
    counter: &Cell<u64>,
    splice: bool,
) -> io::Result<()> {
    let mut held: Option<Vec<u8>> = None;
    loop {
        let buf = match held.take() {
            Some(buf) => buf,
            None => {
                sys::readable(&src).await?;
                bufpool::take()
            }
        };
        // The bytes are usually queued already (after a readiness wake-up, or mid-bulk): a plain
        // non-blocking recv(2) takes them without an io_uring submission, completion and task
        // wake-up; only when nothing is there does an io_uring read wait. Written so that
        // nothing of the first attempt lives across the wait (the relay's state is part of every
        // idle connection's footprint).
        let (res, mut buf) = read_queued_or_wait(&mut src, buf).await;
        let n = match res {
            Ok(n) => n,
            Err(e) => {
                bufpool::give(buf);
                return Err(e);
            }
        };
        if n == 0 {
            bufpool::give(buf);
            // Half-close: the peer finished sending; tell the other side, keep the reverse open.
            return dst.shutdown().await;
        }
        counter.set(counter.get() + n as u64);
        // A plain write loop: monoio's write_all future is twice the size of a write, and this
        // state is part of every connection's footprint.
        let mut written = 0;
        while written < n {
            let (res, slice) = write_now_or_wait(&mut dst, buf.slice(written..n), written == 0).await;
            buf = slice.into_inner();
            match res {
                Ok(0) => {
                    bufpool::give(buf);
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(w) => written += w,
                Err(e) => {
                    bufpool::give(buf);
                    return Err(e);
                }
            }
        }
        if n == buf.capacity() {
            if splice {
                tracing::debug!("relay direction is bulk; continuing with splice");
                bufpool::give(buf);
                // Boxed: the splice state is only allocated for bulk directions, instead of
                // enlarging every connection's relay future (measured: +220 B per idle one).
                return Box::pin(splice_one_way(src, dst, counter)).await;
            }
            buf.clear();
            held = Some(buf);
        } else {
            bufpool::give(buf);
        }
    }
}

pin_project_lite::pin_project! {
    /// A result already at hand, or an io_uring operation in flight. No bigger than the
    /// operation itself, so the relay's state (every idle connection's footprint) does not grow
    /// with the direct attempt made before it.
    #[project = NowOrWaitProj]
    pub(crate) enum NowOrWait<T, F> {
        Done { out: Option<T> },
        Wait { #[pin] op: F },
    }
}

impl<T, F: std::future::Future<Output = T>> std::future::Future for NowOrWait<T, F> {
    type Output = T;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<T> {
        match self.project() {
            NowOrWaitProj::Done { out } => match out.take() {
                Some(out) => Poll::Ready(out),
                // Polled again after completion: a caller's bug; never completes twice.
                None => Poll::Pending,
            },
            NowOrWaitProj::Wait { op } => op.poll(cx),
        }
    }
}

/// What a read gives back: how many bytes (or why none), and the buffer.
pub(crate) type ReadOut = (io::Result<usize>, Vec<u8>);

/// Reads into `buf`: what is queued already, at once, by a plain non-blocking `recv(2)`, else
/// (nothing queued) by an io_uring read that waits.
pub(crate) fn read_queued_or_wait(
    src: &mut OwnedReadHalf<TcpStream>,
    mut buf: Vec<u8>,
) -> NowOrWait<ReadOut, impl std::future::Future<Output = ReadOut> + '_> {
    match sys::recv_now(sys::half_fd(&src.0), &mut buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => NowOrWait::Wait { op: src.read(buf) },
        res => NowOrWait::Done { out: Some((res, buf)) },
    }
}

/// Writes `data`: with `try_now`, as much as the socket takes at once, by a plain non-blocking
/// `send(2)`; otherwise, or when it took nothing, by an io_uring write that waits. Callers try
/// only a message's first write: after a partial one the socket's buffer is full, and a second
/// direct attempt would be a wasted syscall.
pub(crate) fn write_now_or_wait<B: monoio::buf::IoBuf>(
    dst: &mut OwnedWriteHalf<TcpStream>,
    data: B,
    try_now: bool,
) -> NowOrWait<(io::Result<usize>, B), impl std::future::Future<Output = (io::Result<usize>, B)> + '_> {
    let now = if try_now { sys::send_now(sys::half_fd(&dst.0), &data) } else { Err(io::ErrorKind::WouldBlock.into()) };
    match now {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => NowOrWait::Wait { op: dst.write(data) },
        res => NowOrWait::Done { out: Some((res, data)) },
    }
}

/// Moves one direction's bytes through a pipe with `splice(2)`: the data never enters user
/// space. Called from the worker thread directly (not as io_uring ops, which the kernel would
/// punt to worker threads), waiting on io_uring readiness when a side would block.
async fn splice_one_way(
    src: OwnedReadHalf<TcpStream>,
    mut dst: OwnedWriteHalf<TcpStream>,
    counter: &Cell<u64>,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (src_fd, dst_fd) = (sys::half_fd(&src.0), sys::half_fd(&dst.0));
    sys::set_nonblocking(src_fd)?;
    sys::set_nonblocking(dst_fd)?;
    let pipe = sys::Pipe::new(1024 * 1024)?;
    let (pipe_r, pipe_w) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    let mut in_pipe = 0usize;
    loop {
        let mut eof = false;
        match sys::splice(src_fd, pipe_w, pipe.capacity - in_pipe) {
            Ok(0) => eof = true,
            Ok(n) => {
                in_pipe += n;
                counter.set(counter.get() + n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if in_pipe == 0 {
                    sys::readable(&src).await?;
                    continue;
                }
            }
            Err(e) => return Err(e),
        }
        while in_pipe > 0 {
            match sys::splice(pipe_r, dst_fd, in_pipe) {
                Ok(n) => in_pipe -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => sys::writable(&dst).await?,
                Err(e) => return Err(e),
            }
        }
        if eof {
            return dst.shutdown().await;
        }
    }
}

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

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use super::{bufpool, sockopt};

/// Bytes moved so far, updated as they flow so live metrics can read them.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Downstream -> upstream.
    pub sent: Cell<u64>,
    /// Upstream -> downstream.
    pub received: Cell<u64>,
}

/// Copies both ways until both directions reached end of stream, or one failed.
pub async fn relay(downstream: TcpStream, upstream: TcpStream, stats: &RelayStats) -> io::Result<()> {
    let (down_r, down_w) = downstream.into_split();
    let (up_r, up_w) = upstream.into_split();
    let to_up = pin!(copy_one_way(down_r, up_w, &stats.sent));
    let to_down = pin!(copy_one_way(up_r, down_w, &stats.received));
    join_fail_fast(to_up, to_down).await
}

/// Polls both futures to completion, returning at once when either fails.
async fn join_fail_fast<A, B>(mut a: std::pin::Pin<&mut A>, mut b: std::pin::Pin<&mut B>) -> io::Result<()>
where
    A: Future<Output = io::Result<()>>,
    B: Future<Output = io::Result<()>>,
{
    let (mut a_done, mut b_done) = (false, false);
    poll_fn(|cx| {
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
        if a_done && b_done { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await
}

async fn copy_one_way(
    mut src: OwnedReadHalf<TcpStream>,
    mut dst: OwnedWriteHalf<TcpStream>,
    counter: &Cell<u64>,
) -> io::Result<()> {
    let mut held: Option<Vec<u8>> = None;
    loop {
        let buf = match held.take() {
            Some(buf) => buf,
            None => {
                sockopt::readable(&src).await?;
                bufpool::take()
            }
        };
        let (res, buf) = src.read(buf).await;
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
        let (res, mut buf) = dst.write_all(buf).await;
        if let Err(e) = res {
            bufpool::give(buf);
            return Err(e);
        }
        if n == buf.capacity() {
            buf.clear();
            held = Some(buf);
        } else {
            bufpool::give(buf);
        }
    }
}

//! The accept loop of one listener on one worker: every accepted connection becomes a task on
//! this worker (never handed to another), until drain closes the listener.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use monoio::net::{TcpListener, TcpStream};

use super::{WorkerCtx, lifecycle};
use crate::net::canonical;

/// The listeners a worker runs, and so the ways a connection can arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// 15001: a local pod's captured outbound connection.
    Outbound,
    /// 15006: plaintext addressed to a local pod.
    InboundPlain,
    /// 15008: HBONE addressed to a local pod.
    InboundHbone,
    /// 15080 (opt-in): SOCKS5 from a local client.
    Socks5,
}

pub async fn accept_loop(ctx: Rc<WorkerCtx>, kind: Listener, listener: TcpListener) {
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = ctx.draining.wait() => break,
        };
        match accepted {
            Ok((stream, peer)) => dispatch(&ctx, kind, stream, canonical(peer)),
            Err(e) => {
                tracing::warn!(worker = ctx.id, listener = ?kind, error = %e, "accept failed");
                // Out of descriptors or memory: back off instead of spinning.
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    ctx.accepting.set(ctx.accepting.get() - 1);
    tracing::debug!(worker = ctx.id, listener = ?kind, "listener closed for drain");
}

fn dispatch(ctx: &Rc<WorkerCtx>, kind: Listener, stream: TcpStream, peer: SocketAddr) {
    crate::net::prepare_accepted(&stream);
    match kind {
        // An HBONE connection carries many streams for its whole life: one task serves them.
        Listener::InboundHbone => monoio::spawn(crate::hbone::server::serve(ctx.clone(), stream, peer)),
        _ => monoio::spawn(lifecycle::run(ctx.clone(), kind, stream, peer)),
    };
}

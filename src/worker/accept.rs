//! The accept loop of one listener on one worker: every accepted connection becomes a task on
//! this worker (never handed to another), until drain closes the listener.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::net::{TcpListener, TcpStream};

use super::pods::PodNet;
use super::{WorkerCtx, contained, lifecycle};
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

/// True for the accept errors that say the process or the system is out of a resource: the
/// listener then pauses. Any other error concerns one connection (aborted, protocol error) and
/// the next accept goes on at once.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// How long a listener pauses when out of descriptors or memory.
const BACKOFF: Duration = Duration::from_millis(50);

/// Accepts on `listener` until drain: the worker's, or pod `pod`'s (which also stops when that
/// pod drains alone).
pub async fn accept_loop(ctx: Rc<WorkerCtx>, kind: Listener, listener: TcpListener, pod: Option<Rc<PodNet>>) {
    // Warnings are bounded: the first of a burst, then one every few seconds with a count.
    let mut failures = 0u64;
    let mut last_warning: Option<Instant> = None;
    loop {
        // Drain stops the listener (`sys::stop_listening`), which ends a pending accept with an
        // error; the grace is a fallback for a kernel where it would not.
        let stopped = async {
            super::pods::draining(&ctx, pod.as_deref()).await;
            monoio::time::sleep(Duration::from_millis(500)).await;
        };
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = stopped => break,
        };
        match accepted {
            Ok((stream, peer)) => dispatch(&ctx, kind, stream, canonical(peer), &pod),
            Err(_) if ctx.draining.fired() || pod.as_ref().is_some_and(|p| p.draining.fired()) => break,
            Err(e) if out_of_resources(&e) => {
                failures += 1;
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    tracing::warn!(worker = ctx.id, listener = ?kind, error = %e, failures, "accept failed: out of resources; pausing this listener");
                    last_warning = Some(Instant::now());
                }
                monoio::select! {
                    _ = monoio::time::sleep(BACKOFF) => {}
                    _ = ctx.draining.wait() => break,
                }
            }
            Err(e) => {
                tracing::debug!(worker = ctx.id, listener = ?kind, error = %e, "accept failed for one connection")
            }
        }
    }
    drop(listener);
    ctx.accepting.set(ctx.accepting.get() - 1);
    tracing::debug!(worker = ctx.id, listener = ?kind, "listener closed for drain");
}

fn dispatch(ctx: &Rc<WorkerCtx>, kind: Listener, stream: TcpStream, peer: SocketAddr, pod: &Option<Rc<PodNet>>) {
    ctx.accepted.set(ctx.accepted.get() + 1);
    let id = ctx.id;
    let pod = pod.clone();
    match kind {
        // An HBONE connection carries many streams for its whole life: one task serves them.
        Listener::InboundHbone => monoio::spawn(contained(
            id,
            "hbone connection",
            crate::hbone::server::serve(ctx.clone(), stream, peer, pod),
        )),
        _ => monoio::spawn(contained(id, "connection setup", lifecycle::run(ctx.clone(), kind, stream, peer, pod))),
    };
}

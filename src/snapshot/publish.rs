//! Control -> worker messages: a lock-free crossbeam channel per worker, plus an `AtomicWaker`
//! so a send wakes the worker's receiving task even when its runtime is parked in io_uring.
//! (monoio's `sync` feature lets a waker be woken from a foreign thread.)

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::snapshot::Snapshot;

#[derive(Debug)]
pub enum WorkerMsg {
    /// A new config generation: replaces the worker's current snapshot.
    Snapshot(Arc<Snapshot>),
    /// Stop accepting; let open connections finish until the deadline, then close them.
    Drain { deadline: Instant },
    /// Send this worker's metrics (a scrape).
    Scrape(tokio::sync::oneshot::Sender<crate::telemetry::metrics::Dump>),
    /// In-pod mode: bind this pod's listeners inside its namespace; the reply says whether they
    /// are bound (or why not).
    AddPod { pod: Arc<crate::inpod::PodSpec>, reply: tokio::sync::oneshot::Sender<Result<(), String>> },
    /// Stop serving pod `id`: its listeners now, its connections at `deadline`.
    DrainPod { id: u64, deadline: Instant },
    /// Send the open connections of every pod (`config_dump`).
    PodConnections(tokio::sync::oneshot::Sender<Vec<crate::inpod::PodConnection>>),
}

/// The control thread's end.
#[derive(Clone)]
pub struct WorkerTx {
    tx: Sender<WorkerMsg>,
    waker: Arc<AtomicWaker>,
}

/// The worker's end.
pub struct WorkerRx {
    rx: Receiver<WorkerMsg>,
    waker: Arc<AtomicWaker>,
}

pub fn channel() -> (WorkerTx, WorkerRx) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = Arc::new(AtomicWaker::new());
    (WorkerTx { tx, waker: waker.clone() }, WorkerRx { rx, waker })
}

impl WorkerTx {
    /// Sends and wakes the worker. False when the worker is gone.
    pub fn send(&self, msg: WorkerMsg) -> bool {
        let ok = self.tx.send(msg).is_ok();
        self.waker.wake();
        ok
    }
}

impl WorkerRx {
    /// The next message; `None` once the control side is gone.
    pub async fn recv(&self) -> Option<WorkerMsg> {
        poll_fn(|cx| {
            match self.rx.try_recv() {
                Ok(m) => return Poll::Ready(Some(m)),
                Err(TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(TryRecvError::Empty) => {}
            }
            self.waker.register(cx.waker());
            // A message may have arrived between the first check and the registration.
            match self.rx.try_recv() {
                Ok(m) => Poll::Ready(Some(m)),
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }
}

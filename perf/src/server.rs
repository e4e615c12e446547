//! Echo and discard servers, on a current-thread tokio runtime on their own thread (inside a
//! network namespace when asked). They run until stopped or the process exits.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::netns;

/// The two servers of one address: echo (rr, connrate, idle) and sink (bulk).
#[derive(Debug, Clone, Copy)]
pub struct ServerAddrs {
    pub echo: SocketAddr,
    pub sink: SocketAddr,
}

pub struct Servers {
    pub addrs: Vec<ServerAddrs>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts echo and sink servers on each IP (ports chosen by the kernel unless given).
pub fn start(ips: &[IpAddr], ns: Option<&str>, echo_port: u16, sink_port: u16) -> anyhow::Result<Servers> {
    let ips = ips.to_vec();
    let ns = ns.map(str::to_string);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        if let Some(ns) = &ns {
            if let Err(e) = netns::enter(ns) {
                let _ = ready_tx.send(Err(e));
                return;
            }
        }
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.into()));
                return;
            }
        };
        rt.block_on(async move {
            let mut addrs = Vec::new();
            for ip in ips {
                let bind = |port| TcpListener::bind(SocketAddr::new(ip, port));
                let (echo, sink) = match (bind(echo_port).await, bind(sink_port).await) {
                    (Ok(e), Ok(s)) => (e, s),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("binding servers on {ip}: {e}")));
                        return;
                    }
                };
                addrs.push(ServerAddrs { echo: echo.local_addr().unwrap(), sink: sink.local_addr().unwrap() });
                tokio::spawn(serve(echo, true));
                tokio::spawn(serve(sink, false));
            }
            let _ = ready_tx.send(Ok(addrs));
            let _ = stop_rx.await;
        });
    });
    let addrs = ready_rx.recv().map_err(|_| anyhow::anyhow!("server thread died"))??;
    Ok(Servers { addrs, stop: Some(stop_tx), thread: Some(thread) })
}

async fn serve(listener: TcpListener, echo: bool) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if echo && s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown().await;
        });
    }
}

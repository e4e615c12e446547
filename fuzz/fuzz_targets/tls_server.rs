//! Arbitrary bytes from a peer, as the server side of our TLS adapter sees them: over a real
//! loopback TCP connection, through the handshake and, if one ever completes, a read to the end.
//! Any panic or hang is a finding; errors are the expected outcome.

#![no_main]

use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;
use ztunnel::tls::WorkloadCert;
use ztunnel::tls::ca::LocalCa;
use ztunnel::tls::stream::TlsStream;

struct Harness {
    rt: monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>,
    listener: monoio::net::TcpListener,
    addr: std::net::SocketAddr,
    cert: Arc<WorkloadCert>,
}

thread_local! {
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

fn harness() -> Harness {
    let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).expect("CA");
    let cert = ca.issue(&"spiffe://cluster.local/ns/f/sa/server".parse().unwrap(), SystemTime::now()).expect("cert");
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("runtime");
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = std_listener.local_addr().unwrap();
    let listener = rt.block_on(async { monoio::net::TcpListener::from_std(std_listener).expect("listener") });
    Harness { rt, listener, addr, cert: Arc::new(cert) }
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        let h = h.get_or_insert_with(harness);
        // The peer's bytes are written up front (loopback buffers hold them), then its side ends.
        let mut peer = std::net::TcpStream::connect(h.addr).expect("connect");
        let _ = peer.write_all(data);
        let _ = peer.shutdown(std::net::Shutdown::Write);
        let Harness { rt, listener, cert, .. } = h;
        let (listener, cert) = (&*listener, cert.clone());
        rt.block_on(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let conn = rustls::server::UnbufferedServerConnection::new(cert.server_config()).expect("server config");
            let run = async {
                if let Ok(mut tls) = TlsStream::handshake(tcp, conn).await {
                    let mut sink = Vec::new();
                    let _ = tls.read_to_end(&mut sink).await;
                }
            };
            if monoio::time::timeout(Duration::from_secs(10), run).await.is_err() {
                panic!("the adapter hung on {} peer bytes", data.len());
            }
        });
    });
});

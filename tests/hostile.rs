//! Hostile peers, pods and configs against a real in-process proxy: what each can do must stay
//! bounded (memory, descriptors, time) and must never widen what authorization allows. Each
//! test here failed before the fix it covers.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use ztunnel::config::Config;
use ztunnel::model::Identity;
use ztunnel::tls::ca::LocalCa;
use ztunnel::tls::stream::TlsStream;

const POD: &str = r#"
workloads:
- {uid: pod, name: pod, namespace: ns, serviceAccount: pod, workloadIps: [127.0.0.3], protocol: HBONE}
"#;

/// A proxy for `client` (127.0.0.1) and a plain TCP `server` workload (127.0.0.2), adjusted.
fn client_and_server_proxy(tag: &str, adjust: impl FnOnce(&mut Config)) -> (ztunnel::app::Proxy, TestDir) {
    let dir = TestDir::new(tag);
    let yaml = "workloads:\n- {uid: client, name: client, namespace: ns, workloadIps: [127.0.0.1]}\n\
                - {uid: server, name: server, namespace: ns, workloadIps: [127.0.0.2]}\n";
    let mut cfg = Config::for_tests(dir.write_config(yaml));
    adjust(&mut cfg);
    (start_with(cfg), dir)
}

fn pod_id() -> Identity {
    "spiffe://cluster.local/ns/ns/sa/pod".parse().unwrap()
}

/// A proxy serving [`POD`] with its certificate issued, a `sleep` client certificate of the same
/// mesh, and the pod's HBONE address.
fn pod_proxy(tag: &str) -> (ztunnel::app::Proxy, TestDir, ztunnel::tls::WorkloadCert, SocketAddr) {
    let dir = TestDir::new(tag);
    let cfg = Config::for_tests(dir.write_config(POD));
    let client = mesh_client(&cfg, "sleep");
    let proxy = start_with(cfg);
    wait_for_certificates(&proxy, 1);
    let hbone = SocketAddr::new("127.0.0.3".parse().unwrap(), proxy.addrs.inbound.port());
    (proxy, dir, client, hbone)
}

/// A client certificate of the proxy's own mesh (its local CA).
fn mesh_client(cfg: &Config, sa: &str) -> ztunnel::tls::WorkloadCert {
    let (ca, _) = LocalCa::from_config(&cfg.ca, "cluster.local", Duration::from_secs(3600)).unwrap();
    ca.issue(&format!("spiffe://cluster.local/ns/ns/sa/{sa}").parse().unwrap(), SystemTime::now()).unwrap()
}

#[test]
fn a_client_that_never_sends_the_http2_preface_is_closed() {
    let (proxy, _dir, client, hbone) = pod_proxy("hostile-preface");
    let took = block_on(async move {
        let start = Instant::now();
        let mut waits = Vec::new();
        for half in [false, true] {
            let mut tls = tls_to(hbone, &client).await;
            if half {
                use tokio::io::AsyncWriteExt;
                tls.write_all(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..12]).await.unwrap();
                tls.flush().await.unwrap();
            }
            waits.push(monoio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 64];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            }));
        }
        for w in waits {
            monoio::time::timeout(Duration::from_secs(20), w).await.expect("the proxy closed the connection");
        }
        start.elapsed()
    });
    println!("silent and half-preface HBONE clients closed after {took:?}");
    stop(proxy);
}

#[test]
fn an_allow_policy_whose_only_match_is_empty_admits_no_one() {
    let httpbin = EchoServer::start("127.0.0.3", "httpbin");
    let dir = TestDir::new("hostile-empty-match");
    let yaml = r#"
workloads:
- {uid: sleep, name: sleep, namespace: demo, serviceAccount: sleep, workloadIps: [127.0.0.1], protocol: HBONE}
- {uid: httpbin, name: httpbin, namespace: demo, serviceAccount: httpbin, workloadIps: [127.0.0.3], protocol: HBONE}
policies:
- {name: odd, namespace: demo, scope: Namespace, action: Allow, rules: [[[{}]]]}
"#;
    for fast in [false, true] {
        let mut cfg = Config::for_tests(dir.write_config(yaml));
        cfg.node_local_fast_path = fast;
        let proxy = start_own_hbone(cfg);
        wait_for_certificates(&proxy, 2);
        let s5 = proxy.addrs.socks5.unwrap();
        let refused = socks5_from(Some("127.0.0.1".parse().unwrap()), s5, Dest::Addr(httpbin.addr));
        assert_eq!(refused.err(), Some(2), "an ALLOW with only an empty match admits no one (fast path {fast})");
        stop(proxy);
    }
}

#[test]
fn a_pooled_connection_does_not_serve_the_next_pod_at_its_address() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let (proxy, dir, client, hbone) = pod_proxy("hostile-ip-reuse");
    let target = format!("127.0.0.3:{}", pod.addr.port());
    let generation = || config_dump(&proxy)["generation"].as_u64().unwrap_or(0);
    let reused = r#"
workloads:
- {uid: pod-2, name: pod-2, namespace: other, serviceAccount: other, workloadIps: [127.0.0.3], protocol: HBONE}
"#;
    let (first_ended, status) = block_on(async {
        let (mut send, _driver) = hbone_connect(hbone, &client, &pod_id()).await;
        let (status, _up, mut down) = request(&mut send, Method::CONNECT, &target).await;
        assert_eq!(status, StatusCode::OK);
        let before = generation();
        // The pod is deleted and its address given to another pod.
        dir.write_config(reused);
        while generation() == before {
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        monoio::time::sleep(Duration::from_millis(100)).await;
        // The open stream to the deleted pod is closed by the re-check.
        let first_ended = monoio::time::timeout(Duration::from_secs(10), async {
            loop {
                match down.data().await {
                    Some(Ok(_)) => continue,
                    _ => return,
                }
            }
        })
        .await
        .is_ok();
        // A new stream on the same connection is refused, not sent to the new pod.
        let req = http::Request::builder().method(Method::CONNECT).uri(target.as_str()).body(()).unwrap();
        let status = match send.clone().ready().await {
            Ok(mut ready) => match ready.send_request(req, true) {
                Ok((resp, _)) => resp.await.map(|r| r.status()).ok(),
                Err(_) => None,
            },
            Err(_) => None,
        };
        (first_ended, status)
    });
    assert!(first_ended, "the stream to the deleted pod was closed");
    assert!(
        status.is_none_or(|s| s == StatusCode::SERVICE_UNAVAILABLE),
        "a new stream gets 503 or a closed connection, got {status:?}"
    );
    stop(proxy);
}

#[test]
fn a_panicking_connection_takes_only_itself_down() {
    let server = EchoServer::start("127.0.0.2", "server");
    let (proxy, _dir) = client_and_server_proxy("hostile-panic", |cfg| cfg.worker_threads = 1);
    let s5 = proxy.addrs.socks5.unwrap();
    // A hostname the test build answers with a panic inside the connection's task.
    let panicked = socks5(s5, Dest::Name("panic.ztunnel.test", 80));
    assert!(panicked.is_err(), "the panicking connection is closed");
    // The one worker still serves.
    let mut ok = socks5(s5, Dest::Addr(server.addr)).expect("the worker survived the panic");
    assert_eq!(read_greeting(&mut ok), "server");
    echo_roundtrip(&mut ok, b"still here");
    let (status, _) = http(proxy.addrs.readiness, "GET", "/healthz/ready").unwrap();
    assert_eq!(status, 200, "readiness stays up");
    let samples = scrape(&proxy);
    assert_eq!(sample(&samples, "ztunnel_task_panics_total", &[]), Some(1.0));
    stop(proxy);
}

#[test]
fn control_ports_bound_silent_clients_and_never_quit_on_request() {
    let dir = TestDir::new("hostile-control");
    let proxy = start_with(Config::for_tests(dir.write_config(POD)));
    // 300 clients that connect and say nothing: most are closed at once, none stays long.
    let mut silent: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(proxy.addrs.metrics).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let closed_at_once = silent
        .iter_mut()
        .map(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            !matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .filter(|closed| *closed)
        .count();
    assert!(closed_at_once >= 300 - 64, "over the cap, connections are closed at once ({closed_at_once} of 300)");
    drop(silent);
    // Once they are gone, scrapes work; a burst of them is served from one render.
    assert!(eventually(|| http(proxy.addrs.metrics, "GET", "/metrics").is_ok_and(|(s, _)| s == 200)));
    // Only the admin port may stop the proxy.
    for port in [proxy.addrs.metrics, proxy.addrs.readiness] {
        let (status, _) = http(port, "POST", "/quitquitquit").unwrap();
        assert_ne!(status, 200, "POST /quitquitquit on {port}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = http(proxy.addrs.readiness, "GET", "/healthz/ready").unwrap();
    assert_eq!(status, 200, "still running and ready");
    stop(proxy);
}

/// A peer that completes TLS and HTTP/2 but never lets a CONNECT through: one advertising no
/// stream at all, or one that never answers. Setup fails at the connect timeout, and the pool
/// does not dial without bound.
#[test]
fn an_hbone_peer_that_grants_no_stream_or_never_answers_fails_setup_in_time() {
    for zero_streams in [true, false] {
        let dir = TestDir::new(if zero_streams { "hostile-zero-streams" } else { "hostile-no-answer" });
        let yaml = r#"
workloads:
- {uid: client, name: client, namespace: ns, serviceAccount: client, workloadIps: [127.0.0.1], protocol: HBONE, node: here}
- {uid: far, name: far, namespace: ns, serviceAccount: far, workloadIps: [127.0.0.4], protocol: HBONE, node: elsewhere}
"#;
        let mut cfg = Config::for_tests(dir.write_config(yaml));
        cfg.node_name = Some("here".into());
        cfg.connect_timeout = Duration::from_millis(800);
        let far = mesh_client(&cfg, "far");
        let (peer_addr, accepted) = stubborn_peer(far, zero_streams);
        cfg.hbone_port = peer_addr.port();
        let proxy = start_with(cfg);
        let s5 = proxy.addrs.socks5.unwrap();
        let target = SocketAddr::new("127.0.0.4".parse().unwrap(), 80);
        for _ in 0..12 {
            let start = Instant::now();
            let res = socks5_from(Some("127.0.0.1".parse().unwrap()), s5, Dest::Addr(target));
            let took = start.elapsed();
            assert!(res.is_err(), "no stream, no connection");
            assert!(took < Duration::from_secs(4), "failed after {took:?}, not at the SOCKS5 setup limit");
        }
        let dials = accepted.load(std::sync::atomic::Ordering::SeqCst);
        println!("zero streams {zero_streams}: the pool dialed {dials} connections for 12 requests");
        // At most one dial per request (a refusal on a fresh connection is not retried), and
        // none at all once the pool knows the peer allows no stream.
        assert!(dials <= 12, "{dials} connections to one peer for 12 requests");
        stop(proxy);
    }
}

/// An HBONE server at 127.0.0.4 (as the `far` identity) that accepts TLS and HTTP/2 and then
/// either advertises zero concurrent streams or never answers a CONNECT. Returns its address and
/// a count of the connections it accepted.
fn stubborn_peer(
    cert: ztunnel::tls::WorkloadCert,
    zero_streams: bool,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.4:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = monoio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let config = cert.server_config();
                monoio::spawn(async move {
                    let conn = rustls::server::UnbufferedServerConnection::new(config).unwrap();
                    let Ok(tls) = TlsStream::handshake(tcp, conn).await else { return };
                    let mut builder = h2::server::Builder::new();
                    if zero_streams {
                        builder.max_concurrent_streams(0);
                    }
                    let Ok(mut h2) = builder.handshake::<_, Bytes>(tls).await else { return };
                    let mut held = Vec::new();
                    // Accept streams (if any are allowed) and never answer them.
                    while let Some(Ok((_req, respond))) = h2.accept().await {
                        held.push(respond);
                    }
                });
            }
        });
    });
    (addr, accepted)
}

// Handshakes that must fail (TLS 1.2, no client certificate, foreign root or trust domain, two
// URI SANs, no SPIFFE identity, resumption) are unit tests of `tls`, run as real rustls
// handshakes in memory.

/// A listener on `ip` that counts the connections it accepts (and holds them).
fn counting_listener(ip: &str) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(c);
        }
    });
    (addr, count)
}

#[test]
fn connect_authority_variants_get_their_status_and_dial_nothing() {
    let (pod, dials) = counting_listener("127.0.0.3");
    let other = EchoServer::start("127.0.0.2", "other");
    let dir = TestDir::new("hostile-authority");
    let yaml = r#"
workloads:
- {uid: pod, name: pod, namespace: ns, serviceAccount: pod, workloadIps: [127.0.0.3], protocol: HBONE}
- {uid: other, name: other, namespace: ns, serviceAccount: other, workloadIps: [127.0.0.2], protocol: HBONE}
"#;
    let cfg = Config::for_tests(dir.write_config(yaml));
    let client = mesh_client(&cfg, "sleep");
    let proxy = start_with(cfg);
    wait_for_certificates(&proxy, 2);
    let hbone = SocketAddr::new("127.0.0.3".parse().unwrap(), proxy.addrs.inbound.port());
    // The proxy's ports at the pod's address: its wildcard HBONE listener and the well-known
    // ports. (Its other listeners are on 127.0.0.1 here; their ports at 127.0.0.3 are someone
    // else's, and another test's server may hold one of them.)
    let own = [proxy.addrs.inbound.port(), 15000, 15008, 15020, 15021];
    let mut cases = vec![
        (Method::CONNECT, "127.0.0.3:0".to_string(), StatusCode::SERVICE_UNAVAILABLE),
        (Method::CONNECT, format!("127.0.0.2:{}", other.addr.port()), StatusCode::BAD_REQUEST),
        (Method::CONNECT, format!("example.com:{}", pod.port()), StatusCode::BAD_REQUEST),
        (Method::GET, format!("http://127.0.0.3:{}/", pod.port()), StatusCode::BAD_REQUEST),
    ];
    for port in own {
        cases.push((Method::CONNECT, format!("127.0.0.3:{port}"), StatusCode::SERVICE_UNAVAILABLE));
    }
    block_on(async move {
        let mut send = hbone_client(hbone, &client, &pod_id()).await;
        for (method, uri, want) in &cases {
            let (status, ..) = request(&mut send, method.clone(), uri).await;
            assert_eq!(status, *want, "{method} {uri}");
        }
        // The v4-mapped form of the pod's address is the pod.
        let (status, ..) = request(&mut send, Method::CONNECT, &format!("[::ffff:127.0.0.3]:{}", pod.port())).await;
        assert_eq!(status, StatusCode::OK);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(dials.load(std::sync::atomic::Ordering::SeqCst), 1, "only the accepted CONNECT dialed the pod");
    stop(proxy);
}

#[test]
fn socks5_abuse_is_refused_without_harm() {
    let server = EchoServer::start("127.0.0.2", "server");
    let (proxy, _dir) =
        client_and_server_proxy("hostile-socks5", |cfg| cfg.connect_timeout = Duration::from_millis(500));
    let s5 = proxy.addrs.socks5.unwrap();
    let exchange = |bytes: &[u8]| -> Vec<u8> {
        let mut s = TcpStream::connect(s5).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        use std::io::Write;
        s.write_all(bytes).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    };
    // 255 methods, none of them no-auth: "no acceptable method".
    let mut greeting = vec![5, 255];
    greeting.extend(1..=255u8);
    assert_eq!(exchange(&greeting), vec![5, 0xFF]);
    // BIND and UDP ASSOCIATE: "command not supported"; a bad address type: "not supported".
    let bind = exchange(&[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 2, 0, 80]);
    assert_eq!(bind[..2], [5, 0]);
    assert_eq!(bind[2..4], [5, 7]);
    let udp = exchange(&[5, 1, 0, 5, 3, 0, 1, 127, 0, 0, 2, 0, 80]);
    assert_eq!(udp[2..4], [5, 7]);
    let atyp = exchange(&[5, 1, 0, 5, 1, 0, 9, 127, 0, 0, 2, 0, 80]);
    assert_eq!(atyp[2..4], [5, 8]);
    // The proxy's own ports: "not allowed".
    for port in [proxy.addrs.socks5.unwrap().port(), proxy.addrs.admin.port(), 15008] {
        let own = socks5(s5, Dest::Addr(SocketAddr::new("127.0.0.1".parse().unwrap(), port)));
        assert_eq!(own.err(), Some(2), "the proxy's own port {port}");
    }
    // A stalled length byte: closed at the handshake limit, not held.
    let start = Instant::now();
    let stalled = exchange(&[5, 1, 0, 5, 1, 0, 3]);
    assert_eq!(stalled, vec![5, 0], "only the method answer, then closed");
    assert!(start.elapsed() < Duration::from_secs(15), "closed at the setup limit ({:?})", start.elapsed());
    // And the proxy still serves.
    let mut ok = socks5(s5, Dest::Addr(server.addr)).unwrap();
    assert_eq!(read_greeting(&mut ok), "server");
    stop(proxy);
}

#[test]
fn metrics_clients_that_never_read_are_bounded() {
    let dir = TestDir::new("hostile-metrics");
    let proxy = start_with(Config::for_tests(dir.write_config(POD)));
    // 500 clients ask for the page and never read it.
    let clients: Vec<TcpStream> = (0..500)
        .filter_map(|_| {
            let mut s = TcpStream::connect(proxy.addrs.metrics).ok()?;
            use std::io::Write;
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").ok()?;
            Some(s)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // The proxy's side: at most its cap of connections still open.
    let held = established_on(proxy.addrs.metrics.port());
    println!("metrics connections the proxy holds for 500 never-reading clients: {held}");
    assert!(held <= ztunnel::control::http::MAX_CONNECTIONS, "{held} connections held");
    drop(clients);
    assert!(eventually(|| http(proxy.addrs.metrics, "GET", "/metrics").is_ok_and(|(s, _)| s == 200)));
    stop(proxy);
}

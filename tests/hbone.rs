//! Inbound HBONE against a real proxy: the test is the HBONE client (its own certificate from
//! the proxy's local CA, our TLS adapter, h2's client) and checks the CONNECT outcomes of
//! COMPAT.md: 200 with bytes both ways, and each refusal status.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use ztunnel::config::Config;
use ztunnel::model::Identity;
use ztunnel::tls::ca::LocalCa;
use ztunnel::tls::stream::TlsStream;

async fn read_at_least(body: &mut h2::RecvStream, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        let Some(chunk) = body.data().await else { break };
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    got
}

/// `sleep` on 127.0.0.1 calling `pod` (service account `httpbin`) on 127.0.0.3, both HBONE.
const SLEEP_AND_POD: &str = r#"
workloads:
- {uid: sleep, name: sleep, namespace: ns, serviceAccount: sleep, workloadIps: [127.0.0.1], protocol: HBONE}
- {uid: pod, name: pod, namespace: ns, serviceAccount: httpbin, workloadIps: [127.0.0.3], protocol: HBONE}
"#;

#[test]
fn inbound_hbone_connect_statuses_and_bytes() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let other = EchoServer::start("127.0.0.2", "other");
    let dir = TestDir::new("hbone");
    let yaml = r#"
workloads:
- {uid: pod, name: pod, namespace: ns, serviceAccount: pod, workloadIps: [127.0.0.3], protocol: HBONE}
- {uid: other, name: other, namespace: ns, serviceAccount: other, workloadIps: [127.0.0.2], protocol: HBONE}
"#;
    let cfg = Config::for_tests(dir.write_config(yaml));
    let ca_cfg = cfg.ca.clone();
    let proxy = start_with(cfg);
    let pod_id: Identity = "spiffe://cluster.local/ns/ns/sa/pod".parse().unwrap();
    assert!(
        eventually(|| config_dump(&proxy)["certificates"].as_array().is_some_and(|c| c
            .iter()
            .filter(|c| c["state"] == "Available")
            .count()
            == 2)),
        "certificates for both local HBONE workloads"
    );
    // A client in the same mesh: a certificate from the same local CA root.
    let (ca, _) = LocalCa::from_config(&ca_cfg, "cluster.local", Duration::from_secs(3600)).unwrap();
    let client = ca.issue(&"spiffe://cluster.local/ns/ns/sa/sleep".parse().unwrap(), SystemTime::now()).unwrap();
    let hbone = SocketAddr::new("127.0.0.3".parse().unwrap(), proxy.addrs.inbound.port());
    let (pod_port, other_port) = (pod.addr.port(), other.addr.port());
    block_on(async move {
        let mut send = hbone_client(hbone, &client, &pod_id).await;
        // 200, then bytes both ways.
        let (status, mut up, mut down) = request(&mut send, Method::CONNECT, &format!("127.0.0.3:{pod_port}")).await;
        assert_eq!(status, StatusCode::OK);
        up.send_data(Bytes::from_static(b"hello"), false).unwrap();
        let got = read_at_least(&mut down, b"pod\nhello".len()).await;
        assert_eq!(got, b"pod\nhello");
        // Half-close: END_STREAM reaches the pod, whose close comes back as END_STREAM.
        up.send_data(Bytes::new(), true).unwrap();
        assert!(read_at_least(&mut down, 1).await.is_empty());
        // Several streams share the one connection.
        for _ in 0..3 {
            let (status, ..) = request(&mut send, Method::CONNECT, &format!("127.0.0.3:{pod_port}")).await;
            assert_eq!(status, StatusCode::OK);
        }
        // Refusals, in COMPAT.md's order.
        let cases = [
            (Method::GET, "http://127.0.0.3/".to_string(), StatusCode::BAD_REQUEST),
            // A target that is no workload at all: 400, like any target but the connection's
            // own workload (the connection's destination decides, not a lookup of the target).
            (Method::CONNECT, "127.0.0.9:80".to_string(), StatusCode::BAD_REQUEST),
            (Method::CONNECT, format!("127.0.0.2:{other_port}"), StatusCode::BAD_REQUEST),
            // The target's port is checked only once it is the connection's own workload.
            (Method::CONNECT, "127.0.0.9:15008".to_string(), StatusCode::BAD_REQUEST),
            (Method::CONNECT, "127.0.0.3:15008".to_string(), StatusCode::SERVICE_UNAVAILABLE),
            (Method::CONNECT, "127.0.0.3:1".to_string(), StatusCode::SERVICE_UNAVAILABLE),
        ];
        for (method, uri, want) in cases {
            let (status, ..) = request(&mut send, method.clone(), &uri).await;
            assert_eq!(status, want, "{method} {uri}");
        }
    });
    stop(proxy);
}

#[test]
/// A client of another mesh (another root) cannot talk to the proxy: the handshake fails. (That
/// the proxy itself refuses a foreign client certificate is covered by the `tls` unit tests.)
fn inbound_hbone_and_a_client_of_another_mesh_do_not_connect() {
    let _pod = EchoServer::start("127.0.0.3", "pod");
    let dir = TestDir::new("hbone-foreign");
    let yaml = "workloads:\n- {uid: pod, name: pod, namespace: ns, serviceAccount: pod, workloadIps: [127.0.0.3], protocol: HBONE}\n";
    let proxy = start(&dir.write_config(yaml));
    assert!(eventually(|| config_dump(&proxy)["certificates"][0]["state"] == "Available"));
    let stranger_ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let stranger =
        stranger_ca.issue(&"spiffe://cluster.local/ns/ns/sa/sleep".parse().unwrap(), SystemTime::now()).unwrap();
    let hbone = SocketAddr::new("127.0.0.3".parse().unwrap(), proxy.addrs.inbound.port());
    let refused = block_on(async move {
        let tcp = monoio::net::TcpStream::connect_addr(hbone).await.unwrap();
        let conn = UnbufferedClientConnection::new(stranger.client_config(), ServerName::IpAddress(hbone.ip().into()))
            .unwrap();
        // Our own check fails first: the proxy's certificate is from a root we do not trust.
        TlsStream::handshake(tcp, conn).await.is_err()
    });
    assert!(refused);
    stop(proxy);
}

#[test]
fn outbound_hbone_end_to_end_through_one_proxy() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let dir = TestDir::new("hbone-e2e");
    let yaml = format!(
        r#"
workloads:
- {{uid: sleep, name: sleep, namespace: ns, serviceAccount: sleep, workloadIps: [127.0.0.1], protocol: HBONE}}
- uid: pod
  name: pod
  namespace: ns
  serviceAccount: httpbin
  workloadIps: [127.0.0.3]
  protocol: HBONE
  services: {{"ns/httpbin.ns.svc.cluster.local": {{8000: {port}}}}}
services:
- {{name: httpbin, namespace: ns, hostname: httpbin.ns.svc.cluster.local, vips: ["/127.10.0.8"], ports: {{8000: {port}}}}}
"#,
        port = pod.addr.port()
    );
    let cfg = Config::for_tests(dir.write_config(&yaml));
    let proxy = start_both_ends(cfg);
    wait_for_certificates(&proxy, 2);
    let s5 = proxy.addrs.socks5.unwrap();
    for dest in [
        Dest::Addr(pod.addr),
        Dest::Addr("127.10.0.8:8000".parse().unwrap()),
        Dest::Name("httpbin.ns.svc.cluster.local", 8000),
    ] {
        let mut c = socks5(s5, dest).expect("HBONE destination reached");
        assert_eq!(read_greeting(&mut c), "pod");
        echo_roundtrip(&mut c, b"through mTLS and HTTP/2 CONNECT");
    }
    // Bulk both ways with half-close, through the HTTP/2 stream.
    let mut c = socks5(s5, Dest::Addr(pod.addr)).unwrap();
    assert_eq!(read_greeting(&mut c), "pod");
    let payload: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let mut reader = c.try_clone().unwrap();
    let read = std::thread::spawn(move || {
        use std::io::Read;
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        got
    });
    use std::io::Write;
    c.write_all(&payload).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(read.join().unwrap() == payload, "2 MiB intact through HBONE, both half-closes delivered");
    stop(proxy);
}

#[test]
fn pooled_connections_carry_100_streams_then_open_another() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let dir = TestDir::new("hbone-pool");
    let yaml = SLEEP_AND_POD;
    let mut cfg = Config::for_tests(dir.write_config(yaml));
    cfg.worker_threads = 1; // one worker, one pool
    cfg.pool_idle_timeout = Duration::from_secs(1);
    let proxy = start_both_ends(cfg);
    let port = proxy.addrs.inbound.port();
    wait_for_certificates(&proxy, 2);
    let s5 = proxy.addrs.socks5.unwrap();
    let mut open = Vec::new();
    for _ in 0..100 {
        let mut c = socks5(s5, Dest::Addr(pod.addr)).unwrap();
        assert_eq!(read_greeting(&mut c), "pod");
        open.push(c);
    }
    assert_eq!(established_on(port), 1, "100 streams share one HBONE connection");
    let mut c = socks5(s5, Dest::Addr(pod.addr)).unwrap();
    assert_eq!(read_greeting(&mut c), "pod");
    open.push(c);
    assert_eq!(established_on(port), 2, "the 101st stream opens a second connection");
    for c in open.iter_mut() {
        echo_roundtrip(c, b"still flowing");
    }
    drop(open);
    // Unused connections are released after POOL_UNUSED_RELEASE_TIMEOUT.
    assert!(eventually(|| established_on(port) == 0), "idle pooled connections released");
    stop(proxy);
}

#[test]
fn node_local_fast_path_on_and_off_both_deliver() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let dir = TestDir::new("hbone-fast");
    let yaml = SLEEP_AND_POD;
    let path = dir.write_config(yaml);
    for fast in [true, false] {
        let mut cfg = Config::for_tests(path.clone());
        cfg.node_local_fast_path = fast;
        let proxy = start_own_hbone(cfg);
        let port = proxy.addrs.inbound.port();
        wait_for_certificates(&proxy, 2);
        let mut c = socks5(proxy.addrs.socks5.unwrap(), Dest::Addr(pod.addr)).expect("pod reached");
        assert_eq!(read_greeting(&mut c), "pod");
        echo_roundtrip(&mut c, b"same bytes either way");
        let hbone_conns = established_on(port);
        if fast {
            assert_eq!(hbone_conns, 0, "fast path: no TLS connection to our own HBONE port");
        } else {
            assert_eq!(hbone_conns, 1, "fast path off: the stream goes over HBONE");
        }
        drop(c);
        stop(proxy);
    }
}

/// What a test HBONE peer saw in a CONNECT request.
#[derive(Debug)]
struct SeenConnect {
    authority: String,
    headers: http::HeaderMap,
    client: Option<Identity>,
}

/// A stand-in waypoint: an HBONE server on `addr` presenting `cert`, answering every CONNECT
/// with 200, greeting `wp\n` and echoing; each request's details go to the returned channel.
fn fake_waypoint(
    listener: std::net::TcpListener,
    cert: std::sync::Arc<ztunnel::tls::WorkloadCert>,
) -> std::sync::mpsc::Receiver<SeenConnect> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        block_on(async move {
            let listener = monoio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let conn = rustls::server::UnbufferedServerConnection::new(cert.server_config()).unwrap();
                let tx = tx.clone();
                monoio::spawn(async move {
                    let Ok(tls) = TlsStream::handshake(tcp, conn).await else { return };
                    let client = ztunnel::tls::peer_identity(tls.peer_certificates());
                    let Ok(mut h2) = h2::server::handshake(tls).await else { return };
                    while let Some(Ok((req, mut respond))) = h2.accept().await {
                        let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
                        let _ =
                            tx.send(SeenConnect { authority, headers: req.headers().clone(), client: client.clone() });
                        let mut body = req.into_body();
                        let mut send = respond.send_response(http::Response::new(()), false).unwrap();
                        send.send_data(Bytes::from_static(b"wp\n"), false).unwrap();
                        monoio::spawn(async move {
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                if send.send_data(chunk, false).is_err() {
                                    break;
                                }
                            }
                            let _ = send.send_data(Bytes::new(), true);
                        });
                    }
                });
            }
        })
    });
    rx
}

#[test]
fn service_waypoint_gets_the_original_destination_and_headers() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let dir = TestDir::new("hbone-waypoint");
    let wp_listener = std::net::TcpListener::bind("127.0.0.5:0").unwrap();
    let wp_port = wp_listener.local_addr().unwrap().port();
    let yaml = format!(
        r#"
workloads:
- {{uid: sleep, name: sleep, namespace: ns, serviceAccount: sleep, workloadIps: [127.0.0.1], protocol: HBONE, canonicalName: sleep, canonicalRevision: v1, workloadName: sleep, workloadType: deployment}}
- {{uid: wp, name: waypoint, namespace: ns, serviceAccount: waypoint, workloadIps: [127.0.0.5], protocol: HBONE, node: elsewhere}}
- uid: pod
  name: pod
  namespace: ns
  serviceAccount: httpbin
  workloadIps: [127.0.0.3]
  protocol: HBONE
  services: {{"ns/httpbin.ns.svc.cluster.local": {{8000: {port}}}}}
services:
- name: httpbin
  namespace: ns
  hostname: httpbin.ns.svc.cluster.local
  vips: ["/127.10.0.8"]
  ports: {{8000: {port}}}
  waypoint: {{destination: "/127.0.0.5", hboneMtlsPort: {wp_port}}}
"#,
        port = pod.addr.port()
    );
    let cfg = Config::for_tests(dir.write_config(&yaml));
    // The proxy's local CA, made first: the proxy loads the same root from the directory.
    let (ca, _) = LocalCa::from_config(&cfg.ca, "cluster.local", Duration::from_secs(3600)).unwrap();
    let wp_id: Identity = "spiffe://cluster.local/ns/ns/sa/waypoint".parse().unwrap();
    let wp_cert = std::sync::Arc::new(ca.issue(&wp_id, SystemTime::now()).unwrap());
    let seen = fake_waypoint(wp_listener, wp_cert);
    let proxy = start_with(cfg);
    assert!(eventually(|| config_dump(&proxy)["certificates"].as_array().is_some_and(|c| c
        .iter()
        .any(|c| c["identity"] == "spiffe://cluster.local/ns/ns/sa/sleep" && c["state"] == "Available"))));
    let s5 = proxy.addrs.socks5.unwrap();
    let mut c = socks5(s5, Dest::Addr("127.10.0.8:8000".parse().unwrap())).expect("waypoint reached");
    assert_eq!(read_greeting(&mut c), "wp", "the service's traffic goes to its waypoint");
    echo_roundtrip(&mut c, b"via the waypoint");
    let req = seen.recv_timeout(PATIENCE).unwrap();
    assert_eq!(req.authority, "127.10.0.8:8000", "the original VIP:port, not translated");
    assert_eq!(req.client.as_ref().map(|i| i.to_string()).as_deref(), Some("spiffe://cluster.local/ns/ns/sa/sleep"));
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let forwarded = header("forwarded");
    assert!(forwarded.starts_with("for=\"127.0.0.1:"), "{forwarded}");
    assert!(forwarded.ends_with(";host=httpbin.ns.svc.cluster.local"), "{forwarded}");
    let baggage = header("baggage");
    for kv in ["k8s.namespace.name=ns", "k8s.deployment.name=sleep", "service.name=sleep", "service.version=v1"] {
        assert!(baggage.split(',').any(|p| p == kv), "{kv} in {baggage}");
    }
    let traceparent = header("traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert!(parts.len() == 4 && parts[0] == "00" && parts[1].len() == 32 && parts[2].len() == 16, "{traceparent}");
    // Traffic addressed to the pod itself has no waypoint: straight to the pod (fast path).
    let mut direct = socks5(s5, Dest::Addr(pod.addr)).unwrap();
    assert_eq!(read_greeting(&mut direct), "pod");
    stop(proxy);
}

#[test]
fn certificate_renewal_under_an_open_connection_loses_no_bytes() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let dir = TestDir::new("hbone-renew");
    let yaml = SLEEP_AND_POD;
    let mut cfg = Config::for_tests(dir.write_config(yaml));
    cfg.secret_ttl = Duration::from_secs(3); // renewed about every 1.5 s
    let proxy = start_both_ends(cfg);
    wait_for_certificates(&proxy, 2);
    let serials = |proxy: &ztunnel::app::Proxy| -> Vec<String> {
        let dump = config_dump(proxy);
        let mut s: Vec<String> = dump["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["certChain"][0]["serialNumber"].to_string())
            .collect();
        s.sort();
        s
    };
    let before = serials(&proxy);
    assert!(before.iter().all(|s| s.len() > 10), "serials listed: {before:?}");
    let s5 = proxy.addrs.socks5.unwrap();
    let mut c = socks5(s5, Dest::Addr(pod.addr)).unwrap();
    assert_eq!(read_greeting(&mut c), "pod");
    // Keep bytes flowing on the one connection while certificates are replaced under it.
    let started = std::time::Instant::now();
    let mut renewed = false;
    let mut i = 0u32;
    while started.elapsed() < PATIENCE && !(renewed && i >= 50) {
        let msg: Vec<u8> = (0..16 * 1024).map(|b| ((b as u32 + i) % 251) as u8).collect();
        echo_roundtrip(&mut c, &msg);
        i += 1;
        renewed = renewed || serials(&proxy).iter().all(|s| !before.contains(s));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(renewed, "both certificates were renewed while the connection was open");
    echo_roundtrip(&mut c, b"still the same connection");
    // And a new stream after renewal works.
    let mut fresh = socks5(s5, Dest::Addr(pod.addr)).unwrap();
    assert_eq!(read_greeting(&mut fresh), "pod");
    echo_roundtrip(&mut fresh, b"after renewal");
    stop(proxy);
}

#[test]
fn a_source_without_a_prefetched_certificate_gets_one_on_demand() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let dir = TestDir::new("hbone-on-demand");
    // The client is a plain TCP workload: nobody fetches its certificate ahead of time.
    let yaml = r#"
workloads:
- {uid: sleep, name: sleep, namespace: ns, serviceAccount: sleep, workloadIps: [127.0.0.1], protocol: TCP}
- {uid: pod, name: pod, namespace: ns, serviceAccount: httpbin, workloadIps: [127.0.0.3], protocol: HBONE}
"#;
    let proxy = start_both_ends(Config::for_tests(dir.write_config(yaml)));
    wait_for_certificates(&proxy, 1);
    let mut c = socks5(proxy.addrs.socks5.unwrap(), Dest::Addr(pod.addr)).expect("reached once the certificate came");
    assert_eq!(read_greeting(&mut c), "pod");
    echo_roundtrip(&mut c, b"with a certificate fetched on demand");
    let dump = config_dump(&proxy);
    let ids: Vec<&str> =
        dump["certificates"].as_array().unwrap().iter().filter_map(|c| c["identity"].as_str()).collect();
    assert!(ids.contains(&"spiffe://cluster.local/ns/ns/sa/sleep"), "{ids:?}");
    stop(proxy);
}

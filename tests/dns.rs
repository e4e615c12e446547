//! The DNS proxy in-process, in dedicated mode (the pod's server in in-pod mode is the same code;
//! `tests/scenarios.rs` resolves through istio-cni's capture in the rig): mesh answers over UDP
//! and TCP, truncation, forwarding to a stand-in upstream (root: it listens on port 53), and
//! hostile queries.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use ztunnel::app::{Proxy, RunOptions};
use ztunnel::config::{Config, ProxyMode, WorkloadInfo};

const CONFIG: &str = r#"
workloads:
- {uid: c1, name: client, namespace: demo, serviceAccount: client, workloadIps: [127.0.0.1], canonicalName: client, canonicalRevision: v1}
services:
- {name: web, namespace: demo, hostname: web.demo.svc.cluster.local, vips: ["/10.96.1.1", "/fd00::1"], ports: {80: 80}}
- {name: v4, namespace: demo, hostname: v4.demo.svc.cluster.local, vips: ["/10.96.1.2"], ports: {80: 80}}
"#;

/// A dedicated proxy for `client` with its DNS server on 127.0.0.1 (port picked), forwarding to
/// `upstream` (port 53 only, as resolv.conf allows).
fn start(dir: &TestDir, upstream: &str, extra_services: &str) -> (Proxy, SocketAddr) {
    let config = dir.write_config(&format!("{CONFIG}{extra_services}"));
    let resolv = dir.0.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("search demo.svc.cluster.local svc.cluster.local cluster.local\nnameserver {upstream}\noptions timeout:1 attempts:1\n"),
    )
    .unwrap();
    let mut cfg = Config::for_tests(config);
    cfg.proxy_mode = ProxyMode::Dedicated;
    cfg.workload_info =
        Some(WorkloadInfo { namespace: "demo".into(), name: "client".into(), service_account: "client".into() });
    cfg.resolv_conf = resolv;
    let proxy = ztunnel::app::start(cfg, RunOptions { handle_signals: false }).expect("proxy starts");
    let dns = proxy.addrs.dns.expect("dedicated mode runs the DNS proxy");
    (proxy, dns)
}

fn parse(bytes: std::io::Result<Vec<u8>>) -> Message {
    Message::from_vec(&bytes.expect("an answer")).expect("a DNS message")
}

fn a_records(m: &Message) -> usize {
    m.answers.iter().filter(|r| r.record_type() == RecordType::A).count()
}

fn big_service(n: usize) -> String {
    let vips: Vec<String> = (0..n).map(|i| format!("\"/10.97.{}.{}\"", i / 250, i % 250 + 1)).collect();
    format!(
        "- {{name: big, namespace: demo, hostname: big.demo.svc.cluster.local, vips: [{}], ports: {{80: 80}}}}\n",
        vips.join(", ")
    )
}

#[test]
fn mesh_names_over_udp_and_tcp_with_truncation_and_metrics() {
    let dir = TestDir::new("dns-mesh");
    // Nothing listens upstream: whatever is forwarded fails (SERVFAIL), fast.
    let (proxy, dns) = start(&dir, "127.0.0.154", &big_service(256));
    for name in ["web.", "web.demo.", "web.demo.svc.", "web.demo.svc.cluster.local."] {
        let m = parse(dns_udp(dns, &dns_query(name, RecordType::A, None)));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.metadata.authoritative, "{name}: authoritative");
        assert_eq!(a_records(&m), 1, "{name}");
        assert_eq!(m.answers[0].ttl, 30);
    }
    let m = parse(dns_tcp(dns, &dns_query("web.", RecordType::AAAA, None)));
    assert_eq!(m.answers.len(), 1, "AAAA over TCP");
    // A mesh name without an IPv6 address: NOERROR, no answers (not NXDOMAIN, not forwarded).
    let m = parse(dns_udp(dns, &dns_query("v4.", RecordType::AAAA, None)));
    assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
    // 256 addresses: UDP without EDNS gets what fits in 512 bytes with TC; TCP gets all.
    let m = parse(dns_udp(dns, &dns_query("big.", RecordType::A, None)));
    assert!(m.metadata.truncation && a_records(&m) > 0 && a_records(&m) < 256, "{}", a_records(&m));
    let m = parse(dns_udp(dns, &dns_query("big.", RecordType::A, Some(4096))));
    assert!(m.metadata.truncation && a_records(&m) > 200, "EDNS 4096: {}", a_records(&m));
    let m = parse(dns_tcp(dns, &dns_query("big.", RecordType::A, None)));
    assert!(!m.metadata.truncation);
    assert_eq!(a_records(&m), 256);
    // Not a mesh name, upstream unreachable: SERVFAIL within the resolver's timeout.
    let started = Instant::now();
    let m = parse(dns_udp(dns, &dns_query("nowhere.example.", RecordType::A, None)));
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    let text = http(proxy.addrs.metrics, "GET", "/metrics").unwrap().1;
    let samples = parse_prometheus(&text).unwrap();
    let count = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .sum()
    };
    let udp_a = [("request_query_type", "a"), ("request_protocol", "udp"), ("source_canonical_service", "client")];
    assert!(count("istio_dns_requests_total", &udp_a) >= 7.0, "{text}");
    assert!(count("istio_dns_requests_total", &[("request_protocol", "tcp")]) >= 2.0);
    assert_eq!(count("istio_dns_upstream_requests_total", &[]), 1.0);
    assert_eq!(count("istio_dns_upstream_failures_total", &[]), 1.0);
    assert!(text.contains("istio_dns_upstream_request_duration_seconds_bucket"));
    proxy.shutdown();
    proxy.wait().unwrap();
}

#[test]
fn hostile_queries_get_errors_and_the_server_stays_up() {
    let dir = TestDir::new("dns-hostile");
    let (proxy, dns) = start(&dir, "127.0.0.155", "");
    // Not a header: nothing back. Garbage after a header: FORMERR with the id.
    let mut garbage = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // a name that points at itself
    let m = parse(dns_udp(dns, &garbage));
    assert_eq!((m.metadata.id, m.metadata.response_code), (0xabcd, ResponseCode::FormErr));
    // A 64 KiB TCP message of junk: an error, and the server goes on.
    let mut junk = vec![0x11, 0x22];
    junk.extend(std::iter::repeat_n(0xffu8, 65_533));
    let m = parse(dns_tcp(dns, &junk));
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A response sent as a query: FORMERR.
    let mut resp = Message::from_vec(&dns_query("web.", RecordType::A, None)).unwrap();
    resp.metadata.message_type = hickory_proto::op::MessageType::Response;
    assert_eq!(parse(dns_udp(dns, &resp.to_vec().unwrap())).metadata.response_code, ResponseCode::FormErr);
    // A TCP client that sends half a length and stalls is dropped at the request timeout;
    // meanwhile others are served.
    let mut stalled = std::net::TcpStream::connect(dns).unwrap();
    std::io::Write::write_all(&mut stalled, &[0x00]).unwrap();
    // A flood: 5000 queries without waiting, then the server still answers at once.
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let q = dns_query("web.", RecordType::A, None);
    for _ in 0..5000 {
        let _ = s.send_to(&q, dns);
    }
    let m = parse(dns_udp_retry(dns, &dns_query("web.demo.svc.cluster.local.", RecordType::A, None), 20));
    assert_eq!(a_records(&m), 1);
    stalled.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut stalled, &mut b).ok(), Some(0), "the stalled client is closed");
    proxy.shutdown();
    proxy.wait().unwrap();
}

#[test]
fn forwarding_to_the_upstream_resolvers() {
    if sys_uid() != 0 {
        println!("SKIPPED forwarding_to_the_upstream_resolvers: the stand-in upstream listens on port 53 (root)");
        return;
    }
    let upstream = UpstreamDns::start("127.0.0.153:53".parse().unwrap());
    let dir = TestDir::new("dns-forward");
    let (proxy, dns) = start(&dir, "127.0.0.153", "");
    let m = parse(dns_udp(dns, &dns_query("outside.example.", RecordType::A, None)));
    assert_eq!((m.metadata.response_code, a_records(&m)), (ResponseCode::NoError, 1));
    assert!(!m.metadata.authoritative && m.metadata.recursion_available, "AA cleared");
    let m = parse(dns_udp(dns, &dns_query("nothing.example.", RecordType::A, None)));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "upstream rcodes pass through");
    // Other types of mesh names are forwarded too (and here unknown upstream).
    let m = parse(dns_udp(dns, &dns_query("web.demo.svc.cluster.local.", RecordType::TXT, None)));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // The upstream truncates over UDP: the proxy asks again over TCP and has all 256.
    let before = upstream.queries.load(std::sync::atomic::Ordering::Relaxed);
    let m = parse(dns_tcp(dns, &dns_query("big.example.", RecordType::A, None)));
    assert_eq!(a_records(&m), 256, "retried over TCP upstream");
    assert!(upstream.queries.load(std::sync::atomic::Ordering::Relaxed) >= before + 2);
    // Over UDP the client gets what fits, with TC.
    let m = parse(dns_udp(dns, &dns_query("big.example.", RecordType::A, Some(1232))));
    assert!(m.metadata.truncation && a_records(&m) < 256);
    proxy.shutdown();
    proxy.wait().unwrap();
}

fn sys_uid() -> u32 {
    ztunnel::sys::effective_uid()
}

//! Metrics (SCENARIOS.md 4, 6): a scrape parsed as Prometheus text, byte counts equal to what
//! the test moved (live and at close), COMPAT.md's labels for both reporters, DENY counted on the
//! destination, a hostile `baggage` header that cannot break the exposition, and the setup
//! latency histograms on `/stats/latency`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use ztunnel::config::Config;
use ztunnel::tls::ca::LocalCa;

/// Every label Istio's ztunnel writes on `istio_tcp_*` (what the Istio dashboards group by).
const LABELS: [&str; 27] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "source_region",
    "source_zone",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "destination_region",
    "destination_zone",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

fn yaml(pod_port: u16, policies: &str) -> String {
    format!(
        r#"
workloads:
- {{uid: sleep, name: sleep-7d9f, namespace: demo, serviceAccount: sleep, workloadIps: [127.0.0.1], protocol: HBONE, workloadName: sleep, canonicalName: sleep, canonicalRevision: v1}}
- {{uid: notsleep, name: notsleep, namespace: demo, serviceAccount: notsleep, workloadIps: [127.0.0.6], protocol: HBONE}}
- uid: httpbin
  name: httpbin-5c8
  namespace: demo
  serviceAccount: httpbin
  workloadIps: [127.0.0.3]
  protocol: HBONE
  workloadName: httpbin
  canonicalName: httpbin
  canonicalRevision: v2
  locality: {{region: eu-west1, zone: eu-west1-b, subzone: ""}}
  services: {{"demo/httpbin.demo.svc.cluster.local": {{8000: {pod_port}}}}}
services:
- {{name: httpbin, namespace: demo, hostname: httpbin.demo.svc.cluster.local, vips: ["/127.10.0.9"], ports: {{8000: {pod_port}}}}}
policies: {policies}
"#
    )
}

const BYTES: usize = 100_000;

#[test]
fn bytes_and_labels_for_both_reporters_live_and_at_close() {
    let httpbin = EchoServer::start("127.0.0.3", "httpbin");
    let dir = TestDir::new("metrics");
    let proxy = start_both_ends(Config::for_tests(dir.write_config(&yaml(httpbin.addr.port(), "[]"))));
    wait_for_certificates(&proxy, 3);
    let mut c = socks5(proxy.addrs.socks5.unwrap(), Dest::Addr("127.10.0.9:8000".parse().unwrap())).unwrap();
    assert_eq!(read_greeting(&mut c), "httpbin");
    let payload = vec![7u8; BYTES];
    echo_roundtrip(&mut c, &payload);
    let greeting = "httpbin\n".len() as f64;
    let sent = BYTES as f64;
    let received = BYTES as f64 + greeting;
    for reporter in ["source", "destination"] {
        let want = [("reporter", reporter), ("source_workload", "sleep"), ("destination_workload", "httpbin")];
        // Counted while the connection is still open.
        assert!(
            eventually(|| {
                let s = scrape(&proxy);
                sample(&s, "istio_tcp_sent_bytes_total", &want) == Some(sent)
                    && sample(&s, "istio_tcp_received_bytes_total", &want) == Some(received)
            }),
            "{reporter}: live byte counts"
        );
        let s = scrape(&proxy);
        assert_eq!(sample(&s, "istio_tcp_connections_opened_total", &want), Some(1.0), "{reporter} opened");
        assert_eq!(sample(&s, "istio_tcp_connections_closed_total", &want), Some(0.0), "{reporter} not closed yet");
    }
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    drop(c);
    for reporter in ["source", "destination"] {
        let want = [("reporter", reporter), ("source_workload", "sleep")];
        assert!(
            eventually(|| sample(&scrape(&proxy), "istio_tcp_connections_closed_total", &want) == Some(1.0)),
            "{reporter}: closed"
        );
        let s = scrape(&proxy);
        assert_eq!(sample(&s, "istio_tcp_sent_bytes_total", &want), Some(sent), "{reporter}: final sent");
        assert_eq!(sample(&s, "istio_tcp_received_bytes_total", &want), Some(received), "{reporter}: final received");
        let series = s
            .iter()
            .find(|x| x.name == "istio_tcp_connections_opened_total" && x.labels["reporter"] == reporter)
            .unwrap();
        for l in LABELS {
            assert!(series.labels.contains_key(l), "{reporter} series has label {l}");
        }
        let l = &series.labels;
        assert_eq!(l["source_principal"], "spiffe://cluster.local/ns/demo/sa/sleep");
        assert_eq!(l["destination_principal"], "spiffe://cluster.local/ns/demo/sa/httpbin");
        assert_eq!(
            (
                l["source_workload_namespace"].as_str(),
                l["source_canonical_service"].as_str(),
                l["source_version"].as_str()
            ),
            ("demo", "sleep", "v1")
        );
        assert_eq!(
            (l["destination_canonical_service"].as_str(), l["destination_canonical_revision"].as_str()),
            ("httpbin", "v2")
        );
        assert_eq!(l["request_protocol"], "tcp");
        assert_eq!(l["response_flags"], "-");
        assert_eq!(l["connection_security_policy"], "mutual_tls");
        assert_eq!(l["source_cluster"], "Kubernetes");
        assert_eq!((l["destination_region"].as_str(), l["destination_zone"].as_str()), ("eu-west1", "eu-west1-b"));
        assert_eq!((l["source_region"].as_str(), l["source_zone"].as_str()), ("unknown", "unknown"));
    }
    let s = scrape(&proxy);
    let src = [("reporter", "source")];
    assert_eq!(
        sample(
            &s,
            "istio_tcp_connections_opened_total",
            &[("destination_service", "httpbin.demo.svc.cluster.local"), src[0]]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &s,
            "istio_tcp_connections_opened_total",
            &[("destination_service_name", "httpbin"), ("destination_service_namespace", "demo"), src[0]]
        ),
        Some(1.0)
    );
    assert!(s.iter().any(|x| x.name == "istio_build" && x.labels["component"] == "ztunnel"));
    // The process, socket and per-worker families Istio's dashboards and ours read.
    let value = |name: &str| s.iter().filter(|x| x.name == name).map(|x| x.value).sum::<f64>();
    assert!(value("process_open_fds") > 0.0 && value("process_max_fds") >= value("process_open_fds"));
    assert!(s.iter().any(|x| x.name == "istio_tcp_sockets_open" && x.labels["reporter"] == "destination"));
    let workers: Vec<_> = s.iter().filter(|x| x.name == "ztunnel_worker_cpu_seconds_total").collect();
    assert_eq!(workers.len(), 2, "one series per worker");
    assert!(value("ztunnel_worker_connections_accepted_total") >= 2.0, "the HBONE and the client connections");
    // Setup latency: the HBONE path saw one connection, served as JSON and as a histogram.
    let (status, body) = http(proxy.addrs.admin, "GET", "/stats/latency").unwrap();
    assert_eq!(status, 200);
    let lat: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(lat["connection_setup"]["hbone"]["count"], 1, "{lat}");
    assert!(lat["connection_setup"]["hbone"]["p99_us"].as_u64().unwrap() > 0);
    assert_eq!(lat["connection_setup"]["inbound_hbone"]["count"], 1);
    assert_eq!(sample(&s, "ztunnel_connection_setup_seconds_count", &[("path", "hbone")]), Some(1.0));
    assert_eq!(sample(&s, "ztunnel_connection_setup_seconds_bucket", &[("path", "hbone"), ("le", "+Inf")]), Some(1.0));
    stop(proxy);
}

#[test]
fn denied_connections_are_counted_with_deny_on_both_sides() {
    let httpbin = EchoServer::start("127.0.0.3", "httpbin");
    let dir = TestDir::new("metrics-deny");
    let policy = "[{name: allow-sleep, namespace: demo, scope: Namespace, action: Allow, rules: [[[{principals: [!Exact cluster.local/ns/demo/sa/sleep]}]]]}]";
    let proxy = start_both_ends(Config::for_tests(dir.write_config(&yaml(httpbin.addr.port(), policy))));
    wait_for_certificates(&proxy, 3);
    let s5 = proxy.addrs.socks5.unwrap();
    let refused = socks5_from(Some("127.0.0.6".parse().unwrap()), s5, Dest::Addr(httpbin.addr));
    assert_eq!(refused.err(), Some(2));
    let s = scrape(&proxy);
    for reporter in ["destination", "source"] {
        let want = [
            ("reporter", reporter),
            ("response_flags", "DENY"),
            ("source_principal", "spiffe://cluster.local/ns/demo/sa/notsleep"),
            ("destination_workload", "httpbin"),
        ];
        assert_eq!(sample(&s, "istio_tcp_connections_failed_total", &want), Some(1.0), "{reporter}");
    }
    stop(proxy);
}

#[test]
fn a_hostile_baggage_header_cannot_break_the_scrape() {
    let httpbin = EchoServer::start("127.0.0.3", "httpbin");
    let dir = TestDir::new("metrics-baggage");
    let cfg = Config::for_tests(dir.write_config(&yaml(httpbin.addr.port(), "[]")));
    let ca_cfg = cfg.ca.clone();
    let proxy = start_with(cfg);
    wait_for_certificates(&proxy, 3);
    // A mesh client the proxy has no workload for: it describes itself in `baggage`.
    let (ca, _) = LocalCa::from_config(&ca_cfg, "cluster.local", Duration::from_secs(3600)).unwrap();
    let stranger =
        ca.issue(&"spiffe://cluster.local/ns/other/sa/stranger".parse().unwrap(), SystemTime::now()).unwrap();
    let hbone = SocketAddr::new("127.0.0.3".parse().unwrap(), proxy.addrs.inbound.port());
    let server_id = "spiffe://cluster.local/ns/demo/sa/httpbin".parse().unwrap();
    let huge = format!(
        "k8s.namespace.name={},service.name=evil\"}} 1\\x,k8s.cluster.name=ok-cluster,{}",
        "n".repeat(10 * 1024),
        (0..400).map(|i| format!("k{i}=v{i}")).collect::<Vec<_>>().join(",")
    );
    let target = httpbin.addr.to_string();
    block_on(async move {
        let mut send = hbone_client(hbone, &stranger, &server_id).await;
        for baggage in [huge.as_str(), "k8s.deployment.name=from-baggage,k8s.namespace.name=other,service.version=v9"] {
            let (status, mut up, mut down) =
                request_with_headers(&mut send, Method::CONNECT, &target, &[("baggage", baggage)]).await;
            assert_eq!(status, StatusCode::OK);
            up.send_data(Bytes::new(), true).unwrap();
            while let Some(chunk) = down.data().await {
                let _ = down.flow_control().release_capacity(chunk.map(|c| c.len()).unwrap_or(0));
            }
        }
    });
    let s = scrape(&proxy); // parses, or the helper fails the test
    let stranger = [("reporter", "destination"), ("source_principal", "spiffe://cluster.local/ns/other/sa/stranger")];
    assert!(eventually(|| {
        let s = scrape(&proxy);
        let from_baggage = [stranger[0], stranger[1], ("source_workload", "from-baggage"), ("source_version", "v9")];
        let garbage =
            [stranger[0], stranger[1], ("source_workload", "unknown"), ("source_workload_namespace", "unknown")];
        sample(&s, "istio_tcp_connections_closed_total", &from_baggage) == Some(1.0)
            && sample(&s, "istio_tcp_connections_closed_total", &garbage) == Some(1.0)
    }));
    assert!(s.iter().all(|x| x.labels.values().all(|v| v.len() <= 128)), "label values are bounded");
    // The raw text has no line longer than a series can legitimately be.
    let (_, raw) = http(proxy.addrs.metrics, "GET", "/metrics").unwrap();
    assert!(raw.lines().all(|l| l.len() < 4096));
    // OpenMetrics when asked for.
    let mut c = std::net::TcpStream::connect(proxy.addrs.metrics).unwrap();
    write!(c, "GET /metrics HTTP/1.1\r\nhost: t\r\naccept: application/openmetrics-text;version=1.0.0\r\n\r\n")
        .unwrap();
    let mut om = String::new();
    c.read_to_string(&mut om).unwrap();
    assert!(om.contains("content-type: application/openmetrics-text"), "{om}");
    assert!(om.trim_end().ends_with("# EOF"));
    parse_prometheus(om.split_once("\r\n\r\n").unwrap().1).unwrap();
    stop(proxy);
}

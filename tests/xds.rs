//! The proxy configured by istiod (a fake one, over TLS with its own root): initial sync and
//! readiness, pushes changing routing without a restart (SCENARIOS.md 2), removals, a malformed
//! resource NACKed by name while the rest applies, istiod going away and coming back
//! (`initial_resource_versions`), the token re-read on every connect, and a large push.

mod common;
mod fake_istiod;

use std::time::Instant;

use common::*;
use fake_istiod::*;
use ztunnel::config::Config;

/// A proxy whose only config source is the fake istiod.
fn proxy_for(istiod: &Istiod, dir: &TestDir) -> ztunnel::app::Proxy {
    proxy_with(istiod, dir, |_| {})
}

fn proxy_with(istiod: &Istiod, dir: &TestDir, tweak: impl FnOnce(&mut Config)) -> ztunnel::app::Proxy {
    let mut cfg = xds_config(istiod, dir);
    tweak(&mut cfg);
    start_with(cfg)
}

/// The test config pointed at the fake istiod only (no file), with a token file.
fn xds_config(istiod: &Istiod, dir: &TestDir) -> Config {
    let mut cfg = Config::for_tests(dir.0.join("unused.yaml"));
    cfg.local_xds_path = None;
    cfg.xds_address = Some(istiod.url());
    cfg.xds_root_ca = istiod.root_pem.clone();
    cfg.alt_xds_hostname = Some(istiod.hostname.into());
    let token = dir.0.join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    cfg.auth_token = Some(token);
    cfg.cluster_id = "test-cluster".into();
    cfg
}

fn ready(proxy: &ztunnel::app::Proxy) -> bool {
    http(proxy.addrs.readiness, "GET", "/healthz/ready").map(|(s, _)| s == 200).unwrap_or(false)
}

fn service(name: &str, vip: [u8; 4], port: u32, target: u32) -> pwl::Service {
    pwl::Service {
        name: name.into(),
        namespace: "ns".into(),
        hostname: format!("{name}.ns.svc.cluster.local"),
        addresses: vec![pwl::NetworkAddress { network: String::new(), address: vip.to_vec(), length: None }],
        ports: vec![pwl::Port { service_port: port, target_port: target, app_protocol: 0 }],
        ..Default::default()
    }
}

#[test]
fn initial_sync_pushes_removals_and_nacks() {
    let server = EchoServer::start("127.0.0.2", "server");
    let istiod = Istiod::start(0);
    istiod
        .fake
        .push_workloads(vec![workload("client", [127, 0, 0, 1], false), workload("server", [127, 0, 0, 2], false)]);
    let dir = TestDir::new("xds");
    let proxy = proxy_for(&istiod, &dir);
    assert!(eventually(|| ready(&proxy)), "ready after istiod's first answers");
    let streams = istiod.fake.streams();
    assert_eq!(streams[0].0.as_deref(), Some("Bearer first-token"));
    assert_eq!(streams[0].1.as_deref(), Some("test-cluster"));
    let s5 = proxy.addrs.socks5.unwrap();
    let mut c = socks5(s5, Dest::Addr(server.addr)).expect("routed with xDS config");
    assert_eq!(read_greeting(&mut c), "server");

    // A service arrives by push: reachable by VIP and by name, no restart.
    istiod.fake.push_services(vec![service("web", [127, 10, 0, 7], 80, u32::from(server.addr.port()))]);
    let mut svc = pwl::Workload { ..workload("server", [127, 0, 0, 2], false) };
    svc.services.insert(
        "ns/web.ns.svc.cluster.local".into(),
        pwl::PortList {
            ports: vec![pwl::Port { service_port: 80, target_port: u32::from(server.addr.port()), app_protocol: 0 }],
        },
    );
    istiod.fake.push_workloads(vec![svc]);
    assert!(eventually(|| socks5(s5, Dest::Name("web.ns.svc.cluster.local", 80)).is_ok()), "service pushed");
    let mut c = socks5(s5, Dest::Addr("127.10.0.7:80".parse().unwrap())).unwrap();
    assert_eq!(read_greeting(&mut c), "server");

    // A malformed resource is NACKed by name; the valid one of the same push applies.
    istiod.fake.push_raw(
        ADDRESS_TYPE,
        vec![
            ("bad-one".into(), vec![0xff, 0xff, 0xff]),
            ("ns/late.ns.svc.cluster.local".into(), {
                use prost::Message;
                pwl::Address { r#type: Some(pwl::address::Type::Service(service("late", [127, 10, 0, 8], 80, 1))) }
                    .encode_to_vec()
            }),
        ],
        vec![],
    );
    assert!(eventually(|| istiod
        .fake
        .requests()
        .iter()
        .any(|r| r.error_detail.as_ref().is_some_and(|e| e.message.starts_with("bad-one: ")))));
    assert!(eventually(|| config_dump(&proxy)["services"].as_array().unwrap().iter().any(|s| s["name"] == "late")));

    // Removal: the service goes away.
    istiod.fake.remove(ADDRESS_TYPE, &["ns/web.ns.svc.cluster.local"]);
    assert!(eventually(|| socks5(s5, Dest::Name("web.ns.svc.cluster.local", 80)).is_err()), "service removed");
    let dump = config_dump(&proxy);
    assert_eq!(dump["source"]["kind"], "xds");
    assert_eq!(dump["xds"]["status"]["connected"], true);
    stop(proxy);
}

#[test]
fn a_workload_switching_to_hbone_by_push_is_reached_over_hbone() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let istiod = Istiod::start(0);
    istiod.fake.push_workloads(vec![workload("sleep", [127, 0, 0, 1], true), workload("pod", [127, 0, 0, 3], false)]);
    let dir = TestDir::new("xds-hbone");
    let mut cfg = Config::for_tests(dir.0.join("unused.yaml"));
    cfg.local_xds_path = None;
    cfg.xds_address = Some(istiod.url());
    cfg.xds_root_ca = istiod.root_pem.clone();
    cfg.alt_xds_hostname = Some(istiod.hostname.into());
    cfg.auth_token = None;
    let proxy = start_both_ends(cfg);
    assert!(eventually(|| ready(&proxy)));
    let s5 = proxy.addrs.socks5.unwrap();
    let mut plain = socks5(s5, Dest::Addr(pod.addr)).unwrap();
    assert_eq!(read_greeting(&mut plain), "pod");
    istiod.fake.push_workloads(vec![workload("pod", [127, 0, 0, 3], true)]);
    wait_for_certificates(&proxy, 2);
    let mut meshed = socks5(s5, Dest::Addr(pod.addr)).expect("reached over HBONE");
    assert_eq!(read_greeting(&mut meshed), "pod");
    echo_roundtrip(&mut meshed, b"now in the mesh");
    echo_roundtrip(&mut plain, b"the plain connection opened before is untouched");
    // The proxy's own count: the stream arrived over HBONE (mutual TLS) at the pod's side.
    let hbone =
        [("reporter", "destination"), ("destination_workload", "pod"), ("connection_security_policy", "mutual_tls")];
    assert!(
        eventually(|| sample(&scrape(&proxy), "istio_tcp_connections_opened_total", &hbone) == Some(1.0)),
        "the new connection rides HBONE"
    );
    stop(proxy);
}

#[test]
fn istiod_gone_then_back_resyncs_with_versions_and_a_fresh_token() {
    let server = EchoServer::start("127.0.0.2", "server");
    let mut istiod = Istiod::start(0);
    istiod
        .fake
        .push_workloads(vec![workload("client", [127, 0, 0, 1], false), workload("server", [127, 0, 0, 2], false)]);
    istiod.fake.push_policies(vec![psec::Authorization {
        name: "allow-all".into(),
        namespace: "ns".into(),
        scope: psec::Scope::Namespace as i32,
        action: psec::Action::Allow as i32,
        rules: vec![psec::Rule { clauses: vec![] }],
        ..Default::default()
    }]);
    let dir = TestDir::new("xds-restart");
    let proxy = proxy_for(&istiod, &dir);
    assert!(eventually(|| ready(&proxy)));
    let s5 = proxy.addrs.socks5.unwrap();
    let mut open = socks5(s5, Dest::Addr(server.addr)).unwrap();
    assert_eq!(read_greeting(&mut open), "server");

    istiod.stop();
    assert!(eventually(|| config_dump(&proxy)["xds"]["status"]["connected"] == false));
    // The last config keeps serving: the open connection and new ones.
    echo_roundtrip(&mut open, b"istiod is gone");
    let mut fresh = socks5(s5, Dest::Addr(server.addr)).expect("new connections on the last config");
    assert_eq!(read_greeting(&mut fresh), "server");
    assert!(ready(&proxy), "still ready on the last good config");

    std::fs::write(dir.0.join("token"), "rotated-token").unwrap();
    istiod.restart();
    assert!(eventually(|| istiod.fake.streams().len() >= 2), "reconnected after backoff");
    let streams = istiod.fake.streams();
    assert_eq!(streams.last().unwrap().0.as_deref(), Some("Bearer rotated-token"), "token re-read");
    // The first request of the new stream names what the proxy already holds.
    let requests = istiod.fake.requests();
    let resync = requests.iter().rev().find(|r| r.type_url == ADDRESS_TYPE && r.node.is_some()).unwrap();
    assert!(resync.initial_resource_versions.contains_key("server"), "{:?}", resync.initial_resource_versions);
    let resync = requests.iter().rev().find(|r| r.type_url == AUTHORIZATION_TYPE && r.node.is_some()).unwrap();
    assert!(resync.initial_resource_versions.contains_key("ns/allow-all"));
    echo_roundtrip(&mut open, b"still flowing after the reconnect");
    let (_, metrics) = http(proxy.addrs.metrics, "GET", "/metrics").unwrap();
    let samples = parse_prometheus(&metrics).unwrap();
    assert!(samples.iter().any(|s| s.name == "istio_xds_connection_terminations_total" && s.value >= 1.0));
    assert!(samples.iter().any(|s| s.name == "istio_xds_message_total" && s.labels["url"] == ADDRESS_TYPE));
    stop(proxy);
}

#[test]
fn a_large_push_becomes_one_generation() {
    let istiod = Istiod::start(0);
    let workloads: Vec<pwl::Workload> = (0..10_000u32)
        .map(|i| {
            let mut w = workload(&format!("w{i}"), [10, (i >> 16) as u8 + 1, (i >> 8) as u8, i as u8], i % 2 == 0);
            w.node = format!("node-{}", i % 100);
            w.services.insert(
                format!("ns/s{}.ns.svc.cluster.local", i % 1000),
                pwl::PortList { ports: vec![pwl::Port { service_port: 80, target_port: 8080, app_protocol: 0 }] },
            );
            w
        })
        .collect();
    let services: Vec<pwl::Service> =
        (0..1000u32).map(|i| service(&format!("s{i}"), [10, 96, (i >> 8) as u8, i as u8], 80, 8080)).collect();
    let dir = TestDir::new("xds-large");
    // A node proxy serves its node's workloads only (100 here, 50 of them HBONE: certificates).
    let proxy = proxy_with(&istiod, &dir, |cfg| cfg.node_name = Some("node-0".into()));
    assert!(eventually(|| ready(&proxy)));
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let before = rss();
    let started = Instant::now();
    istiod.fake.push_services(services);
    istiod.fake.push_workloads(workloads);
    // Three Address responses so far (initial, services, workloads): cheap to poll, unlike a
    // config dump of 11k resources.
    let address_messages = || {
        let (_, text) = http(proxy.addrs.metrics, "GET", "/metrics").unwrap();
        sample(&parse_prometheus(&text).unwrap(), "istio_xds_message_total", &[("url", ADDRESS_TYPE)])
    };
    assert!(eventually(|| address_messages() == Some(3.0)));
    let took = started.elapsed();
    let grown = rss().saturating_sub(before);
    println!(
        "10k workloads + 1k services: applied in {took:?}, RSS +{} KiB ({} B per workload)",
        grown / 1024,
        grown / 10_000
    );
    let dump = config_dump(&proxy);
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 10_000);
    assert_eq!(dump["services"].as_array().unwrap().len(), 1000);
    stop(proxy);
}

#[test]
fn istio_ca_certificates_renew_under_an_open_hbone_connection() {
    let pod = EchoServer::start("127.0.0.3", "pod");
    let istiod = Istiod::start(0);
    istiod.fake.push_workloads(vec![workload("sleep", [127, 0, 0, 1], true), workload("pod", [127, 0, 0, 3], true)]);
    let dir = TestDir::new("xds-ca");
    let mut cfg = xds_config(&istiod, &dir);
    cfg.ca_address = Some(istiod.url());
    cfg.ca_root_ca = istiod.root_pem.clone();
    cfg.secret_ttl = std::time::Duration::from_secs(3);
    let proxy = start_both_ends(cfg);
    wait_for_certificates(&proxy, 2);
    let asked = istiod.fake.0.lock().unwrap().ca_requests.clone();
    for id in ["spiffe://cluster.local/ns/ns/sa/sleep", "spiffe://cluster.local/ns/ns/sa/pod"] {
        assert!(asked.iter().any(|a| a == id), "{id} asked for as ImpersonatedIdentity: {asked:?}");
    }
    let s5 = proxy.addrs.socks5.unwrap();
    let mut c = socks5(s5, Dest::Addr(pod.addr)).expect("HBONE with Istio CA certificates");
    assert_eq!(read_greeting(&mut c), "pod");
    // Renewals (at half of 3 s) happen while bytes keep flowing on the open connection.
    let started = Instant::now();
    let mut i = 0u32;
    while istiod.fake.0.lock().unwrap().ca_requests.len() < 6 && started.elapsed() < PATIENCE {
        echo_roundtrip(&mut c, format!("message {i}").as_bytes());
        i += 1;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(istiod.fake.0.lock().unwrap().ca_requests.len() >= 6, "both certificates renewed twice");
    echo_roundtrip(&mut c, b"the connection outlived the renewals");
    let mut fresh = socks5(s5, Dest::Addr(pod.addr)).unwrap();
    assert_eq!(read_greeting(&mut fresh), "pod");
    stop(proxy);
}

#[test]
fn a_ca_answer_for_another_identity_is_refused() {
    let istiod = Istiod::start(0);
    istiod.fake.push_workloads(vec![workload("pod", [127, 0, 0, 3], true)]);
    istiod.fake.0.lock().unwrap().ca_wrong_identity = Some("spiffe://cluster.local/ns/ns/sa/intruder".into());
    let dir = TestDir::new("xds-ca-wrong");
    let proxy = proxy_with(&istiod, &dir, |cfg| {
        cfg.ca_address = Some(istiod.url());
        cfg.ca_root_ca = istiod.root_pem.clone();
    });
    assert!(
        eventually(|| config_dump(&proxy)["certificates"][0]["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("Unavailable") && s.contains("intruder") && s.contains("expected"))),
        "{}",
        config_dump(&proxy)["certificates"]
    );
    stop(proxy);
}

#[test]
fn a_local_file_and_istiod_combine() {
    let server = EchoServer::start("127.0.0.2", "server");
    let istiod = Istiod::start(0);
    istiod.fake.push_workloads(vec![workload("server", [127, 0, 0, 2], false)]);
    let dir = TestDir::new("xds-combined");
    let file = dir.write_config("workloads:\n- {uid: client, name: client, namespace: ns, workloadIps: [127.0.0.1]}\n");
    let proxy = proxy_with(&istiod, &dir, |cfg| cfg.local_xds_path = Some(file.clone()));
    assert!(eventually(|| ready(&proxy)));
    // The client comes from the file, the server from istiod: one config.
    let mut c = socks5(proxy.addrs.socks5.unwrap(), Dest::Addr(server.addr)).unwrap();
    assert_eq!(read_greeting(&mut c), "server");
    let dump = config_dump(&proxy);
    assert_eq!(dump["source"]["kind"], "file+xds");
    let names: Vec<&str> = dump["workloads"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"client") && names.contains(&"server"), "{names:?}");
    // A file edit keeps what istiod sent.
    dir.write_config("workloads:\n- {uid: client2, name: client2, namespace: ns, workloadIps: [127.0.0.1]}\n");
    assert!(eventually(|| {
        let d = config_dump(&proxy);
        let names: Vec<String> =
            d["workloads"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap().to_string()).collect();
        names.contains(&"client2".to_string()) && names.contains(&"server".to_string())
    }));
    stop(proxy);
}

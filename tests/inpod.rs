//! In-pod mode against our istio-cni stand-in (`perf::agent`), with the real binary (root only):
//! the ZDS protocol and its hostile cases, and pod churn with traffic through every pod.

mod common;
mod rig;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use perf::agent::{Agent, AgentConn, install_inpod_rules, msg, netns_path};
use perf::netns::run_in;
use rig::{NodeProxy, Ns, admin_get, attach};

/// One node: its namespace, its proxy (in-pod mode, on a local config file), its agent.
struct Node {
    proxy: Option<NodeProxy>,
    /// `None` once the test has taken the agent away.
    agent: Option<Agent>,
    ns: Ns,
    dir: TestDir,
    tag: String,
}

impl Node {
    fn start(tag: &str, workloads: &str) -> Node {
        Node::start_with(tag, workloads, &[])
    }

    fn start_with(tag: &str, workloads: &str, extra: &[(&str, &str)]) -> Node {
        let pid = std::process::id();
        let ns = Ns::new(format!("zi{pid}{tag}"));
        let dir = TestDir::new(&format!("inpod-{tag}"));
        let config = dir.write_config(&format!("workloads:\n{workloads}services: []\npolicies: []\n"));
        let agent = Agent::bind(&dir.0.join("ztunnel.sock")).unwrap();
        let env: Vec<(String, String)> = [
            ("LOCAL_XDS_PATH", config.display().to_string()),
            ("XDS_ADDRESS", String::new()),
            ("NODE_NAME", "n1".into()),
            ("INPOD_UDS", agent.path.display().to_string()),
            ("ZTUNNEL_LOCAL_CA_DIR", dir.0.join("ca").display().to_string()),
            ("ZTUNNEL_WORKER_THREADS", "2".into()),
            ("CONNECTION_TERMINATION_DEADLINE", "2s".into()),
            ("RUST_LOG", "info".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
        let proxy = NodeProxy::spawn(&ns.0, &env, dir.0.join("proxy.log"));
        Node { proxy: Some(proxy), agent: Some(agent), ns, dir, tag: tag.into() }
    }

    fn pid(&self) -> u32 {
        self.proxy.as_ref().unwrap().pid()
    }

    fn ready(&self) -> (u16, String) {
        run_in(self.ns.name(), || http("127.0.0.1:15021".parse().unwrap(), "GET", "/healthz/ready").unwrap()).unwrap()
    }

    fn dump(&self) -> serde_json::Value {
        run_in(self.ns.name(), || admin_get("127.0.0.1:15000", "/config_dump")).unwrap()
    }

    fn metric(&self, name: &str) -> f64 {
        let text =
            run_in(self.ns.name(), || http("127.0.0.1:15020".parse().unwrap(), "GET", "/metrics").unwrap().1).unwrap();
        let samples = parse_prometheus(&text).unwrap();
        samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
    }

    fn accept(&self) -> AgentConn {
        let agent = self.agent.as_ref().expect("the agent is there");
        agent.accept(PATIENCE).unwrap_or_else(|e| panic!("the proxy connects to the agent: {e:#}\n{}", self.log()))
    }

    fn log(&self) -> String {
        self.proxy.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    /// A pod namespace with istio-cni's rules (no link: enough for the protocol).
    fn bare_pod(&self, name: &str) -> Ns {
        let ns = Ns::new(format!("zi{}{}{name}", std::process::id(), self.tag));
        install_inpod_rules(&ns.0).unwrap();
        ns
    }
}

/// TCP listeners in namespace `ns` on `port` (each worker has its own).
fn listeners(ns: &Ns, port: u16) -> usize {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.0, "ss", "-Hltn", &format!("sport = :{port}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

/// Packets that istio-cni's mangle rule in `ns` gave the connmark 0x111 back as their mark (the
/// first rule of `ISTIO_OUTPUT`; see `install_inpod_rules`).
fn connmark_restored(ns: &Ns) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.0, "iptables", "-t", "mangle", "-L", "ISTIO_OUTPUT", "-n", "-v", "-x"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rule =
        text.lines().find(|l| l.contains("CONNMARK restore")).unwrap_or_else(|| panic!("no restore rule:\n{text}"));
    rule.split_whitespace().next().unwrap().parse().unwrap()
}

fn workload(name: &str, ip: &str) -> String {
    format!(
        "- {{uid: cluster1//Pod/demo/{name}, name: {name}, namespace: demo, serviceAccount: {name}, \
         workloadIps: [{ip}], protocol: TCP, node: n1}}\n"
    )
}

fn info(name: &str) -> (&str, &str, &str) {
    (name, "demo", name)
}

#[test]
fn zds_protocol_lifecycle_and_hostile_agent() {
    if skip_without_netns("zds_protocol_lifecycle_and_hostile_agent") {
        return;
    }
    let mut node = Node::start("z", &(workload("p1", "10.77.0.1") + &workload("p2", "10.77.0.2")));
    let (p1, p2) = (node.bare_pod("p1"), node.bare_pod("p2"));
    let mut conn = node.accept();
    let (code, body) = node.ready();
    assert!(code == 500 && body.contains("snapshot"), "not ready before the snapshot: {code} {body}");

    // An Add is acked once every worker listens in the pod: 15001, 15006, 15008 on each.
    assert_eq!(conn.add("uid-1", info("p1"), &netns_path(&p1.0)).unwrap(), Ok(()));
    for port in [15001, 15006, 15008] {
        assert_eq!(listeners(&p1, port), 2, "port {port}: one listener per worker");
    }
    assert_eq!(listeners(&p1, 15080), 0, "SOCKS5 is off");
    let (code, body) = node.ready();
    assert!(code == 500 && body.contains("snapshot"), "{body}");
    assert_eq!(conn.snapshot_sent().unwrap(), Ok(()));
    assert!(eventually(|| node.ready().0 == 200), "ready after the snapshot");
    assert_eq!(node.metric("workload_manager_active_proxy_count"), 1.0);
    assert_eq!(node.metric("workload_manager_proxies_started_total"), 1.0);

    // The same pod again, same namespace: nothing changes.
    assert_eq!(conn.add("uid-1", info("p1"), &netns_path(&p1.0)).unwrap(), Ok(()));
    assert_eq!(node.metric("workload_manager_proxies_started_total"), 1.0);
    assert_eq!(listeners(&p1, 15008), 2);

    // No descriptor: NACKed with the reason; the connection goes on.
    let ack = conn.request(&msg::add("uid-3", Some(info("p3"))), &[]).unwrap();
    assert!(ack.as_ref().is_err_and(|e| e.contains("network namespace descriptor")), "{ack:?}");
    // A descriptor that is not a network namespace: NACKed, the connection goes on.
    let not_ns = std::fs::File::open("/dev/null").unwrap();
    use std::os::fd::AsRawFd;
    let ack = conn.request(&msg::add("uid-3", Some(info("p3"))), &[not_ns.as_raw_fd()]).unwrap();
    assert!(ack.as_ref().is_err_and(|e| e.contains("namespace")), "{ack:?}");
    // Two descriptors: the first is the namespace, the other is closed.
    let ns2 = std::fs::File::open(netns_path(&p2.0)).unwrap();
    let ack = conn.request(&msg::add("uid-2", Some(info("p2"))), &[ns2.as_raw_fd(), not_ns.as_raw_fd()]).unwrap();
    assert_eq!(ack, Ok(()));
    assert_eq!(listeners(&p2, 15008), 2);
    // The proxy never speaks unasked (the agent's keepalive read must time out).
    assert!(conn.silent_for(Duration::from_millis(300)));

    let dump = node.dump();
    let state = &dump["workloadState"];
    assert_eq!(state["uid-1"]["state"], "Up", "{state}");
    assert_eq!(state["uid-1"]["info"], serde_json::json!({"name": "p1", "namespace": "demo", "serviceAccount": "p1"}));
    assert!(state["uid-1"]["connections"]["inbound"].is_array(), "{state}");

    // A known pod with another namespace: its proxy is replaced (the old listeners go).
    assert_eq!(conn.add("uid-1", info("p1"), &netns_path(&p2.0)).unwrap(), Ok(()));
    assert!(eventually(|| listeners(&p1, 15008) == 0), "the replaced proxy's listeners are gone");
    assert_eq!(listeners(&p2, 15008), 4, "p2's own and uid-1's new ones");
    assert_eq!(node.metric("workload_manager_proxies_stopped_total"), 1.0);
    // Del: that pod's listeners go; the other stays.
    assert_eq!(conn.del("uid-2").unwrap(), Ok(()));
    assert!(eventually(|| listeners(&p2, 15008) == 2));
    assert_eq!(node.metric("workload_manager_active_proxy_count"), 1.0);

    // Keep after SnapshotSent is a protocol error: NACK, and the connection ends. The proxy
    // reconnects and is not ready until the new connection's snapshot.
    let ack = conn.keep("uid-1").unwrap();
    assert!(ack.is_err(), "{ack:?}");
    assert!(conn.closed_within(PATIENCE), "the proxy ends the connection");
    conn = node.accept();
    assert!(eventually(|| node.ready().1.contains("snapshot")), "not ready until the snapshot");
    // A Keep before the snapshot keeps the pod (the agent has no namespace for it any more).
    assert_eq!(conn.keep("uid-1").unwrap(), Ok(()));
    assert_eq!(conn.snapshot_sent().unwrap(), Ok(()));
    assert!(eventually(|| node.ready().0 == 200));
    assert_eq!(listeners(&p2, 15008), 2, "the kept pod still listens");

    // A second SnapshotSent: protocol error.
    assert!(conn.snapshot_sent().unwrap().is_err());
    assert!(conn.closed_within(PATIENCE));
    conn = node.accept();
    // A message longer than any ZDS message: truncated, an error; the connection ends.
    conn.send(&vec![0x0a; 4000], &[]).unwrap();
    assert!(conn.closed_within(PATIENCE), "a truncated message ends the connection");
    conn = node.accept();
    // An Add without workload_info: protocol error.
    let f = std::fs::File::open(netns_path(&p1.0)).unwrap();
    assert!(conn.request(&msg::add("uid-9", None), &[f.as_raw_fd()]).unwrap().is_err());
    assert!(conn.closed_within(PATIENCE));

    // A snapshot without the pod: it is drained.
    conn = node.accept();
    assert_eq!(conn.snapshot_sent().unwrap(), Ok(()));
    assert!(eventually(|| listeners(&p2, 15008) == 0), "the pod missing from the snapshot is drained");
    assert_eq!(node.metric("workload_manager_active_proxy_count"), 0.0);

    // The agent goes away (its socket too, or the proxy would connect again at once, into a
    // backlog nobody accepts from): not ready while disconnected.
    drop(conn);
    node.agent = None;
    assert!(eventually(|| node.ready().1.contains("not connected")), "{:?}", node.ready());
    let mut proxy = node.proxy.take().unwrap();
    proxy.terminate();
    assert!(proxy.wait(), "exits 0 on SIGTERM:\n{}", proxy.log());
    assert!(proxy.log().contains("node agent request failed"), "NACKs are logged");
    let _ = &node.dir;
}

/// Answers each connection with the address it came from, then echoes.
fn whoami_server(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let peer = c.peer_addr().unwrap().ip().to_string();
                let _ = c.write_all(format!("{peer}\n").as_bytes());
                let mut buf = [0u8; 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn read_line(c: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

/// Descriptors the process has open, and its resident memory in KiB.
fn usage(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn pod_churn_100_pods_traffic_deletes_and_a_reconnect() {
    if skip_without_netns("pod_churn_100_pods_traffic_deletes_and_a_reconnect") {
        return;
    }
    const N: usize = 100;
    let ip = |i: usize| format!("10.79.{}.{}", i / 200, i % 200 + 2);
    let workloads: String = (0..N).map(|i| workload(&format!("c{i}"), &ip(i))).collect();
    let node = Node::start("c", &workloads);
    node.ns.exec(&["ip", "addr", "add", "10.79.255.1/32", "dev", "lo"]);
    let server = run_in(node.ns.name(), || whoami_server("10.79.255.1")).unwrap();
    let pods: Vec<Ns> = (0..N)
        .map(|i| {
            let ns = Ns::new(format!("zi{}c{i}", std::process::id()));
            attach(&node.ns, &ns, &format!("vc{i}"), &ip(i));
            install_inpod_rules(&ns.0).unwrap();
            ns
        })
        .collect();

    let conn = node.accept();
    assert_eq!(conn.snapshot_sent().unwrap(), Ok(()));
    assert!(eventually(|| node.ready().0 == 200));
    let (fds_before, rss_before) = usage(node.pid());

    let mut took = Vec::new();
    for (i, ns) in pods.iter().enumerate() {
        let name = format!("c{i}");
        let start = Instant::now();
        assert_eq!(conn.add(&format!("uid-{i}"), info(&name), &netns_path(&ns.0)).unwrap(), Ok(()), "pod {i}");
        took.push(start.elapsed());
    }
    took.sort();
    println!(
        "Add to ack over {N} pods: p50 {:?}, p99 {:?}, max {:?}",
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took[N - 1]
    );
    // Traffic through every pod: captured in the pod, sent from inside it (the server sees the
    // pod's own address), attributed to the pod.
    for (i, ns) in pods.iter().enumerate() {
        let got = run_in(ns.name(), || {
            let mut c = TcpStream::connect(server).unwrap();
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            read_line(&mut c)
        })
        .unwrap();
        assert_eq!(got, ip(i), "pod {i}'s traffic leaves from the pod");
    }
    assert!(eventually(|| node.log().contains("src.workload=\"c99\"")), "attributed to the pod's workload");
    // The proxy's side of those connections is marked, as istio-cni's rules expect: its packets
    // into the pod gave the connection connmark 0x111, restored onto the app's own packets.
    for ns in [&pods[0], &pods[N - 1]] {
        assert!(connmark_restored(ns) > 0, "the app's packets in {} carry the proxy's connmark", ns.0);
    }
    // The traffic's connections are gone; count what the pods themselves hold.
    assert!(eventually(|| (usage(node.pid()).0 - fds_before) % N == 0), "descriptors per pod are whole");
    let (fds_full, rss_full) = usage(node.pid());
    let per_pod = (fds_full - fds_before) as f64 / N as f64;
    println!(
        "{N} pods: {} descriptors more ({per_pod:.1} per pod, 2 workers), RSS {rss_before} -> {rss_full} KiB ({:.1} KiB per pod)",
        fds_full - fds_before,
        (rss_full as f64 - rss_before as f64) / N as f64
    );

    // Held open across the churn: one from a pod that survives, one from a pod that goes.
    let hold = |i: usize| {
        run_in(pods[i].name(), || {
            let mut c = TcpStream::connect(server).unwrap();
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            read_line(&mut c);
            c
        })
        .unwrap()
    };
    let (mut survivor, mut doomed) = (hold(20), hold(0));
    assert!(
        eventually(|| {
            let d = node.dump();
            let out = &d["workloadState"]["uid-0"]["connections"]["outbound"];
            out.as_array().is_some_and(|a| {
                a.iter().any(|c| {
                    c["originalDst"] == server.to_string()
                        && c["actualDst"] == server.to_string()
                        && c["protocol"] == "TCP"
                })
            })
        }),
        "config_dump lists the pod's open connection"
    );
    // 50 deleted; then the agent reconnects with a snapshot that omits 10 more.
    for i in 50..N {
        assert_eq!(conn.del(&format!("uid-{i}")).unwrap(), Ok(()));
    }
    drop(conn);
    let conn = node.accept();
    for (i, ns) in pods.iter().enumerate().take(50).skip(10) {
        assert_eq!(conn.add(&format!("uid-{i}"), info(&format!("c{i}")), &netns_path(&ns.0)).unwrap(), Ok(()));
    }
    // Pod 0 is one of the omitted ten: its connection is closed at the drain deadline.
    assert_eq!(conn.snapshot_sent().unwrap(), Ok(()));
    let mut rest = Vec::new();
    assert_eq!(doomed.read_to_end(&mut rest).ok(), Some(0), "the drained pod's connection is closed");
    let expect = |pods_left: usize| fds_before + (pods_left as f64 * per_pod).round() as usize;
    assert!(
        eventually(|| usage(node.pid()).0 == expect(40) + 2),
        "descriptors back to 40 pods' worth (+ the survivor's two sockets): {} vs {}",
        usage(node.pid()).0,
        expect(40) + 2
    );
    // The surviving pod's connection was not touched.
    survivor.write_all(b"still here\n").unwrap();
    assert_eq!(read_line(&mut survivor), "still here");
    for (i, ns) in pods.iter().enumerate() {
        let want = if (10..50).contains(&i) { 2 } else { 0 };
        assert_eq!(listeners(ns, 15001), want, "pod {i}");
    }
    assert_eq!(node.metric("workload_manager_active_proxy_count"), 40.0);
    assert_eq!(node.metric("workload_manager_proxies_stopped_total"), 60.0);
    // Survivors keep working.
    let got = run_in(pods[20].name(), || {
        let mut c = TcpStream::connect(server).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        read_line(&mut c)
    })
    .unwrap();
    assert_eq!(got, ip(20));
    drop(survivor);
    assert!(eventually(|| usage(node.pid()).0 == expect(40)), "the survivor's connection closed");
    let (fds_after, rss_after) = usage(node.pid());
    println!("after churn: {fds_after} descriptors, RSS {rss_after} KiB");
    assert!(rss_after <= rss_full + 2048, "memory does not keep growing: {rss_after} vs {rss_full} KiB");
}

/// With `SERVICE_ACCOUNT`, `POD_NAME` and `POD_NAMESPACE` (what Istio's chart passes), the proxy
/// also serves HBONE in its own pod as its own workload: its metrics over mutual TLS, and
/// nothing else of its own.
#[test]
fn the_proxy_serves_its_own_metrics_over_hbone_as_itself() {
    if skip_without_netns("the_proxy_serves_its_own_metrics_over_hbone_as_itself") {
        return;
    }
    let me = "- {uid: cluster1//Pod/istio-system/ztunnel-abc, name: ztunnel-abc, namespace: istio-system, \
              serviceAccount: ztunnel, workloadIps: [10.78.0.1], protocol: TCP, node: n1}\n";
    let node = Node::start_with(
        "s",
        me,
        &[("SERVICE_ACCOUNT", "ztunnel"), ("POD_NAME", "ztunnel-abc"), ("POD_NAMESPACE", "istio-system")],
    );
    node.ns.exec(&["ip", "addr", "add", "10.78.0.1/32", "dev", "lo"]);
    let conn = node.accept();
    assert_eq!(conn.snapshot_sent().unwrap(), Ok(()));
    assert!(eventually(|| node.ready().0 == 200));
    assert_eq!(listeners(&node.ns, 15008), 2, "the proxy's own HBONE listener, one per worker");
    // A client of the mesh (any identity the mesh's root signed).
    let ca = ztunnel::tls::ca::LocalCa::from_config(
        &ztunnel::config::Config::for_tests(node.dir.0.join("config.yaml")).ca,
        "cluster.local",
        Duration::from_secs(3600),
    )
    .unwrap()
    .0;
    let client = ca
        .issue(&"spiffe://cluster.local/ns/monitoring/sa/prometheus".parse().unwrap(), std::time::SystemTime::now())
        .unwrap();
    let server_id: ztunnel::model::Identity = "spiffe://cluster.local/ns/istio-system/sa/ztunnel".parse().unwrap();
    let (metrics, admin) = run_in(node.ns.name(), || {
        block_on(async move {
            let hbone: SocketAddr = "10.78.0.1:15008".parse().unwrap();
            let (mut send, _driver) = hbone_connect(hbone, &client, &server_id).await;
            let (status, mut up, mut down) = request(&mut send, http::Method::CONNECT, "10.78.0.1:15020").await;
            assert_eq!(status, http::StatusCode::OK);
            up.send_data(
                bytes::Bytes::from_static(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
                false,
            )
            .unwrap();
            let mut got = Vec::new();
            while let Some(Ok(chunk)) = down.data().await {
                got.extend_from_slice(&chunk);
                if got.windows(11).any(|w| w == b"istio_build") {
                    break;
                }
            }
            // Its admin port is not reachable that way.
            let (admin, ..) = request(&mut send, http::Method::CONNECT, "10.78.0.1:15000").await;
            (String::from_utf8_lossy(&got).into_owned(), admin)
        })
    })
    .unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("istio_build"), "{metrics}");
    assert_eq!(admin, http::StatusCode::SERVICE_UNAVAILABLE, "only the metrics port");
    drop(conn);
}

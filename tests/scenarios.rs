//! SCENARIOS.md on a two-node rig (root only; skipped with the reason otherwise).
//!
//! Nodes `w1` and `w2` are network namespaces joined by a veth link, each running one proxy in
//! shared mode with the redirection the DaemonSet installs (`deploy/ztunnel-redirect.sh`, not a
//! copy). Pods are further namespaces behind their node (a veth pair each, routed through the
//! node, calico style). Everything is deleted at the end, also on failure.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use perf::netns::{run_in, sh};
use ztunnel::config::Config;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/ztunnel-redirect.sh");

/// A network namespace deleted on drop.
struct Ns(String);

impl Ns {
    fn new(name: String) -> Ns {
        sh("ip", &["netns", "add", &name]).unwrap();
        let ns = Ns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, cmd: &[&str]) {
        let mut args = vec!["netns", "exec", &self.0];
        args.extend_from_slice(cmd);
        sh("ip", &args).unwrap_or_else(|e| panic!("in {}: {e:#}", self.0));
    }

    fn name(&self) -> Option<&str> {
        Some(&self.0)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.0]);
    }
}

struct Pod {
    ns: Ns,
    ip: &'static str,
}

/// Connects namespace `ns` (address `ip`) to `node` by a veth pair, calico style: a /32 on the
/// pod's side, a link-local gateway that every pod-facing interface of the node carries, and a
/// /32 route on the node.
fn attach(node: &Ns, ns: &Ns, host_if: &str, ip: &str) {
    sh("ip", &["link", "add", host_if, "netns", &node.0, "type", "veth", "peer", "name", "eth0", "netns", &ns.0])
        .unwrap();
    ns.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    ns.exec(&["ip", "link", "set", "eth0", "up"]);
    ns.exec(&["ip", "route", "add", "169.254.1.1", "dev", "eth0"]);
    ns.exec(&["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
    node.exec(&["ip", "addr", "add", "169.254.1.1/32", "dev", host_if]);
    node.exec(&["ip", "link", "set", host_if, "up"]);
    node.exec(&["sysctl", "-q", "-w", &format!("net.ipv4.conf.{host_if}.rp_filter=0")]);
    node.exec(&["ip", "route", "add", &format!("{ip}/32"), "dev", host_if]);
}

struct Rig {
    // Field order is drop order: proxies stop before their namespaces go.
    proxies: Vec<ztunnel::app::Proxy>,
    pods: Vec<(&'static str, Pod)>,
    nodes: Vec<Ns>,
    dir: TestDir,
}

const NODES: [(&str, &str, &str); 2] = [("w1", "192.168.77.1", "10.10.1.0/24"), ("w2", "192.168.77.2", "10.10.2.0/24")];
/// name, node index, IP, service account.
const PODS: [(&str, usize, &str); 4] =
    [("sleep", 0, "10.10.1.2"), ("notsleep", 0, "10.10.1.3"), ("httpbin", 1, "10.10.2.2"), ("sleep2", 1, "10.10.2.3")];
const VIP: &str = "10.96.0.10";

fn config(protocol: &str, policies: &str) -> String {
    let mut y = String::from("workloads:\n");
    for (name, node, ip) in PODS {
        let sa = name.trim_end_matches('2');
        let svc = if name == "httpbin" {
            ", services: {\"ambient-demo/httpbin.ambient-demo.svc.cluster.local\": {8000: 80}}"
        } else {
            ""
        };
        y.push_str(&format!(
            "- {{uid: {name}, name: {name}, namespace: ambient-demo, serviceAccount: {sa}, workloadIps: [{ip}], \
             protocol: {protocol}, node: {}{svc}}}\n",
            NODES[node].0
        ));
    }
    y.push_str(&format!(
        "services:\n- {{name: httpbin, namespace: ambient-demo, hostname: httpbin.ambient-demo.svc.cluster.local, \
         vips: [\"/{VIP}\"], ports: {{8000: 80}}}}\npolicies: {policies}\n"
    ));
    y
}

impl Rig {
    fn new(tag: &str) -> Rig {
        let pid = std::process::id();
        let nodes: Vec<Ns> = NODES.iter().map(|(n, ..)| Ns::new(format!("zr{pid}{tag}{n}"))).collect();
        let (a, b) = (format!("zl{pid}{tag}a"), format!("zl{pid}{tag}b"));
        sh("ip", &["link", "add", &a, "netns", &nodes[0].0, "type", "veth", "peer", "name", &b, "netns", &nodes[1].0])
            .unwrap();
        for (i, (node, (_, ip, _))) in nodes.iter().zip(NODES).enumerate() {
            let link = if i == 0 { &a } else { &b };
            node.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", link]);
            node.exec(&["ip", "link", "set", link, "up"]);
            node.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
            for scope in ["all", "default"] {
                node.exec(&["sysctl", "-q", "-w", &format!("net.ipv4.conf.{scope}.rp_filter=0")]);
            }
            let (other_ip, other_cidr) = (NODES[1 - i].1, NODES[1 - i].2);
            node.exec(&["ip", "route", "add", other_cidr, "via", other_ip]);
        }
        let mut pods = Vec::new();
        for (name, node, ip) in PODS {
            let ns = Ns::new(format!("zp{pid}{tag}{name}"));
            let host_if = format!("vp{name}");
            attach(&nodes[node], &ns, &host_if[..host_if.len().min(15)], ip);
            pods.push((name, Pod { ns, ip }));
        }
        for (node, (_, _, cidr)) in nodes.iter().zip(NODES) {
            node.exec(&["env", &format!("POD_CIDRS={cidr}"), "POD_IFACES=vp+", "sh", SCRIPT, "add"]);
        }
        let dir = TestDir::new(&format!("rig-{tag}"));
        let path = dir.write_config(&config("TCP", "[]"));
        let mut proxies = Vec::new();
        for (node, (name, ..)) in nodes.iter().zip(NODES) {
            let mut cfg = Config::for_tests(path.clone());
            cfg.node_name = Some(name.into());
            cfg.packet_mark = Some(1337);
            cfg.enable_orig_src = None; // root: original source, as on a real node
            cfg.listeners.outbound = "0.0.0.0:15001".parse().unwrap();
            cfg.listeners.inbound_plain = "0.0.0.0:15006".parse().unwrap();
            cfg.listeners.inbound = "0.0.0.0:15008".parse().unwrap();
            cfg.hbone_port = 15008;
            proxies.push(run_in(node.name(), move || start_with(cfg)).unwrap());
        }
        Rig { proxies, pods, nodes, dir }
    }

    fn pod(&self, name: &str) -> &Pod {
        &self.pods.iter().find(|(n, _)| *n == name).unwrap().1
    }

    /// Runs `f` inside pod `name`'s network namespace.
    fn in_pod<T: Send>(&self, name: &str, f: impl FnOnce() -> T + Send) -> T {
        run_in(self.pod(name).ns.name(), f).unwrap()
    }

    fn in_node<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> T {
        run_in(self.nodes[i].name(), f).unwrap()
    }

    /// The proxy of node `i`: its metrics, parsed (the admin ports live in the node's namespace).
    fn scrape(&self, i: usize) -> Vec<Sample> {
        let p = &self.proxies[i];
        self.in_node(i, || scrape(p))
    }

    fn push(&self, protocol: &str, policies: &str) {
        self.push_next(protocol, policies);
    }

    /// Writes the config and waits until both proxies run a generation newer than before.
    fn push_next(&self, protocol: &str, policies: &str) {
        let before: Vec<u64> = (0..2)
            .map(|i| self.in_node(i, || config_dump(&self.proxies[i])["configGeneration"].as_u64().unwrap()))
            .collect();
        self.dir.write_config(&config(protocol, policies));
        for (i, b) in before.into_iter().enumerate() {
            let p = &self.proxies[i];
            let ok = self.in_node(i, || eventually(|| config_dump(p)["configGeneration"].as_u64() > Some(b)));
            assert!(ok, "node {i} applied the push");
        }
    }

    /// A namespace behind w1 with an address w1 does not capture (a pod outside the mesh).
    fn add_outsider(&self, ip: &str) -> Ns {
        let pid = std::process::id();
        let ns = Ns::new(format!("zo{pid}{}", ip.replace('.', "")));
        let host_if = format!("vo{}", ip.rsplit('.').next().unwrap());
        attach(&self.nodes[0], &ns, &host_if, ip);
        self.nodes[1].exec(&["ip", "route", "add", &format!("{ip}/32"), "via", NODES[0].1]);
        ns
    }

    /// A request from pod `from` to `to`: the server's greeting, or the error.
    fn request(&self, from: &str, to: SocketAddr) -> Result<String, String> {
        self.in_pod(from, move || {
            let mut c = TcpStream::connect_timeout(&to, PATIENCE).map_err(|e| format!("connect: {e}"))?;
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut buf = [0u8; 64];
            let n = c.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed without a greeting".into());
            }
            Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
        })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for p in self.proxies.drain(..) {
            p.shutdown();
            let _ = p.wait();
        }
    }
}

/// Established TCP connections of the calling thread's namespace whose remote address starts
/// with `prefix` or equals `exact`: (local port, remote address).
fn connections_with(prefix: &str, exact: &str) -> Vec<(u16, String)> {
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
    let addr = |hex: &str| -> Option<(String, u16)> {
        let (ip, port) = hex.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?.to_le_bytes();
        Some((std::net::Ipv4Addr::from(ip).to_string(), u16::from_str_radix(port, 16).ok()?))
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 || f[3] != "01" {
                return None;
            }
            let (_, local_port) = addr(f[1])?;
            let (remote, remote_port) = addr(f[2])?;
            (remote.starts_with(prefix) || remote == exact).then(|| (local_port, format!("{remote}:{remote_port}")))
        })
        .collect()
}

fn skip(test: &str) -> bool {
    if let Some(why) = perf::netns::unavailable() {
        println!("SKIPPED {test}: {why}");
        return true;
    }
    false
}

fn counted(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

#[test]
fn scenarios_1_2_3_plain_tcp_then_hbone_and_same_node() {
    if skip("scenarios_1_2_3_plain_tcp_then_hbone_and_same_node") {
        return;
    }
    let rig = Rig::new("a");
    let httpbin_ip = rig.pod("httpbin").ip;
    let _server = rig.in_pod("httpbin", || EchoServer::start_on(httpbin_ip, 80, "httpbin"));
    let vip: SocketAddr = format!("{VIP}:8000").parse().unwrap();

    // 1. Before the mesh: plain TCP through both proxies; the service VIP resolves.
    assert_eq!(rig.request("sleep", vip).as_deref(), Ok("httpbin"), "scenario 1");
    let s = rig.scrape(0);
    assert!(
        counted(
            &s,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("connection_security_policy", "unknown")]
        ) >= 1.0
    );
    let dump = rig.in_node(0, || config_dump(&rig.proxies[0]));
    assert!(dump["workloads"].as_array().unwrap().iter().all(|w| w["protocol"] == "TCP"));

    // 2. The mesh is enabled by a push: the same request works, over HBONE.
    rig.push("HBONE", "[]");
    assert!(
        rig.in_node(0, || eventually(|| config_dump(&rig.proxies[0])["certificates"]
            .as_array()
            .is_some_and(|c| c.len() == 2))),
        "w1 has its pods' certificates"
    );
    assert_eq!(rig.request("sleep", vip).as_deref(), Ok("httpbin"), "scenario 2");
    let s = rig.scrape(1);
    let inbound = [
        ("reporter", "destination"),
        ("source_principal", "spiffe://cluster.local/ns/ambient-demo/sa/sleep"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(counted(&s, "istio_tcp_connections_opened_total", &inbound) >= 1.0, "w2 saw the HBONE stream");
    // Between the nodes only HBONE: every connection w2 holds with a w1 address is on 15008.
    let from_w1 = rig.in_node(1, || connections_with("10.10.1.", "192.168.77.1"));
    println!("w2 connections with w1: {from_w1:?}");
    assert!(!from_w1.is_empty(), "the pooled HBONE connection from w1 is open");
    assert!(from_w1.iter().all(|(local_port, _)| *local_port == 15008), "only 15008 between nodes: {from_w1:?}");

    // 3. Same-node traffic goes through the proxy too (fast path), counted like the rest.
    assert_eq!(rig.request("sleep2", vip).as_deref(), Ok("httpbin"), "scenario 3");
    let s = rig.scrape(1);
    let same_node =
        [("reporter", "destination"), ("source_principal", "spiffe://cluster.local/ns/ambient-demo/sa/sleep")];
    assert!(counted(&s, "istio_tcp_connections_opened_total", &same_node) >= 2.0);
}

#[test]
fn scenario_6_authorization_between_nodes() {
    if skip("scenario_6_authorization_between_nodes") {
        return;
    }
    let rig = Rig::new("b");
    let httpbin_ip = rig.pod("httpbin").ip;
    let _server = rig.in_pod("httpbin", || EchoServer::start_on(httpbin_ip, 80, "httpbin"));
    let allow_sleep = "[{name: allow-sleep, namespace: ambient-demo, scope: Namespace, action: Allow, rules: [[[{principals: [!Exact cluster.local/ns/ambient-demo/sa/sleep]}]]]}]";
    rig.push("HBONE", allow_sleep);
    for i in 0..2 {
        assert!(rig.in_node(i, || eventually(|| {
            config_dump(&rig.proxies[i])["certificates"].as_array().is_some_and(|c| c.len() == 2)
        })));
    }
    let pod: SocketAddr = format!("{httpbin_ip}:80").parse().unwrap();
    assert_eq!(rig.request("sleep", pod).as_deref(), Ok("httpbin"), "sleep is allowed");
    assert!(rig.request("notsleep", pod).is_err(), "notsleep is refused");
    let s = rig.scrape(1);
    let denied = [
        ("reporter", "destination"),
        ("response_flags", "DENY"),
        ("source_principal", "spiffe://cluster.local/ns/ambient-demo/sa/notsleep"),
    ];
    assert!(counted(&s, "istio_tcp_connections_failed_total", &denied) >= 1.0, "w2 counts the denial");
    std::thread::sleep(Duration::from_millis(10));
}

#[test]
fn scenarios_7_8_11_12_reauthorization_non_mesh_client_and_operator_views() {
    if skip("scenarios_7_8_11_12_reauthorization_non_mesh_client_and_operator_views") {
        return;
    }
    let rig = Rig::new("c");
    let httpbin_ip = rig.pod("httpbin").ip;
    let _server = rig.in_pod("httpbin", || EchoServer::start_on(httpbin_ip, 80, "httpbin"));
    rig.push("HBONE", "[]");
    let pod: SocketAddr = format!("{httpbin_ip}:80").parse().unwrap();

    // 12. Each node holds certificates for its own pods' identities only.
    let identities = |i: usize| -> Vec<String> {
        rig.in_node(i, || {
            assert!(eventually(|| config_dump(&rig.proxies[i])["certificates"].as_array().is_some_and(|c| c
                .iter()
                .filter(|c| c["state"] == "Available")
                .count()
                == 2)));
            let mut ids: Vec<String> = config_dump(&rig.proxies[i])["certificates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    c["identity"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches("spiffe://cluster.local/ns/ambient-demo/sa/")
                        .to_string()
                })
                .collect();
            ids.sort();
            ids
        })
    };
    assert_eq!(identities(0), ["notsleep", "sleep"], "scenario 12, w1");
    assert_eq!(identities(1), ["httpbin", "sleep"], "scenario 12, w2 (sleep2 runs as sleep)");

    // 11. What an operator reads in config_dump.
    let dump = rig.in_node(1, || config_dump(&rig.proxies[1]));
    let httpbin = dump["workloads"].as_array().unwrap().iter().find(|w| w["name"] == "httpbin").unwrap();
    for field in ["name", "namespace", "workloadIps", "node", "protocol"] {
        assert!(!httpbin[field].is_null(), "workload field {field}: {httpbin}");
    }
    assert_eq!(dump["services"][0]["vips"], serde_json::json!([format!("/{VIP}")]));
    let cert = &dump["certificates"][0];
    for field in ["identity", "state"] {
        assert!(cert[field].is_string(), "certificate {field}");
    }
    for field in ["serialNumber", "validFrom", "expirationTime"] {
        assert!(cert["certChain"][0][field].is_string(), "certificate chain {field}: {cert}");
    }
    assert!(cert["rootCerts"].as_array().is_some_and(|r| !r.is_empty()));

    // 7. A long-lived allowed connection is closed soon after a DENY policy arrives.
    let (tx, rx) = std::sync::mpsc::channel();
    let held = std::thread::scope(|scope| {
        let rig = &rig;
        let h = scope.spawn(move || {
            rig.in_pod("notsleep", move || {
                let mut c = TcpStream::connect_timeout(&pod, PATIENCE).unwrap();
                c.set_read_timeout(Some(PATIENCE)).unwrap();
                assert_eq!(read_greeting(&mut c), "httpbin");
                tx.send(()).unwrap();
                let mut rest = Vec::new();
                let _ = c.read_to_end(&mut rest);
                std::time::Instant::now()
            })
        });
        rx.recv().unwrap();
        let edited = std::time::Instant::now();
        rig.dir.write_config(&config(
            "HBONE",
            "[{name: deny-notsleep, namespace: ambient-demo, scope: Namespace, action: Deny, rules: [[[{principals: [!Exact cluster.local/ns/ambient-demo/sa/notsleep]}]]]}]",
        ));
        let closed = h.join().unwrap();
        closed.saturating_duration_since(edited)
    });
    println!("scenario 7: the open connection was closed {held:?} after the policy edit");
    assert!(held < PATIENCE);
    assert!(rig.request("notsleep", pod).is_err(), "and new ones are refused");
    assert_eq!(rig.request("sleep", pod).as_deref(), Ok("httpbin"), "others still pass");

    // 8. A client outside the mesh (its node does not capture it) reaches the pod through w2's
    // plaintext capture while PERMISSIVE, and is refused once STRICT.
    let outsider = rig.add_outsider("10.10.9.2");
    let reach = || {
        run_in(outsider.name(), move || -> Result<String, String> {
            let mut c = TcpStream::connect_timeout(&pod, PATIENCE).map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut buf = [0u8; 64];
            match c.read(&mut buf) {
                Ok(0) | Err(_) => Err("closed".into()),
                Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string()),
            }
        })
        .unwrap()
    };
    rig.push_next("HBONE", "[]");
    assert_eq!(reach().as_deref(), Ok("httpbin"), "scenario 8: PERMISSIVE");
    let s = rig.scrape(1);
    assert!(
        counted(
            &s,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("connection_security_policy", "unknown")]
        ) >= 1.0
    );
    rig.push_next(
        "HBONE",
        "[{name: strict, namespace: ambient-demo, scope: Namespace, action: Deny, rules: [[[{notPrincipals: [!Presence []]}]]]}]",
    );
    assert!(reach().is_err(), "scenario 8: STRICT refuses plaintext");
    assert_eq!(rig.request("sleep", pod).as_deref(), Ok("httpbin"), "mesh clients still pass under STRICT");
}

#[test]
fn scenarios_4_9_13_telemetry_an_hbone_speaking_client_and_drain() {
    if skip("scenarios_4_9_13_telemetry_an_hbone_speaking_client_and_drain") {
        return;
    }
    let mut rig = Rig::new("d");
    let httpbin_ip = rig.pod("httpbin").ip;
    let _server = rig.in_pod("httpbin", || EchoServer::start_on(httpbin_ip, 80, "httpbin"));
    rig.push("HBONE", "[]");
    for i in 0..2 {
        assert!(rig.in_node(i, || eventually(|| {
            config_dump(&rig.proxies[i])["certificates"]
                .as_array()
                .is_some_and(|c| c.iter().filter(|c| c["state"] == "Available").count() == 2)
        })));
    }
    let pod: SocketAddr = format!("{httpbin_ip}:80").parse().unwrap();

    // 4. Telemetry on both nodes, bytes equal to what moved.
    let payload = vec![b'x'; 50_000];
    let sent = payload.len() as f64;
    rig.in_pod("sleep", || {
        let mut c = TcpStream::connect_timeout(&pod, PATIENCE).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        assert_eq!(read_greeting(&mut c), "httpbin");
        echo_roundtrip(&mut c, &payload);
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
    });
    let base = |reporter: &'static str| {
        [
            ("reporter", reporter),
            ("source_workload", "sleep"),
            ("source_principal", "spiffe://cluster.local/ns/ambient-demo/sa/sleep"),
            ("destination_workload", "httpbin"),
            ("destination_principal", "spiffe://cluster.local/ns/ambient-demo/sa/httpbin"),
            ("destination_workload_namespace", "ambient-demo"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        assert!(
            eventually(|| counted(&rig.scrape(node), "istio_tcp_connections_closed_total", &base(reporter)) == 1.0),
            "scenario 4: {reporter} on node {node}"
        );
        let s = rig.scrape(node);
        assert_eq!(counted(&s, "istio_tcp_connections_opened_total", &base(reporter)), 1.0);
        assert_eq!(counted(&s, "istio_tcp_sent_bytes_total", &base(reporter)), sent, "{reporter} sent bytes");
        assert_eq!(
            counted(&s, "istio_tcp_received_bytes_total", &base(reporter)),
            sent + "httpbin\n".len() as f64,
            "{reporter} received bytes"
        );
    }

    // 9. A client speaking HBONE itself (a sidecar: not captured by its node) reaches httpbin
    // through w2's HBONE capture, STRICT on: it has an identity.
    rig.push_next(
        "HBONE",
        "[{name: strict, namespace: ambient-demo, scope: Namespace, action: Deny, rules: [[[{notPrincipals: [!Presence []]}]]]}]",
    );
    let ca_cfg = Config::for_tests(rig.dir.0.join("config.yaml")).ca;
    let (ca, _) = ztunnel::tls::ca::LocalCa::from_config(&ca_cfg, "cluster.local", Duration::from_secs(3600)).unwrap();
    let me = ca
        .issue(&"spiffe://cluster.local/ns/ambient-demo/sa/sleep".parse().unwrap(), std::time::SystemTime::now())
        .unwrap();
    let server_id = "spiffe://cluster.local/ns/ambient-demo/sa/httpbin".parse().unwrap();
    let sidecar = rig.add_outsider("10.10.9.3");
    let greeting = run_in(sidecar.name(), move || {
        block_on(async move {
            let hbone: SocketAddr = format!("{httpbin_ip}:15008").parse().unwrap();
            let mut send = hbone_client(hbone, &me, &server_id).await;
            let (status, _up, mut down) = request(&mut send, http::Method::CONNECT, &format!("{httpbin_ip}:80")).await;
            assert_eq!(status, http::StatusCode::OK);
            let chunk = down.data().await.unwrap().unwrap();
            String::from_utf8_lossy(&chunk).trim_end().to_string()
        })
    })
    .unwrap();
    assert_eq!(greeting, "httpbin", "scenario 9");

    // 13. Drain: w2 stops while a connection is open; it may finish within the deadline, with
    // every byte delivered.
    let (tx, rx) = std::sync::mpsc::channel();
    let w2 = rig.proxies.remove(1);
    std::thread::scope(|scope| {
        let rig = &rig;
        let client = scope.spawn(move || {
            rig.in_pod("sleep", move || {
                let mut c = TcpStream::connect_timeout(&pod, PATIENCE).unwrap();
                c.set_read_timeout(Some(PATIENCE)).unwrap();
                assert_eq!(read_greeting(&mut c), "httpbin");
                tx.send(()).unwrap();
                // Keep talking while w2 drains.
                for i in 0..20 {
                    echo_roundtrip(&mut c, format!("during drain {i}").as_bytes());
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        });
        rx.recv().unwrap();
        w2.shutdown();
        client.join().expect("scenario 13: no byte lost while draining");
    });
    w2.wait().unwrap();
}

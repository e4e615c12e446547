//! Root-only: the proxy inside a fresh network namespace with real iptables REDIRECT capture,
//! proving SO_ORIGINAL_DST routing on 15001 and 15006 and SO_MARK loop avoidance; and two
//! proxies on two "nodes" (namespaces joined by a veth pair) carrying a captured connection over
//! HBONE.
//!
//! Skipped, with the reason printed, where it cannot run (not root, no `ip`/`iptables`). The
//! namespace, and with it every rule, is deleted when the test ends, also when it fails.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use ztunnel::config::Config;

/// Runs a command, turning a failure into its stderr (the harness's helper, shared).
fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    perf::netns::sh(cmd, args).map_err(|e| format!("{e:#}"))
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Result<Netns, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("zt-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        run("ip", &["netns", "add", &name])?;
        let ns = Netns(name);
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec(&self, cmd: &str, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["netns", "exec", &self.0, cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

#[test]
fn redirect_capture_uses_original_destination() {
    if skip_without_netns("redirect_capture_uses_original_destination") {
        return;
    }
    in_fresh_netns(scenario);
}

/// Runs `scenario` on a thread inside a new namespace; threads it starts (servers, workers,
/// control) inherit it. The namespace, and every rule in it, is deleted afterwards, also when
/// the scenario fails.
fn in_fresh_netns(scenario: fn(&Netns) -> Result<(), String>) {
    let ns = Netns::new().expect("create network namespace");
    let name = ns.0.clone();
    let result = std::thread::spawn(move || {
        let ns = Netns(name);
        let res = scenario(&ns);
        std::mem::forget(ns); // the outer guard deletes it
        res
    })
    .join();
    drop(ns);
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn scenario(ns: &Netns) -> Result<(), String> {
    perf::netns::enter(&ns.0).map_err(|e| e.to_string())?;
    let server = EchoServer::start("127.0.0.2", "server");
    let pod = EchoServer::start("127.0.0.3", "pod");
    let remote = EchoServer::start("127.0.0.5", "remote-pod");
    let dir = TestDir::new("netns");
    let yaml = format!(
        r#"
workloads:
- {{uid: client, name: client, namespace: ns, workloadIps: [127.0.0.1], node: n1}}
- uid: server
  name: server
  namespace: ns
  workloadIps: [127.0.0.2]
  node: n2
  services: {{"ns/svc.ns.svc.cluster.local": {{80: {server_port}}}}}
- {{uid: pod, name: pod, namespace: ns, workloadIps: [127.0.0.3], node: n1}}
- {{uid: remote, name: remote, namespace: ns, workloadIps: [127.0.0.5], node: n2}}
services:
- {{name: svc, namespace: ns, hostname: svc.ns.svc.cluster.local, vips: ["/127.10.0.1"], ports: {{80: 0}}}}
"#,
        server_port = server.addr.port()
    );
    let mut cfg = Config::for_tests(dir.write_config(&yaml));
    cfg.node_name = Some("n1".into());
    cfg.packet_mark = Some(1337);
    cfg.enable_orig_src = None; // root: best effort, so original source is exercised
    cfg.listeners.outbound = "0.0.0.0:0".parse().unwrap();
    // Dual-stack wildcard: IPv4 arrives v4-mapped and must still find its original destination.
    cfg.listeners.inbound_plain = "[::]:0".parse().unwrap();
    let proxy = start_with(cfg);
    let out_port = proxy.addrs.outbound.port().to_string();
    let in_port = proxy.addrs.inbound_plain.port().to_string();
    let ipt = |args: &[&str]| -> Result<(), String> {
        let mut full = vec!["-t", "nat", "-A", "OUTPUT", "-p", "tcp"];
        full.extend_from_slice(args);
        ns.exec("iptables", &full)
    };
    // The proxy's own (marked) connections are never captured again.
    ipt(&["-m", "mark", "--mark", "1337", "-j", "RETURN"])?;
    for dst in ["127.0.0.2", "127.10.0.1"] {
        ipt(&["-d", dst, "-j", "REDIRECT", "--to-ports", &out_port])?;
    }
    for dst in ["127.0.0.3", "127.0.0.5"] {
        ipt(&["-d", dst, "-j", "REDIRECT", "--to-ports", &in_port])?;
    }

    let check = |cond: bool, what: &str| if cond { Ok(()) } else { Err(what.to_string()) };
    // Outbound to a workload: forwarded to the original destination (the mark keeps the
    // proxy's own connection from being redirected back to itself).
    let mut c = TcpStream::connect(server.addr).map_err(|e| e.to_string())?;
    check(read_greeting(&mut c) == "server", "outbound capture reaches the original destination")?;
    echo_roundtrip(&mut c, b"captured");
    drop(c);
    // Outbound to a service VIP nobody listens on: only the proxy's routing can answer.
    let mut c = TcpStream::connect("127.10.0.1:80").map_err(|e| e.to_string())?;
    check(read_greeting(&mut c) == "server", "service VIP routed by SO_ORIGINAL_DST")?;
    drop(c);
    // Inbound plaintext to a local pod.
    let mut c = TcpStream::connect(pod.addr).map_err(|e| e.to_string())?;
    check(read_greeting(&mut c) == "pod", "inbound capture reaches the local pod")?;
    echo_roundtrip(&mut c, b"inbound");
    drop(c);
    // Inbound plaintext for a pod of another node: refused, closed without data.
    check(closed_without_data(remote.addr), "inbound for a non-local workload is refused")?;
    proxy.shutdown();
    proxy.wait().map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn two_nodes_carry_a_captured_connection_over_hbone() {
    use perf::netns::{HBONE_WORKLOAD_IP, NODE_A_IP, Topology, run_in};
    if skip_without_netns("two_nodes_carry_a_captured_connection_over_hbone") {
        return;
    }
    let topo = Topology::create().expect("two namespaces joined by veth");
    let (a, b) = (Some(topo.a.as_str()), Some(topo.b.as_str()));
    let pod = run_in(b, || EchoServer::start(HBONE_WORKLOAD_IP, "pod")).unwrap();
    let dir = TestDir::new("netns-hbone");
    let yaml = format!(
        r#"
workloads:
- {{uid: client, name: client, namespace: ns, serviceAccount: sleep, workloadIps: [{NODE_A_IP}], protocol: HBONE, node: a}}
- {{uid: pod, name: pod, namespace: ns, serviceAccount: httpbin, workloadIps: [{HBONE_WORKLOAD_IP}], protocol: HBONE, node: b}}
"#
    );
    let path = dir.write_config(&yaml);
    let node = |name: &str| {
        let mut cfg = Config::for_tests(path.clone());
        cfg.node_name = Some(name.into());
        cfg.packet_mark = Some(1337);
        cfg
    };
    let mut cfg_a = node("a");
    cfg_a.listeners.outbound = "0.0.0.0:0".parse().unwrap();
    let mut cfg_b = node("b");
    cfg_b.listeners.inbound = "0.0.0.0:15008".parse().unwrap();
    let proxy_a = run_in(a, || start_with(cfg_a)).unwrap();
    let proxy_b = run_in(b, || start_with(cfg_b)).unwrap();
    let outcome = (|| -> Result<(), String> {
        topo.capture_outbound(1337, proxy_a.addrs.outbound.port()).map_err(|e| format!("{e:#}"))?;
        for (ns, proxy) in [(a, &proxy_a), (b, &proxy_b)] {
            let ready = run_in(ns, || eventually(|| config_dump(proxy)["certificates"][0]["state"] == "Available"));
            if !ready.unwrap_or(false) {
                return Err("each proxy has its workload's certificate".into());
            }
        }
        run_in(a, || -> Result<(), String> {
            // The client knows nothing of the mesh: it connects to the pod, capture does the rest.
            let mut c = TcpStream::connect(pod.addr).map_err(|e| e.to_string())?;
            if read_greeting(&mut c) != "pod" {
                return Err("the captured connection reaches the pod on the other node".into());
            }
            echo_roundtrip(&mut c, b"over HBONE between two nodes");
            let on_b = run_in(b, || established_on(15008)).unwrap_or(0);
            if on_b != 1 {
                return Err(format!("one HBONE connection into node b's 15008, found {on_b}"));
            }
            Ok(())
        })
        .map_err(|e| format!("{e:#}"))?
    })();
    stop(proxy_a);
    stop(proxy_b);
    drop(topo);
    outcome.unwrap();
}

#[test]
fn plaintext_inbound_permissive_then_strict() {
    if skip_without_netns("plaintext_inbound_permissive_then_strict") {
        return;
    }
    in_fresh_netns(strict_scenario);
}

/// SCENARIOS.md 8: a client outside the mesh reaches a pod through 15006 (PERMISSIVE); STRICT
/// (a DENY for connections without a principal) refuses new connections and closes open ones.
fn strict_scenario(ns: &Netns) -> Result<(), String> {
    perf::netns::enter(&ns.0).map_err(|e| e.to_string())?;
    let pod = EchoServer::start("127.0.0.3", "pod");
    let dir = TestDir::new("netns-strict");
    let workloads = "workloads:\n- {uid: pod, name: pod, namespace: ns, workloadIps: [127.0.0.3], node: n1}\n";
    let strict = "policies:\n- {name: strict, namespace: ns, scope: Namespace, action: Deny, rules: [[[{notPrincipals: [!Presence []]}]]]}\n";
    let mut cfg = Config::for_tests(dir.write_config(workloads));
    cfg.node_name = Some("n1".into());
    cfg.packet_mark = Some(1337);
    let proxy = start_with(cfg);
    let in_port = proxy.addrs.inbound_plain.port().to_string();
    let ipt = |args: &[&str]| -> Result<(), String> {
        let mut full = vec!["-t", "nat", "-A", "OUTPUT", "-p", "tcp"];
        full.extend_from_slice(args);
        ns.exec("iptables", &full)
    };
    ipt(&["-m", "mark", "--mark", "1337", "-j", "RETURN"])?;
    ipt(&["-d", "127.0.0.3", "-j", "REDIRECT", "--to-ports", &in_port])?;
    let check = |cond: bool, what: &str| if cond { Ok(()) } else { Err(what.to_string()) };
    let mut open = TcpStream::connect(pod.addr).map_err(|e| e.to_string())?;
    check(read_greeting(&mut open) == "pod", "PERMISSIVE: plaintext reaches the pod")?;
    echo_roundtrip(&mut open, b"plaintext");
    dir.write_config(&format!("{workloads}{strict}"));
    // The open connection is closed by the re-check, new ones are refused.
    let mut rest = Vec::new();
    let _ = open.read_to_end(&mut rest);
    check(rest.is_empty(), "STRICT closes the open plaintext connection")?;
    check(closed_without_data(pod.addr), "STRICT refuses new plaintext connections")?;
    proxy.shutdown();
    proxy.wait().map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn a_new_proxy_takes_over_the_ports_of_a_draining_one_without_refusals() {
    if skip_without_netns("a_new_proxy_takes_over_the_ports_of_a_draining_one_without_refusals") {
        return;
    }
    in_fresh_netns(handoff_scenario);
}

/// The restart of a DaemonSet pod: the new proxy binds the same ports (SO_REUSEPORT) while the
/// old one drains. With `tcp_migrate_req` (what deploy/ sets) connections queued on the old
/// listeners move to the new ones when the old close, so clients connecting all through the
/// swap see no refusal.
fn handoff_scenario(ns: &Netns) -> Result<(), String> {
    perf::netns::enter(&ns.0).map_err(|e| e.to_string())?;
    ns.exec("sysctl", &["-q", "-w", "net.ipv4.tcp_migrate_req=1"])?;
    let server = EchoServer::start("127.0.0.2", "server");
    let dir = TestDir::new("netns-handoff");
    let yaml = format!(
        "workloads:\n- {{uid: client, name: client, namespace: ns, workloadIps: [127.0.0.1]}}\n\
         - {{uid: server, name: server, namespace: ns, workloadIps: [{}]}}\n",
        server.addr.ip()
    );
    let path = dir.write_config(&yaml);
    let mut cfg = Config::for_tests(path.clone());
    cfg.termination_deadline = std::time::Duration::from_secs(2);
    let old = start_with(cfg);
    let socks = old.addrs.socks5.unwrap();
    // Clients connect, echo and close, back to back, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, target) = (stop.clone(), server.addr);
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match socks5(socks, Dest::Addr(target)) {
                        Ok(mut c) => {
                            if read_greeting(&mut c) == "server" {
                                ok += 1;
                            } else {
                                failed.push("no greeting".to_string());
                            }
                        }
                        Err(code) => failed.push(format!("SOCKS5 reply {code}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The new proxy on the same ports, then the old one drains and exits.
    let mut cfg = Config::for_tests(path);
    cfg.listeners.outbound = old.addrs.outbound;
    cfg.listeners.inbound_plain = old.addrs.inbound_plain;
    cfg.listeners.inbound = old.addrs.inbound;
    cfg.listeners.socks5 = socks;
    let new = start_with(cfg);
    std::thread::sleep(std::time::Duration::from_millis(300));
    old.shutdown();
    old.wait().map_err(|e| e.to_string())?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.join().map_err(|_| "client thread panicked".to_string())?;
        ok += o;
        failed.extend(f);
    }
    let served_by_new = {
        let samples = parse_prometheus(&http(new.addrs.metrics, "GET", "/metrics").map_err(|e| e.to_string())?.1)?;
        sample(&samples, "istio_tcp_connections_opened_total", &[("reporter", "source")]).unwrap_or(0.0)
    };
    new.shutdown();
    new.wait().map_err(|e| e.to_string())?;
    println!("handoff: {ok} connections, {} failed, {served_by_new} through the new proxy", failed.len());
    if !failed.is_empty() {
        return Err(format!(
            "{} of {} connections failed during the swap: {:?}",
            failed.len(),
            ok as usize + failed.len(),
            &failed[..failed.len().min(5)]
        ));
    }
    if served_by_new < 1.0 || ok < 20 {
        return Err(format!("the swap was not exercised: {ok} connections, {served_by_new} through the new proxy"));
    }
    Ok(())
}

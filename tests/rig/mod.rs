//! The two-node rig of SCENARIOS.md (root only).
//!
//! Nodes `w1` and `w2` are network namespaces joined by a veth link. Each runs the `ztunnel`
//! binary in shared mode, which is in-pod mode (`NODE_NAME`), configured through its
//! environment as Istio's chart does. Pods are further namespaces behind their node (a veth pair
//! each, routed through the node, calico style), with istio-cni's in-pod redirection installed
//! inside each; every node has a stand-in for istio-cni's node agent (`perf::agent`) that hands
//! its pods' namespaces to the node's proxy over ZDS. Every namespace (with its links and rules)
//! and every process is removed on drop, also when a test fails; a failing test prints the
//! nodes' logs.
#![allow(dead_code)]
// each test binary uses a different subset
// The rig's one lock (the node agents' connections, replaced from scenario threads) is test code.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use perf::agent::{Agent, AgentConn, install_inpod_rules, netns_path};
use perf::netns::{run_in, sh};
use ztunnel::model::Identity;
use ztunnel::tls::WorkloadCert;

use crate::common::*;

/// The nodes: name, address on the node link, pod CIDR.
pub const NODES: [(&str, &str, &str); 2] =
    [("w1", "192.168.77.1", "10.10.1.0/24"), ("w2", "192.168.77.2", "10.10.2.0/24")];
/// The pods: name, node index, IP. The service account is the name without a trailing `2`
/// (`sleep2` runs as `sleep`, the second `httpbin` replica as `httpbin`).
pub const PODS: [(&str, usize, &str); 5] = [
    ("sleep", 0, "10.10.1.2"),
    ("notsleep", 0, "10.10.1.3"),
    ("httpbin", 1, "10.10.2.2"),
    ("sleep2", 1, "10.10.2.3"),
    ("httpbin2", 1, "10.10.2.4"),
];
/// The VIP of `httpbin.ambient-demo.svc.cluster.local` (port 8000 -> 80).
pub const VIP: &str = "10.96.0.10";
/// Outside every node's pod CIDR, so not captured: the waypoint and the pod behind "another
/// implementation" (both serve HBONE themselves), and plain outsiders.
pub const WAYPOINT_IP: &str = "10.10.9.4";
pub const FOREIGN_IP: &str = "10.10.9.5";

pub fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/ambient-demo/sa/{sa}")
}

/// A network namespace deleted on drop (with its interfaces, routes and iptables rules).
pub struct Ns(pub String);

impl Ns {
    pub fn new(name: String) -> Ns {
        sh("ip", &["netns", "add", &name]).unwrap();
        let ns = Ns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn exec(&self, cmd: &[&str]) {
        let mut args = vec!["netns", "exec", &self.0];
        args.extend_from_slice(cmd);
        sh("ip", &args).unwrap_or_else(|e| panic!("in {}: {e:#}", self.0));
    }

    pub fn name(&self) -> Option<&str> {
        Some(&self.0)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.0]);
    }
}

pub struct Pod {
    pub ns: Ns,
    pub ip: &'static str,
}

/// Connects namespace `ns` (address `ip`) to `node` by a veth pair, calico style: a /32 on the
/// pod's side, a link-local gateway that every pod-facing interface of the node carries, and a
/// /32 route on the node.
pub fn attach(node: &Ns, ns: &Ns, host_if: &str, ip: &str) {
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

/// The uid the node agent knows pod `name` by (a Kubernetes uid; the config's workloads have
/// other uids, so the proxy must match the pod by name, namespace and service account).
pub fn pod_uid(name: &str) -> String {
    format!("0000-{name}-uid")
}

/// What the mesh config says, written to the nodes' `LOCAL_XDS_PATH`.
#[derive(Clone)]
pub struct Mesh {
    pub protocol: &'static str,
    pub policies: String,
    /// `httpbin` replicas behind the service: 1, or 2 (`httpbin2`, also on w2).
    pub replicas: usize,
    /// The service has a waypoint (at [`WAYPOINT_IP`]).
    pub waypoint: bool,
    /// The `foreign` workload (at [`FOREIGN_IP`], on a node of another implementation).
    pub foreign: bool,
    /// Policies `httpbin` names in `authorizationPolicies` (for `WorkloadSelector` policies).
    pub httpbin_policies: &'static [&'static str],
}

impl Mesh {
    pub fn tcp() -> Mesh {
        Mesh {
            protocol: "TCP",
            policies: "[]".into(),
            replicas: 1,
            waypoint: false,
            foreign: false,
            httpbin_policies: &[],
        }
    }

    pub fn hbone() -> Mesh {
        Mesh { protocol: "HBONE", ..Mesh::tcp() }
    }

    pub fn policies(mut self, policies: &str) -> Mesh {
        self.policies = policies.into();
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = String::from("workloads:\n");
        for (name, node, ip) in PODS {
            if name == "httpbin2" && self.replicas < 2 {
                continue;
            }
            let sa = name.trim_end_matches('2');
            let svc = if sa == "httpbin" {
                format!(
                    ", services: {{\"ambient-demo/httpbin.ambient-demo.svc.cluster.local\": {{8000: 80}}}}, \
                     authorizationPolicies: [{}]",
                    self.httpbin_policies.join(", ")
                )
            } else {
                String::new()
            };
            y.push_str(&format!(
                "- {{uid: {name}, name: {name}, namespace: ambient-demo, serviceAccount: {sa}, workloadIps: [{ip}], \
                 protocol: {}, node: {}{svc}}}\n",
                self.protocol, NODES[node].0
            ));
        }
        if self.waypoint {
            y.push_str(&format!(
                "- {{uid: waypoint, name: waypoint, namespace: ambient-demo, serviceAccount: waypoint, \
                 workloadIps: [{WAYPOINT_IP}], protocol: HBONE}}\n"
            ));
        }
        if self.foreign {
            // A pod on a node run by another HBONE implementation.
            y.push_str(&format!(
                "- {{uid: foreign, name: foreign, namespace: ambient-demo, serviceAccount: foreign, \
                 workloadIps: [{FOREIGN_IP}], protocol: HBONE, node: w3}}\n"
            ));
        }
        let waypoint = if self.waypoint {
            format!(", waypoint: {{destination: \"/{WAYPOINT_IP}\", hboneMtlsPort: 15008}}")
        } else {
            String::new()
        };
        y.push_str(&format!(
            "services:\n- {{name: httpbin, namespace: ambient-demo, hostname: httpbin.ambient-demo.svc.cluster.local, \
             vips: [\"/{VIP}\"], ports: {{8000: 80}}{waypoint}}}\npolicies: {}\n",
            self.policies
        ));
        y
    }
}

/// One `ztunnel` process in a node's namespace; its stdout and stderr go to `log`.
pub struct NodeProxy {
    child: Child,
    pub log: PathBuf,
}

impl NodeProxy {
    pub fn spawn(ns: &str, env: &[(String, String)], log: PathBuf) -> NodeProxy {
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        // `ip netns exec` execs the binary: the child's id is the proxy's.
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ztunnel")])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("the proxy binary starts");
        NodeProxy { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, as the kubelet sends: the proxy drains.
    pub fn terminate(&self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }

    /// Waits for the exit (killing the process if it outlives `PATIENCE`): true when it exited 0.
    pub fn wait(&mut self) -> bool {
        let end = Instant::now() + PATIENCE;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return false;
                }
            }
        }
    }
}

impl Drop for NodeProxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
            self.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.log());
        }
    }
}

pub struct Rig {
    // Field order is drop order: processes stop before their namespaces go.
    pub proxies: Vec<Option<NodeProxy>>,
    pub pods: Vec<(&'static str, Pod)>,
    pub outsiders: Vec<Ns>,
    /// Each node's agent, and its connection to the node's newest proxy.
    pub agents: Vec<Agent>,
    /// Replaced from the scenario threads (a restart), so behind a lock.
    pub zds: std::sync::Mutex<Vec<Option<AgentConn>>>,
    pub nodes: Vec<Ns>,
    pub dir: TestDir,
    tag: String,
    /// The environment both proxies run with.
    env: Vec<(String, String)>,
}

impl Rig {
    /// The rig with both proxies on the local config file (and a shared local CA).
    pub fn new(tag: &str) -> Rig {
        Rig::new_with(tag, &[])
    }

    /// [`Rig::new`] with more environment for both proxies.
    pub fn new_with(tag: &str, extra: &[(&str, &str)]) -> Rig {
        let mut rig = Rig::network(tag);
        let config = rig.dir.write_config(&Mesh::tcp().yaml());
        // No istiod: the file is the only source (and the local CA signs).
        let mut env = vec![("LOCAL_XDS_PATH", config.display().to_string()), ("XDS_ADDRESS", String::new())];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        rig.start(&env);
        rig
    }

    /// The namespaces, links and redirection, with no proxy running yet.
    pub fn network(tag: &str) -> Rig {
        let pid = std::process::id();
        let nodes: Vec<Ns> = NODES.iter().map(|(n, ..)| Ns::new(format!("zr{pid}{tag}{n}"))).collect();
        let (a, b) = (format!("zl{pid}{tag}a"), format!("zl{pid}{tag}b"));
        sh("ip", &["link", "add", &a, "netns", &nodes[0].0, "type", "veth", "peer", "name", &b, "netns", &nodes[1].0])
            .unwrap();
        for (i, (node, (_, ip, _))) in nodes.iter().zip(NODES).enumerate() {
            let link = if i == 0 { &a } else { &b };
            node.exec(&["ip", "link", "set", link, "name", "link0"]);
            node.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "link0"]);
            node.exec(&["ip", "link", "set", "link0", "up"]);
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
            attach(&nodes[node], &ns, &format!("vp{name}"), ip);
            // What istio-cni does when the pod joins the ambient mesh.
            install_inpod_rules(&ns.0).unwrap();
            pods.push((name, Pod { ns, ip }));
        }
        let dir = TestDir::new(&format!("rig-{tag}"));
        let agents = NODES.iter().map(|(n, ..)| Agent::bind(&dir.0.join(format!("zds-{n}.sock"))).unwrap()).collect();
        Rig {
            proxies: Vec::new(),
            pods,
            outsiders: Vec::new(),
            agents,
            zds: std::sync::Mutex::new(vec![None, None]),
            nodes,
            dir,
            tag: tag.into(),
            env: Vec::new(),
        }
    }

    /// Node `i`'s agent takes its newest proxy's connection and hands it every pod of the node
    /// (the snapshot), as istio-cni does for a proxy that (re)connects.
    pub fn handover(&self, i: usize) {
        let conn = self.agents[i].accept(PATIENCE).unwrap_or_else(|e| panic!("node {i}'s proxy connects: {e:#}"));
        for (name, node, _) in PODS.iter().filter(|(_, n, _)| *n == i) {
            let sa = name.trim_end_matches('2');
            let pod = &self.pod(name).ns.0;
            let ack = conn.add(&pod_uid(name), (name, "ambient-demo", sa), &netns_path(pod)).unwrap();
            assert_eq!(ack, Ok(()), "node {node}'s proxy took pod {name}");
        }
        assert_eq!(conn.snapshot_sent().unwrap(), Ok(()));
        self.zds.lock().unwrap()[i] = Some(conn);
    }

    /// The local CA both nodes share (a cluster has one mesh root), created before the proxies
    /// so that neither races the other to make it.
    pub fn ca(&self) -> ztunnel::tls::ca::LocalCa {
        let cfg = ztunnel::config::Config::for_tests(self.dir.0.join("config.yaml")).ca;
        ztunnel::tls::ca::LocalCa::from_config(&cfg, "cluster.local", Duration::from_secs(3600)).unwrap().0
    }

    /// Starts both proxies with the DaemonSet's settings plus `extra`, and waits until they
    /// are ready.
    pub fn start(&mut self, extra: &[(&str, String)]) {
        self.ca();
        let mut env: Vec<(String, String)> = [
            ("ZTUNNEL_LOCAL_CA_DIR", self.dir.0.join("ca").display().to_string()),
            ("ZTUNNEL_WORKER_THREADS", "2".into()),
            ("PACKET_MARK", "1337".into()),
            ("ZTUNNEL_OUTBOUND_ADDR", "0.0.0.0:15001".into()),
            ("ZTUNNEL_INBOUND_PLAINTEXT_ADDR", "0.0.0.0:15006".into()),
            ("ZTUNNEL_INBOUND_ADDR", "0.0.0.0:15008".into()),
            ("ZTUNNEL_READINESS_ADDR", "0.0.0.0:15021".into()),
            ("ZTUNNEL_METRICS_ADDR", "0.0.0.0:15020".into()),
            ("CONNECTION_TERMINATION_DEADLINE", "5s".into()),
            ("RUST_LOG", "info".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        self.env = env;
        for i in 0..2 {
            let p = self.spawn(i, "");
            self.proxies.push(Some(p));
        }
        for i in 0..2 {
            self.handover(i);
        }
        for i in 0..2 {
            let p = self.proxies[i].as_mut().unwrap();
            let ok = run_in(self.nodes[i].name(), || eventually(|| rig_ready() || !p.running())).unwrap();
            assert!(ok && p.running(), "node {i} is ready:\n{}", p.log());
        }
    }

    /// Another proxy process on node `i` (a restart: it binds next to the running one).
    pub fn spawn(&self, i: usize, suffix: &str) -> NodeProxy {
        let mut env = self.env.clone();
        env.push(("NODE_NAME".into(), NODES[i].0.into()));
        env.push(("INPOD_UDS".into(), self.agents[i].path.display().to_string()));
        NodeProxy::spawn(&self.nodes[i].0, &env, self.dir.0.join(format!("{}{suffix}.log", NODES[i].0)))
    }

    pub fn proxy(&self, i: usize) -> &NodeProxy {
        self.proxies[i].as_ref().expect("the node's proxy runs")
    }

    pub fn log(&self, i: usize) -> String {
        self.proxy(i).log()
    }

    /// Waits until node `i`'s log has a line containing every one of `parts`; returns it.
    pub fn log_line(&self, i: usize, parts: &[&str]) -> String {
        let mut found = None;
        let ok = eventually(|| {
            found = self.log(i).lines().find(|l| parts.iter().all(|p| l.contains(p))).map(str::to_string);
            found.is_some()
        });
        assert!(ok, "no line on node {} with {parts:?}:\n{}", NODES[i].0, self.log(i));
        found.unwrap()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        &self.pods.iter().find(|(n, _)| *n == name).unwrap().1
    }

    /// Runs `f` inside pod `name`'s network namespace.
    pub fn in_pod<T: Send>(&self, name: &str, f: impl FnOnce() -> T + Send) -> T {
        run_in(self.pod(name).ns.name(), f).unwrap()
    }

    pub fn in_node<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> T {
        run_in(self.nodes[i].name(), f).unwrap()
    }

    /// Node `i`'s `/config_dump` (the admin port listens on the node's localhost).
    pub fn dump(&self, i: usize) -> serde_json::Value {
        self.in_node(i, || admin_get("127.0.0.1:15000", "/config_dump"))
    }

    /// Node `i`'s metrics, parsed.
    pub fn scrape(&self, i: usize) -> Vec<Sample> {
        let text = self.in_node(i, || http("127.0.0.1:15020".parse().unwrap(), "GET", "/metrics").unwrap().1);
        parse_prometheus(&text).unwrap()
    }

    /// Waits until node `i` holds `n` available certificates.
    pub fn wait_for_certificates(&self, i: usize, n: usize) {
        let ok = eventually(|| {
            self.dump(i)["certificates"]
                .as_array()
                .is_some_and(|c| c.iter().filter(|c| c["state"] == "Available").count() == n)
        });
        assert!(ok, "node {i} has {n} certificates: {}", self.dump(i)["certificates"]);
    }

    /// Writes the config and waits until both proxies run a generation newer than before.
    pub fn push(&self, mesh: &Mesh) {
        let before: Vec<u64> = (0..2).map(|i| self.dump(i)["configGeneration"].as_u64().unwrap()).collect();
        self.dir.write_config(&mesh.yaml());
        for (i, b) in before.into_iter().enumerate() {
            assert!(eventually(|| self.dump(i)["configGeneration"].as_u64() > Some(b)), "node {i} applied the push");
        }
    }

    /// A namespace behind node `node` with an address no node captures (a pod outside the
    /// mesh, or one serving HBONE itself); the other node routes to it through `node`.
    pub fn add_outsider(&mut self, node: usize, ip: &str) -> usize {
        let pid = std::process::id();
        let ns = Ns::new(format!("zo{pid}{}{}", self.tag, ip.replace('.', "")));
        let host_if = format!("vo{}", ip.rsplit('.').next().unwrap());
        attach(&self.nodes[node], &ns, &host_if, ip);
        self.nodes[1 - node].exec(&["ip", "route", "add", &format!("{ip}/32"), "via", NODES[node].1]);
        self.outsiders.push(ns);
        self.outsiders.len() - 1
    }

    pub fn in_outsider<T: Send>(&self, k: usize, f: impl FnOnce() -> T + Send) -> T {
        run_in(self.outsiders[k].name(), f).unwrap()
    }

    /// `curl` from pod `from` to `to`: the body (the answering pod's name), or the error.
    pub fn curl(&self, from: &str, to: SocketAddr) -> Result<String, String> {
        self.in_pod(from, move || curl(to))
    }

    /// Starts a tiny HTTP server in pod `name` on port 80: every response names the pod.
    pub fn http_server(&self, name: &'static str) {
        let ip = self.pod(name).ip;
        self.in_pod(name, || HttpServer::start(ip, name));
    }
}

pub fn rig_ready() -> bool {
    http("127.0.0.1:15021".parse().unwrap(), "GET", "/healthz/ready").is_ok_and(|(s, _)| s == 200)
}

pub fn admin_get(addr: &str, path: &str) -> serde_json::Value {
    let (code, body) = http(addr.parse().unwrap(), "GET", path).unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// A minimal HTTP/1.1 server (what `httpbin` is to the scenarios): each request on a
/// connection gets `200` with the body `<pod name>\n`; keep-alive until the client closes.
pub struct HttpServer;

impl HttpServer {
    pub fn start(ip: &str, name: &'static str) {
        let listener = std::net::TcpListener::bind((ip.parse::<Ipv4Addr>().unwrap(), 80)).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || serve_http(conn, name));
            }
        });
    }
}

fn serve_http(conn: TcpStream, name: &str) {
    use std::io::{BufRead, BufReader, Write};
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        // Headers up to the blank line; requests carry no body.
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
        }
        if w.write_all(&response_bytes(name)).is_err() {
            return;
        }
    }
}

/// A `curl`-like HTTP/1.1 client on one keep-alive connection.
pub struct HttpClient {
    r: std::io::BufReader<TcpStream>,
    host: String,
}

impl HttpClient {
    pub fn connect(to: SocketAddr) -> Result<HttpClient, String> {
        let c = TcpStream::connect_timeout(&to, PATIENCE).map_err(|e| format!("connect: {e}"))?;
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        Ok(HttpClient { r: std::io::BufReader::new(c), host: to.to_string() })
    }

    /// The exact bytes of a GET for `path` (what the metrics count as sent).
    pub fn request_bytes(&self, path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nhost: {}\r\nuser-agent: rig\r\n\r\n", self.host).into_bytes()
    }

    /// One GET: the status and body.
    pub fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        use std::io::{BufRead, Write};
        let req = self.request_bytes(path);
        self.r.get_mut().write_all(&req).map_err(|e| format!("write: {e}"))?;
        let mut status = String::new();
        self.r.read_line(&mut status).map_err(|e| format!("read: {e}"))?;
        if status.is_empty() {
            return Err("closed without a response".into());
        }
        let code =
            status.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or(format!("bad status line {status:?}"))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.r.read_line(&mut h).map_err(|e| format!("read: {e}"))?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().map_err(|_| format!("bad length {v:?}"))?;
            }
        }
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Half-closes and waits for the server's close (so both proxies see the end).
    pub fn close(mut self) {
        let _ = self.r.get_mut().shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = self.r.read_to_end(&mut rest);
    }
}

/// The body of one GET on a fresh connection (the server names its pod), or the error.
pub fn curl(to: SocketAddr) -> Result<String, String> {
    let mut c = HttpClient::connect(to)?;
    let (status, body) = c.get("/")?;
    c.close();
    if status != 200 {
        return Err(format!("status {status}"));
    }
    Ok(body.trim_end().to_string())
}

/// The bytes of [`serve_http`]'s answer naming `name`.
pub fn response_bytes(name: &str) -> Vec<u8> {
    let body = format!("{name}\n");
    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}", body.len()).into_bytes()
}

/// One TCP segment seen on an interface.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// A packet capture on one interface of a namespace (an `AF_PACKET` socket: what tcpdump
/// reads), IPv4 TCP only, from `start` to `stop`.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Segment>>,
}

impl Capture {
    pub fn start(ns: &Ns, iface: &str) -> Capture {
        let (ns, iface) = (ns.0.clone(), iface.to_string());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
            perf::netns::enter(&ns).unwrap();
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the descriptor is owned right away.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(iface.clone()).unwrap();
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(index > 0, "no interface {iface} in {ns}");
            // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
            // SAFETY: valid pointers and lengths for the duration of each call.
            unsafe {
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &timeout as *const libc::timeval as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            ready_tx.send(()).unwrap();
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 1 << 17];
            loop {
                // SAFETY: `buf` is writable for its whole length.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    // A timeout: nothing in flight. Stop only then, so nothing is cut short.
                    if flag.load(Ordering::Relaxed) {
                        return seen;
                    }
                    continue;
                }
                if let Some(s) = parse_frame(&buf[..n as usize]) {
                    seen.push(s);
                }
            }
        });
        ready_rx.recv().expect("the capture starts");
        Capture { stop, thread }
    }

    pub fn stop(self) -> Vec<Segment> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the capture thread")
    }
}

/// Ethernet, IPv4, TCP: the segment, or None for anything else.
fn parse_frame(f: &[u8]) -> Option<Segment> {
    if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    if ip[0] >> 4 != 4 || ip[9] != 6 || total < ihl + 20 {
        return None;
    }
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let tcp = &ip[ihl..total];
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    let data = usize::from(tcp[12] >> 4) * 4;
    Some(Segment {
        src: SocketAddr::from((addr(12), port(0))),
        dst: SocketAddr::from((addr(16), port(2))),
        payload: tcp.get(data..).unwrap_or_default().to_vec(),
    })
}

/// What an [`HbonePeer`] saw in a CONNECT request.
#[derive(Debug)]
pub struct SeenConnect {
    pub authority: String,
    pub client: Option<Identity>,
}

/// Where an [`HbonePeer`] sends the streams it relays: an HBONE endpoint, the CONNECT target
/// there and the identity it must present.
#[derive(Clone)]
pub struct Upstream {
    pub hbone: SocketAddr,
    pub target: String,
    pub identity: Identity,
}

/// An HBONE server that is not ours: tokio, tokio-rustls and h2 (none of the proxy's TLS
/// adapter or HBONE code). With a route for a CONNECT authority it is a waypoint: it opens its
/// own HBONE stream to the route's upstream and relays both ways. Otherwise it is a node of
/// another implementation with its pod behind it: it answers `name\n` and echoes.
pub struct HbonePeer {
    pub seen: crossbeam_channel::Receiver<SeenConnect>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for HbonePeer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl HbonePeer {
    /// Serves on `addr` (bound in the calling thread's namespace) as `cert`.
    pub fn start(
        addr: SocketAddr,
        name: &'static str,
        cert: Arc<WorkloadCert>,
        routes: HashMap<String, Upstream>,
    ) -> HbonePeer {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
                let routes = Arc::new(routes);
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else { continue };
                        let (acceptor, seen_tx, cert, routes) =
                            (acceptor.clone(), seen_tx.clone(), cert.clone(), routes.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let client = ztunnel::tls::peer_identity(tls.get_ref().1.peer_certificates());
                            let Ok(mut conn) = h2::server::handshake(tls).await else { return };
                            while let Some(Ok((req, respond))) = conn.accept().await {
                                let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
                                let _ =
                                    seen_tx.send(SeenConnect { authority: authority.clone(), client: client.clone() });
                                let upstream = routes.get(&authority).cloned();
                                let cert = cert.clone();
                                tokio::spawn(async move {
                                    let _ = match upstream {
                                        Some(up) => relay(req.into_body(), respond, &cert, up).await,
                                        None => answer(req.into_body(), respond, name).await,
                                    };
                                });
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
            });
        });
        HbonePeer { seen, stop: Some(stop_tx), thread: Some(thread) }
    }
}

type Respond = h2::server::SendResponse<Bytes>;

/// The pod behind another implementation: answers each HTTP request with its name.
async fn answer(mut body: h2::RecvStream, mut respond: Respond, name: &str) -> Result<(), h2::Error> {
    let mut send = respond.send_response(http::Response::new(()), false)?;
    let mut pending = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            send.send_data(Bytes::from(response_bytes(name)), false)?;
        }
    }
    send.send_data(Bytes::new(), true)
}

/// The waypoint: its own HBONE stream to `up`, relayed both ways.
async fn relay(body: h2::RecvStream, mut respond: Respond, cert: &WorkloadCert, up: Upstream) -> Result<(), h2::Error> {
    let opened = async {
        let tcp = tokio::net::TcpStream::connect(up.hbone).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::IpAddress(up.hbone.ip().into());
        let tls = tokio_rustls::TlsConnector::from(cert.client_config())
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        ztunnel::tls::check_server_identity(tls.get_ref().1.peer_certificates(), std::slice::from_ref(&up.identity))
            .map_err(|e| e.to_string())?;
        let (send, conn) = h2::client::handshake(tls).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::builder().method(http::Method::CONNECT).uri(up.target.as_str()).body(()).unwrap();
        let (resp, to_up) =
            send.ready().await.map_err(|e| e.to_string())?.send_request(req, false).map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| e.to_string())?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("upstream answered {}", resp.status()));
        }
        Ok::<_, String>((to_up, resp.into_body()))
    };
    let (to_up, from_up) = match opened.await {
        Ok(streams) => streams,
        Err(why) => {
            eprintln!("waypoint: upstream {} failed: {why}", up.hbone);
            let resp = http::Response::builder().status(http::StatusCode::SERVICE_UNAVAILABLE).body(()).unwrap();
            respond.send_response(resp, true)?;
            return Ok(());
        }
    };
    let to_client = respond.send_response(http::Response::new(()), false)?;
    let (a, b) = tokio::join!(pump(body, to_up), pump(from_up, to_client));
    a.and(b)
}

/// Copies one h2 stream's data into another, end of stream included.
async fn pump(mut from: h2::RecvStream, mut to: h2::SendStream<Bytes>) -> Result<(), h2::Error> {
    while let Some(chunk) = from.data().await {
        let chunk = chunk?;
        let _ = from.flow_control().release_capacity(chunk.len());
        to.send_data(chunk, false)?;
    }
    to.send_data(Bytes::new(), true)
}

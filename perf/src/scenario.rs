//! Scenarios (`local`, `netns`): set up servers, proxies and paths, run the test matrix with
//! repetitions (interleaving proxies when comparing), and collect raw records.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use crate::load::{self, Percentiles, Via};
use crate::netns::{self, Topology};
use crate::profile::Profile;
use crate::proxy::{self, ProxyProc};
use crate::server;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One proxy serves both ends; clients enter by SOCKS5. No root needed.
    Local,
    /// Two namespaces ("nodes"), one proxy each, client traffic captured by iptables REDIRECT.
    Netns,
}

pub struct RunOpts {
    pub scenario: Scenario,
    pub quick: bool,
    pub proxy: PathBuf,
    pub compare: Option<PathBuf>,
    pub out: PathBuf,
    /// Repetitions; default 3 (1 with `quick`).
    pub reps: Option<usize>,
    /// Print a progress line on stderr.
    pub progress: bool,
    /// Authorization policies put in the config (0: none), to measure their cost.
    pub policies: usize,
    /// Only these tests (empty: all).
    pub tests: Vec<String>,
    /// Only these paths (empty: all), e.g. `hbone`, `tcp`, `direct`.
    pub paths: Vec<String>,
    /// Attach Linux `perf` to each proxy during each test (see `profile`).
    pub profile: bool,
    /// Netns only: this binary runs on the receiving node instead of the proxy under test
    /// (interop: the label becomes `<sender>+<receiver>`).
    pub node_b: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Bulk { streams: usize, secs: f64 },
    RrClosed { size: usize, warmup: u64, count: u64 },
    RrOpen { size: usize, rate: u64, secs: f64 },
    ConnRate { clients: usize, secs: f64 },
    Idle { conns: usize },
}

#[derive(Debug, Clone, Copy)]
struct Test {
    name: &'static str,
    kind: Kind,
}

fn tests(quick: bool, idle_conns: usize) -> Vec<Test> {
    let (secs, count, warmup) = if quick { (1.0, 500, 50) } else { (10.0, 20_000, 2_000) };
    vec![
        Test { name: "bulk_1", kind: Kind::Bulk { streams: 1, secs } },
        Test { name: "bulk_8", kind: Kind::Bulk { streams: 8, secs } },
        Test { name: "rr_1b", kind: Kind::RrClosed { size: 1, warmup, count } },
        Test { name: "rr_1k", kind: Kind::RrClosed { size: 1024, warmup, count } },
        Test {
            name: "rr_open_1b",
            kind: if quick {
                Kind::RrOpen { size: 1, rate: 500, secs: 0.5 }
            } else {
                Kind::RrOpen { size: 1, rate: 1000, secs: 10.0 }
            },
        },
        Test { name: "connrate", kind: Kind::ConnRate { clients: 8, secs } },
        Test { name: "idle", kind: Kind::Idle { conns: idle_conns } },
    ]
}

/// One way from client to server.
#[derive(Debug, Clone)]
struct PathDef {
    name: &'static str,
    via: Via,
    echo: SocketAddr,
    sink: SocketAddr,
    proxied: bool,
}

/// One proxy instance to start for a proxy under test.
struct Instance {
    env: Vec<(String, String)>,
    ns: Option<String>,
    readiness: SocketAddr,
    tag: &'static str,
}

/// A raw measurement: one test on one path through one proxy, in one repetition.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub test: String,
    pub path: String,
    /// Proxy label, or `none` for the direct path.
    pub proxy: String,
    pub rep: usize,
    pub metrics: serde_json::Value,
    pub latency: Option<Percentiles>,
    /// Proxy CPU seconds (all instances) while the test ran.
    pub cpu_seconds: Option<f64>,
    /// Highest sampled RSS (all instances) while the test ran.
    pub peak_rss_bytes: Option<u64>,
    pub efficiency: serde_json::Value,
    /// The full latency histogram: (nanoseconds, count).
    pub histogram: Option<Vec<(u64, u64)>>,
    /// With `--profile`: what each proxy instance (by tag) spent its CPU on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<std::collections::BTreeMap<String, crate::profile::Profile>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unavailable {
    pub path: String,
    pub proxy: String,
    pub reason: String,
}

/// A test that failed in one repetition; the run goes on.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub test: String,
    pub path: String,
    pub proxy: String,
    pub rep: usize,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyInfo {
    pub label: String,
    pub binary: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub quick: bool,
    pub reps: usize,
    /// Authorization policies in the scenario's config.
    pub policies: usize,
    pub started: String,
    pub host: serde_json::Value,
    pub proxies: Vec<ProxyInfo>,
    pub records: Vec<Record>,
    pub unavailable: Vec<Unavailable>,
    pub failures: Vec<Failure>,
    /// Histograms kept in memory for the plot and `.hgrm` files, not serialized twice.
    #[serde(skip)]
    pub merged: Vec<(String, String, String, hdrhistogram::Histogram<u64>)>,
}

const MARK: u32 = 1337;

/// Runs the scenario and writes `report.json`, `report.md`, `latency.svg` into `opts.out`.
pub fn run(opts: &RunOpts) -> anyhow::Result<Report> {
    std::fs::create_dir_all(opts.out.join("hist")).with_context(|| format!("creating {}", opts.out.display()))?;
    let reps = opts.reps.unwrap_or(if opts.quick { 1 } else { 3 });
    let nofile = proxy::raise_nofile(1 << 20);
    // The harness holds both the client and the server end of every idle connection.
    let idle_conns = if opts.quick { 100 } else { 10_000.min((nofile as usize).saturating_sub(2_000) / 2) };
    let mut tests = tests(opts.quick, idle_conns);
    for name in &opts.tests {
        if !tests.iter().any(|t| t.name == name) {
            bail!("unknown test {name:?}: use {}", tests.iter().map(|t| t.name).collect::<Vec<_>>().join(", "));
        }
    }
    if !opts.tests.is_empty() {
        tests.retain(|t| opts.tests.iter().any(|n| n == t.name));
    }
    if opts.profile {
        if let Some(why) = crate::profile::unavailable() {
            bail!("{why}");
        }
    }

    let node_b_label = opts.node_b.as_deref().map(|b| label_of(b, "node-b"));
    let proxies: Vec<ProxyInfo> = labels(&opts.proxy, opts.compare.as_deref())
        .into_iter()
        .map(|(label, binary)| match &node_b_label {
            Some(b) => ProxyInfo { label: format!("{label}+{b}"), binary: binary.display().to_string() },
            None => ProxyInfo { label, binary: binary.display().to_string() },
        })
        .collect();
    for p in proxies.iter().map(|p| PathBuf::from(&p.binary)).chain(opts.node_b.clone()) {
        if !p.is_file() {
            bail!("proxy binary {} does not exist", p.display());
        }
    }
    if opts.node_b.is_some() && opts.scenario != Scenario::Netns {
        bail!("--node-b needs the netns scenario (two nodes)");
    }

    let topology = match opts.scenario {
        Scenario::Local => None,
        Scenario::Netns => {
            if let Some(why) = netns::unavailable() {
                bail!("{why}");
            }
            Some(Topology::create()?)
        }
    };
    let mut setup = Setup::new(opts, topology.as_ref())?;
    for name in &opts.paths {
        if !setup.paths.iter().any(|p| p.name == name) {
            bail!("unknown path {name:?}: use direct, tcp or hbone");
        }
    }
    if !opts.paths.is_empty() {
        setup.paths.retain(|p| opts.paths.iter().any(|n| n == p.name));
    }
    let profile_dir = opts.profile.then(|| opts.out.join("profile"));

    let mut report = Report {
        scenario: opts.scenario,
        quick: opts.quick,
        reps,
        policies: opts.policies,
        started: now_rfc3339(),
        host: host_info(),
        proxies: proxies.clone(),
        records: Vec::new(),
        unavailable: Vec::new(),
        failures: Vec::new(),
        merged: Vec::new(),
    };
    let direct_tests = tests.iter().filter(|t| !matches!(t.kind, Kind::Idle { .. })).count();
    let proxied_paths = setup.paths.iter().filter(|p| p.proxied).count();
    let total = reps * (direct_tests + proxies.len() * tests.len() * proxied_paths);
    let mut done = 0;
    let mut progress = |what: &str| {
        done += 1;
        if opts.progress {
            eprint!("\r\x1b[K[{done}/{total}] {what}");
        }
    };
    let mut unavailable: Vec<(String, String)> = Vec::new();

    for rep in 0..reps {
        // The direct path needs no proxy: once per repetition, interleaved with the proxies.
        for path in setup.paths.iter().filter(|p| !p.proxied) {
            for t in tests.iter().filter(|t| !matches!(t.kind, Kind::Idle { .. })) {
                progress(&format!("rep {} direct {}", rep + 1, t.name));
                record(&mut report, run_test(&setup, path, t, &[], "none", rep, None), t, path, "none", rep);
            }
        }
        for p in &proxies {
            let binary = PathBuf::from(&p.binary);
            let (procs, started) = setup.start_proxies(&p.label, &binary, opts.node_b.as_deref(), &opts.out, rep)?;
            report.records.extend(started);
            let refs: Vec<&ProxyProc> = procs.iter().collect();
            for path in setup.paths.iter().filter(|p| p.proxied) {
                let key = (path.name.to_string(), p.label.clone());
                if unavailable.contains(&key) {
                    for _ in &tests {
                        progress(&format!("rep {} {} {} (unavailable)", rep + 1, p.label, path.name));
                    }
                    continue;
                }
                if let Err(e) = setup.probe(path) {
                    report.unavailable.push(Unavailable {
                        path: path.name.into(),
                        proxy: p.label.clone(),
                        reason: format!("{e:#}"),
                    });
                    unavailable.push(key);
                    for _ in &tests {
                        progress(&format!("rep {} {} {} (unavailable)", rep + 1, p.label, path.name));
                    }
                    continue;
                }
                for t in &tests {
                    progress(&format!("rep {} {} {} {}", rep + 1, p.label, path.name, t.name));
                    let prof = profile_dir.as_deref();
                    let res = run_test(&setup, path, t, &refs, &p.label, rep, prof);
                    record(&mut report, res, t, path, &p.label, rep);
                }
            }
            setup.save_telemetry(&p.label, &opts.out, rep);
            for proc_ in procs {
                proc_.stop(Duration::from_secs(15))?;
            }
        }
    }
    if opts.progress {
        eprintln!();
    }
    drop(setup);
    drop(topology);
    crate::report::finish(&mut report, &opts.out)?;
    Ok(report)
}

/// The `start` record of one proxy instance: how long it took to answer ready, and its resident
/// memory then (all of it, and the anonymous part: heap, stacks, relocated data; the rest is the
/// binary's and libraries' pages, which depend on what the page cache holds). Its path is the
/// instance's tag.
fn start_record(p: &ProxyProc, tag: &str, proxy: &str, rep: usize, ready: Duration) -> Record {
    let (rss, anon) = (proxy::rss_bytes(p.pid()).ok(), proxy::status_bytes(p.pid(), "RssAnon").ok());
    Record {
        test: "start".into(),
        path: tag.into(),
        proxy: proxy.into(),
        rep,
        metrics: json!({ "ready_ms": ready.as_secs_f64() * 1e3, "rss_bytes": rss, "rss_anon_bytes": anon }),
        latency: None,
        cpu_seconds: proxy::cpu_seconds(p.pid()).ok(),
        peak_rss_bytes: rss,
        efficiency: json!({}),
        histogram: None,
        profile: None,
    }
}

/// Keeps a record, or notes the failure and goes on with the run.
fn record(report: &mut Report, res: anyhow::Result<Record>, t: &Test, path: &PathDef, proxy: &str, rep: usize) {
    match res {
        Ok(rec) => report.records.push(rec),
        Err(e) => report.failures.push(Failure {
            test: t.name.into(),
            path: path.name.into(),
            proxy: proxy.into(),
            rep,
            error: format!("{e:#}"),
        }),
    }
}

struct Setup {
    paths: Vec<PathDef>,
    client_ns: Option<String>,
    instances: Vec<Instance>,
    config: PathBuf,
    _servers: server::Servers,
}

/// The workloads of a scenario. The client is a mesh (HBONE) workload so it has a certificate
/// for HBONE; `hbone_ip` is a separate HBONE server workload, or none when the HBONE target is
/// the client workload itself (one dedicated proxy serving both ends, as in Istio's localhost
/// example). Trust domains are spelled out: Istio's ztunnel with its fake CA otherwise issues
/// identities without one, which a peer of another make refuses (`--node-b`).
fn yaml(client_ip: &str, tcp_ip: &str, hbone_ip: Option<&str>, client_node: &str, server_node: &str) -> String {
    let mut y = format!(
        r#"# Generated by perf: the workloads of one benchmark scenario.
workloads:
- uid: perf//client
  name: client
  namespace: perf
  serviceAccount: client
  workloadIps: ["{client_ip}"]
  protocol: HBONE
  node: {client_node}
  trustDomain: cluster.local
  services: {{}}
- uid: perf//server-tcp
  name: server-tcp
  namespace: perf
  serviceAccount: server
  workloadIps: ["{tcp_ip}"]
  protocol: TCP
  node: {server_node}
  trustDomain: cluster.local
  services: {{}}
"#
    );
    if let Some(hbone_ip) = hbone_ip {
        y.push_str(&format!(
            r#"- uid: perf//server-hbone
  name: server-hbone
  namespace: perf
  serviceAccount: server-hbone
  workloadIps: ["{hbone_ip}"]
  protocol: HBONE
  node: {server_node}
  trustDomain: cluster.local
  services: {{}}
"#
        ));
    }
    y
}

/// `n` authorization policies on the scenario's namespace, all evaluated for every inbound
/// connection and all letting the benchmark through: `n - 1` DENY policies for principals
/// that are not ours (each with several matches), and one ALLOW listing the client among others.
pub fn policies_yaml(n: usize) -> String {
    if n == 0 {
        return String::new();
    }
    let mut y = String::from("policies:\n");
    for i in 0..n - 1 {
        y.push_str(&format!(
            "- {{name: deny-{i}, namespace: perf, scope: Namespace, action: Deny, rules: [[[{{principals: \
             [!Exact cluster.local/ns/other/sa/x{i}, !Prefix cluster.local/ns/blocked-{i}/]}}, \
             {{sourceIps: [203.0.113.{}/32], destinationPorts: [{}]}}]]]}}\n",
            i % 250,
            1 + i % 1000
        ));
    }
    y.push_str(
        "- {name: allow-clients, namespace: perf, scope: Namespace, action: Allow, rules: [[[{principals: \
         [!Exact cluster.local/ns/other/sa/a, !Exact cluster.local/ns/other/sa/b, !Suffix /sa/client]}]]]}\n",
    );
    y
}

/// Istio's standalone environment for one proxy. Original source (`ENABLE_ORIG_SRC`) is off:
/// the scenarios' pods share a namespace with their proxy and have none of the node rules that
/// route replies to a spoofed source back to the proxy, so a spoofed connection would stall.
fn standalone_env(config: &Path, workload: &str, node: &str, socks5: bool) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("FAKE_CA", "true"),
        ("XDS_ADDRESS", ""),
        ("PROXY_MODE", "dedicated"),
        ("PROXY_WORKLOAD_INFO", workload),
        ("NODE_NAME", node),
        ("PACKET_MARK", &MARK.to_string()),
        ("ENABLE_ORIG_SRC", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.push(("LOCAL_XDS_PATH".into(), config.display().to_string()));
    if socks5 {
        env.push(("UNSTABLE_ENABLE_SOCKS5".into(), "true".into()));
    }
    env
}

impl Setup {
    fn new(opts: &RunOpts, topo: Option<&Topology>) -> anyhow::Result<Setup> {
        let config = opts.out.join("config.yaml");
        match topo {
            None => {
                // The HBONE server runs on the client workload's own address (see `yaml`).
                let ips: Vec<IpAddr> = ["127.0.0.2", "127.0.0.1"].iter().map(|s| s.parse().unwrap()).collect();
                let servers = server::start(&ips, None, 0, 0)?;
                let (tcp, hbone) = (servers.addrs[0], servers.addrs[1]);
                let text = yaml("127.0.0.1", "127.0.0.2", None, "local", "local") + &policies_yaml(opts.policies);
                std::fs::write(&config, text)?;
                let socks: SocketAddr = "127.0.0.1:15080".parse().unwrap();
                Ok(Setup {
                    paths: vec![
                        PathDef { name: "direct", via: Via::Direct, echo: tcp.echo, sink: tcp.sink, proxied: false },
                        PathDef { name: "tcp", via: Via::Socks5(socks), echo: tcp.echo, sink: tcp.sink, proxied: true },
                        PathDef {
                            name: "hbone",
                            via: Via::Socks5(socks),
                            echo: hbone.echo,
                            sink: hbone.sink,
                            proxied: true,
                        },
                    ],
                    client_ns: None,
                    instances: vec![Instance {
                        env: {
                            // One proxy is both ends of the hbone path here: without this its
                            // node-local fast path would skip HBONE altogether.
                            let mut env = standalone_env(&config, "perf/client/client", "local", true);
                            env.push(("ENABLE_NODE_LOCAL_FAST_PATH".into(), "false".into()));
                            env
                        },
                        ns: None,
                        readiness: "127.0.0.1:15021".parse().unwrap(),
                        tag: "local",
                    }],
                    config,
                    _servers: servers,
                })
            }
            Some(t) => {
                let ips: Vec<IpAddr> = [netns::TCP_WORKLOAD_IP, netns::OUTSIDE_IP, netns::HBONE_WORKLOAD_IP]
                    .iter()
                    .map(|s| s.parse().unwrap())
                    .collect();
                let servers = server::start(&ips, Some(&t.b), 5001, 5002)?;
                let (tcp, outside, hbone) = (servers.addrs[0], servers.addrs[1], servers.addrs[2]);
                std::fs::write(
                    &config,
                    yaml(netns::NODE_A_IP, netns::TCP_WORKLOAD_IP, Some(netns::HBONE_WORKLOAD_IP), "node-a", "node-b")
                        + &policies_yaml(opts.policies),
                )?;
                t.capture_outbound(MARK, 15001)?;
                Ok(Setup {
                    paths: vec![
                        PathDef {
                            name: "direct",
                            via: Via::Direct,
                            echo: outside.echo,
                            sink: outside.sink,
                            proxied: false,
                        },
                        PathDef { name: "tcp", via: Via::Direct, echo: tcp.echo, sink: tcp.sink, proxied: true },
                        PathDef { name: "hbone", via: Via::Direct, echo: hbone.echo, sink: hbone.sink, proxied: true },
                    ],
                    client_ns: Some(t.a.clone()),
                    instances: vec![
                        Instance {
                            env: standalone_env(&config, "perf/client/client", "node-a", false),
                            ns: Some(t.a.clone()),
                            readiness: "127.0.0.1:15021".parse().unwrap(),
                            tag: "node-a",
                        },
                        Instance {
                            env: standalone_env(&config, "perf/server-hbone/server-hbone", "node-b", false),
                            ns: Some(t.b.clone()),
                            readiness: "127.0.0.1:15021".parse().unwrap(),
                            tag: "node-b",
                        },
                    ],
                    config,
                    _servers: servers,
                })
            }
        }
    }

    fn start_proxies(
        &self,
        label: &str,
        binary: &Path,
        node_b: Option<&Path>,
        out: &Path,
        rep: usize,
    ) -> anyhow::Result<(Vec<ProxyProc>, Vec<Record>)> {
        let mut procs = Vec::new();
        let mut started = Vec::new();
        for inst in &self.instances {
            let log = out.join(format!("proxy-{label}-{}-rep{}.log", inst.tag, rep + 1));
            let binary = node_b.filter(|_| inst.tag == "node-b").unwrap_or(binary);
            let mut p = ProxyProc::start(label, binary, &inst.env, inst.ns.as_deref(), &log)?;
            let ready = p
                .wait_ready(inst.readiness, Duration::from_secs(30))
                .with_context(|| format!("starting {label} ({}); log: {}", inst.tag, log.display()))?;
            started.push(start_record(&p, inst.tag, label, rep, ready));
            procs.push(p);
        }
        let _ = &self.config;
        Ok((procs, started))
    }

    /// Saves each instance's own view of the run next to the report: its Prometheus scrape
    /// (`:15020/metrics`) and, where it has one, `:15000/stats/latency`. Best effort: a proxy
    /// without these endpoints just leaves no file.
    fn save_telemetry(&self, label: &str, out: &Path, rep: usize) {
        for inst in &self.instances {
            let fetched = netns::run_in(inst.ns.as_deref(), || {
                let metrics = http_get("127.0.0.1:15020".parse().unwrap(), "/metrics");
                let latency = http_get("127.0.0.1:15000".parse().unwrap(), "/stats/latency");
                (metrics, latency)
            });
            let Ok((metrics, latency)) = fetched else { continue };
            let name = |kind: &str, ext: &str| out.join(format!("{kind}-{label}-{}-rep{}.{ext}", inst.tag, rep + 1));
            if let Some(m) = metrics {
                let _ = std::fs::write(name("metrics", "prom"), m);
            }
            if let Some(l) = latency {
                let _ = std::fs::write(name("latency", "json"), l);
            }
        }
    }

    /// One echo through the path, to tell "this proxy cannot do this path" from a failure.
    fn probe(&self, path: &PathDef) -> anyhow::Result<()> {
        let (via, echo) = (path.via, path.echo);
        netns::run_in(self.client_ns.as_deref(), move || -> anyhow::Result<()> {
            let conns = load::open_idle(echo, via, 1)?;
            drop(conns);
            Ok(())
        })?
    }
}

/// A plain HTTP/1.1 GET; the body when the answer is 200.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// What the proxies did while a test ran.
struct Measured {
    cpu: Option<f64>,
    peak: Option<u64>,
    context_switches: Option<u64>,
    profile: Option<BTreeMap<String, Profile>>,
}

/// Samples the proxies' RSS while `f` runs and counts their CPU time and context switches;
/// with `profile` (a directory and a file-name stem), records a `perf` profile of each.
fn measure<T>(
    procs: &[(&ProxyProc, &str)],
    profile: Option<(&Path, &str)>,
    f: impl FnOnce() -> T,
) -> anyhow::Result<(T, Measured)> {
    if procs.is_empty() {
        return Ok((f(), Measured { cpu: None, peak: None, context_switches: None, profile: None }));
    }
    let pids: Vec<u32> = procs.iter().map(|(p, _)| p.pid()).collect();
    let cpu = |pids: &[u32]| -> anyhow::Result<f64> { pids.iter().map(|p| proxy::cpu_seconds(*p)).sum() };
    let switches = |pids: &[u32]| -> anyhow::Result<u64> { pids.iter().map(|p| proxy::context_switches(*p)).sum() };
    let sessions = match profile {
        Some((dir, stem)) => Some(
            procs
                .iter()
                .map(|(p, tag)| Ok((tag.to_string(), crate::profile::start(p.pid(), dir, &format!("{stem}-{tag}"))?)))
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let (cpu0, cs0) = (cpu(&pids)?, switches(&pids)?);
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, pids) = (stop.clone(), peak.clone(), pids.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let rss: u64 = pids.iter().filter_map(|p| proxy::rss_bytes(*p).ok()).sum();
                peak.fetch_max(rss, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = f();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let (cpu1, cs1) = (cpu(&pids)?, switches(&pids)?);
    let profile = match sessions {
        Some(sessions) => {
            Some(sessions.into_iter().map(|(tag, s)| Ok((tag, s.finish()?))).collect::<anyhow::Result<_>>()?)
        }
        None => None,
    };
    Ok((
        out,
        Measured {
            cpu: Some(cpu1 - cpu0),
            peak: Some(peak.load(Ordering::Relaxed)),
            context_switches: Some(cs1.saturating_sub(cs0)),
            profile,
        },
    ))
}

fn run_test(
    setup: &Setup,
    path: &PathDef,
    t: &Test,
    procs: &[&ProxyProc],
    proxy: &str,
    rep: usize,
    profile_dir: Option<&Path>,
) -> anyhow::Result<Record> {
    let ns = setup.client_ns.as_deref();
    let (via, echo, sink) = (path.via, path.echo, path.sink);
    let mut rec = Record {
        test: t.name.into(),
        path: path.name.into(),
        proxy: proxy.into(),
        rep,
        metrics: json!({}),
        latency: None,
        cpu_seconds: None,
        peak_rss_bytes: None,
        efficiency: json!({}),
        histogram: None,
        profile: None,
    };
    let tagged: Vec<(&ProxyProc, &str)> = procs.iter().zip(&setup.instances).map(|(p, i)| (*p, i.tag)).collect();
    let stem = format!("{}-{}-{}-rep{}", t.name, path.name, proxy, rep + 1);
    let prof = profile_dir.map(|d| (d, stem.as_str()));
    let ctx = |e: std::io::Error| anyhow::anyhow!("{} on {} via {proxy}: {e}", t.name, path.name);
    // Per-unit figures: the unit's name and how many units the test did.
    let (unit, units, m) = match t.kind {
        Kind::Bulk { streams, secs } => {
            let (res, m) = measure(&tagged, prof, || {
                netns::run_in(ns, || load::bulk(sink, via, streams, Duration::from_secs_f64(secs)))
            })?;
            let r = res?.map_err(ctx)?;
            rec.efficiency = json!({ "cpu_s_per_gb": m.cpu.map(|c| c / (r.bytes as f64 / 1e9)) });
            rec.metrics = serde_json::to_value(&r)?;
            ("mb", r.bytes as f64 / 1e6, m)
        }
        Kind::RrClosed { size, warmup, count } => {
            let (res, m) =
                measure(&tagged, prof, || netns::run_in(ns, || load::rr_closed(echo, via, size, warmup, count)))?;
            let h = res?.map_err(ctx)?;
            let trips = warmup + count;
            rec.efficiency = json!({ "cpu_us_per_round_trip": m.cpu.map(|c| c * 1e6 / trips as f64) });
            rec.metrics = json!({ "size": size, "round_trips": count });
            fill_latency(&mut rec, &h);
            ("round_trip", trips as f64, m)
        }
        Kind::RrOpen { size, rate, secs } => {
            let (res, m) = measure(&tagged, prof, || {
                netns::run_in(ns, || load::rr_open(echo, via, size, rate, Duration::from_secs_f64(secs)))
            })?;
            let h = res?.map_err(ctx)?;
            rec.efficiency = json!({ "cpu_us_per_round_trip": m.cpu.map(|c| c * 1e6 / h.len().max(1) as f64) });
            rec.metrics = json!({ "size": size, "rate_per_s": rate, "round_trips": h.len() });
            fill_latency(&mut rec, &h);
            ("round_trip", h.len().max(1) as f64, m)
        }
        Kind::ConnRate { clients, secs } => {
            let (res, m) = measure(&tagged, prof, || {
                netns::run_in(ns, || load::connrate(echo, via, clients, Duration::from_secs_f64(secs)))
            })?;
            let (r, h) = res?.map_err(ctx)?;
            rec.efficiency = json!({ "cpu_us_per_connection": m.cpu.map(|c| c * 1e6 / r.connections.max(1) as f64) });
            rec.metrics = serde_json::to_value(&r)?;
            fill_latency(&mut rec, &h);
            ("connection", r.connections.max(1) as f64, m)
        }
        Kind::Idle { conns } => {
            let pids: Vec<u32> = procs.iter().map(|p| p.pid()).collect();
            let rss = || pids.iter().filter_map(|p| proxy::rss_bytes(*p).ok()).sum::<u64>();
            let before = rss();
            let started = Instant::now();
            let held = netns::run_in(ns, || load::open_idle(echo, via, conns))?.map_err(ctx)?;
            std::thread::sleep(Duration::from_millis(500));
            let with = rss();
            let open_secs = started.elapsed().as_secs_f64();
            drop(held);
            // Let the proxy see the closes before the next test starts.
            std::thread::sleep(Duration::from_millis(500));
            let per_conn = with.saturating_sub(before) as f64 / conns as f64;
            rec.metrics = json!({ "connections": conns, "rss_before_bytes": before, "rss_with_bytes": with, "open_seconds": open_secs });
            rec.efficiency = json!({ "bytes_per_idle_connection": per_conn });
            rec.peak_rss_bytes = Some(with);
            return Ok(rec);
        }
    };
    (rec.cpu_seconds, rec.peak_rss_bytes) = (m.cpu, m.peak);
    let eff = rec.efficiency.as_object_mut().expect("efficiency is an object");
    if let Some(cs) = m.context_switches {
        eff.insert(format!("context_switches_per_{unit}"), json!(cs as f64 / units));
    }
    if let Some(profile) = &m.profile {
        let total = |f: fn(&Profile) -> Option<u64>| profile.values().map(f).sum::<Option<u64>>();
        if let Some(n) = total(|p| p.syscalls) {
            eff.insert(format!("syscalls_per_{unit}"), json!(n as f64 / units));
        }
        if let Some(n) = total(|p| p.context_switches) {
            eff.insert(format!("perf_context_switches_per_{unit}"), json!(n as f64 / units));
        }
    }
    rec.profile = m.profile;
    Ok(rec)
}

fn fill_latency(rec: &mut Record, h: &hdrhistogram::Histogram<u64>) {
    rec.latency = Some(Percentiles::of(h));
    rec.histogram = Some(load::histogram_counts(h));
}

/// The proxy under test and the one compared with it, each with its label: the binary's file
/// name, made distinct (`<name>-compare`) when both have the same name (ours and Istio's are
/// both `ztunnel`).
pub fn labels(proxy: &Path, compare: Option<&Path>) -> Vec<(String, PathBuf)> {
    let first = label_of(proxy, "proxy");
    let mut out = vec![(first.clone(), proxy.to_path_buf())];
    if let Some(other) = compare {
        let mut label = label_of(other, "compare");
        if label == first {
            label = format!("{label}-compare");
        }
        out.push((label, other.to_path_buf()));
    }
    out
}

pub fn label_of(binary: &Path, fallback: &str) -> String {
    binary.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| fallback.to_string())
}

fn host_info() -> serde_json::Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "kernel": kernel,
        "cpu": cpu,
    })
}

/// UTC time as `YYYY-MM-DDTHH:MM:SSZ`, without a date crate.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_named_binaries_get_distinct_labels() {
        let l = labels(Path::new("/a/ztunnel"), Some(Path::new("/b/ztunnel")));
        assert_eq!(l[0].0, "ztunnel");
        assert_eq!(l[1].0, "ztunnel-compare");
        let l = labels(Path::new("/a/ours"), Some(Path::new("/b/ztunnel")));
        assert_eq!((l[0].0.as_str(), l[1].0.as_str()), ("ours", "ztunnel"));
        assert_eq!(labels(Path::new("/a/ours"), None).len(), 1);
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }
}

//! `perf run dns`: the DNS proxy of this proxy and (with `--compare`) another, side by side in one
//! run. Each runs in dedicated mode inside a scratch network namespace, its DNS server on
//! 127.0.0.1:15053, its upstream a stand-in resolver in the same namespace (named by the
//! namespace's own resolv.conf, which `ip netns exec` shows the proxy). Closed-loop UDP clients ask
//! for a mesh name (answered by the proxy) and for an outside name (forwarded, or cached), and
//! the run reports queries per second, latency percentiles and queries per proxy CPU second.
//! DNS messages are encoded here by hand, so nothing ties this harness to a DNS library.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use crate::load::{self, Percentiles};
use crate::netns::{self, sh};
use crate::proxy::ProxyProc;

pub struct DnsOpts {
    pub proxy: PathBuf,
    pub compare: Option<PathBuf>,
    pub out: PathBuf,
    pub secs: f64,
    pub clients: usize,
    pub reps: usize,
}

/// A query for `name` (dotted, no trailing dot) of type A, with `id`.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// The stand-in upstream's answer: the question back with one A record (TTL 300).
fn answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 17 {
        return None;
    }
    let mut end = 12;
    while *q.get(end)? != 0 {
        end += 1 + usize::from(q[end]);
    }
    let question_end = end + 5;
    let mut a = Vec::with_capacity(question_end + 16);
    a.extend_from_slice(&q[..2]);
    a.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    a.extend_from_slice(q.get(12..question_end)?);
    a.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x01, 0x2c, 0, 4, 203, 0, 113, 9]);
    Some(a)
}

/// A stand-in upstream resolver on `addr`, in the calling thread's namespace, until `stop`.
fn upstream(addr: SocketAddr, stop: Arc<AtomicBool>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let sock = UdpSocket::bind(addr).with_context(|| format!("binding the stand-in upstream on {addr}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                if let Some(a) = answer(&buf[..n]) {
                    let _ = sock.send_to(&a, from);
                }
            }
        }
    }))
}

#[derive(Debug, Clone, Serialize)]
pub struct DnsResult {
    pub proxy: String,
    pub rep: usize,
    pub test: String,
    pub queries: u64,
    pub errors: u64,
    pub per_second: f64,
    pub latency: Percentiles,
    pub cpu_seconds: f64,
    pub queries_per_cpu_second: f64,
}

/// `clients` closed-loop UDP clients asking `target` for `name` for `secs`.
fn load(
    target: SocketAddr,
    name: &str,
    clients: usize,
    secs: f64,
) -> anyhow::Result<(u64, u64, hdrhistogram::Histogram<u64>)> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let name = name.to_string();
            std::thread::spawn(move || -> anyhow::Result<(u64, u64, hdrhistogram::Histogram<u64>)> {
                let s = UdpSocket::bind("127.0.0.1:0")?;
                s.connect(target)?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut h = load::new_histogram();
                let (mut ok, mut errors) = (0u64, 0u64);
                let mut buf = [0u8; 4096];
                let mut id = (c as u16).wrapping_mul(7919);
                while Instant::now() < deadline {
                    id = id.wrapping_add(1);
                    let q = query(id, &name);
                    let t = Instant::now();
                    s.send(&q)?;
                    loop {
                        match s.recv(&mut buf) {
                            Ok(n) if n >= 2 && buf[..2] == id.to_be_bytes() => {
                                ok += 1;
                                h.saturating_record(t.elapsed().as_nanos() as u64);
                                break;
                            }
                            Ok(_) => continue, // a late answer to an earlier query
                            Err(_) => {
                                errors += 1;
                                break;
                            }
                        }
                    }
                }
                Ok((ok, errors, h))
            })
        })
        .collect();
    let mut total = load::new_histogram();
    let (mut ok, mut errors) = (0, 0);
    for h in handles {
        let (o, e, hist) = h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        ok += o;
        errors += e;
        total.add(&hist).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok((ok, errors, total))
}

const CONFIG: &str = "\
# Generated by perf run dns.
workloads:
- {uid: perf//client, name: client, namespace: perf, serviceAccount: client, workloadIps: [\"127.0.0.1\"], protocol: TCP, services: {}}
services:
- {name: web, namespace: perf, hostname: web.perf.svc.cluster.local, vips: [\"/10.96.7.7\"], ports: {80: 80}}
";

pub fn run(opts: &DnsOpts) -> anyhow::Result<Vec<DnsResult>> {
    if let Some(why) = netns::unavailable() {
        bail!("{why}");
    }
    std::fs::create_dir_all(&opts.out)?;
    let ns = format!("ztdns-{}", std::process::id());
    sh("ip", &["netns", "add", &ns])?;
    let etc = PathBuf::from(format!("/etc/netns/{ns}"));
    struct Cleanup(String, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.1);
            let _ = sh("ip", &["netns", "del", &self.0]);
        }
    }
    let _cleanup = Cleanup(ns.clone(), etc.clone());
    sh("ip", &["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
    std::fs::create_dir_all(&etc)?;
    std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.53\noptions timeout:2 attempts:2\n")?;
    let config = opts.out.join("dns-config.yaml");
    std::fs::write(&config, CONFIG)?;
    let stop = Arc::new(AtomicBool::new(false));
    let up = netns::run_in(Some(&ns), || upstream("127.0.0.53:53".parse().unwrap(), stop.clone()))??;

    let binaries = crate::scenario::labels(&opts.proxy, opts.compare.as_deref());
    let target: SocketAddr = "127.0.0.1:15053".parse()?;
    let mut results = Vec::new();
    for rep in 0..opts.reps {
        for (label, binary) in &binaries {
            let label = label.clone();
            let env: Vec<(String, String)> = [
                ("FAKE_CA", "true".to_string()),
                ("XDS_ADDRESS", String::new()),
                ("CA_ADDRESS", String::new()),
                ("LOCAL_XDS_PATH", config.display().to_string()),
                ("PROXY_MODE", "dedicated".into()),
                ("PROXY_WORKLOAD_INFO", "perf/client/client".into()),
                ("ISTIO_META_DNS_CAPTURE", "true".into()),
                ("ISTIO_META_DNS_PROXY_ADDR", "127.0.0.1:15053".into()),
                ("ENABLE_ORIG_SRC", "false".into()),
                ("PACKET_MARK", "0".into()),
                ("ZTUNNEL_LOCAL_CA_DIR", opts.out.join("ca").display().to_string()),
                ("RUST_LOG", "warn".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let log = opts.out.join(format!("proxy-{label}-dns-rep{}.log", rep + 1));
            let mut p = ProxyProc::start(&label, binary, &env, Some(&ns), &log)?;
            p.wait_ready("127.0.0.1:15021".parse()?, Duration::from_secs(30))
                .with_context(|| format!("starting {label}; log {}", log.display()))?;
            for (test, name) in [("mesh", "web.perf.svc.cluster.local"), ("forwarded", "outside.example")] {
                eprintln!("rep {} {label} {test}", rep + 1);
                // Warm up (the forwarded name's first answer fills any cache).
                netns::run_in(Some(&ns), || load(target, name, 1, 0.2))??;
                let cpu0 = p.cpu_seconds()?;
                let (queries, errors, h) = netns::run_in(Some(&ns), || load(target, name, opts.clients, opts.secs))??;
                let cpu = p.cpu_seconds()? - cpu0;
                results.push(DnsResult {
                    proxy: label.clone(),
                    rep,
                    test: test.into(),
                    queries,
                    errors,
                    per_second: queries as f64 / opts.secs,
                    latency: Percentiles::of(&h),
                    cpu_seconds: cpu,
                    queries_per_cpu_second: if cpu > 0.0 { queries as f64 / cpu } else { 0.0 },
                });
            }
            p.stop(Duration::from_secs(15))?;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = up.join();
    std::fs::write(opts.out.join("dns.json"), serde_json::to_string_pretty(&json!({ "results": results }))?)?;
    std::fs::write(opts.out.join("dns.md"), markdown(&results))?;
    Ok(results)
}

pub fn markdown(results: &[DnsResult]) -> String {
    let mut s = String::from(
        "| proxy | rep | test | queries/s | p50 us | p99 us | errors | proxy CPU s | queries per CPU s |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {:.0} |\n",
            r.proxy,
            r.rep + 1,
            r.test,
            r.per_second,
            r.latency.p50_us,
            r.latency.p99_us,
            r.errors,
            r.cpu_seconds,
            r.queries_per_cpu_second
        ));
    }
    s
}

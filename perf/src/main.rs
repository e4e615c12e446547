//! `perf run <local|netns> ...`, `perf server ...`, `perf client ...`. See perf/README.md.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use perf::load::{self, Percentiles, Via};
use perf::{RunOpts, Scenario};

const USAGE: &str = "\
perf: throughput, latency and connection-rate benchmarks for ztunnel-compatible proxies

  perf run <local|netns> [--quick] [--reps N] [--policies N] [--proxy BINARY] [--compare OTHER_BINARY] [--out DIR]
           [--tests T,T] [--paths P,P] [--profile] [--node-b BINARY]
      local: one proxy, clients enter by SOCKS5 (no root). netns: two namespaces, one proxy
      each, iptables REDIRECT capture (root). --proxy defaults to this repository's release
      build (built first). Writes report.json, report.md and latency.svg into DIR
      (default perf/results/<timestamp>/). --policies N puts N authorization policies (all
      passing the benchmark's traffic) in the config, to measure what authorization costs.
      --tests and --paths pick a subset (tests: bulk_1 bulk_8 rr_1b rr_1k rr_open_1b
      connrate idle; paths: direct tcp hbone). --profile attaches Linux perf to each proxy
      during each test: CPU by category, hottest symbols, syscalls and context switches per
      unit of work, in profile.md and profile/ (raw perf.data files). netns --node-b runs
      this other proxy on the receiving node (interop on the wire: e.g. ours sending HBONE
      to Istio's ztunnel); both need one CA root (see perf/README.md).

  perf run dns [--quick] [--reps N] [--clients N] [--secs S] [--proxy BINARY] [--compare OTHER_BINARY] [--out DIR]
      the DNS proxy (root): queries/s, latency and queries per proxy CPU second for a mesh name
      and a forwarded one, each proxy in dedicated mode in a scratch namespace, side by side.
      Writes dns.json and dns.md into DIR.

  perf inpod [--quick] [--reps N] [--pods N] [--proxy BINARY] [--compare OTHER_BINARY] [--out DIR]
      in-pod mode (root): Add-to-ack time for one pod and for N pods (default 100), descriptors
      and memory per pod, and connection rate and rr latency from a pod in in-pod mode next to
      dedicated mode, for each proxy in one run. Writes inpod.json and inpod.md into DIR.
  perf inpod --socket-cost [--iters N]
      what one socket costs made in the thread's namespace, by entering a pod's namespace and
      back on the same thread, or by a helper thread living in it (nanoseconds per socket)

  perf server [--ip IP ...] [--echo-port P] [--sink-port P]
      echo and discard servers until interrupted (ports 0: chosen and printed)

  perf client <bulk|rr|rr-open|connrate|idle> --target IP:PORT [--socks5 IP:PORT]
      [--streams N] [--secs S] [--size BYTES] [--count N] [--rate PER_S] [--clients N] [--conns N]
      one test, result printed as JSON
";

struct Args(Vec<String>);

impl Args {
    fn flag(&mut self, name: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|a| a != name);
        self.0.len() != before
    }

    fn value(&mut self, name: &str) -> anyhow::Result<Option<String>> {
        let Some(i) = self.0.iter().position(|a| a == name) else { return Ok(None) };
        if i + 1 >= self.0.len() {
            bail!("{name} needs a value");
        }
        let v = self.0.remove(i + 1);
        self.0.remove(i);
        Ok(Some(v))
    }

    fn values(&mut self, name: &str) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        while let Some(v) = self.value(name)? {
            out.push(v);
        }
        Ok(out)
    }

    fn parsed<T: std::str::FromStr>(&mut self, name: &str, default: T) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.value(name)? {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| anyhow::anyhow!("{name} {v:?}: {e}")),
        }
    }

    fn done(self) -> anyhow::Result<()> {
        if let Some(a) = self.0.first() {
            bail!("unexpected argument {a:?}\n\n{USAGE}");
        }
        Ok(())
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("perf: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let mut args = Args(std::env::args().skip(1).collect());
    if args.0.is_empty() || args.flag("--help") || args.flag("-h") {
        print!("{USAGE}");
        return Ok(());
    }
    let cmd = args.0.remove(0);
    match cmd.as_str() {
        "run" => cmd_run(args),
        "server" => cmd_server(args),
        "inpod" => cmd_inpod(args),
        "client" => cmd_client(args),
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

fn cmd_run(mut args: Args) -> anyhow::Result<()> {
    let quick = args.flag("--quick");
    let policies =
        args.value("--policies")?.map(|v| v.parse::<usize>()).transpose().context("--policies")?.unwrap_or(0);
    let reps = args.value("--reps")?.map(|v| v.parse::<usize>()).transpose().context("--reps")?;
    let proxy = args.value("--proxy")?.map(PathBuf::from);
    let compare = args.value("--compare")?.map(PathBuf::from);
    let out = args.value("--out")?.map(PathBuf::from);
    let list = |v: Option<String>| -> Vec<String> {
        v.map(|v| v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()).unwrap_or_default()
    };
    let tests = list(args.value("--tests")?);
    let paths = list(args.value("--paths")?);
    let profile = args.flag("--profile");
    let node_b = args.value("--node-b")?.map(PathBuf::from);
    if args.0.first().is_some_and(|s| s == "dns") {
        args.0.remove(0);
        return cmd_dns(args, quick, reps, proxy, compare, out);
    }
    if args.0.is_empty() {
        bail!("run needs a scenario: local, netns or dns");
    }
    let scenario = match args.0.remove(0).as_str() {
        "local" => Scenario::Local,
        "netns" => Scenario::Netns,
        other => bail!("unknown scenario {other:?}: use local or netns"),
    };
    args.done()?;
    let proxy = proxy_or_default(proxy)?;
    let out = out.unwrap_or_else(|| results_dir(""));
    let opts = RunOpts {
        scenario,
        quick,
        proxy,
        compare,
        out: out.clone(),
        reps,
        progress: true,
        policies,
        tests,
        paths,
        profile,
        node_b,
    };
    let report = perf::run(&opts)?;
    println!("{}", std::fs::read_to_string(out.join("report.md"))?);
    if profile {
        println!("{}", std::fs::read_to_string(out.join("profile.md"))?);
    }
    println!("wrote {} records to {}", report.records.len(), out.display());
    Ok(())
}

fn cmd_dns(
    mut args: Args,
    quick: bool,
    reps: Option<usize>,
    proxy: Option<PathBuf>,
    compare: Option<PathBuf>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let clients = args.parsed("--clients", 4usize)?;
    let secs = args.parsed("--secs", if quick { 1.0f64 } else { 5.0 })?;
    args.done()?;
    let proxy = proxy_or_default(proxy)?;
    let out = out.unwrap_or_else(|| results_dir("dns-"));
    let reps = reps.unwrap_or(if quick { 1 } else { 3 });
    let opts = perf::dns::DnsOpts { proxy, compare, out: out.clone(), secs, clients, reps };
    perf::dns::run(&opts)?;
    println!("{}", std::fs::read_to_string(out.join("dns.md"))?);
    println!("wrote {}", out.display());
    Ok(())
}

fn cmd_inpod(mut args: Args) -> anyhow::Result<()> {
    if args.flag("--socket-cost") {
        let iters = args.parsed("--iters", 100_000usize)?;
        args.done()?;
        println!("{}", serde_json::to_string_pretty(&perf::inpod::socket_cost(iters)?)?);
        return Ok(());
    }
    let quick = args.flag("--quick");
    let reps = args.parsed("--reps", if quick { 1usize } else { 3 })?;
    let pods = args.parsed("--pods", 100usize)?;
    let proxy = args.value("--proxy")?.map(PathBuf::from);
    let compare = args.value("--compare")?.map(PathBuf::from);
    let out = args.value("--out")?.map(PathBuf::from);
    args.done()?;
    let proxy = proxy_or_default(proxy)?;
    let out = out.unwrap_or_else(|| results_dir("inpod-"));
    let opts = perf::inpod::InpodOpts { proxy, compare, out: out.clone(), pods, quick, reps };
    perf::inpod::run(&opts)?;
    println!("{}", std::fs::read_to_string(out.join("inpod.md"))?);
    println!("wrote {}", out.display());
    Ok(())
}

/// `--proxy`, or this repository's release build (built first).
fn proxy_or_default(proxy: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match proxy {
        Some(p) => Ok(p),
        None => perf::proxy::default_binary(),
    }
}

/// `perf/results/<prefix><timestamp>/`, where a run writes unless told otherwise.
fn results_dir(prefix: &str) -> PathBuf {
    let stamp = perf::scenario::now_rfc3339().replace(':', "-");
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results").join(format!("{prefix}{stamp}"))
}

fn cmd_server(mut args: Args) -> anyhow::Result<()> {
    let ips = args.values("--ip")?;
    let echo = args.parsed("--echo-port", 0u16)?;
    let sink = args.parsed("--sink-port", 0u16)?;
    args.done()?;
    let ips: Vec<IpAddr> = if ips.is_empty() {
        vec!["127.0.0.1".parse()?]
    } else {
        ips.iter().map(|i| i.parse().with_context(|| format!("--ip {i}"))).collect::<anyhow::Result<_>>()?
    };
    let servers = perf::server::start(&ips, None, echo, sink)?;
    for a in &servers.addrs {
        println!("echo {}  sink {}", a.echo, a.sink);
    }
    loop {
        std::thread::park();
    }
}

fn cmd_client(mut args: Args) -> anyhow::Result<()> {
    if args.0.is_empty() {
        bail!("client needs a test: bulk, rr, rr-open, connrate or idle");
    }
    let test = args.0.remove(0);
    let target: SocketAddr = args.value("--target")?.context("--target IP:PORT is required")?.parse()?;
    let via = match args.value("--socks5")? {
        Some(p) => Via::Socks5(p.parse()?),
        None => Via::Direct,
    };
    let secs = Duration::from_secs_f64(args.parsed("--secs", 10.0f64)?);
    let size = args.parsed("--size", 1usize)?;
    let out = match test.as_str() {
        "bulk" => {
            let streams = args.parsed("--streams", 1usize)?;
            args.done()?;
            serde_json::to_value(load::bulk(target, via, streams, secs)?)?
        }
        "rr" => {
            let count = args.parsed("--count", 20_000u64)?;
            args.done()?;
            serde_json::to_value(Percentiles::of(&load::rr_closed(target, via, size, count / 10, count)?))?
        }
        "rr-open" => {
            let rate = args.parsed("--rate", 1000u64)?;
            args.done()?;
            serde_json::to_value(Percentiles::of(&load::rr_open(target, via, size, rate, secs)?))?
        }
        "connrate" => {
            let clients = args.parsed("--clients", 8usize)?;
            args.done()?;
            let (r, h) = load::connrate(target, via, clients, secs)?;
            serde_json::json!({ "result": r, "latency": Percentiles::of(&h) })
        }
        "idle" => {
            let n = args.parsed("--conns", 1000usize)?;
            args.done()?;
            perf::proxy::raise_nofile(1 << 20);
            let conns = load::open_idle(target, via, n)?;
            println!("{} connections open; holding for {secs:?}", conns.len());
            std::thread::sleep(secs);
            serde_json::json!({ "connections": conns.len() })
        }
        other => bail!("unknown client test {other:?}"),
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

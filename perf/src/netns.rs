//! Network namespaces for the `netns` scenario: created with `ip`, joined by a veth pair,
//! capture rules with `iptables`, all removed when the `Topology` is dropped.

use std::process::Command;

use anyhow::{Context, bail};

pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Moves the calling thread (and threads it starts afterwards) into the named namespace.
pub fn enter(ns: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("opening netns {ns}"))?;
    // SAFETY: `f` is an open namespace file for the whole call; setns changes only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({ns}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread inside `ns` (or here, for `None`) and returns its result.
pub fn run_in<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<T> {
                if let Some(ns) = ns {
                    enter(ns)?;
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    })
}

/// Why the netns scenario cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the netns scenario needs root".into());
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is not installed (iproute2 / iptables)"));
        }
    }
    None
}

/// Two "nodes": namespaces `a` (client side) and `b` (server side) joined by a veth pair.
///
/// Addresses are from 198.18.0.0/15, the range set aside for benchmarks (RFC 2544): they exist
/// only inside these namespaces.
pub struct Topology {
    pub a: String,
    pub b: String,
}

pub const NODE_A_IP: &str = "198.18.0.1";
/// Server addresses on node b: a TCP workload, an outside-mesh host, an HBONE workload.
pub const TCP_WORKLOAD_IP: &str = "198.18.0.2";
pub const OUTSIDE_IP: &str = "198.18.0.3";
pub const HBONE_WORKLOAD_IP: &str = "198.18.0.4";

impl Topology {
    pub fn create() -> anyhow::Result<Topology> {
        let pid = std::process::id();
        let t = Topology { a: format!("zt-perf-a-{pid}"), b: format!("zt-perf-b-{pid}") };
        sh("ip", &["netns", "add", &t.a])?;
        sh("ip", &["netns", "add", &t.b])?;
        let (va, vb) = (format!("zpa{pid}"), format!("zpb{pid}"));
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        sh("ip", &["link", "add", va, "netns", &t.a, "type", "veth", "peer", "name", vb, "netns", &t.b])?;
        for (ns, dev, ips) in
            [(&t.a, va, vec![NODE_A_IP]), (&t.b, vb, vec![TCP_WORKLOAD_IP, OUTSIDE_IP, HBONE_WORKLOAD_IP])]
        {
            t.exec(ns, "ip", &["link", "set", "lo", "up"])?;
            for ip in ips {
                t.exec(ns, "ip", &["addr", "add", &format!("{ip}/24"), "dev", dev])?;
            }
            t.exec(ns, "ip", &["link", "set", dev, "up"])?;
        }
        // The connection-rate test leaves many sockets in TIME_WAIT between one pair of
        // addresses on each node (client and proxy on node a; on node b the proxy dialing the
        // HBONE workload, which shares its address): give both nodes the whole port range and
        // TIME_WAIT reuse, keeping ephemeral ports off the proxies' own. Without it node b runs
        // out of ports within seconds and the test measures the kernel's port search.
        for ns in [&t.a, &t.b] {
            t.exec(ns, "sysctl", &["-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"])?;
            t.exec(ns, "sysctl", &["-q", "-w", "net.ipv4.ip_local_reserved_ports=15000-15100"])?;
            t.exec(ns, "sysctl", &["-q", "-w", "net.ipv4.tcp_tw_reuse=1"])?;
        }
        Ok(t)
    }

    pub fn exec(&self, ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["netns", "exec", ns, cmd];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Istio-style outbound capture on node a: everything TCP goes to the proxy's 15001, except
    /// the proxy's own (marked) connections, loopback, and the outside-mesh baseline host.
    pub fn capture_outbound(&self, mark: u32, outbound_port: u16) -> anyhow::Result<()> {
        let mark = mark.to_string();
        let port = outbound_port.to_string();
        let rules: [&[&str]; 4] = [
            &["-m", "mark", "--mark", &mark, "-j", "RETURN"],
            &["-d", "127.0.0.0/8", "-j", "RETURN"],
            &["-d", OUTSIDE_IP, "-j", "RETURN"],
            &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &port],
        ];
        for rule in rules {
            let mut args = vec!["-t", "nat", "-A", "OUTPUT"];
            args.extend_from_slice(rule);
            self.exec(&self.a, "iptables", &args)?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end (and so the pair) and its iptables rules.
        let _ = sh("ip", &["netns", "del", &self.a]);
        let _ = sh("ip", &["netns", "del", &self.b]);
    }
}

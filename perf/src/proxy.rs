//! The proxy under test: a child process started with Istio's standalone environment, waited
//! for on its readiness port, measured from /proc, stopped with SIGTERM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::netns;

pub struct ProxyProc {
    pub label: String,
    child: Child,
    pub ns: Option<String>,
    started: Instant,
}

impl ProxyProc {
    /// Starts `binary` with exactly `env` (plus PATH), in `ns` when given, logging to `log`.
    pub fn start(
        label: &str,
        binary: &Path,
        env: &[(String, String)],
        ns: Option<&str>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let logfile = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        cmd.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(logfile.try_clone()?).stderr(logfile);
        let started = Instant::now();
        let child = cmd.spawn().with_context(|| format!("starting proxy {}", binary.display()))?;
        Ok(ProxyProc { label: label.to_string(), child, ns: ns.map(str::to_string), started })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `GET /healthz/ready` to answer 200 on `addr` (inside the proxy's namespace).
    /// Returns how long after its start the proxy answered so.
    pub fn wait_ready(&mut self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Duration> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("proxy {} exited during start-up ({status}); see its log", self.label);
            }
            let ok = netns::run_in(self.ns.as_deref(), || ready(addr)).unwrap_or(false);
            if ok {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > end {
                bail!("proxy {} not ready on {addr} after {timeout:?}", self.label);
            }
            // Finely at first: the time to readiness is one of the run's figures.
            let pause = if self.started.elapsed() < Duration::from_secs(1) { 2 } else { 50 };
            std::thread::sleep(Duration::from_millis(pause));
        }
    }

    /// User + system CPU seconds so far.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid())
    }

    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid())
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        // SAFETY: kill with a valid pid of our own child and a standard signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("proxy {} did not exit within {grace:?} of SIGTERM", self.label)
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: perf\r\nconnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200")
}

pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at state (field 3).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f[11].parse()?, f[12].parse()?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime + stime) / hz)
}

/// Context switches (voluntary and not) of every live thread of `pid`: how often its threads
/// went to sleep and were woken, or were preempted.
pub fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else { continue };
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(total)
}

pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// A size field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, ...), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status_field_bytes(&status, field).with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn status_field_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let mut words = line.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(n * 1024)
}

/// This repository's release build of the proxy, built first if needed.
pub fn default_binary() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_path_buf();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "ztunnel"])
        .current_dir(&root)
        .status()
        .context("running cargo build for the proxy")?;
    if !status.success() {
        bail!("building the proxy failed");
    }
    Ok(root.join("target/release/ztunnel"))
}

/// Raises this process's open-file limit (children inherit it): as far as root may, else to
/// the hard limit. Returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit with a valid, initialised struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let target = libc::rlimit { rlim_cur: want.max(lim.rlim_cur), rlim_max: want.max(lim.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &target) != 0 {
            let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_sizes() {
        let status = "Name:\tztunnel\nVmRSS:\t    8468 kB\nRssAnon:\t    1072 kB\nThreads:\t5\n";
        assert_eq!(status_field_bytes(status, "VmRSS"), Some(8468 * 1024));
        assert_eq!(status_field_bytes(status, "RssAnon"), Some(1072 * 1024));
        // A field that is not a size, or is missing, or only shares a prefix.
        assert_eq!(status_field_bytes(status, "Threads"), None);
        assert_eq!(status_field_bytes(status, "RssFile"), None);
        assert_eq!(status_field_bytes(status, "Rss"), None);
    }
}

//! `perf run ... --profile`: where each proxy's CPU goes during each test, and how many system
//! calls and context switches it makes, from Linux `perf` attached to the running proxy:
//! `perf record -e cpu-clock` (sampled self time, no call graphs: small files, little overhead)
//! and `perf stat -e raw_syscalls:sys_enter,context-switches` (exact counts).
//!
//! Samples are put in categories by symbol: the kernel, crypto, memory copies, the allocator,
//! TLS framing (rustls), HTTP/2 (h2), the async runtime, the proxy's own code, and the rest. With
//! LTO a library's code inlined into a caller counts as the caller's, so the library categories
//! are lower bounds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// Categories in the order reports print them.
pub const CATEGORIES: [&str; 9] = ["kernel", "crypto", "copies", "alloc", "tls", "h2", "runtime", "proxy", "other"];

/// Why profiling cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("perf").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => None,
        _ => Some("--profile needs Linux `perf` on PATH (Debian: apt-get install linux-perf)".into()),
    }
}

/// What one proxy process did during one test.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub samples: u64,
    /// Share of samples per category, in percent.
    pub categories: BTreeMap<String, f64>,
    pub syscalls: Option<u64>,
    pub context_switches: Option<u64>,
    /// The hottest symbols: (percent, category, symbol).
    pub top: Vec<(f64, String, String)>,
    /// The raw `perf record` file, for `perf report -i`.
    pub data: String,
}

/// `perf record` and `perf stat` attached to one process.
pub struct Session {
    record: Child,
    stat: Child,
    data: PathBuf,
    stat_out: PathBuf,
}

/// Attaches to `pid`, writing `<dir>/<name>.data` and `<dir>/<name>.stat`.
pub fn start(pid: u32, dir: &Path, name: &str) -> anyhow::Result<Session> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join(format!("{name}.data"));
    let stat_out = dir.join(format!("{name}.stat"));
    let pid = pid.to_string();
    let mut record = spawn_perf(&["record", "-q", "-e", "cpu-clock", "-F", "1999", "-p", &pid], &data)?;
    let stat = match spawn_perf(
        &["stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches", "-p", &pid],
        &stat_out,
    ) {
        Ok(stat) => stat,
        Err(e) => {
            let _ = record.kill();
            let _ = record.wait();
            return Err(e);
        }
    };
    // Both attach within milliseconds; the test must not start before they count.
    std::thread::sleep(Duration::from_millis(200));
    Ok(Session { record, stat, data, stat_out })
}

/// `perf <args> -o <out>`, quiet, in the background.
fn spawn_perf(args: &[&str], out: &Path) -> anyhow::Result<Child> {
    Command::new("perf")
        .args(args)
        .arg("-o")
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting perf {}", args[0]))
}

/// Stops a child with SIGINT (perf writes its output on it), killing it after `grace`.
fn interrupt(child: &mut Child, grace: Duration) -> anyhow::Result<()> {
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let end = Instant::now() + grace;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("perf did not stop within {grace:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Session {
    pub fn finish(mut self) -> anyhow::Result<Profile> {
        interrupt(&mut self.stat, Duration::from_secs(10))?;
        interrupt(&mut self.record, Duration::from_secs(60))?;
        let stat = std::fs::read_to_string(&self.stat_out).unwrap_or_default();
        let counts = parse_stat(&stat);
        let out = Command::new("perf")
            .args(["report", "--stdio", "-q", "--no-children", "-n", "--sort", "dso,sym", "-i"])
            .arg(&self.data)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .context("running perf report")?;
        let rows = parse_report(&String::from_utf8_lossy(&out.stdout));
        let mut categories: BTreeMap<String, f64> = CATEGORIES.iter().map(|c| (c.to_string(), 0.0)).collect();
        let mut top = Vec::new();
        let samples = rows.iter().map(|r| r.1).sum();
        for (pct, _, sym, kernel) in &rows {
            let cat = category(sym, *kernel);
            *categories.entry(cat.to_string()).or_default() += pct;
            if top.len() < 25 {
                top.push((*pct, cat.to_string(), sym.clone()));
            }
        }
        Ok(Profile {
            samples,
            categories,
            syscalls: counts.get("raw_syscalls:sys_enter").copied(),
            context_switches: counts.get("context-switches").copied(),
            top,
            data: self.data.display().to_string(),
        })
    }
}

impl Drop for Session {
    /// A session dropped without `finish` (a failed test) leaves no profiler running.
    fn drop(&mut self) {
        for child in [&mut self.record, &mut self.stat] {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `perf stat -x,` lines: `value,unit,event,...`.
fn parse_stat(text: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() >= 3 {
            if let Ok(v) = f[0].trim().parse::<u64>() {
                m.insert(f[2].trim().to_string(), v);
            }
        }
    }
    m
}

/// `perf report -n --sort dso,sym` lines: `  12.34%  567  dso  [k] symbol` ->
/// (percent, samples, symbol, kernel).
fn parse_report(text: &str) -> Vec<(f64, u64, String, bool)> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((pct, rest)) = line.split_once('%') else { continue };
        let Ok(pct) = pct.trim().parse::<f64>() else { continue };
        let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()) else { continue };
        let (kernel, sym) = if let Some(i) = rest.find("[k] ") {
            (true, &rest[i + 4..])
        } else if let Some(i) = rest.find("[.] ") {
            (false, &rest[i + 4..])
        } else {
            continue;
        };
        rows.push((pct, n, sym.trim().to_string(), kernel));
    }
    rows
}

/// Which category a symbol's self time belongs to.
pub fn category(sym: &str, kernel: bool) -> &'static str {
    if kernel {
        return "kernel";
    }
    let s = sym.to_ascii_lowercase();
    const CRYPTO: [&str; 14] = [
        "aes",
        "gcm",
        "ghash",
        "chacha",
        "poly1305",
        "ring_core",
        "aws_lc",
        "sha256",
        "sha512",
        "x25519",
        "p256",
        "p384",
        "ecp_nistz",
        "bn_mul",
    ];
    if CRYPTO.iter().any(|p| s.contains(p)) {
        return "crypto";
    }
    if ["memmove", "memcpy", "memset"].iter().any(|p| s.contains(p)) {
        return "copies";
    }
    const ALLOC: [&str; 12] = [
        "malloc",
        "free",
        "realloc",
        "calloc",
        "_int_",
        "arena_",
        "tcache",
        "je_",
        "jemalloc",
        "sdallocx",
        "mi_",
        "__rust_alloc",
    ];
    // Rust paths such as `<alloc::...>` are not the allocator; C allocator symbols have no `::`.
    if !s.contains("::") && ALLOC.iter().any(|p| s.contains(p)) {
        return "alloc";
    }
    // The crate whose path appears first names the code (`<ours::X as tokio::io::AsyncRead>`
    // is ours).
    const CRATES: [(&str, &str); 9] = [
        ("rustls::", "tls"),
        ("h2::", "h2"),
        ("hpack", "h2"),
        ("monoio::", "runtime"),
        ("tokio::", "runtime"),
        ("io_uring::", "runtime"),
        ("mio::", "runtime"),
        ("ztunnel", "proxy"),
        ("hyper::", "proxy"),
    ];
    CRATES
        .iter()
        .filter_map(|(p, c)| s.find(p).map(|i| (i, *c)))
        .min_by_key(|(i, _)| *i)
        .map(|(_, c)| c)
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_by_symbol() {
        assert_eq!(category("__memmove_avx_unaligned_erms", false), "copies");
        assert_eq!(category("copy_user_enhanced_fast_string", true), "kernel");
        assert_eq!(category("ring_core_0_17_14__aes_gcm_dec_update_vaes_avx2", false), "crypto");
        assert_eq!(category("_int_malloc", false), "alloc");
        assert_eq!(
            category("<ztunnel_tpc::tls::stream::TlsStream as tokio::io::AsyncRead>::poll_read", false),
            "proxy"
        );
        assert_eq!(category("h2::proto::streams::recv::Recv::recv_data", false), "h2");
        assert_eq!(category("rustls::conn::ConnectionCommon<Data>::process_new_packets", false), "tls");
        assert_eq!(category("monoio::driver::uring::IoUringDriver::inner_park", false), "runtime");
        assert_eq!(category("syscall", false), "other");
    }

    #[test]
    fn parses_perf_output() {
        let rep = "    41.20%  412  ztunnel  [.] __memmove_avx_unaligned_erms\n     3.10%  31  [kernel.kallsyms]  [k] tcp_sendmsg\n";
        let rows = parse_report(rep);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], (41.2, 412, "__memmove_avx_unaligned_erms".to_string(), false));
        assert!(rows[1].3);
        let stat = "# started on x\n\n1234,,raw_syscalls:sys_enter,1000,100.00,,\n56,,context-switches,1000,100.00,,\n";
        let m = parse_stat(stat);
        assert_eq!(m["raw_syscalls:sys_enter"], 1234);
        assert_eq!(m["context-switches"], 56);
    }
}

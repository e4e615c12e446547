//! The upstream resolvers: the nameservers and options of the proxy's own `/etc/resolv.conf`
//! (in Kubernetes, the cluster's DNS service), read once at start.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Where forwarded queries go, and how patiently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolvers {
    pub servers: Vec<SocketAddr>,
    /// Per attempt (`options timeout:N`, default 5 s).
    pub timeout: Duration,
    /// Rounds over every server (`options attempts:N`, default 2).
    pub attempts: u32,
    /// The search list (used to strip search domains in dedicated mode; never appended to a
    /// forwarded name).
    pub search: Vec<String>,
}

impl Default for Resolvers {
    fn default() -> Resolvers {
        Resolvers {
            servers: vec![SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 53)],
            timeout: Duration::from_secs(5),
            attempts: 2,
            search: Vec::new(),
        }
    }
}

/// Parses resolv.conf text. Unknown lines are ignored, as the C library does; no nameserver
/// means localhost, as there.
pub fn parse(text: &str) -> Resolvers {
    let mut r = Resolvers { servers: Vec::new(), ..Resolvers::default() };
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                // Scoped IPv6 (`fe80::1%eth0`) cannot be used from a pod's namespace: skipped.
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    if r.servers.len() < 3 {
                        r.servers.push(SocketAddr::new(ip, 53));
                    }
                }
            }
            Some("search") => r.search = words.map(|w| w.trim_end_matches('.').to_ascii_lowercase()).collect(),
            Some("domain") if r.search.is_empty() => {
                r.search = words.next().map(|w| vec![w.trim_end_matches('.').to_ascii_lowercase()]).unwrap_or_default()
            }
            Some("options") => {
                for opt in words {
                    if let Some(v) = opt.strip_prefix("timeout:").and_then(|v| v.parse::<u64>().ok()) {
                        r.timeout = Duration::from_secs(v.clamp(1, 30));
                    } else if let Some(v) = opt.strip_prefix("attempts:").and_then(|v| v.parse::<u32>().ok()) {
                        r.attempts = v.clamp(1, 5);
                    }
                }
            }
            _ => {}
        }
    }
    if r.servers.is_empty() {
        r.servers = Resolvers::default().servers;
    }
    r
}

/// Reads `path`; a missing or unreadable file means the defaults (logged by the caller).
pub fn load(path: &std::path::Path) -> std::io::Result<Resolvers> {
    std::fs::read_to_string(path).map(|t| parse(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_resolv_conf() {
        let r = parse(
            "search istio-system.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\nnameserver fe80::1%eth0\noptions ndots:5 timeout:2 attempts:3 edns0\n# comment\n",
        );
        assert_eq!(r.servers, vec!["10.96.0.10:53".parse().unwrap()]);
        assert_eq!(r.timeout, Duration::from_secs(2));
        assert_eq!(r.attempts, 3);
        assert_eq!(r.search, ["istio-system.svc.cluster.local", "svc.cluster.local", "cluster.local"]);
        assert_eq!(parse("").servers, vec!["127.0.0.1:53".parse().unwrap()]);
        assert_eq!(parse("options timeout:0 attempts:99").attempts, 5);
    }
}

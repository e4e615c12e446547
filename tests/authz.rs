//! L4 authorization end to end (SCENARIOS.md 6 and 7): a policy on the destination decides who
//! gets through over HBONE and on the node-local fast path, and a policy arriving later closes
//! connections it denies. (Plaintext inbound with STRICT is in `netns.rs`: it needs capture.)

mod common;

use std::io::Read;
use std::net::IpAddr;
use std::time::Instant;

use common::*;
use ztunnel::config::Config;

const SLEEP_IP: &str = "127.0.0.1";
const NOTSLEEP_IP: &str = "127.0.0.6";

fn yaml(policies: &str) -> String {
    format!(
        r#"
workloads:
- {{uid: sleep, name: sleep, namespace: demo, serviceAccount: sleep, workloadIps: [{SLEEP_IP}], protocol: HBONE}}
- {{uid: notsleep, name: notsleep, namespace: demo, serviceAccount: notsleep, workloadIps: [{NOTSLEEP_IP}], protocol: HBONE}}
- {{uid: httpbin, name: httpbin, namespace: demo, serviceAccount: httpbin, workloadIps: [127.0.0.3], protocol: HBONE}}
policies:
{policies}
"#
    )
}

const ALLOW_SLEEP: &str = "- {name: allow-sleep, namespace: demo, scope: Namespace, action: Allow, rules: [[[{principals: [!Exact cluster.local/ns/demo/sa/sleep]}]]]}";
const DENY_ALL: &str = "- {name: deny-all, namespace: demo, scope: Namespace, action: Deny, rules: [[]]}";

/// A proxy serving all three workloads; `fast` picks the node-local fast path or HBONE to itself.
fn proxy(dir: &TestDir, policies: &str, fast: bool) -> ztunnel::app::Proxy {
    let mut cfg = Config::for_tests(dir.write_config(&yaml(policies)));
    cfg.node_local_fast_path = fast;
    let proxy = start_own_hbone(cfg);
    wait_for_certificates(&proxy, 3);
    proxy
}

fn from(ip: &str) -> Option<IpAddr> {
    Some(ip.parse().unwrap())
}

#[test]
fn allow_policy_admits_sleep_and_refuses_notsleep_over_hbone_and_fast_path() {
    let httpbin = EchoServer::start("127.0.0.3", "httpbin");
    for fast in [false, true] {
        let dir = TestDir::new(if fast { "authz-fast" } else { "authz-hbone" });
        let proxy = proxy(&dir, ALLOW_SLEEP, fast);
        let s5 = proxy.addrs.socks5.unwrap();
        let mut ok = socks5_from(from(SLEEP_IP), s5, Dest::Addr(httpbin.addr)).expect("sleep is allowed");
        assert_eq!(read_greeting(&mut ok), "httpbin");
        echo_roundtrip(&mut ok, b"allowed");
        // HBONE: the destination answers 401, which SOCKS5 reports as "not allowed" (2); the
        // fast path refuses before dialing, with the same code.
        let refused = socks5_from(from(NOTSLEEP_IP), s5, Dest::Addr(httpbin.addr));
        assert_eq!(refused.err(), Some(2), "notsleep is refused (fast path {fast})");
        stop(proxy);
    }
}

#[test]
fn a_deny_arriving_later_closes_open_connections() {
    let httpbin = EchoServer::start("127.0.0.3", "httpbin");
    for fast in [false, true] {
        let dir = TestDir::new(if fast { "reauthz-fast" } else { "reauthz-hbone" });
        let proxy = proxy(&dir, "  []", fast);
        let s5 = proxy.addrs.socks5.unwrap();
        let mut open = socks5_from(from(NOTSLEEP_IP), s5, Dest::Addr(httpbin.addr)).expect("no policy: allowed");
        assert_eq!(read_greeting(&mut open), "httpbin");
        echo_roundtrip(&mut open, b"before the policy");
        let edited = Instant::now();
        dir.write_config(&yaml(DENY_ALL));
        // The connection is closed by the proxy: EOF or reset, no hang.
        let mut rest = Vec::new();
        let _ = open.read_to_end(&mut rest);
        let took = edited.elapsed();
        assert!(took < PATIENCE, "closed after the DENY arrived (took {took:?})");
        println!("re-authorization closed the connection {took:?} after the edit (fast path {fast})");
        let again = socks5_from(from(NOTSLEEP_IP), s5, Dest::Addr(httpbin.addr));
        assert_eq!(again.err(), Some(2), "new connections are refused too");
        stop(proxy);
    }
}

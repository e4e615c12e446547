//! Silent connections to 15008, measured alone: this binary's only test, so the process's memory
//! is the proxy's and the test's sockets' (cargo runs test binaries one after another).

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use ztunnel::config::Config;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Raises this process's descriptor limit towards `want` (the hard limit too, where permitted);
/// returns the soft limit in force.
fn raise_descriptor_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

#[test]
fn silent_connections_to_15008_cost_little_and_are_closed() {
    let dir = TestDir::new("hostile-idle");
    let yaml = r#"
workloads:
- {uid: pod, name: pod, namespace: ns, serviceAccount: pod, workloadIps: [127.0.0.3], protocol: HBONE}
"#;
    let proxy = start_with(Config::for_tests(dir.write_config(yaml)));
    wait_for_certificates(&proxy, 1);
    let hbone = SocketAddr::new("127.0.0.3".parse().unwrap(), proxy.addrs.inbound.port());
    // Both ends of every connection live in this process: 10k connections need 20k descriptors
    // and some. As root the limit is raised for that; otherwise fewer connections show the same.
    let n: usize = if raise_descriptor_limit(24_000) >= 22_000 { 10_000 } else { 5_000 };
    // Warm up whatever a first connection allocates once.
    drop(TcpStream::connect(hbone).unwrap());
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_bytes();
    let mut silent: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(hbone).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let per_conn = rss_bytes().saturating_sub(before) / n as u64;
    println!("RSS per silent connection to 15008: {per_conn} bytes");
    assert!(per_conn < 4096, "a silent connection holds {per_conn} bytes: nothing is allocated before its first byte");
    // All are closed at the handshake timeout (10 s).
    let start = Instant::now();
    for s in silent.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            other => panic!("a silent peer is closed by the proxy, got {other:?}"),
        }
    }
    let took = start.elapsed();
    println!("{n} silent peers closed within {took:?}");
    assert!(took < Duration::from_secs(15), "closed at the handshake timeout, took {took:?}");
    // Their memory is given back (to within a page per connection).
    drop(silent);
    std::thread::sleep(Duration::from_millis(300));
    stop(proxy);
}

//! The `ztunnel` binary itself: its logging goes through the background writer (access lines
//! included), the admin port changes log levels at run time, SIGTERM drains and flushes.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn log_levels_change_at_run_time_and_lines_are_flushed_on_exit() {
    let server = EchoServer::start("127.0.0.2", "server");
    let dir = TestDir::new("binary");
    let config = client_server_config(&dir, &server);
    let (mut child, lines) = spawn_proxy(Command::new(env!("CARGO_BIN_EXE_ztunnel")), &config, &dir);
    let pid = child.0.id();
    let mut seen = Vec::new();
    let mut wait_for = |what: &str| -> String {
        let deadline = Instant::now() + PATIENCE;
        while let Ok(l) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            seen.push(l.clone());
            if l.contains(what) {
                return l;
            }
        }
        panic!("no line with {what:?} in:\n{}", seen.join("\n"));
    };
    let addr_after = |line: &str, key: &str| -> SocketAddr {
        let at = line.find(&format!("{key}=")).unwrap() + key.len() + 1;
        line[at..].split_whitespace().next().unwrap().trim_end_matches(',').parse().unwrap()
    };
    // Workers report before the control thread does.
    let workers = wait_for("worker listening");
    let listening = wait_for("control plane listening");
    let admin = addr_after(&listening, "admin");
    let socks: SocketAddr = {
        let at = workers.find("socks5=Some(").unwrap() + "socks5=Some(".len();
        workers[at..].split(')').next().unwrap().parse().unwrap()
    };

    assert_eq!(http(admin, "GET", "/logging").unwrap(), (200, "current log level is info\n".into()));
    let (status, body) = http(admin, "POST", "/logging?level=debug").unwrap();
    assert_eq!((status, body.as_str()), (200, "current log level is debug\n"));
    assert_eq!(http(admin, "POST", "/logging?level=no%3D%3Dsuch").unwrap().0, 400, "a bad directive is refused");
    assert_eq!(http(admin, "POST", "/logging").unwrap().0, 400);
    // At debug, the outbound path logs what it decides; the access line follows at close.
    let mut c = socks5(socks, Dest::Addr(server.addr)).unwrap();
    assert_eq!(read_greeting(&mut c), "server");
    drop(c);
    wait_for("proxying outbound");
    wait_for("connection complete");
    assert_eq!(http(admin, "POST", "/logging?level=info,access=warn").unwrap().0, 200);
    // SIGTERM: drain, exit 0, and the last line is written before the process ends.
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(l) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push(l);
    }
    assert!(
        seen.iter().any(|l| l.contains("all workers drained; exiting")),
        "the last line was flushed:\n{}",
        seen.join("\n")
    );
}

/// A proxy that runs out of descriptors keeps running, warns a bounded number of times, does
/// not spin, and serves again once descriptors are free.
#[test]
fn out_of_descriptors_the_proxy_waits_warns_little_and_recovers() {
    let server = EchoServer::start("127.0.0.2", "server");
    let dir = TestDir::new("binary-fds");
    let config = client_server_config(&dir, &server);
    // A hard limit of 256 descriptors: the proxy cannot raise it.
    let mut limited = Command::new("sh");
    limited.args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_ztunnel")]);
    limited.env("ZTUNNEL_CONNECT_TIMEOUT", "1s");
    let (mut child, lines) = spawn_proxy(limited, &config, &dir);
    let mut seen = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    let workers = loop {
        let l = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("worker listening");
        seen.push(l.clone());
        if l.contains("worker listening") {
            break l;
        }
    };
    // Start-up done (the control thread opens descriptors of its own after the workers listen):
    // only then are the descriptors used up.
    loop {
        let l = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("control plane up");
        seen.push(l.clone());
        if l.contains("control plane listening") {
            break;
        }
    }
    let socks: SocketAddr = {
        let at = workers.find("socks5=Some(").unwrap() + "socks5=Some(".len();
        workers[at..].split(')').next().unwrap().parse().unwrap()
    };
    // 1000 connections that never speak: the proxy accepts what its descriptors allow, the
    // rest wait in the backlog while accept fails with EMFILE.
    let silent: Vec<std::net::TcpStream> = (0..1000).filter_map(|_| std::net::TcpStream::connect(socks).ok()).collect();
    let pid = child.0.id();
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let f: Vec<u64> =
            stat.rsplit(')').next().unwrap_or("").split_whitespace().filter_map(|v| v.parse().ok()).collect();
        // utime and stime, in clock ticks (fields 14 and 15; 12 and 13 after the command).
        f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
    };
    std::thread::sleep(Duration::from_millis(500));
    let (cpu_before, start) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu() - cpu_before;
    println!("out of descriptors: {ticks} CPU ticks in {:?}", start.elapsed());
    assert!(ticks < 100, "the proxy does not spin while out of descriptors ({ticks} ticks in 3 s)");
    while let Ok(l) = lines.try_recv() {
        seen.push(l);
    }
    let warnings = seen.iter().filter(|l| l.contains("out of resources")).count();
    println!("{warnings} out-of-resources warnings");
    assert!((1..=2).contains(&warnings), "a bounded number of warnings, got {warnings}:\n{}", seen.join("\n"));
    // Descriptors come back when the silent clients go: the proxy serves again.
    drop(silent);
    let recovered =
        eventually(|| socks5(socks, Dest::Addr(server.addr)).is_ok_and(|mut c| read_greeting(&mut c) == "server"));
    while let Ok(l) = lines.try_recv() {
        seen.push(l);
    }
    assert!(recovered, "the proxy recovered:\n{}", seen.join("\n"));
    assert!(child.0.try_wait().unwrap().is_none(), "still running");
}

/// A config with a `client` workload on 127.0.0.1 and `server`'s.
fn client_server_config(dir: &TestDir, server: &EchoServer) -> std::path::PathBuf {
    dir.write_config(&format!(
        "workloads:\n- {{uid: client, name: client, namespace: ns, workloadIps: [127.0.0.1]}}\n\
         - {{uid: server, name: server, namespace: ns, workloadIps: [{}]}}\n",
        server.addr.ip()
    ))
}

/// The child proxy; whatever happens, it does not outlive the test (killed only while it runs).
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `cmd` (the binary, or a wrapper that execs it) on `config` with one worker, SOCKS5 and
/// every port on 127.0.0.1:0; returns it and its stdout lines as they come.
fn spawn_proxy(mut cmd: Command, config: &std::path::Path, dir: &TestDir) -> (Reap, mpsc::Receiver<String>) {
    let child = cmd
        .args(["--config", config.to_str().unwrap(), "--socks5", "--workers", "1"])
        .args([
            "--outbound-addr",
            "127.0.0.1:0",
            "--inbound-plain-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--socks5-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0", "--packet-mark", "0"])
        .env("ZTUNNEL_LOCAL_CA_DIR", dir.0.join("ca"))
        .env("ENABLE_ORIG_SRC", "false")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut child = Reap(child);
    let out = child.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, lines)
}

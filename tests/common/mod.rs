//! Helpers for in-process tests: temp dirs, echo servers, a SOCKS5 client, a tiny HTTP client.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use ztunnel::app::{Proxy, RunOptions};
use ztunnel::config::Config;
use ztunnel::model::Identity;
use ztunnel::tls::stream::TlsStream;

/// True (after printing why) when this machine cannot run the root-only tests: network
/// namespaces, iptables. The caller returns early.
pub fn skip_without_netns(what: &str) -> bool {
    match perf::netns::unavailable() {
        Some(why) => {
            println!("SKIPPED {what}: {why}");
            true
        }
        None => false,
    }
}

/// Generous bound for anything asynchronous: tests must pass on a slow, busy machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A directory removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ztunnel-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }

    /// Writes `config.yaml` atomically (write + rename), as an operator's tooling would.
    pub fn write_config(&self, yaml: &str) -> PathBuf {
        let path = self.0.join("config.yaml");
        let tmp = self.0.join(".config.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Logs go through the test harness's capture, shown only for failing tests.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

pub fn start(path: &Path) -> Proxy {
    start_with(Config::for_tests(path.to_path_buf()))
}

pub fn start_with(cfg: Config) -> Proxy {
    init_logs();
    ztunnel::app::start(cfg, RunOptions { handle_signals: false }).expect("proxy starts")
}

/// Drains the proxy and waits for it to exit cleanly.
pub fn stop(proxy: Proxy) {
    proxy.shutdown();
    proxy.wait().expect("clean shutdown");
}

/// A TCP server on `ip`: sends `name\n` first (so a client sees which endpoint it reached), then
/// echoes everything until the client half-closes, then half-closes itself.
pub struct EchoServer {
    pub addr: SocketAddr,
}

impl EchoServer {
    pub fn start(ip: &str, name: &str) -> EchoServer {
        EchoServer::start_on(ip, 0, name)
    }

    /// On a given port (0: any).
    pub fn start_on(ip: &str, port: u16, name: &str) -> EchoServer {
        let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), port)).unwrap();
        let addr = listener.local_addr().unwrap();
        let name = name.to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let name = name.clone();
                std::thread::spawn(move || {
                    let _ = conn.write_all(format!("{name}\n").as_bytes());
                    let mut buf = [0u8; 16384];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = conn.shutdown(Shutdown::Write);
                });
            }
        });
        EchoServer { addr }
    }
}

/// Reads the `name\n` greeting of an [`EchoServer`].
pub fn read_greeting(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

pub enum Dest<'a> {
    Addr(SocketAddr),
    Name(&'a str, u16),
}

/// SOCKS5 CONNECT through `proxy`. `Err` carries the reply code (or 0xFF for I/O failures).
pub fn socks5(proxy: SocketAddr, dest: Dest) -> Result<TcpStream, u8> {
    socks5_from(None, proxy, dest)
}

/// [`socks5`] from a chosen source address (the proxy tells workloads apart by client IP).
pub fn socks5_from(src: Option<IpAddr>, proxy: SocketAddr, dest: Dest) -> Result<TcpStream, u8> {
    let mut s = match src {
        None => TcpStream::connect(proxy).map_err(|_| 0xFF)?,
        Some(ip) => {
            let sock = socket2::Socket::new(socket2::Domain::for_address(proxy), socket2::Type::STREAM, None)
                .map_err(|_| 0xFF)?;
            sock.bind(&SocketAddr::new(ip, 0).into()).map_err(|_| 0xFF)?;
            sock.connect(&proxy.into()).map_err(|_| 0xFF)?;
            sock.into()
        }
    };
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut req = vec![5, 1, 0, 5, 1, 0];
    match dest {
        Dest::Addr(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Dest::Addr(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Dest::Name(n, port) => {
            req.push(3);
            req.push(n.len() as u8);
            req.extend_from_slice(n.as_bytes());
            req.extend_from_slice(&port.to_be_bytes());
        }
    }
    // Greeting and request in one write: the proxy must cope with pipelined bytes.
    s.write_all(&req).map_err(|_| 0xFF)?;
    let mut method = [0u8; 2];
    s.read_exact(&mut method).map_err(|_| 0xFF)?;
    assert_eq!(method, [5, 0], "no-auth method selected");
    let mut head = [0u8; 4];
    s.read_exact(&mut head).map_err(|_| 0xFF)?;
    let rest = if head[3] == 4 { 18 } else { 6 };
    let mut tail = vec![0u8; rest];
    s.read_exact(&mut tail).map_err(|_| 0xFF)?;
    if head[1] != 0 {
        return Err(head[1]);
    }
    Ok(s)
}

/// Connects to `addr` and reads until the other side closes: true when it sent nothing (a
/// refusal by closing). The connect itself must succeed.
pub fn closed_without_data(addr: SocketAddr) -> bool {
    let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    buf.is_empty()
}

/// Sends `msg`, reads the echo back.
pub fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// A one-shot HTTP/1.1 request; returns status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(PATIENCE))?;
    write!(s, "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code = status.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut rest = String::new();
    r.read_to_string(&mut rest)?;
    let body = rest.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

pub fn config_dump(proxy: &Proxy) -> serde_json::Value {
    let (code, body) = http(proxy.addrs.admin, "GET", "/config_dump").unwrap();
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

/// Polls `f` until it returns true or `PATIENCE` runs out.
pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + PATIENCE;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text exposition format strictly: comments must be `# HELP`/`# TYPE`,
/// every sample `name{label="value",...} number`, label values with `\\`, `\"`, `\n` escapes.
/// Any malformed line is an error naming it.
pub fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            if !(c.starts_with(" HELP ") || c.starts_with(" TYPE ") || c == " EOF") {
                return Err(bad("unknown comment"));
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| bad("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            return Err(bad("bad metric name"));
        }
        let mut labels = std::collections::BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end = loop {
                // label name
                let start = match chars.peek() {
                    Some((_, '}')) => break chars.next().map(|(i, _)| i),
                    Some((i, _)) => *i,
                    None => return Err(bad("unterminated labels")),
                };
                let eq = body[start..].find('=').ok_or_else(|| bad("label without ="))? + start;
                let key = &body[start..eq];
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(bad("bad label name"));
                }
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(bad("label value not quoted"));
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => return Err(bad("bad escape")),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => return Err(bad("unterminated label value")),
                    }
                }
                if labels.insert(key.to_string(), value).is_some() {
                    return Err(bad("repeated label"));
                }
                match chars.peek() {
                    Some((_, ',')) => {
                        chars.next();
                    }
                    Some((_, '}')) => {}
                    _ => return Err(bad("expected , or }")),
                }
            };
            rest = &body[end.ok_or_else(|| bad("unterminated labels"))? + 1..];
        }
        let value = rest.strip_prefix(' ').ok_or_else(|| bad("no space before value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad("value is not a number"))?,
        };
        out.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(out)
}

/// Scrapes the proxy's metrics port and parses the answer.
pub fn scrape(proxy: &Proxy) -> Vec<Sample> {
    let (status, body) = http(proxy.addrs.metrics, "GET", "/metrics").expect("metrics port answers");
    assert_eq!(status, 200);
    parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

/// The value of the one sample named `name` whose labels include all of `want`.
pub fn sample(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert!(hits.len() <= 1, "{name} {want:?} matches {} series", hits.len());
    hits.first().map(|s| s.value)
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap().block_on(f)
}

/// A mutual TLS connection to `hbone` presenting `client` (no HTTP/2 yet).
pub async fn tls_to(hbone: SocketAddr, client: &ztunnel::tls::WorkloadCert) -> TlsStream {
    let tcp = monoio::net::TcpStream::connect_addr(hbone).await.unwrap();
    let conn =
        UnbufferedClientConnection::new(client.client_config(), ServerName::IpAddress(hbone.ip().into())).unwrap();
    TlsStream::handshake(tcp, conn).await.unwrap()
}

/// Opens an HBONE connection to `hbone` as `client`, expecting the server to be `server_id`.
pub async fn hbone_client(
    hbone: SocketAddr,
    client: &ztunnel::tls::WorkloadCert,
    server_id: &Identity,
) -> h2::client::SendRequest<Bytes> {
    hbone_connect(hbone, client, server_id).await.0
}

/// [`hbone_client`], with the connection's driver: it ends once the connection is closed (all
/// request handles and streams dropped, or the peer gone), so a client can await its own exit.
pub async fn hbone_connect(
    hbone: SocketAddr,
    client: &ztunnel::tls::WorkloadCert,
    server_id: &Identity,
) -> (h2::client::SendRequest<Bytes>, monoio::task::JoinHandle<Result<(), h2::Error>>) {
    let tls = tls_to(hbone, client).await;
    ztunnel::tls::check_server_identity(tls.peer_certificates(), std::slice::from_ref(server_id))
        .expect("the proxy presents the destination workload's identity");
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    (send, monoio::spawn(connection))
}

pub async fn request(
    send: &mut h2::client::SendRequest<Bytes>,
    method: Method,
    uri: &str,
) -> (StatusCode, h2::SendStream<Bytes>, h2::RecvStream) {
    request_with_headers(send, method, uri, &[]).await
}

pub async fn request_with_headers(
    send: &mut h2::client::SendRequest<Bytes>,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, h2::SendStream<Bytes>, h2::RecvStream) {
    let mut req = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(()).unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, stream) = ready.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    (resp.status(), stream, resp.into_body())
}

/// Starts a proxy that is both ends of its HBONE connections: it dials its own inbound port
/// (two logical nodes in one process, so the node-local fast path is off).
pub fn start_both_ends(mut cfg: Config) -> ztunnel::app::Proxy {
    cfg.node_local_fast_path = false;
    start_own_hbone(cfg)
}

/// Starts a proxy whose HBONE port is its own inbound listener (so it can reach the workloads
/// it serves over HBONE); the fast path stays as configured.
pub fn start_own_hbone(mut cfg: Config) -> ztunnel::app::Proxy {
    cfg.listeners.inbound = SocketAddr::new("0.0.0.0".parse().unwrap(), 0);
    cfg.hbone_port = 0; // the proxy's own inbound port, whichever it gets
    start_with(cfg)
}

/// Waits until `n` certificates are available (the local HBONE workloads').
pub fn wait_for_certificates(proxy: &ztunnel::app::Proxy, n: usize) {
    assert!(
        eventually(|| config_dump(proxy)["certificates"].as_array().is_some_and(|c| c
            .iter()
            .filter(|c| c["state"] == "Available")
            .count()
            == n)),
        "{n} certificates issued"
    );
}

/// Established TCP sockets whose local port is `port` (the server side of HBONE connections),
/// in the calling thread's network namespace.
pub fn established_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
        })
        .count()
}

/// DNS over UDP to `server`: the answer, or the error (within `PATIENCE`).
pub fn dns_udp(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let s = std::net::UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(PATIENCE))?;
    s.connect(server)?;
    s.send(query)?;
    let mut buf = vec![0u8; 65_535];
    let n = s.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// DNS over UDP as a resolver does it: up to `tries` sends, a second apart (UDP may drop).
pub fn dns_udp_retry(server: SocketAddr, query: &[u8], tries: usize) -> io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let s = std::net::UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.connect(server)?;
    let mut buf = vec![0u8; 65_535];
    let mut last = io::Error::other("no try");
    for _ in 0..tries {
        s.send(query)?;
        match s.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// DNS over TCP to `server` (length-prefixed), one request.
pub fn dns_tcp(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server)?;
    s.set_read_timeout(Some(PATIENCE))?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    s.write_all(&framed)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// A query for `name` of type `t`, with EDNS (payload) when given.
pub fn dns_query(name: &str, t: hickory_proto::rr::RecordType, edns: Option<u16>) -> Vec<u8> {
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    let mut m = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(hickory_proto::rr::Name::from_ascii(name).unwrap(), t));
    if let Some(p) = edns {
        let mut e = Edns::new();
        e.set_max_payload(p);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// A stand-in upstream resolver on `addr` (UDP and TCP): `outside.example.` has one A record,
/// `big.example.` has 256 (over UDP: truncated with TC), anything else is NXDOMAIN. It counts
/// the queries it got. Runs until the process ends.
pub struct UpstreamDns {
    pub addr: SocketAddr,
    pub queries: std::sync::Arc<AtomicUsize>,
}

impl UpstreamDns {
    pub fn start(addr: SocketAddr) -> UpstreamDns {
        let udp = std::net::UdpSocket::bind(addr).unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).unwrap();
        let queries = std::sync::Arc::new(AtomicUsize::new(0));
        let q = queries.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                q.fetch_add(1, Ordering::Relaxed);
                if let Some(answer) = upstream_answer(&buf[..n], true) {
                    let _ = udp.send_to(&answer, from);
                }
            }
        });
        let q = queries.clone();
        std::thread::spawn(move || {
            for c in tcp.incoming() {
                let Ok(mut c) = c else { continue };
                q.fetch_add(1, Ordering::Relaxed);
                std::thread::spawn(move || {
                    let mut len = [0u8; 2];
                    if c.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
                    if c.read_exact(&mut body).is_err() {
                        return;
                    }
                    if let Some(answer) = upstream_answer(&body, false) {
                        let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&answer);
                        let _ = c.write_all(&framed);
                    }
                });
            }
        });
        UpstreamDns { addr, queries }
    }
}

fn upstream_answer(query: &[u8], udp: bool) -> Option<Vec<u8>> {
    use hickory_proto::op::{Message, OpCode, ResponseCode};
    use hickory_proto::rr::{RData, Record, rdata::A};
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.authoritative = true;
    r.metadata.recursion_available = true;
    r.add_query(question.clone());
    let name = question.name().to_ascii().to_ascii_lowercase();
    let a = |ip: [u8; 4]| Record::from_rdata(question.name().clone(), 60, RData::A(A(ip.into())));
    match name.as_str() {
        "outside.example." => {
            r.add_answer(a([203, 0, 113, 7]));
        }
        "big.example." => {
            let n = if udp { 10 } else { 256 };
            for i in 0..n {
                r.add_answer(a([198, 51, (i / 250) as u8, (i % 250) as u8 + 1]));
            }
            r.metadata.truncation = udp;
        }
        _ => r.metadata.response_code = ResponseCode::NXDomain,
    }
    r.to_vec().ok()
}

//! A stand-in for istio-cni's node agent in ambient in-pod mode: it listens on the ZDS socket
//! (`SOCK_SEQPACKET`), takes the proxy's hello, hands over pod network namespaces (`Add` with one
//! `SCM_RIGHTS` descriptor), and sends `Keep`, `Del` and `SnapshotSent`, one request then one ack
//! at a time, as COMPAT.md describes. It also installs, inside a pod's namespace, the redirection
//! rules istio-cni installs there. Independent of any proxy implementation (the messages are
//! encoded here by hand), so the perf harness can drive Istio's ztunnel the same way.
//!
//! Everything blocks with a deadline; nothing here waits forever.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long the agent waits for the proxy's hello and for each ack (istio-cni: 5 s).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The protobuf messages of `istio.workload.zds`, encoded by hand (field numbers as istio-cni).
pub mod msg {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
        varint(out, u64::from(number << 3 | 2));
        varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    fn request(number: u32, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        field(&mut out, number, inner);
        out
    }

    /// `WorkloadRequest{add: AddWorkload{uid, workload_info}}`; `None` leaves the info out.
    pub fn add(uid: &str, info: Option<(&str, &str, &str)>) -> Vec<u8> {
        let mut add = Vec::new();
        field(&mut add, 1, uid.as_bytes());
        if let Some((name, namespace, sa)) = info {
            let mut wi = Vec::new();
            field(&mut wi, 1, name.as_bytes());
            field(&mut wi, 2, namespace.as_bytes());
            field(&mut wi, 3, sa.as_bytes());
            field(&mut add, 2, &wi);
        }
        request(1, &add)
    }

    /// `WorkloadRequest{del: DelWorkload{uid (field 2)}}`.
    pub fn del(uid: &str) -> Vec<u8> {
        let mut d = Vec::new();
        field(&mut d, 2, uid.as_bytes());
        request(2, &d)
    }

    /// `WorkloadRequest{keep: KeepWorkload{uid}}`.
    pub fn keep(uid: &str) -> Vec<u8> {
        let mut k = Vec::new();
        field(&mut k, 1, uid.as_bytes());
        request(5, &k)
    }

    /// `WorkloadRequest{snapshot_sent: SnapshotSent{}}`.
    pub fn snapshot_sent() -> Vec<u8> {
        request(3, &[])
    }

    fn read_varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }

    /// The length-delimited fields of a message, as (number, bytes); varints as their value.
    fn fields(b: &[u8]) -> Option<Vec<(u64, Vec<u8>)>> {
        let mut i = 0;
        let mut out = Vec::new();
        while i < b.len() {
            let tag = read_varint(b, &mut i)?;
            match tag & 7 {
                0 => out.push((tag >> 3, read_varint(b, &mut i)?.to_le_bytes().to_vec())),
                2 => {
                    let len = read_varint(b, &mut i)? as usize;
                    out.push((tag >> 3, b.get(i..i.checked_add(len)?)?.to_vec()));
                    i += len;
                }
                _ => return None,
            }
        }
        Some(out)
    }

    /// `WorkloadResponse{ack: Ack{error}}` -> `Ok(())` or `Err(error)`; `None` if it is not one.
    pub fn parse_ack(b: &[u8]) -> Option<Result<(), String>> {
        let ack = fields(b)?.into_iter().find(|(n, _)| *n == 1)?.1;
        let error = fields(&ack)?.into_iter().find(|(n, _)| *n == 1).map(|(_, e)| e).unwrap_or_default();
        Some(if error.is_empty() { Ok(()) } else { Err(String::from_utf8_lossy(&error).into_owned()) })
    }

    /// `ZdsHello{version}` -> the version.
    pub fn parse_hello(b: &[u8]) -> Option<u64> {
        let (_, v) = fields(b)?.into_iter().find(|(n, _)| *n == 1)?;
        Some(u64::from_le_bytes(v.try_into().ok()?))
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Waits until `fd` is readable, at most `timeout`: false on timeout.
fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one live pollfd, count 1.
    let n = cvt(unsafe { libc::poll(&mut p, 1, ms) })?;
    Ok(n > 0)
}

/// The agent's listening socket.
pub struct Agent {
    fd: OwnedFd,
    pub path: PathBuf,
}

impl Agent {
    /// Listens at `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> anyhow::Result<Agent> {
        let _ = std::fs::remove_file(path);
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0))?)
        };
        // SAFETY: all-zero is a valid sockaddr_un (filled below).
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_encoded_bytes();
        anyhow::ensure!(bytes.len() < addr.sun_path.len(), "socket path too long: {}", path.display());
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: `addr` is a filled sockaddr_un of `len` bytes; `fd` is ours.
        cvt(unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) })
            .with_context(|| format!("binding {}", path.display()))?;
        // SAFETY: listen on our socket.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
        Ok(Agent { fd, path: path.to_path_buf() })
    }

    /// The next proxy connection, after its `ZdsHello` (version 1): at most `timeout` for both.
    pub fn accept(&self, timeout: Duration) -> anyhow::Result<AgentConn> {
        anyhow::ensure!(wait_readable(self.fd.as_raw_fd(), timeout)?, "no proxy connected within {timeout:?}");
        // SAFETY: accept4 on our listener; the new descriptor is owned right away.
        let fd = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            ))?)
        };
        let conn = AgentConn { fd };
        let hello = conn.recv(ACK_TIMEOUT)?.context("the proxy closed before its hello")?;
        anyhow::ensure!(msg::parse_hello(&hello) == Some(1), "expected ZdsHello{{V1}}, got {hello:?}");
        Ok(conn)
    }

    /// True when a proxy connection is waiting to be accepted.
    pub fn pending(&self, timeout: Duration) -> bool {
        wait_readable(self.fd.as_raw_fd(), timeout).unwrap_or(false)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One proxy's connection.
pub struct AgentConn {
    fd: OwnedFd,
}

impl AgentConn {
    /// Sends one message with `fds` attached.
    pub fn send(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
        let mut control = [0u64; 16];
        // SAFETY: zeroed msghdr, filled below with live buffers.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        if !fds.is_empty() {
            let n = std::mem::size_of_val(fds);
            assert!(n <= 64, "at most 16 descriptors");
            // SAFETY: the control buffer (128 bytes) holds CMSG_SPACE(n) for n <= 64.
            unsafe {
                m.msg_control = control.as_mut_ptr().cast();
                m.msg_controllen = libc::CMSG_SPACE(n as u32) as _;
                let c = libc::CMSG_FIRSTHDR(&m);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(n as u32) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, fds.len());
            }
        }
        // SAFETY: `m` points at live buffers, read by the kernel only.
        let sent = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &m, libc::MSG_NOSIGNAL) };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// The next message, within `timeout`; `None` when the proxy closed the connection.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        if !wait_readable(self.fd.as_raw_fd(), timeout)? {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("nothing from the proxy within {timeout:?}")));
        }
        let mut buf = vec![0u8; 2048];
        // SAFETY: recv into our buffer of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ECONNRESET) { Ok(None) } else { Err(e) };
        }
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }

    /// Sends a request and waits for its ack: `Ok(Ok(()))` acked, `Ok(Err(reason))` NACKed.
    pub fn request(&self, bytes: &[u8], fds: &[RawFd]) -> anyhow::Result<Result<(), String>> {
        self.send(bytes, fds).context("sending to the proxy")?;
        let answer = self.recv(ACK_TIMEOUT)?.context("the proxy closed the connection instead of answering")?;
        msg::parse_ack(&answer).with_context(|| format!("not an ack: {answer:?}"))
    }

    /// `Add` of pod `uid` with its namespace (the file of a named netns, `/var/run/netns/NAME`).
    pub fn add(&self, uid: &str, info: (&str, &str, &str), netns: &Path) -> anyhow::Result<Result<(), String>> {
        let f = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        self.request(&msg::add(uid, Some(info)), &[f.as_raw_fd()])
    }

    pub fn del(&self, uid: &str) -> anyhow::Result<Result<(), String>> {
        self.request(&msg::del(uid), &[])
    }

    pub fn keep(&self, uid: &str) -> anyhow::Result<Result<(), String>> {
        self.request(&msg::keep(uid), &[])
    }

    pub fn snapshot_sent(&self) -> anyhow::Result<Result<(), String>> {
        self.request(&msg::snapshot_sent(), &[])
    }

    /// True when the proxy closes the connection within `timeout` (what the agent's keepalive
    /// read would see), reading and dropping anything it sends meanwhile.
    pub fn closed_within(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// True when the proxy sent nothing unsolicited for `window` (the agent's keepalive check).
    pub fn silent_for(&self, window: Duration) -> bool {
        !wait_readable(self.fd.as_raw_fd(), window).unwrap_or(true)
    }
}

/// The rules istio-cni installs in an ambient pod's network namespace (COMPAT.md, iptables
/// flavour, IPv4), as one `iptables-restore` input per table, plus its policy routing.
pub const INPOD_RULES: &str = "\
*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -j ACCEPT
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
*raw
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1
-A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1
COMMIT
";

/// Installs istio-cni's in-pod redirection in namespace `ns` (named, as `ip netns` knows it).
pub fn install_inpod_rules(ns: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "iptables-restore", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    child.stdin.take().context("stdin")?.write_all(INPOD_RULES.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "iptables-restore in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    for args in [
        &["route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "100"][..],
        &["rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"][..],
    ] {
        let mut full = vec!["netns", "exec", ns, "ip"];
        full.extend_from_slice(args);
        crate::netns::sh("ip", &full)?;
    }
    Ok(())
}

/// The file of a named network namespace, to hand over in an `Add`.
pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{ns}"))
}

//! System calls the libraries do not cover, and the only module with `unsafe` code: socket
//! options (original destination, transparent, freebind, pending error), file limits, pipes and
//! `splice`, handing freed heap back to the kernel, and readiness on monoio's split halves.
//!
//! Every call here works on a file descriptor the caller owns for the duration of the call.
//! Each `unsafe` block says why it is sound.

use std::io;
use std::mem::{MaybeUninit, size_of, size_of_val};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST` share the number 80.
const SO_ORIGINAL_DST: libc::c_int = 80;

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and the length passed is its size; the kernel only reads
    // it. A bad fd or option is reported through the return value, not memory unsafety.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `IP_TRANSPARENT` / `IPV6_TRANSPARENT`: accept TPROXY'd connections, or bind a foreign source.
pub fn set_ip_transparent(sock: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(sock.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)
    } else {
        setsockopt_int(sock.as_raw_fd(), libc::SOL_IP, libc::IP_TRANSPARENT, 1)
    }
}

/// `SO_INCOMING_CPU` on a listener: in a `SO_REUSEPORT` group the kernel (6.1 and later)
/// prefers the listener marked with the CPU a new connection's packets are processed on.
pub fn set_incoming_cpu(sock: &impl AsRawFd, cpu: usize) -> io::Result<()> {
    let cpu = libc::c_int::try_from(cpu).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_INCOMING_CPU, cpu)
}

/// `IP_FREEBIND` / `IPV6_FREEBIND`: bind an address that is not (yet) local.
pub fn set_freebind(sock: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(sock.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_FREEBIND, 1)
    } else {
        setsockopt_int(sock.as_raw_fd(), libc::SOL_IP, libc::IP_FREEBIND, 1)
    }
}

/// `SO_ERROR`: the pending error of a socket, used after a non-blocking connect.
pub fn take_error(sock: &impl AsRawFd) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are live and sized as the kernel expects for SO_ERROR.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

/// The destination a connection had before netfilter REDIRECTed it to us (`SO_ORIGINAL_DST`).
///
/// `Ok(None)` when the connection was not redirected (no conntrack entry): the caller then
/// falls back to the socket's local address, which is the original destination under TPROXY.
pub fn original_dst(sock: &impl AsRawFd, peer_is_v4: bool) -> io::Result<Option<SocketAddr>> {
    let fd = sock.as_raw_fd();
    // An IPv4 connection accepted on a dual-stack socket is still tracked by the IPv4 table.
    let res = if peer_is_v4 { original_dst_v4(fd) } else { original_dst_v6(fd) };
    match res {
        Ok(addr) => Ok(Some(addr)),
        // ENOENT: no conntrack entry; ENOPROTOOPT/EOPNOTSUPP: netfilter not loaded.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT | libc::EOPNOTSUPP)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn original_dst_v4(fd: RawFd) -> io::Result<SocketAddr> {
    let mut addr = MaybeUninit::<libc::sockaddr_in>::zeroed();
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the buffer is a zeroed sockaddr_in and `len` its size; the kernel writes at most
    // `len` bytes.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, addr.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and possibly overwritten by the kernel: valid either way.
    let addr = unsafe { addr.assume_init() };
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port))))
}

fn original_dst_v6(fd: RawFd) -> io::Result<SocketAddr> {
    let mut addr = MaybeUninit::<libc::sockaddr_in6>::zeroed();
    let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: as in the IPv4 case, with a sockaddr_in6.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_IPV6, SO_ORIGINAL_DST, addr.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and possibly overwritten by the kernel: valid either way.
    let addr = unsafe { addr.assume_init() };
    let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
    Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, addr.sin6_scope_id)))
}

/// Checks once, at start, whether this process may bind foreign source addresses.
pub fn can_spoof_source() -> bool {
    let Ok(sock) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
        return false;
    };
    set_ip_transparent(&sock, false).is_ok()
}

/// Stops a listening socket: it leaves its `SO_REUSEPORT` group (new connections go to the other
/// listeners, a replacement proxy's), connections queued on it move there too when
/// `net.ipv4.tcp_migrate_req` is on, and an accept waiting on it returns an error. The accept
/// loop then ends on its own, without cancelling an accept that may already hold a connection.
pub fn stop_listening(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor the caller owns; failure is reported by the return value.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_RD) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Raises the soft open-file limit to the hard limit: a node proxy holds two sockets per
/// proxied connection. Returns the soft limit in force afterwards.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill and then read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            lim = raised;
        }
    }
    Ok(lim.rlim_cur)
}

/// Puts a socket in non-blocking mode (raw `splice` calls must never block the worker).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a caller-owned fd with standard commands.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A non-blocking pipe used as the kernel-side buffer of a spliced relay direction.
pub struct Pipe {
    pub read: std::os::fd::OwnedFd,
    pub write: std::os::fd::OwnedFd,
    pub capacity: usize,
}

impl Pipe {
    pub fn new(want: usize) -> io::Result<Pipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two fds into the array on success; we own them from then on.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just returned by pipe2 and are owned by nobody else.
        let (read, write) =
            unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe means fewer splice calls per byte; the kernel may cap it.
        // SAFETY: fcntl on an fd we own.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
        let capacity = if size > 0 { size as usize } else { 64 * 1024 };
        Ok(Pipe { read, write, capacity })
    }
}

/// One non-blocking `splice(2)` call, moving up to `len` bytes between two fds (one a pipe).
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: no memory is passed to the kernel (null offsets); both fds are caller-owned.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// One non-blocking `recv(2)` into `buf`'s spare capacity (`MSG_DONTWAIT`: the descriptor's own
/// mode is left alone, so io_uring operations on it are unaffected); the bytes received are
/// appended to `buf`. `WouldBlock` when nothing is queued.
pub fn recv_now(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: the kernel writes at most `spare.len()` bytes into `spare`, which is writable
    // memory owned by `buf` for the duration of the call.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialized the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// One non-blocking `send(2)` of the bytes of an io_uring buffer (a `Vec`, a slice of one,
/// `Bytes`): `MSG_DONTWAIT`, and `MSG_NOSIGNAL` (a closed peer is an error, not a signal).
/// Returns how much the socket took; `WouldBlock` when it took nothing.
pub fn send_now<B: monoio::buf::IoBuf>(fd: RawFd, data: &B) -> io::Result<usize> {
    // SAFETY: `IoBuf` (an unsafe trait) guarantees `read_ptr` is valid for `bytes_init` bytes
    // for as long as the buffer is borrowed, which covers this call; the kernel only reads them.
    let n =
        unsafe { libc::send(fd, data.read_ptr().cast(), data.bytes_init(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Returns freed heap memory to the system (glibc keeps it otherwise). Cheap enough after a
/// config build, which is when a lot of memory is freed at once.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Largest allocation glibc serves from its arenas; larger ones get their own mapping.
pub const MMAP_THRESHOLD: usize = 4 << 20;
/// Free memory at the top of an arena that glibc keeps instead of handing back at once. An
/// 8-stream burst through one proxy stopped faulting at 4 MiB and thrashed at 2 (local
/// scenario): twice that, for more streams per worker.
pub const TRIM_THRESHOLD: usize = 8 << 20;

/// What `tune_allocator` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorTuning {
    Set,
    /// `GLIBC_TUNABLES` sets malloc tunables: the operator's choice stands.
    LeftToOperator,
    /// glibc refused a value.
    Refused,
}

/// Sets glibc's malloc for a proxy's bursts of large buffers (relay chunks, TLS write buffers,
/// HTTP/2 frames), unless the operator set malloc tunables in `GLIBC_TUNABLES`. glibc's own
/// thresholds move with the largest block freed so far, and at their defaults every cycle of a
/// bulk transfer could shrink a worker's arena by a few MiB with `madvise` and fault it back in
/// page by page (measured: one page fault per 4 KiB carried with 8 streams). With fixed
/// thresholds the arena keeps that memory; the control thread's periodic `malloc_trim` (see
/// `control`) still hands it back after a burst. Call it before other threads start.
pub fn tune_allocator() -> AllocatorTuning {
    if operator_tuned_malloc(std::env::var_os("GLIBC_TUNABLES").as_deref()) {
        return AllocatorTuning::LeftToOperator;
    }
    // SAFETY: mallopt only sets allocator parameters.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
    };
    if ok { AllocatorTuning::Set } else { AllocatorTuning::Refused }
}

/// Whether `GLIBC_TUNABLES` sets any of malloc's tunables.
fn operator_tuned_malloc(tunables: Option<&std::ffi::OsStr>) -> bool {
    tunables.is_some_and(|t| t.to_string_lossy().split(':').any(|kv| kv.starts_with("glibc.malloc.")))
}

/// The process's resident memory in bytes (`/proc/self/statm`), or `None` if unreadable.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

// Readiness on monoio's split halves.
//
// The relays wait for readiness before taking a buffer (an idle connection then pins no
// memory), and splice needs the raw descriptor; monoio's halves offer neither, but expose the
// shared stream as a public field (`Rc<UnsafeCell<TcpStream>>`). Why a shared reference into it
// is sound, given monoio 0.2.4 (pinned with `=` in Cargo.toml because this argument reads its
// code: `src/io/util/split.rs`, `src/net/tcp/stream.rs`):
// 1. One thread. The halves hold an `Rc`, so they are `!Send`; only the worker that owns the
//    connection can reach the stream.
// 2. No access overlaps another. Every `TcpStream` method reached through the halves (monoio's
//    own `read`, `write`, `writev`, `shutdown`, and `readable`/`writable` here) touches the
//    stream only synchronously, when called or first polled, to clone its `SharedFd` (an `Rc`)
//    into an io_uring or epoll operation, or to read the descriptor number. The futures they
//    return own that clone and never read the stream again. Two tasks of one thread never run
//    at the same time, so the `&mut` monoio makes for a write on one half and the `&` made here
//    for the other half are never used at the same moment.
// 3. The stream outlives the reference: both halves keep the `Rc` alive, and the caller holds a
//    half for the whole call.

/// Waits for read readiness on the stream behind a monoio read half, without holding a buffer.
pub async fn readable(half: &monoio::io::OwnedReadHalf<monoio::net::TcpStream>) -> io::Result<()> {
    // SAFETY: see "Readiness on monoio's split halves" above.
    let stream: &monoio::net::TcpStream = unsafe { &*half.0.get() };
    stream.readable(true).await
}

/// Waits for write readiness on the stream behind a monoio write half.
pub async fn writable(half: &monoio::io::OwnedWriteHalf<monoio::net::TcpStream>) -> io::Result<()> {
    // SAFETY: see "Readiness on monoio's split halves" above.
    let stream: &monoio::net::TcpStream = unsafe { &*half.0.get() };
    stream.writable(true).await
}

/// The descriptor behind a split half (for `splice`).
pub fn half_fd<T: AsRawFd>(shared: &std::rc::Rc<std::cell::UnsafeCell<T>>) -> RawFd {
    // SAFETY: see "Readiness on monoio's split halves" above; only the number is read.
    unsafe { &*shared.get() }.as_raw_fd()
}

// Network namespaces (in-pod mode).

/// `NS_GET_NSTYPE` (linux/nsfs.h): `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// A network namespace held open by a descriptor (a pod's, handed over by the node agent, or
/// the one a thread started in), with its identity (device and inode of the nsfs file).
#[derive(Debug)]
pub struct NetNs {
    fd: std::os::fd::OwnedFd,
    dev: u64,
    ino: u64,
}

impl NetNs {
    /// Adopts `fd`, checking that it is a network namespace.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> io::Result<NetNs> {
        // SAFETY: ioctl on a descriptor we own; NS_GET_NSTYPE takes no argument.
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("not a namespace descriptor: {e}")));
        }
        if kind != libc::CLONE_NEWNET {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the descriptor is not a network namespace"));
        }
        let mut st = MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: fstat fills the zeroed stat buffer for a descriptor we own.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: zero-initialised and filled by the kernel: valid either way.
        let st = unsafe { st.assume_init() };
        Ok(NetNs { fd, dev: st.st_dev, ino: st.st_ino })
    }

    /// The network namespace the calling thread is in now.
    pub fn current_thread() -> io::Result<NetNs> {
        let f = std::fs::File::open("/proc/thread-self/ns/net")?;
        NetNs::from_fd(f.into())
    }

    /// The namespace's identity: two descriptors with the same one name the same namespace.
    pub fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// The namespace's inode (what `ip netns identify` and `/proc/PID/ns/net` show).
    pub fn inode(&self) -> u64 {
        self.ino
    }
}

/// Moves the calling thread into `ns`.
fn setns_net(ns: &NetNs) -> io::Result<()> {
    // SAFETY: setns on a descriptor we hold open; it changes only the calling thread's
    // namespace and reports failure through the return value.
    let rc = unsafe { libc::setns(ns.fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Runs `f` with the calling thread in `target`, then returns it to `home` (the namespace it
/// was in). Sockets `f` creates belong to `target` for their whole life, wherever they are used.
///
/// Failing to return is not recoverable: every socket the thread made afterwards would be in a
/// pod's namespace. The process aborts rather than run on like that.
pub fn in_netns<T>(target: &NetNs, home: &NetNs, f: impl FnOnce() -> T) -> io::Result<T> {
    setns_net(target)?;
    let out = f();
    if let Err(e) = setns_net(home) {
        eprintln!("fatal: could not return to the proxy's own network namespace: {e}");
        std::process::abort();
    }
    Ok(out)
}

/// Checks at start-up that the process may enter network namespaces (`CAP_SYS_ADMIN`), by
/// entering its own.
pub fn can_setns() -> io::Result<()> {
    let own = NetNs::current_thread()?;
    setns_net(&own)
}

/// One received datagram of a `SOCK_SEQPACKET` socket, with the descriptors it carried.
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    pub fds: Vec<std::os::fd::OwnedFd>,
    /// The message did not fit the buffer (`MSG_TRUNC`).
    pub truncated: bool,
    /// Descriptors were dropped for lack of room (`MSG_CTRUNC`).
    pub fds_truncated: bool,
}

/// Room for this many descriptors in one message; more are dropped by the kernel (and the
/// message is marked `MSG_CTRUNC`).
const MAX_FDS: usize = 8;

/// Receives one message without blocking, taking ownership of any `SCM_RIGHTS` descriptors
/// (close-on-exec). `Ok(None)`: nothing to read now. A zero-length message with no descriptor is
/// the peer's end of stream.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<Received>> {
    use std::os::fd::FromRawFd;
    // u64 alignment satisfies cmsghdr's.
    let mut control = [0u64; 64];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<libc::c_int>()) as u32) } as usize;
    debug_assert!(space <= size_of::<[u64; 64]>());
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: a zeroed msghdr is a valid "no name, no control" header; we fill the fields below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: every pointer in `msg` refers to live buffers of the stated lengths, which the
    // kernel fills.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* walk stays within `msg_controllen` bytes of `control`, as the kernel
    // wrote them; each SCM_RIGHTS payload holds whole c_ints, and every descriptor in it is
    // now ours (installed in this process by recvmsg), so wrapping each in an OwnedFd once is
    // right.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const libc::c_int;
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..payload / size_of::<libc::c_int>() {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    fds.push(std::os::fd::OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Some(Received {
        len: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    }))
}

/// Sends one message with `fds` attached as `SCM_RIGHTS` (none: a plain message), without
/// blocking. Used by the tests' node agent as much as by anything else.
pub fn send_with_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut control = [0u64; 64];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    // SAFETY: a zeroed msghdr is valid; filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"));
        }
        let bytes = size_of_val(fds);
        // SAFETY: the control buffer is large enough for MAX_FDS descriptors (checked above);
        // the header and payload are written within CMSG_SPACE(bytes) of it.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(bytes as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg) as *mut libc::c_int, fds.len());
        }
    }
    // SAFETY: `msg` points at live buffers; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Sets `net.ipv4.tcp_migrate_req` in the calling thread's network namespace (a pod's, entered
/// with [`in_netns`]): connections queued on a listener that stops move to another listener of
/// its `SO_REUSEPORT` group (the replacement proxy's) instead of being reset.
pub fn enable_migrate_req() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", b"1")
}

/// Registers an owned socket with the tokio reactor of the calling thread (the control thread's
/// unix sockets, which tokio has no type for).
pub fn tokio_async_fd(socket: socket2::Socket) -> io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    // SAFETY: the `Socket` owns its descriptor, which stays open and the same until the
    // `AsyncFd` (its only owner from here) is dropped; `as_raw_fd` always returns it.
    unsafe { tokio::io::unix::AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)
}

/// One datagram from a non-blocking UDP socket into `buf`: `Ok(None)` when none is waiting.
pub fn udp_recv_from(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
    // SAFETY: the caller holds the socket for the whole call, so the descriptor stays open for
    // the borrow's life.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.as_raw_fd()) };
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`; recv only writes initialised bytes.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
    match socket2::SockRef::from(&fd).recv_from(uninit) {
        Ok((n, from)) => {
            let from = from.as_socket().ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
            Ok(Some((n, from)))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends one datagram without blocking (a full socket buffer drops it, as UDP may).
pub fn udp_send_to(sock: &impl AsRawFd, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
    // SAFETY: as in `udp_recv_from`.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.as_raw_fd()) };
    socket2::SockRef::from(&fd).send_to(buf, &to.into())
}

/// CPU time (user + system) the calling thread has used, in seconds.
pub fn thread_cpu_seconds() -> f64 {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the zeroed buffer for the calling thread.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) } != 0 {
        return 0.0;
    }
    // SAFETY: zero-initialised and filled by the kernel: valid either way.
    let ru = unsafe { ru.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Open descriptors of this process, and its limit (`process_open_fds`, `process_max_fds`).
pub fn fd_usage() -> (u64, u64) {
    let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills a valid rlimit.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur } else { 0 };
    (open, max)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::operator_tuned_malloc;

    #[test]
    fn malloc_tunables_set_by_the_operator_are_left_alone() {
        assert!(!operator_tuned_malloc(None));
        assert!(!operator_tuned_malloc(Some(OsStr::new(""))));
        assert!(!operator_tuned_malloc(Some(OsStr::new("glibc.pthread.rseq=0"))));
        assert!(operator_tuned_malloc(Some(OsStr::new("glibc.malloc.trim_threshold=0"))));
        assert!(operator_tuned_malloc(Some(OsStr::new("glibc.pthread.rseq=0:glibc.malloc.arena_max=2"))));
    }

    #[test]
    fn allocator_thresholds_are_accepted() {
        // The test harness sets no malloc tunables; glibc takes both values.
        if !operator_tuned_malloc(std::env::var_os("GLIBC_TUNABLES").as_deref()) {
            assert_eq!(super::tune_allocator(), super::AllocatorTuning::Set);
        }
    }
}

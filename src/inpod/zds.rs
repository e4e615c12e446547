//! ZDS, the node agent <-> proxy protocol: a `SOCK_SEQPACKET` unix socket, one protobuf message
//! per datagram (at most 1024 bytes), the pod's network namespace as an `SCM_RIGHTS` descriptor
//! on `Add`. The proxy connects, sends `ZdsHello`, then answers every request with one `Ack`; it
//! never sends anything else.
//!
//! [`decode`] is pure (the fuzz target and the unit tests call it); [`ZdsConn`] is the socket, on
//! the control thread's tokio runtime.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use prost::Message;
use tokio::io::unix::AsyncFd;

use super::PodInfo;
use crate::sys::{self, NetNs, Received};

pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
}

/// The largest message either side sends.
pub const MAX_MESSAGE: usize = 1024;

/// A request from the node agent.
#[derive(Debug)]
pub enum Request {
    /// Serve this pod, inside `netns`.
    Add { uid: String, info: PodInfo, netns: NetNs },
    /// Keep serving this pod (the agent no longer holds its namespace).
    Keep { uid: String },
    /// Stop serving this pod.
    Del { uid: String },
    /// Every pod the agent knows of was sent.
    SnapshotSent,
}

#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("message truncated: longer than {MAX_MESSAGE} bytes")]
    Truncated,
    #[error("message arrived with its descriptors truncated")]
    FdsTruncated,
    #[error("undecodable message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("a request without a payload")]
    Empty,
    #[error("Add for {0:?} without workload_info")]
    NoWorkloadInfo(String),
    #[error("Add for {0:?} without a network namespace descriptor")]
    NoNetns(String),
    #[error("Add for {uid:?}: {error}")]
    BadNetns { uid: String, error: io::Error },
    #[error("the node agent closed the connection")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ZdsError {
    /// Errors that end the connection; the others fail one `Add` (NACKed; the agent retries).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ZdsError::BadNetns { .. } | ZdsError::NoNetns(_))
    }
}

/// Decodes one received datagram. Descriptors beyond the one `Add` needs, or on any other
/// request, are closed here (dropped).
pub fn decode(bytes: &[u8], received: Received) -> Result<Request, ZdsError> {
    if received.truncated {
        return Err(ZdsError::Truncated);
    }
    if received.fds_truncated {
        return Err(ZdsError::FdsTruncated);
    }
    let mut fds = received.fds.into_iter();
    let req = proto::WorkloadRequest::decode(bytes)?;
    use proto::workload_request::Payload;
    match req.payload.ok_or(ZdsError::Empty)? {
        Payload::Add(add) => {
            let info = add.workload_info.ok_or_else(|| ZdsError::NoWorkloadInfo(add.uid.clone()))?;
            let fd: OwnedFd = fds.next().ok_or_else(|| ZdsError::NoNetns(add.uid.clone()))?;
            let extra = fds.count();
            if extra > 0 {
                tracing::warn!(uid = %add.uid, extra, "Add carried more than one descriptor; closed the rest");
            }
            let netns = NetNs::from_fd(fd).map_err(|error| ZdsError::BadNetns { uid: add.uid.clone(), error })?;
            let info = PodInfo { name: info.name, namespace: info.namespace, service_account: info.service_account };
            Ok(Request::Add { uid: add.uid, info, netns })
        }
        Payload::Keep(k) => Ok(Request::Keep { uid: k.uid }),
        Payload::Del(d) => Ok(Request::Del { uid: d.uid }),
        Payload::SnapshotSent(_) => Ok(Request::SnapshotSent),
    }
}

/// The encoded `Ack`: empty for success, else the reason.
pub fn encode_ack(error: Option<&str>) -> Vec<u8> {
    let ack = proto::Ack { error: error.unwrap_or_default().to_string() };
    proto::WorkloadResponse { payload: Some(proto::workload_response::Payload::Ack(ack)) }.encode_to_vec()
}

/// The connection to the node agent.
pub struct ZdsConn {
    fd: AsyncFd<socket2::Socket>,
}

impl ZdsConn {
    /// Connects to the agent's socket at `path` and says hello.
    pub async fn connect(path: &Path) -> io::Result<ZdsConn> {
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
        socket.set_cloexec(true)?;
        // Connected while still blocking: a unix connect completes at once or fails.
        socket.connect(&socket2::SockAddr::unix(path)?)?;
        socket.set_nonblocking(true)?;
        let conn = ZdsConn { fd: sys::tokio_async_fd(socket)? };
        let hello = proto::ZdsHello { version: proto::Version::V1 as i32 };
        conn.send(&hello.encode_to_vec()).await?;
        Ok(conn)
    }

    async fn send(&self, bytes: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|s| sys::send_with_fds(s.get_ref().as_raw_fd(), bytes, &[])) {
                Ok(r) => return r.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends the answer to the request just handled.
    pub async fn ack(&self, error: Option<&str>) -> io::Result<()> {
        self.send(&encode_ack(error)).await
    }

    /// Waits for the next request.
    pub async fn recv(&self) -> Result<Request, ZdsError> {
        // One byte more than the largest message, so an oversized one shows as truncated even
        // where the kernel would not flag it.
        let mut buf = [0u8; MAX_MESSAGE + 1];
        loop {
            let mut guard = self.fd.readable().await?;
            let got = match guard.try_io(|s| match sys::recv_with_fds(s.get_ref().as_raw_fd(), &mut buf) {
                Ok(Some(r)) => Ok(r),
                Ok(None) => Err(io::ErrorKind::WouldBlock.into()),
                Err(e) => Err(e),
            }) {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            if got.len == 0 && got.fds.is_empty() && !got.truncated {
                return Err(ZdsError::Closed);
            }
            if got.len > MAX_MESSAGE {
                return Err(ZdsError::Truncated);
            }
            let len = got.len.min(buf.len());
            return decode(&buf[..len], got);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(bytes: &[u8], fds: Vec<OwnedFd>) -> Received {
        Received { len: bytes.len(), fds, truncated: false, fds_truncated: false }
    }

    fn add(uid: &str, info: bool) -> Vec<u8> {
        let add = proto::AddWorkload {
            uid: uid.into(),
            workload_info: info.then(|| proto::WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        };
        proto::WorkloadRequest { payload: Some(proto::workload_request::Payload::Add(add)) }.encode_to_vec()
    }

    fn own_netns() -> OwnedFd {
        std::fs::File::open("/proc/thread-self/ns/net").unwrap().into()
    }

    #[test]
    fn add_needs_info_and_one_netns() {
        let msg = add("u1", true);
        match decode(&msg, received(&msg, vec![own_netns()])).unwrap() {
            Request::Add { uid, info, .. } => {
                assert_eq!(uid, "u1");
                assert_eq!(info.service_account, "sa");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode(&msg, received(&msg, vec![])), Err(ZdsError::NoNetns(_))));
        let no_info = add("u2", false);
        assert!(matches!(decode(&no_info, received(&no_info, vec![own_netns()])), Err(ZdsError::NoWorkloadInfo(_))));
        // Extra descriptors are closed; the first is the namespace.
        assert!(matches!(decode(&msg, received(&msg, vec![own_netns(), own_netns()])), Ok(Request::Add { .. })));
        // A descriptor that is not a network namespace fails that Add only.
        let file: OwnedFd = std::fs::File::open("/proc/self/stat").unwrap().into();
        let err = decode(&msg, received(&msg, vec![file])).unwrap_err();
        assert!(matches!(err, ZdsError::BadNetns { .. }) && !err.is_fatal(), "{err}");
    }

    #[test]
    fn malformed_messages_are_errors() {
        let msg = add("u1", true);
        let mut r = received(&msg, vec![own_netns()]);
        r.truncated = true;
        assert!(matches!(decode(&msg, r), Err(ZdsError::Truncated)));
        let mut r = received(&msg, vec![]);
        r.fds_truncated = true;
        assert!(matches!(decode(&msg, r), Err(ZdsError::FdsTruncated)));
        assert!(matches!(decode(&[0xff, 0xff], received(&[], vec![])), Err(ZdsError::Decode(_))));
        let empty = proto::WorkloadRequest { payload: None }.encode_to_vec();
        assert!(matches!(decode(&empty, received(&empty, vec![])), Err(ZdsError::Empty)));
        let ack = proto::WorkloadResponse::decode(encode_ack(Some("no")).as_slice()).unwrap();
        let Some(proto::workload_response::Payload::Ack(a)) = ack.payload else { panic!() };
        assert_eq!(a.error, "no");
    }
}

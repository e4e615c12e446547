//! One access-log line per finished connection (target `access`), with Istio ztunnel's fields.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::model::{Identity, Workload};
use crate::net::relay::RelayStats;
use crate::snapshot::ServiceEntry;
use crate::telemetry::fields::FastAddr;
use crate::telemetry::metrics::{Labels, Peer, ServiceLabels, SetupPath};

/// What is known of a connection, filled in as it is set up.
pub struct ConnLog {
    pub direction: &'static str,
    pub src_addr: SocketAddr,
    pub src_workload: Option<Arc<Workload>>,
    /// The upstream address actually dialed.
    pub dst_addr: Option<SocketAddr>,
    pub dst_hbone_addr: Option<SocketAddr>,
    /// The service the connection was addressed to (hostname, namespace, name).
    pub dst_service: Option<Arc<ServiceEntry>>,
    pub dst_workload: Option<Arc<Workload>>,
    /// The peer's authenticated identity (inbound HBONE).
    pub src_identity: Option<Box<Identity>>,
    /// What the peer said of itself (`baggage`), when we do not know its workload.
    pub src_baggage: Option<Box<Peer>>,
    /// Which setup path the connection took, once known.
    pub path: Option<SetupPath>,
    pub start: Instant,
}

impl ConnLog {
    pub fn new(direction: &'static str, src_addr: SocketAddr) -> ConnLog {
        ConnLog {
            direction,
            src_addr,
            src_workload: None,
            dst_addr: None,
            dst_hbone_addr: None,
            dst_service: None,
            dst_workload: None,
            src_identity: None,
            src_baggage: None,
            path: None,
            start: Instant::now(),
        }
    }

    /// The metric labels for this connection as `reporter` sees it.
    pub fn labels(&self, reporter: &str, response_flags: &str, mutual_tls: bool, default_cluster: &str) -> Labels {
        let src = match (&self.src_workload, &self.src_baggage) {
            (Some(w), _) => Peer::of(w, default_cluster),
            (None, Some(b)) => (**b).clone(),
            (None, None) => Peer::default(),
        };
        let src = Peer { principal: self.src_identity.as_ref().map(|i| i.to_string()).or(src.principal), ..src };
        let dst = self.dst_workload.as_ref().map(|w| Peer::of(w, default_cluster)).unwrap_or_default();
        let svc = ServiceLabels {
            hostname: self.dst_service.as_ref().map(|s| s.service.hostname.clone()),
            namespace: self.dst_service.as_ref().map(|s| s.service.namespace.clone()),
            name: self.dst_service.as_ref().map(|s| s.service.name.clone()),
        };
        Labels::new(reporter, &src, &dst, &svc, response_flags, mutual_tls)
    }

    /// Writes the line: `connection complete` at INFO, or at ERROR with the error.
    pub fn finish(&self, stats: &RelayStats, error: Option<&dyn std::fmt::Display>) {
        let src_id = self.src_workload.as_ref().map(|w| w.identity().to_string());
        let dst_id = self.dst_workload.as_ref().map(|w| w.identity().to_string());
        let duration = format!("{}ms", self.start.elapsed().as_millis());
        let error = error.map(tracing::field::display);
        let src_workload = self.src_workload.as_ref().map(|w| w.name.as_str());
        let src_namespace = self.src_workload.as_ref().map(|w| w.namespace.as_str());
        let dst_workload = self.dst_workload.as_ref().map(|w| w.name.as_str());
        let dst_namespace = self.dst_workload.as_ref().map(|w| w.namespace.as_str());
        let dst_addr = self.dst_addr.map(|a| tracing::field::display(FastAddr(a)));
        let dst_hbone_addr = self.dst_hbone_addr.map(|a| tracing::field::display(FastAddr(a)));
        let (sent, recv) = (stats.sent.get(), stats.received.get());
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    target: "access",
                    $level,
                    src.addr = %FastAddr(self.src_addr),
                    src.workload = src_workload,
                    src.namespace = src_namespace,
                    src.identity = src_id.as_deref(),
                    dst.addr = dst_addr,
                    dst.hbone_addr = dst_hbone_addr,
                    dst.service = self.dst_service.as_ref().map(|s| s.service.hostname.as_str()),
                    dst.workload = dst_workload,
                    dst.namespace = dst_namespace,
                    dst.identity = dst_id.as_deref(),
                    direction = self.direction,
                    bytes_sent = sent,
                    bytes_recv = recv,
                    duration = %duration,
                    error,
                    "connection complete"
                )
            };
        }
        if error.is_some() {
            line!(tracing::Level::ERROR);
        } else {
            line!(tracing::Level::INFO);
        }
    }
}

//! One access-log line per finished connection (target `access`), with Istio ztunnel's fields.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::model::Workload;
use crate::net::relay::RelayStats;

/// What is known of a connection, filled in as it is set up.
pub struct ConnLog {
    pub direction: &'static str,
    pub src_addr: SocketAddr,
    pub src_workload: Option<Arc<Workload>>,
    /// The upstream address actually dialed.
    pub dst_addr: Option<SocketAddr>,
    pub dst_hbone_addr: Option<SocketAddr>,
    pub dst_service: Option<String>,
    pub dst_workload: Option<Arc<Workload>>,
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
            start: Instant::now(),
        }
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
        let dst_addr = self.dst_addr.map(tracing::field::display);
        let dst_hbone_addr = self.dst_hbone_addr.map(tracing::field::display);
        let (sent, recv) = (stats.sent.get(), stats.received.get());
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    target: "access",
                    $level,
                    src.addr = %self.src_addr,
                    src.workload = src_workload,
                    src.namespace = src_namespace,
                    src.identity = src_id.as_deref(),
                    dst.addr = dst_addr,
                    dst.hbone_addr = dst_hbone_addr,
                    dst.service = self.dst_service.as_deref(),
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

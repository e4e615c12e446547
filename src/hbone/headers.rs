//! The headers an HBONE client puts on its CONNECT: `forwarded` (the client and, for service
//! traffic, the service hostname), `baggage` (who the source is, for the peer's telemetry) and
//! `traceparent` (a W3C trace id, also the log correlation id).
//!
//! Pure: no I/O, no clock, no randomness of its own; the caller passes the random ids in.

use std::fmt::Write;
use std::net::SocketAddr;

use crate::model::Workload;

/// The `forwarded` header: the client's address, and the service hostname when there is one.
pub fn forwarded(client: SocketAddr, service_host: Option<&str>) -> String {
    match service_host {
        Some(host) => format!("for=\"{client}\";host={host}"),
        None => format!("for=\"{client}\""),
    }
}

/// The `baggage` header describing `source`: Istio's keys, empty values left out. A workload
/// without a cluster of its own is in `default_cluster`; one without a type is a pod.
pub fn baggage(source: &Workload, default_cluster: &str) -> String {
    let cluster = if source.cluster_id.is_empty() { default_cluster } else { source.cluster_id.as_str() };
    let kind = if source.workload_type.is_empty() { "pod" } else { source.workload_type.as_str() };
    let name = if source.workload_name.is_empty() { source.name.as_str() } else { source.workload_name.as_str() };
    let locality = source.locality.as_ref();
    let region = locality.map(|l| l.region.as_str()).unwrap_or("");
    let zone = locality.map(|l| l.zone.as_str()).unwrap_or("");
    let mut out = String::with_capacity(160);
    let mut put = |key: &dyn std::fmt::Display, value: &str| {
        if value.is_empty() {
            return;
        }
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "{key}={value}");
    };
    put(&"k8s.cluster.name", cluster);
    put(&"k8s.namespace.name", &source.namespace);
    put(&format_args!("k8s.{kind}.name"), name);
    put(&"service.name", &source.canonical_name);
    put(&"service.version", &source.canonical_revision);
    put(&"cloud.region", region);
    put(&"cloud.availability_zone", zone);
    out
}

/// A `traceparent` (W3C trace context, version 00, sampled) from a 128-bit trace id and a 64-bit
/// span id. A span id of 0 is invalid in the spec, so it becomes 1.
pub fn traceparent(trace_id: u128, span_id: u64) -> String {
    format!("00-{trace_id:032x}-{:016x}-01", span_id.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Locality;

    fn workload() -> Workload {
        serde_yaml_ng::from_str(
            "uid: c1/Pod/ns1/sleep-1\nname: sleep-1\nnamespace: ns1\nworkloadName: sleep\n\
             canonicalName: sleep\ncanonicalRevision: v1\nworkloadIps: [10.0.0.1]\n",
        )
        .unwrap()
    }

    #[test]
    fn forwarded_with_and_without_a_service() {
        let client: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        assert_eq!(forwarded(client, None), "for=\"10.0.0.1:4000\"");
        assert_eq!(
            forwarded(client, Some("a.ns.svc.cluster.local")),
            "for=\"10.0.0.1:4000\";host=a.ns.svc.cluster.local"
        );
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(forwarded(v6, None), "for=\"[fd00::1]:80\"");
    }

    #[test]
    fn baggage_has_istios_keys_and_skips_empty_values() {
        let mut w = workload();
        assert_eq!(
            baggage(&w, "Kubernetes"),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=ns1,k8s.pod.name=sleep,service.name=sleep,service.version=v1"
        );
        w.cluster_id = "east".into();
        w.workload_type = "deployment".into();
        w.workload_name.clear();
        w.canonical_revision.clear();
        w.locality = Some(Locality { region: "r1".into(), zone: "".into(), subzone: "".into() });
        assert_eq!(
            baggage(&w, "Kubernetes"),
            "k8s.cluster.name=east,k8s.namespace.name=ns1,k8s.deployment.name=sleep-1,service.name=sleep,cloud.region=r1"
        );
    }

    #[test]
    fn traceparent_shape() {
        assert_eq!(traceparent(0xab, 0x1234), "00-000000000000000000000000000000ab-0000000000001234-01");
        let t = traceparent(u128::MAX, 0);
        assert_eq!(t.len(), 55);
        assert!(t.ends_with("-0000000000000001-01"), "span id 0 is not valid: {t}");
    }
}

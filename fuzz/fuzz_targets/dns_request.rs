//! Arbitrary bytes as a DNS query to a pod's DNS proxy: the request path up to the reply or the
//! decision to forward, over UDP and TCP, against a config with services (wildcards, headless,
//! many addresses). Any reply must be a DNS message no larger than the transport allows; a panic
//! is a finding.

#![no_main]

use std::sync::OnceLock;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use ztunnel::dns::message::{CLASSIC_UDP, Outcome, Transport, handle};
use ztunnel::dns::names::{Asker, pod_search};
use ztunnel::snapshot::{ConfigIndex, LocalScope, SourceInfo};

const CONFIG: &str = r#"
workloads:
- {uid: a, name: db-0, namespace: ns1, serviceAccount: db, workloadIps: [10.1.0.10, "fd00::10"], services: {"ns1/db.ns1.svc.cluster.local": {5432: 5432}}}
services:
- {name: web, namespace: ns1, hostname: web.ns1.svc.cluster.local, vips: ["/10.96.0.1", "/fd00::1"], ports: {80: 80}}
- {name: db, namespace: ns1, hostname: db.ns1.svc.cluster.local, vips: [], ports: {5432: 5432}}
- {name: wild, namespace: ns2, hostname: "*.example.com", vips: ["/240.240.0.1"], ports: {443: 443}}
"#;

fn index() -> &'static ConfigIndex {
    static INDEX: OnceLock<ConfigIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let state = ztunnel::control::local::parse(CONFIG).expect("valid");
        ConfigIndex::build(1, SourceInfo { kind: "fuzz", location: String::new() }, LocalScope::Node(None), state)
    })
}

fuzz_target!(|data: &[u8]| {
    let search = pod_search("ns1", "cluster.local");
    let asker = Asker {
        namespace: "ns1",
        network: "",
        cluster_domain: "cluster.local",
        search: &search,
        preferred_namespace: None,
        ipv6_enabled: true,
    };
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Outcome::Reply { bytes, .. } = handle(index(), Some(&asker), data, transport) {
            let reply = Message::from_vec(&bytes).expect("our reply parses");
            if transport == Transport::Udp {
                let limit = reply.edns.as_ref().map_or(CLASSIC_UDP, |e| usize::from(e.max_payload()).max(CLASSIC_UDP));
                assert!(bytes.len() <= limit, "{} > {limit}", bytes.len());
            }
        }
    }
});

//! What authorization costs per connection: the policy lookup for the destination workload and
//! the engine's decision, with N policies in the mesh (N-1 DENY policies that do not match and
//! one ALLOW that does, as `perf run --policies N` sets up), for several N.
//!
//! `cargo run --release --example authz_cost`

use std::hint::black_box;
use std::time::Instant;

use ztunnel::rbac;
use ztunnel::snapshot::{LocalScope, Snapshot, SourceInfo};

fn config(n: usize) -> String {
    let mut y = String::from(
        "workloads:\n- {uid: server, name: server, namespace: perf, serviceAccount: server, workloadIps: [10.0.0.2], protocol: HBONE}\n",
    );
    // The benchmark's own policies (`perf run --policies N`)...
    y.push_str(&perf::scenario::policies_yaml(n));
    if n == 0 {
        y.push_str("policies:\n");
    }
    // ...and policies of other namespaces: in the mesh, not for this workload.
    for i in 0..n * 10 {
        y.push_str(&format!(
            "- {{name: elsewhere-{i}, namespace: ns-{i}, scope: Namespace, action: Deny, rules: [[[{{destinationPorts: [1]}}]]]}}\n"
        ));
    }
    y
}

fn main() {
    let conn = rbac::Conn {
        src_ip: "10.0.0.1".parse().unwrap(),
        identity: Some("spiffe://cluster.local/ns/perf/sa/client".parse().unwrap()),
        dst: "10.0.0.2:8080".parse().unwrap(),
    };
    println!("policies for the workload | in the mesh | ns per connection (lookup + decision)");
    for n in [0usize, 1, 5, 20, 100] {
        let state = ztunnel::control::local::parse(&config(n)).expect("valid config");
        let snap =
            Snapshot::build(1, SourceInfo { kind: "bench", location: String::new() }, LocalScope::Node(None), state);
        let wl = snap.workload_by_uid("server").unwrap().clone();
        let rounds = 200_000;
        let started = Instant::now();
        for _ in 0..rounds {
            let policies = snap.policies_for(black_box(&wl));
            let out = if policies.is_empty() { Ok(()) } else { rbac::authorize(&policies, black_box(&conn)).result };
            assert!(black_box(out).is_ok());
        }
        let per = started.elapsed().as_nanos() as f64 / rounds as f64;
        println!("{n:>25} | {:>11} | {per:.0}", snap.policies().count());
    }
}

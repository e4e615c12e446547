//! SCENARIOS.md, 1 to 14, and the pods' DNS, on the two-node rig of `tests/rig` (root only;
//! skipped with the reason otherwise): two `ztunnel` processes in in-pod mode in node
//! namespaces, pods behind them with istio-cni's rules handed over by the node agent stand-in,
//! an HTTP server in `httpbin` and `curl`-like clients.

mod common;
mod fake_istiod;
mod rig;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use fake_istiod::{Istiod, psec, pwl};
use rig::*;

fn counted(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

fn vip() -> SocketAddr {
    format!("{VIP}:8000").parse().unwrap()
}

fn pod_addr(rig: &Rig, name: &str) -> SocketAddr {
    format!("{}:80", rig.pod(name).ip).parse().unwrap()
}

const ALLOW_SLEEP: &str = "[{name: allow-sleep, namespace: ambient-demo, scope: Namespace, action: Allow, rules: [[[{principals: [!Exact cluster.local/ns/ambient-demo/sa/sleep]}]]]}]";
const DENY_NOTSLEEP: &str = "[{name: deny-notsleep, namespace: ambient-demo, scope: Namespace, action: Deny, rules: [[[{principals: [!Exact cluster.local/ns/ambient-demo/sa/notsleep]}]]]}]";
/// What istiod sends for STRICT PeerAuthentication: deny connections without a principal.
const STRICT: &str = "[{name: strict, namespace: ambient-demo, scope: Namespace, action: Deny, rules: [[[{notPrincipals: [!Presence []]}]]]}]";
/// What istiod sends for an ALLOW policy whose rules need L7 (`methods: [GET]`): ztunnel can't
/// check them, so the policy keeps no rule and matches nothing (fail closed).
/// Selects only the workloads that name it (`httpbin`), and allows everything.
const ALLOW_ALL_SELECTED: &str =
    "[{name: allow-all, namespace: ambient-demo, scope: WorkloadSelector, action: Allow, rules: [[]]}]";
const ALLOW_GET_ONLY: &str = "[{name: allow-get, namespace: ambient-demo, scope: Namespace, action: Allow, rules: []}]";

#[test]
fn scenarios_1_2_3_before_the_mesh_then_hbone_by_a_push_and_same_node() {
    if skip_without_netns("scenarios_1_2_3_before_the_mesh_then_hbone_by_a_push_and_same_node") {
        return;
    }
    let rig = Rig::new("a");
    rig.http_server("httpbin");

    // 1. Before the mesh: plain TCP through both proxies; the VIP resolves; the link carries
    // the application's bytes as they are.
    let capture = Capture::start(&rig.nodes[1], "link0");
    assert_eq!(rig.curl("sleep", vip()).as_deref(), Ok("httpbin"), "scenario 1");
    let seen = capture.stop();
    assert!(
        seen.iter().any(|s| s.src.port() == 80 && contains(&s.payload, b"httpbin\n")),
        "scenario 1: plaintext on the node link"
    );
    let s = rig.scrape(0);
    let plain = [("reporter", "source"), ("connection_security_policy", "unknown")];
    assert!(counted(&s, "istio_tcp_connections_opened_total", &plain) >= 1.0);
    let dump = rig.dump(0);
    let workloads = dump["workloads"].as_array().unwrap();
    assert!(workloads.iter().all(|w| w["protocol"] == "TCP"), "{dump}");

    // 2. The mesh is enabled by a push (no restart): the same request works, over HBONE, and
    // the node link carries only TLS to 15008.
    rig.push(&Mesh::hbone());
    rig.wait_for_certificates(0, 2);
    rig.wait_for_certificates(1, 2);
    let capture = Capture::start(&rig.nodes[1], "link0");
    let marker = "/scenario-2-marker";
    let body = rig.in_pod("sleep", || {
        let mut c = HttpClient::connect(vip()).unwrap();
        let got = c.get(marker);
        c.close();
        got
    });
    assert_eq!(body, Ok((200, "httpbin\n".into())), "scenario 2");
    let seen = capture.stop();
    let data: Vec<&Segment> = seen.iter().filter(|s| !s.payload.is_empty()).collect();
    println!("scenario 2: {} segments with data on the node link", data.len());
    assert!(!data.is_empty(), "the capture saw the request");
    for s in &data {
        assert!(s.src.port() == 15008 || s.dst.port() == 15008, "only HBONE on the link: {s:?}");
        assert!(!contains(&s.payload, marker.as_bytes()) && !contains(&s.payload, b"httpbin\n"), "plaintext: {s:?}");
    }
    assert!(
        data.iter().any(|s| s.dst.port() == 15008 && s.payload.starts_with(&[0x16, 0x03])),
        "a TLS handshake to 15008"
    );
    let httpbin = rig.pod("httpbin").ip;
    rig.log_line(1, &[&format!("got CONNECT request to {httpbin}:80"), &format!("peer_id={}", spiffe("sleep"))]);
    rig.log_line(0, &[&format!("proxy to {httpbin}:80 using HBONE via {httpbin}:15008")]);
    let complete = rig.log_line(0, &["connection complete", &format!("dst.addr={httpbin}:80"), "duration="]);
    println!("w1: {complete}");
    let s = rig.scrape(1);
    let inbound = [
        ("reporter", "destination"),
        ("source_principal", "spiffe://cluster.local/ns/ambient-demo/sa/sleep"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(counted(&s, "istio_tcp_connections_opened_total", &inbound) >= 1.0, "w2 counts the HBONE stream");

    // 3. Same-node traffic goes through the proxy too, authorized and counted like the rest:
    // in-pod, from sleep2's namespace to httpbin's HBONE listener in its own.
    assert_eq!(rig.curl("sleep2", vip()).as_deref(), Ok("httpbin"), "scenario 3");
    let sleep2 = rig.pod("sleep2").ip;
    rig.log_line(1, &[&format!("src={sleep2}"), &format!("proxy to {httpbin}:80 using HBONE via {httpbin}:15008")]);
    let s = rig.scrape(1);
    assert!(counted(&s, "istio_tcp_connections_opened_total", &inbound) >= 2.0);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn scenario_5_load_balancing_across_two_replicas() {
    if skip_without_netns("scenario_5_load_balancing_across_two_replicas") {
        return;
    }
    let rig = Rig::new("e");
    rig.http_server("httpbin");
    rig.http_server("httpbin2");
    rig.push(&Mesh { replicas: 2, ..Mesh::hbone() });
    rig.wait_for_certificates(0, 2);
    rig.wait_for_certificates(1, 2);
    // The pick is random per connection (as Istio's): ten requests reach both replicas but
    // for a chance of 1 in 512, so rounds of ten continue (up to five) until both answered.
    let mut answers: HashMap<String, usize> = HashMap::new();
    for _round in 0..5 {
        for _ in 0..10 {
            let who = rig.curl("sleep", vip()).expect("every request is answered");
            *answers.entry(who).or_default() += 1;
        }
        if answers.len() == 2 {
            break;
        }
    }
    println!("scenario 5: {answers:?}");
    assert!(answers.contains_key("httpbin") && answers.contains_key("httpbin2"), "{answers:?}");
    for name in ["httpbin", "httpbin2"] {
        let ip = rig.pod(name).ip;
        rig.log_line(0, &[&format!("proxy to {ip}:80 using HBONE via {ip}:15008")]);
        rig.log_line(1, &[&format!("got CONNECT request to {ip}:80")]);
    }
}

#[test]
fn scenario_6_authorization_between_nodes() {
    if skip_without_netns("scenario_6_authorization_between_nodes") {
        return;
    }
    let rig = Rig::new("b");
    rig.http_server("httpbin");
    rig.push(&Mesh::hbone().policies(ALLOW_SLEEP));
    rig.wait_for_certificates(0, 2);
    rig.wait_for_certificates(1, 2);
    let pod = pod_addr(&rig, "httpbin");
    assert_eq!(rig.curl("sleep", pod).as_deref(), Ok("httpbin"), "sleep is allowed");
    let refused = rig.curl("notsleep", pod);
    assert!(refused.is_err(), "notsleep is refused: {refused:?}");
    let line = rig.log_line(1, &["RBAC rejected conn=10.10.1.3", &format!("({})", spiffe("notsleep"))]);
    println!("w2: {line}");
    let denied = [
        ("reporter", "destination"),
        ("response_flags", "DENY"),
        ("source_principal", "spiffe://cluster.local/ns/ambient-demo/sa/notsleep"),
    ];
    assert!(counted(&rig.scrape(1), "istio_tcp_connections_failed_total", &denied) >= 1.0, "w2 counts the denial");

    // Deleting the policy restores access.
    rig.push(&Mesh::hbone());
    assert_eq!(rig.curl("notsleep", pod).as_deref(), Ok("httpbin"), "access restored");

    // A policy that needs L7 blocks everybody: ztunnel fails closed.
    rig.push(&Mesh::hbone().policies(ALLOW_GET_ONLY));
    assert!(rig.curl("sleep", pod).is_err(), "L7-only ALLOW: sleep refused");
    assert!(rig.curl("notsleep", pod).is_err(), "L7-only ALLOW: notsleep refused");
}

#[test]
fn scenarios_7_8_11_12_reauthorization_non_mesh_client_and_operator_views() {
    if skip_without_netns("scenarios_7_8_11_12_reauthorization_non_mesh_client_and_operator_views") {
        return;
    }
    // Certificates live 6 s here, so they renew (at half-life) while the test runs.
    let mut rig = Rig::new_with("c", &[("SECRET_TTL", "6s")]);
    rig.http_server("httpbin");
    rig.push(&Mesh {
        policies: ALLOW_ALL_SELECTED.into(),
        httpbin_policies: &["ambient-demo/allow-all"],
        ..Mesh::hbone()
    });
    let pod = pod_addr(&rig, "httpbin");

    // 12. Each node holds certificates for its own pods' identities only.
    let identities = |i: usize| -> Vec<String> {
        rig.wait_for_certificates(i, 2);
        let mut ids: Vec<String> = rig.dump(i)["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                c["identity"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("spiffe://cluster.local/ns/ambient-demo/sa/")
                    .to_string()
            })
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(identities(0), ["notsleep", "sleep"], "scenario 12, w1");
    assert_eq!(identities(1), ["httpbin", "sleep"], "scenario 12, w2 (sleep2 runs as sleep)");

    // 11. What an operator reads in config_dump (`istioctl proxy-config workloads|secrets`).
    let dump = rig.dump(1);
    let httpbin = dump["workloads"].as_array().unwrap().iter().find(|w| w["name"] == "httpbin").unwrap();
    for field in ["name", "namespace", "workloadIps", "node", "protocol"] {
        assert!(!httpbin[field].is_null(), "workload field {field}: {httpbin}");
    }
    assert_eq!(httpbin["node"], "w2");
    assert_eq!(httpbin["protocol"], "HBONE");
    // Policies, and which workloads reference them.
    assert_eq!(httpbin["authorizationPolicies"], serde_json::json!(["ambient-demo/allow-all"]), "{httpbin}");
    let policy = &dump["policies"][0];
    assert_eq!((&policy["name"], &policy["scope"]), (&"allow-all".into(), &"WorkloadSelector".into()), "{policy}");
    assert_eq!(dump["services"][0]["vips"], serde_json::json!([format!("/{VIP}")]));
    let cert = &dump["certificates"][0];
    for field in ["identity", "state"] {
        assert!(cert[field].is_string(), "certificate {field}");
    }
    for field in ["serialNumber", "validFrom", "expirationTime"] {
        assert!(cert["certChain"][0][field].is_string(), "certificate chain {field}: {cert}");
    }
    assert!(cert["rootCerts"].as_array().is_some_and(|r| !r.is_empty()));

    // 12, continued: certificates renew before expiry, and a connection open across the
    // renewal (on both ends) keeps working.
    let serial = |i: usize, sa: &str| {
        let dump = rig.dump(i);
        let c = dump["certificates"].as_array().unwrap().iter().find(|c| c["identity"] == spiffe(sa).as_str()).cloned();
        c.map(|c| c["certChain"][0]["serialNumber"].clone())
    };
    let (before_client, before_server) = (serial(0, "sleep"), serial(1, "httpbin"));
    let mut open = rig.in_pod("sleep", || HttpClient::connect(pod).unwrap());
    assert_eq!(open.get("/").unwrap().1, "httpbin\n");
    assert!(
        eventually(|| serial(0, "sleep") != before_client && serial(1, "httpbin") != before_server),
        "both certificates renewed"
    );
    assert_eq!(open.get("/after-the-renewal").unwrap().1, "httpbin\n", "the open connection survived");
    open.close();
    assert_eq!(rig.curl("sleep", pod).as_deref(), Ok("httpbin"), "new connections use the new certificates");

    // 7. A long-lived allowed connection (keep-alive requests) is closed soon after a DENY
    // policy arrives.
    let (tx, rx) = std::sync::mpsc::channel();
    let held = std::thread::scope(|scope| {
        let rig = &rig;
        let h = scope.spawn(move || {
            rig.in_pod("notsleep", move || {
                let mut c = HttpClient::connect(pod).unwrap();
                assert_eq!(c.get("/").unwrap().1, "httpbin\n");
                tx.send(()).unwrap();
                let started = Instant::now();
                while c.get("/").is_ok() && started.elapsed() < PATIENCE {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Instant::now()
            })
        });
        rx.recv().unwrap();
        let edited = Instant::now();
        rig.dir.write_config(&Mesh::hbone().policies(DENY_NOTSLEEP).yaml());
        let closed = h.join().unwrap();
        closed.saturating_duration_since(edited)
    });
    println!("scenario 7: the open connection was closed {held:?} after the policy edit");
    assert!(held < PATIENCE);
    assert!(rig.curl("notsleep", pod).is_err(), "and new ones are refused");
    assert_eq!(rig.curl("sleep", pod).as_deref(), Ok("httpbin"), "others still pass");

    // 8. A client outside the mesh (its node does not capture it) reaches the pod through
    // w2's plaintext capture (15006) while PERMISSIVE, and is refused once STRICT.
    let outsider = rig.add_outsider(0, "10.10.9.2");
    rig.push(&Mesh::hbone());
    assert_eq!(rig.in_outsider(outsider, || curl(pod)).as_deref(), Ok("httpbin"), "scenario 8: PERMISSIVE");
    let s = rig.scrape(1);
    let plaintext =
        [("reporter", "destination"), ("source_principal", "unknown"), ("connection_security_policy", "unknown")];
    assert!(counted(&s, "istio_tcp_connections_opened_total", &plaintext) >= 1.0);
    rig.push(&Mesh::hbone().policies(STRICT));
    assert!(rig.in_outsider(outsider, || curl(pod)).is_err(), "scenario 8: STRICT refuses plaintext");
    assert_eq!(rig.curl("sleep", pod).as_deref(), Ok("httpbin"), "mesh clients still pass under STRICT");
}

/// Clients in pod `from` fetch `to` on fresh connections, back to back, until `stop`: (answered,
/// failures).
fn keep_fetching(rig: &Rig, from: &str, to: SocketAddr, stop: &AtomicBool) -> (u32, Vec<String>) {
    rig.in_pod(from, || {
        let (mut ok, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            match curl(to) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    })
}

#[test]
fn scenarios_4_9_13_telemetry_an_hbone_speaking_client_and_restart() {
    if skip_without_netns("scenarios_4_9_13_telemetry_an_hbone_speaking_client_and_restart") {
        return;
    }
    // A short drain deadline: scenario 13 waits for it.
    let mut rig = Rig::new_with("d", &[("CONNECTION_TERMINATION_DEADLINE", "3s")]);
    rig.http_server("httpbin");
    rig.push(&Mesh::hbone());
    rig.wait_for_certificates(0, 2);
    rig.wait_for_certificates(1, 2);
    let pod = pod_addr(&rig, "httpbin");

    // 4. Telemetry on both nodes: identities, workloads, mTLS, and bytes equal to what the
    // application moved.
    let (sent, received) = rig.in_pod("sleep", || {
        let mut c = HttpClient::connect(pod).unwrap();
        let mut sent = 0;
        for _ in 0..3 {
            sent += c.request_bytes("/").len();
            assert_eq!(c.get("/").unwrap(), (200, "httpbin\n".into()));
        }
        c.close();
        (sent as f64, 3.0 * response_bytes("httpbin").len() as f64)
    });
    let base = |reporter: &'static str| {
        [
            ("reporter", reporter),
            ("source_workload", "sleep"),
            ("source_workload_namespace", "ambient-demo"),
            ("source_principal", "spiffe://cluster.local/ns/ambient-demo/sa/sleep"),
            ("destination_workload", "httpbin"),
            ("destination_principal", "spiffe://cluster.local/ns/ambient-demo/sa/httpbin"),
            ("destination_workload_namespace", "ambient-demo"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        assert!(
            eventually(|| counted(&rig.scrape(node), "istio_tcp_connections_closed_total", &base(reporter)) == 1.0),
            "scenario 4: {reporter} on node {node}"
        );
        let s = rig.scrape(node);
        assert_eq!(counted(&s, "istio_tcp_connections_opened_total", &base(reporter)), 1.0);
        assert_eq!(counted(&s, "istio_tcp_sent_bytes_total", &base(reporter)), sent, "{reporter} sent bytes");
        assert_eq!(counted(&s, "istio_tcp_received_bytes_total", &base(reporter)), received, "{reporter} received");
    }

    // 9. A client speaking HBONE itself (a sidecar: its node does not capture it) reaches
    // httpbin through w2's HBONE capture, STRICT on: it has an identity.
    rig.push(&Mesh::hbone().policies(STRICT));
    let me = rig.ca().issue(&spiffe("sleep").parse().unwrap(), SystemTime::now()).unwrap();
    let server_id = spiffe("httpbin").parse().unwrap();
    let sidecar = rig.add_outsider(0, "10.10.9.3");
    let httpbin_ip = rig.pod("httpbin").ip;
    let answer = rig.in_outsider(sidecar, move || {
        block_on(async move {
            let hbone: SocketAddr = format!("{httpbin_ip}:15008").parse().unwrap();
            let (mut send, driver) = hbone_connect(hbone, &me, &server_id).await;
            let (status, mut up, mut down) =
                request(&mut send, http::Method::CONNECT, &format!("{httpbin_ip}:80")).await;
            assert_eq!(status, http::StatusCode::OK);
            up.send_data(Bytes::from_static(b"GET / HTTP/1.1\r\nhost: httpbin\r\n\r\n"), false).unwrap();
            let mut got = Vec::new();
            while !got.ends_with(b"httpbin\n") {
                let chunk = down.data().await.unwrap().unwrap();
                got.extend_from_slice(&chunk);
            }
            // Done: end the stream and the connection (the proxy sees the sidecar leave).
            up.send_data(Bytes::new(), true).unwrap();
            while let Some(Ok(_)) = down.data().await {}
            drop((send, up, down));
            // Ended (a reset racing the close is fine: the stream's work is done).
            let closed = monoio::time::timeout(PATIENCE, driver).await;
            assert!(closed.is_ok(), "the sidecar's connection closed");
            if let Ok(Err(e)) = closed {
                println!("scenario 9: the sidecar's connection ended with {e}");
            }
            String::from_utf8_lossy(&got).into_owned()
        })
    });
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "scenario 9: {answer}");

    // 13. Restart of w2 (a DaemonSet rollout): the new proxy binds next to the old one, the
    // old one gets SIGTERM and drains; clients connecting all along see no failure, and a
    // connection open across the swap finishes its work.
    rig.push(&Mesh::hbone());
    // An idle connection through w2 that nobody closes: the drain deadline does.
    let mut idle = rig.in_pod("notsleep", || HttpClient::connect(pod).unwrap());
    assert_eq!(idle.get("/").unwrap().1, "httpbin\n");
    let mut old = rig.proxies[1].take().unwrap();
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel();
    let (churn, held, new) = std::thread::scope(|scope| {
        let (rig, stop) = (&rig, &stop);
        let churn = scope.spawn(move || keep_fetching(rig, "sleep", pod, stop));
        let held = scope.spawn(move || {
            rig.in_pod("notsleep", move || {
                let mut c = HttpClient::connect(pod).unwrap();
                assert_eq!(c.get("/").unwrap().1, "httpbin\n");
                tx.send(()).unwrap();
                // Keep talking while w2 drains.
                let mut n = 0;
                for _ in 0..25 {
                    assert_eq!(c.get("/during-the-drain").unwrap().1, "httpbin\n");
                    n += 1;
                    std::thread::sleep(Duration::from_millis(40));
                }
                c.close();
                n
            })
        });
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // The new proxy starts next to the old one; the node agent hands it every pod of the
        // node, and it binds each pod's listeners next to the old proxy's.
        let new = rig.spawn(1, "-new");
        rig.handover(1);
        assert!(rig.in_node(1, || eventually(rig_ready)), "the new proxy is ready");
        std::thread::sleep(Duration::from_millis(200));
        let term = Instant::now();
        old.terminate();
        assert!(old.wait(), "the old proxy drained and exited 0");
        println!("scenario 13: the old w2 proxy exited {:?} after SIGTERM", term.elapsed());
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        (churn.join().unwrap(), held.join().expect("scenario 13: the open connection kept working"), new)
    });
    assert!(old.log().contains("all workers drained; exiting"), "{}", old.log());
    assert!(old.log().contains("drain deadline reached; closing open connections"), "{}", old.log());
    assert!(idle.get("/").is_err(), "the idle connection was closed at the deadline");
    rig.proxies[1] = Some(new);
    let (ok, failed) = churn;
    println!(
        "scenario 13: {ok} connections across the restart, {} failed; {held} requests on the held one",
        failed.len()
    );
    assert!(failed.is_empty(), "connections failed during the restart: {:?}", &failed[..failed.len().min(5)]);
    assert!(ok >= 10, "the swap was exercised: {ok}");
    assert!(rig.in_node(1, || eventually(rig_ready)), "the new proxy answers readiness");
    assert_eq!(rig.curl("sleep", pod).as_deref(), Ok("httpbin"), "the new proxy serves");
}

#[test]
fn scenarios_9_10_another_hbone_implementation_and_a_waypoint() {
    if skip_without_netns("scenarios_9_10_another_hbone_implementation_and_a_waypoint") {
        return;
    }
    let mut rig = Rig::new("g");
    rig.http_server("httpbin");
    let ca = rig.ca();
    let cert = |sa: &str| Arc::new(ca.issue(&spiffe(sa).parse().unwrap(), SystemTime::now()).unwrap());
    let httpbin_ip = rig.pod("httpbin").ip;
    // The waypoint runs behind w1 and a node of another implementation (with its pod) behind
    // w2; neither is captured: both serve HBONE on their own addresses.
    let (wp_ns, other_ns) = (rig.add_outsider(0, WAYPOINT_IP), rig.add_outsider(1, FOREIGN_IP));
    let to_httpbin = Upstream {
        hbone: format!("{httpbin_ip}:15008").parse().unwrap(),
        target: format!("{httpbin_ip}:80"),
        identity: spiffe("httpbin").parse().unwrap(),
    };
    let (wp_cert, routes) = (cert("waypoint"), HashMap::from([(format!("{VIP}:8000"), to_httpbin)]));
    let waypoint = rig.in_outsider(wp_ns, || {
        HbonePeer::start(format!("{WAYPOINT_IP}:15008").parse().unwrap(), "waypoint", wp_cert, routes)
    });
    let other_cert = cert("foreign");
    let other = rig.in_outsider(other_ns, || {
        HbonePeer::start(format!("{FOREIGN_IP}:15008").parse().unwrap(), "foreign", other_cert, HashMap::new())
    });
    rig.push(&Mesh { waypoint: true, foreign: true, ..Mesh::hbone() });
    rig.wait_for_certificates(0, 2);
    rig.wait_for_certificates(1, 2);

    // 9, second half: our w1 reaches a pod behind another HBONE implementation (tokio-rustls
    // and h2, none of our TLS or HBONE code): wire compatible as a client.
    let foreign: SocketAddr = format!("{FOREIGN_IP}:80").parse().unwrap();
    assert_eq!(rig.curl("sleep", foreign).as_deref(), Ok("foreign"), "scenario 9: our HBONE to another's");
    let seen = other.seen.recv_timeout(PATIENCE).unwrap();
    assert_eq!(seen.authority, format!("{FOREIGN_IP}:80"));
    assert_eq!(seen.client.map(|c| c.to_string()), Some(spiffe("sleep")));
    rig.log_line(0, &[&format!("proxy to {FOREIGN_IP}:80 using HBONE via {FOREIGN_IP}:15008")]);

    // 10. The service has a waypoint: w1 sends to it over HBONE with the VIP:port as the
    // authority; the waypoint's own HBONE reaches httpbin through w2.
    assert_eq!(rig.curl("sleep", vip()).as_deref(), Ok("httpbin"), "scenario 10: through the waypoint");
    let seen = waypoint.seen.recv_timeout(PATIENCE).unwrap();
    assert_eq!(seen.authority, format!("{VIP}:8000"), "the original VIP:port, not an endpoint");
    assert_eq!(seen.client.map(|c| c.to_string()), Some(spiffe("sleep")));
    rig.log_line(0, &[&format!("proxy to {VIP}:8000 using HBONE via {WAYPOINT_IP}:15008 type ToServerWaypoint")]);
    let line = rig
        .log_line(1, &[&format!("got CONNECT request to {httpbin_ip}:80"), &format!("peer_id={}", spiffe("waypoint"))]);
    println!("w2: {line}");
    let from_waypoint =
        [("reporter", "destination"), ("source_principal", "spiffe://cluster.local/ns/ambient-demo/sa/waypoint")];
    assert!(counted(&rig.scrape(1), "istio_tcp_connections_opened_total", &from_waypoint) >= 1.0);
    // Addressed to the pod itself: no waypoint (the workload has none), straight to w2.
    assert_eq!(rig.curl("sleep", pod_addr(&rig, "httpbin")).as_deref(), Ok("httpbin"));
    assert!(waypoint.seen.try_recv().is_err(), "the waypoint saw only the service's traffic");
}

fn cast_workloads() -> Vec<pwl::Workload> {
    PODS.iter()
        .filter(|(name, ..)| *name != "httpbin2")
        .map(|(name, node, ip)| {
            let sa = name.trim_end_matches('2');
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            let mut services = HashMap::new();
            if sa == "httpbin" {
                let ports = vec![pwl::Port { service_port: 8000, target_port: 80, app_protocol: 0 }];
                services
                    .insert("ambient-demo/httpbin.ambient-demo.svc.cluster.local".to_string(), pwl::PortList { ports });
            }
            pwl::Workload {
                namespace: "ambient-demo".into(),
                service_account: sa.into(),
                node: NODES[*node].0.into(),
                services,
                ..fake_istiod::workload(name, ip.octets(), true)
            }
        })
        .collect()
}

fn deny_notsleep() -> psec::Authorization {
    let principal = psec::StringMatch {
        match_type: Some(psec::string_match::MatchType::Exact("cluster.local/ns/ambient-demo/sa/notsleep".into())),
    };
    psec::Authorization {
        name: "deny-notsleep".into(),
        namespace: "ambient-demo".into(),
        scope: psec::Scope::Namespace as i32,
        action: psec::Action::Deny as i32,
        rules: vec![psec::Rule {
            clauses: vec![psec::Clause {
                matches: vec![psec::Match { principals: vec![principal], ..Default::default() }],
            }],
        }],
        ..Default::default()
    }
}

#[test]
fn scenario_14_istiod_loss() {
    if skip_without_netns("scenario_14_istiod_loss") {
        return;
    }
    // Both nodes are configured by a fake istiod (xDS and CA) on w1's node address.
    let mut rig = Rig::network("h");
    let mut istiod = rig.in_node(0, || Istiod::start_at(format!("{}:15012", NODES[0].1).parse().unwrap()));
    istiod.fake.push_workloads(cast_workloads());
    istiod.fake.push_services(vec![pwl::Service {
        name: "httpbin".into(),
        namespace: "ambient-demo".into(),
        hostname: "httpbin.ambient-demo.svc.cluster.local".into(),
        addresses: vec![pwl::NetworkAddress {
            network: String::new(),
            address: VIP.parse::<std::net::Ipv4Addr>().unwrap().octets().to_vec(),
            length: None,
        }],
        ports: vec![pwl::Port { service_port: 8000, target_port: 80, app_protocol: 0 }],
        ..Default::default()
    }]);
    let (root, token) = (rig.dir.0.join("istiod-root.pem"), rig.dir.0.join("istio-token"));
    std::fs::write(&root, &istiod.root_pem).unwrap();
    std::fs::write(&token, "a projected service account token").unwrap();
    rig.start(&[
        ("XDS_ADDRESS", istiod.url()),
        ("XDS_ROOT_CA", root.display().to_string()),
        ("ALT_XDS_HOSTNAME", istiod.hostname.into()),
        ("AUTH_TOKEN", token.display().to_string()),
    ]);
    rig.http_server("httpbin");
    rig.wait_for_certificates(0, 2);
    rig.wait_for_certificates(1, 2);
    let pod = pod_addr(&rig, "httpbin");
    assert_eq!(rig.curl("sleep", vip()).as_deref(), Ok("httpbin"), "configured by istiod, over HBONE");
    // A connection that stays open through the outage (a socket keeps its namespace).
    let mut held = rig.in_pod("sleep", || HttpClient::connect(pod).unwrap());
    assert_eq!(held.get("/").unwrap().1, "httpbin\n");

    // istiod goes away: traffic keeps flowing on the last config, open and new connections.
    istiod.stop();
    for i in 0..2 {
        assert!(eventually(|| rig.dump(i)["xds"]["status"]["connected"] == false), "node {i} noticed");
        rig.log_line(i, &["xDS connection ended", "retry_in="]);
    }
    assert_eq!(held.get("/during-the-outage").unwrap().1, "httpbin\n");
    assert_eq!(rig.curl("sleep", vip()).as_deref(), Ok("httpbin"), "new connections on the last config");
    assert_eq!(rig.curl("notsleep", pod).as_deref(), Ok("httpbin"));
    assert!(rig.in_node(1, rig_ready), "still ready on the last good config");

    // A policy is written while istiod is away; it applies when istiod comes back and the
    // nodes reconnect (with backoff).
    istiod.fake.push_policies(vec![deny_notsleep()]);
    rig.in_node(0, || istiod.restart());
    for i in 0..2 {
        assert!(eventually(|| rig.dump(i)["xds"]["status"]["connected"] == true), "node {i} reconnected");
    }
    assert!(eventually(|| rig.curl("notsleep", pod).is_err()), "the new policy applies");
    assert_eq!(rig.curl("sleep", pod).as_deref(), Ok("httpbin"));
    assert_eq!(held.get("/after-the-outage").unwrap().1, "httpbin\n");
    held.close();
    for i in 0..2 {
        let s = rig.scrape(i);
        assert!(counted(&s, "istio_xds_connection_terminations_total", &[]) >= 1.0, "node {i} counted the loss");
    }
}

/// `/etc/netns/<ns>/resolv.conf` (what `ip netns exec` shows the pod as its resolv.conf),
/// removed on drop.
struct PodResolvConf(std::path::PathBuf);

impl PodResolvConf {
    fn write(ns: &str, text: &str) -> PodResolvConf {
        let dir = std::path::PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        PodResolvConf(dir)
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dns_of_every_pod_through_istio_cni_capture() {
    if skip_without_netns("dns_of_every_pod_through_istio_cni_capture") {
        return;
    }
    // The cluster's DNS, as the proxy's own resolv.conf names it: a stand-in on w1's node
    // address, which pods on both nodes can reach.
    let mut rig = Rig::network("k");
    let upstream = rig.in_node(0, || UpstreamDns::start(format!("{}:53", NODES[0].1).parse().unwrap()));
    let resolv = rig.dir.0.join("node-resolv.conf");
    std::fs::write(&resolv, format!("nameserver {}\noptions timeout:2 attempts:2\n", NODES[0].1)).unwrap();
    let config = rig.dir.write_config(&Mesh::hbone().yaml());
    rig.start(&[
        ("LOCAL_XDS_PATH", config.display().to_string()),
        ("XDS_ADDRESS", String::new()),
        ("ZTUNNEL_RESOLV_CONF", resolv.display().to_string()),
    ]);
    // The pods' resolv.conf as Kubernetes writes it; the nameserver address does not matter:
    // istio-cni sends every query to port 53 to the proxy's 15053 in the pod.
    let pod_conf = "search ambient-demo.svc.cluster.local svc.cluster.local cluster.local\n\
                    nameserver 10.96.0.53\noptions ndots:5 timeout:2 attempts:2\n";
    let _confs: Vec<PodResolvConf> =
        ["sleep", "sleep2"].iter().map(|p| PodResolvConf::write(&rig.pod(p).ns.0, pod_conf)).collect();
    let resolve = |pod: &str, name: &str| -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &rig.pod(pod).ns.0, "getent", "ahostsv4", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("")
            .to_string()
    };
    for pod in ["sleep", "sleep2"] {
        assert_eq!(resolve(pod, "httpbin.ambient-demo.svc.cluster.local"), VIP, "{pod}: the service's FQDN");
        assert_eq!(resolve(pod, "httpbin"), VIP, "{pod}: the short name");
        assert_eq!(resolve(pod, "httpbin.ambient-demo"), VIP, "{pod}: name.namespace");
        assert_eq!(resolve(pod, "outside.example"), "203.0.113.7", "{pod}: an outside name, forwarded");
        assert_eq!(resolve(pod, "nothing.example"), "", "{pod}: NXDOMAIN passes through");
    }
    assert!(upstream.queries.load(std::sync::atomic::Ordering::Relaxed) > 0, "forwarded names reached the upstream");
    for i in 0..2 {
        let s = rig.scrape(i);
        assert!(counted(&s, "istio_dns_requests_total", &[("request_query_type", "a")]) >= 4.0, "node {i} counts DNS");
        assert!(counted(&s, "istio_dns_upstream_requests_total", &[]) >= 1.0, "node {i} counts forwarded queries");
    }
}

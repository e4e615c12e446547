//! deploy/: the manifests carry what a cluster needs (checked field by field, and the proxy's own
//! config parser accepts the environment they set): the in-pod DaemonSet is what Istio's chart
//! installs; the node-capture alternative's redirection script installs and removes its rules
//! cleanly (as root, in a scratch network namespace).

mod common;

use std::collections::HashMap;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;
use ztunnel::config::{Config, Source};

const INPOD_MANIFEST: &str = include_str!("../deploy/ztunnel.yaml");
const MANIFEST: &str = include_str!("../deploy/node-capture/ztunnel-node.yaml");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/node-capture/ztunnel-redirect.sh");

fn parse(manifest: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(manifest)
        .map(|d| Value::deserialize(d).expect("every document is valid YAML"))
        .collect()
}

fn documents() -> Vec<Value> {
    parse(MANIFEST)
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("a {kind} in the manifest"))
}

/// A container's environment, downward-API values standing in as the kubelet would fill them.
fn environment(c: &Value) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"], &e["valueFrom"]["resourceFieldRef"]) {
            (Value::String(v), _, _) => v.clone(),
            (_, Value::String(path), _) if path == "status.podIP" => "10.0.0.7".into(),
            (_, Value::String(_), _) => "from-the-downward-api".into(),
            // limits.cpu with no limit set: the node's allocatable CPUs, rounded up.
            (_, _, Value::Object(_)) => "4".into(),
            _ => panic!("env {name} has no value"),
        };
        env.insert(name, value);
    }
    env
}

/// What COMPAT.md says Istio's ztunnel chart installs (ambient profile, defaults): the in-pod
/// manifest is the same pod, so either installs this proxy the same way.
#[test]
fn the_inpod_daemonset_is_what_istios_chart_installs() {
    let docs = parse(INPOD_MANIFEST);
    for d in &docs {
        assert_eq!(d["metadata"]["namespace"], "istio-system");
    }
    let ds = kind(&docs, "DaemonSet");
    assert_eq!(ds["metadata"]["name"], "ztunnel", "istioctl ztunnel-config finds daemonset/ztunnel");
    assert_eq!(ds["spec"]["selector"]["matchLabels"], serde_json::json!({"app": "ztunnel"}));
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!((&rolling["maxSurge"], &rolling["maxUnavailable"]), (&1.into(), &0.into()));
    let meta = &ds["spec"]["template"]["metadata"];
    assert_eq!(meta["labels"]["app"], "ztunnel");
    assert_eq!(meta["labels"]["sidecar.istio.io/inject"], "false");
    assert_eq!(meta["labels"]["istio.io/dataplane-mode"], "none", "istio-cni must not capture the proxy itself");
    assert_eq!(meta["annotations"]["prometheus.io/scrape"], "true");
    assert_eq!(meta["annotations"]["prometheus.io/port"], "15020");
    let pod = &ds["spec"]["template"]["spec"];
    assert!(pod["hostNetwork"].is_null() || pod["hostNetwork"] == false, "no host network in in-pod mode");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], serde_json::json!([{"operator": "Exists"}]));
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    let c = &pod["containers"][0];
    assert_eq!(c["name"], "istio-proxy");
    assert_eq!(c["args"], serde_json::json!(["proxy", "ztunnel"]));
    assert_eq!(c["ports"], serde_json::json!([{"containerPort": 15020, "name": "ztunnel-stats", "protocol": "TCP"}]));
    assert_eq!(c["readinessProbe"]["httpGet"], serde_json::json!({"path": "/healthz/ready", "port": 15021}));
    assert_eq!(c["resources"]["requests"], serde_json::json!({"cpu": "200m", "memory": "512Mi"}));
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"], serde_json::json!({"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}));
    assert_eq!((&sc["runAsUser"], &sc["runAsGroup"]), (&0.into(), &1337.into()));
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let volume = |name: &str| {
        pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("volume {name}"))
    };
    assert_eq!(volume("istiod-ca-cert")["configMap"]["name"], "istio-ca-root-cert");
    let token = &volume("istio-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!((&token["audience"], &token["expirationSeconds"]), (&"istio-ca".into(), &43200.into()));
    assert_eq!(
        volume("cni-ztunnel-sock-dir")["hostPath"],
        serde_json::json!({"path": "/var/run/ztunnel", "type": "DirectoryOrCreate"})
    );
    assert!(volume("tmp")["emptyDir"].is_object());

    // The chart's environment through the proxy's own parser: in-pod mode, istiod by a
    // scheme-less address, the drain deadline from the grace period.
    let env = environment(c);
    let get = |k: &str| env.get(k).cloned();
    let cfg = Config::from_source(&Source::new(&get)).expect("the chart's environment is a valid config");
    assert!(cfg.inpod);
    assert_eq!(cfg.xds_address.as_deref(), Some("https://istiod.istio-system.svc:15012"));
    assert_eq!(cfg.ca_address.as_deref(), Some("https://istiod.istio-system.svc:15012"));
    assert_eq!(cfg.termination_deadline, std::time::Duration::from_secs(25));
    assert_eq!(cfg.worker_threads, 4, "one worker per CPU");
    let mounted = |path: &std::path::Path| {
        c["volumeMounts"].as_array().unwrap().iter().any(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
    };
    for path in [cfg.inpod_uds.as_path(), std::path::Path::new(&cfg.xds_root_ca), cfg.auth_token.as_deref().unwrap()] {
        assert!(mounted(path), "{} is mounted", path.display());
    }
}

#[test]
fn the_node_capture_daemonset_has_what_a_node_proxy_needs() {
    let docs = documents();
    for d in &docs {
        assert!(d["apiVersion"].is_string() && d["metadata"]["name"].is_string(), "{d}");
        assert_eq!(d["metadata"]["namespace"], "istio-system");
    }
    for k in ["ServiceAccount", "Role", "RoleBinding", "ConfigMap"] {
        kind(&docs, k);
    }
    let ds = kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]["app"].as_str().map(|a| serde_json::json!({"app": a})).unwrap()
    );
    assert_eq!(pod["hostNetwork"], true, "shared mode runs in the node's network namespace");
    // A rollout starts the new pod next to the old one. Declared ports would be hostPorts on a
    // host-network pod, and the scheduler refuses a second pod with the same hostPorts.
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!((&rolling["maxSurge"], &rolling["maxUnavailable"]), (&1.into(), &0.into()));
    for ctr in pod["containers"].as_array().unwrap().iter().chain(pod["initContainers"].as_array().unwrap()) {
        assert!(ctr["ports"].is_null(), "no declared (host) ports: {}", ctr["ports"]);
    }
    assert_eq!(pod["serviceAccountName"], "ztunnel");
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15020");
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    // Least privilege: exactly what the redirection and transparent sockets need.
    for ctr in [c, &pod["initContainers"][0]] {
        assert_eq!(ctr["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(ctr["securityContext"]["capabilities"]["add"], serde_json::json!(["NET_ADMIN", "NET_RAW"]));
    }
    let init = &pod["initContainers"][0]["command"];
    assert_eq!(init, &serde_json::json!(["/usr/local/bin/ztunnel-redirect.sh", "add"]));
    // Istio's token (audience istio-ca) and root CA, mounted where the env vars point.
    let volumes = pod["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v["name"] == "istio-token").unwrap();
    assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], "istio-ca");
    let root = volumes.iter().find(|v| v["name"] == "istiod-ca-cert").unwrap();
    assert_eq!(root["configMap"]["name"], "istio-ca-root-cert");

    // The environment: the proxy's own parser accepts it (downward-API values stand in).
    let env = environment(c);
    for var in [
        "XDS_ADDRESS",
        "CA_ADDRESS",
        "XDS_ROOT_CA",
        "AUTH_TOKEN",
        "NODE_NAME",
        "CLUSTER_ID",
        "POD_NAME",
        "POD_NAMESPACE",
        "INSTANCE_IP",
    ] {
        assert!(env.contains_key(var), "{var} is set");
    }
    let get = |k: &str| env.get(k).cloned();
    let cfg = Config::from_source(&Source::new(&get)).expect("the manifest's environment is a valid config");
    assert!(!cfg.inpod, "node-level capture");
    assert_eq!(cfg.node_name.as_deref(), Some("from-the-downward-api"));
    assert_eq!(cfg.auth_token.as_deref(), Some(std::path::Path::new("/var/run/secrets/tokens/istio-token")));
    let mounted = |path: &str| {
        c["volumeMounts"].as_array().unwrap().iter().any(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
    };
    assert!(mounted(&cfg.xds_root_ca) && mounted(cfg.auth_token.as_ref().unwrap().to_str().unwrap()));
    // Draining ends before Kubernetes kills the pod.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(cfg.termination_deadline.as_secs() < grace, "{:?} < {grace}s", cfg.termination_deadline);
    // The script's mark is the proxy's.
    let init_env = pod["initContainers"][0]["env"].as_array().unwrap();
    let script_mark = init_env.iter().find(|e| e["name"] == "PACKET_MARK").unwrap()["value"].as_str().unwrap();
    assert_eq!(Some(script_mark.parse::<u32>().unwrap()), cfg.packet_mark);
}

#[test]
fn the_uninstall_daemonset_removes_the_rules_on_every_node() {
    let docs: Vec<Value> =
        serde_yaml_ng::Deserializer::from_str(include_str!("../deploy/node-capture/ztunnel-uninstall.yaml"))
            .map(|d| Value::deserialize(d).expect("valid YAML"))
            .collect();
    assert_eq!(docs.len(), 1);
    let ds = kind(&docs, "DaemonSet");
    assert_eq!(ds["metadata"]["namespace"], "istio-system");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "the rules live in the node's network namespace");
    assert_eq!(pod["tolerations"], serde_json::json!([{"operator": "Exists"}]), "every node, as the proxy");
    let remove = &pod["initContainers"][0];
    assert_eq!(remove["command"], serde_json::json!(["/usr/local/bin/ztunnel-redirect.sh", "remove"]));
    assert_eq!(remove["securityContext"]["capabilities"]["add"], serde_json::json!(["NET_ADMIN", "NET_RAW"]));
    // The same image as the proxy's (the script ships in it).
    let install = kind(&documents(), "DaemonSet")["spec"]["template"]["spec"]["initContainers"][0]["image"].clone();
    assert_eq!(remove["image"], install);
    assert_eq!(pod["containers"][0]["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
}

#[test]
fn the_redirection_script_installs_and_removes_its_rules() {
    let syntax = Command::new("sh").args(["-n", SCRIPT]).status().unwrap();
    assert!(syntax.success(), "the script parses");
    if common::skip_without_netns("running the redirection script") {
        return;
    }
    let ns = format!("zt-deploy-{}", std::process::id());
    perf::netns::sh("ip", &["netns", "add", &ns]).unwrap();
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = perf::netns::sh("ip", &["netns", "del", &self.0]);
        }
    }
    let _del = Del(ns.clone());
    perf::netns::sh("ip", &["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]).unwrap();
    let run = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &ns, "env", "POD_CIDRS=10.244.0.0/16 fd00:10:244::/48"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = |args: &[&str]| String::from_utf8_lossy(&run(args).stdout).to_string();
    assert!(!run(&["sh", SCRIPT, "check"]).status.success(), "nothing installed yet");
    let added = run(&["sh", SCRIPT, "add"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    // Idempotent: a second add replaces the first, hooking its chains in before the first's
    // go (traced: at no step is the pod traffic left uncaptured).
    let again = run(&["sh", "-x", SCRIPT, "add"]);
    assert!(again.status.success());
    let trace = String::from_utf8_lossy(&again.stderr);
    let step = |what: &str| trace.find(what).unwrap_or_else(|| panic!("{what} in the trace:\n{trace}"));
    assert!(
        step("-A PREROUTING -j ZTUNNEL-PREROUTING-NEXT") < step("-D PREROUTING -j ZTUNNEL-PREROUTING\n"),
        "the new rules are in before the old go:\n{trace}"
    );
    assert!(run(&["sh", SCRIPT, "check"]).status.success());
    let rules = out(&["iptables-save", "-t", "mangle"]);
    for want in
        ["--on-port 15001", "--on-port 15006", "--on-port 15008", "--mark 0x539 -j RETURN", "CONNMARK --save-mark"]
    {
        assert!(rules.contains(want), "{want} in\n{rules}");
    }
    assert_eq!(rules.matches("-A PREROUTING -j ZTUNNEL-PREROUTING").count(), 1, "installed once");
    assert_eq!(rules.matches("-A OUTPUT -j ZTUNNEL-OUTPUT").count(), 1, "installed once");
    assert!(!rules.contains("NEXT"), "the re-install's chains took the place of the first ones:\n{rules}");
    assert_eq!(out(&["ip", "rule"]).matches("lookup 133").count(), 1, "one routing rule");
    assert!(out(&["ip", "rule"]).contains("lookup 133"));
    let rules6 = out(&["ip6tables-save", "-t", "mangle"]);
    assert!(rules6.contains("fd00:10:244::/48") && rules6.contains("--on-port 15001"), "IPv6 pods too:\n{rules6}");
    assert!(out(&["ip", "-6", "rule"]).contains("lookup 133"));
    assert_eq!(out(&["sysctl", "-n", "net.ipv4.tcp_migrate_req"]).trim(), "1");
    // A re-install with other ranges replaces the rules (the IPv6 ones go with the range).
    let v4_only = Command::new("ip")
        .args(["netns", "exec", &ns, "env", "POD_CIDRS=10.245.0.0/16", "sh", SCRIPT, "add"])
        .output()
        .unwrap();
    assert!(v4_only.status.success(), "{}", String::from_utf8_lossy(&v4_only.stderr));
    let rules = out(&["iptables-save", "-t", "mangle"]);
    assert!(rules.contains("10.245.0.0/16") && !rules.contains("10.244.0.0/16"), "{rules}");
    assert!(!out(&["ip6tables-save", "-t", "mangle"]).contains("ZTUNNEL"));
    assert!(run(&["sh", SCRIPT, "remove"]).status.success());
    assert!(!run(&["sh", SCRIPT, "check"]).status.success(), "removed");
    assert!(!out(&["iptables-save", "-t", "mangle"]).contains("ZTUNNEL"));
    assert!(!out(&["ip", "rule"]).contains("lookup 133"));
    assert!(!out(&["ip6tables-save", "-t", "mangle"]).contains("ZTUNNEL"));
    assert!(!out(&["ip", "-6", "rule"]).contains("lookup 133"));
}

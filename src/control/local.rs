//! The standalone config source: a YAML file (`LOCAL_XDS_PATH`) in Istio ztunnel's format,
//! watched for changes. Runs on the control thread.
//!
//! A file is accepted whole or not at all: any error leaves the last good snapshot in place.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use serde::Deserialize;

use crate::model::{Authorization, ConfigState, Service, Workload};

#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// The file's top level. Each list may be omitted.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalConfig {
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default)]
    policies: Vec<Authorization>,
    #[serde(default)]
    services: Vec<Service>,
}

fn invalid(field: String, reason: impl Into<String>) -> LocalConfigError {
    LocalConfigError::Invalid { field, reason: reason.into() }
}

/// Parses and validates a config document. Errors name the field path (`workloads[1].protocol`).
pub fn parse(yaml: &str) -> Result<ConfigState, LocalConfigError> {
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(yaml).map_err(|e| LocalConfigError::Parse(e.to_string()))?;
    if value.is_null() {
        return Ok(ConfigState::default());
    }
    let cfg: LocalConfig = serde_yaml_ng::from_str(yaml).map_err(|e| LocalConfigError::Parse(e.to_string()))?;
    let mut state = ConfigState { workloads: cfg.workloads, services: cfg.services, policies: cfg.policies };

    let mut uids: HashMap<String, usize> = HashMap::new();
    for (i, wl) in state.workloads.iter_mut().enumerate() {
        if wl.namespace.is_empty() {
            return Err(invalid(format!("workloads[{i}].namespace"), "must not be empty"));
        }
        if wl.uid.is_empty() {
            // Istio's file format lets uid default to empty; give each such workload a stable one.
            if wl.name.is_empty() {
                return Err(invalid(format!("workloads[{i}]"), "needs a uid or a name"));
            }
            wl.uid = format!("{}/{}", wl.namespace, wl.name);
        }
        if let Some(j) = uids.insert(wl.uid.clone(), i) {
            return Err(invalid(
                format!("workloads[{i}].uid"),
                format!("{:?} is already used by workloads[{j}]", wl.uid),
            ));
        }
        for ip in wl.workload_ips.iter_mut() {
            *ip = ip.to_canonical();
        }
        if wl.workload_ips.is_empty() && wl.hostname.is_empty() {
            return Err(invalid(format!("workloads[{i}].workloadIps"), "a workload needs an address (or a hostname)"));
        }
        for p in &wl.authorization_policies {
            if p.split_once('/').is_none_or(|(ns, n)| ns.is_empty() || n.is_empty()) {
                return Err(invalid(
                    format!("workloads[{i}].authorizationPolicies"),
                    format!("{p:?} is not namespace/name"),
                ));
            }
        }
    }
    let mut services = HashMap::new();
    for (i, svc) in state.services.iter().enumerate() {
        for (field, v) in [("name", &svc.name), ("namespace", &svc.namespace), ("hostname", &svc.hostname)] {
            if v.is_empty() {
                return Err(invalid(format!("services[{i}].{field}"), "must not be empty"));
            }
        }
        if let Some(j) = services.insert(svc.namespaced_hostname(), i) {
            return Err(invalid(
                format!("services[{i}].hostname"),
                format!("{} is already defined by services[{j}]", svc.namespaced_hostname()),
            ));
        }
        if let Some(port) = svc.ports.keys().find(|p| **p == 0) {
            return Err(invalid(format!("services[{i}].ports"), format!("service port {port} is not a valid port")));
        }
    }
    let mut policies = HashMap::new();
    for (i, p) in state.policies.iter().enumerate() {
        if p.name.is_empty() || p.namespace.is_empty() {
            return Err(invalid(format!("policies[{i}]"), "name and namespace must not be empty"));
        }
        if let Some(j) = policies.insert(p.key(), i) {
            return Err(invalid(
                format!("policies[{i}].name"),
                format!("{} is already defined by policies[{j}]", p.key()),
            ));
        }
    }
    Ok(state)
}

/// What identifies a version of the file without reading it. Follows symlinks, so a
/// Kubernetes ConfigMap update (an atomic symlink swap) is seen too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

pub fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp { modified: m.modified().ok(), len: m.len(), inode: m.ino() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, GatewayDestination, PolicyScope, Protocol, StringMatch};

    /// The shape of Istio ztunnel's published `examples/localhost.yaml`, written out by hand.
    const ISTIO_LOCALHOST: &str = r#"
# A workload on localhost speaking HBONE and one speaking TCP, two services, a policy.
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  services:
    "default/example.com":
      80: 8080
    "default/example2.com":
      80: 8080
- uid: cluster1//v1/Pod/default/local-tcp
  name: local-tcp
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  node: local
  network: ""
  services:
    "default/example.com":
      80: 8080
    "default/example2.com":
      80: 8080
policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
    name: deny-9999
    namespace: default
    scope: Namespace
services:
- name: local
  namespace: default
  hostname: example.com
  vips:
    - /127.10.0.1
  ports:
    80: 8080
  subjectAltNames:
   - spiffe://cluster.local/ns/default/sa/local
- name: remote
  namespace: default
  hostname: example2.com
  vips:
    - remote/127.10.0.2
  ports:
    80: 8080
"#;

    #[test]
    fn istio_example_loads_unchanged() {
        let s = parse(ISTIO_LOCALHOST).unwrap();
        assert_eq!(s.workloads.len(), 2);
        assert_eq!(s.workloads[0].protocol, Protocol::HBONE);
        assert_eq!(s.workloads[1].workload_ips, vec!["127.0.0.2".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(s.workloads[1].services.len(), 2);
        assert_eq!(s.services[1].vips[0].network, "remote");
        assert_eq!(s.policies[0].action, Action::Allow);
        assert_eq!(s.policies[0].scope, PolicyScope::Namespace);
        assert_eq!(s.policies[0].rules[0][0][0].not_destination_ports, vec![9999]);
        assert!(!s.policies[0].dry_run);
    }

    #[test]
    fn full_workload_and_policy_fields() {
        let s = parse(
            r#"
workloads:
- uid: u1
  name: w
  namespace: ns
  workloadIps: ["10.0.0.1", "fd00::1"]
  waypoint: {destination: "/10.0.0.9", hboneMtlsPort: 15008}
  networkGateway: {destination: "ns/gw.ns.svc", hboneMtlsPort: 15008}
  applicationTunnel: {protocol: PROXY, port: 15088}
  locality: {region: r, zone: z, subzone: s}
  capacity: 2
  status: Unhealthy
  workloadType: deployment
  canonicalName: app
  canonicalRevision: v1
  authorizationPolicies: [ns/p1]
  clusterId: c1
  nativeTunnel: true
  networkMode: HostNetwork
policies:
- name: p1
  namespace: ns
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - principals: [!Exact cluster.local/ns/ns/sa/a, !Prefix cluster.local/ns/x]
        namespaces: [!Suffix prod, !Presence []]
        sourceIps: [10.0.0.0/8]
        notDestinationIps: ["fd00::/64"]
        serviceAccounts: [{namespace: ns, serviceAccount: sa}]
        destinationPorts: [80, 443]
"#,
        )
        .unwrap();
        let w = &s.workloads[0];
        assert!(matches!(w.waypoint.as_ref().unwrap().destination, GatewayDestination::Address(_)));
        assert!(matches!(w.network_gateway.as_ref().unwrap().destination, GatewayDestination::Hostname(_)));
        assert_eq!(w.capacity, 2);
        assert_eq!(w.workload_ips.len(), 2);
        let m = &s.policies[0].rules[0][0][0];
        assert_eq!(m.principals[1], StringMatch::Prefix("cluster.local/ns/x".into()));
        assert_eq!(m.source_ips[0].prefix, 8);
        assert!(s.policies[0].dry_run);
    }

    fn err(yaml: &str) -> String {
        parse(yaml).unwrap_err().to_string()
    }

    #[test]
    fn bad_input_names_the_field() {
        let e = err("workloads:\n- namespace: ns\n  workloadIps: [10.0.0.1]\n  bogus: 1\n");
        assert!(e.contains("bogus") && e.contains("workloads[0]"), "{e}");
        let e = err("workloads:\n- namespace: ns\n  name: a\n  workloadIps: [10.0.0.300]\n");
        assert!(e.contains("workloads[0].workloadIps[0]"), "{e}");
        let e = err("workloads:\n- namespace: ns\n  name: a\n  workloadIps: [10.0.0.1]\n  protocol: QUIC\n");
        assert!(e.contains("workloads[0].protocol") && e.contains("QUIC"), "{e}");
        let e = err("workloads:\n- name: a\n  workloadIps: [10.0.0.1]\n");
        assert!(e.contains("namespace"), "{e}");
        let e = err("services:\n- {name: s, namespace: ns, hostname: h, vips: [\"10.0.0.1\"], ports: {80: 80}}\n");
        assert!(e.contains("services[0].vips") && e.contains("network/ip"), "{e}");
        let e = err("services:\n- {name: s, namespace: ns, hostname: h, vips: [], ports: {80: 99999}}\n");
        assert!(e.contains("services[0].ports"), "{e}");
        let e = err("topLevel: 1\n");
        assert!(e.contains("topLevel"), "{e}");
        let e = err("policies:\n- {name: p, namespace: ns, scope: Namespace, action: Maybe}\n");
        assert!(e.contains("policies[0].action"), "{e}");
        let e = err(
            "policies:\n- {name: p, namespace: ns, scope: Namespace, action: Allow, rules: [[[{sourceIps: [10.0.0.0/40]}]]]}\n",
        );
        assert!(e.contains("sourceIps") && e.contains("prefix"), "{e}");
        let dup = "workloads:\n- {uid: x, namespace: ns, workloadIps: [10.0.0.1]}\n- {uid: x, namespace: ns, workloadIps: [10.0.0.2]}\n";
        assert!(err(dup).contains("workloads[1].uid"), "{}", err(dup));
        assert!(err("workloads: [").contains("line"), "syntax errors carry a position");
    }

    #[test]
    fn empty_document_is_empty_config() {
        let s = parse("# nothing yet\n").unwrap();
        assert!(s.workloads.is_empty() && s.services.is_empty() && s.policies.is_empty());
    }
}

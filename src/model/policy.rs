//! L4 authorization policies as data. Evaluation lives in `rbac` (with the authorization issue);
//! here only the shape, shared by the config file, xDS and `config_dump`.

use serde::{Deserialize, Serialize};

use super::addr::IpNet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyScope {
    /// Every workload in the mesh.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads that name the policy in `authorizationPolicies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

/// A string comparison; in YAML a tag (`!Exact foo`), in JSON `{"Exact": "foo"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence(),
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence() => !value.is_empty(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// One match: every non-empty field must match (values OR'ed), and no `not*` value may.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RbacMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Set when istiod sent something in this match that the proxy does not understand (an
    /// extension, a string match of a kind it does not know, a malformed address): such a match
    /// fails closed (see `rbac`). Never read from the config file, shown in `config_dump`.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub not_understood: Option<String>,
}

impl RbacMatch {
    /// No condition at all (every field empty).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: Action,
    /// Rules (OR) of clauses (AND) of matches (OR).
    #[serde(default)]
    pub rules: Vec<Vec<Vec<RbacMatch>>>,
    #[serde(default)]
    pub dry_run: bool,
}

impl Authorization {
    /// The key workloads use in `authorizationPolicies`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_match_yaml_tags_and_json() {
        let m: Vec<StringMatch> =
            serde_yaml_ng::from_str("- !Exact a\n- !Prefix b\n- !Suffix c\n- !Presence []\n").unwrap();
        assert_eq!(
            m,
            vec![
                StringMatch::Exact("a".into()),
                StringMatch::Prefix("b".into()),
                StringMatch::Suffix("c".into()),
                StringMatch::Presence()
            ]
        );
        assert_eq!(serde_json::to_string(&m[0]).unwrap(), r#"{"Exact":"a"}"#);
        assert!(m[1].matches("bcd") && !m[1].matches("abc"));
        assert!(m[2].matches("abc") && !m[2].matches("cab"));
        assert!(m[3].matches("x") && !m[3].matches(""));
    }
}

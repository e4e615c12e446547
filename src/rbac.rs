//! L4 authorization, pure: the policies that apply to a destination workload and a connection's
//! facts in, a decision out. No I/O; the callers log and enforce.
//!
//! Semantics (COMPAT.md, as Istio's ztunnel): any matching DENY denies; else no ALLOW policy
//! allows; else a matching ALLOW allows; else deny. Dry-run policies never decide (they are
//! reported so the caller can log them). A policy matches when any rule matches; a rule when all
//! its clauses match; a clause when any of its matches matches; a match when each non-empty field
//! has a matching value and no `not*` value matches.
//!
//! The edge cases, where silence once let everyone in:
//! - no rules: the policy matches nothing (Istio);
//! - a rule with no clauses, or a clause with no matches: matches everything (Istio);
//! - a match with no condition (`{}`), or one carrying something this proxy does not understand
//!   (`not_understood`): fails closed. It never matches in an ALLOW policy (it cannot widen
//!   one) and always matches in a DENY policy. Istio's ztunnel skips an empty match in both;
//!   matching it in DENY is the safer reading of a condition we cannot evaluate.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::{Action, Authorization, Identity, IpNet, RbacMatch, ServiceAccountMatch, StringMatch};

/// What authorization knows of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    /// The client's address (the TCP peer).
    pub src_ip: IpAddr,
    /// The peer's SPIFFE identity (HBONE); none for plaintext.
    pub identity: Option<Identity>,
    /// The real target: pod IP and target port (not 15008).
    pub dst: SocketAddr,
}

impl Conn {
    /// The principal as policies spell it: the identity without `spiffe://`, or "".
    fn principal(&self) -> String {
        self.identity
            .as_ref()
            .map(|i| format!("{}/ns/{}/sa/{}", i.trust_domain, i.namespace, i.service_account))
            .unwrap_or_default()
    }

    fn namespace(&self) -> &str {
        self.identity.as_ref().map(|i| i.namespace.as_str()).unwrap_or("")
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// A DENY policy matched (its `namespace/name`).
    ByPolicy(String),
    /// ALLOW policies exist and none matched.
    NotAllowed,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::ByPolicy(p) => write!(f, "denied by policy {p}"),
            Denied::NotAllowed => f.write_str("allow policies exist and none matched"),
        }
    }
}

/// The outcome, with the dry-run policies that matched (to be logged, never enforced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: Result<(), Denied>,
    pub dry_run_matches: Vec<(String, Action)>,
}

/// Decides `conn` against the policies that apply to its destination workload.
pub fn authorize(policies: &[&Arc<Authorization>], conn: &Conn) -> Outcome {
    let mut dry_run_matches = Vec::new();
    let principal = conn.principal();
    let facts = Facts { conn, principal: &principal };
    let mut any_allow = false;
    let mut allowed = false;
    let mut denied = None;
    for p in policies {
        let matched = facts.policy_matches(p);
        if p.dry_run {
            if matched {
                dry_run_matches.push((p.key(), p.action));
            }
            continue;
        }
        match p.action {
            Action::Deny if matched && denied.is_none() => denied = Some(p.key()),
            Action::Deny => {}
            Action::Allow => {
                any_allow = true;
                allowed |= matched;
            }
        }
    }
    let result = match denied {
        Some(p) => Err(Denied::ByPolicy(p)),
        None if !any_allow || allowed => Ok(()),
        None => Err(Denied::NotAllowed),
    };
    Outcome { result, dry_run_matches }
}

struct Facts<'a> {
    conn: &'a Conn,
    principal: &'a str,
}

impl Facts<'_> {
    fn policy_matches(&self, p: &Authorization) -> bool {
        // See the module header for the empty cases.
        p.rules.iter().any(|rule| {
            rule.iter().all(|clause| clause.is_empty() || clause.iter().any(|m| self.match_matches(m, p.action)))
        })
    }

    fn match_matches(&self, m: &RbacMatch, action: Action) -> bool {
        if m.not_understood.is_some() || m.is_empty() {
            return action == Action::Deny;
        }
        let c = self.conn;
        let ns = c.namespace();
        let strings = |vals: &[StringMatch], v: &str| vals.iter().any(|s| s.matches(v));
        let nets = |vals: &[IpNet], ip: IpAddr| vals.iter().any(|n| n.contains(ip));
        let accounts = |vals: &[ServiceAccountMatch]| {
            c.identity.as_ref().is_some_and(|i| {
                vals.iter().any(|a| a.namespace == i.namespace && a.service_account == i.service_account)
            })
        };
        // A non-empty field needs a hit; any hit in a `not*` field refuses (an empty one has none).
        (m.namespaces.is_empty() || strings(&m.namespaces, ns))
            && !strings(&m.not_namespaces, ns)
            && (m.principals.is_empty() || strings(&m.principals, self.principal))
            && !strings(&m.not_principals, self.principal)
            && (m.source_ips.is_empty() || nets(&m.source_ips, c.src_ip))
            && !nets(&m.not_source_ips, c.src_ip)
            && (m.destination_ips.is_empty() || nets(&m.destination_ips, c.dst.ip()))
            && !nets(&m.not_destination_ips, c.dst.ip())
            && (m.destination_ports.is_empty() || m.destination_ports.contains(&c.dst.port()))
            && !m.not_destination_ports.contains(&c.dst.port())
            && (m.service_accounts.is_empty() || accounts(&m.service_accounts))
            && !accounts(&m.not_service_accounts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Arc<Authorization> {
        Arc::new(serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{e}: {yaml}")))
    }

    /// A policy with one rule, one clause, one match given as YAML flow mapping.
    fn one_match(action: &str, m: &str) -> Arc<Authorization> {
        policy(&format!("{{name: p, namespace: ns, scope: Namespace, action: {action}, rules: [[[{m}]]]}}"))
    }

    fn conn(identity: Option<&str>, src: &str, dst: &str) -> Conn {
        Conn { src_ip: src.parse().unwrap(), identity: identity.map(|i| i.parse().unwrap()), dst: dst.parse().unwrap() }
    }

    fn sleep() -> Conn {
        conn(Some("spiffe://cluster.local/ns/demo/sa/sleep"), "10.0.0.5", "10.0.1.8:8080")
    }

    fn allowed(policies: &[Arc<Authorization>], c: &Conn) -> bool {
        let refs: Vec<&Arc<Authorization>> = policies.iter().collect();
        authorize(&refs, c).result.is_ok()
    }

    #[test]
    fn every_field_and_its_negation() {
        let plain = conn(None, "192.168.1.1", "10.0.1.8:8080");
        // (match, matches sleep?, matches plaintext?)
        let table: &[(&str, bool, bool)] = &[
            // An empty match fails closed (never matches in ALLOW): see `empty_and_not_understood_matches_fail_closed`.
            ("{}", false, false),
            ("{namespaces: [!Exact demo]}", true, false),
            ("{namespaces: [!Exact other, !Prefix de]}", true, false),
            ("{notNamespaces: [!Exact demo]}", false, true),
            ("{principals: [!Exact cluster.local/ns/demo/sa/sleep]}", true, false),
            ("{principals: [!Exact spiffe://cluster.local/ns/demo/sa/sleep]}", false, false),
            ("{principals: [!Suffix /sa/sleep]}", true, false),
            ("{principals: [!Presence []]}", true, false),
            ("{notPrincipals: [!Presence []]}", false, true),
            ("{notPrincipals: [!Prefix cluster.local/ns/other/]}", true, true),
            ("{sourceIps: [10.0.0.0/24]}", true, false),
            ("{sourceIps: [10.0.0.5/32, 192.168.0.0/16]}", true, true),
            ("{notSourceIps: [10.0.0.0/8]}", false, true),
            ("{destinationIps: [10.0.1.8/32]}", true, true),
            ("{notDestinationIps: [10.0.1.0/24]}", false, false),
            ("{destinationPorts: [8080]}", true, true),
            ("{destinationPorts: [15008]}", false, false),
            ("{notDestinationPorts: [8080]}", false, false),
            ("{notDestinationPorts: [9090]}", true, true),
            ("{serviceAccounts: [{namespace: demo, serviceAccount: sleep}]}", true, false),
            ("{serviceAccounts: [{namespace: other, serviceAccount: sleep}]}", false, false),
            ("{notServiceAccounts: [{namespace: demo, serviceAccount: sleep}]}", false, true),
            // Fields AND within a match.
            ("{namespaces: [!Exact demo], destinationPorts: [9090]}", false, false),
            ("{namespaces: [!Exact demo], destinationPorts: [8080], sourceIps: [10.0.0.0/8]}", true, false),
        ];
        for (m, want_sleep, want_plain) in table {
            let p = one_match("Allow", m);
            assert_eq!(
                Facts { conn: &sleep(), principal: &sleep().principal() }.policy_matches(&p),
                *want_sleep,
                "{m} vs sleep"
            );
            assert_eq!(Facts { conn: &plain, principal: "" }.policy_matches(&p), *want_plain, "{m} vs plaintext");
        }
    }

    #[test]
    fn rule_clause_match_structure() {
        let c = sleep();
        let matches = |rules: &str| {
            let p = policy(&format!("{{name: p, namespace: ns, scope: Global, action: Allow, rules: {rules}}}"));
            Facts { conn: &c, principal: &c.principal() }.policy_matches(&p)
        };
        assert!(!matches("[]"), "no rules: matches nothing");
        assert!(matches("[[]]"), "a rule without clauses matches everything");
        assert!(matches("[[[]]]"), "a clause without matches matches everything, as in Istio");
        // Matches in a clause OR.
        assert!(matches("[[[{destinationPorts: [1]}, {destinationPorts: [8080]}]]]"));
        // Clauses in a rule AND.
        assert!(!matches("[[[{destinationPorts: [8080]}], [{namespaces: [!Exact other]}]]]"));
        assert!(matches("[[[{destinationPorts: [8080]}], [{namespaces: [!Exact demo]}]]]"));
        // Rules OR.
        assert!(matches("[[[{destinationPorts: [1]}]], [[{destinationPorts: [8080]}]]]"));
    }

    #[test]
    fn empty_and_not_understood_matches_fail_closed() {
        let c = sleep();
        let plain = conn(None, "10.0.0.9", "10.0.1.8:8080");
        let allow_empty = one_match("Allow", "{}");
        assert!(!allowed(std::slice::from_ref(&allow_empty), &c), "an empty match admits no one");
        assert!(!allowed(std::slice::from_ref(&allow_empty), &plain), "plaintext included");
        assert!(!allowed(&[one_match("Deny", "{}")], &c), "an empty match in DENY denies");
        let allow_sleep = one_match("Allow", "{principals: [!Suffix /sa/sleep]}");
        let mut unknown = (*allow_sleep).clone();
        unknown.rules[0][0][0].not_understood = Some("extensions [\"x\"]".into());
        assert!(!allowed(&[Arc::new(unknown.clone())], &c), "never matches in ALLOW, even where the known part would");
        unknown.action = Action::Deny;
        assert!(!allowed(&[Arc::new(unknown.clone()), allow_sleep.clone()], &c), "always matches in DENY");
        // Kept, not dropped: next to another ALLOW it narrows nothing and widens nothing.
        let mut unknown_allow = unknown;
        unknown_allow.action = Action::Allow;
        assert!(allowed(&[Arc::new(unknown_allow.clone()), allow_sleep], &c));
        assert!(!allowed(&[Arc::new(unknown_allow)], &plain), "the ALLOW still exists, so others are refused");
    }

    #[test]
    fn decision_order_and_dry_run() {
        let c = sleep();
        let allow_sleep = one_match("Allow", "{principals: [!Suffix /sa/sleep]}");
        let allow_other = one_match("Allow", "{principals: [!Suffix /sa/other]}");
        let deny_port = one_match("Deny", "{destinationPorts: [8080]}");
        let deny_other_port = one_match("Deny", "{destinationPorts: [1]}");
        assert!(allowed(&[], &c), "no policies: allow");
        assert!(allowed(std::slice::from_ref(&deny_other_port), &c), "only non-matching DENY: allow");
        assert!(allowed(&[allow_sleep.clone(), allow_other.clone()], &c), "a matching ALLOW allows");
        assert!(!allowed(std::slice::from_ref(&allow_other), &c), "ALLOW policies, none matching: deny");
        assert!(!allowed(&[allow_sleep.clone(), deny_port.clone()], &c), "DENY beats ALLOW");
        let refs = [&deny_port];
        assert_eq!(authorize(&refs, &c).result, Err(Denied::ByPolicy("ns/p".into())));
        // Dry-run policies never decide, but are reported when they match.
        let dry = |p: &Arc<Authorization>| {
            let mut d = (**p).clone();
            d.dry_run = true;
            Arc::new(d)
        };
        let (dry_deny, dry_allow_other) = (dry(&deny_port), dry(&allow_other));
        let refs = [&dry_deny, &dry_allow_other];
        let out = authorize(&refs, &c);
        assert_eq!(out.result, Ok(()), "dry-run DENY and dry-run ALLOW do not decide");
        assert_eq!(out.dry_run_matches, vec![("ns/p".to_string(), Action::Deny)]);
    }

    #[test]
    fn strict_mode_is_a_deny_without_principal() {
        // What istiod sends for STRICT PeerAuthentication.
        let strict = one_match("Deny", "{notPrincipals: [!Presence []]}");
        assert!(allowed(std::slice::from_ref(&strict), &sleep()));
        assert!(!allowed(&[strict], &conn(None, "10.0.0.9", "10.0.1.8:8080")));
    }
}

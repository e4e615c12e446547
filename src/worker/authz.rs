//! Authorization on the worker: the pure engine (`crate::rbac`) against the current config, with
//! Istio's log lines. Used by inbound HBONE, inbound plaintext, the node-local fast path and the
//! re-checks after a config change.

use crate::model::Workload;
use crate::rbac::{self, Denied};
use crate::snapshot::Snapshot;

/// Authorizes `conn` to `workload` under `snap`'s policies. Logs `RBAC rejected ...` when denied
/// (with `when` saying on which occasion) and dry-run matches.
pub fn check(snap: &Snapshot, workload: &Workload, conn: &rbac::Conn, when: &str) -> Result<(), Denied> {
    let policies = snap.policies_for(workload);
    if policies.is_empty() {
        return Ok(());
    }
    let outcome = rbac::authorize(&policies, conn);
    let who = || conn.identity.as_ref().map(|i| i.to_string()).unwrap_or_else(|| "no identity".into());
    for (policy, action) in &outcome.dry_run_matches {
        tracing::info!(policy = %policy, action = ?action, "dry-run policy matched conn={}({})->{}", conn.src_ip, who(), conn.dst);
    }
    if let Err(denied) = &outcome.result {
        tracing::info!(reason = %denied, "RBAC rejected conn={}({})->{} ({when})", conn.src_ip, who(), conn.dst);
    }
    outcome.result
}

//! The certificate manager, on the control thread: keeps a certificate for every identity this
//! proxy serves over HBONE, fetched ahead of time from the certificate source (the local CA or
//! the Istio CA, behind the `CertSource` trait), renewed at half-life while the old one keeps
//! serving, retried with jittered backoff, and forgotten when no local workload needs it.
//! Every change is handed to the publisher as a complete certificate map.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use serde_json::json;

use crate::model::Identity;
use crate::snapshot::CertMap;
use crate::tls::ca::LocalCa;
use crate::tls::{TlsError, WorkloadCert};

/// Where certificates come from.
pub trait CertSource {
    fn issue<'a>(&'a self, id: &'a Identity) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, TlsError>> + 'a>>;
}

impl CertSource for LocalCa {
    fn issue<'a>(&'a self, id: &'a Identity) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, TlsError>> + 'a>> {
        Box::pin(async move { LocalCa::issue(self, id, SystemTime::now()) })
    }
}

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(150);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertState {
    Initializing,
    Available,
    Unavailable(String),
}

struct Entry {
    cert: Option<Arc<WorkloadCert>>,
    state: CertState,
    /// When to fetch (first time, retry, or renewal).
    next: Instant,
    backoff: Duration,
    fetching: bool,
}

pub struct CertManager {
    source: Rc<dyn CertSource>,
    entries: RefCell<BTreeMap<Identity, Entry>>,
    wake: tokio::sync::Notify,
}

/// When to renew a certificate just received: half way through the life it has left. (Not
/// from `not_before`, which issuers backdate for clock skew.)
fn renewal_delay(cert: &WorkloadCert, now: SystemTime) -> Duration {
    cert.info.not_after.duration_since(now).unwrap_or_default() / 2
}

/// The next backoff step: doubling up to the maximum, with +-20% jitter so proxies spread out.
fn next_backoff(current: Duration) -> (Duration, Duration) {
    let wait = current.mul_f64(0.8 + fastrand::f64() * 0.4);
    (wait, (current * 2).min(BACKOFF_MAX))
}

impl CertManager {
    pub fn new(source: Rc<dyn CertSource>) -> Rc<CertManager> {
        Rc::new(CertManager { source, entries: RefCell::default(), wake: tokio::sync::Notify::new() })
    }

    /// Sets the identities to keep certificates for. Returns whether certificates were dropped
    /// (so the caller republishes).
    pub fn want(&self, ids: BTreeSet<Identity>) -> bool {
        let mut entries = self.entries.borrow_mut();
        let before = entries.len();
        entries.retain(|id, _| ids.contains(id));
        let dropped = entries.len() != before;
        let now = Instant::now();
        let mut added = false;
        for id in ids {
            entries.entry(id).or_insert_with(|| {
                added = true;
                Entry { cert: None, state: CertState::Initializing, next: now, backoff: BACKOFF_START, fetching: false }
            });
        }
        drop(entries);
        if added {
            self.wake.notify_one();
        }
        dropped
    }

    /// The certificates available now.
    pub fn certs(&self) -> CertMap {
        self.entries.borrow().iter().filter_map(|(id, e)| e.cert.clone().map(|c| (id.clone(), c))).collect()
    }

    pub fn states(&self) -> BTreeMap<Identity, CertState> {
        self.entries.borrow().iter().map(|(id, e)| (id.clone(), e.state.clone())).collect()
    }

    /// Fetches and renews until the control thread ends. `publish` gets every new map.
    pub async fn run(self: Rc<Self>, publish: impl Fn(CertMap) + 'static) {
        let publish = Rc::new(publish);
        loop {
            let now = Instant::now();
            let due: Vec<Identity> = self
                .entries
                .borrow_mut()
                .iter_mut()
                .filter(|(_, e)| !e.fetching && e.next <= now)
                .map(|(id, e)| {
                    e.fetching = true;
                    id.clone()
                })
                .collect();
            for id in due {
                let (me, publish) = (self.clone(), publish.clone());
                tokio::task::spawn_local(async move {
                    let res = me.source.issue(&id).await;
                    if me.record(&id, res) {
                        publish(me.certs());
                    }
                    me.wake.notify_one();
                });
            }
            let next = self.entries.borrow().values().filter(|e| !e.fetching).map(|e| e.next).min();
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// Applies a fetch result. Returns whether the published certificates changed.
    fn record(&self, id: &Identity, res: Result<WorkloadCert, TlsError>) -> bool {
        let mut entries = self.entries.borrow_mut();
        // The identity may have been dropped while the fetch ran.
        let Some(e) = entries.get_mut(id) else { return false };
        e.fetching = false;
        match res {
            Ok(cert) => {
                e.next = Instant::now() + renewal_delay(&cert, SystemTime::now());
                tracing::info!(identity = %id, serial = %cert.info.serial, renew_in = ?e.next.duration_since(Instant::now()), "certificate issued");
                e.cert = Some(Arc::new(cert));
                e.state = CertState::Available;
                e.backoff = BACKOFF_START;
                true
            }
            Err(err) => {
                let (wait, backoff) = next_backoff(e.backoff);
                e.backoff = backoff;
                e.next = Instant::now() + wait;
                // A failed renewal keeps serving the current certificate until it expires.
                let expired = e.cert.as_ref().is_some_and(|c| c.info.not_after <= SystemTime::now());
                if expired {
                    e.cert = None;
                }
                if e.cert.is_none() {
                    e.state = CertState::Unavailable(err.to_string());
                }
                tracing::warn!(identity = %id, error = %err, retry_in = ?wait, "certificate fetch failed");
                expired
            }
        }
    }

    /// The `certificates` section of `config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let entries = self.entries.borrow();
        let describe = |der: &rustls::pki_types::CertificateDer<'_>| match crate::tls::cert_info(der) {
            Ok(i) => json!({
                "pem": pem::encode(&pem::Pem::new("CERTIFICATE", der.as_ref().to_vec())),
                "serialNumber": i.serial,
                "validFrom": crate::telemetry::rfc3339(i.not_before),
                "expirationTime": crate::telemetry::rfc3339(i.not_after),
            }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        entries
            .iter()
            .map(|(id, e)| {
                let state = match &e.state {
                    CertState::Initializing => "Initializing".to_string(),
                    CertState::Available => "Available".to_string(),
                    CertState::Unavailable(err) => format!("Unavailable: {err}"),
                };
                let (chain, roots): (Vec<_>, Vec<_>) = match &e.cert {
                    Some(c) => (c.chain.iter().map(describe).collect(), c.roots.iter().map(describe).collect()),
                    None => (vec![], vec![]),
                };
                json!({ "identity": id.to_string(), "state": state, "certChain": chain, "rootCerts": roots })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A source that fails the first `fail` times, then issues from a local CA.
    struct Flaky {
        ca: LocalCa,
        fail: Cell<u32>,
        calls: Cell<u32>,
    }

    impl CertSource for Flaky {
        fn issue<'a>(&'a self, id: &'a Identity) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, TlsError>> + 'a>> {
            Box::pin(async move {
                self.calls.set(self.calls.get() + 1);
                if self.fail.get() > 0 {
                    self.fail.set(self.fail.get() - 1);
                    return Err(TlsError::Ca("unreachable".into()));
                }
                self.ca.issue(id, SystemTime::now())
            })
        }
    }

    fn id(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/ns/sa/{sa}").parse().unwrap()
    }

    #[test]
    fn fetches_ahead_renews_retries_and_forgets() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            // Certificates live 4 s: renewal is due after about 2 s.
            let source = Rc::new(Flaky {
                ca: LocalCa::generate("cluster.local", Duration::from_secs(4)).unwrap(),
                fail: Cell::new(2),
                calls: Cell::new(0),
            });
            let mgr = CertManager::new(source.clone());
            let published: Rc<RefCell<Vec<CertMap>>> = Rc::default();
            let p = published.clone();
            tokio::task::spawn_local(mgr.clone().run(move |m| p.borrow_mut().push(m)));
            mgr.want([id("a")].into());
            // Two failures with backoff (about 1 s, then 2 s), then success.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(matches!(mgr.states()[&id("a")], CertState::Unavailable(_)));
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(source.calls.get() >= 3, "two failures, then success (and maybe a renewal)");
            assert_eq!(mgr.states()[&id("a")], CertState::Available);
            let first = published.borrow().last().unwrap()[&id("a")].info.serial.clone();
            // Renewal at half-life replaces it while the old one was still valid.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let second = published.borrow().last().unwrap()[&id("a")].info.serial.clone();
            assert_ne!(first, second, "renewed");
            assert_eq!(mgr.dump()[0]["state"], "Available");
            assert_eq!(mgr.dump()[0]["certChain"].as_array().unwrap().len(), 1);
            // An identity no longer wanted is forgotten.
            assert!(mgr.want(BTreeSet::new()));
            assert!(mgr.certs().is_empty());
        });
    }

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter() {
        let (wait, next) = next_backoff(Duration::from_secs(1));
        assert!(wait >= Duration::from_millis(800) && wait <= Duration::from_millis(1200));
        assert_eq!(next, Duration::from_secs(2));
        assert_eq!(next_backoff(Duration::from_secs(100)).1, BACKOFF_MAX);
    }
}

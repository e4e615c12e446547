//! Istio's L4 metrics (`istio_tcp_*`) and our connection-setup latency histograms.
//!
//! Each worker owns a [`Shard`]: plain `Cell`/`RefCell` counters, nothing shared, nothing atomic.
//! Bytes are not copied into the shard as they move: an open connection's shard entry points at
//! the connection's own byte counters (`RelayStats`), so a scrape sees them live. A scrape asks
//! every worker for a [`Dump`] (a message on its control channel) and the control thread merges
//! and renders them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::model::{Identity, Workload};
use crate::net::relay::RelayStats;
use crate::snapshot::ServiceEntry;

/// Label names, in the order `Labels` holds their values (COMPAT.md's list).
pub const LABEL_NAMES: [&str; 27] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "source_region",
    "source_zone",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "destination_region",
    "destination_zone",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

const UNKNOWN: &str = "unknown";
/// Longest label value kept; longer ones (only a peer's baggage can be that long) are cut.
const MAX_VALUE: usize = 128;
/// Entries of the recent-labels cache before it starts over.
const MAX_RECENT: usize = 4096;

/// What a connection's labels are made of, compared by identity (the same `Arc`s): the
/// reporter, the source and destination workloads, the service, the outcome.
#[derive(Clone)]
pub struct LabelKey {
    pub reporter: &'static str,
    pub src: Option<Arc<Workload>>,
    pub dst: Option<Arc<Workload>>,
    pub service: Option<Arc<ServiceEntry>>,
    pub response_flags: &'static str,
    pub mutual_tls: bool,
}

fn ptr<T>(a: &Option<Arc<T>>) -> *const T {
    a.as_ref().map_or(std::ptr::null(), Arc::as_ptr)
}

impl PartialEq for LabelKey {
    fn eq(&self, o: &LabelKey) -> bool {
        self.reporter == o.reporter
            && ptr(&self.src) == ptr(&o.src)
            && ptr(&self.dst) == ptr(&o.dst)
            && ptr(&self.service) == ptr(&o.service)
            && self.response_flags == o.response_flags
            && self.mutual_tls == o.mutual_tls
    }
}

impl Eq for LabelKey {}

impl std::hash::Hash for LabelKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (self.reporter, ptr(&self.src), ptr(&self.dst), ptr(&self.service), self.response_flags, self.mutual_tls)
            .hash(h);
    }
}

/// Distinct label sets one worker keeps; past it, peer-supplied values collapse to `unknown`
/// so a peer inventing a new name per connection cannot grow memory without bound.
const MAX_SERIES: usize = 10_000;

/// One series' label values, in [`LABEL_NAMES`] order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Labels(pub [Box<str>; 27]);

/// What a connection's labels are built from.
#[derive(Debug, Default, Clone)]
pub struct Peer {
    pub workload: Option<String>,
    pub canonical_service: Option<String>,
    pub canonical_revision: Option<String>,
    pub namespace: Option<String>,
    pub principal: Option<String>,
    pub cluster: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl Peer {
    /// From a workload we know (our config).
    pub fn of(w: &Workload, default_cluster: &str) -> Peer {
        Peer {
            workload: Some(if w.workload_name.is_empty() { w.name.clone() } else { w.workload_name.clone() }),
            canonical_service: Some(if w.canonical_name.is_empty() {
                w.name.clone()
            } else {
                w.canonical_name.clone()
            }),
            canonical_revision: Some(if w.canonical_revision.is_empty() {
                "latest".into()
            } else {
                w.canonical_revision.clone()
            }),
            namespace: Some(w.namespace.clone()),
            principal: Some(principal(&w.identity())),
            cluster: Some(if w.cluster_id.is_empty() { default_cluster.into() } else { w.cluster_id.clone() }),
            region: w.locality.as_ref().map(|l| l.region.clone()),
            zone: w.locality.as_ref().map(|l| l.zone.clone()),
        }
    }

    /// From a peer's `baggage` header (values it chose: validated, bounded).
    pub fn from_baggage(header: &str) -> Peer {
        let mut p = Peer::default();
        for item in header.split(',').take(32) {
            let Some((k, v)) = item.split_once('=') else { continue };
            let (k, v) = (k.trim(), v.trim());
            if v.is_empty() || v.len() > 63 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                continue;
            }
            let v = Some(v.to_string());
            match k {
                "k8s.namespace.name" => p.namespace = v,
                "k8s.cluster.name" => p.cluster = v,
                "service.name" => p.canonical_service = v,
                "service.version" => p.canonical_revision = v,
                "cloud.region" => p.region = v,
                "cloud.availability_zone" => p.zone = v,
                k if k.starts_with("k8s.") && k.ends_with(".name") && k.len() < 40 => p.workload = v,
                _ => {}
            }
        }
        p
    }
}

/// A principal as Istio's metrics spell it: `spiffe://td/ns/x/sa/y`.
pub fn principal(id: &Identity) -> String {
    id.to_string()
}

/// The service a connection was addressed to, if any.
#[derive(Debug, Default, Clone)]
pub struct ServiceLabels {
    pub hostname: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Labels {
    pub fn new(
        reporter: &str,
        src: &Peer,
        dst: &Peer,
        svc: &ServiceLabels,
        response_flags: &str,
        mutual_tls: bool,
    ) -> Labels {
        let v = |o: &Option<String>| -> Box<str> {
            match o.as_deref() {
                None | Some("") => UNKNOWN.into(),
                Some(s) => cut(s).into(),
            }
        };
        Labels([
            reporter.into(),
            v(&src.workload),
            v(&src.canonical_service),
            v(&src.canonical_revision),
            v(&src.namespace),
            v(&src.principal),
            v(&src.canonical_service),
            v(&src.canonical_revision),
            v(&src.cluster),
            v(&src.region),
            v(&src.zone),
            v(&svc.hostname),
            v(&svc.namespace),
            v(&svc.name),
            v(&dst.workload),
            v(&dst.canonical_service),
            v(&dst.canonical_revision),
            v(&dst.namespace),
            v(&dst.principal),
            v(&dst.canonical_service),
            v(&dst.canonical_revision),
            v(&dst.cluster),
            v(&dst.region),
            v(&dst.zone),
            "tcp".into(),
            response_flags.into(),
            (if mutual_tls { "mutual_tls" } else { UNKNOWN }).into(),
        ])
    }

    /// The same series with every source value except the principal forgotten (for the
    /// series cap: what a peer's baggage may have filled in).
    fn without_source_details(&self) -> Labels {
        let mut l = self.clone();
        for i in [1, 2, 3, 4, 6, 7, 8, 9, 10] {
            l.0[i] = UNKNOWN.into();
        }
        l
    }
}

fn cut(s: &str) -> &str {
    if s.len() <= MAX_VALUE {
        return s;
    }
    let mut end = MAX_VALUE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Counter values of one series.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub sent: u64,
    pub received: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.opened += o.opened;
        self.closed += o.closed;
        self.failed += o.failed;
        self.sent += o.sent;
        self.received += o.received;
    }
}

/// The paths whose setup time is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupPath {
    /// Outbound to a plain TCP workload or passthrough.
    Tcp,
    /// Outbound over HBONE (pooled connection, CONNECT answered).
    Hbone,
    /// Outbound to a workload on this node, no TLS.
    FastPath,
    /// Inbound plaintext (15006).
    InboundPlain,
    /// An inbound HBONE stream (CONNECT received to pod connected).
    InboundHbone,
}

pub const SETUP_PATHS: [(SetupPath, &str); 5] = [
    (SetupPath::Tcp, "tcp"),
    (SetupPath::Hbone, "hbone"),
    (SetupPath::FastPath, "fast_path"),
    (SetupPath::InboundPlain, "inbound_plain"),
    (SetupPath::InboundHbone, "inbound_hbone"),
];

fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 us to 60 s, 2 significant digits (1%: plenty for percentiles, and a few
    // KiB per histogram instead of ~150).
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// An open connection: its series and its live byte counters.
type OpenEntry = (Rc<Series>, Rc<RelayStats>);

/// One series: its labels, interned once per worker, and its counters, which a connection
/// updates through its handle without hashing the 23 label values again.
#[derive(Debug)]
pub struct Series {
    pub labels: Labels,
    totals: Cell<Totals>,
}

impl Series {
    fn count(&self, f: impl FnOnce(&mut Totals)) {
        let mut t = self.totals.get();
        f(&mut t);
        self.totals.set(t);
    }
}

/// A series in the worker's set, found by its labels.
struct Interned(Rc<Series>);

impl std::borrow::Borrow<Labels> for Interned {
    fn borrow(&self) -> &Labels {
        &self.0.labels
    }
}

impl PartialEq for Interned {
    fn eq(&self, o: &Interned) -> bool {
        self.0.labels == o.0.labels
    }
}

impl Eq for Interned {}

impl std::hash::Hash for Interned {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.labels.hash(h);
    }
}

/// A counter family: name, help, and which total it reports.
type Family = (&'static str, &'static str, fn(&Totals) -> u64);

/// A worker's metrics.
pub struct Shard {
    series: RefCell<std::collections::HashSet<Interned>>,
    open: RefCell<HashMap<u64, OpenEntry>>,
    next: Cell<u64>,
    /// Labels of recent connections by what they were made of (see [`Shard::labels`]).
    recent: RefCell<HashMap<LabelKey, Rc<Series>>>,
    setup: RefCell<Vec<Histogram<u64>>>,
    /// DNS counts by (record type, protocol), then by source canonical service and revision:
    /// found by comparing strings, so counting a query allocates nothing.
    dns: RefCell<HashMap<(u16, &'static str), Vec<DnsSourceCounts>>>,
}

/// The labels of Istio's `istio_dns_*` series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsKey {
    /// Lowercase record type (`a`, `aaaa`, `srv`, ...).
    pub query_type: String,
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

/// DNS counts of one source (canonical service, revision).
type DnsSourceCounts = (Box<str>, Box<str>, DnsCounts);

/// What a DNS request is counted by, borrowed from the request and its client.
pub struct DnsQueryKey<'a> {
    /// The record type's number (0: unknown, the request did not parse).
    pub query_type: u16,
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    pub service: &'a str,
    pub revision: &'a str,
}

/// Istio's label for a record type: its name in lowercase (`a`, `aaaa`, `srv`), `unknown` when
/// the request did not say.
pub fn dns_type_label(t: u16) -> String {
    if t == 0 {
        return "unknown".into();
    }
    hickory_proto::rr::RecordType::from(t).to_string().to_ascii_lowercase()
}

/// A family of worker figures: name, type, help, and the value of one worker.
type WorkerFamily = (&'static str, &'static str, &'static str, fn(&WorkerFigures) -> String);

/// A counter family of DNS: name, help, and which count it shows.
type DnsFamily = (&'static str, &'static str, fn(&DnsCounts) -> u64);

/// Istio's buckets for `istio_dns_upstream_request_duration_seconds`, in microseconds.
pub const DNS_BUCKETS_US: [u64; 6] = [500, 1_000, 10_000, 100_000, 1_000_000, 5_000_000];

#[derive(Debug, Clone, Copy, Default)]
pub struct DnsCounts {
    pub requests: u64,
    pub upstream_requests: u64,
    pub upstream_failures: u64,
    /// Upstream durations per bucket of [`DNS_BUCKETS_US`] (not cumulative), then `+Inf`.
    pub upstream_buckets: [u64; 7],
    pub upstream_sum_us: u64,
}

impl DnsCounts {
    fn add(&mut self, o: &DnsCounts) {
        self.requests += o.requests;
        self.upstream_requests += o.upstream_requests;
        self.upstream_failures += o.upstream_failures;
        for (a, b) in self.upstream_buckets.iter_mut().zip(o.upstream_buckets) {
            *a += b;
        }
        self.upstream_sum_us += o.upstream_sum_us;
    }
}

impl Default for Shard {
    fn default() -> Shard {
        Shard {
            series: RefCell::default(),
            open: RefCell::default(),
            next: Cell::new(0),
            recent: RefCell::default(),
            setup: RefCell::new(SETUP_PATHS.iter().map(|_| new_histogram()).collect()),
            dns: RefCell::default(),
        }
    }
}

/// An open connection's place in the shard; counted closed (with its final bytes) on drop.
pub struct OpenConn {
    shard: Rc<Shard>,
    id: u64,
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        if let Some((series, stats)) = self.shard.open.borrow_mut().remove(&self.id) {
            series.count(|t| {
                t.closed += 1;
                t.sent += stats.sent.get();
                t.received += stats.received.get();
            });
        }
    }
}

impl Shard {
    /// The series of `labels` (a new one if it is new).
    pub fn intern(&self, labels: Labels) -> Rc<Series> {
        let mut series = self.series.borrow_mut();
        let labels = if series.len() >= MAX_SERIES && !series.contains(&labels) {
            labels.without_source_details()
        } else {
            labels
        };
        match series.get(&labels) {
            Some(k) => k.0.clone(),
            None => {
                let k = Rc::new(Series { labels, totals: Cell::default() });
                series.insert(Interned(k.clone()));
                k
            }
        }
    }

    /// The series for `key`, built by `make` only the first time: a connection between the
    /// same workloads (and service, reporter, outcome) as an earlier one reuses its labels
    /// without building and hashing 23 strings again.
    pub fn labels(&self, key: LabelKey, make: impl FnOnce() -> Labels) -> Rc<Series> {
        if let Some(l) = self.recent.borrow().get(&key) {
            return l.clone();
        }
        let labels = self.intern(make());
        let mut recent = self.recent.borrow_mut();
        if recent.len() >= MAX_RECENT {
            // It holds workloads of past configs alive; start again rather than grow.
            recent.clear();
        }
        recent.insert(key, labels.clone());
        labels
    }

    /// Counts a connection opened; its bytes are read from `stats` until the guard drops.
    pub fn open(self: &Rc<Self>, series: Rc<Series>, stats: Rc<RelayStats>) -> OpenConn {
        series.count(|t| t.opened += 1);
        let id = self.next.get();
        self.next.set(id + 1);
        self.open.borrow_mut().insert(id, (series, stats));
        OpenConn { shard: self.clone(), id }
    }

    /// Counts a connection that failed before any byte moved (denied, upstream unreachable).
    pub fn failed(&self, series: Rc<Series>) {
        series.count(|t| {
            t.opened += 1;
            t.closed += 1;
            t.failed += 1;
        });
    }

    pub fn record_setup(&self, path: SetupPath, took: Duration) {
        let i = SETUP_PATHS.iter().position(|(p, _)| *p == path).unwrap_or(0);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).clamp(1, 60_000_000);
        let _ = self.setup.borrow_mut()[i].record(us);
    }

    /// One DNS request answered (mesh or forwarded), and for a forwarded one how the upstream
    /// exchange went (`Some((took, failed))`).
    pub fn dns(&self, key: &DnsQueryKey<'_>, upstream: Option<(Duration, bool)>) {
        let mut map = self.dns.borrow_mut();
        let list = map.entry((key.query_type, key.protocol)).or_default();
        let i = match list.iter().position(|(s, r, _)| &**s == key.service && &**r == key.revision) {
            Some(i) => i,
            None => {
                list.push((key.service.into(), key.revision.into(), DnsCounts::default()));
                list.len() - 1
            }
        };
        let c = &mut list[i].2;
        c.requests += 1;
        if let Some((took, failed)) = upstream {
            c.upstream_requests += 1;
            c.upstream_failures += u64::from(failed);
            let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            let i = DNS_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(DNS_BUCKETS_US.len());
            c.upstream_buckets[i] += 1;
            c.upstream_sum_us = c.upstream_sum_us.saturating_add(us);
        }
    }

    /// Everything counted so far, with open connections' bytes as of now.
    pub fn dump(&self) -> Dump {
        let mut series: HashMap<Labels, Totals> =
            self.series.borrow().iter().map(|k| (k.0.labels.clone(), k.0.totals.get())).collect();
        for (open, stats) in self.open.borrow().values() {
            let t = series.entry(open.labels.clone()).or_default();
            t.sent += stats.sent.get();
            t.received += stats.received.get();
        }
        let mut dns = HashMap::new();
        for ((t, protocol), list) in self.dns.borrow().iter() {
            for (service, revision, counts) in list {
                let key = DnsKey {
                    query_type: dns_type_label(*t),
                    protocol,
                    source_canonical_service: service.to_string(),
                    source_canonical_revision: revision.to_string(),
                };
                dns.entry(key).or_insert_with(DnsCounts::default).add(counts);
            }
        }
        let mut sockets_open: HashMap<Box<str>, u64> = HashMap::new();
        for (open, _) in self.open.borrow().values() {
            *sockets_open.entry(open.labels.0[0].clone()).or_default() += 1;
        }
        Dump { series, setup: self.setup.borrow().clone(), dns, sockets_open, workers: Vec::new() }
    }
}

/// One worker's metrics at a scrape; `Send`, merged on the control thread.
#[derive(Debug)]
pub struct Dump {
    pub series: HashMap<Labels, Totals>,
    /// Setup-time histograms in [`SETUP_PATHS`] order.
    pub setup: Vec<Histogram<u64>>,
    pub dns: HashMap<DnsKey, DnsCounts>,
    /// Open proxied connections by reporter (`istio_tcp_sockets_open`).
    pub sockets_open: HashMap<Box<str>, u64>,
    /// Each worker's own figures (filled in by the worker answering the scrape).
    pub workers: Vec<WorkerFigures>,
}

/// What one worker reports of itself (`ztunnel_worker_*`).
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerFigures {
    pub id: usize,
    /// CPU time the worker thread used (user + system).
    pub cpu_seconds: f64,
    pub open_connections: u64,
    pub accepted_total: u64,
    /// Pods whose listeners it serves (in-pod mode).
    pub pods: u64,
}

impl Dump {
    pub fn empty() -> Dump {
        Dump {
            series: HashMap::new(),
            setup: SETUP_PATHS.iter().map(|_| new_histogram()).collect(),
            dns: HashMap::new(),
            sockets_open: HashMap::new(),
            workers: Vec::new(),
        }
    }

    pub fn merge(&mut self, other: Dump) {
        for (k, v) in other.series {
            self.series.entry(k).or_default().add(&v);
        }
        for (mine, theirs) in self.setup.iter_mut().zip(other.setup) {
            let _ = mine.add(theirs);
        }
        for (k, v) in other.dns {
            self.dns.entry(k).or_default().add(&v);
        }
        for (k, v) in other.sockets_open {
            *self.sockets_open.entry(k).or_default() += v;
        }
        self.workers.extend(other.workers);
    }

    /// The Prometheus text format, or OpenMetrics when `openmetrics`.
    /// `extra` (already in the right format) goes before the OpenMetrics end marker.
    pub fn render(&self, build_tag: &str, openmetrics: bool, extra: &str) -> String {
        let mut out = String::new();
        let mut keys: Vec<&Labels> = self.series.keys().collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        let counters: [Family; 5] = [
            ("istio_tcp_connections_opened", "Connections opened.", |t| t.opened),
            ("istio_tcp_connections_closed", "Connections closed.", |t| t.closed),
            ("istio_tcp_sent_bytes", "Bytes sent (client to server), counted as they move.", |t| t.sent),
            ("istio_tcp_received_bytes", "Bytes received (server to client), counted as they move.", |t| t.received),
            ("istio_tcp_connections_failed", "Connections that failed before any byte moved.", |t| t.failed),
        ];
        for (name, help, get) in counters {
            let family = if openmetrics { name.to_string() } else { format!("{name}_total") };
            let _ = writeln!(out, "# HELP {family} {help}");
            let _ = writeln!(out, "# TYPE {family} counter");
            for k in &keys {
                let _ = write!(out, "{name}_total{{");
                write_labels(&mut out, k);
                let _ = writeln!(out, "}} {}", get(&self.series[*k]));
            }
        }
        let _ = writeln!(out, "# HELP istio_tcp_sockets_open Open proxied connections, by reporter.");
        let _ = writeln!(out, "# TYPE istio_tcp_sockets_open gauge");
        for reporter in ["source", "destination"] {
            let n = self.sockets_open.get(reporter).copied().unwrap_or(0);
            let _ = writeln!(out, "istio_tcp_sockets_open{{reporter=\"{reporter}\"}} {n}");
        }
        self.render_workers(&mut out, openmetrics);
        let _ = writeln!(out, "# HELP istio_build Istio component build info.");
        let _ = writeln!(out, "# TYPE istio_build gauge");
        let _ = writeln!(out, "istio_build{{component=\"ztunnel\",tag=\"{}\"}} 1", escape(build_tag));
        self.render_setup(&mut out, openmetrics);
        self.render_dns(&mut out, openmetrics);
        out.push_str(extra);
        if openmetrics {
            out.push_str("# EOF\n");
        }
        out
    }

    /// Each worker's own figures, the thread-per-core counterpart of a runtime's metrics.
    fn render_workers(&self, out: &mut String, openmetrics: bool) {
        let mut workers = self.workers.clone();
        workers.sort_by_key(|w| w.id);
        let families: [WorkerFamily; 4] = [
            ("ztunnel_worker_cpu_seconds", "counter", "CPU time each worker thread used.", |w| {
                w.cpu_seconds.to_string()
            }),
            ("ztunnel_worker_connections_open", "gauge", "Connections each worker holds open.", |w| {
                w.open_connections.to_string()
            }),
            ("ztunnel_worker_connections_accepted", "counter", "Connections each worker accepted.", |w| {
                w.accepted_total.to_string()
            }),
            ("ztunnel_worker_pods", "gauge", "Pods each worker serves listeners for (in-pod mode).", |w| {
                w.pods.to_string()
            }),
        ];
        for (name, kind, help, get) in families {
            let sample = if kind == "counter" { format!("{name}_total") } else { name.to_string() };
            let family = if kind == "counter" && !openmetrics { sample.clone() } else { name.to_string() };
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
            for w in &workers {
                let _ = writeln!(out, "{sample}{{worker=\"{}\"}} {}", w.id, get(w));
            }
        }
    }

    /// Istio's `istio_dns_*` families (only once a DNS request was seen).
    fn render_dns(&self, out: &mut String, openmetrics: bool) {
        if self.dns.is_empty() {
            return;
        }
        let mut keys: Vec<&DnsKey> = self.dns.keys().collect();
        keys.sort();
        let labels = |k: &DnsKey| {
            let or_unknown = |s: &str| if s.is_empty() { "unknown".to_string() } else { escape(s) };
            format!(
                "request_query_type=\"{}\",request_protocol=\"{}\",source_canonical_service=\"{}\",source_canonical_revision=\"{}\"",
                escape(&k.query_type),
                k.protocol,
                or_unknown(&k.source_canonical_service),
                or_unknown(&k.source_canonical_revision)
            )
        };
        let counters: [DnsFamily; 3] = [
            ("istio_dns_requests", "Total number of DNS requests (unstable).", |c| c.requests),
            ("istio_dns_upstream_requests", "Total number of DNS requests forwarded to upstream (unstable).", |c| {
                c.upstream_requests
            }),
            (
                "istio_dns_upstream_failures",
                "Total number of DNS requests that failed to forward upstream (unstable).",
                |c| c.upstream_failures,
            ),
        ];
        for (name, help, get) in counters {
            let family = if openmetrics { name.to_string() } else { format!("{name}_total") };
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
            for k in &keys {
                let _ = writeln!(out, "{name}_total{{{}}} {}", labels(k), get(&self.dns[*k]));
            }
        }
        let name = "istio_dns_upstream_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Total time in seconds Istio takes to get DNS response from upstream (unstable).\n# TYPE {name} histogram"
        );
        for k in &keys {
            let c = &self.dns[*k];
            if c.upstream_requests == 0 {
                continue;
            }
            let l = labels(k);
            let mut cumulative = 0;
            for (i, le) in DNS_BUCKETS_US.iter().enumerate() {
                cumulative += c.upstream_buckets[i];
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{}\"}} {cumulative}", *le as f64 / 1e6);
            }
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", c.upstream_requests);
            let _ = writeln!(out, "{name}_sum{{{l}}} {}", c.upstream_sum_us as f64 / 1e6);
            let _ = writeln!(out, "{name}_count{{{l}}} {}", c.upstream_requests);
        }
    }

    fn render_setup(&self, out: &mut String, _openmetrics: bool) {
        const BUCKETS_US: [u64; 12] =
            [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000, 10_000_000];
        let name = "ztunnel_connection_setup_seconds";
        let _ = writeln!(out, "# HELP {name} Time from accepting a connection to its upstream being ready, by path.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for ((_, path), h) in SETUP_PATHS.iter().zip(&self.setup) {
            for le in BUCKETS_US {
                let n = h.count_between(0, le);
                let _ = writeln!(out, "{name}_bucket{{path=\"{path}\",le=\"{}\"}} {n}", le as f64 / 1e6);
            }
            let _ = writeln!(out, "{name}_bucket{{path=\"{path}\",le=\"+Inf\"}} {}", h.len());
            let sum: f64 = h.iter_recorded().map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64).sum();
            let _ = writeln!(out, "{name}_sum{{path=\"{path}\"}} {}", sum / 1e6);
            let _ = writeln!(out, "{name}_count{{path=\"{path}\"}} {}", h.len());
        }
    }

    /// Setup-time percentiles per path, for `/stats/latency`.
    pub fn latency_json(&self) -> serde_json::Value {
        let mut paths = serde_json::Map::new();
        for ((_, path), h) in SETUP_PATHS.iter().zip(&self.setup) {
            let q = |p: f64| if h.is_empty() { serde_json::Value::Null } else { h.value_at_quantile(p).into() };
            paths.insert(
                (*path).into(),
                serde_json::json!({
                    "count": h.len(),
                    "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "p999_us": q(0.999),
                    "max_us": if h.is_empty() { serde_json::Value::Null } else { h.max().into() },
                }),
            );
        }
        serde_json::json!({ "connection_setup": paths })
    }
}

fn write_labels(out: &mut String, l: &Labels) {
    for (i, (name, value)) in LABEL_NAMES.iter().zip(l.0.iter()).enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"{}\"", escape(value));
    }
}

/// Escapes a label value for the text format: backslash, double quote, newline.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_built_once_per_workload_pair_and_reporter() {
        let shard = Shard::default();
        let w = |name: &str| -> Arc<Workload> {
            Arc::new(
                serde_yaml_ng::from_str(&format!("{{uid: {name}, name: {name}, namespace: ns, workloadIps: []}}"))
                    .unwrap(),
            )
        };
        let (a, b) = (w("a"), w("b"));
        let key = |reporter, src: &Arc<Workload>| LabelKey {
            reporter,
            src: Some(src.clone()),
            dst: Some(b.clone()),
            service: None,
            response_flags: "-",
            mutual_tls: true,
        };
        let built = Cell::new(0);
        let make = |reporter: &str, src: &Workload| {
            built.set(built.get() + 1);
            Labels::new(reporter, &Peer::of(src, "c"), &Peer::of(&b, "c"), &ServiceLabels::default(), "-", true)
        };
        let first = shard.labels(key("source", &a), || make("source", &a));
        let again = shard.labels(key("source", &a), || make("source", &a));
        assert!(Rc::ptr_eq(&first, &again) && built.get() == 1, "the second connection reuses the series");
        let other = shard.labels(key("destination", &a), || make("destination", &a));
        assert!(!Rc::ptr_eq(&first, &other) && built.get() == 2);
        // The same names in a new config (new Arcs) land on the same series, built once more.
        let a2 = w("a");
        let renewed = shard.labels(key("source", &a2), || make("source", &a2));
        assert!(Rc::ptr_eq(&first, &renewed) && built.get() == 3);
    }
}

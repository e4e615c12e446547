//! Bootstrap configuration: Istio's environment variables (and our flags), validated once at
//! start and immutable afterwards. Built on the main thread, then shared read-only.
//!
//! Every invalid value fails start-up with an error naming the variable and the reason.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Istio's `PACKET_MARK` default (0x539).
pub const DEFAULT_PACKET_MARK: u32 = 1337;

/// Written as Istio's ztunnel writes it in `config_dump` (`Shared`, `Dedicated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ProxyMode {
    /// One proxy for every workload whose `node` is ours.
    Shared,
    /// A proxy for exactly one workload (`PROXY_WORKLOAD_INFO`).
    Dedicated,
}

/// `PROXY_WORKLOAD_INFO=namespace/name/service-account`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum IoDriver {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    Uring,
    Epoll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// The listener addresses. Tests set every port to 0 and read the bound ones back.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listeners {
    pub outbound: SocketAddr,
    pub inbound_plain: SocketAddr,
    /// Inbound HBONE (mTLS + HTTP/2 CONNECT).
    pub inbound: SocketAddr,
    pub socks5: SocketAddr,
    pub admin: SocketAddr,
    pub readiness: SocketAddr,
    /// Prometheus metrics (15020).
    pub metrics: SocketAddr,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub proxy_mode: ProxyMode,
    pub workload_info: Option<WorkloadInfo>,
    pub node_name: Option<String>,
    /// In-pod mode (shared mode's meaning in current Istio): istio-cni hands each pod's network
    /// namespace over `inpod_uds` and the proxy serves the pod from inside it. `INPOD_ENABLED=false`
    /// selects node-level capture instead (one set of listeners behind the node's TPROXY rules).
    pub inpod: bool,
    /// `INPOD_UDS`: the node agent's ZDS socket.
    pub inpod_uds: PathBuf,
    /// `INPOD_PORT_REUSE`: pod listeners use `SO_REUSEPORT`, so a new proxy binds next to a
    /// draining one.
    pub inpod_port_reuse: bool,
    pub local_xds_path: Option<PathBuf>,
    pub xds_address: Option<String>,
    /// `CA_ADDRESS`: the Istio CA; `None` means the local CA (`FAKE_CA=true`, or empty).
    pub ca_address: Option<String>,
    /// `CA_ROOT_CA`: PEM file (or text) the CA's TLS certificate must chain to.
    pub ca_root_ca: String,
    /// `XDS_ROOT_CA`: a PEM file (or PEM text) istiod's certificate must chain to.
    pub xds_root_ca: String,
    /// `ALT_XDS_HOSTNAME`: the name istiod's certificate is checked against, if not the address's.
    pub alt_xds_hostname: Option<String>,
    /// `ALT_CA_HOSTNAME`: the same for the CA (default: `ALT_XDS_HOSTNAME`).
    pub alt_ca_hostname: Option<String>,
    /// `AUTH_TOKEN`: the file with the bearer token for istiod (re-read on every connect).
    pub auth_token: Option<PathBuf>,
    pub cluster_id: String,
    pub cluster_domain: String,
    pub network: String,
    pub instance_ip: Option<IpAddr>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    /// `SERVICE_ACCOUNT`: the proxy's own service account. With `POD_NAME` and `POD_NAMESPACE`,
    /// the proxy in shared mode also serves HBONE on 15008 in its own pod, as its own workload
    /// (as Istio's ztunnel does, so its own endpoints can be reached over mTLS).
    pub service_account: Option<String>,
    /// `SO_MARK` for upstream sockets; `None` when `PACKET_MARK=0`.
    pub packet_mark: Option<u32>,
    /// Bind the client's address for inbound upstream connections. `None`: decided at start
    /// by whether the process may (CAP_NET_ADMIN).
    pub enable_orig_src: Option<bool>,
    pub socks5: bool,
    /// Bulk connections move data with splice(2) (io_uring workers only).
    pub splice: bool,
    pub worker_threads: usize,
    /// `ZTUNNEL_PIN_WORKERS`: each worker thread is pinned to one CPU (default). `false` lets
    /// the scheduler place them: on a node whose CPUs the proxy shares with busy pods, or in a
    /// benchmark where two proxies share a small machine, wake-ups on the waker's CPU can be
    /// cheaper than a fixed home.
    pub pin_workers: bool,
    pub io_driver: IoDriver,
    #[serde(serialize_with = "ser_duration")]
    pub termination_deadline: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// How often the local config file is checked for changes.
    #[serde(serialize_with = "ser_duration")]
    pub local_config_poll: Duration,
    pub log_format: LogFormat,
    pub listeners: Listeners,
    /// The local CA (used when `ca_address` is `None`).
    pub ca: LocalCaConfig,
    /// Lifetime of workload certificates.
    #[serde(serialize_with = "ser_duration")]
    pub secret_ttl: Duration,
    /// Trust domain of identities whose workload does not name one.
    pub trust_domain: String,
    /// The port peers accept HBONE on (15008 in every Istio mesh; tests move it).
    pub hbone_port: u16,
    /// `POOL_MAX_STREAMS_PER_CONNECTION`: HBONE streams per pooled connection.
    pub pool_max_streams: usize,
    /// `POOL_UNUSED_RELEASE_TIMEOUT`: an unused pooled connection is closed after this long.
    #[serde(serialize_with = "ser_duration")]
    pub pool_idle_timeout: Duration,
    /// `ENABLE_NODE_LOCAL_FAST_PATH`: a destination served by this proxy skips TLS and HTTP/2;
    /// the inbound checks run in-process and the pod is dialed directly.
    pub node_local_fast_path: bool,
    /// HBONE's HTTP/2 windows and frame size (`HTTP2_*`).
    pub http2: Http2Settings,
    /// `USER_TIMEOUT_ENABLED`: `TCP_USER_TIMEOUT` on every connection, as long as keepalive
    /// takes to give up (180 s + 9 x 180 s), as in Istio.
    #[serde(serialize_with = "ser_opt_duration")]
    pub tcp_user_timeout: Option<Duration>,
    /// `LOCAL_XDS`: the local config given inline (instead of `LOCAL_XDS_PATH`).
    pub local_xds_inline: Option<String>,
    /// `XDS_HEADER_<NAME>` and `CA_HEADER_<NAME>`: extra request metadata for istiod and the CA.
    pub xds_headers: Vec<(String, String)>,
    pub ca_headers: Vec<(String, String)>,
    /// The DNS proxy (`ISTIO_META_DNS_CAPTURE`: on unless set to something other than `true`).
    pub dns_capture: bool,
    /// `ISTIO_META_DNS_PROXY_ADDR` in dedicated mode (`localhost:PORT` is both loopbacks).
    pub dns_proxy_addrs: Vec<SocketAddr>,
    /// `IPV6_ENABLED`: AAAA answers for mesh names.
    pub ipv6_enabled: bool,
    /// `PREFERED_SERVICE_NAMESPACE` (Istio's spelling): preferred among services sharing a name.
    pub preferred_service_namespace: Option<String>,
    /// `ZTUNNEL_RESOLV_CONF`: where the upstream resolvers are read from.
    pub resolv_conf: PathBuf,
    /// HTTP/2 PING interval on HBONE connections, and how long a PONG may take before the
    /// connection is dropped (Istio: 10 s and 20 s).
    #[serde(serialize_with = "ser_duration")]
    pub hbone_keepalive_interval: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub hbone_keepalive_timeout: Duration,
}

/// The local CA: a root from `LOCAL_CA_CERT` + `LOCAL_CA_KEY`, or one generated once into (and
/// later reused from) `dir`, so proxies on one machine share it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalCaConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub dir: PathBuf,
}

/// Durations as Istio's ztunnel writes them in `config_dump` (`{secs, nanos}`; Kiali reads them).
fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("Duration", 2)?;
    st.serialize_field("secs", &d.as_secs())?;
    st.serialize_field("nanos", &d.subsec_nanos())?;
    st.end()
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

/// A start-up configuration error: which variable (or flag), which value, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {var}={value:?}: {reason}")]
    Invalid { var: String, value: String, reason: String },
    #[error("{var} is required {why}")]
    Missing { var: &'static str, why: &'static str },
    #[error("unknown flag {0:?} (see --help)")]
    UnknownFlag(String),
    #[error("flag {0} needs a value")]
    FlagValue(String),
}

fn invalid(var: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { var: var.to_string(), value: value.to_string(), reason: reason.into() }
}

/// Flags and the environment variables they set. A flag wins over the environment.
const FLAGS: &[(&str, &str, &str)] = &[
    (
        "--config",
        "LOCAL_XDS_PATH",
        "PATH  local config file (workloads, services, policies); implies XDS_ADDRESS= unless set",
    ),
    ("--mode", "PROXY_MODE", "shared|dedicated"),
    ("--inpod", "INPOD_ENABLED", "true|false  shared mode: pods from istio-cni (default), or node-level capture"),
    ("--workload", "PROXY_WORKLOAD_INFO", "NS/NAME/SA  the workload a dedicated proxy serves"),
    ("--node", "NODE_NAME", "NAME  the node whose workloads a shared proxy serves"),
    ("--workers", "ZTUNNEL_WORKER_THREADS", "N|P%  worker threads (default: every core)"),
    ("--pin-workers", "ZTUNNEL_PIN_WORKERS", "true|false  pin each worker thread to one CPU (default true)"),
    ("--io-driver", "ZTUNNEL_IO_DRIVER", "auto|uring|epoll"),
    ("--log-format", "LOG_FORMAT", "plain|json"),
    ("--packet-mark", "PACKET_MARK", "MARK  SO_MARK of upstream sockets, 0 disables (default 1337)"),
    ("--outbound-addr", "ZTUNNEL_OUTBOUND_ADDR", "ADDR  outbound capture listener (default [::]:15001)"),
    ("--inbound-plain-addr", "ZTUNNEL_INBOUND_PLAINTEXT_ADDR", "ADDR  inbound plaintext listener (default [::]:15006)"),
    ("--inbound-addr", "ZTUNNEL_INBOUND_ADDR", "ADDR  inbound HBONE listener (default [::]:15008)"),
    ("--socks5-addr", "ZTUNNEL_SOCKS5_ADDR", "ADDR  SOCKS5 listener (default 127.0.0.1:15080)"),
    ("--admin-addr", "ZTUNNEL_ADMIN_ADDR", "ADDR  admin listener (default 127.0.0.1:15000)"),
    ("--readiness-addr", "ZTUNNEL_READINESS_ADDR", "ADDR  readiness listener (default [::]:15021)"),
    ("--metrics-addr", "ZTUNNEL_METRICS_ADDR", "ADDR  Prometheus metrics listener (default [::]:15020)"),
];

/// Flags without a value.
const SWITCHES: &[(&str, &str, &str)] = &[("--socks5", "UNSTABLE_ENABLE_SOCKS5", "enable the SOCKS5 listener")];

pub fn usage() -> String {
    let mut s = String::from(
        "ztunnel: a thread-per-core node proxy for Istio ambient mesh\n\n\
         Usage: ztunnel [FLAGS]\n\n\
         Configuration comes from Istio's environment variables; each flag below sets the one named.\n\n",
    );
    for (flag, var, help) in FLAGS.iter().chain(SWITCHES) {
        s.push_str(&format!("  {flag:<22} {var:<32} {help}\n"));
    }
    s.push_str(
        "  --help, -h\n\n\
         Other variables: XDS_ADDRESS, CLUSTER_ID, CLUSTER_DOMAIN, NETWORK, INSTANCE_IP, POD_NAME,\n\
         POD_NAMESPACE, ENABLE_ORIG_SRC, CONNECTION_TERMINATION_DEADLINE, ZTUNNEL_CONNECT_TIMEOUT,\n\
         ZTUNNEL_SPLICE, FAKE_CA, CA_ADDRESS, LOCAL_CA_CERT, LOCAL_CA_KEY, ZTUNNEL_LOCAL_CA_DIR,\n\
         SECRET_TTL, TRUST_DOMAIN, POOL_MAX_STREAMS_PER_CONNECTION, POOL_UNUSED_RELEASE_TIMEOUT,\n\
         ENABLE_NODE_LOCAL_FAST_PATH, INPOD_UDS, INPOD_PORT_REUSE, TERMINATION_GRACE_PERIOD_SECONDS,\n\
         ZTUNNEL_CPU_LIMIT, ZTUNNEL_RESOURCE_CPU_LIMIT, ISTIO_META_CLUSTER_ID, RUST_LOG. See README.md.\n\n\
         Commands: `proxy ztunnel` (what Istio's chart passes; the default), `version`.\n",
    );
    s
}

/// What the command line asked for.
pub enum Cli {
    Run(HashMap<String, String>),
    Help,
    Version,
}

/// Parses flags into environment overrides.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Cli, ConfigError> {
    let mut overrides = HashMap::new();
    let mut args = args.into_iter().peekable();
    // Istio's chart runs `ztunnel proxy ztunnel`: the `proxy` command (the only one), then the
    // proxy kind, which is always ztunnel.
    if args.peek().is_some_and(|a| a == "proxy") {
        args.next();
        if args.peek().is_some_and(|a| !a.starts_with('-')) {
            let kind = args.next().unwrap_or_default();
            if kind != "ztunnel" {
                return Err(ConfigError::UnknownFlag(format!("proxy {kind}")));
            }
        }
    } else if args.peek().is_some_and(|a| a == "version") {
        return Ok(Cli::Version);
    }
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            return Ok(Cli::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        if let Some((_, var, _)) = SWITCHES.iter().find(|(f, _, _)| *f == name) {
            overrides.insert(var.to_string(), inline.unwrap_or_else(|| "true".into()));
        } else if let Some((_, var, _)) = FLAGS.iter().find(|(f, _, _)| *f == name) {
            let value = match inline {
                Some(v) => v,
                None => args.next().ok_or_else(|| ConfigError::FlagValue(name.clone()))?,
            };
            if *var == "LOCAL_XDS_PATH" {
                // Standalone: no istiod, and no istio-cni to hand over pods.
                overrides.entry("XDS_ADDRESS".to_string()).or_insert_with(String::new);
                overrides.entry("INPOD_ENABLED".to_string()).or_insert_with(|| "false".into());
            }
            overrides.insert(var.to_string(), value);
        } else {
            return Err(ConfigError::UnknownFlag(arg));
        }
    }
    Ok(Cli::Run(overrides))
}

/// Reads variables through `get`, so tests need not touch the process environment.
pub struct Source<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
    /// Every variable, for the prefixed families (`XDS_HEADER_*`); empty in tests that only
    /// answer by name.
    all: Vec<(String, String)>,
}

impl<'a> Source<'a> {
    pub fn new(get: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Source { get, all: Vec::new() }
    }

    /// A source that also lists every variable (the process environment and the flags).
    pub fn with_all(get: &'a dyn Fn(&str) -> Option<String>, all: Vec<(String, String)>) -> Self {
        Source { get, all }
    }

    fn all(&self) -> Vec<(String, String)> {
        self.all.clone()
    }

    fn raw(&self, var: &str) -> Option<String> {
        (self.get)(var)
    }

    /// A set, non-empty value.
    fn value(&self, var: &str) -> Option<String> {
        self.raw(var).filter(|v| !v.trim().is_empty()).map(|v| v.trim().to_string())
    }

    fn parse<T>(&self, var: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>, ConfigError> {
        match self.value(var) {
            None => Ok(None),
            Some(v) => f(&v).map(Some).map_err(|reason| invalid(var, &v, reason)),
        }
    }

    fn bool(&self, var: &str) -> Result<Option<bool>, ConfigError> {
        self.parse(var, parse_bool)
    }

    fn duration(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        Ok(self.parse(var, parse_duration)?.unwrap_or(default))
    }

    fn addr(&self, var: &str, default: SocketAddr) -> Result<SocketAddr, ConfigError> {
        Ok(self
            .parse(var, |v| v.parse::<SocketAddr>().map_err(|e| format!("expected IP:PORT ({e})")))?
            .unwrap_or(default))
    }
}

/// Exactly what Istio's ztunnel accepts for a boolean: `true` or `false`.
pub fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// Settings Istio's ztunnel has that this proxy does not implement and that decide what is
/// trusted: ignoring them would silently weaken a mesh that relies on them, so start-up refuses.
const REFUSED: [(&str, &str); 3] = [
    ("CRL_PATH", "certificate revocation lists are not supported"),
    ("TLS12_ENABLED", "only TLS 1.3 is supported"),
    ("COMPLIANCE_POLICY", "compliance policies (FIPS cipher restrictions) are not supported"),
];

/// Parses durations such as `5s`, `100ms`, `1m30s`, `1.5h`, `24h`, `2d`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let s: String = v.chars().filter(|c| !c.is_whitespace()).collect();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    // A bare number is seconds, as in Istio's ztunnel.
    if let Ok(secs) = s.parse::<f64>() {
        return if secs.is_finite() && (0.0..1e12).contains(&secs) {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err("duration out of range".into())
        };
    }
    let mut total = 0f64;
    let mut rest = s.as_str();
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_end == 0 {
            return Err("expected a number followed by a unit (ns, us, ms, s, m, h, d), e.g. 5s".into());
        }
        let num: f64 = rest[..num_end].parse().map_err(|_| format!("bad number {:?}", &rest[..num_end]))?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" | "hr" | "hrs" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            "" => return Err("a number must be followed by a unit (ns, us, ms, s, m, h, d), e.g. 1m30s".into()),
            other => return Err(format!("unknown unit {other:?}")),
        };
        total += num * scale;
    }
    if !total.is_finite() || total > 1e12 {
        return Err("duration too large".into());
    }
    Ok(Duration::from_secs_f64(total))
}

fn parse_workload_info(v: &str) -> Result<WorkloadInfo, String> {
    let parts: Vec<&str> = v.split('/').collect();
    match parts.as_slice() {
        [ns, name, sa] if !ns.is_empty() && !name.is_empty() && !sa.is_empty() => {
            Ok(WorkloadInfo { namespace: ns.to_string(), name: name.to_string(), service_account: sa.to_string() })
        }
        _ => Err("expected namespace/name/serviceaccount".into()),
    }
}

/// The CPUs the proxy may use, as Istio counts them: `ZTUNNEL_RESOURCE_CPU_LIMIT` (a Kubernetes
/// quantity such as `2`, `1.5` or `500m`, rounded up), else `ZTUNNEL_CPU_LIMIT` (a whole number),
/// else the machine's cores.
fn cpu_count(src: &Source, cores: usize) -> Result<usize, ConfigError> {
    if let Some(n) = src.parse("ZTUNNEL_RESOURCE_CPU_LIMIT", parse_cpu_quantity)? {
        return Ok(n);
    }
    if let Some(n) = src.parse("ZTUNNEL_CPU_LIMIT", |v| {
        v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| "expected a whole number of CPUs above 0".to_string())
    })? {
        return Ok(n);
    }
    Ok(cores)
}

/// A Kubernetes CPU quantity (`2`, `1.5`, `500m`), rounded up to whole CPUs.
fn parse_cpu_quantity(v: &str) -> Result<usize, String> {
    let cpus = match v.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().map(|m| m / 1000.0),
        None => v.parse::<f64>(),
    }
    .map_err(|_| "expected a CPU quantity such as 2, 1.5 or 500m".to_string())?;
    if !cpus.is_finite() || cpus <= 0.0 || cpus > 1024.0 {
        return Err("must be above 0 and at most 1024 CPUs".into());
    }
    Ok(cpus.ceil() as usize)
}

/// `TERMINATION_GRACE_PERIOD_SECONDS` (the pod's grace period, which Istio's chart passes) ->
/// the drain deadline as Istio derives it: 5 s short of the grace period (1 s for periods of
/// 10 s and less), at least 1 s. `CONNECTION_TERMINATION_DEADLINE` wins over it.
fn termination_deadline(src: &Source) -> Result<Duration, ConfigError> {
    if src.value("CONNECTION_TERMINATION_DEADLINE").is_some() {
        return src.duration("CONNECTION_TERMINATION_DEADLINE", Duration::from_secs(5));
    }
    let grace = src.parse("TERMINATION_GRACE_PERIOD_SECONDS", |v| {
        v.parse::<u64>().map_err(|_| "expected a whole number of seconds".to_string())
    })?;
    Ok(match grace {
        None => Duration::from_secs(5),
        Some(s) => Duration::from_secs(if s > 10 { s - 5 } else { s.saturating_sub(1) }.max(1)),
    })
}

/// HBONE's HTTP/2 flow control, as Istio's ztunnel sets it by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Http2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub frame_size: u32,
}

impl Default for Http2Settings {
    fn default() -> Http2Settings {
        Http2Settings { stream_window: 4 << 20, connection_window: 16 << 20, frame_size: 1 << 20 }
    }
}

/// `HTTP2_STREAM_WINDOW_SIZE`, `HTTP2_CONNECTION_WINDOW_SIZE`, `HTTP2_FRAME_SIZE`, in bytes.
fn http2(src: &Source) -> Result<Http2Settings, ConfigError> {
    let d = Http2Settings::default();
    let size = |var: &str, default: u32, range: std::ops::RangeInclusive<u32>| -> Result<u32, ConfigError> {
        Ok(src
            .parse(var, |v| {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| range.contains(n))
                    .ok_or_else(|| format!("expected bytes in {}..={}", range.start(), range.end()))
            })?
            .unwrap_or(default))
    };
    let h = Http2Settings {
        stream_window: size("HTTP2_STREAM_WINDOW_SIZE", d.stream_window, 65_535..=(1 << 31) - 1)?,
        connection_window: size("HTTP2_CONNECTION_WINDOW_SIZE", d.connection_window, 65_535..=(1 << 31) - 1)?,
        // HTTP/2's own bounds for SETTINGS_MAX_FRAME_SIZE.
        frame_size: size("HTTP2_FRAME_SIZE", d.frame_size, 16_384..=(1 << 24) - 1)?,
    };
    if h.connection_window < h.stream_window {
        // A connection window smaller than one stream's lets one stream starve the rest and
        // deadlocks under load.
        return Err(invalid(
            "HTTP2_CONNECTION_WINDOW_SIZE",
            &h.connection_window.to_string(),
            "must be at least HTTP2_STREAM_WINDOW_SIZE (Istio keeps it 4x larger)",
        ));
    }
    Ok(h)
}

/// Variables named `<prefix><NAME>`: request metadata `name` (lowercase, `_` as `-`) -> value.
fn headers(all: &[(String, String)], prefix: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (k, v) in all {
        let Some(name) = k.strip_prefix(prefix) else { continue };
        let name = name.to_ascii_lowercase().replace('_', "-");
        let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(invalid(k, v, "expected a header name of letters, digits and _, and a printable value"));
        }
        out.push((name, v.clone()));
    }
    Ok(out)
}

/// `ISTIO_META_DNS_PROXY_ADDR`: `localhost:PORT` (both loopback addresses) or `IP:PORT`.
fn parse_dns_addr(v: &str) -> Result<Vec<SocketAddr>, String> {
    if let Some(port) = v.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| "expected localhost:PORT or IP:PORT".to_string())?;
        return Ok(vec![
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        ]);
    }
    v.parse::<SocketAddr>().map(|a| vec![a]).map_err(|_| "expected localhost:PORT or IP:PORT".to_string())
}

/// An istiod address: `https://host:port`, or `host:port`, which means https as in Istio.
fn istiod_address(var: &str, v: &str) -> Result<String, ConfigError> {
    if v.starts_with("https://") {
        return Ok(v.to_string());
    }
    if v.contains("://") {
        return Err(invalid(var, v, "expected https://host:port or host:port (istiod serves TLS)"));
    }
    let (host, port) = v.rsplit_once(':').ok_or_else(|| invalid(var, v, "expected host:port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(var, v, "expected host:port"));
    }
    Ok(format!("https://{v}"))
}

fn parse_workers(v: &str, cores: usize) -> Result<usize, String> {
    let n = if let Some(pct) = v.strip_suffix('%') {
        let p: f64 = pct.parse().map_err(|_| "expected a count or a percentage of cores".to_string())?;
        if !(p > 0.0 && p <= 100.0) {
            return Err("percentage must be in (0, 100]".into());
        }
        ((cores as f64 * p / 100.0).ceil() as usize).max(1)
    } else {
        // 0 means one per CPU, as in Istio.
        match v.parse::<usize>().map_err(|_| "expected a count or a percentage of cores".to_string())? {
            0 => cores,
            n => n,
        }
    };
    if n == 0 || n > 1024 {
        return Err("must be between 1 and 1024".into());
    }
    Ok(n)
}

/// True when the host has an IPv6 stack, so wildcard listeners can be dual-stack.
/// `PROXY_MODE`, and the workload a dedicated proxy serves (`PROXY_WORKLOAD_INFO`, required there).
fn proxy_mode(src: &Source) -> Result<(ProxyMode, Option<WorkloadInfo>), ConfigError> {
    let mode = match src.value("PROXY_MODE").as_deref() {
        None => ProxyMode::Shared,
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "shared" => ProxyMode::Shared,
            "dedicated" => ProxyMode::Dedicated,
            _ => return Err(invalid("PROXY_MODE", v, "expected shared or dedicated")),
        },
    };
    let info = src.parse("PROXY_WORKLOAD_INFO", parse_workload_info)?;
    if mode == ProxyMode::Dedicated && info.is_none() {
        return Err(ConfigError::Missing {
            var: "PROXY_WORKLOAD_INFO",
            why: "in dedicated mode (namespace/name/serviceaccount of the proxied workload)",
        });
    }
    Ok((mode, info))
}

/// Where config comes from: `LOCAL_XDS_PATH` and/or istiod at `XDS_ADDRESS` (Istio's semantics:
/// unset means the in-cluster istiod, an empty value disables xDS). At least one is required.
fn config_sources(src: &Source) -> Result<(Option<PathBuf>, Option<String>), ConfigError> {
    let local_xds_path = src.value("LOCAL_XDS_PATH").map(PathBuf::from);
    if local_xds_path.is_some() && src.value("LOCAL_XDS").is_some() {
        return Err(invalid("LOCAL_XDS", "(inline config)", "set LOCAL_XDS or LOCAL_XDS_PATH, not both"));
    }
    let xds_address = match src.raw("XDS_ADDRESS") {
        None => Some("https://istiod.istio-system.svc:15012".to_string()),
        Some(v) if v.trim().is_empty() => None,
        Some(v) => Some(istiod_address("XDS_ADDRESS", v.trim())?),
    };
    if local_xds_path.is_none() && src.value("LOCAL_XDS").is_none() && xds_address.is_none() {
        return Err(ConfigError::Missing {
            var: "LOCAL_XDS_PATH",
            why: "when xDS is disabled (XDS_ADDRESS=): the proxy needs a config source",
        });
    }
    Ok((local_xds_path, xds_address))
}

/// Where certificates come from: `FAKE_CA` (Istio's name) or an empty `CA_ADDRESS` select the
/// local CA; otherwise the Istio CA at `CA_ADDRESS`, by default istiod (when xDS is on). With
/// the local CA's settings and the certificate lifetime.
fn certificate_source(
    src: &Source,
    xds_address: Option<&String>,
) -> Result<(Option<String>, LocalCaConfig, Duration), ConfigError> {
    let fake_ca = src.bool("FAKE_CA")?.unwrap_or(false);
    let ca_address = if fake_ca {
        None
    } else {
        match src.raw("CA_ADDRESS") {
            None => xds_address.cloned(),
            Some(v) if v.trim().is_empty() => None,
            Some(v) => Some(istiod_address("CA_ADDRESS", v.trim())?),
        }
    };
    let ca = LocalCaConfig {
        cert: src.value("LOCAL_CA_CERT").map(PathBuf::from),
        key: src.value("LOCAL_CA_KEY").map(PathBuf::from),
        dir: src
            .value("ZTUNNEL_LOCAL_CA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("ztunnel-local-ca")),
    };
    match (&ca.cert, &ca.key) {
        (Some(_), None) => return Err(ConfigError::Missing { var: "LOCAL_CA_KEY", why: "when LOCAL_CA_CERT is set" }),
        (None, Some(_)) => return Err(ConfigError::Missing { var: "LOCAL_CA_CERT", why: "when LOCAL_CA_KEY is set" }),
        _ => {}
    }
    let secret_ttl = src.duration("SECRET_TTL", Duration::from_secs(24 * 3600))?;
    if secret_ttl < Duration::from_secs(2) {
        return Err(invalid("SECRET_TTL", &format!("{secret_ttl:?}"), "must be at least 2s"));
    }
    Ok((ca_address, ca, secret_ttl))
}

/// `PACKET_MARK` (decimal or 0x hex; 0 disables). Istio marks by default only in shared mode,
/// where the redirection rules need it.
fn packet_mark(src: &Source, mode: ProxyMode) -> Result<Option<u32>, ConfigError> {
    let mark = src.parse("PACKET_MARK", |v| {
        let v = v.trim();
        let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => v.parse::<u32>(),
        };
        n.map_err(|_| "expected a 32-bit unsigned integer (decimal or 0x hex)".to_string())
    })?;
    Ok(match mark {
        None if mode == ProxyMode::Shared => Some(DEFAULT_PACKET_MARK),
        None | Some(0) => None,
        Some(m) => Some(m),
    })
}

fn io_driver(src: &Source) -> Result<IoDriver, ConfigError> {
    Ok(match src.value("ZTUNNEL_IO_DRIVER").as_deref() {
        None => IoDriver::Auto,
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "auto" => IoDriver::Auto,
            "uring" | "io_uring" | "iouring" => IoDriver::Uring,
            "epoll" | "legacy" => IoDriver::Epoll,
            _ => return Err(invalid("ZTUNNEL_IO_DRIVER", v, "expected auto, uring or epoll")),
        },
    })
}

/// `LOG_FORMAT`: `json`, or anything else for plain text (as in Istio, where only `json` is
/// special).
fn log_format(src: &Source) -> LogFormat {
    match src.value("LOG_FORMAT") {
        Some(v) if v.eq_ignore_ascii_case("json") => LogFormat::Json,
        _ => LogFormat::Plain,
    }
}

/// Every listener address: the data ports on the wildcard address (IPv6 when the host has it),
/// SOCKS5 and admin on localhost.
fn listeners(src: &Source) -> Result<Listeners, ConfigError> {
    let wildcard: IpAddr = if ipv6_available() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let localhost: IpAddr = Ipv4Addr::LOCALHOST.into();
    Ok(Listeners {
        outbound: src.addr("ZTUNNEL_OUTBOUND_ADDR", SocketAddr::new(wildcard, 15001))?,
        inbound_plain: src.addr("ZTUNNEL_INBOUND_PLAINTEXT_ADDR", SocketAddr::new(wildcard, 15006))?,
        inbound: src.addr("ZTUNNEL_INBOUND_ADDR", SocketAddr::new(wildcard, 15008))?,
        socks5: src.addr("ZTUNNEL_SOCKS5_ADDR", SocketAddr::new(localhost, 15080))?,
        admin: src.addr("ZTUNNEL_ADMIN_ADDR", SocketAddr::new(localhost, 15000))?,
        readiness: src.addr("ZTUNNEL_READINESS_ADDR", SocketAddr::new(wildcard, 15021))?,
        metrics: src.addr("ZTUNNEL_METRICS_ADDR", SocketAddr::new(wildcard, 15020))?,
    })
}

fn ipv6_available() -> bool {
    std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

impl Config {
    /// Builds and validates the configuration.
    pub fn from_source(src: &Source) -> Result<Config, ConfigError> {
        for (var, why) in REFUSED {
            if let Some(v) = src.value(var) {
                // Istio's own "off" values change nothing: accepted.
                if !(var == "TLS12_ENABLED" && v == "false") {
                    return Err(invalid(var, &v, format!("{why}; unset it to run this proxy")));
                }
            }
        }
        let (proxy_mode, workload_info) = proxy_mode(src)?;
        let inpod = proxy_mode == ProxyMode::Shared && src.bool("INPOD_ENABLED")?.unwrap_or(true);
        let (local_xds_path, xds_address) = config_sources(src)?;
        let node_name = src.value("NODE_NAME");
        if proxy_mode == ProxyMode::Shared && xds_address.is_some() && node_name.is_none() {
            // Which workloads are ours is decided by their node: without one, every workload
            // in the mesh would pass as local (a valid source, an inbound target, a certificate
            // this proxy may ask for).
            return Err(ConfigError::Missing {
                var: "NODE_NAME",
                why: "in shared mode with istiod (it decides which of the mesh's workloads run on this node)",
            });
        }
        let (ca_address, ca, secret_ttl) = certificate_source(src, xds_address.as_ref())?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let cores = cpu_count(src, cores)?;
        let termination_deadline = termination_deadline(src)?;
        let connect_timeout = src.duration("ZTUNNEL_CONNECT_TIMEOUT", Duration::from_secs(10))?;
        if connect_timeout.is_zero() {
            return Err(invalid("ZTUNNEL_CONNECT_TIMEOUT", "0", "must be above zero"));
        }
        let local_config_poll = src.duration("ZTUNNEL_LOCAL_CONFIG_POLL", Duration::from_millis(50))?;
        if local_config_poll < Duration::from_millis(1) {
            return Err(invalid("ZTUNNEL_LOCAL_CONFIG_POLL", "0", "must be at least 1ms"));
        }
        let inpod_port_reuse = src.bool("INPOD_PORT_REUSE")?.unwrap_or(true);
        if inpod && !inpod_port_reuse {
            // Every worker binds its own listener on each pod port: the kernel spreads a pod's
            // connections over them only through SO_REUSEPORT.
            return Err(invalid(
                "INPOD_PORT_REUSE",
                "false",
                "not supported: each worker binds its own SO_REUSEPORT listener per pod port",
            ));
        }
        Ok(Config {
            proxy_mode,
            workload_info,
            node_name,
            inpod,
            inpod_uds: src
                .value("INPOD_UDS")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/var/run/ztunnel/ztunnel.sock".into()),
            inpod_port_reuse,
            local_xds_path,
            ca_root_ca: src
                .value("CA_ROOT_CA")
                .or_else(|| src.value("XDS_ROOT_CA"))
                .unwrap_or_else(|| "/var/run/secrets/istio/root-cert.pem".into()),
            xds_root_ca: src.value("XDS_ROOT_CA").unwrap_or_else(|| "/var/run/secrets/istio/root-cert.pem".into()),
            xds_address,
            ca_address,
            alt_xds_hostname: src.value("ALT_XDS_HOSTNAME").filter(|v| !v.trim().is_empty()),
            alt_ca_hostname: src.value("ALT_CA_HOSTNAME").filter(|v| !v.trim().is_empty()),
            auth_token: match src.raw("AUTH_TOKEN") {
                None => Some(PathBuf::from("/var/run/secrets/tokens/istio-token")),
                Some(v) if v.trim().is_empty() => None,
                Some(v) => Some(PathBuf::from(v.trim())),
            },
            cluster_id: src
                .value("ISTIO_META_CLUSTER_ID")
                .or_else(|| src.value("CLUSTER_ID"))
                .unwrap_or_else(|| "Kubernetes".into()),
            cluster_domain: src.value("CLUSTER_DOMAIN").unwrap_or_else(|| "cluster.local".into()),
            network: src.value("NETWORK").unwrap_or_default(),
            instance_ip: src.parse("INSTANCE_IP", |v| v.parse::<IpAddr>().map_err(|e| e.to_string()))?,
            pod_name: src.value("POD_NAME"),
            pod_namespace: src.value("POD_NAMESPACE"),
            service_account: src.value("SERVICE_ACCOUNT"),
            packet_mark: packet_mark(src, proxy_mode)?,
            enable_orig_src: src.bool("ENABLE_ORIG_SRC")?,
            socks5: src.bool("UNSTABLE_ENABLE_SOCKS5")?.unwrap_or(false),
            splice: src.bool("ZTUNNEL_SPLICE")?.unwrap_or(true),
            worker_threads: src.parse("ZTUNNEL_WORKER_THREADS", |v| parse_workers(v, cores))?.unwrap_or(cores),
            pin_workers: src.bool("ZTUNNEL_PIN_WORKERS")?.unwrap_or(true),
            io_driver: io_driver(src)?,
            termination_deadline,
            connect_timeout,
            local_config_poll,
            log_format: log_format(src),
            listeners: listeners(src)?,
            ca,
            secret_ttl,
            trust_domain: src.value("TRUST_DOMAIN").unwrap_or_else(|| "cluster.local".into()),
            hbone_port: src
                .parse("ZTUNNEL_HBONE_PORT", |v| {
                    v.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| "expected a port number".to_string())
                })?
                .unwrap_or(15008),
            pool_max_streams: src
                .parse("POOL_MAX_STREAMS_PER_CONNECTION", |v| {
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=10_000).contains(n))
                        .ok_or_else(|| "expected 1..=10000".to_string())
                })?
                .unwrap_or(100),
            pool_idle_timeout: src.duration("POOL_UNUSED_RELEASE_TIMEOUT", Duration::from_secs(300))?,
            node_local_fast_path: src.bool("ENABLE_NODE_LOCAL_FAST_PATH")?.unwrap_or(true),
            dns_capture: src.value("ISTIO_META_DNS_CAPTURE").is_none_or(|v| v.eq_ignore_ascii_case("true")),
            dns_proxy_addrs: src
                .parse("ISTIO_META_DNS_PROXY_ADDR", parse_dns_addr)?
                .unwrap_or_else(|| parse_dns_addr("localhost:15053").expect("the default is valid")),
            ipv6_enabled: src.bool("IPV6_ENABLED")?.unwrap_or(true),
            preferred_service_namespace: src.value("PREFERED_SERVICE_NAMESPACE"),
            resolv_conf: src
                .value("ZTUNNEL_RESOLV_CONF")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/etc/resolv.conf".into()),
            http2: http2(src)?,
            tcp_user_timeout: src
                .bool("USER_TIMEOUT_ENABLED")?
                .unwrap_or(false)
                .then(|| Duration::from_secs(180 + 9 * 180)),
            local_xds_inline: src.value("LOCAL_XDS"),
            xds_headers: headers(&src.all(), "XDS_HEADER_")?,
            ca_headers: headers(&src.all(), "CA_HEADER_")?,
            hbone_keepalive_interval: Duration::from_secs(10),
            hbone_keepalive_timeout: Duration::from_secs(20),
        })
    }

    /// Reads the process environment with flag overrides on top.
    pub fn from_env_and_flags(overrides: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let get = |k: &str| overrides.get(k).cloned().or_else(|| std::env::var(k).ok());
        let mut all: Vec<(String, String)> = std::env::vars().collect();
        all.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
        Config::from_source(&Source::with_all(&get, all))
    }

    /// A configuration for in-process tests: every listener on 127.0.0.1 port 0.
    #[cfg(any(test, feature = "testing"))]
    pub fn for_tests(local_xds_path: PathBuf) -> Config {
        // The local CA's root lives next to the config file, in the test's own directory.
        let ca_dir = local_xds_path.parent().map(|p| p.join("ca")).unwrap_or_else(|| std::env::temp_dir().join("ca"));
        let vars: HashMap<&str, String> = [
            ("ZTUNNEL_LOCAL_CA_DIR", ca_dir.display().to_string()),
            ("XDS_ADDRESS", String::new()),
            ("INPOD_ENABLED", "false".into()),
            ("LOCAL_XDS_PATH", local_xds_path.display().to_string()),
            ("UNSTABLE_ENABLE_SOCKS5", "true".into()),
            ("ZTUNNEL_WORKER_THREADS", "2".into()),
            ("ZTUNNEL_OUTBOUND_ADDR", "127.0.0.1:0".into()),
            ("ZTUNNEL_INBOUND_PLAINTEXT_ADDR", "127.0.0.1:0".into()),
            // Wildcard: HBONE finds the destination workload by the address a client dialed.
            ("ZTUNNEL_INBOUND_ADDR", "0.0.0.0:0".into()),
            ("ZTUNNEL_SOCKS5_ADDR", "127.0.0.1:0".into()),
            ("ZTUNNEL_ADMIN_ADDR", "127.0.0.1:0".into()),
            ("ZTUNNEL_READINESS_ADDR", "127.0.0.1:0".into()),
            ("ZTUNNEL_METRICS_ADDR", "127.0.0.1:0".into()),
            ("PACKET_MARK", "0".into()),
            ("ENABLE_ORIG_SRC", "false".into()),
            ("CONNECTION_TERMINATION_DEADLINE", "1s".into()),
            ("FAKE_CA", "true".into()),
            ("ISTIO_META_DNS_PROXY_ADDR", "127.0.0.1:0".into()),
        ]
        .into_iter()
        .collect();
        let get = |k: &str| vars.get(k).cloned();
        Config::from_source(&Source::new(&get)).expect("test configuration is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let get = |k: &str| map.get(k).cloned();
        Config::from_source(&Source::new(&get))
    }

    const BASE: &[(&str, &str)] = &[("XDS_ADDRESS", ""), ("LOCAL_XDS_PATH", "x.yaml")];

    fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        BASE.iter().chain(extra).copied().collect()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("1m30").unwrap_err().contains("followed by a unit"));
        assert!(parse_duration("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn defaults() {
        let c = cfg(BASE).unwrap();
        assert_eq!(c.proxy_mode, ProxyMode::Shared);
        assert_eq!(c.packet_mark, Some(1337));
        assert_eq!(c.termination_deadline, Duration::from_secs(5));
        assert!(!c.socks5);
        assert_eq!(c.listeners.outbound.port(), 15001);
        assert_eq!(c.listeners.socks5, "127.0.0.1:15080".parse().unwrap());
        assert!(c.worker_threads >= 1);
        assert_eq!(c.io_driver, IoDriver::Auto);
    }

    #[test]
    fn values_are_parsed() {
        let c = cfg(&with(&[
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", "ns1/pod1/sa1"),
            ("PACKET_MARK", "0x10"),
            ("UNSTABLE_ENABLE_SOCKS5", "true"),
            ("ZTUNNEL_WORKER_THREADS", "3"),
            ("CONNECTION_TERMINATION_DEADLINE", "250ms"),
            ("LOG_FORMAT", "json"),
            ("ENABLE_ORIG_SRC", "false"),
            ("ZTUNNEL_IO_DRIVER", "epoll"),
        ]))
        .unwrap();
        assert_eq!(c.proxy_mode, ProxyMode::Dedicated);
        assert_eq!(c.workload_info.unwrap().service_account, "sa1");
        assert_eq!(c.packet_mark, Some(16));
        assert!(c.socks5);
        assert_eq!(c.worker_threads, 3);
        assert_eq!(c.termination_deadline, Duration::from_millis(250));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.enable_orig_src, Some(false));
        assert_eq!(c.io_driver, IoDriver::Epoll);
        assert_eq!(cfg(&with(&[("PACKET_MARK", "0")])).unwrap().packet_mark, None);
    }

    #[test]
    fn invalid_values_name_the_variable() {
        for (var, value) in [
            ("PACKET_MARK", "abc"),
            ("PROXY_MODE", "both"),
            ("PROXY_WORKLOAD_INFO", "ns/name"),
            ("ZTUNNEL_WORKER_THREADS", "-1"),
            ("ZTUNNEL_WORKER_THREADS", "150%"),
            ("ZTUNNEL_CPU_LIMIT", "500m"),
            ("ZTUNNEL_RESOURCE_CPU_LIMIT", "0"),
            ("TERMINATION_GRACE_PERIOD_SECONDS", "soon"),
            ("INPOD_ENABLED", "maybe"),
            ("XDS_ADDRESS", "istiod"),
            ("CONNECTION_TERMINATION_DEADLINE", "soon"),
            ("UNSTABLE_ENABLE_SOCKS5", "maybe"),
            ("UNSTABLE_ENABLE_SOCKS5", "1"),
            ("ENABLE_ORIG_SRC", "yes"),
            ("CRL_PATH", "/etc/crl.pem"),
            ("TLS12_ENABLED", "true"),
            ("COMPLIANCE_POLICY", "fips-140-2"),
            ("ZTUNNEL_OUTBOUND_ADDR", "nowhere"),
        ] {
            let err = cfg(&with(&[(var, value)])).unwrap_err().to_string();
            assert!(err.contains(var), "{var}: {err}");
            assert!(err.contains(value), "{var}: {err}");
        }
        let err = cfg(&with(&[("PROXY_MODE", "dedicated")])).unwrap_err().to_string();
        assert!(err.contains("PROXY_WORKLOAD_INFO"), "{err}");
        let c = cfg(&with(&[("CA_ADDRESS", "https://istiod:15012")])).unwrap();
        assert_eq!(c.ca_address.as_deref(), Some("https://istiod:15012"));
        let err = cfg(&with(&[("CA_ADDRESS", "http://istiod:15012")])).unwrap_err().to_string();
        assert!(err.contains("CA_ADDRESS"), "{err}");
        let c = cfg(&with(&[("CA_ADDRESS", "https://istiod:15012"), ("FAKE_CA", "true")])).unwrap();
        assert_eq!(c.ca_address, None, "FAKE_CA wins");
        let c = cfg(&[("XDS_ADDRESS", "https://istiod:15012"), ("NODE_NAME", "n1")]).unwrap();
        assert_eq!(c.ca_address.as_deref(), Some("https://istiod:15012"), "the CA defaults to istiod");
        let err = cfg(&[("XDS_ADDRESS", "https://istiod:15012")]).unwrap_err().to_string();
        assert!(err.contains("NODE_NAME"), "shared mode under istiod needs its node: {err}");
        let dedicated =
            [("XDS_ADDRESS", "https://istiod:15012"), ("PROXY_MODE", "dedicated"), ("PROXY_WORKLOAD_INFO", "ns/a/sa")];
        assert!(cfg(&dedicated).is_ok(), "a dedicated proxy knows its one workload");
        let err = cfg(&[("XDS_ADDRESS", "http://istiod:15010")]).unwrap_err().to_string();
        assert!(err.contains("XDS_ADDRESS"), "{err}");
        let err = cfg(&with(&[("LOCAL_CA_CERT", "/x.pem")])).unwrap_err().to_string();
        assert!(err.contains("LOCAL_CA_KEY"), "{err}");
        let err = cfg(&with(&[("SECRET_TTL", "1s")])).unwrap_err().to_string();
        assert!(err.contains("SECRET_TTL"), "{err}");
        let err = cfg(&[("XDS_ADDRESS", "")]).unwrap_err().to_string();
        assert!(err.contains("LOCAL_XDS_PATH"), "{err}");
    }

    /// What Istio's Helm chart (ambient profile, defaults) passes to the ztunnel container,
    /// through the same path as the binary: arguments, then the environment.
    #[test]
    fn helm_chart_environment_and_arguments() {
        let Cli::Run(overrides) = parse_args(["proxy".into(), "ztunnel".into()]).unwrap() else {
            panic!("`proxy ztunnel` runs the proxy");
        };
        assert!(overrides.is_empty());
        let chart: HashMap<&str, &str> = [
            ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
            ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
            ("RUST_LOG", "info"),
            ("RUST_BACKTRACE", "1"),
            ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
            ("CLUSTER_ID", "ignored-when-istio-meta-is-set"),
            ("INPOD_ENABLED", "true"),
            ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
            ("POD_NAME", "ztunnel-abcde"),
            ("POD_NAMESPACE", "istio-system"),
            ("NODE_NAME", "node-1"),
            ("INSTANCE_IP", "10.0.0.7"),
            ("SERVICE_ACCOUNT", "ztunnel"),
            ("ISTIO_META_ENABLE_HBONE", "true"),
            ("ZTUNNEL_CPU_LIMIT", "3"),
            ("ZTUNNEL_RESOURCE_CPU_REQUEST", "200m"),
            ("LOG_FORMAT", "logfmt"),
        ]
        .into_iter()
        .collect();
        let get = |k: &str| overrides.get(k).cloned().or_else(|| chart.get(k).map(|v| v.to_string()));
        let c = Config::from_source(&Source::new(&get)).unwrap();
        assert_eq!(c.proxy_mode, ProxyMode::Shared);
        assert!(c.inpod, "shared mode is in-pod mode");
        assert_eq!(c.inpod_uds, PathBuf::from("/var/run/ztunnel/ztunnel.sock"));
        assert!(c.inpod_port_reuse);
        assert_eq!(c.xds_address.as_deref(), Some("https://istiod.istio-system.svc:15012"));
        assert_eq!(c.ca_address.as_deref(), Some("https://istiod.istio-system.svc:15012"));
        assert_eq!(c.cluster_id, "Kubernetes", "ISTIO_META_CLUSTER_ID wins over CLUSTER_ID");
        assert_eq!(c.termination_deadline, Duration::from_secs(25), "the grace period minus 5 s");
        assert_eq!(c.worker_threads, 3, "one worker per CPU of the limit");
        assert_eq!(c.log_format, LogFormat::Plain, "an unknown LOG_FORMAT is plain");
        assert_eq!(c.packet_mark, Some(1337));
        assert_eq!(c.node_name.as_deref(), Some("node-1"));
        assert_eq!(c.auth_token, Some(PathBuf::from("/var/run/secrets/tokens/istio-token")));
        assert_eq!(c.xds_root_ca, "/var/run/secrets/istio/root-cert.pem");
        assert_eq!(c.listeners.admin.port(), 15000);
        assert_eq!(c.listeners.metrics.port(), 15020);
        assert_eq!(c.listeners.readiness.port(), 15021);
    }

    #[test]
    fn http2_headers_and_inline_config() {
        let c = cfg(&with(&[("HTTP2_STREAM_WINDOW_SIZE", "1048576"), ("HTTP2_CONNECTION_WINDOW_SIZE", "4194304")]))
            .unwrap();
        assert_eq!((c.http2.stream_window, c.http2.connection_window, c.http2.frame_size), (1 << 20, 4 << 20, 1 << 20));
        assert_eq!(cfg(BASE).unwrap().http2, Http2Settings::default());
        for (var, value) in [
            ("HTTP2_FRAME_SIZE", "100"),
            ("HTTP2_STREAM_WINDOW_SIZE", "big"),
            ("HTTP2_CONNECTION_WINDOW_SIZE", "70000"),
        ] {
            let err = cfg(&with(&[(var, value)])).unwrap_err().to_string();
            assert!(err.contains(var), "{var}: {err}");
        }
        let all: Vec<(String, String)> = vec![
            ("XDS_HEADER_X_TENANT".into(), "blue".into()),
            ("CA_HEADER_AUTHORITY_HINT".into(), "ca".into()),
            ("UNRELATED".into(), "x".into()),
        ];
        let map: HashMap<String, String> =
            BASE.iter().map(|(k, v)| (k.to_string(), v.to_string())).chain(all.clone()).collect();
        let get = |k: &str| map.get(k).cloned();
        let c = Config::from_source(&Source::with_all(&get, all)).unwrap();
        assert_eq!(c.xds_headers, vec![("x-tenant".to_string(), "blue".to_string())]);
        assert_eq!(c.ca_headers, vec![("authority-hint".to_string(), "ca".to_string())]);
        let bad = vec![("XDS_HEADER_X".to_string(), "line\nbreak".to_string())];
        let get = |k: &str| {
            bad.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .or_else(|| BASE.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
        };
        assert!(
            Config::from_source(&Source::with_all(&get, bad.clone())).unwrap_err().to_string().contains("XDS_HEADER_X")
        );
        assert_eq!(cfg(BASE).unwrap().tcp_user_timeout, None);
        assert_eq!(
            cfg(&with(&[("USER_TIMEOUT_ENABLED", "true")])).unwrap().tcp_user_timeout,
            Some(Duration::from_secs(1800))
        );
        // Inline config is a source of its own; not together with a file.
        let c = cfg(&[("XDS_ADDRESS", ""), ("LOCAL_XDS", "workloads: []")]).unwrap();
        assert_eq!(c.local_xds_inline.as_deref(), Some("workloads: []"));
        let err = cfg(&with(&[("LOCAL_XDS", "workloads: []")])).unwrap_err().to_string();
        assert!(err.contains("LOCAL_XDS"), "{err}");
    }

    #[test]
    fn istio_worker_and_deadline_semantics() {
        let workers = |extra: &[(&'static str, &'static str)]| cfg(&with(extra)).unwrap().worker_threads;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        assert_eq!(workers(&[("ZTUNNEL_WORKER_THREADS", "0")]), cores, "0: one per CPU");
        assert!(cfg(BASE).unwrap().pin_workers, "workers are pinned unless told otherwise");
        assert!(!cfg(&with(&[("ZTUNNEL_PIN_WORKERS", "false")])).unwrap().pin_workers);
        let err = cfg(&with(&[("ZTUNNEL_PIN_WORKERS", "no")])).unwrap_err().to_string();
        assert!(err.contains("ZTUNNEL_PIN_WORKERS"), "{err}");
        assert_eq!(workers(&[("ZTUNNEL_WORKER_THREADS", "0"), ("ZTUNNEL_CPU_LIMIT", "4")]), 4);
        assert_eq!(workers(&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "1500m"), ("ZTUNNEL_CPU_LIMIT", "8")]), 2);
        assert_eq!(workers(&[("ZTUNNEL_WORKER_THREADS", "50%"), ("ZTUNNEL_CPU_LIMIT", "3")]), 2);
        assert_eq!(workers(&[("ZTUNNEL_WORKER_THREADS", "5"), ("ZTUNNEL_CPU_LIMIT", "3")]), 5);
        let deadline = |extra: &[(&'static str, &'static str)]| cfg(&with(extra)).unwrap().termination_deadline;
        assert_eq!(deadline(&[("TERMINATION_GRACE_PERIOD_SECONDS", "10")]), Duration::from_secs(9));
        assert_eq!(deadline(&[("TERMINATION_GRACE_PERIOD_SECONDS", "1")]), Duration::from_secs(1));
        assert_eq!(deadline(&[("TERMINATION_GRACE_PERIOD_SECONDS", "0")]), Duration::from_secs(1));
        assert_eq!(
            deadline(&[("TERMINATION_GRACE_PERIOD_SECONDS", "30"), ("CONNECTION_TERMINATION_DEADLINE", "2s")]),
            Duration::from_secs(2),
            "CONNECTION_TERMINATION_DEADLINE wins"
        );
        assert!(!cfg(&with(&[("INPOD_ENABLED", "false")])).unwrap().inpod);
        assert!(!cfg(&with(&[("PROXY_MODE", "dedicated"), ("PROXY_WORKLOAD_INFO", "a/b/c")])).unwrap().inpod);
        assert!(matches!(parse_args(["version".into()]).unwrap(), Cli::Version));
        assert!(matches!(parse_args(["proxy".into(), "sidecar".into()]), Err(ConfigError::UnknownFlag(_))));
    }

    #[test]
    fn flags_override_and_imply_standalone() {
        let Cli::Run(o) =
            parse_args(["--config".into(), "a.yaml".into(), "--socks5".into(), "--workers=2".into()]).unwrap()
        else {
            panic!("expected run");
        };
        assert_eq!(o["LOCAL_XDS_PATH"], "a.yaml");
        assert_eq!(o["XDS_ADDRESS"], "");
        assert_eq!(o["INPOD_ENABLED"], "false", "a config file without istio-cni: node-level capture");
        assert_eq!(o["UNSTABLE_ENABLE_SOCKS5"], "true");
        assert_eq!(o["ZTUNNEL_WORKER_THREADS"], "2");
        assert!(matches!(parse_args(["--help".into()]).unwrap(), Cli::Help));
        assert!(matches!(parse_args(["--bogus".into()]), Err(ConfigError::UnknownFlag(_))));
        assert!(matches!(parse_args(["--node".into()]), Err(ConfigError::FlagValue(_))));
    }
}

//! The TOML config file: its schema, and validation into the types Fulcrum runs on.
//!
//! Parsing happens in two steps. Serde reads the file into plain structs that
//! mirror the TOML (unknown keys refused); `validate` turns them into a
//! [`Config`] whose values are already checked and typed (socket addresses,
//! durations, byte sizes, resolved paths). Every error names the file, the key
//! and the reason on one line.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a config could not be used. The `Display` form is the one line a user sees.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: {key}: {reason}")]
    Invalid { file: PathBuf, key: String, reason: String },
}

/// A validated config, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this was read from (for messages and reloads).
    pub source: PathBuf,
    /// SHA-256 of the file's text.
    pub digest: TextDigest,
    pub server: ServerConfig,
    pub plugins: PluginsConfig,
    pub admin: AdminConfig,
    /// `[access_log]`; off when absent.
    pub access_log: Option<AccessLogConfig>,
    /// Pools by name, sorted.
    pub pools: BTreeMap<String, PoolConfig>,
    pub routes: Vec<RouteConfig>,
    /// Filters by name (`[filters.NAME]`), sorted.
    pub filters: BTreeMap<String, FilterConfig>,
}

/// One `[filters.NAME]`: a filter plugin with its config.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterConfig {
    /// The plugin's name (a `NAME.wasm` in the plugin directory).
    pub plugin: String,
    /// `config`, as JSON (`{}` when absent).
    pub config: String,
    /// What a fault (deadline, memory cap, trap, bad answer) does to the request.
    pub on_fault: crate::plugin::OnFault,
}

/// The hex SHA-256 of a config file's text: which file serves (the
/// `fulcrum_config_info` metric). Not part of what the config means: two
/// configs that differ only in comments or layout are equal.
#[derive(Debug, Clone, Default)]
pub struct TextDigest(pub String);

impl PartialEq for TextDigest {
    fn eq(&self, _other: &TextDigest) -> bool {
        true
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Every listener: `server.listen` (with `server.tls` and the other
    /// listener keys of `[server]`) first when set, then `[[server.listeners]]`
    /// in order.
    pub listeners: Vec<ListenerConfig>,
    pub admin: Option<SocketAddr>,
    /// The bearer token the admin API asks for; required when `admin` is not
    /// a loopback address.
    pub admin_token: Option<String>,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive client connection is kept open.
    pub client_idle_timeout: Duration,
    /// How long in-flight requests may run on after a stop signal.
    pub shutdown_grace: Duration,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Peers whose `X-Forwarded-For` and `Forwarded` are believed.
    pub trusted_proxies: crate::http::forwarded::TrustedProxies,
    /// Add `Via: 1.1 fulcrum` to requests sent to backends.
    pub via: bool,
    /// Add an RFC 7239 `Forwarded` element for this hop (`for`, `host`,
    /// `proto`) to requests sent to backends.
    pub forwarded: bool,
}

/// One address Fulcrum takes clients on, and how it speaks to them there.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// `server.listen`, or `server.listeners[N]`: its name in logs and metrics.
    pub key: String,
    /// The table its settings are keys of: `server`, or `server.listeners[N]`.
    pub table: String,
    pub listen: SocketAddr,
    /// TLS termination; plain HTTP when `None`.
    pub tls: Option<TlsConfig>,
    /// Every connection starts with a PROXY protocol header (v1 or v2), read
    /// before anything else; a connection without one is closed.
    pub proxy_protocol: bool,
    /// A plain listener that answers every request with a redirect to
    /// `https://` on this port.
    pub redirect_https: Option<u16>,
    /// What a request head may be (`max_head_size`, `max_uri_length`, `max_headers`).
    pub limits: crate::http::HeadLimits,
}

/// A TLS listener's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// Certificates with their keys; the first is served to clients whose
    /// name (SNI) no certificate covers, unless `strict_sni`.
    pub certificates: Vec<CertificateFiles>,
    /// Refuse the handshake of a client whose name no certificate covers.
    pub strict_sni: bool,
    /// Client certificates are checked against these CAs.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client must present a certificate.
    pub client_auth: ClientAuth,
    /// The `Strict-Transport-Security` value added to every answer.
    pub hsts: Option<String>,
    /// Session resumption (tickets and the session cache); on by default.
    pub session_resumption: bool,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether a TLS listener with `client_ca` requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    Optional,
}

/// The access log's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    /// The file, resolved; `None` for stdout (`path = "-"`).
    pub path: Option<PathBuf>,
    pub format: AccessLogFormat,
}

/// How access log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// One JSON object a line.
    Json,
    /// The Apache/nginx combined format, then Fulcrum's fields as `key=value`.
    Combined,
}

/// What the admin API keeps (its listener and token are in `[server]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdminConfig {
    /// Where runtime changes to pools are saved, to survive a restart.
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PluginsConfig {
    /// The drop-in plugin directory, resolved against the config file's folder.
    pub dir: Option<PathBuf>,
    /// CPU deadline of one plugin call.
    pub call_timeout: Duration,
    /// Linear memory cap of one plugin instance, in bytes.
    pub memory_limit: usize,
    /// Where compiled plugins are kept between starts; `None`: not kept.
    pub cache_dir: Option<PathBuf>,
    /// Per-plugin `call_timeout` and `memory_limit` (`[plugins.limits.NAME]`),
    /// over the ones above.
    pub limits: BTreeMap<String, PluginLimits>,
    /// Entries of each plugin's shared key-value store.
    pub shared_entries: usize,
}

/// One plugin's own limits; `None` keeps the global one.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginLimits {
    pub call_timeout: Option<Duration>,
    pub memory_limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub policy: String,
    /// `policy_config` as a JSON document, handed to the plugin's `init`.
    pub policy_config: String,
    pub backends: Vec<BackendConfig>,
    pub retries: u32,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Longest silence from a backend in the middle of a response body.
    pub read_timeout: Duration,
    /// How long an idle upstream connection is kept for reuse.
    pub upstream_idle_timeout: Duration,
    /// Idle upstream connections kept per backend.
    pub max_idle_per_backend: usize,
    /// A PROXY protocol header opens every connection to a backend, naming
    /// the client; such a connection carries one request only.
    pub send_proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// Idempotent requests with a body up to this size are held in memory so
    /// they can be retried after reaching a backend that failed (and, to an
    /// HTTP/2 pool, any request with a declared length up to this size, so
    /// that one the backend refused unprocessed can go elsewhere).
    pub retry_buffer: usize,
    /// What the pool speaks to its backends (`protocol`).
    pub protocol: UpstreamProtocol,
    /// TLS to the backends (`tls`); `None` for cleartext.
    pub tls: Option<UpstreamTls>,
    /// Longest silence in the middle of a gRPC call's response (in place of
    /// `read_timeout`: a stream may rightly stay quiet for minutes).
    pub stream_idle_timeout: Duration,
    /// Requests each backend takes at once (`max_in_flight`; a backend entry
    /// may set its own); `None` for no limit.
    pub max_in_flight: Option<u32>,
    /// Requests that may wait for a backend with room (`max_queue`).
    pub max_queue: usize,
    /// Longest wait in that queue (`queue_timeout`).
    pub queue_timeout: Duration,
    /// `[pools.NAME.circuit_breaker]`.
    pub circuit_breaker: crate::traffic::Thresholds,
    /// What a request is tried again on another backend for (`retry_on`).
    pub retry_on: Vec<RetryOn>,
    /// The longest one try may wait for its response head (`per_try_timeout`).
    pub per_try_timeout: Option<Duration>,
    /// The first pause before a retry, doubling up to 10 times it, jittered.
    pub retry_backoff: Duration,
    /// Retries in flight at most this percentage of the pool's active requests.
    pub retry_budget: u32,
    /// Retries always allowed at once, whatever the budget says.
    pub retry_budget_min: usize,
    /// A backend that becomes healthy ramps to its weight over this long.
    pub slow_start: Option<Duration>,
    /// Below this percentage of healthy backends, requests go to all of them (0: off).
    pub panic_threshold: u32,
    /// Active health checks; none when `[pools.NAME.health]` is absent.
    pub health: Option<HealthConfig>,
    /// Passive ejection of backends that fail requests.
    pub outlier: OutlierConfig,
}

/// A reason to try a request again on another backend (`retry_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// No connection could be made (or it closed before the request was written).
    ConnectFailure,
    /// The backend failed after the request reached it: reset, closed, a
    /// malformed answer, or no answer within `per_try_timeout`.
    Reset,
    /// The backend answered 5xx.
    ServerError,
    /// The backend answered 502, 503 or 504.
    GatewayError,
    /// The backend answered this status.
    Status(u16),
}

impl RetryOn {
    /// Whether a backend's answer with `status` is a reason to retry.
    pub fn matches_status(self, status: u16) -> bool {
        match self {
            RetryOn::ServerError => (500..600).contains(&status),
            RetryOn::GatewayError => matches!(status, 502..=504),
            RetryOn::Status(code) => code == status,
            RetryOn::ConnectFailure | RetryOn::Reset => false,
        }
    }
}

/// What a pool speaks to its backends (`pools.NAME.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, over TCP or TLS (`"http1"`, the default).
    Http1,
    /// HTTP/2 over TLS, negotiated with ALPN (`"h2"`; `tls` is on).
    H2,
    /// HTTP/2 over cleartext TCP, with prior knowledge (`"h2c"`).
    H2c,
}

impl UpstreamProtocol {
    /// As the config file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::H2c => "h2c",
        }
    }

    /// Whether requests share connections as HTTP/2 streams.
    pub fn is_http2(self) -> bool {
        matches!(self, UpstreamProtocol::H2 | UpstreamProtocol::H2c)
    }
}

/// TLS to a pool's backends (`pools.NAME.tls`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct UpstreamTls {
    /// CA certificates the backends' certificates are checked against; the
    /// system's roots when `None`.
    pub ca: Option<PathBuf>,
    /// The name sent (SNI) and checked in the backend's certificate; the
    /// host of each backend's address when `None`.
    pub sni: Option<String>,
    /// A client certificate and key to present, when the backends ask.
    pub client_cert: Option<CertificateFiles>,
}

/// What an active check does (`type`).
#[derive(Debug, Clone, PartialEq)]
pub enum CheckType {
    /// A connection is made (through TLS, when the pool has it).
    Tcp,
    /// An HTTP GET of `path`, answered with an expected status.
    Http { path: String },
    /// A `grpc.health.v1.Health/Check` call for `service` ("" = the whole
    /// server), answered `SERVING`.
    Grpc { service: String },
}

/// How a pool's backends are checked (`[pools.NAME.health]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub check: CheckType,
    /// `Host` (or `:authority`) of an HTTP or gRPC check; the backend's address when `None`.
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend back.
    pub rise: u32,
    /// Consecutive failures that take a backend down.
    pub fall: u32,
    /// Statuses that count as healthy (inclusive range).
    pub expect_status: (u16, u16),
}

/// Passive ejection (outlier detection, `[pools.NAME.outlier]`).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Consecutive failed requests (connect error, reset, timeout, 5xx) that
    /// eject a backend; 0 turns passive ejection off.
    pub consecutive_failures: u32,
    /// An ejection lasts this long times the backend's ejection count: the
    /// count grows by one with each ejection and falls by one for each
    /// `base_ejection_time` the backend spends readmitted (as Envoy's does).
    pub base_ejection_time: Duration,
    /// Longest ejection.
    pub max_ejection_time: Duration,
    /// Never eject more than this share of the pool (at least one backend may go).
    pub max_ejected_percent: u32,
    /// With active checks on, `rise` passing checks in a row after an
    /// ejection end it (Envoy's `successful_active_health_check_uneject_host`).
    pub readmit_on_check: bool,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(300),
            max_ejected_percent: 50,
            readmit_on_check: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendConfig {
    /// The address as written (`host:port`), used as the backend's name.
    pub address: String,
    /// What `address` resolved to when the config was loaded.
    pub socket: SocketAddr,
    pub weight: u32,
    /// This backend's own `max_in_flight`, over the pool's.
    pub max_in_flight: Option<u32>,
    /// Labels plugins read (`labels = { zone = "a" }`), sorted by name.
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Exact host to match (port ignored, case-insensitive); any host when `None`.
    pub host: Option<String>,
    pub path_prefix: String,
    pub pool: String,
    /// The largest request body taken (413 above); `server.max_body_size`
    /// when not set; no limit when neither is.
    pub max_body_size: Option<u64>,
    /// The route's filters, by name, in the order they run.
    pub filters: Vec<String>,
    /// How much of the body's start plugins may read (`request.body-prefix`); 0: none.
    pub body_prefix: usize,
}

// ---- the file as written -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    plugins: RawPlugins,
    #[serde(default)]
    admin: RawAdmin,
    access_log: Option<RawAccessLog>,
    pools: BTreeMap<String, RawPool>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    filters: BTreeMap<String, RawFilter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    plugin: String,
    config: Option<toml::Value>,
    on_fault: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPluginLimits {
    call_timeout: Option<String>,
    memory_limit: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    // server.listen's settings: the keys of a [[server.listeners]] entry.
    tls: Option<RawTls>,
    proxy_protocol: Option<bool>,
    redirect_https: Option<u16>,
    max_head_size: Option<String>,
    max_uri_length: Option<String>,
    max_headers: Option<usize>,
    /// The default of every route's `max_body_size`.
    max_body_size: Option<String>,
    #[serde(default)]
    listeners: Vec<RawListener>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    via: Option<bool>,
    forwarded: Option<bool>,
    admin: Option<String>,
    admin_token: Option<String>,
    header_read_timeout: Option<String>,
    client_idle_timeout: Option<String>,
    shutdown_grace: Option<String>,
    workers: Option<usize>,
}

/// A `[[server.listeners]]` entry; `server.listen` and its settings in
/// `[server]` are made into one too.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    listen: Option<String>,
    tls: Option<RawTls>,
    proxy_protocol: Option<bool>,
    redirect_https: Option<u16>,
    max_head_size: Option<String>,
    max_uri_length: Option<String>,
    max_headers: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    certificates: Option<Vec<RawCertificate>>,
    strict_sni: Option<bool>,
    client_ca: Option<PathBuf>,
    client_auth: Option<String>,
    hsts: Option<String>,
    session_resumption: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    path: String,
    format: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    state_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPlugins {
    dir: Option<PathBuf>,
    call_timeout: Option<String>,
    memory_limit: Option<String>,
    cache_dir: Option<PathBuf>,
    cache: Option<bool>,
    #[serde(default)]
    limits: BTreeMap<String, RawPluginLimits>,
    shared_entries: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    policy: Option<String>,
    policy_config: Option<toml::Value>,
    /// Each an address string or a `{ address, weight }` table; checked in
    /// `validate`, where the error can say which form was expected.
    backends: Vec<toml::Value>,
    retries: Option<u32>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    read_timeout: Option<String>,
    upstream_idle_timeout: Option<String>,
    max_idle_per_backend: Option<usize>,
    send_proxy_protocol: Option<String>,
    retry_buffer: Option<String>,
    protocol: Option<String>,
    tls: Option<RawUpstreamTls>,
    stream_idle_timeout: Option<String>,
    max_in_flight: Option<u32>,
    max_queue: Option<usize>,
    queue_timeout: Option<String>,
    circuit_breaker: Option<RawCircuitBreaker>,
    retry_on: Option<Vec<toml::Value>>,
    per_try_timeout: Option<String>,
    retry_backoff: Option<String>,
    retry_budget: Option<u32>,
    retry_budget_min: Option<usize>,
    slow_start: Option<String>,
    panic_threshold: Option<u32>,
    health: Option<RawHealth>,
    outlier: Option<RawOutlier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCircuitBreaker {
    max_pending: Option<usize>,
    max_requests: Option<usize>,
    max_retries: Option<usize>,
}

/// `tls = true`, or a table of its settings.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawUpstreamTls {
    On(bool),
    Settings(RawUpstreamTlsSettings),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTlsSettings {
    ca: Option<PathBuf>,
    sni: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(rename = "type")]
    kind: Option<String>,
    path: Option<String>,
    service: Option<String>,
    host: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    expect_status: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_failures: Option<u32>,
    base_ejection_time: Option<String>,
    max_ejection_time: Option<String>,
    max_ejected_percent: Option<u32>,
    readmit_on_check: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTable {
    address: String,
    weight: Option<u32>,
    max_in_flight: Option<u32>,
    labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<String>,
    path_prefix: Option<String>,
    pool: String,
    max_body_size: Option<String>,
    #[serde(default)]
    filters: Vec<String>,
    body_prefix: Option<String>,
}

// ---- loading -------------------------------------------------------------

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Config::parse(&text, path)
    }

    /// Validates config text as if read from `path` (relative paths resolve
    /// against `path`'s folder).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            file: path.to_path_buf(),
            key,
            reason,
        };
        let deserializer = toml::Deserializer::parse(text).map_err(|e| {
            invalid(
                "(syntax)".into(),
                format!("{} at {}", e.message(), position(text, e.span())),
            )
        })?;
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let reason = match inner.span() {
                Some(span) => format!("{} at {}", inner.message(), position(text, Some(span))),
                None => inner.message().to_string(),
            };
            invalid(if key == "." { "(top level)".into() } else { key }, reason)
        })?;
        let folder = path.parent().unwrap_or(Path::new("."));
        validate(raw, folder)
            .map_err(|(key, reason)| invalid(key, reason))
            .map(|mut c| {
                c.source = path.to_path_buf();
                c.digest = TextDigest(crate::plugin::digest(text.as_bytes()));
                c
            })
    }

    /// The policy names this config refers to that are not built in.
    pub fn plugin_policies(&self) -> impl Iterator<Item = &str> {
        self.pools
            .values()
            .map(|p| p.policy.as_str())
            .chain(self.filters.values().map(|f| f.plugin.as_str()))
            .filter(|p| !crate::plugin::registry::is_builtin(p))
    }

    /// The config key that names plugin `name` first: a pool's policy or a
    /// filter's plugin.
    pub fn key_naming_plugin(&self, name: &str) -> Option<String> {
        self.pools
            .iter()
            .find(|(_, p)| p.policy == name)
            .map(|(n, _)| format!("pools.{n}.policy"))
            .or_else(|| {
                self.filters
                    .iter()
                    .find(|(_, f)| f.plugin == name)
                    .map(|(n, _)| format!("filters.{n}.plugin"))
            })
    }
}

fn position(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return "unknown position".into();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}")
}

type KeyError = (String, String);

fn duration(key: &str, value: Option<&str>, default: Duration) -> Result<Duration, KeyError> {
    match value {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text.trim()).map_err(|e| {
            (
                key.to_string(),
                format!("`{text}` is not a duration ({e}); write e.g. \"500ms\" or \"2s\""),
            )
        }),
    }
}

fn size(key: &str, value: Option<&str>, default: usize) -> Result<usize, KeyError> {
    match value {
        None => Ok(default),
        Some(text) => text
            .trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64() as usize)
            .map_err(|e| {
                (
                    key.to_string(),
                    format!("`{text}` is not a size ({e}); write e.g. \"16MiB\""),
                )
            }),
    }
}

/// `text` (`host:port`) resolved to a socket address, or why not.
pub fn resolve(text: &str) -> Result<SocketAddr, String> {
    socket("address", text).map_err(|(_, reason)| reason)
}

impl RawListener {
    /// Whether any key but `listen` is set.
    fn has_settings(&self) -> bool {
        self.tls.is_some()
            || self.proxy_protocol.is_some()
            || self.redirect_https.is_some()
            || self.max_head_size.is_some()
            || self.max_uri_length.is_some()
            || self.max_headers.is_some()
    }
}

/// A listener from its entry; `key` is its table (`server`,
/// `server.listeners[N]`) and `listen_key` its address's key.
fn listener(key: &str, listen_key: &str, settings: RawListener, folder: &Path) -> Result<ListenerConfig, KeyError> {
    let Some(listen) = settings.listen.as_deref() else {
        return Err((listen_key.to_string(), "required: the address to listen on".into()));
    };
    let listen = socket(listen_key, listen)?;
    // Errors about the listener's settings name them under its table; its
    // record keeps the key of its address's table for messages at run time.
    let record_key = if key == "server" {
        "server.listen".to_string()
    } else {
        key.to_string()
    };
    let tls = settings
        .tls
        .map(|raw| tls(&format!("{key}.tls"), raw, folder))
        .transpose()?;
    if let Some(port) = settings.redirect_https {
        if tls.is_some() {
            return Err((
                format!("{key}.redirect_https"),
                "a TLS listener serves HTTPS itself: redirect_https belongs on a plain listener".into(),
            ));
        }
        if port == 0 {
            return Err((format!("{key}.redirect_https"), "a port, 1 to 65535".into()));
        }
    }
    let defaults = crate::http::HeadLimits::DEFAULT;
    let limits = crate::http::HeadLimits {
        max_head: size(
            &format!("{key}.max_head_size"),
            settings.max_head_size.as_deref(),
            defaults.max_head,
        )?,
        max_uri: size(
            &format!("{key}.max_uri_length"),
            settings.max_uri_length.as_deref(),
            defaults.max_uri,
        )?,
        max_headers: settings.max_headers.unwrap_or(defaults.max_headers),
    };
    if !(1024..=1 << 20).contains(&limits.max_head) {
        return Err((format!("{key}.max_head_size"), "from 1KiB to 1MiB".into()));
    }
    if !(16..=limits.max_head).contains(&limits.max_uri) {
        return Err((format!("{key}.max_uri_length"), "from 16 bytes to max_head_size".into()));
    }
    if !(1..=crate::http::MAX_HEADERS).contains(&limits.max_headers) {
        return Err((
            format!("{key}.max_headers"),
            format!("from 1 to {}", crate::http::MAX_HEADERS),
        ));
    }
    Ok(ListenerConfig {
        key: record_key,
        table: key.to_string(),
        listen,
        tls,
        proxy_protocol: settings.proxy_protocol.unwrap_or(false),
        redirect_https: settings.redirect_https,
        limits,
    })
}

/// A TLS table (`key`), its paths resolved against `folder`. The files are
/// read when the listener starts (`crate::tls`), which names them in errors.
fn tls(key: &str, raw: RawTls, folder: &Path) -> Result<TlsConfig, KeyError> {
    let certificates = match (raw.cert, raw.key, raw.certificates) {
        (Some(cert), Some(key_file), None) => vec![CertificateFiles {
            cert: folder.join(cert),
            key: folder.join(key_file),
        }],
        (None, None, Some(list)) if !list.is_empty() => list
            .into_iter()
            .map(|c| CertificateFiles {
                cert: folder.join(c.cert),
                key: folder.join(c.key),
            })
            .collect(),
        (None, None, Some(_)) => {
            return Err((format!("{key}.certificates"), "at least one { cert, key }".into()));
        }
        (Some(_), None, None) => return Err((format!("{key}.key"), "required with cert".into())),
        (None, Some(_), None) => return Err((format!("{key}.cert"), "required with key".into())),
        (None, None, None) => {
            return Err((
                key.into(),
                "needs cert and key, or certificates = [{ cert, key }, ...]".into(),
            ));
        }
        (_, _, Some(_)) => {
            return Err((
                format!("{key}.certificates"),
                "either cert and key, or certificates, not both".into(),
            ));
        }
    };
    let client_auth = match raw.client_auth.as_deref() {
        None | Some("required") => ClientAuth::Required,
        Some("optional") => ClientAuth::Optional,
        Some(other) => {
            return Err((
                format!("{key}.client_auth"),
                format!("`{other}` is not \"required\" or \"optional\""),
            ));
        }
    };
    if raw.client_auth.is_some() && raw.client_ca.is_none() {
        return Err((
            format!("{key}.client_auth"),
            "needs client_ca, the CAs client certificates are checked against".into(),
        ));
    }
    if let Some(hsts) = &raw.hsts {
        let valid = hsts
            .strip_prefix("max-age=")
            .and_then(|rest| rest.split(';').next())
            .is_some_and(|age| !age.is_empty() && age.trim().bytes().all(|b| b.is_ascii_digit()))
            && hsts.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        if !valid {
            return Err((
                format!("{key}.hsts"),
                "a Strict-Transport-Security value such as \"max-age=31536000; includeSubDomains\"".into(),
            ));
        }
    }
    Ok(TlsConfig {
        certificates,
        strict_sni: raw.strict_sni.unwrap_or(false),
        client_ca: raw.client_ca.map(|ca| folder.join(ca)),
        client_auth,
        hsts: raw.hsts,
        session_resumption: raw.session_resumption.unwrap_or(true),
    })
}

fn socket(key: &str, text: &str) -> Result<SocketAddr, KeyError> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let resolved = text.to_socket_addrs().map_err(|e| {
        (
            key.to_string(),
            format!("`{text}` is not an address of the form host:port ({e})"),
        )
    })?;
    resolved
        .into_iter()
        .next()
        .ok_or_else(|| (key.to_string(), format!("`{text}` resolved to no address")))
}

/// A plugin call's deadline: above zero, and at most 10 s, since a call
/// holds its worker (and every connection on it) for that long.
pub fn check_call_timeout(key: &str, timeout: Duration) -> Result<(), KeyError> {
    if timeout.is_zero() || timeout > Duration::from_secs(10) {
        return Err((
            key.into(),
            format!("must be more than 0 and at most 10s (a call holds its worker), got {timeout:?}"),
        ));
    }
    Ok(())
}

/// A plugin instance's memory: one Wasm page at least, and at most the 4 GiB
/// a 32-bit Wasm memory can address.
fn check_memory_limit(key: &str, bytes: usize) -> Result<(), KeyError> {
    if !(1 << 16..=1 << 32).contains(&(bytes as u64)) {
        return Err((
            key.into(),
            "must be at least 64KiB (one Wasm page) and at most 4GiB (what Wasm addresses)".into(),
        ));
    }
    Ok(())
}

fn validate(raw: RawConfig, folder: &Path) -> Result<Config, KeyError> {
    let access_log = match &raw.access_log {
        None => None,
        Some(log) => Some(AccessLogConfig {
            path: match log.path.as_str() {
                "" => return Err(("access_log.path".into(), "a file, or \"-\" for stdout".into())),
                "-" => None,
                path => Some(folder.join(path)),
            },
            format: match log.format.as_deref() {
                None | Some("json") => AccessLogFormat::Json,
                Some("combined") => AccessLogFormat::Combined,
                Some(other) => {
                    return Err((
                        "access_log.format".into(),
                        format!("`{other}` is not a format: \"json\" or \"combined\""),
                    ));
                }
            },
        }),
    };
    let admin = raw
        .server
        .admin
        .as_deref()
        .map(|a| socket("server.admin", a))
        .transpose()?;
    let admin_token = raw.server.admin_token.clone();
    if admin_token
        .as_deref()
        .is_some_and(|t| t.trim().is_empty() || t.chars().any(|c| c.is_whitespace()))
    {
        return Err(("server.admin_token".into(), "must be non-empty, without spaces".into()));
    }
    if let Some(admin) = admin
        && !admin.ip().is_loopback()
        && admin_token.is_none()
    {
        return Err((
            "server.admin_token".into(),
            format!("required: server.admin ({admin}) is not a loopback address, and the admin API changes what runs"),
        ));
    }
    let mut listeners = Vec::new();
    let first = RawListener {
        listen: raw.server.listen,
        tls: raw.server.tls,
        proxy_protocol: raw.server.proxy_protocol,
        redirect_https: raw.server.redirect_https,
        max_head_size: raw.server.max_head_size,
        max_uri_length: raw.server.max_uri_length,
        max_headers: raw.server.max_headers,
    };
    if first.listen.is_some() {
        listeners.push(listener("server", "server.listen", first, folder)?);
    } else if first.has_settings() {
        return Err((
            "server.listen".into(),
            "server.tls, proxy_protocol, redirect_https and the head limits are settings of server.listen, which is not set".into(),
        ));
    }
    for (index, entry) in raw.server.listeners.into_iter().enumerate() {
        let key = format!("server.listeners[{index}]");
        listeners.push(listener(&key, &format!("{key}.listen"), entry, folder)?);
    }
    if listeners.is_empty() {
        return Err((
            "server.listen".into(),
            "required (or [[server.listeners]] entries), e.g. listen = \"127.0.0.1:8080\"".into(),
        ));
    }
    for (i, a) in listeners.iter().enumerate() {
        if let Some(b) = listeners[..i].iter().find(|b| b.listen == a.listen) {
            return Err((
                format!("{}.listen", a.key),
                format!("{} is also {}.listen", a.listen, b.key),
            ));
        }
        if admin == Some(a.listen) {
            return Err(("server.admin".into(), format!("{} is also {}.listen", a.listen, a.key)));
        }
    }
    let server = ServerConfig {
        listeners,
        admin,
        admin_token,
        header_read_timeout: duration(
            "server.header_read_timeout",
            raw.server.header_read_timeout.as_deref(),
            Duration::from_secs(10),
        )?,
        client_idle_timeout: duration(
            "server.client_idle_timeout",
            raw.server.client_idle_timeout.as_deref(),
            Duration::from_secs(60),
        )?,
        shutdown_grace: duration(
            "server.shutdown_grace",
            raw.server.shutdown_grace.as_deref(),
            Duration::from_secs(30),
        )?,
        workers: raw.server.workers.unwrap_or(0),
        trusted_proxies: crate::http::forwarded::TrustedProxies::parse(&raw.server.trusted_proxies)
            .map_err(|reason| ("server.trusted_proxies".to_string(), reason))?,
        via: raw.server.via.unwrap_or(false),
        forwarded: raw.server.forwarded.unwrap_or(false),
    };
    let plugins = PluginsConfig {
        dir: raw.plugins.dir.map(|d| folder.join(d)),
        call_timeout: duration(
            "plugins.call_timeout",
            raw.plugins.call_timeout.as_deref(),
            Duration::from_millis(5),
        )?,
        memory_limit: size("plugins.memory_limit", raw.plugins.memory_limit.as_deref(), 16 << 20)?,
        cache_dir: match (raw.plugins.cache, raw.plugins.cache_dir) {
            (Some(false), Some(_)) => {
                return Err(("plugins.cache_dir".into(), "set, while plugins.cache = false".into()));
            }
            (Some(false), None) => None,
            (_, Some(dir)) => Some(folder.join(dir)),
            // As other tools keep theirs: $XDG_CACHE_HOME, else ~/.cache.
            (_, None) => std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .map(|base| base.join("fulcrum").join("plugins")),
        },
        limits: raw
            .plugins
            .limits
            .into_iter()
            .map(|(name, limits)| {
                let key = |k: &str| format!("plugins.limits.{name}.{k}");
                let call_timeout = limits
                    .call_timeout
                    .as_deref()
                    .map(|t| duration(&key("call_timeout"), Some(t), Duration::ZERO))
                    .transpose()?;
                if let Some(timeout) = call_timeout {
                    check_call_timeout(&key("call_timeout"), timeout)?;
                }
                let memory_limit = limits
                    .memory_limit
                    .as_deref()
                    .map(|m| size(&key("memory_limit"), Some(m), 0))
                    .transpose()?;
                if let Some(memory) = memory_limit {
                    check_memory_limit(&key("memory_limit"), memory)?;
                }
                Ok((
                    name,
                    PluginLimits {
                        call_timeout,
                        memory_limit,
                    },
                ))
            })
            .collect::<Result<_, KeyError>>()?,
        shared_entries: match raw.plugins.shared_entries {
            Some(0) => return Err(("plugins.shared_entries".into(), "must be at least 1".into())),
            Some(n) => n,
            None => crate::plugin::shared::DEFAULT_ENTRIES,
        },
    };
    check_call_timeout("plugins.call_timeout", plugins.call_timeout)?;
    check_memory_limit("plugins.memory_limit", plugins.memory_limit)?;

    if raw.pools.is_empty() {
        return Err(("pools".into(), "at least one pool is needed, e.g. [pools.web]".into()));
    }
    let mut pools = BTreeMap::new();
    for (name, pool) in raw.pools {
        let key = |k: &str| format!("pools.{name}.{k}");
        let policy = pool.policy.unwrap_or_else(|| "round-robin".into());
        check_policy_name(&policy).map_err(|reason| (key("policy"), reason))?;
        if !crate::plugin::registry::is_builtin(&policy) && plugins.dir.is_none() {
            let builtins: Vec<&str> = crate::plugin::registry::BUILTINS
                .iter()
                .map(|(name, _)| *name)
                .collect();
            return Err((
                key("policy"),
                format!(
                    "unknown policy `{policy}`: the built-ins are {}, and [plugins] dir is not set for a plugin",
                    builtins.join(", ")
                ),
            ));
        }
        let policy_config = match pool.policy_config {
            None => "{}".to_string(),
            Some(value) => serde_json::to_string(&value)
                .map_err(|e| (key("policy_config"), format!("cannot be given as JSON: {e}")))?,
        };
        if pool.backends.is_empty() {
            return Err((key("backends"), "a pool needs at least one backend".into()));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(pool.backends.len());
        for (i, backend) in pool.backends.into_iter().enumerate() {
            let bkey = format!("pools.{name}.backends[{i}]");
            let (address, weight, max_in_flight, labels) = match backend {
                toml::Value::String(a) => (a, 1, None, Vec::new()),
                table @ toml::Value::Table(_) => {
                    let t: RawBackendTable = table.try_into().map_err(|e| (bkey.clone(), e.message().to_string()))?;
                    let labels = t.labels.unwrap_or_default().into_iter().collect();
                    (t.address, t.weight.unwrap_or(1), t.max_in_flight, labels)
                }
                other => {
                    return Err((
                        bkey,
                        format!(
                            "expected \"host:port\" or {{ address = \"host:port\", weight = N }}, found a {}",
                            other.type_str()
                        ),
                    ));
                }
            };
            if weight == 0 {
                return Err((format!("{bkey}.weight"), "must be at least 1".into()));
            }
            let socket = socket(&bkey, &address)?;
            if backends.iter().any(|b| b.address == address) {
                return Err((bkey, format!("`{address}` is listed twice in this pool")));
            }
            if max_in_flight == Some(0) {
                return Err((
                    format!("{bkey}.max_in_flight"),
                    "must be at least 1 (leave it out for no limit)".into(),
                ));
            }
            backends.push(BackendConfig {
                address,
                socket,
                weight,
                max_in_flight,
                labels,
            });
        }
        let protocol = match pool.protocol.as_deref() {
            None | Some("http1") => UpstreamProtocol::Http1,
            Some("h2") => UpstreamProtocol::H2,
            Some("h2c") => UpstreamProtocol::H2c,
            Some(other) => {
                return Err((
                    key("protocol"),
                    format!("`{other}` is not \"http1\", \"h2\" (HTTP/2 over TLS) or \"h2c\" (cleartext HTTP/2)"),
                ));
            }
        };
        let upstream_tls = upstream_tls(&name, pool.tls, protocol, folder)?;
        if pool.send_proxy_protocol.is_some() && protocol.is_http2() {
            return Err((
                key("send_proxy_protocol"),
                "a PROXY header names one client per connection, and HTTP/2 multiplexes many: use protocol = \"http1\""
                    .into(),
            ));
        }
        let health = pool.health.map(|h| health(&name, h)).transpose()?;
        if let Some(HealthConfig {
            check: CheckType::Grpc { .. },
            ..
        }) = &health
            && !protocol.is_http2()
        {
            return Err((
                format!("pools.{name}.health.type"),
                "a grpc check needs HTTP/2 to the backends: set the pool's protocol = \"h2\" or \"h2c\"".into(),
            ));
        }
        let config = PoolConfig {
            policy,
            policy_config,
            backends,
            retries: pool.retries.unwrap_or(1),
            connect_timeout: duration(
                &key("connect_timeout"),
                pool.connect_timeout.as_deref(),
                Duration::from_secs(1),
            )?,
            response_timeout: duration(
                &key("response_timeout"),
                pool.response_timeout.as_deref(),
                Duration::from_secs(30),
            )?,
            read_timeout: duration(
                &key("read_timeout"),
                pool.read_timeout.as_deref(),
                Duration::from_secs(60),
            )?,
            upstream_idle_timeout: duration(
                &key("upstream_idle_timeout"),
                pool.upstream_idle_timeout.as_deref(),
                Duration::from_secs(60),
            )?,
            max_idle_per_backend: pool.max_idle_per_backend.unwrap_or(256),
            send_proxy_protocol: match pool.send_proxy_protocol.as_deref() {
                None => None,
                Some("v1") => Some(crate::proxy_protocol::Version::V1),
                Some("v2") => Some(crate::proxy_protocol::Version::V2),
                Some(other) => {
                    return Err((key("send_proxy_protocol"), format!("`{other}` is not \"v1\" or \"v2\"")));
                }
            },
            retry_buffer: size(&key("retry_buffer"), pool.retry_buffer.as_deref(), 64 << 10)?,
            protocol,
            tls: upstream_tls,
            stream_idle_timeout: duration(
                &key("stream_idle_timeout"),
                pool.stream_idle_timeout.as_deref(),
                Duration::from_secs(300),
            )?,
            max_in_flight: match pool.max_in_flight {
                Some(0) => {
                    return Err((
                        key("max_in_flight"),
                        "must be at least 1 (leave it out for no limit)".into(),
                    ));
                }
                other => other,
            },
            max_queue: pool.max_queue.unwrap_or(128),
            queue_timeout: duration(
                &key("queue_timeout"),
                pool.queue_timeout.as_deref(),
                Duration::from_secs(5),
            )?,
            circuit_breaker: pool
                .circuit_breaker
                .map(|b| crate::traffic::Thresholds {
                    max_pending: b.max_pending,
                    max_requests: b.max_requests,
                    max_retries: b.max_retries,
                })
                .unwrap_or_default(),
            retry_on: match pool.retry_on {
                None => vec![RetryOn::ConnectFailure, RetryOn::Reset],
                Some(list) => list
                    .iter()
                    .enumerate()
                    .map(|(i, value)| retry_on(value).map_err(|reason| (format!("pools.{name}.retry_on[{i}]"), reason)))
                    .collect::<Result<_, _>>()?,
            },
            per_try_timeout: pool
                .per_try_timeout
                .as_deref()
                .map(|text| duration(&key("per_try_timeout"), Some(text), Duration::ZERO))
                .transpose()?,
            retry_backoff: duration(
                &key("retry_backoff"),
                pool.retry_backoff.as_deref(),
                Duration::from_millis(25),
            )?,
            retry_budget: match pool.retry_budget {
                Some(p) if p > 100 => return Err((key("retry_budget"), "a percentage: 0 to 100".into())),
                other => other.unwrap_or(20),
            },
            retry_budget_min: pool.retry_budget_min.unwrap_or(3),
            slow_start: pool
                .slow_start
                .as_deref()
                .map(|text| duration(&key("slow_start"), Some(text), Duration::ZERO))
                .transpose()?,
            panic_threshold: match pool.panic_threshold {
                Some(p) if p > 100 => return Err((key("panic_threshold"), "a percentage: 0 (off) to 100".into())),
                other => other.unwrap_or(50),
            },
            health,
            outlier: outlier(&name, pool.outlier)?,
        };
        pools.insert(name, config);
    }

    let max_body_default = raw
        .server
        .max_body_size
        .as_deref()
        .map(|text| size("server.max_body_size", Some(text), 0).map(|n| n as u64))
        .transpose()?;
    let mut filters = BTreeMap::new();
    for (name, filter) in raw.filters {
        let key = |k: &str| format!("filters.{name}.{k}");
        let config = match filter.config {
            None => "{}".to_string(),
            Some(value) => {
                serde_json::to_string(&value).map_err(|e| (key("config"), format!("cannot be given as JSON: {e}")))?
            }
        };
        check_policy_name(&filter.plugin).map_err(|reason| (key("plugin"), reason))?;
        let on_fault = match filter.on_fault.as_deref() {
            None | Some("allow") => crate::plugin::OnFault::Allow,
            Some("deny") => crate::plugin::OnFault::Deny,
            Some(other) => return Err((key("on_fault"), format!("`{other}` is not \"allow\" or \"deny\""))),
        };
        filters.insert(
            name,
            FilterConfig {
                plugin: filter.plugin,
                config,
                on_fault,
            },
        );
    }
    let mut routes = Vec::with_capacity(raw.routes.len());
    for (i, route) in raw.routes.into_iter().enumerate() {
        for (j, filter) in route.filters.iter().enumerate() {
            if route.filters[..j].contains(filter) {
                return Err((
                    format!("routes[{i}].filters[{j}]"),
                    format!("filter `{filter}` is listed twice; a route runs each filter once"),
                ));
            }
            if !filters.contains_key(filter) {
                let defined: Vec<&String> = filters.keys().collect();
                return Err((
                    format!("routes[{i}].filters[{j}]"),
                    format!(
                        "unknown filter `{filter}`; define it as [filters.{filter}] (defined: {})",
                        if defined.is_empty() {
                            "none".to_string()
                        } else {
                            defined.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", ")
                        }
                    ),
                ));
            }
        }
        let body_prefix = size(&format!("routes[{i}].body_prefix"), route.body_prefix.as_deref(), 0)?;
        if body_prefix > MAX_BODY_PREFIX {
            return Err((
                format!("routes[{i}].body_prefix"),
                format!(
                    "at most {} KiB: it is held in memory for every request",
                    MAX_BODY_PREFIX / 1024
                ),
            ));
        }
        // Held for the backend like a retried body: within the pool's retry_buffer.
        if let Some(pool) = pools.get(&route.pool)
            && body_prefix > pool.retry_buffer
        {
            return Err((
                format!("routes[{i}].body_prefix"),
                format!(
                    "{body_prefix} bytes, more than pool `{}`'s retry_buffer ({} bytes), which bounds what is held of a body: raise retry_buffer or lower body_prefix",
                    route.pool, pool.retry_buffer
                ),
            ));
        }
        if !pools.contains_key(&route.pool) {
            return Err((
                format!("routes[{i}].pool"),
                format!(
                    "unknown pool `{}`; defined pools: {}",
                    route.pool,
                    pools.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let path_prefix = route.path_prefix.unwrap_or_else(|| "/".into());
        if !path_prefix.starts_with('/') {
            return Err((
                format!("routes[{i}].path_prefix"),
                format!("`{path_prefix}` must start with /"),
            ));
        }
        let max_body_size = match route.max_body_size.as_deref() {
            Some(text) => Some(size(&format!("routes[{i}].max_body_size"), Some(text), 0)? as u64),
            None => max_body_default,
        };
        routes.push(RouteConfig {
            host: route.host.map(|h| h.to_ascii_lowercase()),
            path_prefix,
            pool: route.pool,
            max_body_size,
            filters: route.filters,
            body_prefix,
        });
    }
    // A limit for a plugin nothing uses may be a misspelt name, or one
    // shared config for several: said, not refused.
    for name in plugins.limits.keys() {
        let used =
            pools.values().any(|p: &PoolConfig| &p.policy == name) || filters.values().any(|f| &f.plugin == name);
        if !used {
            tracing::warn!(
                key = %format!("plugins.limits.{name}"),
                "no pool or filter uses a plugin called `{name}`: these limits apply to nothing (a misspelt name?)"
            );
        }
    }
    if routes.is_empty() {
        if pools.len() > 1 {
            return Err((
                "routes".into(),
                "with more than one pool, [[routes]] must say which requests go to which pool".into(),
            ));
        }
        if let Some(pool) = pools.keys().next() {
            routes.push(RouteConfig {
                host: None,
                path_prefix: "/".into(),
                pool: pool.clone(),
                max_body_size: max_body_default,
                filters: Vec::new(),
                body_prefix: 0,
            });
        }
    }

    Ok(Config {
        source: PathBuf::new(),
        digest: TextDigest::default(),
        admin: AdminConfig {
            state_file: raw.admin.state_file.map(|f| folder.join(f)),
        },
        access_log,
        server,
        plugins,
        pools,
        routes,
        filters,
    })
}

/// The largest `body_prefix` a route may ask for.
pub const MAX_BODY_PREFIX: usize = 1 << 20;

/// One entry of `retry_on`.
fn retry_on(value: &toml::Value) -> Result<RetryOn, String> {
    match value {
        toml::Value::String(text) => match text.as_str() {
            "connect-failure" => Ok(RetryOn::ConnectFailure),
            "reset" => Ok(RetryOn::Reset),
            "5xx" => Ok(RetryOn::ServerError),
            "gateway-error" => Ok(RetryOn::GatewayError),
            other => Err(format!(
                "`{other}` is not \"connect-failure\", \"reset\", \"5xx\", \"gateway-error\" or a status code"
            )),
        },
        toml::Value::Integer(code) => match u16::try_from(*code) {
            Ok(code) if (100..=599).contains(&code) => Ok(RetryOn::Status(code)),
            _ => Err(format!("{code} is not an HTTP status")),
        },
        other => Err(format!(
            "expected a string or a status code, found a {}",
            other.type_str()
        )),
    }
}

/// The pool's `tls`: off by default, on for `protocol = "h2"`.
fn upstream_tls(
    pool: &str,
    raw: Option<RawUpstreamTls>,
    protocol: UpstreamProtocol,
    folder: &Path,
) -> Result<Option<UpstreamTls>, KeyError> {
    let key = |k: &str| format!("pools.{pool}.{k}");
    let tls = match raw {
        None if protocol == UpstreamProtocol::H2 => Some(UpstreamTls::default()),
        None | Some(RawUpstreamTls::On(false)) => None,
        Some(RawUpstreamTls::On(true)) => Some(UpstreamTls::default()),
        Some(RawUpstreamTls::Settings(settings)) => {
            let client_cert = match (settings.cert, settings.key) {
                (None, None) => None,
                (Some(cert), Some(key_file)) => Some(CertificateFiles {
                    cert: folder.join(cert),
                    key: folder.join(key_file),
                }),
                (Some(_), None) => return Err((key("tls.key"), "a client certificate needs its key".into())),
                (None, Some(_)) => return Err((key("tls.cert"), "a key needs its client certificate".into())),
            };
            if settings
                .sni
                .as_deref()
                .is_some_and(|name| rustls::pki_types::ServerName::try_from(name).is_err())
            {
                return Err((key("tls.sni"), "not a DNS name or IP address".into()));
            }
            Some(UpstreamTls {
                ca: settings.ca.map(|ca| folder.join(ca)),
                sni: settings.sni,
                client_cert,
            })
        }
    };
    match (protocol, &tls) {
        (UpstreamProtocol::H2, None) => Err((
            key("tls"),
            "protocol = \"h2\" is HTTP/2 over TLS; for cleartext HTTP/2 use protocol = \"h2c\"".into(),
        )),
        (UpstreamProtocol::H2c, Some(_)) => Err((
            key("tls"),
            "protocol = \"h2c\" is cleartext HTTP/2; over TLS use protocol = \"h2\"".into(),
        )),
        _ => Ok(tls),
    }
}

fn health(pool: &str, raw: RawHealth) -> Result<HealthConfig, KeyError> {
    let key = |k: &str| format!("pools.{pool}.health.{k}");
    let check = match (raw.kind.as_deref(), raw.path, raw.service) {
        (_, Some(_), Some(_)) => {
            return Err((
                key("service"),
                "a check has a path (http) or a service (grpc), not both".into(),
            ));
        }
        (Some("tcp"), Some(_), None) => {
            return Err((
                key("path"),
                "a tcp check has no path; remove it or use type = \"http\"".into(),
            ));
        }
        (None | Some("tcp" | "http"), None, Some(_)) => {
            return Err((
                key("service"),
                "only a grpc check names a service; use type = \"grpc\"".into(),
            ));
        }
        (Some("tcp"), None, None) => CheckType::Tcp,
        (None | Some("http"), path, None) => {
            let path = path.unwrap_or_else(|| "/".into());
            if !path.starts_with('/') {
                return Err((key("path"), format!("`{path}` must start with /")));
            }
            CheckType::Http { path }
        }
        (Some("grpc"), Some(_), None) => {
            return Err((
                key("path"),
                "a grpc check calls grpc.health.v1.Health/Check; name a `service` instead".into(),
            ));
        }
        (Some("grpc"), None, service) => CheckType::Grpc {
            service: service.unwrap_or_default(),
        },
        (Some(other), _, _) => {
            return Err((
                key("type"),
                format!("`{other}` is not a check type: use \"http\", \"tcp\" or \"grpc\""),
            ));
        }
    };
    let expect_status = match raw.expect_status {
        None => (200, 399),
        Some(toml::Value::Integer(code)) => match u16::try_from(code) {
            Ok(code) if (100..=599).contains(&code) => (code, code),
            _ => {
                return Err((
                    key("expect_status"),
                    format!("{code} is not an HTTP status: use 100 to 599, or a range like \"200-299\""),
                ));
            }
        },
        Some(toml::Value::String(range)) => {
            let parsed = match range.split_once('-') {
                Some((low, high)) => low.trim().parse().ok().zip(high.trim().parse().ok()),
                None => range.trim().parse().ok().map(|c| (c, c)),
            };
            parsed
                .filter(|(low, high)| (100..=599).contains(low) && low <= high && *high <= 599)
                .ok_or_else(|| {
                    (
                        key("expect_status"),
                        format!("`{range}` is not a status or range like \"200-299\""),
                    )
                })?
        }
        Some(other) => {
            return Err((
                key("expect_status"),
                format!("expected a status or \"200-299\", found a {}", other.type_str()),
            ));
        }
    };
    let config = HealthConfig {
        check,
        host: raw.host,
        interval: duration(&key("interval"), raw.interval.as_deref(), Duration::from_secs(2))?,
        timeout: duration(&key("timeout"), raw.timeout.as_deref(), Duration::from_secs(1))?,
        rise: raw.rise.unwrap_or(2),
        fall: raw.fall.unwrap_or(3),
        expect_status,
    };
    if config.interval.is_zero() {
        return Err((key("interval"), "must be more than 0".into()));
    }
    if config.rise == 0 || config.fall == 0 {
        return Err((
            key(if config.rise == 0 { "rise" } else { "fall" }),
            "must be at least 1".into(),
        ));
    }
    Ok(config)
}

fn outlier(pool: &str, raw: Option<RawOutlier>) -> Result<OutlierConfig, KeyError> {
    let default = OutlierConfig::default();
    let Some(raw) = raw else { return Ok(default) };
    let key = |k: &str| format!("pools.{pool}.outlier.{k}");
    let config = OutlierConfig {
        consecutive_failures: raw.consecutive_failures.unwrap_or(default.consecutive_failures),
        base_ejection_time: duration(
            &key("base_ejection_time"),
            raw.base_ejection_time.as_deref(),
            default.base_ejection_time,
        )?,
        max_ejection_time: duration(
            &key("max_ejection_time"),
            raw.max_ejection_time.as_deref(),
            default.max_ejection_time,
        )?,
        max_ejected_percent: raw.max_ejected_percent.unwrap_or(default.max_ejected_percent),
        readmit_on_check: raw.readmit_on_check.unwrap_or(default.readmit_on_check),
    };
    if config.max_ejected_percent > 100 {
        return Err((key("max_ejected_percent"), "must be between 0 and 100".into()));
    }
    Ok(config)
}

/// Policy names become file names (`NAME.wasm`): keep them to a safe alphabet.
fn check_policy_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a plugin name: use letters, digits, - and _ (it names NAME.wasm)"
        ))
    }
}

impl fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{} -> {}",
            self.host.as_deref().unwrap_or("*"),
            self.path_prefix,
            self.pool
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/fulcrum/test.toml")).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = "[server]\nlisten = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";

    #[test]
    fn minimal_config_gets_defaults_and_a_catch_all_route() {
        let c = parse(MINIMAL).expect("valid");
        let pool = &c.pools["web"];
        assert_eq!(pool.policy, "round-robin");
        assert_eq!(pool.policy_config, "{}");
        assert_eq!(c.plugins.call_timeout, Duration::from_millis(5));
        assert_eq!(
            c.routes,
            vec![RouteConfig {
                host: None,
                path_prefix: "/".into(),
                pool: "web".into(),
                max_body_size: None,
                filters: Vec::new(),
                body_prefix: 0,
            }]
        );
    }

    #[test]
    fn issue_example_parses() {
        let c = parse(
            r#"
            [server]
            listen = "127.0.0.1:8080"
            admin = "127.0.0.1:9901"
            [plugins]
            dir = "plugins.d"
            call_timeout = "5ms"
            memory_limit = "16MiB"
            [pools.web]
            policy = "least-conn"
            policy_config = { exact_up_to = 8 }
            backends = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3 }]
            [[routes]]
            host = "api.example.com"
            path_prefix = "/api"
            pool = "web"
            "#,
        )
        .expect("valid");
        assert_eq!(c.plugins.dir.as_deref(), Some(Path::new("/etc/fulcrum/plugins.d")));
        assert_eq!(c.plugins.memory_limit, 16 << 20);
        let pool = &c.pools["web"];
        assert_eq!(pool.policy_config, r#"{"exact_up_to":8}"#);
        assert_eq!(pool.backends[1].weight, 3);
        assert_eq!(c.routes[0].host.as_deref(), Some("api.example.com"));
    }

    #[test]
    fn health_and_outlier_sections() {
        let c = parse(&format!(
            "{MINIMAL}[pools.web.health]\npath = \"/healthz\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\nexpect_status = \"200-299\"\n[pools.web.outlier]\nconsecutive_failures = 3\n"
        ))
        .expect("valid");
        let pool = &c.pools["web"];
        let health = pool.health.as_ref().expect("health");
        assert_eq!(
            health.check,
            CheckType::Http {
                path: "/healthz".into()
            }
        );
        assert_eq!(
            (health.interval, health.timeout),
            (Duration::from_secs(1), Duration::from_millis(500))
        );
        assert_eq!(health.expect_status, (200, 299));
        assert_eq!(pool.outlier.consecutive_failures, 3);
        assert_eq!(pool.outlier.max_ejected_percent, 50);
        let tcp = parse(&format!("{MINIMAL}[pools.web.health]\ntype = \"tcp\"\n")).expect("valid");
        assert_eq!(
            tcp.pools["web"].health.as_ref().map(|h| &h.check),
            Some(&CheckType::Tcp)
        );
        let err = parse(&format!("{MINIMAL}[pools.web.health]\nexpect_status = \"2xx\"\n")).expect_err("bad status");
        assert!(err.contains("pools.web.health.expect_status"), "{err}");
    }

    #[test]
    fn an_integer_expect_status_is_checked_like_the_string_form() {
        let ok = parse(&format!("{MINIMAL}[pools.web.health]\nexpect_status = 204\n")).expect("valid");
        assert_eq!(
            ok.pools["web"].health.as_ref().map(|h| h.expect_status),
            Some((204, 204))
        );
        for bad in ["70000", "-1", "99", "600", "0"] {
            let err = parse(&format!("{MINIMAL}[pools.web.health]\nexpect_status = {bad}\n"))
                .expect_err("an out-of-range status is refused");
            assert!(err.contains("pools.web.health.expect_status"), "{bad}: {err}");
            assert!(
                err.contains(bad) && err.contains("100") && err.contains("599"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let cases = [
            (
                "[server]\nlisten = \"127.0.0.1:8080\"\nbogus = 1\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n",
                "server",
                "unknown field `bogus`",
            ),
            (
                &MINIMAL.replace("127.0.0.1:9001", "not an address"),
                "pools.web.backends[0]",
                "not an address",
            ),
            (
                &format!("{MINIMAL}connect_timeout = \"fast\"\n"),
                "pools.web.connect_timeout",
                "not a duration",
            ),
            (
                &format!("{MINIMAL}policy = \"nope\"\n"),
                "pools.web.policy",
                "unknown policy `nope`",
            ),
            (
                &format!("{MINIMAL}[[routes]]\npool = \"api\"\n"),
                "routes[0].pool",
                "unknown pool `api`",
            ),
            (
                &format!("{MINIMAL}[plugins]\nmemory_limit = \"lots\"\n"),
                "plugins.memory_limit",
                "not a size",
            ),
            ("[server\n", "(syntax)", "line 1"),
        ];
        for (text, key, reason) in cases {
            let err = parse(text).expect_err(key);
            assert!(err.starts_with("/etc/fulcrum/test.toml: "), "{err}");
            assert!(err.contains(key), "`{err}` should name {key}");
            assert!(err.contains(reason), "`{err}` should say {reason}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}

//! Every metric Fulcrum exports, in one place: their names, help, labels and
//! buckets; the per-worker shards the request path records into; and the
//! collector that folds the shards and the live state into one scrape.
//!
//! Recording a request ([`record`]) touches only the recording thread's own
//! shard: an uncontended lock and two lookups keyed by integer ids, no atomic
//! shared with another worker. A scrape ([`render`]) takes each shard's lock in
//! turn, folds them, labels the ids with the names the serving snapshot gives
//! them (a series whose pool or backend is gone is dropped then, and its
//! counts forgotten), adds what is read from live state at scrape time (health,
//! in flight, idle connections, plugin faults, config), and encodes the lot
//! with the `prometheus` crate's text encoder (format 0.0.4, which Prometheus
//! scrapes and `promtool check metrics` lints).

use crate::record::{RequestRecord, Termination};
use crate::snapshot::Snapshot;
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds of the request duration buckets, in seconds.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the plugin decision-time buckets, in seconds: 100 ns to 1 ms.
pub const DECISION_BUCKETS: [f64; 13] = [
    1e-7, 2e-7, 5e-7, 1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3,
];

/// The same bounds in nanoseconds, for the request path (integer compares).
const DURATION_BOUNDS_NS: [u64; 14] = nanos(DURATION_BUCKETS);
const DECISION_BOUNDS_NS: [u64; 13] = nanos(DECISION_BUCKETS);

const fn nanos<const N: usize>(seconds: [f64; N]) -> [u64; N] {
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        // Rounded: 1e-7 s is 100 ns, not 99.
        out[i] = (seconds[i] * 1e9 + 0.5) as u64;
        i += 1;
    }
    out
}

/// A histogram as a shard keeps it: counts per bucket (not cumulative; the
/// last is +Inf), the sum in nanoseconds and the count.
#[derive(Debug, Clone)]
pub struct Buckets<const N: usize> {
    counts: [u64; N],
    over: u64,
    sum_ns: u64,
    count: u64,
}

impl<const N: usize> Default for Buckets<N> {
    fn default() -> Self {
        Buckets {
            counts: [0; N],
            over: 0,
            sum_ns: 0,
            count: 0,
        }
    }
}

impl<const N: usize> Buckets<N> {
    fn observe(&mut self, value: Duration, bounds_ns: &[u64; N]) {
        let ns = value.as_nanos() as u64;
        match bounds_ns.iter().position(|&bound| ns <= bound) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.count += 1;
    }

    fn add(&mut self, other: &Buckets<N>) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.over += other.over;
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        self.count += other.count;
    }
}

/// The status class label of a status code (`2xx` ...).
fn status_class(status: u16) -> u8 {
    (status / 100).clamp(1, 5) as u8
}

const CLASSES: [&str; 6] = ["", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// Hashes the integer keys of a shard's maps: they are ids, already spread,
/// so one multiply does (SipHash would cost more than the rest of a record).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Requests by (backend id or 0, status class, termination).
type RequestKey = (u64, u8, u8);

/// What one worker recorded for one pool (id 0: requests that matched none).
#[derive(Default)]
struct PoolShard {
    requests: IdMap<RequestKey, u64>,
    duration: Buckets<14>,
    decision: Buckets<13>,
    bytes_in: u64,
    bytes_out: u64,
    /// By reason, in `proxy::Retry::NAMES` order.
    retries: [u64; crate::proxy::Retry::NAMES.len()],
}

/// One worker's counts, by pool id.
#[derive(Default)]
struct Shard {
    pools: Mutex<IdMap<u64, PoolShard>>,
}

/// Every shard, for scrapes.
fn shards() -> &'static Mutex<Vec<Arc<Shard>>> {
    static SHARDS: OnceLock<Mutex<Vec<Arc<Shard>>>> = OnceLock::new();
    SHARDS.get_or_init(|| Mutex::new(Vec::new()))
}

thread_local! {
    static SHARD: Arc<Shard> = {
        let shard = Arc::new(Shard::default());
        shards().lock().unwrap_or_else(|p| p.into_inner()).push(shard.clone());
        shard
    };
}

/// Records one finished request into this thread's shard.
pub fn record(record: &RequestRecord<'_>) {
    let pool = record.pool.map_or(0, |p| p.id);
    let backend = record.backend.map_or(0, |b| b.state.id);
    let key = (backend, status_class(record.status.as_u16()), record.termination as u8);
    SHARD.with(|shard| {
        let mut pools = shard.pools.lock().unwrap_or_else(|p| p.into_inner());
        let entry = pools.entry(pool).or_default();
        *entry.requests.entry(key).or_default() += 1;
        entry.duration.observe(record.duration, &DURATION_BOUNDS_NS);
        if record.backend.is_some() || record.termination == Termination::NoBackend {
            entry.decision.observe(record.decision, &DECISION_BOUNDS_NS);
        }
        entry.bytes_in += record.bytes_in;
        entry.bytes_out += record.bytes_out;
        for (sum, n) in entry.retries.iter_mut().zip(record.retry_reasons) {
            *sum += u64::from(n);
        }
    });
}

/// Process-wide events counted off the request path.
#[derive(Debug, Default)]
pub struct Events {
    pub config_reloads_ok: std::sync::atomic::AtomicU64,
    pub config_reloads_failed: std::sync::atomic::AtomicU64,
    /// Unix seconds of the last successful (re)load.
    pub config_loaded_at: std::sync::atomic::AtomicU64,
    /// Plugin files loaded and refused by the plugin directory's watcher.
    pub plugin_reloads_ok: std::sync::atomic::AtomicU64,
    pub plugin_reloads_refused: std::sync::atomic::AtomicU64,
}

impl Events {
    /// The serving config was loaded now.
    pub fn stamp(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.config_loaded_at.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// A changed config was applied by a reload.
    pub fn reloaded(&self) {
        self.config_reloads_ok
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stamp();
    }

    /// A config reload was refused.
    pub fn refused(&self) {
        self.config_reloads_failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The process's event counters.
pub fn events() -> &'static Events {
    static EVENTS: OnceLock<Events> = OnceLock::new();
    EVENTS.get_or_init(Events::default)
}

/// The shards folded, labelled by `snapshot`; counts of pools and backends
/// it no longer has are forgotten in the shards too.
fn fold(snapshot: &Snapshot) -> IdMap<u64, PoolShard> {
    let live_pools: IdMap<u64, ()> = snapshot.pools.iter().map(|p| (p.id, ())).collect();
    let live_backends: IdMap<u64, ()> = snapshot
        .pools
        .iter()
        .flat_map(|p| p.backends.iter().map(|b| (b.state.id, ())))
        .collect();
    let mut total: IdMap<u64, PoolShard> = IdMap::default();
    let shards = shards().lock().unwrap_or_else(|p| p.into_inner()).clone();
    for shard in shards {
        let mut pools = shard.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|id, _| *id == 0 || live_pools.contains_key(id));
        for (id, pool) in pools.iter_mut() {
            pool.requests
                .retain(|(backend, _, _), _| *backend == 0 || live_backends.contains_key(backend));
            let sum = total.entry(*id).or_default();
            for (key, count) in &pool.requests {
                *sum.requests.entry(*key).or_default() += count;
            }
            sum.duration.add(&pool.duration);
            sum.decision.add(&pool.decision);
            sum.bytes_in += pool.bytes_in;
            sum.bytes_out += pool.bytes_out;
            for (total, n) in sum.retries.iter_mut().zip(pool.retries) {
                *total += n;
            }
        }
    }
    total
}

/// A pool's cumulative counts since start, as the status page's windowed
/// figures ([`crate::live`]) difference them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PoolTotals {
    pub requests: u64,
    /// Answers with a 5xx status, Fulcrum's own (502, 503, 504) included.
    pub errors: u64,
    /// `(requests, errors)` by backend state id.
    pub backends: HashMap<u64, (u64, u64)>,
    /// Request durations per bucket of [`DURATION_BUCKETS`], the last one
    /// counting those above every bound.
    pub durations: [u64; 15],
}

/// Every live pool's [`PoolTotals`], by pool id.
pub fn totals(snapshot: &Snapshot) -> HashMap<u64, PoolTotals> {
    fold(snapshot)
        .into_iter()
        .filter(|(id, _)| *id != 0)
        .map(|(id, pool)| {
            let mut totals = PoolTotals::default();
            for (&(backend, class, _), &count) in &pool.requests {
                let errors = if class == 5 { count } else { 0 };
                totals.requests += count;
                totals.errors += errors;
                if backend != 0 {
                    let entry = totals.backends.entry(backend).or_default();
                    entry.0 += count;
                    entry.1 += errors;
                }
            }
            totals.durations[..14].copy_from_slice(&pool.duration.counts);
            totals.durations[14] = pool.duration.over;
            (id, totals)
        })
        .collect()
}

/// The Prometheus text exposition (format 0.0.4) of every metric.
pub fn render(snapshot: &Snapshot) -> String {
    let scrape = Scrape {
        pools: fold(snapshot),
        snapshot: SnapshotView::of(snapshot),
    };
    // The encoder refuses a family without samples: those are left out.
    let mut families = scrape.families();
    families.retain(|family| !family.get_metric().is_empty());
    prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .unwrap_or_else(|error| {
            tracing::error!(%error, "cannot encode the metrics");
            String::new()
        })
}

/// The exposition's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a scrape reads from the serving snapshot, copied so the collector
/// owns it.
#[derive(Debug)]
struct SnapshotView {
    pools: Vec<PoolView>,
    /// Every plugin in use (by pools and filters), once each.
    plugins: Vec<PluginView>,
    config_hash: String,
    /// (listener, certificate file, notAfter) of every served certificate.
    certificates: Vec<(String, String, i64)>,
    access_log_dropped: Option<u64>,
}

#[derive(Debug)]
struct PluginView {
    name: String,
    /// By `Fault::KINDS`.
    faults: [u64; 3],
    quarantined: bool,
    /// Instances started in the background, and on a worker.
    started: [u64; 2],
    /// Entries and evictions of its shared key-value store, if it has used one.
    shared: Option<(usize, u64)>,
}

#[derive(Debug)]
struct PoolView {
    id: u64,
    name: String,
    /// Its policy's plugin.
    plugin: String,
    backends: Vec<BackendView>,
    /// Requests waiting for a backend with room.
    queued: usize,
    panic: bool,
    /// By `traffic::Breaker`: times opened, requests refused.
    breaker_trips: [u64; 3],
    breaker_refused: [u64; 3],
    budget_refused: u64,
}

#[derive(Debug)]
struct BackendView {
    id: u64,
    address: String,
    healthy: bool,
    in_flight: u32,
    idle: usize,
    opened: u64,
    check_passes: u64,
    check_failures: u64,
    ejections: u64,
}

impl SnapshotView {
    fn of(snapshot: &Snapshot) -> SnapshotView {
        use std::sync::atomic::Ordering::Relaxed;
        let pools = snapshot
            .pools
            .iter()
            .map(|pool| PoolView {
                id: pool.id,
                name: pool.name.clone(),
                plugin: pool.policy.plugin_name().to_string(),
                queued: pool.traffic.queued(),
                panic: pool.traffic.in_panic(),
                breaker_trips: [0, 1, 2].map(|i| pool.traffic.trips[i].load(Relaxed)),
                breaker_refused: [0, 1, 2].map(|i| pool.traffic.refused[i].load(Relaxed)),
                budget_refused: pool.traffic.budget_refused.load(Relaxed),
                backends: pool
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(index, b)| BackendView {
                        id: b.state.id,
                        address: b.address.clone(),
                        healthy: b.state.is_healthy(),
                        in_flight: b.state.in_flight(),
                        idle: pool.upstream.idle_count(index),
                        opened: pool.upstream.opened_count(index),
                        check_passes: b.state.checks_passed.load(Relaxed),
                        check_failures: b.state.checks_failed.load(Relaxed),
                        ejections: b.state.ejections_total.load(Relaxed),
                    })
                    .collect(),
            })
            .collect();
        let shared = crate::plugin::shared::stores();
        let mut plugins: Vec<PluginView> = Vec::new();
        let slots = snapshot
            .pools
            .iter()
            .map(|pool| pool.policy.slot())
            .chain(snapshot.route_filters.iter().flatten().map(|filter| filter.slot()));
        for slot in slots {
            if plugins.iter().any(|p| p.name == slot.name) {
                continue;
            }
            plugins.push(PluginView {
                name: slot.name.clone(),
                faults: [0, 1, 2].map(|i| slot.faults_by_kind[i].load(Relaxed)),
                quarantined: slot.current().is_quarantined(),
                started: [0, 1].map(|i| slot.started[i].load(Relaxed)),
                shared: shared
                    .iter()
                    .find(|(name, _)| *name == slot.name)
                    .map(|(_, store)| (store.entries(), store.evictions())),
            });
        }
        SnapshotView {
            pools,
            plugins,
            config_hash: snapshot.config.digest.0.clone(),
            certificates: crate::tls::terminators()
                .iter()
                .flat_map(|t| {
                    t.certificates()
                        .iter()
                        .map(|c| (t.listener.clone(), c.file.display().to_string(), c.not_after))
                        .collect::<Vec<_>>()
                })
                .collect(),
            access_log_dropped: snapshot
                .access_log
                .as_ref()
                .map(|log| log.dropped.load(std::sync::atomic::Ordering::Relaxed)),
        }
    }
}

/// One scrape's figures.
struct Scrape {
    pools: IdMap<u64, PoolShard>,
    snapshot: SnapshotView,
}

type Labels = Vec<(&'static str, String)>;

fn label_pairs(labels: Labels) -> Vec<LabelPair> {
    labels
        .into_iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value);
            pair
        })
        .collect()
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(help.to_string());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

fn counters(name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, u64)>) -> MetricFamily {
    let metrics = samples
        .into_iter()
        .map(|(labels, value)| {
            let mut counter = prometheus::proto::Counter::default();
            counter.set_value(value as f64);
            let mut metric = Metric::from_label(label_pairs(labels));
            metric.set_counter(counter);
            metric
        })
        .collect();
    family(name, help, MetricType::COUNTER, metrics)
}

fn gauges(name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, f64)>) -> MetricFamily {
    let metrics = samples
        .into_iter()
        .map(|(labels, value)| {
            let mut gauge = prometheus::proto::Gauge::default();
            gauge.set_value(value);
            let mut metric = Metric::from_label(label_pairs(labels));
            metric.set_gauge(gauge);
            metric
        })
        .collect();
    family(name, help, MetricType::GAUGE, metrics)
}

fn histograms<'a, const N: usize>(
    name: &str,
    help: &str,
    bounds: &[f64; N],
    samples: impl IntoIterator<Item = (Labels, &'a Buckets<N>)>,
) -> MetricFamily {
    let metrics = samples
        .into_iter()
        .map(|(labels, buckets)| {
            let mut cumulative = 0;
            let bucket_list = bounds
                .iter()
                .zip(buckets.counts)
                .map(|(&bound, count)| {
                    cumulative += count;
                    let mut bucket = prometheus::proto::Bucket::default();
                    bucket.set_upper_bound(bound);
                    bucket.set_cumulative_count(cumulative);
                    bucket
                })
                .collect();
            // The encoder adds the +Inf bucket from the count.
            let mut histogram = prometheus::proto::Histogram::default();
            histogram.set_bucket(bucket_list);
            histogram.set_sample_count(buckets.count);
            histogram.set_sample_sum(buckets.sum_ns as f64 / 1e9);
            let mut metric = Metric::from_label(label_pairs(labels));
            metric.set_histogram(histogram);
            metric
        })
        .collect();
    family(name, help, MetricType::HISTOGRAM, metrics)
}

impl Scrape {
    fn pool_name(&self, id: u64) -> String {
        self.snapshot
            .pools
            .iter()
            .find(|p| p.id == id)
            .map_or(String::new(), |p| p.name.clone())
    }

    fn backend_name(&self, id: u64) -> String {
        self.snapshot
            .pools
            .iter()
            .flat_map(|p| &p.backends)
            .find(|b| b.id == id)
            .map_or(String::new(), |b| b.address.clone())
    }

    /// Every metric family, in a stable order.
    fn families(&self) -> Vec<MetricFamily> {
        let mut pools: Vec<(&u64, &PoolShard)> = self.pools.iter().collect();
        pools.sort_by_key(|(id, _)| **id);
        // A pool's counts by circuit-breaker threshold, as samples.
        let by_threshold = |counts: fn(&PoolView) -> &[u64; 3]| -> Vec<(Labels, u64)> {
            self.snapshot
                .pools
                .iter()
                .flat_map(|p| {
                    crate::traffic::Breaker::ALL.iter().map(move |b| {
                        (
                            vec![("pool", p.name.clone()), ("threshold", b.as_str().to_string())],
                            counts(p)[*b as usize],
                        )
                    })
                })
                .collect()
        };
        let by_pool = |value: fn(&PoolShard) -> u64| -> Vec<(Labels, u64)> {
            pools
                .iter()
                .map(|(id, pool)| (vec![("pool", self.pool_name(**id))], value(pool)))
                .collect()
        };

        let mut requests = Vec::new();
        for (id, pool) in &pools {
            let mut keys: Vec<(&RequestKey, &u64)> = pool.requests.iter().collect();
            keys.sort();
            for ((backend, class, termination), count) in keys {
                let labels = vec![
                    ("pool", self.pool_name(**id)),
                    ("backend", self.backend_name(*backend)),
                    ("class", CLASSES[usize::from(*class)].to_string()),
                    (
                        "termination",
                        Termination::ALL
                            .get(usize::from(*termination))
                            .map_or("unknown", |t| t.as_str())
                            .to_string(),
                    ),
                ];
                requests.push((labels, *count));
            }
        }

        // Decision time by plugin: the pools of one plugin folded together.
        let mut by_plugin: Vec<(String, Buckets<13>)> = Vec::new();
        for (id, pool) in &pools {
            let Some(view) = self.snapshot.pools.iter().find(|p| p.id == **id) else {
                continue;
            };
            match by_plugin.iter_mut().find(|(name, _)| *name == view.plugin) {
                Some((_, buckets)) => buckets.add(&pool.decision),
                None => by_plugin.push((view.plugin.clone(), pool.decision.clone())),
            }
        }

        let backends: Vec<(Labels, &BackendView)> = self
            .snapshot
            .pools
            .iter()
            .flat_map(|pool| {
                pool.backends
                    .iter()
                    .map(move |b| (vec![("pool", pool.name.clone()), ("backend", b.address.clone())], b))
            })
            .collect();
        let per_backend = |value: fn(&BackendView) -> f64| -> Vec<(Labels, f64)> {
            backends.iter().map(|(labels, b)| (labels.clone(), value(b))).collect()
        };
        let plugins = &self.snapshot.plugins;
        let events = events();
        let client_connections = crate::memory::totals();
        use std::sync::atomic::Ordering::Relaxed;

        vec![
            counters(
                "fulcrum_requests_total",
                "Requests answered, by pool, backend, status class and termination cause.",
                requests,
            ),
            histograms(
                "fulcrum_request_duration_seconds",
                "Time from a request's head to the end of its answer, by pool.",
                &DURATION_BUCKETS,
                pools
                    .iter()
                    .map(|(id, pool)| (vec![("pool", self.pool_name(**id))], &pool.duration)),
            ),
            counters(
                "fulcrum_request_body_bytes_total",
                "Request body bytes read from clients, by pool.",
                by_pool(|p| p.bytes_in),
            ),
            counters(
                "fulcrum_response_body_bytes_total",
                "Response body bytes written to clients, by pool.",
                by_pool(|p| p.bytes_out),
            ),
            counters(
                "fulcrum_retries_total",
                "Tries of a request on another backend, by pool and reason.",
                pools.iter().flat_map(|(id, pool)| {
                    let name = self.pool_name(**id);
                    crate::proxy::Retry::NAMES
                        .iter()
                        .zip(pool.retries)
                        .map(move |(reason, n)| (vec![("pool", name.clone()), ("reason", reason.to_string())], n))
                }),
            ),
            histograms(
                "fulcrum_plugin_decision_seconds",
                "Time a request's backend selection took in its pool's policy plugin.",
                &DECISION_BUCKETS,
                by_plugin
                    .iter()
                    .map(|(plugin, buckets)| (vec![("plugin", plugin.clone())], buckets)),
            ),
            gauges(
                "fulcrum_backend_healthy",
                "1 when the backend takes traffic (checks pass and it is not ejected), else 0.",
                per_backend(|b| f64::from(u8::from(b.healthy))),
            ),
            gauges(
                "fulcrum_backend_in_flight",
                "Requests in flight at the backend.",
                per_backend(|b| f64::from(b.in_flight)),
            ),
            gauges(
                "fulcrum_upstream_idle_connections",
                "Idle keep-alive connections held to the backend.",
                per_backend(|b| b.idle as f64),
            ),
            counters(
                "fulcrum_upstream_connections_opened_total",
                "Connections opened to the backend (a pooled one is counted once, when made).",
                backends.iter().map(|(labels, b)| (labels.clone(), b.opened)),
            ),
            counters(
                "fulcrum_health_checks_total",
                "Active health checks of the backend, by result.",
                backends.iter().flat_map(|(labels, b)| {
                    let mut passed = labels.clone();
                    passed.push(("result", "pass".to_string()));
                    let mut failed = labels.clone();
                    failed.push(("result", "fail".to_string()));
                    [(passed, b.check_passes), (failed, b.check_failures)]
                }),
            ),
            counters(
                "fulcrum_backend_ejections_total",
                "Passive ejections of the backend.",
                backends.iter().map(|(labels, b)| (labels.clone(), b.ejections)),
            ),
            counters(
                "fulcrum_plugin_faults_total",
                "Plugin calls served by the fallback, by kind: trap (also deadline, memory cap), bad answer, quarantined.",
                plugins.iter().flat_map(|p| {
                    crate::plugin::Fault::KINDS
                        .iter()
                        .zip(p.faults)
                        .map(|(kind, n)| (vec![("plugin", p.name.clone()), ("kind", kind.to_string())], n))
                }),
            ),
            counters(
                "fulcrum_plugin_reloads_total",
                "Plugin files from the plugin directory, by result: loaded or refused.",
                [
                    (
                        vec![("result", "loaded".to_string())],
                        events.plugin_reloads_ok.load(Relaxed),
                    ),
                    (
                        vec![("result", "refused".to_string())],
                        events.plugin_reloads_refused.load(Relaxed),
                    ),
                ],
            ),
            gauges(
                "fulcrum_client_connections",
                "Client connections open.",
                [(Vec::new(), client_connections.0 as f64)],
            ),
            gauges(
                "fulcrum_client_connections_busy",
                "Client connections with a request in flight (and HTTP/2 connections).",
                [(Vec::new(), client_connections.1 as f64)],
            ),
            gauges(
                "fulcrum_queue_waiting",
                "Requests waiting for a backend with room (max_in_flight), by pool.",
                self.snapshot
                    .pools
                    .iter()
                    .map(|p| (vec![("pool", p.name.clone())], p.queued as f64)),
            ),
            gauges(
                "fulcrum_panic_mode",
                "1 while too few of a pool's backends are healthy and requests go to all of them.",
                self.snapshot
                    .pools
                    .iter()
                    .map(|p| (vec![("pool", p.name.clone())], f64::from(u8::from(p.panic)))),
            ),
            counters(
                "fulcrum_circuit_breaker_trips_total",
                "Times a pool's circuit breaker opened, by threshold.",
                by_threshold(|p| &p.breaker_trips),
            ),
            counters(
                "fulcrum_circuit_breaker_refused_total",
                "Requests answered 503 (or retries not made) over a circuit breaker's threshold.",
                by_threshold(|p| &p.breaker_refused),
            ),
            counters(
                "fulcrum_retry_budget_exhausted_total",
                "Retries not made because the pool's retry budget was spent.",
                self.snapshot
                    .pools
                    .iter()
                    .map(|p| (vec![("pool", p.name.clone())], p.budget_refused)),
            ),
            gauges(
                "fulcrum_plugin_quarantined",
                "1 while the serving version of the plugin is quarantined.",
                plugins
                    .iter()
                    .map(|p| (vec![("plugin", p.name.clone())], f64::from(u8::from(p.quarantined)))),
            ),
            counters(
                "fulcrum_plugin_instances_started_total",
                "Plugin instances started, by where: in the background (ready before a worker needs one), or on a worker that found none ready.",
                plugins.iter().flat_map(|p| {
                    ["background", "worker"]
                        .iter()
                        .zip(p.started)
                        .map(|(on, n)| (vec![("plugin", p.name.clone()), ("on", on.to_string())], n))
                }),
            ),
            gauges(
                "fulcrum_plugin_shared_entries",
                "Entries in the plugin's shared key-value store (`[plugins] shared_entries` at most).",
                plugins
                    .iter()
                    .filter_map(|p| Some((vec![("plugin", p.name.clone())], p.shared?.0 as f64))),
            ),
            counters(
                "fulcrum_plugin_shared_evictions_total",
                "Entries evicted from the plugin's full shared key-value store (oldest first).",
                plugins
                    .iter()
                    .filter_map(|p| Some((vec![("plugin", p.name.clone())], p.shared?.1))),
            ),
            counters(
                "fulcrum_config_reloads_total",
                "Config reloads, by result.",
                [
                    (
                        vec![("result", "applied".to_string())],
                        events.config_reloads_ok.load(Relaxed),
                    ),
                    (
                        vec![("result", "refused".to_string())],
                        events.config_reloads_failed.load(Relaxed),
                    ),
                ],
            ),
            gauges(
                "fulcrum_config_last_reload_success_timestamp_seconds",
                "When the serving config was loaded, in Unix seconds.",
                [(Vec::new(), events.config_loaded_at.load(Relaxed) as f64)],
            ),
            counters(
                "fulcrum_access_log_dropped_total",
                "Access log lines dropped because the writer fell behind.",
                self.snapshot.access_log_dropped.map(|n| (Vec::new(), n)),
            ),
            gauges(
                "fulcrum_config_info",
                "The serving config, by the SHA-256 of its file.",
                [(vec![("hash", self.snapshot.config_hash.clone())], 1.0)],
            ),
            gauges(
                "fulcrum_tls_certificate_expiry_timestamp_seconds",
                "When each certificate a TLS listener serves expires (its notAfter), in Unix seconds.",
                self.snapshot.certificates.iter().map(|(listener, file, not_after)| {
                    (
                        vec![("listener", listener.clone()), ("certificate", file.clone())],
                        *not_after as f64,
                    )
                }),
            ),
        ]
    }
}

//! A [`Snapshot`]: everything a request needs (config, pools with their
//! backends, policies and upstreams, routes), immutable once built, and the
//! state [`Kept`] across snapshots so a reload finds it again.

use crate::access_log::AccessLog;
use crate::backend::{Backend, BackendList, BackendState};
use crate::changes::Changes;
use crate::config::{Config, ConfigError, PoolConfig};
use crate::plugin::registry::Registry;
use crate::plugin::{Filter, Limits, Plugin, PluginError, Policy, PolicyCounters, Tickets};
use crate::router::Router;
use crate::upstream::tls::TlsConnector;
use crate::upstream::{Connector, IdleConns, PoolLimits, TcpConnector, Upstream};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One pool as the request path sees it.
pub struct Pool {
    /// Unique for the process's life and kept across reloads by name: the
    /// pool's key in the metrics shards.
    pub id: u64,
    pub name: String,
    pub config: PoolConfig,
    pub backends: BackendList,
    pub policy: Policy,
    /// The way to the backends: connector and idle connections.
    pub upstream: Upstream,
    /// Its queue, circuit breakers, retry budget and panic mode, kept across reloads.
    pub traffic: Arc<crate::traffic::PoolTraffic>,
}

/// Everything a request needs, immutable once built.
pub struct Snapshot {
    pub config: Config,
    /// Where request records are logged, when `[access_log]` is set.
    pub access_log: Option<Arc<AccessLog>>,
    pub pools: Vec<Pool>,
    pub router: Router,
    /// Each route's filters in order, by the route's index in the config.
    pub route_filters: Vec<Vec<Arc<Filter>>>,
}

/// What a backend keeps across reloads: its state, its idle connections and
/// its plugin id.
type KeptBackend = (Arc<BackendState>, Arc<IdleConns>, u32);

/// State that outlives snapshots, keyed so a reload finds it again.
#[derive(Default)]
pub struct Kept {
    /// By (pool, address): its state, its idle connections and its plugin id.
    backends: HashMap<(String, String), KeptBackend>,
    /// By pool.
    counters: HashMap<String, PolicyCounters>,
    /// Pool ids by name.
    pool_ids: HashMap<String, u64>,
    /// Traffic state by pool.
    traffic: HashMap<String, Arc<crate::traffic::PoolTraffic>>,
    /// Ticket counters of each filter, by name.
    filter_tickets: HashMap<String, Tickets>,
    /// Snapshots built: backends of the first are not new (no slow start).
    builds: u64,
    /// The access log, opened once at start.
    pub access_log: Option<Arc<AccessLog>>,
}

impl Snapshot {
    /// The pool named `pool` and the index of its backend `address`.
    pub fn backend(&self, pool: &str, address: &str) -> Option<(&Pool, usize)> {
        let pool = self.pools.iter().find(|p| p.name == pool)?;
        let index = pool.backends.iter().position(|b| b.address == address)?;
        Some((pool, index))
    }

    /// Waits (at most `within` in all) for the plugin instances its pools and
    /// filters start in the background, so the first requests find them.
    pub fn wait_for_instances(&self, within: std::time::Duration) {
        let until = std::time::Instant::now() + within;
        let left = || until.saturating_duration_since(std::time::Instant::now());
        for pool in &self.pools {
            pool.policy.wait_ready(left());
        }
        for filter in self.route_filters.iter().flatten() {
            filter.wait_ready(left());
        }
    }

    /// A snapshot with no pools, to stand in before the first is built.
    pub fn empty(config: Config) -> Snapshot {
        Snapshot {
            config,
            access_log: None,
            pools: Vec::new(),
            router: Router::new(&[], |_| None),
            route_filters: Vec::new(),
        }
    }
}

/// Builds the snapshot for `config` with the operator's runtime `changes`
/// on top: each pool's policy from `registry` (checked with the pool's
/// config), its backends with the state `kept` for them (drained as
/// `changes` say), its upstream, and the routes. Forgets kept state of
/// backends and pools that are gone.
pub fn build(config: Config, changes: &Changes, registry: &Registry, kept: &mut Kept) -> Result<Snapshot, ConfigError> {
    // Filters first: a refused one must leave the kept state as it was.
    let filters = build_filters(&config, registry, kept)?;
    let mut pools = Vec::with_capacity(config.pools.len());
    // Each pool as it runs: the file's, with the runtime changes applied.
    let running: BTreeMap<&String, PoolConfig> = config
        .pools
        .iter()
        .map(|(name, pool)| (name, changes.apply(name, pool)))
        .collect();
    for (&name, pool) in &running {
        let key = format!("pools.{name}.policy");
        let slot = registry.slot(&pool.policy).ok_or_else(|| {
            let why = format!(
                "unknown policy `{}`: not built in, and {}",
                pool.policy,
                not_in_dir(&config, &pool.policy)
            );
            invalid(&config, &key, why)
        })?;
        let limits = plugin_limits(&config, &pool.policy);
        if !slot.current().pre.is_balancer() {
            return Err(invalid(
                &config,
                &key,
                format!(
                    "plugin `{}` is a filter, not a balancer: name it in a [filters.NAME] table",
                    pool.policy
                ),
            ));
        }
        slot.current()
            .check(&pool.policy_config, &limits)
            .map_err(|e| invalid(&config, &format!("pools.{name}.policy_config"), e.to_string()))?;
        let ids = backend_ids(name, pool, &kept.backends);
        let (backends, idle): (Vec<Arc<Backend>>, Vec<Arc<IdleConns>>) = pool
            .backends
            .iter()
            .zip(ids)
            .map(|(b, id)| {
                let (state, idle, _) = kept
                    .backends
                    .entry((name.clone(), b.address.clone()))
                    .or_insert_with(|| (Arc::default(), Arc::default(), id))
                    .clone();
                state.set_drained(changes.is_drained(name, &b.address));
                if kept.builds == 0 {
                    state.healthy_from_start();
                }
                let backend = Arc::new(Backend {
                    id,
                    labels: b.labels.clone().into(),
                    address: b.address.clone(),
                    socket: b.socket,
                    weight: b.weight,
                    state,
                });
                (backend, idle)
            })
            .unzip();
        let connector: Arc<dyn Connector> = match &pool.tls {
            None => Arc::new(TcpConnector),
            Some(tls) => Arc::new(
                TlsConnector::new(tls, pool.protocol)
                    .map_err(|e| invalid(&config, &format!("pools.{name}.tls.{}", e.key), e.reason))?,
            ),
        };
        // Connections kept from before a reload are of no use once the way
        // they were made changes.
        let transport = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (pool.protocol, &pool.tls).hash(&mut hasher);
            hasher.finish()
        };
        let counters = kept.counters.entry(name.clone()).or_default().clone();
        let traffic = kept.traffic.entry(name.clone()).or_default().clone();
        for (backend, configured) in backends.iter().zip(&pool.backends) {
            let limit = configured.max_in_flight.or(pool.max_in_flight).unwrap_or(0);
            backend.state.limit(limit, &traffic);
        }
        static NEXT_POOL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = *kept
            .pool_ids
            .entry(name.clone())
            .or_insert_with(|| NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        pools.push(Pool {
            id,
            name: name.clone(),
            config: pool.clone(),
            backends: backends.into(),
            policy: Policy::new(slot, &pool.policy_config, limits, counters),
            upstream: Upstream::new(
                idle,
                connector,
                PoolLimits {
                    // A connection that opened with one client's PROXY header
                    // is that client's: never reused for another.
                    max_idle: if pool.send_proxy_protocol.is_some() {
                        0
                    } else {
                        pool.max_idle_per_backend
                    },
                    idle_timeout: pool.upstream_idle_timeout,
                },
                pool.connect_timeout,
            )
            .sending_proxy_protocol(pool.send_proxy_protocol)
            .speaking(pool.protocol, pool.tls.is_some(), transport),
            traffic,
        });
    }
    // Forget state of backends no longer running.
    kept.backends.retain(|(pool, address), _| {
        running
            .get(pool)
            .is_some_and(|p| p.backends.iter().any(|b| &b.address == address))
    });
    kept.builds += 1;
    kept.counters.retain(|pool, _| config.pools.contains_key(pool));
    kept.traffic.retain(|pool, _| config.pools.contains_key(pool));
    kept.pool_ids.retain(|pool, _| config.pools.contains_key(pool));
    let route_filters = config
        .routes
        .iter()
        .map(|route| {
            route
                .filters
                .iter()
                .filter_map(|name| filters.get(name).cloned())
                .collect()
        })
        .collect();
    let names: Vec<&String> = config.pools.keys().collect();
    let router = Router::new(&config.routes, |pool| names.iter().position(|n| *n == pool));
    Ok(Snapshot {
        config,
        access_log: kept.access_log.clone(),
        pools,
        router,
        route_filters,
    })
}

/// Why plugin `name` is not in the plugin directory.
fn not_in_dir(config: &Config, name: &str) -> String {
    match &config.plugins.dir {
        None => "no [plugins] dir is set".to_string(),
        Some(dir) => format!("no {name}.wasm in {}", dir.display()),
    }
}

/// Each `[filters.NAME]` with its plugin, checked (a filter, whose `init`
/// takes the config), its tickets kept across reloads by name.
fn build_filters(
    config: &Config,
    registry: &Registry,
    kept: &mut Kept,
) -> Result<HashMap<String, Arc<Filter>>, ConfigError> {
    let mut filters = HashMap::new();
    for (name, filter) in &config.filters {
        let key = format!("filters.{name}.plugin");
        let slot = registry.slot(&filter.plugin).ok_or_else(|| {
            let why = format!(
                "unknown plugin `{}`: {}",
                filter.plugin,
                not_in_dir(config, &filter.plugin)
            );
            invalid(config, &key, why)
        })?;
        if !slot.current().pre.is_filter() {
            return Err(invalid(
                config,
                &key,
                format!(
                    "plugin `{}` is not a filter (it exports no fulcrum:plugin/request-filter)",
                    filter.plugin
                ),
            ));
        }
        let limits = plugin_limits(config, &filter.plugin);
        slot.current()
            .check(&filter.config, &limits)
            .map_err(|e| invalid(config, &format!("filters.{name}.config"), e.to_string()))?;
        let tickets = kept.filter_tickets.entry(name.clone()).or_default().clone();
        filters.insert(
            name.clone(),
            Arc::new(Filter::new(
                name,
                slot,
                &filter.config,
                limits,
                filter.on_fault,
                tickets,
            )),
        );
    }
    kept.filter_tickets.retain(|name, _| config.filters.contains_key(name));
    Ok(filters)
}

/// The plugin id of each backend of `pool`, in order: the id it had if the
/// pool listed it before, else the lowest id no backend of the pool holds.
fn backend_ids(name: &str, pool: &PoolConfig, kept: &HashMap<(String, String), KeptBackend>) -> Vec<u32> {
    let known: Vec<Option<u32>> = pool
        .backends
        .iter()
        .map(|b| kept.get(&(name.to_string(), b.address.clone())).map(|k| k.2))
        .collect();
    let mut taken: std::collections::BTreeSet<u32> = known.iter().flatten().copied().collect();
    let mut next_free = 0u32;
    known
        .into_iter()
        .map(|id| {
            id.unwrap_or_else(|| {
                while taken.contains(&next_free) {
                    next_free += 1;
                }
                taken.insert(next_free);
                next_free
            })
        })
        .collect()
}

/// The limits plugin `plugin`'s calls run with: its own
/// `[plugins.limits.NAME]`, else the global ones.
pub fn plugin_limits(config: &Config, plugin: &str) -> Limits {
    let own = config.plugins.limits.get(plugin);
    Limits {
        call_timeout: own.and_then(|l| l.call_timeout).unwrap_or(config.plugins.call_timeout),
        memory_limit: own.and_then(|l| l.memory_limit).unwrap_or(config.plugins.memory_limit),
    }
}

pub fn invalid(config: &Config, key: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        file: config.source.clone(),
        key: key.to_string(),
        reason,
    }
}

/// Checks a new version of plugin `name` against every use `config` makes
/// of it: a balancer for each pool that names it, a filter for each filter,
/// and `init` passing with each use's config.
pub fn check_against(plugin: &Plugin, name: &str, config: &Config) -> Result<(), PluginError> {
    let limits = plugin_limits(config, name);
    let in_use = |key: String, source: PluginError| PluginError::InUse {
        key,
        source: Box::new(source),
    };
    let unfit = |reason: &str| PluginError::Unfit {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    for (pool_name, pool) in config.pools.iter().filter(|(_, p)| p.policy == name) {
        if !plugin.pre.is_balancer() {
            let reason = "a pool's policy must export a balancer, and this version exports none";
            return Err(in_use(format!("pools.{pool_name}.policy"), unfit(reason)));
        }
        plugin
            .check(&pool.policy_config, &limits)
            .map_err(|e| in_use(format!("pools.{pool_name}.policy_config"), e))?;
    }
    for (filter_name, filter) in config.filters.iter().filter(|(_, f)| f.plugin == name) {
        if !plugin.pre.is_filter() {
            let reason = "a filter's plugin must export a filter, and this version exports none";
            return Err(in_use(format!("filters.{filter_name}.plugin"), unfit(reason)));
        }
        plugin
            .check(&filter.config, &limits)
            .map_err(|e| in_use(format!("filters.{filter_name}.config"), e))?;
    }
    Ok(())
}

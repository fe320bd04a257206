//! A [`Snapshot`]: everything a request needs (config, pools with their
//! backends, policies and upstreams, routes), immutable once built, and the
//! state [`Kept`] across snapshots so a reload finds it again.

use crate::access_log::AccessLog;
use crate::backend::{Backend, BackendList, BackendState};
use crate::changes::Changes;
use crate::config::{Config, ConfigError, PoolConfig};
use crate::plugin::registry::Registry;
use crate::plugin::{Limits, Plugin, PluginError, Policy, PolicyCounters};
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
}

/// State that outlives snapshots, keyed so a reload finds it again.
#[derive(Default)]
pub struct Kept {
    /// By (pool, address): its state, its idle connections and its plugin id.
    backends: HashMap<(String, String), (Arc<BackendState>, Arc<IdleConns>, u32)>,
    /// By pool.
    counters: HashMap<String, PolicyCounters>,
    /// Pool ids by name.
    pool_ids: HashMap<String, u64>,
    /// Traffic state by pool.
    traffic: HashMap<String, Arc<crate::traffic::PoolTraffic>>,
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

    /// A snapshot with no pools, to stand in before the first is built.
    pub fn empty(config: Config) -> Snapshot {
        Snapshot {
            config,
            access_log: None,
            pools: Vec::new(),
            router: Router::new(&[], |_| None),
        }
    }
}

/// Builds the snapshot for `config` with the operator's runtime `changes`
/// on top: each pool's policy from `registry` (checked with the pool's
/// config), its backends with the state `kept` for them (drained as
/// `changes` say), its upstream, and the routes. Forgets kept state of
/// backends and pools that are gone.
pub fn build(config: Config, changes: &Changes, registry: &Registry, kept: &mut Kept) -> Result<Snapshot, ConfigError> {
    let limits = plugin_limits(&config);
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
            let dir = config
                .plugins
                .dir
                .as_ref()
                .map_or("no [plugins] dir is set".to_string(), |d| {
                    format!("no {}.wasm in {}", pool.policy, d.display())
                });
            invalid(
                &config,
                &key,
                format!("unknown policy `{}`: not built in, and {dir}", pool.policy),
            )
        })?;
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
    let names: Vec<&String> = config.pools.keys().collect();
    let router = Router::new(&config.routes, |pool| names.iter().position(|n| *n == pool));
    Ok(Snapshot {
        config,
        access_log: kept.access_log.clone(),
        pools,
        router,
    })
}

/// The plugin id of each backend of `pool`, in order: the id it had if the
/// pool listed it before, else the lowest id no backend of the pool holds.
fn backend_ids(
    name: &str,
    pool: &PoolConfig,
    kept: &HashMap<(String, String), (Arc<BackendState>, Arc<IdleConns>, u32)>,
) -> Vec<u32> {
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

pub fn plugin_limits(config: &Config) -> Limits {
    Limits {
        call_timeout: config.plugins.call_timeout,
        memory_limit: config.plugins.memory_limit,
    }
}

pub fn invalid(config: &Config, key: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        file: config.source.clone(),
        key: key.to_string(),
        reason,
    }
}

/// Runs `init` of `plugin` with the config of every pool that uses `name`.
pub fn check_against<'a>(
    plugin: &Plugin,
    name: &str,
    pools: impl Iterator<Item = &'a PoolConfig>,
    limits: &Limits,
) -> Result<(), PluginError> {
    for pool in pools.filter(|p| p.policy == name) {
        plugin.check(&pool.policy_config, limits)?;
    }
    Ok(())
}

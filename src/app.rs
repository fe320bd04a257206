//! The running balancer's state: an immutable [`Snapshot`] (config, pools,
//! policies, routes) swapped atomically on every reload, and what outlives
//! snapshots (backend state, connection pools, rotation counters, plugins).

use crate::backend::{Backend, BackendList, BackendState};
use crate::config::{Config, ConfigError, PoolConfig};
use crate::plugin::registry::{Registry, Validator};
use crate::plugin::{Limits, Plugin, PluginError, Policy, PolicyCounters};
use crate::router::Router;
use crate::upstream::{IdleConns, PoolLimits, TcpConnector, Upstream};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

/// One pool as the request path sees it.
pub struct Pool {
    pub name: String,
    pub config: PoolConfig,
    pub backends: BackendList,
    pub policy: Policy,
    /// The way to the backends: connector and idle connections.
    pub upstream: Upstream,
}

/// Everything a request needs, immutable once built.
pub struct Snapshot {
    pub config: Config,
    pub pools: Vec<Pool>,
    pub router: Router,
}

/// State that outlives snapshots, keyed so a reload finds it again.
#[derive(Default)]
struct Kept {
    /// By (pool, address).
    backends: HashMap<(String, String), (Arc<BackendState>, Arc<IdleConns>)>,
    /// By pool.
    counters: HashMap<String, PolicyCounters>,
}

/// The balancer.
pub struct App {
    snapshot: ArcSwap<Snapshot>,
    registry: Arc<Registry>,
    kept: Mutex<Kept>,
    watchers: Mutex<Vec<notify::RecommendedWatcher>>,
    health: Mutex<HealthTasks>,
}

/// The running health-check tasks and the runtime they run on.
#[derive(Default)]
struct HealthTasks {
    runtime: Option<tokio::runtime::Handle>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HealthTasks {
    /// Replaces the running checks with those `snapshot` asks for.
    fn restart(&mut self, snapshot: &Snapshot) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let Some(runtime) = &self.runtime else { return };
        for pool in &snapshot.pools {
            if let Some(config) = &pool.config.health {
                self.tasks.extend(crate::health::spawn_checks(
                    runtime,
                    &pool.name,
                    &pool.backends,
                    config,
                    &pool.config.outlier,
                ));
            }
        }
    }
}

impl Drop for HealthTasks {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl App {
    /// Loads the built-in and drop-in plugins a config needs and builds the
    /// first snapshot. Does not start any watcher (see [`App::watch_plugins`]).
    pub fn new(config: Config) -> Result<Arc<App>, ConfigError> {
        let registry = Arc::new(Registry::with_builtins().map_err(|e| invalid(&config, "plugins", e.to_string()))?);
        if let Some(dir) = &config.plugins.dir {
            let limits = plugin_limits(&config);
            let pools: Vec<PoolConfig> = config.pools.values().cloned().collect();
            let validator: Validator =
                Arc::new(move |name: &str, plugin: &Plugin| check_against(plugin, name, pools.iter(), &limits));
            for (path, error) in registry.load_dir(dir, &validator) {
                let name = crate::plugin::registry::plugin_name(&path).unwrap_or_default();
                if config.plugin_policies().any(|p| p == name) || !dir.is_dir() {
                    let key = config
                        .pools
                        .iter()
                        .find(|(_, p)| p.policy == name)
                        .map_or("plugins.dir".to_string(), |(n, _)| format!("pools.{n}.policy"));
                    return Err(invalid(&config, &key, error.to_string()));
                }
                tracing::warn!(path = %path.display(), %error, "plugin refused");
            }
        }
        let app = Arc::new(App {
            snapshot: ArcSwap::from_pointee(Snapshot {
                config: config.clone(),
                pools: Vec::new(),
                router: Router::new(&[], |_| None),
            }),
            registry,
            kept: Mutex::new(Kept::default()),
            watchers: Mutex::new(Vec::new()),
            health: Mutex::new(HealthTasks::default()),
        });
        let snapshot = app.build(config)?;
        app.snapshot.store(Arc::new(snapshot));
        Ok(app)
    }

    /// The snapshot serving now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Replaces the running config. On error nothing changes.
    pub fn reload(&self, config: Config) -> Result<(), ConfigError> {
        let current = self.snapshot();
        for (key, old, new) in [
            (
                "server.listen",
                current.config.server.listen.to_string(),
                config.server.listen.to_string(),
            ),
            (
                "server.admin",
                format!("{:?}", current.config.server.admin),
                format!("{:?}", config.server.admin),
            ),
            (
                "plugins.dir",
                format!("{:?}", current.config.plugins.dir),
                format!("{:?}", config.plugins.dir),
            ),
            (
                "server.workers",
                current.config.server.workers.to_string(),
                config.server.workers.to_string(),
            ),
        ] {
            if old != new {
                tracing::warn!(key, old = %old, new = %new, "this setting takes effect at the next restart");
            }
        }
        let snapshot = Arc::new(self.build(config)?);
        self.snapshot.store(snapshot.clone());
        self.health.lock().unwrap_or_else(|p| p.into_inner()).restart(&snapshot);
        tracing::info!("config reloaded");
        Ok(())
    }

    /// Starts active health checks on `runtime`; reloads restart them there.
    pub fn start_health_checks(&self, runtime: tokio::runtime::Handle) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.runtime = Some(runtime);
        health.restart(&self.snapshot());
    }

    fn build(&self, config: Config) -> Result<Snapshot, ConfigError> {
        let limits = plugin_limits(&config);
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let mut pools = Vec::with_capacity(config.pools.len());
        for (name, pool) in &config.pools {
            let key = format!("pools.{name}.policy");
            let slot = self.registry.slot(&pool.policy).ok_or_else(|| {
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
            let (backends, idle): (Vec<Arc<Backend>>, Vec<Arc<IdleConns>>) = pool
                .backends
                .iter()
                .map(|b| {
                    let (state, idle) = kept
                        .backends
                        .entry((name.clone(), b.address.clone()))
                        .or_default()
                        .clone();
                    let backend = Arc::new(Backend {
                        address: b.address.clone(),
                        socket: b.socket,
                        weight: b.weight,
                        state,
                    });
                    (backend, idle)
                })
                .unzip();
            let counters = kept.counters.entry(name.clone()).or_default().clone();
            pools.push(Pool {
                name: name.clone(),
                config: pool.clone(),
                backends: backends.into(),
                policy: Policy::new(slot, &pool.policy_config, limits, counters),
                upstream: Upstream::new(
                    idle,
                    Arc::new(TcpConnector),
                    PoolLimits {
                        max_idle: pool.max_idle_per_backend,
                        idle_timeout: pool.upstream_idle_timeout,
                    },
                    pool.connect_timeout,
                ),
            });
        }
        // Forget state of backends no longer configured.
        kept.backends.retain(|(pool, address), _| {
            config
                .pools
                .get(pool)
                .is_some_and(|p| p.backends.iter().any(|b| &b.address == address))
        });
        kept.counters.retain(|pool, _| config.pools.contains_key(pool));
        let names: Vec<&String> = config.pools.keys().collect();
        let router = Router::new(&config.routes, |pool| names.iter().position(|n| *n == pool));
        Ok(Snapshot { config, pools, router })
    }

    /// Starts hot reload of the plugin directory, if the config has one.
    pub fn watch_plugins(self: &Arc<Self>) -> Result<(), notify::Error> {
        let snapshot = self.snapshot();
        let Some(dir) = &snapshot.config.plugins.dir else {
            return Ok(());
        };
        let app: Weak<App> = Arc::downgrade(self);
        let validator: Validator = Arc::new(move |name: &str, plugin: &Plugin| {
            let Some(app) = app.upgrade() else {
                return Ok(());
            };
            let snapshot = app.snapshot();
            let limits = plugin_limits(&snapshot.config);
            check_against(plugin, name, snapshot.config.pools.values(), &limits)
        });
        let watcher = self.registry.watch(dir, validator)?;
        self.watchers.lock().unwrap_or_else(|p| p.into_inner()).push(watcher);
        tracing::info!(dir = %dir.display(), "watching the plugin directory");
        Ok(())
    }

    /// Reloads the config whenever its file changes, until the app is dropped.
    pub fn watch_config(self: &Arc<Self>, path: &Path) -> Result<(), notify::Error> {
        use notify::Watcher;
        let file = path.canonicalize().map_err(notify::Error::io)?;
        let folder = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let watched = file.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Some(event) = event.ok().filter(crate::plugin::registry::is_change)
                && event.paths.iter().any(|p| p.file_name() == watched.file_name())
            {
                let _ = tx.send(());
            }
        })?;
        watcher.watch(&folder, notify::RecursiveMode::NonRecursive)?;
        let app = Arc::downgrade(self);
        let source = path.to_path_buf();
        std::thread::Builder::new()
            .name("fulcrum-config".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Let an editor finish writing, then take every event as one.
                    std::thread::sleep(crate::plugin::registry::SETTLE_TIME);
                    while rx.try_recv().is_ok() {}
                    let Some(app) = app.upgrade() else { return };
                    let result = Config::load(&source).and_then(|config| {
                        if config == app.snapshot().config {
                            return Ok(());
                        }
                        app.reload(config)
                    });
                    if let Err(e) = result {
                        tracing::error!(error = %e, "config reload refused; the running config stays");
                    }
                }
            })
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        self.watchers.lock().unwrap_or_else(|p| p.into_inner()).push(watcher);
        Ok(())
    }
}

fn plugin_limits(config: &Config) -> Limits {
    Limits {
        call_timeout: config.plugins.call_timeout,
        memory_limit: config.plugins.memory_limit,
    }
}

fn invalid(config: &Config, key: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        file: config.source.clone(),
        key: key.to_string(),
        reason,
    }
}

/// Runs `init` of `plugin` with the config of every pool that uses `name`.
fn check_against<'a>(
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

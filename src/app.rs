//! The running balancer: the serving [`Snapshot`] in an `ArcSwap`, replaced
//! whole by [`App::reload`]; the plugin registry and the state kept across
//! reloads that building a snapshot needs; the health checks and the file
//! watcher that follow the snapshot.

use crate::changes::{Added, Changes, PoolChanges};
use crate::config::{BackendConfig, Config, ConfigError};
use crate::health::Checks;
use crate::plugin::registry::{PluginDir, Registry, Validator};
use crate::plugin::{Plugin, PluginError};
use crate::snapshot::{self, Kept, Snapshot, check_against, invalid};
use crate::watch::{FileWatcher, Handler, Settled};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The balancer.
pub struct App {
    snapshot: ArcSwap<Snapshot>,
    registry: Arc<Registry>,
    kept: Mutex<Kept>,
    watcher: Mutex<Option<FileWatcher>>,
    checks: Mutex<Checks>,
    not_ready: std::sync::atomic::AtomicBool,
    /// The operator's runtime changes to pools.
    changes: Mutex<Changes>,
}

/// Why a runtime change was refused: the HTTP status it answers with, the
/// field at fault and the reason.
#[derive(Debug)]
pub struct ChangeError {
    pub status: u16,
    pub field: &'static str,
    pub reason: String,
}

impl ChangeError {
    fn new(status: u16, field: &'static str, reason: impl Into<String>) -> ChangeError {
        ChangeError {
            status,
            field,
            reason: reason.into(),
        }
    }
}

/// A plugin refused while `config` needs it, blamed on the key of the use
/// that refused it (or the first naming it).
fn plugin_refusal(config: &Config, name: &str, error: PluginError) -> ConfigError {
    match error {
        PluginError::InUse { key, source } => invalid(config, &key, source.to_string()),
        error => invalid(config, &key_naming(config, name), error.to_string()),
    }
}

/// The config key naming plugin `name` (a pool's policy, a filter's plugin).
fn key_naming(config: &Config, name: &str) -> String {
    config
        .key_naming_plugin(name)
        .unwrap_or_else(|| "plugins.dir".to_string())
}

/// Checks a plugin version against every use `config` makes of it.
fn validator_for(config: Config) -> Validator {
    Arc::new(move |name: &str, plugin: &Plugin| check_against(plugin, name, &config))
}

impl App {
    /// Loads the built-in and drop-in plugins a config needs and builds the
    /// first snapshot. Does not start the file watcher (see [`App::watch`]).
    pub fn new(config: Config) -> Result<Arc<App>, ConfigError> {
        // Runtime changes saved before a restart apply from the first snapshot on.
        let changes = match &config.admin.state_file {
            Some(path) => Changes::load(path).map_err(|reason| invalid(&config, "admin.state_file", reason))?,
            None => Changes::default(),
        };
        // Every plugin's shared store is made with this bound (read at start).
        crate::plugin::shared::set_entries_limit(config.plugins.shared_entries);
        if let Err(reason) = crate::plugin::cache::configure(config.plugins.cache_dir.as_deref()) {
            tracing::warn!("{reason}; plugins are compiled at every start");
        }
        let registry = Arc::new(Registry::with_builtins().map_err(|e| invalid(&config, "plugins", e.to_string()))?);
        if let Some(dir) = &config.plugins.dir {
            for (path, error) in registry.load_dir(dir, &validator_for(config.clone())) {
                let name = crate::plugin::registry::plugin_name(&path).unwrap_or_default();
                if config.plugin_policies().any(|p| p == name) || !dir.is_dir() {
                    return Err(plugin_refusal(&config, name, error));
                }
                tracing::warn!(path = %path.display(), %error, "plugin refused");
            }
        }
        let mut kept = Kept::default();
        if let Some(log) = &config.access_log {
            let started = crate::access_log::AccessLog::start(log).map_err(|e| {
                let path = log
                    .path
                    .as_ref()
                    .map_or("stdout".to_string(), |p| p.display().to_string());
                invalid(&config, "access_log.path", format!("cannot open {path}: {e}"))
            })?;
            kept.access_log = Some(started);
        }
        let app = Arc::new(App {
            snapshot: ArcSwap::from_pointee(Snapshot::empty(config.clone())),
            registry,
            kept: Mutex::new(kept),
            watcher: Mutex::new(None),
            checks: Mutex::new(Checks::default()),
            not_ready: std::sync::atomic::AtomicBool::new(false),
            changes: Mutex::new(changes),
        });
        let snapshot = app.build_with(config, &app.changes.lock().unwrap_or_else(|p| p.into_inner()).clone())?;
        app.snapshot.store(Arc::new(snapshot));
        crate::metrics::events().stamp();
        Ok(app)
    }

    /// Whether `GET /ready` says ready: true unless an operator failed it
    /// (to drain Fulcrum out of an outer load balancer before a stop).
    pub fn is_ready(&self) -> bool {
        !self.not_ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.not_ready.store(!ready, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(ready, "readiness set by the admin API");
    }

    /// Reads the config file again and applies it if it changed (the file
    /// watcher, `POST /reload` and SIGHUP all come here). Returns whether a
    /// new config was applied; on error the running config stays.
    pub fn reload_file(&self) -> Result<bool, ConfigError> {
        let source = self.snapshot().config.source.clone();
        let result = Config::load(&source).and_then(|config| {
            if config == self.snapshot().config {
                return Ok(false);
            }
            self.reload(config).map(|()| true)
        });
        let events = crate::metrics::events();
        match &result {
            Ok(true) => events.reloaded(),
            Ok(false) => {}
            Err(error) => {
                events.refused();
                tracing::error!(%error, "config reload refused; the running config stays");
            }
        }
        result
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
                "server.listen and server.listeners",
                format!("{:?}", current.config.server.listeners),
                format!("{:?}", config.server.listeners),
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
            (
                "plugins.shared_entries",
                current.config.plugins.shared_entries.to_string(),
                config.plugins.shared_entries.to_string(),
            ),
            (
                "access_log",
                format!("{:?}", current.config.access_log),
                format!("{:?}", config.access_log),
            ),
        ] {
            if old != new {
                tracing::warn!(key, old = %old, new = %new, "this setting takes effect at the next restart");
            }
        }
        // Before the lock: a large component compiles for seconds, and runtime
        // changes must not wait for it.
        self.load_named_plugins(&config, current.config.plugins.dir.as_deref())?;
        // Runtime changes survive unless the reload touches their pool.
        let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept_changes = changes.clone();
        kept_changes.pools.retain(|name, _| {
            let same = current.config.pools.get(name) == config.pools.get(name);
            if !same {
                tracing::warn!(pool = %name, "the reloaded config changes this pool: its runtime changes are dropped");
            }
            same
        });
        let snapshot = Arc::new(self.build_with(config, &kept_changes)?);
        if kept_changes != *changes {
            *changes = kept_changes;
            self.save_changes(&changes, &snapshot);
        }
        drop(changes);
        self.snapshot.store(snapshot.clone());
        self.checks.lock().unwrap_or_else(|p| p.into_inner()).restart(&snapshot);
        tracing::info!("config reloaded");
        Ok(())
    }

    /// Loads the plugins `config` names from the plugin directory `dir` (the
    /// running one: a new `plugins.dir` waits for a restart) when their file
    /// is new or changed: a file dropped in together with the config that
    /// needs it works whichever of the two the watcher sees first (an
    /// unchanged file costs a read and a hash). A plugin whose file was
    /// removed is refused, as a restart would refuse it: a reload accepts
    /// only what a restart would.
    fn load_named_plugins(&self, config: &Config, dir: Option<&Path>) -> Result<(), ConfigError> {
        let Some(dir) = dir else {
            return Ok(());
        };
        if !dir.is_dir() {
            let reason = format!("{} is not a directory (a restart would refuse it)", dir.display());
            return Err(invalid(config, "plugins.dir", reason));
        }
        let validator = validator_for(config.clone());
        for name in config.plugin_policies() {
            let path = dir.join(format!("{name}.wasm"));
            if !path.is_file() {
                let reason = format!(
                    "no {name}.wasm in {} (a removed plugin keeps serving its pools until they change, but a restart would refuse this config)",
                    dir.display()
                );
                return Err(invalid(config, &key_naming(config, name), reason));
            }
            let loaded = self.registry.load_file(&path, &validator);
            crate::plugin::registry::count_load(&loaded);
            loaded.map_err(|error| plugin_refusal(config, name, error))?;
        }
        Ok(())
    }

    /// Applies one runtime change to `pool`: `change` edits the pool's
    /// changes, given the pool's backends as they run now; the snapshot is
    /// rebuilt, checks follow, and the state file is written. `prepare` sees
    /// the new snapshot before it serves.
    fn change(
        &self,
        pool: &str,
        change: impl FnOnce(&[BackendConfig], &mut PoolChanges) -> Result<(), ChangeError>,
        prepare: impl FnOnce(&Snapshot),
    ) -> Result<(), ChangeError> {
        let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot();
        let Some(configured) = current.config.pools.get(pool) else {
            return Err(ChangeError::new(404, "pool", format!("no pool `{pool}`")));
        };
        let running = changes.apply(pool, configured);
        let mut next = changes.clone();
        change(&running.backends, next.of(pool))?;
        next.tidy();
        let snapshot = Arc::new(
            self.build_with(current.config.clone(), &next)
                .map_err(|e| ChangeError::new(500, "pool", e.to_string()))?,
        );
        prepare(&snapshot);
        *changes = next;
        self.save_changes(&changes, &snapshot);
        drop(changes);
        self.snapshot.store(snapshot.clone());
        self.checks.lock().unwrap_or_else(|p| p.into_inner()).restart(&snapshot);
        Ok(())
    }

    fn save_changes(&self, changes: &Changes, snapshot: &Snapshot) {
        if let Some(path) = &snapshot.config.admin.state_file
            && let Err(error) = changes.save(path)
        {
            tracing::error!(path = %path.display(), %error, "cannot write the state file; runtime changes will not survive a restart");
        }
    }

    /// Adds a backend to `pool` (`POST /pools/{pool}/backends`). It takes
    /// traffic at once, or after its first good check when the pool has checks.
    pub fn add_backend(&self, pool: &str, address: &str, weight: u32) -> Result<(), ChangeError> {
        check_weight(weight)?;
        let socket = crate::config::resolve(address).map_err(|reason| ChangeError::new(400, "address", reason))?;
        self.change(
            pool,
            |running, changes| {
                if running.iter().any(|b| b.address == address) {
                    return Err(ChangeError::new(
                        409,
                        "address",
                        format!("{address} is already in pool `{pool}`"),
                    ));
                }
                changes.removed.remove(address);
                changes.added.retain(|a| a.address != address);
                changes.drained.remove(address);
                changes.added.push(Added {
                    address: address.to_string(),
                    socket,
                    weight,
                });
                changes.weights.insert(address.to_string(), weight);
                Ok(())
            },
            |snapshot| {
                let Some(pool) = snapshot.pools.iter().find(|p| p.name == pool) else {
                    return;
                };
                if pool.config.health.is_some()
                    && let Some(backend) = pool.backends.iter().find(|b| b.address == address)
                    && backend.state.check_successes.load(std::sync::atomic::Ordering::Relaxed) == 0
                {
                    // Not before its first good check.
                    backend.state.set_up(false);
                }
            },
        )?;
        tracing::info!(%pool, backend = %address, weight, "backend added by the admin API");
        Ok(())
    }

    /// Drains (`drain = true`) or enables a backend of `pool`. A drained
    /// backend takes no new request; its in-flight ones finish, and its idle
    /// connections are closed.
    pub fn set_drained(&self, pool: &str, address: &str, drain: bool) -> Result<(), ChangeError> {
        self.change(
            pool,
            |running, changes| {
                known(running, pool, address)?;
                if drain {
                    changes.drained.insert(address.to_string());
                } else {
                    changes.drained.remove(address);
                }
                Ok(())
            },
            |_| {},
        )?;
        if drain {
            self.close_idle(pool, address);
        }
        tracing::info!(%pool, backend = %address, drained = drain, "backend {} by the admin API", if drain { "drained" } else { "enabled" });
        Ok(())
    }

    /// Sets the weight of a backend of `pool`.
    pub fn set_weight(&self, pool: &str, address: &str, weight: u32) -> Result<(), ChangeError> {
        check_weight(weight)?;
        self.change(
            pool,
            |running, changes| {
                known(running, pool, address)?;
                changes.weights.insert(address.to_string(), weight);
                Ok(())
            },
            |_| {},
        )?;
        tracing::info!(%pool, backend = %address, weight, "backend weight set by the admin API");
        Ok(())
    }

    /// Takes a backend out of `pool` once drained (no request of it still in
    /// flight, or `wait` over).
    pub async fn remove_backend(&self, pool: &str, address: &str, wait: Duration) -> Result<(), ChangeError> {
        self.set_drained(pool, address, true)?;
        let deadline = tokio::time::Instant::now() + wait;
        while self.in_flight(pool, address) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.change(
            pool,
            |running, changes| {
                known(running, pool, address)?;
                let added = changes.added.iter().any(|a| a.address == address);
                changes.added.retain(|a| a.address != address);
                if !added {
                    changes.removed.insert(address.to_string());
                }
                changes.drained.remove(address);
                changes.weights.remove(address);
                Ok(())
            },
            |_| {},
        )?;
        tracing::info!(%pool, backend = %address, "backend removed by the admin API");
        Ok(())
    }

    /// Requests in flight at `address` of `pool` now.
    pub fn in_flight(&self, pool: &str, address: &str) -> u32 {
        let snapshot = self.snapshot();
        snapshot
            .backend(pool, address)
            .map_or(0, |(pool, index)| pool.backends[index].state.in_flight())
    }

    /// Closes the idle connections held to `address` of `pool`.
    pub fn close_idle(&self, pool: &str, address: &str) {
        let snapshot = self.snapshot();
        if let Some((pool, index)) = snapshot.backend(pool, address) {
            pool.upstream.close_idle(index);
        }
    }

    /// Starts active health checks on `runtime`; reloads restart them there.
    pub fn start_health_checks(&self, runtime: tokio::runtime::Handle) {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.runtime = Some(runtime);
        checks.restart(&self.snapshot());
    }

    fn build_with(&self, config: Config, changes: &Changes) -> Result<Snapshot, ConfigError> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        snapshot::build(config, changes, &self.registry, &mut kept)
    }

    /// Reloads the config whenever the file at `path` changes, and plugins as
    /// files of the plugin directory (if the config has one) appear and change,
    /// until the app is dropped.
    pub fn watch(self: &Arc<Self>, path: &Path) -> Result<(), notify::Error> {
        let mut watcher = FileWatcher::start()?;
        let file = path.canonicalize().map_err(notify::Error::io)?;
        let folder = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let config_file = ConfigFile {
            app: Arc::downgrade(self),
            file,
            given: path.to_path_buf(),
            stamp: crate::watch::FileStamp::of(path),
        };
        watcher.watch(&folder, Box::new(config_file))?;
        if let Some(dir) = &self.snapshot().config.plugins.dir {
            let app: Weak<App> = Arc::downgrade(self);
            let validator: Validator = Arc::new(move |name: &str, plugin: &Plugin| {
                let Some(app) = app.upgrade() else {
                    return Ok(());
                };
                check_against(plugin, name, &app.snapshot().config)
            });
            let canonical = dir.canonicalize().map_err(notify::Error::io)?;
            let handler = PluginDir::new(self.registry.clone(), &canonical, dir, validator);
            watcher.watch(&canonical, Box::new(handler))?;
            tracing::info!(dir = %canonical.display(), "watching the plugin directory");
        }
        *self.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        Ok(())
    }

    /// Also watches a TLS listener's certificate, key and CA files (after
    /// [`App::watch`]): a change is served from the next handshake on.
    pub fn watch_tls(&self, terminator: &Arc<crate::tls::Terminator>) -> Result<(), notify::Error> {
        let mut watcher = self.watcher.lock().unwrap_or_else(|p| p.into_inner());
        let Some(watcher) = watcher.as_mut() else {
            return Err(notify::Error::generic("the file watcher is not started"));
        };
        let files = crate::tls::TlsFiles::new(terminator);
        for folder in files.folders() {
            // The handler is registered once; each folder is watched.
            watcher.watch_folder(&folder)?;
        }
        watcher.add_handler(Box::new(files))
    }
}

/// Weights as the config file allows them.
fn check_weight(weight: u32) -> Result<(), ChangeError> {
    if weight == 0 {
        return Err(ChangeError::new(400, "weight", "must be at least 1"));
    }
    Ok(())
}

/// `address` must be a running backend of `pool`.
fn known(running: &[BackendConfig], pool: &str, address: &str) -> Result<(), ChangeError> {
    if running.iter().any(|b| b.address == address) {
        Ok(())
    } else {
        Err(ChangeError::new(
            404,
            "address",
            format!("no backend {address} in pool `{pool}`"),
        ))
    }
}

/// The config file's handler in the file watcher: reloads it when it changed.
struct ConfigFile {
    app: Weak<App>,
    /// The file, canonical, as the watcher reports it.
    file: PathBuf,
    /// The file as the config names it (a symlink, perhaps), and its stamp
    /// at the last look: a poll sees a swapped symlink's new target.
    given: PathBuf,
    stamp: Option<crate::watch::FileStamp>,
}

impl Handler for ConfigFile {
    fn claims(&self, path: &Path) -> bool {
        path == self.file
    }

    fn poll(&mut self) -> Vec<PathBuf> {
        let stamp = crate::watch::FileStamp::of(&self.given);
        if stamp == self.stamp {
            return Vec::new();
        }
        self.stamp = stamp;
        vec![self.file.clone()]
    }

    fn settled(&mut self, _path: &Path, _quiet: Duration) -> Settled {
        self.stamp = crate::watch::FileStamp::of(&self.given);
        if let Some(app) = self.app.upgrade() {
            // Refusals are logged and counted there.
            let _ = app.reload_file();
        }
        Settled::Done
    }
}

//! The running balancer: the serving [`Snapshot`] in an `ArcSwap`, replaced
//! whole by [`App::reload`]; the plugin registry and the state kept across
//! reloads that building a snapshot needs; the health checks and the file
//! watcher that follow the snapshot.

use crate::config::{Config, ConfigError, PoolConfig};
use crate::health::Checks;
use crate::plugin::Plugin;
use crate::plugin::registry::{PluginDir, Registry, Validator};
use crate::snapshot::{self, Kept, Snapshot, check_against, invalid, plugin_limits};
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
}

impl App {
    /// Loads the built-in and drop-in plugins a config needs and builds the
    /// first snapshot. Does not start the file watcher (see [`App::watch`]).
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
            snapshot: ArcSwap::from_pointee(Snapshot::empty(config.clone())),
            registry,
            kept: Mutex::new(Kept::default()),
            watcher: Mutex::new(None),
            checks: Mutex::new(Checks::default()),
            not_ready: std::sync::atomic::AtomicBool::new(false),
        });
        let snapshot = app.build(config)?;
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
        self.checks.lock().unwrap_or_else(|p| p.into_inner()).restart(&snapshot);
        tracing::info!("config reloaded");
        Ok(())
    }

    /// Starts active health checks on `runtime`; reloads restart them there.
    pub fn start_health_checks(&self, runtime: tokio::runtime::Handle) {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.runtime = Some(runtime);
        checks.restart(&self.snapshot());
    }

    fn build(&self, config: Config) -> Result<Snapshot, ConfigError> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        snapshot::build(config, &self.registry, &mut kept)
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
        };
        watcher.watch(&folder, Box::new(config_file))?;
        if let Some(dir) = &self.snapshot().config.plugins.dir {
            let app: Weak<App> = Arc::downgrade(self);
            let validator: Validator = Arc::new(move |name: &str, plugin: &Plugin| {
                let Some(app) = app.upgrade() else {
                    return Ok(());
                };
                let snapshot = app.snapshot();
                let limits = plugin_limits(&snapshot.config);
                check_against(plugin, name, snapshot.config.pools.values(), &limits)
            });
            let dir = dir.canonicalize().map_err(notify::Error::io)?;
            watcher.watch(&dir, Box::new(PluginDir::new(self.registry.clone(), &dir, validator)))?;
            tracing::info!(dir = %dir.display(), "watching the plugin directory");
        }
        *self.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        Ok(())
    }
}

/// The config file's handler in the file watcher: reloads it when it changed.
struct ConfigFile {
    app: Weak<App>,
    /// The file, canonical, as the watcher reports it.
    file: PathBuf,
}

impl Handler for ConfigFile {
    fn claims(&self, path: &Path) -> bool {
        path == self.file
    }

    fn settled(&mut self, _path: &Path, _quiet: Duration) -> Settled {
        if let Some(app) = self.app.upgrade() {
            // Refusals are logged and counted there.
            let _ = app.reload_file();
        }
        Settled::Done
    }
}

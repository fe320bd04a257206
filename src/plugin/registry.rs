//! Where plugins come from: the built-ins embedded in the binary and the drop-in
//! plugin directory, which is watched and hot-reloaded.
//!
//! Each name has a [`PluginSlot`]. A new or changed `NAME.wasm` is compiled on
//! the watcher's own thread, linked, checked against every pool that uses NAME
//! (`init` with that pool's config), and only then swapped into the slot. A file
//! that fails any step is refused with its reason and the serving version stays.
//! Events are debounced so a file still being copied is not read half-written.

use super::{Plugin, PluginError, PluginSlot, PluginSource};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The sample plugins, built from `plugins/` by build.rs and embedded.
pub const BUILTINS: [(&str, &[u8]); 2] = [
    (
        "round-robin",
        include_bytes!(concat!(env!("FULCRUM_PLUGIN_WASM_DIR"), "/round_robin.wasm")),
    ),
    (
        "least-conn",
        include_bytes!(concat!(env!("FULCRUM_PLUGIN_WASM_DIR"), "/least_conn.wasm")),
    ),
];

/// How long a plugin file must stay unchanged before it is loaded.
pub const SETTLE_TIME: Duration = Duration::from_millis(200);

/// Checks a candidate version of the plugin named by the first argument
/// against everything that would use it.
pub type Validator = Arc<dyn Fn(&str, &Plugin) -> Result<(), PluginError> + Send + Sync>;

/// Every plugin known by name.
#[derive(Default)]
pub struct Registry {
    slots: RwLock<HashMap<String, Arc<PluginSlot>>>,
}

impl Registry {
    /// A registry holding the built-in policies.
    pub fn with_builtins() -> Result<Registry, PluginError> {
        let registry = Registry::default();
        for (name, bytes) in BUILTINS {
            let plugin = Plugin::load(name, bytes, PluginSource::Builtin)?;
            registry.write().insert(name.to_string(), PluginSlot::new(plugin));
        }
        Ok(registry)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<PluginSlot>>> {
        self.slots.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn slot(&self, name: &str) -> Option<Arc<PluginSlot>> {
        let slots = self.slots.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        slots.get(name).cloned()
    }

    /// Loads every `NAME.wasm` in `dir`. Returns the files refused, with why.
    pub fn load_dir(&self, dir: &Path, validate: &Validator) -> Vec<(PathBuf, PluginError)> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                let error = PluginError::Directory {
                    dir: dir.display().to_string(),
                    reason: e.to_string(),
                };
                return vec![(dir.to_path_buf(), error)];
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| plugin_name(p).is_some())
            .collect();
        paths.sort();
        paths
            .into_iter()
            .filter_map(|path| match self.load_file(&path, validate) {
                Ok(_) => None,
                Err(e) => Some((path, e)),
            })
            .collect()
    }

    /// Loads, checks and puts in service the plugin file at `path`. Returns
    /// false when it was already serving (same digest).
    pub fn load_file(&self, path: &Path, validate: &Validator) -> Result<bool, PluginError> {
        let Some(name) = plugin_name(path) else {
            return Err(PluginError::Compile {
                name: path.display().to_string(),
                reason: "not a NAME.wasm file".into(),
            });
        };
        if BUILTINS.iter().any(|(builtin, _)| *builtin == name) {
            return Err(PluginError::Compile {
                name: name.into(),
                reason: "this name belongs to a built-in policy; rename the file".into(),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| PluginError::Compile {
            name: name.into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let existing = self.slot(name);
        if existing
            .as_ref()
            .is_some_and(|slot| slot.current().digest == super::digest(&bytes))
        {
            return Ok(false);
        }
        let plugin = Plugin::load(name, &bytes, PluginSource::File(path.to_path_buf()))?;
        validate(name, &plugin)?;
        match existing {
            Some(slot) => slot.replace(plugin.clone()),
            None => {
                self.write().insert(name.to_string(), PluginSlot::new(plugin.clone()));
            }
        }
        tracing::info!(plugin = name, digest = %&plugin.digest[..12], path = %path.display(), "plugin loaded");
        Ok(true)
    }

    /// Watches `dir` and reloads plugins as files appear and change, on a
    /// thread of its own, until the returned watcher is dropped.
    pub fn watch(
        self: &Arc<Self>,
        dir: &Path,
        validate: Validator,
    ) -> Result<notify::RecommendedWatcher, notify::Error> {
        use notify::Watcher;
        let (tx, rx) = channel::<PathBuf>();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Some(event) = event.ok().filter(is_change) {
                for path in event.paths {
                    let _ = tx.send(path);
                }
            }
        })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        let registry = Arc::clone(self);
        std::thread::Builder::new()
            .name("fulcrum-plugins".into())
            .spawn(move || {
                let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
                loop {
                    match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(path) => {
                            if plugin_name(&path).is_some() {
                                pending.insert(path, Instant::now());
                            }
                            continue;
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    let settled: Vec<PathBuf> = pending
                        .iter()
                        .filter(|(_, at)| at.elapsed() >= SETTLE_TIME)
                        .map(|(p, _)| p.clone())
                        .collect();
                    for path in settled {
                        pending.remove(&path);
                        registry.reload(&path, &validate);
                    }
                }
            })
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(watcher)
    }

    fn reload(&self, path: &Path, validate: &Validator) {
        if !path.exists() {
            if let Some(name) = plugin_name(path).filter(|n| self.slot(n).is_some()) {
                tracing::warn!(plugin = name, path = %path.display(), "plugin file removed; the last good version keeps serving");
            }
            return;
        }
        if let Err(e) = self.load_file(path, validate) {
            tracing::error!(path = %path.display(), error = %e, "plugin refused; the previous version (if any) keeps serving");
        }
    }
}

/// Whether a file event is a change of content or name. Reading a file raises
/// access events of its own, which must not trigger another reload.
pub fn is_change(event: &notify::Event) -> bool {
    use notify::EventKind;
    matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
    )
}

/// `NAME` of a `NAME.wasm` path; hidden files (editors', copies in progress) are not plugins.
pub fn plugin_name(path: &Path) -> Option<&str> {
    if path.extension()? != "wasm" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    let valid = !stem.is_empty()
        && !stem.starts_with('.')
        && stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    valid.then_some(stem)
}

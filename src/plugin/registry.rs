//! Where plugins come from: the built-ins embedded in the binary and the drop-in
//! plugin directory, which is watched and hot-reloaded.
//!
//! Each name has a [`PluginSlot`]. A new or changed `NAME.wasm` is compiled on
//! the file watcher's thread ([`PluginDir`]), linked, checked against every pool that uses NAME
//! (`init` with that pool's config), and only then swapped into the slot. A file
//! that fails any step is refused with its reason and the serving version stays.
//! Events are debounced ([`crate::watch`]) so a file still being copied is not read half-written;
//! a file that is not a whole component yet and was written moments ago is
//! awaited (by its size and modification time) rather than refused, so a slow
//! copy loads once, complete, with no false alarm.

use super::{Plugin, PluginError, PluginSlot, PluginSource};
use crate::watch::{FileStamp, Handler, Settled};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The built-in policies by name: the sample plugins, built from `plugins/`
/// by build.rs and embedded. The one list of them.
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

/// Whether `name` is a built-in policy (not a plugin-directory name).
pub fn is_builtin(name: &str) -> bool {
    BUILTINS.iter().any(|(builtin, _)| *builtin == name)
}

/// How long a file that is not a whole component may stay unchanged before it
/// is refused as broken rather than awaited as a copy in progress (a copy over
/// a network share pauses between writes).
pub const COPY_GRACE: Duration = Duration::from_secs(2);

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

    /// Every plugin's slot, by name.
    pub fn slots(&self) -> Vec<Arc<PluginSlot>> {
        let slots = self.slots.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut all: Vec<Arc<PluginSlot>> = slots.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
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
            .filter(|p| {
                let named = plugin_name(p).is_some();
                if !named && p.extension().is_some_and(|e| e == "wasm") {
                    tracing::warn!(path = %p.display(), "not loaded: a plugin file is NAME.wasm with NAME of letters, digits, `-` and `_`");
                }
                named
            })
            .collect();
        paths.sort();
        paths
            .into_iter()
            .filter_map(|path| match self.load_file(&path, validate) {
                Ok(new) => {
                    count_loaded(new);
                    None
                }
                Err(e) => {
                    count_refused();
                    Some((path, e))
                }
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
        if is_builtin(name) {
            return Err(PluginError::Unfit {
                name: name.into(),
                reason: "the name belongs to a built-in policy; rename the file".into(),
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
                // Looked up again under the lock: the watcher and a reload may
                // load the same new file at once, and there is one slot a name.
                let mut slots = self.write();
                match slots.get(name) {
                    Some(slot) => slot.replace(plugin.clone()),
                    None => {
                        slots.insert(name.to_string(), PluginSlot::new(plugin.clone()));
                    }
                }
            }
        }
        tracing::info!(plugin = name, digest = %&plugin.digest[..12], path = %path.display(), "plugin loaded");
        Ok(true)
    }
}

/// Loads the plugin directory's files as they settle: the plugin directory's
/// handler in [`crate::watch::FileWatcher`].
pub struct PluginDir {
    registry: Arc<Registry>,
    /// The directory, canonical: as file events name it.
    dir: PathBuf,
    /// The directory as configured (a symlink, perhaps): what a poll lists,
    /// so that a swapped symlink's new target is seen.
    given: PathBuf,
    validate: Validator,
    /// Files that did not compile, with their stamp then and why: awaited
    /// while they may be a copy in progress.
    incomplete: HashMap<PathBuf, (Option<FileStamp>, PluginError)>,
    /// Each plugin file's stamp when last handled or polled, by its path in
    /// `given`: what a poll compares against.
    seen: HashMap<PathBuf, FileStamp>,
}

/// The plugin files in `dir` with their stamps.
fn plugin_files(dir: &Path) -> HashMap<PathBuf, FileStamp> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashMap::new();
    };
    entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| plugin_name(path).is_some())
        .filter_map(|path| FileStamp::of(&path).map(|stamp| (path, stamp)))
        .collect()
}

impl PluginDir {
    /// Watches `dir` (canonical) as configured: `given`.
    pub fn new(registry: Arc<Registry>, dir: &Path, given: &Path, validate: Validator) -> PluginDir {
        PluginDir {
            registry,
            dir: dir.to_path_buf(),
            given: given.to_path_buf(),
            validate,
            incomplete: HashMap::new(),
            seen: plugin_files(given),
        }
    }
}

impl Handler for PluginDir {
    fn claims(&self, path: &Path) -> bool {
        plugin_name(path).is_some()
            && (path.parent() == Some(self.dir.as_path()) || path.parent() == Some(self.given.as_path()))
    }

    /// The files added, changed or removed since the last look, found by
    /// listing the directory: what the file events miss when the directory
    /// itself was replaced (a deploy that swaps it, a mount).
    fn poll(&mut self) -> Vec<PathBuf> {
        let now = plugin_files(&self.given);
        let mut changed: Vec<PathBuf> = now
            .iter()
            .filter(|(path, stamp)| self.seen.get(*path) != Some(stamp))
            .map(|(path, _)| path.clone())
            .collect();
        changed.extend(self.seen.keys().filter(|path| !now.contains_key(*path)).cloned());
        self.seen = now;
        changed
    }

    fn settled(&mut self, path: &Path, quiet: Duration) -> Settled {
        let stamp = FileStamp::of(path);
        let key = self.given.join(path.file_name().unwrap_or_default());
        match stamp {
            Some(stamp) => self.seen.insert(key, stamp),
            None => self.seen.remove(&key),
        };
        if let Some((failed_at, error)) = self.incomplete.get(path)
            && *failed_at == stamp
        {
            // Unchanged since it last failed to parse: a copy paused, or a broken file.
            if quiet < COPY_GRACE {
                return Settled::Later;
            }
            tracing::error!(path = %path.display(), %error, "plugin refused; the previous version (if any) keeps serving");
            self.incomplete.remove(path);
            count_refused();
            return Settled::Done;
        }
        self.incomplete.remove(path);
        if stamp.is_none() {
            if let Some(name) = plugin_name(path).filter(|n| self.registry.slot(n).is_some()) {
                tracing::warn!(plugin = name, path = %path.display(), "plugin file removed; the last good version keeps serving");
            }
            return Settled::Done;
        }
        match self.registry.load_file(path, &self.validate) {
            Ok(new) => {
                count_loaded(new);
                Settled::Done
            }
            // Not a whole component yet, and written to moments ago: most likely
            // a copy still in progress. Wait for it to finish, or to stay this way.
            Err(error @ PluginError::Compile { .. }) if quiet < COPY_GRACE => {
                tracing::debug!(path = %path.display(), %error, "plugin file not complete yet; waiting for it to stop changing");
                self.incomplete.insert(path.to_path_buf(), (stamp, error));
                Settled::Later
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "plugin refused; the previous version (if any) keeps serving");
                count_refused();
                Settled::Done
            }
        }
    }
}

/// Counts a plugin file's load in `fulcrum_plugin_reloads_total`: a new
/// version in service, or a refusal.
pub fn count_load<E>(result: &Result<bool, E>) {
    match result {
        Ok(new) => count_loaded(*new),
        Err(_) => count_refused(),
    }
}

/// Counts a plugin file that went into service (`new`: not the version
/// already serving) in `fulcrum_plugin_reloads_total{result="loaded"}`.
fn count_loaded(new: bool) {
    if new {
        crate::metrics::events()
            .plugin_reloads_ok
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counts a plugin file refused for good in `{result="refused"}`.
fn count_refused() {
    crate::metrics::events()
        .plugin_reloads_refused
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

//! Where plugins come from: the built-ins embedded in the binary and the drop-in
//! plugin directory, which is watched and hot-reloaded.
//!
//! Each name has a [`PluginSlot`]. A new or changed `NAME.wasm` is compiled on
//! the watcher's own thread, linked, checked against every pool that uses NAME
//! (`init` with that pool's config), and only then swapped into the slot. A file
//! that fails any step is refused with its reason and the serving version stays.
//! Events are debounced so a file still being copied is not read half-written;
//! a file that is not a whole component yet and was written moments ago is
//! awaited (by its size and modification time) rather than refused, so a slow
//! copy loads once, complete, with no false alarm.

use super::{Plugin, PluginError, PluginSlot, PluginSource};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

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

/// How long a plugin file must stay unchanged before it is loaded.
pub const SETTLE_TIME: Duration = Duration::from_millis(200);
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
        if is_builtin(name) {
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
                let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
                loop {
                    match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(path) => {
                            if plugin_name(&path).is_some() {
                                let entry = pending.entry(path).or_insert_with(Pending::new);
                                entry.changed = Instant::now();
                            }
                            continue;
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    pending.retain(|path, entry| !registry.settle(path, entry, &validate));
                }
            })
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(watcher)
    }

    /// Loads a changed plugin file once it has settled. Returns whether it is
    /// done with (loaded, refused or removed), or must be looked at again.
    fn settle(&self, path: &Path, entry: &mut Pending, validate: &Validator) -> bool {
        if entry.changed.elapsed() < SETTLE_TIME {
            return false;
        }
        let stamp = FileStamp::of(path);
        if let Some((failed_at, error)) = &entry.incomplete
            && *failed_at == stamp
        {
            // Unchanged since it last failed to parse: a copy paused, or a broken file.
            if entry.changed.elapsed() < COPY_GRACE {
                return false;
            }
            tracing::error!(path = %path.display(), %error, "plugin refused; the previous version (if any) keeps serving");
            return true;
        }
        if stamp.is_none() {
            if let Some(name) = plugin_name(path).filter(|n| self.slot(n).is_some()) {
                tracing::warn!(plugin = name, path = %path.display(), "plugin file removed; the last good version keeps serving");
            }
            return true;
        }
        match self.load_file(path, validate) {
            Ok(_) => true,
            // Not a whole component yet, and written to moments ago: most likely
            // a copy still in progress. Wait for it to finish, or to stay this way.
            Err(error @ PluginError::Compile { .. }) if entry.changed.elapsed() < COPY_GRACE => {
                tracing::debug!(path = %path.display(), %error, "plugin file not complete yet; waiting for it to stop changing");
                entry.incomplete = Some((stamp, error));
                false
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "plugin refused; the previous version (if any) keeps serving");
                true
            }
        }
    }
}

/// A plugin file that changed and is not dealt with yet.
struct Pending {
    /// The last change event.
    changed: Instant,
    /// The file's stamp when it last failed to compile, and why.
    incomplete: Option<(Option<FileStamp>, PluginError)>,
}

impl Pending {
    fn new() -> Pending {
        Pending {
            changed: Instant::now(),
            incomplete: None,
        }
    }
}

/// A file's size and modification time: what changes while it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// None when the file is gone.
    fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
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

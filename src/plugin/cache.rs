//! The on-disk compile cache: a plugin's machine code, kept so that a restart
//! (or a second pool using the same file) loads it in milliseconds instead of
//! compiling it again (seconds for a large Python or JavaScript component).
//!
//! An entry is named by the SHA-256 of the component's bytes and the engine's
//! compatibility hash (wasmtime version, target, settings), and holds a magic
//! line, the SHA-256 of its payload and the payload (`Component::serialize`).
//! `Component::deserialize` runs machine code from the file unchecked, so an
//! entry is used only from a directory Fulcrum's user owns and nobody else
//! may write (created 0700; one with looser rights is not used), and only
//! when its payload's digest matches; anything else is compiled again and
//! the entry rewritten. Entries are written to a temporary file and renamed
//! in, so a reader never sees half of one.

use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use wasmtime::Engine;
use wasmtime::component::Component;

/// What an entry starts with.
const MAGIC: &[u8; 16] = b"fulcrum-cwasm-1\n";

/// The cache in use; `None`: every plugin is compiled.
static CACHE: ArcSwapOption<PathBuf> = ArcSwapOption::const_empty();

/// Entries used, plugins compiled (and stored), entries found corrupt.
pub static HITS: AtomicU64 = AtomicU64::new(0);
pub static MISSES: AtomicU64 = AtomicU64::new(0);
pub static CORRUPT: AtomicU64 = AtomicU64::new(0);

/// Uses `dir` as the compile cache (created 0700 if missing), or none.
/// A directory another user owns, or that others may write, is not used:
/// the reason is returned, and plugins are compiled as without a cache.
pub fn configure(dir: Option<&Path>) -> Result<(), String> {
    let Some(dir) = dir else {
        CACHE.store(None);
        return Ok(());
    };
    match prepare(dir) {
        Ok(()) => {
            CACHE.store(Some(Arc::new(dir.to_path_buf())));
            Ok(())
        }
        Err(reason) => {
            CACHE.store(None);
            Err(format!("compile cache {} not used: {reason}", dir.display()))
        }
    }
}

/// Creates `dir` (0700) if missing and checks that only this user can write it.
fn prepare(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create it: {e}"))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!("owned by uid {}, not this process's {me}", meta.uid()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "others may use it (mode {mode:o}): chmod 700 it, or name another directory"
        ));
    }
    Ok(())
}

/// The component for `bytes`: from the cache when a sound entry is there,
/// else compiled (and stored). `name` is for the log.
pub fn compile(engine: &Engine, name: &str, bytes: &[u8]) -> wasmtime::Result<Component> {
    let Some(dir) = CACHE.load_full() else {
        return Component::new(engine, bytes);
    };
    let path = dir.join(entry_name(engine, bytes));
    if let Ok(entry) = std::fs::read(&path) {
        match payload_of(&entry) {
            Some(payload) => {
                // SAFETY: the payload was written by `store` below (a
                // directory only this user may write, checked in `prepare`)
                // and its SHA-256 matches the one stored with it, so it is
                // the bytes `Component::serialize` gave for this engine's
                // compatibility hash, which names the entry. wasmtime checks
                // its own header and the engine's settings again.
                match unsafe { Component::deserialize(engine, payload) } {
                    Ok(component) => {
                        HITS.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(plugin = %name, entry = %path.display(), "machine code taken from the compile cache");
                        return Ok(component);
                    }
                    Err(error) => {
                        CORRUPT.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(plugin = %name, entry = %path.display(), error = %super::engine::one_line(&error), "compile cache entry refused by the engine; compiling again");
                    }
                }
            }
            None => {
                CORRUPT.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(plugin = %name, entry = %path.display(), "compile cache entry is corrupt; compiling again");
            }
        }
    }
    let started = std::time::Instant::now();
    let component = Component::new(engine, bytes)?;
    MISSES.fetch_add(1, Ordering::Relaxed);
    tracing::info!(plugin = %name, took = ?started.elapsed(), "plugin compiled");
    match component.serialize() {
        Ok(serialized) => {
            if let Err(error) = store(&path, &serialized) {
                tracing::warn!(plugin = %name, entry = %path.display(), %error, "compile cache entry not written");
            }
        }
        Err(error) => {
            tracing::warn!(plugin = %name, error = %super::engine::one_line(&error), "compiled plugin cannot be serialized for the cache")
        }
    }
    Ok(component)
}

/// `{sha256 of the component}-{engine compatibility hash}.cwasm`.
fn entry_name(engine: &Engine, bytes: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut compat = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    // DefaultHasher's keys are fixed, so this is the same in every process.
    format!("{}-{:016x}.cwasm", hex(&Sha256::digest(bytes)), compat.finish())
}

/// The payload of a sound entry.
fn payload_of(entry: &[u8]) -> Option<&[u8]> {
    let rest = entry.strip_prefix(MAGIC.as_slice())?;
    let (digest, payload) = rest.split_at_checked(32)?;
    (Sha256::digest(payload).as_slice() == digest).then_some(payload)
}

/// Writes an entry: a temporary file (0600) in the same directory, renamed in.
fn store(path: &Path, payload: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(MAGIC)?;
        file.write_all(&Sha256::digest(payload))?;
        file.write_all(payload)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_used_only_when_its_digest_matches() {
        let payload = b"machine code";
        let mut entry = MAGIC.to_vec();
        entry.extend_from_slice(&Sha256::digest(payload));
        entry.extend_from_slice(payload);
        assert_eq!(payload_of(&entry), Some(&payload[..]));
        let mut flipped = entry.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(payload_of(&flipped), None, "a changed byte");
        assert_eq!(payload_of(&entry[..entry.len() - 1]), None, "a cut entry");
        assert_eq!(payload_of(b"fulcrum"), None, "not an entry");
    }

    #[test]
    fn a_directory_others_may_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let cache = dir.path().join("cache");
        assert!(prepare(&cache).is_ok(), "created 0700");
        let mode = std::fs::metadata(&cache).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let refused = prepare(&cache).expect_err("world-writable");
        assert!(refused.contains("chmod 700"), "{refused}");
    }
}

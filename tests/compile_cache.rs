//! The on-disk compile cache through the real binary: a second start loads
//! a plugin's machine code instead of compiling it, a corrupted entry is
//! compiled again (and rewritten), and a directory others may write is not
//! used.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn config(backends: &[DemoBackend], cache: &str) -> String {
    format!(
        "[server]\nlisten = \"{{listen}}\"\n[plugins]\ndir = \"plugins.d\"\n{cache}\n\
         [pools.web]\npolicy = \"header-hash\"\nbackends = {}\n",
        backends_toml(backends, &[])
    )
}

/// The cache entries in `dir`.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|list| list.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    found.retain(|p| p.extension().is_some_and(|e| e == "cwasm"));
    found.sort();
    found
}

fn count(log: &str, plugin: &str, what: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(what) && l.contains(&format!("plugin={plugin}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_start_loads_from_the_cache_and_a_corrupt_entry_is_compiled_again() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let plugin = wasm("header_hash.wasm");
    let mut fulcrum = Fulcrum::start(
        &config(&backends, "cache_dir = \"cache\""),
        &[("header-hash.wasm", plugin.as_path())],
    );
    let cache = fulcrum.dir.path().join("cache");
    assert_eq!(get(fulcrum.addr, "/").await.expect("reply").status, 200);
    let log = fulcrum.log();
    assert_eq!(count(&log, "header-hash", "plugin compiled"), 1, "{log}");
    assert_eq!(count(&log, "header-hash", "taken from the compile cache"), 0, "{log}");
    let mode = std::fs::metadata(&cache).expect("cache dir").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "only Fulcrum's user may use it");
    let written = entries(&cache);
    assert!(!written.is_empty(), "entries written");

    // Second start: loaded, not compiled.
    fulcrum.restart();
    assert_eq!(get(fulcrum.addr, "/").await.expect("reply").status, 200);
    let log = fulcrum.log();
    assert_eq!(
        count(&log, "header-hash", "plugin compiled"),
        1,
        "not compiled again:\n{log}"
    );
    assert_eq!(count(&log, "header-hash", "taken from the compile cache"), 1, "{log}");

    // Every entry corrupted (a flipped byte in the machine code): refused,
    // compiled again, rewritten; requests are served throughout.
    for entry in &written {
        let mut bytes = std::fs::read(entry).expect("entry");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        std::fs::write(entry, bytes).expect("corrupt it");
    }
    fulcrum.restart();
    assert_eq!(get(fulcrum.addr, "/").await.expect("reply").status, 200);
    let log = fulcrum.log();
    assert!(log.contains("compile cache entry is corrupt"), "{log}");
    assert_eq!(
        count(&log, "header-hash", "plugin compiled"),
        2,
        "compiled again:\n{log}"
    );
    fulcrum.restart();
    let log = fulcrum.log();
    assert_eq!(
        count(&log, "header-hash", "taken from the compile cache"),
        2,
        "rewritten and used:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_directory_others_may_write_is_not_used() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let plugin = wasm("header_hash.wasm");
    let open = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let fulcrum = Fulcrum::start(
        &config(&backends, &format!("cache_dir = \"{}\"", open.path().display())),
        &[("header-hash.wasm", plugin.as_path())],
    );
    assert_eq!(get(fulcrum.addr, "/").await.expect("reply").status, 200);
    let log = fulcrum.log();
    assert!(log.contains("not used") && log.contains("chmod 700"), "{log}");
    assert!(entries(open.path()).is_empty(), "nothing written there");
}

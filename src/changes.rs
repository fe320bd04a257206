//! Changes an operator makes to pools at runtime through the admin API:
//! backends added, removed, drained and reweighted, applied on top of the
//! config file's pools whenever a snapshot is built, so they survive a reload
//! that does not touch the pool, and (with `[admin] state_file`) a restart,
//! like HAProxy's server-state file.

use crate::config::{BackendConfig, PoolConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

/// A backend an operator added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Added {
    pub address: String,
    pub socket: SocketAddr,
    pub weight: u32,
}

/// The runtime changes of one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolChanges {
    pub added: Vec<Added>,
    /// Configured backends taken out.
    pub removed: BTreeSet<String>,
    /// Weights set, by address.
    pub weights: BTreeMap<String, u32>,
    /// Backends drained, by address.
    pub drained: BTreeSet<String>,
}

impl PoolChanges {
    fn is_empty(&self) -> bool {
        *self == PoolChanges::default()
    }
}

/// Every pool's runtime changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Changes {
    pub pools: BTreeMap<String, PoolChanges>,
}

impl Changes {
    /// `pool`'s config with its changes applied: its backends as they run.
    pub fn apply(&self, name: &str, pool: &PoolConfig) -> PoolConfig {
        let Some(changes) = self.pools.get(name) else {
            return pool.clone();
        };
        let mut pool = pool.clone();
        pool.backends.retain(|b| !changes.removed.contains(&b.address));
        for added in &changes.added {
            if !pool.backends.iter().any(|b| b.address == added.address) {
                pool.backends.push(BackendConfig {
                    address: added.address.clone(),
                    socket: added.socket,
                    weight: added.weight,
                    max_in_flight: None,
                    labels: Vec::new(),
                });
            }
        }
        for backend in &mut pool.backends {
            if let Some(weight) = changes.weights.get(&backend.address) {
                backend.weight = *weight;
            }
        }
        pool
    }

    /// The changes of `pool`, created empty if it has none.
    pub fn of(&mut self, pool: &str) -> &mut PoolChanges {
        self.pools.entry(pool.to_string()).or_default()
    }

    /// Whether `address` is drained in `pool`.
    pub fn is_drained(&self, pool: &str, address: &str) -> bool {
        self.pools.get(pool).is_some_and(|c| c.drained.contains(address))
    }

    /// Forgets pools with nothing changed.
    pub fn tidy(&mut self) {
        self.pools.retain(|_, changes| !changes.is_empty());
    }

    /// The changes saved in `path`; none when the file does not exist yet.
    pub fn load(path: &Path) -> Result<Changes, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: not a state file: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Changes::default()),
            Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
        }
    }

    /// Writes the changes to `path` whole or not at all (a temporary file
    /// renamed over it), so a crash never leaves half a state file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let partial = path.with_extension("partial");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(address: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            address: address.into(),
            socket: address.parse().expect("address"),
            weight,
            max_in_flight: None,
            labels: Vec::new(),
        }
    }

    #[test]
    fn changes_apply_over_the_configured_backends_and_round_trip_through_a_file() {
        let config = crate::config::Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[pools.web]\nbackends = [\"127.0.0.1:10\", \"127.0.0.1:11\"]\n",
            Path::new("t.toml"),
        )
        .expect("config");
        let pool = &config.pools["web"];
        let mut changes = Changes::default();
        let web = changes.of("web");
        web.removed.insert("127.0.0.1:10".into());
        web.added.push(Added {
            address: "127.0.0.1:12".into(),
            socket: "127.0.0.1:12".parse().expect("address"),
            weight: 3,
        });
        web.weights.insert("127.0.0.1:11".into(), 5);
        web.drained.insert("127.0.0.1:11".into());
        let applied = changes.apply("web", pool);
        assert_eq!(
            applied.backends,
            [backend("127.0.0.1:11", 5), backend("127.0.0.1:12", 3)]
        );
        assert!(changes.is_drained("web", "127.0.0.1:11"));
        assert_eq!(changes.apply("other", pool).backends, pool.backends);

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.json");
        assert_eq!(Changes::load(&path), Ok(Changes::default()), "no file yet: no changes");
        changes.save(&path).expect("saved");
        assert_eq!(Changes::load(&path), Ok(changes));
        std::fs::write(&path, "{ not json").expect("write");
        assert!(Changes::load(&path).is_err_and(|e| e.contains("not a state file")));
    }
}

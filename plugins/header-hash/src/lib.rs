//! Sticky sessions: requests with the same value of a header (by default the
//! client's IP address) go to the same healthy backend, using Lamping and
//! Veach's jump consistent hash so a pool change moves few keys.
//!
//! `policy_config = { header = "x-user-id" }` names the header; requests
//! without it fall back to the client's IP.
//!
//! Keys hash over every backend of the pool (by stable id), not only the
//! healthy ones: when a backend goes down, only its own keys move (to a
//! healthy backend chosen by a second hash), and they come back when it does.

use fulcrum_plugin_sdk::{Backend, BackendId, Balancer, Plugin, request};

/// Jump consistent hash: a bucket in `0..buckets` for `key`.
pub fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

pub use fulcrum_plugin_sdk::fnv1a;

/// The backend for `key` among `all` (sorted by id, with health): its
/// jump-hash bucket if that one is usable, else one of the usable ones by a
/// second hash of the key.
pub fn choose(key: u64, all: &[(BackendId, bool)], usable: impl Fn(BackendId, bool) -> bool) -> Option<BackendId> {
    if all.is_empty() {
        return None;
    }
    let (id, healthy) = all[jump_hash(key, all.len())];
    if usable(id, healthy) {
        return Some(id);
    }
    let rest: Vec<BackendId> = all
        .iter()
        .filter(|&&(id, h)| usable(id, h))
        .map(|&(id, _)| id)
        .collect();
    (!rest.is_empty()).then(|| rest[jump_hash(key.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15, rest.len())])
}

/// The policy's config: `{"header": "x-user-id"}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The header whose value is the key; none: the client's IP.
    pub header: Option<String>,
}

/// The policy: the key's header, and every backend by id with its health.
pub struct HeaderHash {
    header: Option<String>,
    backends: Vec<(BackendId, bool)>,
}

impl HeaderHash {
    fn key(&self) -> u64 {
        self.header
            .as_deref()
            .and_then(request::header_hash)
            .unwrap_or_else(request::client_ip_hash)
    }
}

impl Plugin for HeaderHash {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(HeaderHash {
            header: config.header.map(|h| h.to_ascii_lowercase()),
            backends: Vec::new(),
        })
    }
}

impl Balancer for HeaderHash {
    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.backends = backends.iter().map(|b| (b.id, b.healthy)).collect();
        self.backends.sort_unstable();
    }

    fn select(&mut self) -> Option<BackendId> {
        choose(self.key(), &self.backends, |_, healthy| healthy)
    }

    fn reselect(&mut self, tried: &[BackendId]) -> Option<BackendId> {
        choose(self.key(), &self.backends, |id, healthy| {
            healthy && !tried.contains(&id)
        })
    }
}

fulcrum_plugin_sdk::export_balancer!(HeaderHash);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_bucket_and_spread() {
        assert_eq!(jump_hash(fnv1a(b"alice"), 10), jump_hash(fnv1a(b"alice"), 10));
        let mut seen = [0usize; 4];
        for user in 0..4000u32 {
            seen[jump_hash(fnv1a(&user.to_le_bytes()), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn growing_the_pool_moves_few_keys() {
        let moved = (0..1000u32)
            .filter(|k| jump_hash(fnv1a(&k.to_le_bytes()), 10) != jump_hash(fnv1a(&k.to_le_bytes()), 11))
            .count();
        assert!(moved < 150, "{moved} of 1000 keys moved");
    }

    #[test]
    fn an_unhealthy_backend_moves_only_its_own_keys() {
        let all: Vec<(BackendId, bool)> = (0..4).map(|id| (id, true)).collect();
        let mut down = all.clone();
        down[0].1 = false;
        for k in 0..1000u32 {
            let key = fnv1a(&k.to_le_bytes());
            let before = choose(key, &all, |_, h| h);
            let after = choose(key, &down, |_, h| h);
            if before != Some(0) {
                assert_eq!(before, after, "key {k} moved though its backend stayed up");
            } else {
                assert_ne!(after, Some(0));
            }
        }
    }
}

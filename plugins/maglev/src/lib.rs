//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Google's load
//! balancer and Envoy's `MAGLEV` policy do it: a lookup table of a prime size
//! (default 65,537) in which every healthy backend owns a share of the slots
//! by weight. A request's key picks a slot; the same key keeps its backend,
//! and when a backend leaves, its slots go to the others while almost every
//! other slot stays where it was.
//!
//! `policy_config`: `{"header": "x-user"}`, `{"cookie": "session"}`, or
//! neither for the client's IP address (as resolved); `"table_size"` a prime.
//! A request without the header or cookie hashes by its client address.

use fulcrum_plugin_sdk::{Backend, BackendId, Balancer, Plugin, fnv1a, request};

/// The paper's and Envoy's default table size: a prime well above 100 × the
/// backends of most pools, so shares stay within about 1% of their weight.
pub const DEFAULT_TABLE_SIZE: u64 = 65_537;

/// The policy's config.
#[derive(Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub header: Option<String>,
    pub cookie: Option<String>,
    pub table_size: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header: None,
            cookie: None,
            table_size: DEFAULT_TABLE_SIZE,
        }
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// Mixes a hash's bits (splitmix64's finaliser): FNV-1a's low bits alone
/// follow the input's last bytes too closely for a modulus.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The lookup table for `backends` (name, weight, id), `size` slots (a
/// prime): each backend walks its own permutation of the slots (from its
/// name's offset, by its name's skip) and takes the next free one in turn,
/// heavier backends more often.
pub fn build_table(backends: &[(&str, u32, BackendId)], size: u64) -> Vec<BackendId> {
    const EMPTY: BackendId = BackendId::MAX;
    let mut table = vec![EMPTY; size as usize];
    if backends.is_empty() {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|(name, _, _)| {
            let h = fnv1a(name.as_bytes());
            (mix(h) % size, mix(h ^ 0x5851_f42d_4c95_7f2d) % (size - 1) + 1)
        })
        .collect();
    let max_weight = backends.iter().map(|b| u64::from(b.1.max(1))).max().unwrap_or(1);
    let mut next = vec![0u64; backends.len()];
    let mut filled = 0u64;
    let mut round = 0u64;
    while filled < size {
        round += 1;
        for (i, &(_, weight, id)) in backends.iter().enumerate() {
            // Weighted turns: backend i takes a slot in this round when its
            // share of rounds so far (weight / max) grew past a whole one.
            let w = u64::from(weight.max(1));
            if round * w / max_weight == (round - 1) * w / max_weight {
                continue;
            }
            let (offset, skip) = perms[i];
            loop {
                let slot = ((offset + next[i] * skip) % size) as usize;
                next[i] += 1;
                if table[slot] == EMPTY {
                    table[slot] = id;
                    filled += 1;
                    break;
                }
            }
            if filled == size {
                break;
            }
        }
    }
    table
}

/// Where a request's key comes from.
enum Key {
    Header(String),
    Cookie(String),
    Client,
}

/// The policy: its key, its table, and the healthy backends for retries.
pub struct Maglev {
    key: Key,
    size: u64,
    table: Vec<BackendId>,
    healthy: Vec<BackendId>,
}

impl Maglev {
    fn key_hash(&self) -> u64 {
        let hash = match &self.key {
            Key::Header(name) => request::header_hash(name),
            Key::Cookie(name) => request::cookie(name).map(|v| fnv1a(v.as_bytes())),
            Key::Client => None,
        };
        mix(hash.unwrap_or_else(request::client_ip_hash))
    }
}

impl Plugin for Maglev {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        // At most ~1 M slots: 4 MB of table, well within the default 16 MiB memory_limit.
        if !is_prime(config.table_size) || config.table_size > 1_000_003 {
            return Err(format!(
                "table_size must be a prime of at most 1000003 (65537 is the usual), got {}",
                config.table_size
            ));
        }
        let key = match (config.header, config.cookie) {
            (Some(_), Some(_)) => return Err("give `header` or `cookie`, not both".into()),
            (Some(header), None) => Key::Header(header.to_ascii_lowercase()),
            (None, Some(cookie)) => Key::Cookie(cookie),
            (None, None) => Key::Client,
        };
        Ok(Maglev {
            key,
            size: config.table_size,
            table: Vec::new(),
            healthy: Vec::new(),
        })
    }
}

impl Balancer for Maglev {
    fn set_backends(&mut self, backends: Vec<Backend>) {
        let mut healthy: Vec<(&str, u32, BackendId)> = backends
            .iter()
            .filter(|b| b.healthy)
            .map(|b| (b.address.as_str(), b.weight, b.id))
            .collect();
        // By name, so the table does not depend on the order the host lists them in.
        healthy.sort_unstable();
        self.table = build_table(&healthy, self.size);
        self.healthy = healthy.iter().map(|b| b.2).collect();
    }

    fn select(&mut self) -> Option<BackendId> {
        let slot = self.key_hash() % self.size;
        self.table.get(slot as usize).copied()
    }

    /// The next slots of the table after the key's, until a backend not tried.
    fn reselect(&mut self, tried: &[BackendId]) -> Option<BackendId> {
        if self.healthy.iter().all(|id| tried.contains(id)) {
            return None;
        }
        let start = self.key_hash() % self.size;
        (0..self.size)
            .map(|step| self.table[((start + step) % self.size) as usize])
            .find(|id| !tried.contains(id))
    }
}

fulcrum_plugin_sdk::export_balancer!(Maglev);

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8080", i + 1)).collect()
    }

    fn table_of(names: &[String], skip: Option<usize>) -> Vec<BackendId> {
        let backends: Vec<(&str, u32, BackendId)> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(i, n)| (n.as_str(), 1, i as BackendId))
            .collect();
        build_table(&backends, DEFAULT_TABLE_SIZE)
    }

    #[test]
    fn every_backend_gets_its_share() {
        let table = table_of(&names(4), None);
        for id in 0..4 {
            let share = table.iter().filter(|&&t| t == id).count() as f64 / table.len() as f64;
            assert!((share - 0.25).abs() < 0.01, "backend {id}: {share}");
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let names = names(2);
        let table = build_table(&[(&names[0], 3, 0), (&names[1], 1, 1)], DEFAULT_TABLE_SIZE);
        let share = table.iter().filter(|&&t| t == 0).count() as f64 / table.len() as f64;
        assert!((share - 0.75).abs() < 0.01, "{share}");
    }

    #[test]
    fn removing_a_backend_moves_its_slots_and_few_others() {
        let names = names(4);
        let before = table_of(&names, None);
        let after = table_of(&names, Some(3));
        let others = before.iter().filter(|&&b| b != 3).count();
        let others_moved = before.iter().zip(&after).filter(|(b, a)| **b != 3 && b != a).count();
        assert!(after.iter().all(|&a| a != 3));
        assert!(
            (others_moved as f64) < 0.01 * others as f64,
            "{others_moved} of {others} other slots moved"
        );
    }

    #[test]
    fn table_size_must_be_prime() {
        assert!(is_prime(65_537) && is_prime(251) && !is_prime(65_536) && !is_prime(1));
    }
}

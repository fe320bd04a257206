//! Canary routing: a share of clients (by a hash of their address, so each
//! client stays on one side), or any request that asks by header or cookie,
//! goes to a canary pool instead of the route's.
//!
//! `config = { pool = "canary", percent = 5, header = "x-canary", cookie = "canary" }`.
//! A header or cookie value of `1`, `true`, `yes` or `always` sends the
//! request to the canary; `0`, `false`, `no` or `never` keeps it off; any
//! other value (or none) leaves it to the percentage. A request sent to the
//! canary carries the metadata `canary = "true"` for the balancer and later
//! filters.

use fulcrum_plugin_sdk::{Filter, Plugin, Proceed, Verdict, request};

/// The filter's config.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub pool: String,
    #[serde(default)]
    pub percent: f64,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
}

/// What a header or cookie value asks for: `Some(true)` the canary,
/// `Some(false)` not, `None` no opinion.
pub fn asks(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "always" => Some(true),
        "0" | "false" | "no" | "never" => Some(false),
        _ => None,
    }
}

/// Whether a client whose address hashes to `hash` is in the canary's
/// `percent` (hundredths of a percent are honoured).
pub fn in_share(hash: u64, percent: f64) -> bool {
    (hash % 10_000) < (percent * 100.0).round() as u64
}

/// The filter.
pub struct Canary {
    config: Config,
}

impl Plugin for Canary {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if !(0.0..=100.0).contains(&config.percent) {
            return Err(format!("percent must be from 0 to 100, got {}", config.percent));
        }
        if config.pool.is_empty() {
            return Err("pool must name the canary pool".into());
        }
        Ok(Canary { config })
    }
}

impl Filter for Canary {
    fn on_request(&mut self) -> Verdict {
        let by_header = self.config.header.as_deref().and_then(request::header);
        let by_cookie = self.config.cookie.as_deref().and_then(request::cookie);
        let asked = by_header.or(by_cookie).as_deref().and_then(asks);
        let canary = asked.unwrap_or_else(|| in_share(request::client_ip_hash(), self.config.percent));
        if canary {
            Proceed::new().pool(&self.config.pool).metadata("canary", "true").into()
        } else {
            Proceed::new().into()
        }
    }
}

fulcrum_plugin_sdk::export_filter!(Canary);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_ask_and_values_that_refuse() {
        assert_eq!(asks("always"), Some(true));
        assert_eq!(asks(" 1 "), Some(true));
        assert_eq!(asks("never"), Some(false));
        assert_eq!(asks("maybe"), None);
    }

    #[test]
    fn the_share_follows_the_percentage() {
        let mut x = 1u64;
        let inside = (0..100_000)
            .filter(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                in_share(x >> 11, 5.0)
            })
            .count();
        assert!((4_500..5_500).contains(&inside), "{inside}");
        assert!(!in_share(12345, 0.0));
        assert!(in_share(9_999, 100.0));
    }
}

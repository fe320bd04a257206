//! Rate limiting with a token bucket per key (the client's IP address, or a
//! header's value such as an API key), held in the host's shared state so
//! every worker draws from the same bucket: the limit is exact for the
//! whole balancer, not per worker. Over the limit: 429 with `Retry-After`
//! in whole seconds, rounded up.
//!
//! `config = { rate = 100, burst = 20 }` (tokens a second, bucket size);
//! `header = "x-api-key"` keys by that header (requests without it by
//! their client address).

use fulcrum_plugin_sdk::{Filter, Plugin, Proceed, Respond, Verdict, request, shared};

/// The filter's config.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Tokens added a second.
    pub rate: f64,
    /// Most tokens held: the burst admitted after an idle period.
    pub burst: u32,
    #[serde(default)]
    pub header: Option<String>,
}

/// `Retry-After` for a wait of `wait_ns`: whole seconds, rounded up, at least 1.
pub fn retry_after(wait_ns: u64) -> u64 {
    wait_ns.div_ceil(1_000_000_000).max(1)
}

/// The filter: its bucket's shape and key.
pub struct RateLimit {
    rate: f64,
    burst: u32,
    header: Option<String>,
}

impl RateLimit {
    fn key(&self) -> String {
        if let Some(value) = self.header.as_deref().and_then(request::header) {
            return format!("h:{value}");
        }
        format!("ip:{:016x}", request::client_ip_hash())
    }
}

impl Plugin for RateLimit {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if !(config.rate > 0.0 && config.rate.is_finite()) {
            return Err(format!(
                "rate must be a positive number of requests a second, got {}",
                config.rate
            ));
        }
        if config.burst == 0 {
            return Err("burst must be at least 1".into());
        }
        Ok(RateLimit {
            rate: config.rate,
            burst: config.burst,
            header: config.header.map(|h| h.to_ascii_lowercase()),
        })
    }
}

impl Filter for RateLimit {
    fn on_request(&mut self) -> Verdict {
        match shared::take(&self.key(), self.rate, self.burst) {
            Ok(()) => Proceed::new().into(),
            Err(wait_ns) => Respond::status(429)
                .header("retry-after", &retry_after(wait_ns).to_string())
                .text("too many requests: over this client's rate limit\n")
                .into(),
        }
    }
}

fulcrum_plugin_sdk::export_filter!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after(1), 1);
        assert_eq!(retry_after(10_000_000), 1);
        assert_eq!(retry_after(1_000_000_000), 1);
        assert_eq!(retry_after(1_000_000_001), 2);
        assert_eq!(retry_after(0), 1);
    }
}

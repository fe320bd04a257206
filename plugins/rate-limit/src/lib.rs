//! Rate limiting with a token bucket per key (the client's IP address, or a
//! header's value such as an API key), held in the host's shared state so
//! every worker draws from the same bucket: the limit is exact for the
//! whole balancer, not per worker. Over the limit: 429 with `Retry-After`
//! in whole seconds, rounded up.
//!
//! `config = { rate = 100, burst = 20 }` (tokens a second, bucket size);
//! `header = "x-api-key"` keys by that header (requests without it by
//! their client address).
//!
//! Shared state belongs to the plugin, so every filter table using it sees
//! the same store: a bucket's key holds the limit's shape (rate, burst,
//! header), so that two tables with different limits never draw from one
//! bucket, and a reload that changes the limit takes effect at once, for
//! clients already seen too (as nginx's `limit_req` does). Tables with the
//! same shape share buckets unless `zone = "NAME"` sets them apart.

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
    /// Buckets of tables with the same zone and shape are shared; a zone of
    /// its own gives a table buckets of its own.
    #[serde(default)]
    pub zone: String,
}

/// The start of every bucket key under a limit of this shape (made once, at
/// `init`); a client's key is this and who it is.
pub fn bucket_prefix(zone: &str, rate: f64, burst: u32, header: Option<&str>) -> String {
    format!("{zone}|{rate}/s|{burst}|{}|", header.unwrap_or(""))
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
    /// [`bucket_prefix`] of this limit.
    prefix: String,
}

impl RateLimit {
    fn key(&self) -> String {
        match self.header.as_deref().and_then(request::header) {
            Some(value) => format!("{}h:{value}", self.prefix),
            None => format!("{}ip:{:016x}", self.prefix, request::client_ip_hash()),
        }
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
        let header = config.header.map(|h| h.to_ascii_lowercase());
        Ok(RateLimit {
            rate: config.rate,
            burst: config.burst,
            prefix: bucket_prefix(&config.zone, config.rate, config.burst, header.as_deref()),
            header,
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

    #[test]
    fn buckets_of_different_limits_or_zones_are_apart() {
        let key = |zone, rate, burst| bucket_prefix(zone, rate, burst, Some("x-k"));
        assert_eq!(key("", 100.0, 20), key("", 100.0, 20));
        assert_ne!(key("", 100.0, 20), key("", 1.0, 20), "another rate");
        assert_ne!(key("", 100.0, 20), key("", 100.0, 1), "another burst");
        assert_ne!(key("", 100.0, 20), key("login", 100.0, 20), "another zone");
        assert_ne!(
            bucket_prefix("", 1.0, 1, None),
            bucket_prefix("", 1.0, 1, Some("x-k")),
            "another header"
        );
    }
}

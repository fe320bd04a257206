//! The current request as plugins see it: the `request` interface, read in
//! place from the request lent to the store for one call
//! ([`StoreState::with_request`]).

use super::balancer::fulcrum::plugin::request::Host;
use super::engine::StoreState;
use crate::http::request::visible_text;

impl Host for StoreState {
    fn method(&mut self) -> String {
        self.head().map_or_else(String::new, |h| h.method.as_str().to_owned())
    }

    fn path(&mut self) -> String {
        self.head().map_or_else(String::new, |h| h.path().to_owned())
    }

    fn query(&mut self) -> String {
        self.head().and_then(|h| h.query()).unwrap_or_default().to_owned()
    }

    fn authority(&mut self) -> String {
        self.head().and_then(|h| h.host()).unwrap_or_default().to_owned()
    }

    fn header(&mut self, name: String) -> Option<String> {
        let value = self.head()?.header(&name)?;
        visible_text(value).map(str::to_owned)
    }

    fn headers(&mut self) -> Vec<(String, String)> {
        let Some(head) = self.head() else {
            return Vec::new();
        };
        head.headers()
            .filter_map(|(name, value)| {
                let name = std::str::from_utf8(name).ok()?.to_ascii_lowercase();
                Some((name, visible_text(value)?.to_owned()))
            })
            .collect()
    }

    fn client_addr(&mut self) -> String {
        self.client().map(|a| a.to_string()).unwrap_or_default()
    }

    fn client_ip_hash(&mut self) -> u64 {
        let Some(client) = self.client() else {
            return 0;
        };
        match client.ip() {
            std::net::IpAddr::V4(v4) => fnv1a(&v4.octets()),
            std::net::IpAddr::V6(v6) => fnv1a(&v6.octets()),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

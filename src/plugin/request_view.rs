//! The current request (and, in `on-response`, the response) as plugins see
//! them: the `request` and `response` interfaces of 0.2.0 and the `request`
//! interface of 0.1.0, read in place from what is lent to the store for one
//! call ([`StoreState::with_request`]). Header reads see the edits the
//! route's filters made so far.

use super::engine::StoreState;
use super::world::{v1, v2};
use super::{EditOp, RequestChanges};
use crate::http::request::{RequestHead, visible_text};

/// The first value of header `name` with `changes` applied: the original
/// first field, replaced by a `set`, added by an `append` when there was
/// none, gone after a `remove`.
fn edited_header<'a>(head: &'a RequestHead, changes: &'a RequestChanges, name: &str) -> Option<&'a [u8]> {
    let mut value = head.header(name);
    for edit in changes.headers.iter().filter(|e| e.name.eq_ignore_ascii_case(name)) {
        value = match edit.op {
            EditOp::Set => Some(edit.value.as_bytes()),
            EditOp::Append => value.or(Some(edit.value.as_bytes())),
            EditOp::Remove => None,
        };
    }
    value
}

/// Every header with `changes` applied, as (lower-case name, value).
fn edited_headers(head: &RequestHead, changes: &RequestChanges) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = head
        .headers()
        .filter_map(|(name, value)| {
            let name = std::str::from_utf8(name).ok()?.to_ascii_lowercase();
            Some((name, visible_text(value)?.to_owned()))
        })
        .collect();
    for edit in &changes.headers {
        let name = edit.name.to_ascii_lowercase();
        match edit.op {
            EditOp::Set => {
                headers.retain(|(n, _)| *n != name);
                headers.push((name, edit.value.clone()));
            }
            EditOp::Append => headers.push((name, edit.value.clone())),
            EditOp::Remove => headers.retain(|(n, _)| *n != name),
        }
    }
    headers
}

/// FNV-1a, 64 bits: the hash the host computes for plugins.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The value of cookie `name` in a `Cookie` header value (RFC 6265 5.4:
/// pairs separated by `;`).
fn cookie_in<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then(|| value.trim_matches('"'))
    })
}

impl StoreState {
    fn header_value(&self, name: &str) -> Option<&[u8]> {
        let request = self.request()?;
        edited_header(request.head, request.changes, name)
    }

    fn ip_hash(&self) -> u64 {
        match self.client() {
            Some(client) => match client.ip() {
                std::net::IpAddr::V4(v4) => fnv1a(&v4.octets()),
                std::net::IpAddr::V6(v6) => fnv1a(&v6.octets()),
            },
            None => 0,
        }
    }
}

impl v2::fulcrum::plugin::request::Host for StoreState {
    fn method(&mut self) -> String {
        self.head().map_or_else(String::new, |h| h.method.as_str().to_owned())
    }

    fn scheme(&mut self) -> String {
        let secure = self
            .request()
            .and_then(|r| r.connection.edge.as_deref())
            .is_some_and(|edge| edge.secure);
        if self.request().is_none() {
            String::new()
        } else if secure {
            "https".into()
        } else {
            "http".into()
        }
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
        visible_text(self.header_value(&name)?).map(str::to_owned)
    }

    fn header_hash(&mut self, name: String) -> Option<u64> {
        self.header_value(&name).map(fnv1a)
    }

    fn headers(&mut self) -> Vec<(String, String)> {
        self.request()
            .map(|r| edited_headers(r.head, r.changes))
            .unwrap_or_default()
    }

    fn cookie(&mut self, name: String) -> Option<String> {
        let request = self.request()?;
        // Every `Cookie` field (HTTP/2 clients may split them), then any a filter set.
        let fields = request
            .head
            .headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"cookie"));
        let found = fields
            .filter_map(|(_, value)| visible_text(value))
            .find_map(|value| cookie_in(value, &name));
        let edited = request
            .changes
            .headers
            .iter()
            .any(|e| e.name.eq_ignore_ascii_case("cookie"));
        if edited {
            let value = edited_header(request.head, request.changes, "cookie").and_then(visible_text)?;
            return cookie_in(value, &name).map(str::to_owned);
        }
        found.map(str::to_owned)
    }

    fn client_addr(&mut self) -> String {
        self.client().map(|a| a.to_string()).unwrap_or_default()
    }

    fn client_ip_hash(&mut self) -> u64 {
        self.ip_hash()
    }

    fn peer_addr(&mut self) -> String {
        self.request().map(|r| r.peer().to_string()).unwrap_or_default()
    }

    fn body_prefix(&mut self) -> Vec<u8> {
        self.request().map(|r| r.body_prefix.to_vec()).unwrap_or_default()
    }

    fn metadata(&mut self, key: String) -> Option<String> {
        let request = self.request()?;
        request
            .changes
            .metadata
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    fn pool(&mut self) -> String {
        self.request().map(|r| r.pool.to_owned()).unwrap_or_default()
    }
}

impl v2::fulcrum::plugin::response::Host for StoreState {
    fn status(&mut self) -> u16 {
        self.response().map_or(0, |r| r.status.as_u16())
    }

    fn header(&mut self, name: String) -> Option<String> {
        let value = self.response()?.header(&name)?;
        visible_text(value).map(str::to_owned)
    }
}

/// 0.1.0's `request`: the same reads, without the edits' later additions.
impl v1::fulcrum::plugin::request::Host for StoreState {
    fn method(&mut self) -> String {
        v2::fulcrum::plugin::request::Host::method(self)
    }

    fn path(&mut self) -> String {
        v2::fulcrum::plugin::request::Host::path(self)
    }

    fn query(&mut self) -> String {
        v2::fulcrum::plugin::request::Host::query(self)
    }

    fn authority(&mut self) -> String {
        v2::fulcrum::plugin::request::Host::authority(self)
    }

    fn header(&mut self, name: String) -> Option<String> {
        v2::fulcrum::plugin::request::Host::header(self, name)
    }

    fn headers(&mut self) -> Vec<(String, String)> {
        v2::fulcrum::plugin::request::Host::headers(self)
    }

    fn client_addr(&mut self) -> String {
        self.client().map(|a| a.to_string()).unwrap_or_default()
    }

    fn client_ip_hash(&mut self) -> u64 {
        self.ip_hash()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name() {
        assert_eq!(cookie_in("a=1; canary=yes; b=2", "canary"), Some("yes"));
        assert_eq!(cookie_in("a=1;canary=\"yes\"", "canary"), Some("yes"));
        assert_eq!(cookie_in("xcanary=1", "canary"), None);
    }
}

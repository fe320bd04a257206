//! The current request (and, in `on-response`, the response) as plugins see
//! them: the `request` and `response` interfaces of 0.2.0 and the `request`
//! interface of 0.1.0, read in place from what is lent to the store for one
//! call ([`StoreState::with_request`]). Header reads see the edits the
//! route's filters made so far.

use super::RequestChanges;
use super::engine::StoreState;
use super::world::{v1, v2};
use crate::http::edit;
use crate::http::request::{RequestHead, visible_text};

/// The first value of header `name` with `changes` applied: the original
/// first field, replaced by a `set`, added by an `append` when there was
/// none, gone after a `remove`.
fn edited_header<'a>(head: &'a RequestHead, changes: &'a RequestChanges, name: &str) -> Option<&'a [u8]> {
    if !edit::touches(&changes.headers, name.as_bytes()) {
        return head.header(name);
    }
    edit::apply(&changes.headers, name, head.header_all(name).collect())
        .first()
        .copied()
}

/// Every header with `changes` applied, as (lower-case name, value): the
/// fields no edit touches as they came, then those of each edited name.
fn edited_headers(head: &RequestHead, changes: &RequestChanges) -> Vec<(String, String)> {
    let edits = &changes.headers;
    let text = |name: &[u8], value: &[u8]| {
        let name = std::str::from_utf8(name).ok()?.to_ascii_lowercase();
        Some((name, visible_text(value)?.to_owned()))
    };
    let mut headers: Vec<(String, String)> = head
        .headers()
        .filter(|(name, _)| !edit::touches(edits, name))
        .filter_map(|(name, value)| text(name, value))
        .collect();
    edit::each_edited(
        edits,
        |name| head.header_all(name).collect(),
        |name, value| headers.extend(text(name.as_bytes(), value)),
    );
    headers
}

/// The value of cookie `name` in the request's `Cookie` fields, with the
/// filters' edits applied.
fn cookie_of(head: &RequestHead, changes: &RequestChanges, name: &str) -> Option<String> {
    // Every `Cookie` field (HTTP/2 clients may split them), as the filters
    // left them, appended ones too.
    edit::apply(&changes.headers, "cookie", head.header_all("cookie").collect())
        .into_iter()
        .filter_map(visible_text)
        .find_map(|value| cookie_in(value, name))
        .map(str::to_owned)
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
        cookie_of(request.head, request.changes, &name)
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
    use crate::http::edit::EditOp;

    #[test]
    fn cookies_are_found_by_name() {
        assert_eq!(cookie_in("a=1; canary=yes; b=2", "canary"), Some("yes"));
        assert_eq!(cookie_in("a=1;canary=\"yes\"", "canary"), Some("yes"));
        assert_eq!(cookie_in("xcanary=1", "canary"), None);
    }

    #[test]
    fn cookies_are_read_after_the_filters_edits() {
        let mut text = bytes::BytesMut::from("GET / HTTP/1.1\r\nhost: a\r\ncookie: a=1\r\ncookie: b=2\r\n\r\n");
        let head = crate::http::h1::parse_request(&mut text)
            .expect("valid")
            .expect("complete");
        let edit = |op, value: &str| crate::plugin::HeaderEdit {
            name: "cookie".into(),
            op,
            value: value.into(),
        };
        let mut changes = RequestChanges {
            headers: Vec::new(),
            metadata: Vec::new(),
        };
        assert_eq!(cookie_of(&head, &changes, "b").as_deref(), Some("2"), "a second field");
        changes.headers = vec![edit(EditOp::Append, "c=3")];
        for (name, value) in [("a", "1"), ("b", "2"), ("c", "3")] {
            assert_eq!(
                cookie_of(&head, &changes, name).as_deref(),
                Some(value),
                "{name} after an append"
            );
        }
        changes.headers = vec![edit(EditOp::Set, "d=4"), edit(EditOp::Append, "e=5")];
        assert_eq!(cookie_of(&head, &changes, "a"), None, "replaced by the set");
        assert_eq!(cookie_of(&head, &changes, "e").as_deref(), Some("5"));
        changes.headers = vec![edit(EditOp::Remove, "")];
        assert_eq!(cookie_of(&head, &changes, "a"), None, "removed");
    }
}

//! The current request as plugins see it: lent to the store for the length of
//! one call, read in place through the `request` interface.

use super::balancer::fulcrum::plugin::request::Host;
use super::engine::StoreState;
use crate::http::request::{RequestHead, visible_text};
use std::net::SocketAddr;
use wasmtime::Store;

/// The request a plugin call is about: its head and the client's address.
pub struct CurrentRequest {
    pub head: RequestHead,
    pub client: SocketAddr,
}

/// The current request as the store sees it: a pointer set for the length of
/// one call and cleared after, so the request is lent to the plugin without
/// being copied or moved.
pub struct LentRequest(*const CurrentRequest);

// SAFETY: the pointer is only dereferenced by host functions running inside
// the call that lent it, on the lending thread, while the lender's borrow lives.
unsafe impl Send for LentRequest {}
unsafe impl Sync for LentRequest {}

impl LentRequest {
    pub(super) const NONE: LentRequest = LentRequest(std::ptr::null());
}

impl StoreState {
    /// Runs `f` with `request` as the current request of this store. The
    /// pointer is cleared by a guard, so it never outlives the borrow, even
    /// when `f` unwinds.
    pub fn with_request<R>(
        store: &mut Store<StoreState>,
        request: &CurrentRequest,
        f: impl FnOnce(&mut Store<StoreState>) -> R,
    ) -> R {
        /// Clears the lent request when dropped.
        struct Lent<'a>(&'a mut Store<StoreState>);
        impl Drop for Lent<'_> {
            fn drop(&mut self) {
                self.0.data_mut().current = LentRequest::NONE;
            }
        }
        store.data_mut().current = LentRequest(request);
        let lent = Lent(store);
        f(lent.0)
    }

    fn request(&self) -> Option<&CurrentRequest> {
        // SAFETY: non-null only inside `with_request`, whose borrow outlives the call.
        unsafe { self.current.0.as_ref() }
    }

    fn head(&self) -> Option<&RequestHead> {
        self.request().map(|r| &r.head)
    }

    fn client(&self) -> Option<SocketAddr> {
        self.request().map(|r| r.client)
    }
}

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

//! Sticky sessions: requests with the same value of a header (by default the
//! client's IP address) go to the same healthy backend, using Lamping and
//! Veach's jump consistent hash so a pool change moves few keys.
//!
//! `policy_config = { header = "x-user-id" }` names the header; requests
//! without it fall back to the client's IP.

/// A backend's id, as the WIT `backend-id`.
pub type BackendId = u32;

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

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The component glue: only built for Wasm, so the logic above tests on the host.
#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

    use super::{fnv1a, jump_hash};
    use exports::fulcrum::plugin::policy::{Backend, BackendId, Guest};
    use fulcrum::plugin::request;
    use std::cell::RefCell;

    thread_local! {
        static HEADER: RefCell<Option<String>> = const { RefCell::new(None) };
        static HEALTHY: RefCell<Vec<BackendId>> = const { RefCell::new(Vec::new()) };
    }

    fn key() -> u64 {
        let by_header = HEADER.with(|h| h.borrow().as_deref().and_then(request::header));
        match by_header {
            Some(value) => fnv1a(value.as_bytes()),
            None => request::client_ip_hash(),
        }
    }

    struct HeaderHash;

    impl Guest for HeaderHash {
        fn init(config: String) -> Result<(), String> {
            // A flat JSON object; the one key read is "header".
            let header = config
                .split("\"header\"")
                .nth(1)
                .and_then(|rest| rest.split('"').nth(1))
                .map(str::to_ascii_lowercase);
            HEADER.with(|h| *h.borrow_mut() = header);
            Ok(())
        }

        fn set_backends(backends: Vec<Backend>) {
            HEALTHY.with(|h| *h.borrow_mut() = backends.iter().filter(|b| b.healthy).map(|b| b.id).collect());
        }

        fn select() -> Option<BackendId> {
            HEALTHY.with(|h| {
                let healthy = h.borrow();
                (!healthy.is_empty()).then(|| healthy[jump_hash(key(), healthy.len())])
            })
        }

        fn reselect(tried: Vec<BackendId>) -> Option<BackendId> {
            HEALTHY.with(|h| {
                let rest: Vec<BackendId> = h.borrow().iter().copied().filter(|id| !tried.contains(id)).collect();
                (!rest.is_empty()).then(|| rest[jump_hash(key(), rest.len())])
            })
        }
    }

    export!(HeaderHash);
}

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
}

//! A component of the test-only `counter` world (`wit/counter.wit`, which the
//! host's test in `src/plugin/instances.rs` binds too): it counts its calls, so a test can see
//! whether calls reach the same cached instance, and traps on request.
// Only a Wasm component: there is nothing to build or test on the host.
#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({
    path: "wit",
    world: "counter",
});

use std::sync::atomic::{AtomicU32, Ordering};

static CALLS: AtomicU32 = AtomicU32::new(0);

struct Counter;

impl Guest for Counter {
    fn init(config: String) -> Result<(), String> {
        if config == "refuse" {
            return Err("refused as asked".into());
        }
        Ok(())
    }

    fn next(trap: bool) -> u32 {
        if trap {
            core::arch::wasm32::unreachable();
        }
        CALLS.fetch_add(1, Ordering::Relaxed) + 1
    }
}

export!(Counter);

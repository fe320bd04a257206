//! A component of the test-only `counter` world (the host's twin of this WIT
//! is in `src/plugin/instances.rs`): it counts its calls, so a test can see
//! whether calls reach the same cached instance, and traps on request.
// Only a Wasm component: there is nothing to build or test on the host.
#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({
    inline: "package test:counter;
             world counter {
                 export init: func(config: string) -> result<_, string>;
                 export next: func(trap: bool) -> u32;
             }",
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

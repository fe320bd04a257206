//! The Rust SDK for Fulcrum plugins (`fulcrum:plugin@0.2.0`).
//!
//! A plugin is a type that implements [`Plugin`] (how it starts from its
//! config) and [`Balancer`], [`Filter`] or both, exported with one macro:
//!
//! ```no_run
//! use fulcrum_plugin_sdk::{Backend, BackendId, Balancer, NoConfig, Plugin};
//!
//! struct First(Vec<BackendId>);
//!
//! impl Plugin for First {
//!     type Config = NoConfig;
//!     fn new(_: NoConfig) -> Result<Self, String> { Ok(First(Vec::new())) }
//! }
//!
//! impl Balancer for First {
//!     fn set_backends(&mut self, backends: Vec<Backend>) {
//!         self.0 = backends.iter().filter(|b| b.healthy).map(|b| b.id).collect();
//!     }
//!     fn select(&mut self) -> Option<BackendId> { self.0.first().copied() }
//! }
//!
//! fulcrum_plugin_sdk::export_balancer!(First);
//! ```
//!
//! The crate's features say which world the component is, since a component
//! carries exactly one: `balancer`, `filter`, or both (`balancer-and-filter`).
//! The SDK parses the JSON config into the plugin's own serde type (an error
//! refuses the plugin with serde's message), keeps one plugin value per
//! instance, and writes the export glue. The host's services are the WIT
//! interfaces, re-exported as modules: [`request`], [`shared`], [`log`],
//! [`clock`], [`random`], and [`backends`] (balancers) or [`response`]
//! (filters).

// The generated code names this crate by path, from inside it too.
extern crate self as fulcrum_plugin_sdk;

#[cfg(all(feature = "balancer", not(feature = "filter")))]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "balancer",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::fulcrum_plugin_sdk::bindings",
        runtime_path: "::fulcrum_plugin_sdk::__wit_bindgen::rt",
    });
}

#[cfg(all(feature = "filter", not(feature = "balancer")))]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "filter",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::fulcrum_plugin_sdk::bindings",
        runtime_path: "::fulcrum_plugin_sdk::__wit_bindgen::rt",
    });
}

// Both features, or none (a workspace-wide check of the SDK alone).
#[cfg(not(any(
    all(feature = "balancer", not(feature = "filter")),
    all(feature = "filter", not(feature = "balancer"))
)))]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "balancer-and-filter",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::fulcrum_plugin_sdk::bindings",
        runtime_path: "::fulcrum_plugin_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::fulcrum::plugin::types::{EditOp, HeaderEdit};
pub use bindings::fulcrum::plugin::{clock, log, random, request, shared};

/// A backend's id within its pool: stable while the pool lists it.
pub type BackendId = u32;

#[cfg(any(feature = "balancer", not(feature = "filter")))]
#[doc(hidden)]
pub mod balancer;
#[cfg(any(feature = "balancer", not(feature = "filter")))]
pub use balancer::{Backend, Balancer, Signal, backends};

#[cfg(any(feature = "filter", not(feature = "balancer")))]
mod filter;
#[cfg(any(feature = "filter", not(feature = "balancer")))]
pub use filter::{Filter, Proceed, Respond, Verdict, response};

/// How a plugin starts: from its config (a pool's `policy_config` or a
/// filter's `config`), parsed from JSON into [`Plugin::Config`]. One value
/// per instance; the host runs an instance per use and worker thread.
pub trait Plugin: Sized + 'static {
    /// The config's shape. Give its fields `#[serde(default)]` so `{}` (no
    /// config) parses, and `#[serde(deny_unknown_fields)]` so a misspelt key
    /// is refused rather than ignored.
    type Config: serde::de::DeserializeOwned;

    /// Starts the plugin; an error refuses it (the message is logged, and the
    /// version serving before keeps serving).
    fn new(config: Self::Config) -> Result<Self, String>;
}

/// A config with nothing in it (only `{}` parses).
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Parses the JSON config into `T`; the error says what is wrong and where.
pub fn parse_config<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    serde_json::from_str(json).map_err(|e| format!("bad config: {e}"))
}

/// Writes a line to the balancer's log at `level`.
pub fn log(level: log::Level, message: &str) {
    log::log(level, message)
}

/// A 64-bit FNV-1a hash, the one the host uses for `header-hash` and
/// `client-ip-hash`: hash a name the same way the host hashes a key.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The glue every export macro shares: the plugin value of this instance.
#[doc(hidden)]
#[macro_export]
macro_rules! __instance {
    ($plugin:ty) => {
        ::std::thread_local! {
            static __FULCRUM_PLUGIN: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                const { ::core::cell::RefCell::new(::core::option::Option::None) };
        }

        /// Runs `f` on this instance's plugin (none before `init`).
        fn __fulcrum_with<R>(f: impl FnOnce(&mut $plugin) -> R) -> ::core::option::Option<R> {
            __FULCRUM_PLUGIN.with(|p| p.borrow_mut().as_mut().map(f))
        }

        #[doc(hidden)]
        pub struct __FulcrumExports;

        impl $crate::bindings::exports::fulcrum::plugin::lifecycle::Guest for __FulcrumExports {
            fn init(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                let config = $crate::parse_config::<<$plugin as $crate::Plugin>::Config>(&config)?;
                let plugin = <$plugin as $crate::Plugin>::new(config)?;
                __FULCRUM_PLUGIN.with(|p| *p.borrow_mut() = ::core::option::Option::Some(plugin));
                ::core::result::Result::Ok(())
            }
        }
    };
}

/// The `policy` export, calling [`Balancer`].
#[doc(hidden)]
#[macro_export]
macro_rules! __policy {
    ($plugin:ty) => {
        impl $crate::bindings::exports::fulcrum::plugin::policy::Guest for __FulcrumExports {
            fn set_backends(backends: ::std::vec::Vec<$crate::Backend>) {
                __fulcrum_with(|p| <$plugin as $crate::Balancer>::set_backends(p, backends));
            }

            fn select(hint: $crate::backends::Batch) -> ::core::option::Option<$crate::BackendId> {
                $crate::balancer::with_hint(hint, || {
                    __fulcrum_with(|p| <$plugin as $crate::Balancer>::select(p)).flatten()
                })
            }

            fn reselect(
                tried: ::std::vec::Vec<$crate::BackendId>,
                hint: $crate::backends::Batch,
            ) -> ::core::option::Option<$crate::BackendId> {
                $crate::balancer::with_hint(hint, || {
                    __fulcrum_with(|p| <$plugin as $crate::Balancer>::reselect(p, &tried)).flatten()
                })
            }
        }
    };
}

/// The `request-filter` export, calling [`Filter`].
#[doc(hidden)]
#[macro_export]
macro_rules! __request_filter {
    ($plugin:ty) => {
        impl $crate::bindings::exports::fulcrum::plugin::request_filter::Guest for __FulcrumExports {
            fn on_request() -> $crate::Verdict {
                __fulcrum_with(|p| <$plugin as $crate::Filter>::on_request(p))
                    .unwrap_or_else(|| $crate::Proceed::new().into())
            }

            fn on_response() -> ::std::vec::Vec<$crate::HeaderEdit> {
                __fulcrum_with(|p| <$plugin as $crate::Filter>::on_response(p)).unwrap_or_default()
            }
        }
    };
}

/// Exports `$plugin` (a [`Plugin`] and [`Balancer`]) as the component's
/// balancer. Needs the `balancer` feature.
#[macro_export]
macro_rules! export_balancer {
    ($plugin:ty) => {
        // Only in the component: a build for the host (the plugin's unit
        // tests) has no world to export to.
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        mod __fulcrum_exports {
            #[allow(unused_imports)]
            use super::*;
            $crate::__instance!($plugin);
            $crate::__policy!($plugin);
            $crate::bindings::__export_world!(__FulcrumExports with_types_in $crate::bindings);
        }
    };
}

/// Exports `$plugin` (a [`Plugin`] and [`Filter`]) as the component's
/// filter. Needs the `filter` feature.
#[macro_export]
macro_rules! export_filter {
    ($plugin:ty) => {
        // Only in the component: a build for the host (the plugin's unit
        // tests) has no world to export to.
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        mod __fulcrum_exports {
            #[allow(unused_imports)]
            use super::*;
            $crate::__instance!($plugin);
            $crate::__request_filter!($plugin);
            $crate::bindings::__export_world!(__FulcrumExports with_types_in $crate::bindings);
        }
    };
}

/// Exports `$plugin` (a [`Plugin`], [`Balancer`] and [`Filter`]) as both.
/// Needs both features.
#[macro_export]
macro_rules! export_balancer_and_filter {
    ($plugin:ty) => {
        // Only in the component: a build for the host (the plugin's unit
        // tests) has no world to export to.
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        mod __fulcrum_exports {
            #[allow(unused_imports)]
            use super::*;
            $crate::__instance!($plugin);
            $crate::__policy!($plugin);
            $crate::__request_filter!($plugin);
            $crate::bindings::__export_world!(__FulcrumExports with_types_in $crate::bindings);
        }
    };
}

//! The plugin host, as the rest of Fulcrum uses it: no wasmtime type crosses
//! this module's surface.
//!
//! - [`Plugin`]: one compiled and linked version of a component: a balancer,
//!   a filter or both (`fulcrum:plugin@0.2.0`), or a 0.1.0 balancer.
//! - [`PluginSlot`]: the version of a named plugin that serves now; hot reload
//!   swaps it atomically.
//! - [`Policy`]: a pool's use of a plugin (its config and shared counters);
//!   [`Policy::choose`] is the call the request path makes to pick a backend.
//! - [`Filter`]: a route's use of a filter plugin; [`Filter::on_request`] and
//!   [`Filter::on_response`].
//!
//! Inside, by job: `engine` (wasmtime engine, confined WASI, store state, the
//! request lent for a call), `instances` (per-thread instance cache, faults,
//! quarantine and hot swap, generic over the world), `world` (the WIT
//! bindings of 0.2.0 and 0.1.0 and the world binding either), `host` (the
//! services plugins import), `request_view` (the `request` and `response`
//! interfaces), [`shared`] (state shared by a plugin's instances),
//! `balancer` and `filter` (the two uses), and [`registry`] (built-ins and
//! the plugin directory).
//!
//! Instances live in a per-thread cache, one per policy and worker thread, so a
//! decision is a single component call with no lock and no instantiation. A
//! fault (trap, deadline, memory cap, bad answer) discards the instance, serves
//! the request by the fallback (round robin over healthy backends), and after
//! repeated faults quarantines that plugin version until a new one arrives.

mod balancer;
mod engine;
mod filter;
mod host;
mod instances;
pub mod registry;
mod request_view;
pub mod scaffold;
pub mod shared;
mod world;

use std::time::Duration;

pub mod cache;
pub mod check;
pub use balancer::{Choice, Policy, PolicyCounters, PoolView, fallback};
pub use engine::{CurrentRequest, TICKET_SLOTS, Tickets, seed_random};
pub use filter::{DirectResponse, EditOp, Filter, FilterVerdict, HeaderEdit, OnFault, RequestChanges};
pub use host::SIGNALS;
pub use instances::{Fault, QUARANTINE_AFTER, digest, prepare_for_workers};
pub use world::PluginWorld;

/// A compiled, linked plugin version.
pub type Plugin = instances::Plugin<PluginWorld>;
/// The plugin version serving now under a name.
pub type PluginSlot = instances::PluginSlot<PluginWorld>;

/// Why a plugin was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{name}` is not a valid Wasm component: {reason}")]
    Compile { name: String, reason: String },
    #[error("plugin `{name}` does not implement the {world} world: {reason}")]
    WrongWorld {
        name: String,
        world: &'static str,
        reason: String,
    },
    #[error("plugin `{name}` failed to start: {reason}")]
    Instantiate { name: String, reason: String },
    #[error("plugin `{name}` refused its config: {reason}")]
    Init { name: String, reason: String },
    #[error("plugin `{name}` failed in init: {reason}")]
    InitFault { name: String, reason: String },
    #[error("plugin `{name}` cannot serve here: {reason}")]
    Unfit { name: String, reason: String },
    /// One use of the plugin (a pool's policy, a filter) refused it: `key`
    /// is the config key to blame.
    #[error("{key}: {source}")]
    InUse { key: String, source: Box<PluginError> },
    #[error("cannot read the plugin directory {dir}: {reason}")]
    Directory { dir: String, reason: String },
}

/// Where a plugin version came from.
#[derive(Debug, Clone)]
pub enum PluginSource {
    Builtin,
    File(std::path::PathBuf),
}

/// Resource limits of plugin calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub call_timeout: Duration,
    pub memory_limit: usize,
}

impl Limits {
    /// Deadline for instantiation, `init` and `set-backends`, which run rarely
    /// and may build tables.
    fn setup_timeout(&self) -> Duration {
        (self.call_timeout * 20).max(Duration::from_millis(200))
    }
}

//! The plain Rust API the proxy uses to run policy plugins.
//!
//! - [`Plugin`]: one compiled and linked version of a component.
//! - [`PluginSlot`]: the version of a named plugin that serves now; hot reload
//!   swaps it atomically.
//! - [`Policy`]: a pool's use of a plugin (its config and shared counters);
//!   [`Policy::choose`] is the one call the request path makes.
//!
//! Instances live in a per-thread cache, one per policy and worker thread, so a
//! decision is a single component call with no lock and no instantiation. A
//! fault (trap, deadline, memory cap, bad answer) discards the instance, serves
//! the request by the fallback (round robin over healthy backends), and after
//! repeated faults quarantines that plugin version until a new one arrives.

mod host;
pub mod registry;

use crate::backend::{BackendList, health_epoch};
use arc_swap::ArcSwap;
use host::{Balancer, BalancerPre, Runtime, StoreState, WitBackend, deadline_ticks};
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use wasmtime::Store;

pub use host::{CurrentRequest, Tickets};

/// Why a call ended in a caught panic of the host. No known cause is left
/// (blocking WASI calls are answered without waiting: see `host::confine_wasi`);
/// the catch stays so that a host bug costs one request's decision, not a worker.
const HOST_PANIC: &str = "the host panicked while serving the plugin";

/// Consecutive faults after which a plugin version serves only by fallback.
pub const QUARANTINE_AFTER: u32 = 10;

/// Why a plugin was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{name}` is not a valid Wasm component: {reason}")]
    Compile { name: String, reason: String },
    #[error("plugin `{name}` does not implement the fulcrum:plugin/balancer world: {reason}")]
    WrongWorld { name: String, reason: String },
    #[error("plugin `{name}` failed to start: {reason}")]
    Instantiate { name: String, reason: String },
    #[error("plugin `{name}` refused its config: {reason}")]
    Init { name: String, reason: String },
    #[error("cannot read the plugin directory {dir}: {reason}")]
    Directory { dir: String, reason: String },
}

/// Where a plugin version came from.
#[derive(Debug, Clone)]
pub enum PluginSource {
    Builtin,
    File(std::path::PathBuf),
}

/// A compiled, linked plugin version.
pub struct Plugin {
    pub name: Arc<str>,
    pub source: PluginSource,
    /// Hex SHA-256 of the component's bytes.
    pub digest: String,
    pre: BalancerPre<StoreState>,
    consecutive_faults: AtomicU32,
    quarantined: AtomicBool,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .finish()
    }
}

impl Plugin {
    /// Compiles `bytes` and links them against the balancer world. Slow for
    /// large components: call it off the request path.
    pub fn load(name: &str, bytes: &[u8], source: PluginSource) -> Result<Arc<Plugin>, PluginError> {
        let runtime = Runtime::get();
        let component = runtime.compile(bytes).map_err(|e| PluginError::Compile {
            name: name.into(),
            reason: one_line(&e),
        })?;
        let pre = runtime.link(&component).map_err(|e| PluginError::WrongWorld {
            name: name.into(),
            reason: one_line(&e),
        })?;
        let digest = digest(bytes);
        Ok(Arc::new(Plugin {
            name: name.into(),
            source,
            digest,
            pre,
            consecutive_faults: AtomicU32::new(0),
            quarantined: AtomicBool::new(false),
        }))
    }

    /// Starts a throwaway instance and runs `init(config)`: the check a plugin
    /// passes before it may serve a pool.
    pub fn check(&self, config: &str, limits: &Limits) -> Result<(), PluginError> {
        let tickets = Tickets::default();
        self.start(config, limits, tickets).map(drop)
    }

    fn start(
        &self,
        config: &str,
        limits: &Limits,
        tickets: Tickets,
    ) -> Result<(Store<StoreState>, Balancer), PluginError> {
        let runtime = Runtime::get();
        let state = StoreState::new(self.name.clone(), limits.memory_limit, tickets);
        let mut store = runtime.new_store(state);
        store.set_epoch_deadline(deadline_ticks(limits.setup_timeout()));
        let instance = self.pre.instantiate(&mut store).map_err(|e| PluginError::Instantiate {
            name: self.name.to_string(),
            reason: one_line(&e),
        })?;
        store.set_epoch_deadline(deadline_ticks(limits.setup_timeout()));
        instance
            .fulcrum_plugin_policy()
            .call_init(&mut store, config)
            .map_err(|e| PluginError::Init {
                name: self.name.to_string(),
                reason: one_line(&e),
            })?
            .map_err(|reason| PluginError::Init {
                name: self.name.to_string(),
                reason,
            })?;
        Ok((store, instance))
    }

    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }

    fn record_fault(&self) {
        let n = self.consecutive_faults.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= QUARANTINE_AFTER && !self.quarantined.swap(true, Ordering::Relaxed) {
            tracing::error!(
                plugin = %self.name,
                digest = %self.digest,
                faults = n,
                "plugin quarantined after repeated faults: its pools are served by the fallback until a new version is loaded"
            );
        }
    }

    fn record_success(&self) {
        if self.consecutive_faults.load(Ordering::Relaxed) != 0 {
            self.consecutive_faults.store(0, Ordering::Relaxed);
        }
    }
}

/// Hex SHA-256 of a component's bytes: a plugin version's identity.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn one_line(e: &impl std::fmt::Debug) -> String {
    // wasmtime errors carry a chain of causes; `{:?}` of an anyhow-style error
    // prints them all, over several lines.
    let text = format!("{e:?}");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "Caused by:")
        .collect::<Vec<_>>()
        .join(": ")
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

/// The version of a named plugin serving now.
pub struct PluginSlot {
    pub name: String,
    current: ArcSwap<Plugin>,
    /// Faults of every version of this plugin.
    pub faults: AtomicU64,
}

impl PluginSlot {
    pub fn new(plugin: Arc<Plugin>) -> Arc<PluginSlot> {
        Arc::new(PluginSlot {
            name: plugin.name.to_string(),
            current: ArcSwap::new(plugin),
            faults: AtomicU64::new(0),
        })
    }

    pub fn current(&self) -> Arc<Plugin> {
        self.current.load_full()
    }

    /// Puts `plugin` in service; in-flight decisions finish on the old version.
    pub fn replace(&self, plugin: Arc<Plugin>) {
        self.current.store(plugin);
    }
}

/// Why a decision was not the plugin's own.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The call trapped, ran past its deadline or hit the memory cap.
    Trap(String),
    /// The plugin named a backend that is unknown, unhealthy, or already tried.
    BadChoice(u32),
    /// The plugin version is quarantined.
    Quarantined,
}

/// The outcome of [`Policy::choose`].
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Index into the pool's backend list; `None` when no backend can serve.
    pub backend: Option<usize>,
    /// Set when the fallback chose instead of the plugin.
    pub fault: Option<Fault>,
}

/// A pool's use of a plugin.
pub struct Policy {
    id: u64,
    slot: Arc<PluginSlot>,
    config: Arc<str>,
    tickets: Tickets,
    fallback_ticket: Arc<AtomicU64>,
    limits: Limits,
    /// Lets thread caches notice this policy is gone.
    alive: Arc<()>,
}

/// Counters of one pool that outlive config reloads.
#[derive(Default, Clone)]
pub struct PolicyCounters {
    pub tickets: Tickets,
    pub fallback_ticket: Arc<AtomicU64>,
}

impl Policy {
    pub fn new(slot: Arc<PluginSlot>, config: &str, limits: Limits, counters: PolicyCounters) -> Policy {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Policy {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            slot,
            config: config.into(),
            tickets: counters.tickets,
            fallback_ticket: counters.fallback_ticket,
            limits,
            alive: Arc::new(()),
        }
    }

    pub fn plugin_name(&self) -> &str {
        &self.slot.name
    }

    pub fn slot(&self) -> &Arc<PluginSlot> {
        &self.slot
    }

    /// Chooses a backend for `request` among `backends`, never one in `tried`
    /// and never an unhealthy one. The plugin reads `request` during the call.
    pub fn choose(&self, request: &CurrentRequest, backends: &BackendList, tried: &[usize]) -> Choice {
        let plugin = self.slot.current.load();
        let fault = if plugin.is_quarantined() {
            Fault::Quarantined
        } else {
            match self.call_plugin(&plugin, request, backends, tried) {
                Ok(None) => {
                    return Choice {
                        backend: None,
                        fault: None,
                    };
                }
                Ok(Some(id)) => {
                    let index = id as usize;
                    let valid = backends.get(index).is_some_and(|b| b.state.is_healthy()) && !tried.contains(&index);
                    if valid {
                        plugin.record_success();
                        return Choice {
                            backend: Some(index),
                            fault: None,
                        };
                    }
                    plugin.record_fault();
                    tracing::warn!(plugin = %plugin.name, backend = id, "plugin chose a backend that is unknown, unhealthy or already tried; using the fallback");
                    Fault::BadChoice(id)
                }
                Err(reason) => {
                    plugin.record_fault();
                    tracing::warn!(plugin = %plugin.name, %reason, "plugin call failed; using the fallback");
                    Fault::Trap(reason)
                }
            }
        };
        self.slot.faults.fetch_add(1, Ordering::Relaxed);
        Choice {
            backend: fallback(backends, tried, &self.fallback_ticket),
            fault: Some(fault),
        }
    }

    fn call_plugin(
        &self,
        plugin: &Arc<Plugin>,
        request: &CurrentRequest,
        backends: &BackendList,
        tried: &[usize],
    ) -> Result<Option<u32>, String> {
        LIVE.with(|live| {
            let mut live = live.borrow_mut();
            let found = live.iter().position(|(id, _)| *id == self.id);
            let index = match found {
                Some(i) if Arc::ptr_eq(&live[i].1.plugin, plugin) => i,
                _ => {
                    if let Some(i) = found {
                        live.swap_remove(i);
                    }
                    live.retain(|(_, l)| l.policy_alive.strong_count() > 0);
                    let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        plugin.start(&self.config, &self.limits, self.tickets.clone())
                    }));
                    let (store, instance) = match started {
                        Ok(started) => started.map_err(|e| e.to_string())?,
                        Err(_) => return Err(HOST_PANIC.into()),
                    };
                    let entry = LiveInstance {
                        plugin: plugin.clone(),
                        store,
                        instance,
                        pushed_list: std::ptr::null(),
                        pushed_epoch: u64::MAX,
                        policy_alive: Arc::downgrade(&self.alive),
                    };
                    live.push((self.id, entry));
                    live.len() - 1
                }
            };
            let entry = &mut live[index].1;
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                entry.decide(request, backends, tried, &self.limits)
            }));
            match result {
                Ok(Ok(choice)) => Ok(choice),
                Ok(Err(e)) => {
                    live.swap_remove(index);
                    Err(one_line(&e))
                }
                Err(_) => {
                    live.swap_remove(index);
                    Err(HOST_PANIC.into())
                }
            }
        })
    }
}

/// One plugin instance cached on a worker thread.
struct LiveInstance {
    plugin: Arc<Plugin>,
    store: Store<StoreState>,
    instance: Balancer,
    /// Identity of the backend list last pushed (pointer of its allocation).
    pushed_list: *const (),
    pushed_epoch: u64,
    policy_alive: Weak<()>,
}

impl LiveInstance {
    fn decide(
        &mut self,
        request: &CurrentRequest,
        backends: &BackendList,
        tried: &[usize],
        limits: &Limits,
    ) -> wasmtime::Result<Option<u32>> {
        let policy = self.instance.fulcrum_plugin_policy();
        let list_id = Arc::as_ptr(backends) as *const ();
        let epoch = health_epoch();
        if self.pushed_list != list_id || self.pushed_epoch != epoch {
            let wit: Vec<WitBackend> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| WitBackend {
                    id: i as u32,
                    address: b.address.clone(),
                    weight: b.weight,
                    healthy: b.state.is_healthy(),
                })
                .collect();
            self.store.data_mut().backends = backends.clone();
            self.store.set_epoch_deadline(deadline_ticks(limits.setup_timeout()));
            policy.call_set_backends(&mut self.store, &wit)?;
            self.pushed_list = list_id;
            self.pushed_epoch = epoch;
        }
        self.store.set_epoch_deadline(deadline_ticks(limits.call_timeout));
        StoreState::with_request(&mut self.store, request, |store| {
            if tried.is_empty() {
                policy.call_select(store)
            } else {
                let tried: Vec<u32> = tried.iter().map(|&i| i as u32).collect();
                policy.call_reselect(store, &tried)
            }
        })
    }
}

thread_local! {
    /// By policy id; a handful of entries per thread, so a scan beats hashing.
    static LIVE: RefCell<Vec<(u64, LiveInstance)>> = const { RefCell::new(Vec::new()) };
}

/// Round robin over healthy backends not yet tried: what serves a request when
/// the plugin cannot.
pub fn fallback(backends: &BackendList, tried: &[usize], ticket: &AtomicU64) -> Option<usize> {
    let n = backends.len();
    if n == 0 {
        return None;
    }
    let start = ticket.fetch_add(1, Ordering::Relaxed) as usize;
    (0..n)
        .map(|step| (start + step) % n)
        .find(|&i| backends[i].state.is_healthy() && !tried.contains(&i))
}

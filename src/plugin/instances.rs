//! What every plugin world shares, generic over the world: a compiled and
//! linked [`Plugin`] version, the [`PluginSlot`] that hot-swaps versions, the
//! per-thread cache of running instances, fault accounting and quarantine.
//!
//! A world (the balancer today, the filter next) says how to bind its
//! component and start it ([`World`]); [`Binding::call`] runs one call on this
//! thread's instance, starting it if needed. A trap, a deadline, the memory cap
//! or a host panic discards the instance and counts a fault; so does an answer
//! the world refuses. After [`QUARANTINE_AFTER`] faults in a row the version
//! is quarantined: for [`QUARANTINE_FIRST`], doubled at each quarantine that
//! follows with no good answer between (up to [`QUARANTINE_LONGEST`]), as
//! outlier ejection does for backends; until a new version is loaded, or an
//! operator lifts it (`POST /plugins/NAME/reset`).

use super::engine::{Runtime, StoreState, deadline_ticks, one_line};
use super::{Limits, PluginError, PluginSource, Tickets};
use arc_swap::ArcSwap;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::LocalKey;
use wasmtime::Store;
use wasmtime::component::{Component, InstancePre, Linker};

/// Why a call ended in a caught panic of the host. No known cause is left
/// (blocking WASI calls are answered without waiting: see `engine::confine_wasi`);
/// the catch stays so that a host bug costs one request's decision, not a worker.
const HOST_PANIC: &str = "the host panicked while serving the plugin";

/// Consecutive faults after which a plugin version serves only by fallback.
pub const QUARANTINE_AFTER: u32 = 10;

/// How long a first quarantine lasts. After it the version is on probation:
/// one more fault quarantines it again for twice as long.
pub const QUARANTINE_FIRST: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest a quarantine lasts.
pub const QUARANTINE_LONGEST: std::time::Duration = std::time::Duration::from_secs(300);

/// The instances of one world cached on a thread, by binding id. A handful
/// of entries per thread, so a scan beats hashing.
pub type Cache<W> = RefCell<Vec<(u64, Live<W>)>>;

/// A plugin world: how its components are bound, started and initialised.
pub trait World: Sized + 'static {
    /// The world's name in messages, e.g. `fulcrum:plugin@0.2.0`.
    const NAME: &'static str;
    /// The component bound to the world's exports, ready to instantiate.
    type Pre: Send + Sync;
    /// A running instance's handle to the world's exports (started off the
    /// workers, then handed to one).
    type Instance: Send;
    /// What a cached instance keeps beside the instance itself.
    type Local: Default;
    /// The linker with the world's imports (built once).
    fn linker() -> &'static Linker<StoreState>;
    /// Checks the component exports the world and binds it.
    fn bind(pre: InstancePre<StoreState>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<StoreState>) -> wasmtime::Result<Self::Instance>;
    /// Runs the world's `init` with the user's config.
    fn init(
        instance: &Self::Instance,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>>;
    /// This thread's cache of the world's instances.
    fn cache() -> &'static LocalKey<Cache<Self>>;
}

/// A compiled, linked plugin version.
pub struct Plugin<W: World> {
    pub name: Arc<str>,
    pub source: PluginSource,
    /// Hex SHA-256 of the component's bytes.
    pub digest: String,
    /// When this version was compiled and linked.
    pub loaded_at: std::time::SystemTime,
    pub pre: W::Pre,
    consecutive_faults: AtomicU32,
    /// While quarantined: when it ends ([`crate::backend::process_ms`]); else 0.
    quarantined_until_ms: AtomicU64,
    /// Quarantines since the last good answer: the next one lasts
    /// `QUARANTINE_FIRST × 2^quarantines`.
    quarantines: AtomicU32,
}

impl<W: World> std::fmt::Debug for Plugin<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .finish()
    }
}

impl<W: World> Plugin<W> {
    /// Compiles `bytes` and links them against the world. Slow for large
    /// components: call it off the request path.
    pub fn load(name: &str, bytes: &[u8], source: PluginSource) -> Result<Arc<Plugin<W>>, PluginError> {
        let runtime = Runtime::get();
        let component: Component = runtime.compile(name, bytes).map_err(|e| {
            let mut reason = one_line(&e);
            if reason.contains("attempted to parse a wasm module with a component parser") {
                reason.push_str(
                    " (this is a core Wasm module, not a component: build for wasm32-wasip2, or wrap it with `wasm-tools component new`)",
                );
            }
            PluginError::Compile {
                name: name.into(),
                reason,
            }
        })?;
        let pre = W::linker()
            .instantiate_pre(&component)
            .and_then(W::bind)
            .map_err(|e| PluginError::WrongWorld {
                name: name.into(),
                world: W::NAME,
                reason: one_line(&e),
            })?;
        Ok(Arc::new(Plugin {
            name: name.into(),
            source,
            digest: digest(bytes),
            loaded_at: std::time::SystemTime::now(),
            pre,
            consecutive_faults: AtomicU32::new(0),
            quarantined_until_ms: AtomicU64::new(0),
            quarantines: AtomicU32::new(0),
        }))
    }

    /// Starts a throwaway instance and runs `init(config)`: the check a plugin
    /// passes before it may serve.
    pub fn check(&self, config: &str, limits: &Limits) -> Result<(), PluginError> {
        self.start(config, limits, Tickets::default()).map(drop)
    }

    fn start(
        &self,
        config: &str,
        limits: &Limits,
        tickets: Tickets,
    ) -> Result<(Store<StoreState>, W::Instance), PluginError> {
        let runtime = Runtime::get();
        let state = StoreState::new(self.name.clone(), limits.memory_limit, tickets);
        let mut store = runtime.new_store(state);
        store.set_epoch_deadline(deadline_ticks(limits.setup_timeout()));
        let instance = W::instantiate(&self.pre, &mut store).map_err(|e| {
            let mut reason = one_line(&e);
            if reason.contains("failed to convert function to given type") {
                // Names that match with types that do not: built against other WIT.
                reason.push_str(&format!(
                    " (its exports' types are not {}'s: rebuild it against the host's WIT, e.g. a draft of 0.2.0 whose `select` took no `hint`)",
                    W::NAME
                ));
            }
            PluginError::Instantiate {
                name: self.name.to_string(),
                reason,
            }
        })?;
        store.set_epoch_deadline(deadline_ticks(limits.setup_timeout()));
        W::init(&instance, &mut store, config)
            .map_err(|e| PluginError::InitFault {
                name: self.name.to_string(),
                reason: one_line(&e),
            })?
            .map_err(|reason| PluginError::Init {
                name: self.name.to_string(),
                reason,
            })?;
        Ok((store, instance))
    }

    /// Whether this version is quarantined now. The first call after a
    /// quarantine ends lifts it (and says so).
    pub fn is_quarantined(&self) -> bool {
        let until = self.quarantined_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if crate::backend::process_ms() < until {
            return true;
        }
        if self
            .quarantined_until_ms
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                plugin = %self.name,
                digest = %self.digest,
                "plugin quarantine over: it serves again, and one more fault quarantines it for twice as long"
            );
        }
        false
    }

    /// How long the quarantine has left; zero when there is none.
    pub fn quarantine_left(&self) -> std::time::Duration {
        let until = self.quarantined_until_ms.load(Ordering::Relaxed);
        std::time::Duration::from_millis(until.saturating_sub(crate::backend::process_ms()))
    }

    /// Lifts a quarantine and forgets the faults that led to it (an
    /// operator's `POST /plugins/NAME/reset`). True when it was quarantined.
    pub fn reset_faults(&self) -> bool {
        // The counts first: a fault between the two stores must not find a
        // full count with no quarantine and start a new one at once.
        self.consecutive_faults.store(0, Ordering::Relaxed);
        self.quarantines.store(0, Ordering::Relaxed);
        let until = self.quarantined_until_ms.swap(0, Ordering::Relaxed);
        until != 0 && crate::backend::process_ms() < until
    }

    fn record_fault(&self) {
        let n = self.consecutive_faults.fetch_add(1, Ordering::Relaxed) + 1;
        if n < QUARANTINE_AFTER || self.quarantined_until_ms.load(Ordering::Relaxed) != 0 {
            return;
        }
        // Workers fault at once on their own instances: only the one that
        // starts the quarantine counts it.
        let times = self.quarantines.load(Ordering::Relaxed).min(16);
        let length = QUARANTINE_FIRST.saturating_mul(1 << times).min(QUARANTINE_LONGEST);
        let until = crate::backend::process_ms() + length.as_millis() as u64;
        if self
            .quarantined_until_ms
            .compare_exchange(0, until, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.quarantines.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                plugin = %self.name,
                digest = %self.digest,
                faults = n,
                seconds = length.as_secs(),
                "plugin quarantined after repeated faults: its pools use the fallback and its filters their on_fault until the quarantine ends, a new version is loaded, or POST /plugins/NAME/reset"
            );
        }
    }

    fn record_success(&self) {
        if self.consecutive_faults.load(Ordering::Relaxed) != 0 {
            self.consecutive_faults.store(0, Ordering::Relaxed);
            self.quarantines.store(0, Ordering::Relaxed);
        }
    }
}

/// Hex SHA-256 of a component's bytes: a plugin version's identity.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The version of a named plugin serving now.
pub struct PluginSlot<W: World> {
    pub name: String,
    current: ArcSwap<Plugin<W>>,
    /// The uses of this plugin, told to start instances of a new version.
    users: std::sync::Mutex<Vec<Weak<Prepared<W>>>>,
    /// Faults of every version of this plugin.
    pub faults: AtomicU64,
    /// The same faults by kind: trap (or deadline, memory cap, host panic),
    /// bad answer, quarantined.
    pub faults_by_kind: [AtomicU64; 3],
    /// Instances started in the background, and on a worker (none was ready).
    pub started: [AtomicU64; 2],
}

impl<W: World> PluginSlot<W> {
    pub fn new(plugin: Arc<Plugin<W>>) -> Arc<PluginSlot<W>> {
        Arc::new(PluginSlot {
            name: plugin.name.to_string(),
            current: ArcSwap::new(plugin),
            users: std::sync::Mutex::new(Vec::new()),
            faults: AtomicU64::new(0),
            faults_by_kind: [const { AtomicU64::new(0) }; 3],
            started: [const { AtomicU64::new(0) }; 2],
        })
    }

    pub fn current(&self) -> Arc<Plugin<W>> {
        self.current.load_full()
    }

    /// Puts `plugin` in service; in-flight calls finish on the old version.
    /// Every use of the plugin starts instances of it in the background, so
    /// the workers switch without instantiating on their event loops.
    pub fn replace(&self, plugin: Arc<Plugin<W>>) {
        self.current.store(plugin);
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users.retain(|user| user.strong_count() > 0);
        for user in users.iter().filter_map(Weak::upgrade) {
            user.fill(workers());
        }
    }
}

/// Why a call's answer was not the plugin's own.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The call trapped, ran past its deadline or hit the memory cap.
    Trap(String),
    /// The plugin named a backend that is unknown, unhealthy, or already tried.
    BadChoice(u32),
    /// A filter's answer the host cannot use (a bad status, an unknown pool).
    BadAnswer(String),
    /// The plugin version is quarantined.
    Quarantined,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Trap(reason) => write!(f, "{reason}"),
            Fault::BadChoice(id) => write!(
                f,
                "it chose backend id {id}, which is unknown, unhealthy or already tried"
            ),
            Fault::BadAnswer(reason) => write!(f, "its answer cannot be used: {reason}"),
            Fault::Quarantined => write!(f, "the plugin is quarantined after repeated faults"),
        }
    }
}

impl Fault {
    /// The kinds' names, in [`PluginSlot::faults_by_kind`]'s order.
    pub const KINDS: [&'static str; 3] = ["trap", "bad_answer", "quarantined"];

    /// The kind's name, as in [`Fault::KINDS`].
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.kind_index()]
    }

    fn kind_index(&self) -> usize {
        match self {
            Fault::Trap(_) => 0,
            Fault::BadChoice(_) | Fault::BadAnswer(_) => 1,
            Fault::Quarantined => 2,
        }
    }
}

/// One plugin instance cached on a worker thread.
pub struct Live<W: World> {
    plugin: Arc<Plugin<W>>,
    pub store: Store<StoreState>,
    pub instance: W::Instance,
    /// The world's own per-instance state.
    pub local: W::Local,
    binding_alive: Weak<()>,
}

/// Worker threads that will call plugins; 0 (tools, tests) starts instances
/// where they are first needed instead of in the background.
static WORKERS: AtomicUsize = AtomicUsize::new(0);

/// Says how many worker threads will call plugins: each use of a plugin then
/// keeps that many instances started in the background (and one spare after).
pub fn prepare_for_workers(workers: usize) {
    WORKERS.store(workers, Ordering::Relaxed);
}

fn workers() -> usize {
    WORKERS.load(Ordering::Relaxed)
}

/// An instance started off the workers, waiting for a worker to take it.
struct Ready<W: World> {
    plugin: Arc<Plugin<W>>,
    store: Store<StoreState>,
    instance: W::Instance,
}

/// What a use of a plugin needs to start instances, and the instances
/// started in the background for it.
///
/// Instantiating a 12–18 MB Python or JavaScript component (and running its
/// `init`) takes milliseconds: done on a worker, it would stall every
/// connection of that worker. So instances are started on a thread of their
/// own: for each worker when the use is made, for the new version when the
/// plugin is hot-swapped, and a spare after a worker takes one (after a
/// fault, the worker takes the spare). A worker starts one itself only when
/// none is ready.
struct Prepared<W: World> {
    slot: Arc<PluginSlot<W>>,
    config: Arc<str>,
    tickets: Tickets,
    limits: Limits,
    ready: std::sync::Mutex<Vec<Ready<W>>>,
    /// Instances still to start in the background.
    pending: AtomicUsize,
    /// A background start is running.
    filling: AtomicBool,
}

impl<W: World> Prepared<W> {
    /// Starts an instance of `plugin`, counted as started on a worker or not.
    fn start(&self, plugin: &Arc<Plugin<W>>, on_worker: bool) -> Result<(Store<StoreState>, W::Instance), String> {
        self.slot.started[usize::from(on_worker)].fetch_add(1, Ordering::Relaxed);
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
            plugin.start(&self.config, &self.limits, self.tickets.clone())
        }));
        match started {
            Ok(started) => started.map_err(|e| e.to_string()),
            Err(_) => Err(HOST_PANIC.into()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Ready<W>>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a ready instance of `plugin`, dropping older versions' ones;
    /// when that was the last, a spare is started.
    fn take(self: &Arc<Self>, plugin: &Arc<Plugin<W>>) -> Option<Ready<W>> {
        let mut ready = self.lock();
        ready.retain(|r| Arc::ptr_eq(&r.plugin, plugin));
        let taken = ready.pop();
        let empty = ready.is_empty();
        drop(ready);
        if workers() > 0 && empty && self.pending.load(Ordering::Acquire) == 0 {
            self.fill(1);
        }
        taken
    }

    /// Starts `count` more instances of the serving version in the
    /// background (one thread per use at a time, which takes on what later
    /// calls ask for).
    fn fill(self: &Arc<Self>, count: usize) {
        if count == 0 {
            return;
        }
        self.pending.fetch_add(count, Ordering::AcqRel);
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let prepared = self.clone();
        let spawned = std::thread::Builder::new()
            .name("fulcrum-plugin-start".into())
            .spawn(move || {
                loop {
                    let more = prepared
                        .pending
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                        .is_ok();
                    // Done, or the use is gone (only this thread holds it).
                    if !more || Arc::strong_count(&prepared) == 1 {
                        break;
                    }
                    let plugin = prepared.slot.current();
                    if plugin.is_quarantined() {
                        continue;
                    }
                    match prepared.start(&plugin, false) {
                        Ok((store, instance)) => {
                            let mut ready = prepared.lock();
                            ready.retain(|r| Arc::ptr_eq(&r.plugin, &plugin));
                            ready.push(Ready {
                                plugin,
                                store,
                                instance,
                            });
                        }
                        Err(reason) => {
                            tracing::warn!(plugin = %plugin.name, %reason, "starting a plugin instance in the background failed");
                            prepared.pending.store(0, Ordering::Release);
                        }
                    }
                }
                prepared.filling.store(false, Ordering::Release);
                // Asked for more while this thread was finishing: go on.
                let left = prepared.pending.swap(0, Ordering::AcqRel);
                prepared.fill(left);
            });
        if spawned.is_err() {
            self.pending.store(0, Ordering::Release);
            self.filling.store(false, Ordering::Release);
        }
    }
}

/// One use of a plugin (a pool's policy, a route's filter): its config, its
/// shared counters and its instances, one per thread.
pub struct Binding<W: World> {
    id: u64,
    prepared: Arc<Prepared<W>>,
    pub limits: Limits,
    /// Lets thread caches notice this binding is gone.
    alive: Arc<()>,
}

impl<W: World> Binding<W> {
    /// The most linear memory this thread's instance of the binding reached,
    /// in bytes; `None` before it has one.
    pub fn peak_memory(&self) -> Option<usize> {
        W::cache().with(|live| {
            live.borrow()
                .iter()
                .find(|(id, _)| *id == self.id)
                .map(|(_, live)| live.store.data().limits.peak_memory)
        })
    }

    /// A use of `slot` with `config`; with workers running (see
    /// [`prepare_for_workers`]) it starts one instance per worker in the
    /// background.
    pub fn new(slot: Arc<PluginSlot<W>>, config: &str, limits: Limits, tickets: Tickets) -> Binding<W> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let prepared = Arc::new(Prepared {
            slot: slot.clone(),
            config: config.into(),
            tickets,
            limits,
            ready: std::sync::Mutex::new(Vec::new()),
            pending: AtomicUsize::new(0),
            filling: AtomicBool::new(false),
        });
        slot.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&prepared));
        prepared.fill(workers());
        Binding {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            prepared,
            limits,
            alive: Arc::new(()),
        }
    }

    pub fn slot(&self) -> &Arc<PluginSlot<W>> {
        &self.prepared.slot
    }

    /// Waits (at most `within`) for the instances being started in the
    /// background: at start, so the first requests find them ready.
    pub fn wait_ready(&self, within: std::time::Duration) {
        let until = std::time::Instant::now() + within;
        while self.prepared.filling.load(Ordering::Acquire) && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Runs `call` on this thread's instance of the version serving now and
    /// lets `accept` judge its answer. Any fault (quarantine, trap, deadline,
    /// memory cap, host panic, refused answer) is counted and returned; the
    /// instance that trapped is discarded.
    #[inline]
    pub fn call<R>(
        &self,
        call: impl FnOnce(&mut Live<W>) -> wasmtime::Result<R>,
        accept: impl FnOnce(&R) -> Result<(), Fault>,
    ) -> Result<R, Fault> {
        let plugin = self.prepared.slot.current.load();
        let result = if plugin.is_quarantined() {
            Err(Fault::Quarantined)
        } else {
            match self.call_instance(&plugin, call) {
                Ok(answer) => match accept(&answer) {
                    Ok(()) => {
                        plugin.record_success();
                        return Ok(answer);
                    }
                    Err(fault) => Err(fault),
                },
                Err(reason) => {
                    tracing::warn!(plugin = %plugin.name, %reason, "plugin call failed; a pool's fallback or a filter's on_fault answers");
                    Err(Fault::Trap(reason))
                }
            }
        };
        if !matches!(result, Err(Fault::Quarantined)) {
            plugin.record_fault();
        }
        let slot = &self.prepared.slot;
        slot.faults.fetch_add(1, Ordering::Relaxed);
        if let Err(fault) = &result {
            slot.faults_by_kind[fault.kind_index()].fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    #[inline]
    fn call_instance<R>(
        &self,
        plugin: &Arc<Plugin<W>>,
        call: impl FnOnce(&mut Live<W>) -> wasmtime::Result<R>,
    ) -> Result<R, String> {
        W::cache().with(|live| {
            let mut live = live.borrow_mut();
            let found = live.iter().position(|(id, _)| *id == self.id);
            let index = match found {
                Some(i) if Arc::ptr_eq(&live[i].1.plugin, plugin) => i,
                _ => {
                    if let Some(i) = found {
                        live.swap_remove(i);
                    }
                    live.retain(|(_, l)| l.binding_alive.strong_count() > 0);
                    // One started in the background if there is one; else here.
                    let (store, instance) = match self.prepared.take(plugin) {
                        Some(ready) => (ready.store, ready.instance),
                        None => self.prepared.start(plugin, true)?,
                    };
                    let entry = Live {
                        plugin: plugin.clone(),
                        store,
                        instance,
                        local: W::Local::default(),
                        binding_alive: Arc::downgrade(&self.alive),
                    };
                    live.push((self.id, entry));
                    live.len() - 1
                }
            };
            let entry = &mut live[index].1;
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| call(entry)));
            match result {
                Ok(Ok(answer)) => Ok(answer),
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

#[cfg(test)]
mod tests {
    //! A second, test-only world through the same cache, faults and
    //! quarantine as the balancer's. Its component is `tests/plugins/counter`
    //! (WIT in `tests/plugins/counter/wit`).

    use super::*;
    use std::time::Duration;

    mod bindings {
        wasmtime::component::bindgen!({
            path: "tests/plugins/counter/wit",
            world: "counter",
        });
    }
    use bindings::{Counter, CounterPre};

    thread_local! {
        static COUNTERS: Cache<CounterWorld> = const { RefCell::new(Vec::new()) };
    }

    struct CounterWorld;

    impl World for CounterWorld {
        const NAME: &'static str = "test:counter/counter";
        type Pre = CounterPre<StoreState>;
        type Instance = Counter;
        type Local = ();

        fn linker() -> &'static Linker<StoreState> {
            static LINKER: std::sync::OnceLock<Linker<StoreState>> = std::sync::OnceLock::new();
            LINKER.get_or_init(|| Runtime::get().linker(|_| Ok(())).expect("the counter world links"))
        }

        fn bind(pre: InstancePre<StoreState>) -> wasmtime::Result<Self::Pre> {
            CounterPre::new(pre)
        }

        fn instantiate(pre: &Self::Pre, store: &mut Store<StoreState>) -> wasmtime::Result<Counter> {
            pre.instantiate(store)
        }

        fn init(
            instance: &Counter,
            store: &mut Store<StoreState>,
            config: &str,
        ) -> wasmtime::Result<Result<(), String>> {
            instance.call_init(store, config)
        }

        fn cache() -> &'static LocalKey<Cache<Self>> {
            &COUNTERS
        }
    }

    const LIMITS: Limits = Limits {
        call_timeout: Duration::from_millis(50),
        memory_limit: 16 << 20,
    };

    fn counter() -> Arc<Plugin<CounterWorld>> {
        let wasm = std::fs::read(concat!(env!("FULCRUM_PLUGIN_WASM_DIR"), "/counter.wasm")).expect("counter.wasm");
        Plugin::load("counter", &wasm, PluginSource::Builtin).expect("the counter component loads")
    }

    fn next(binding: &Binding<CounterWorld>, trap: bool) -> Result<u32, Fault> {
        binding.call(
            |live| {
                live.store.set_epoch_deadline(deadline_ticks(LIMITS.call_timeout));
                live.instance.call_next(&mut live.store, trap)
            },
            |_| Ok(()),
        )
    }

    #[test]
    fn a_second_world_shares_the_cache_faults_and_quarantine() {
        let plugin = counter();
        assert!(matches!(plugin.check("refuse", &LIMITS), Err(PluginError::Init { .. })));
        let slot = PluginSlot::new(plugin.clone());
        let binding = Binding::new(slot.clone(), "{}", LIMITS, Tickets::default());

        // One instance per thread, kept between calls.
        assert_eq!(next(&binding, false), Ok(1));
        assert_eq!(next(&binding, false), Ok(2));

        // A trap is a fault and discards the instance: the next call starts afresh.
        assert!(matches!(next(&binding, true), Err(Fault::Trap(reason)) if reason.contains("unreachable")));
        assert_eq!(next(&binding, false), Ok(1));
        assert_eq!(slot.faults.load(Ordering::Relaxed), 1);

        // An answer the world refuses is a fault too, without losing the instance.
        let refused = binding.call(
            |live| live.instance.call_next(&mut live.store, false),
            |&n| Err(Fault::BadChoice(n)),
        );
        assert_eq!(refused, Err(Fault::BadChoice(2)));

        // Faults in a row quarantine the version; a new version serves again.
        for _ in 1..QUARANTINE_AFTER {
            let _ = next(&binding, true);
        }
        assert!(plugin.is_quarantined());
        assert_eq!(next(&binding, false), Err(Fault::Quarantined));
        let left = plugin.quarantine_left();
        assert!(
            left > QUARANTINE_FIRST - Duration::from_secs(1) && left <= QUARANTINE_FIRST,
            "{left:?}"
        );

        // The quarantine ends on its own (made to end now): the version serves
        // again on probation, and its next fault quarantines it twice as long.
        let end_now = || {
            plugin
                .quarantined_until_ms
                .store(crate::backend::process_ms(), Ordering::Relaxed)
        };
        end_now();
        assert!(!plugin.is_quarantined());
        assert!(matches!(next(&binding, true), Err(Fault::Trap(_))));
        assert!(plugin.is_quarantined(), "one fault on probation");
        let left = plugin.quarantine_left();
        assert!(left > QUARANTINE_FIRST * 2 - Duration::from_secs(1), "{left:?}");
        // A good answer after it ends forgets the doubling.
        end_now();
        assert!(next(&binding, false).is_ok());
        assert_eq!(plugin.quarantines.load(Ordering::Relaxed), 0);

        // An operator's reset lifts a quarantine at once.
        for _ in 0..QUARANTINE_AFTER {
            let _ = next(&binding, true);
        }
        assert!(plugin.is_quarantined());
        assert!(plugin.reset_faults());
        assert!(next(&binding, false).is_ok(), "served again after the reset");

        // A new version serves again.
        for _ in 0..QUARANTINE_AFTER {
            let _ = next(&binding, true);
        }
        assert_eq!(next(&binding, false), Err(Fault::Quarantined));
        slot.replace(counter());
        assert_eq!(next(&binding, false), Ok(1), "the new version runs in a new instance");
    }

    #[test]
    fn a_component_of_another_world_is_refused_with_the_world_named() {
        let wasm =
            std::fs::read(concat!(env!("FULCRUM_PLUGIN_WASM_DIR"), "/wrong_world.wasm")).expect("wrong_world.wasm");
        let error = Plugin::<CounterWorld>::load("greeter", &wasm, PluginSource::Builtin).expect_err("refused");
        assert!(error.to_string().contains("test:counter/counter"), "{error}");
    }
}

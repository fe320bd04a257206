//! The wasmtime side of the plugin host: engine, linker, generated bindings,
//! per-store state and the host functions plugins import.
//!
//! Nothing outside `plugin` sees a wasmtime type; `plugin::mod` wraps this in
//! a plain Rust API.

use crate::backend::BackendList;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::{DynOutputStream, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({
    path: "wit",
    world: "balancer",
});

use self::fulcrum::plugin::host::Level;
use crate::request::visible_text;
pub use exports::fulcrum::plugin::policy::Backend as WitBackend;

/// How often the epoch ticks; a call's deadline is counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Counters shared by every instance of a plugin in one pool (`next-ticket`).
pub const TICKET_SLOTS: usize = 16;
pub type Tickets = Arc<[AtomicU64; TICKET_SLOTS]>;

/// The request a plugin call is about.
#[derive(Default)]
pub struct CurrentRequest {
    pub head: Option<crate::request::RequestHead>,
    pub client: Option<SocketAddr>,
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
    const NONE: LentRequest = LentRequest(std::ptr::null());
}

/// Per-store (per-instance) host state.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: StoreLimits,
    current: LentRequest,
    /// The backend list last pushed with `set-backends`; ids index it.
    pub backends: BackendList,
    pub tickets: Tickets,
    pub plugin_name: Arc<str>,
}

impl StoreState {
    pub fn new(plugin_name: Arc<str>, memory_limit: usize, tickets: Tickets) -> StoreState {
        StoreState {
            // No preopened directories, no environment, no arguments, no network
            // (sockets deny every address by default), stdin closed, output to the log.
            wasi: WasiCtx::builder()
                .allow_ip_name_lookup(false)
                .allow_tcp(false)
                .allow_udp(false)
                .stdout(PluginOutput {
                    plugin: plugin_name.clone(),
                    stream: "stdout",
                })
                .stderr(PluginOutput {
                    plugin: plugin_name.clone(),
                    stream: "stderr",
                })
                .build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_limit)
                .instances(4)
                .tables(16)
                .memories(4)
                .trap_on_grow_failure(true)
                .build(),
            current: LentRequest::NONE,
            backends: Arc::from(Vec::new()),
            tickets,
            plugin_name,
        }
    }
}

/// A plugin's stdout or stderr, written to the log a line at a time, on the
/// request path too: the blocking stream calls a guest's `print` makes are
/// answered by Fulcrum's own synchronous host functions (see
/// [`shadow_blocking_output`]), since wasmtime-wasi's run through
/// `Handle::block_on`, which cannot run inside a worker's runtime.
#[derive(Clone)]
struct PluginOutput {
    plugin: Arc<str>,
    stream: &'static str,
}

impl wasmtime_wasi::cli::IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for PluginOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            output: self.clone(),
            line: Vec::new(),
        })
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineLogger {
            output: self.clone(),
            line: Vec::new(),
        })
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineLogger {
    /// Always ready: lines go to the log at once.
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LineLogger {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        self.emit();
    }
}

/// Replaces wasmtime-wasi's blocking output functions (and the output-stream
/// destructor, which may flush) with synchronous ones. Theirs run through
/// `Handle::block_on`, which panics inside the worker's runtime, so a plugin
/// that printed on the request path faulted. Fulcrum's plugin output streams
/// never block, so writing and flushing at once is all blocking needs.
fn shadow_blocking_output(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    use wasmtime::component::{Resource, ResourceType};
    use wasmtime_wasi::p2::bindings::sync::io::streams::StreamError as WitStreamError;
    type Stream = Resource<DynOutputStream>;

    fn write_and_flush(
        table: &mut ResourceTable,
        stream: &Stream,
        bytes: Vec<u8>,
    ) -> wasmtime::Result<Result<(), WitStreamError>> {
        let stream = table.get_mut(stream)?;
        let written = stream.write(bytes::Bytes::from(bytes)).and_then(|()| stream.flush());
        Ok(written.map_err(|_| WitStreamError::Closed))
    }

    linker.allow_shadowing(true);
    let mut streams = linker.instance(WASI_IO_STREAMS)?;
    streams.resource(
        "output-stream",
        ResourceType::host::<DynOutputStream>(),
        |mut store, rep| {
            store
                .data_mut()
                .table
                .delete(Resource::<DynOutputStream>::new_own(rep))?;
            Ok(())
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-and-flush",
        |mut store, (stream, bytes): (Stream, Vec<u8>)| {
            Ok((write_and_flush(&mut store.data_mut().table, &stream, bytes)?,))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-flush",
        |mut store, (stream,): (Stream,)| Ok((write_and_flush(&mut store.data_mut().table, &stream, Vec::new())?,)),
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The `wasi:io/streams` version wasmtime-wasi 48 defines (guests importing
/// any 0.2.x resolve to it).
const WASI_IO_STREAMS: &str = "wasi:io/streams@0.2.12";

struct LineLogger {
    output: PluginOutput,
    line: Vec<u8>,
}

impl LineLogger {
    /// Longest line kept before it is logged anyway.
    const MAX_LINE: usize = 4096;

    fn take(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == b'\n' || self.line.len() >= Self::MAX_LINE {
                self.emit();
            }
            if byte != b'\n' {
                self.line.push(byte);
            }
        }
    }

    fn emit(&mut self) {
        if !self.line.is_empty() {
            let text = String::from_utf8_lossy(&self.line);
            tracing::info!(plugin = %self.output.plugin, stream = self.output.stream, "{}", text.trim_end());
            self.line.clear();
        }
    }
}

impl tokio::io::AsyncWrite for LineLogger {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.take(bytes);
        std::task::Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.emit();
        std::task::Poll::Ready(Ok(()))
    }
}

impl StoreState {
    /// Runs `f` with `request` as the current request of this store.
    pub fn with_request<R>(
        store: &mut Store<StoreState>,
        request: &CurrentRequest,
        f: impl FnOnce(&mut Store<StoreState>) -> R,
    ) -> R {
        store.data_mut().current = LentRequest(request);
        let result = f(store);
        store.data_mut().current = LentRequest::NONE;
        result
    }

    fn request(&self) -> Option<&CurrentRequest> {
        // SAFETY: non-null only inside `with_request`, whose borrow outlives the call.
        unsafe { self.current.0.as_ref() }
    }

    fn head(&self) -> Option<&crate::request::RequestHead> {
        self.request()?.head.as_ref()
    }

    fn client(&self) -> Option<SocketAddr> {
        self.request()?.client
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl self::fulcrum::plugin::host::Host for StoreState {
    fn in_flight_all(&mut self) -> Vec<u32> {
        self.backends.iter().map(|b| b.state.in_flight()).collect()
    }

    fn in_flight_four(&mut self, first: u32) -> (u32, u32, u32, u32) {
        let backends = &self.backends;
        let count = |i: u32| {
            backends
                .get(first.saturating_add(i) as usize)
                .map_or(0, |b| b.state.in_flight())
        };
        (count(0), count(1), count(2), count(3))
    }

    fn in_flight(&mut self, id: u32) -> u32 {
        self.backends.get(id as usize).map_or(0, |b| b.state.in_flight())
    }

    fn next_ticket(&mut self, slot: u32) -> u64 {
        self.tickets
            .get(slot as usize)
            .map_or(0, |counter| counter.fetch_add(1, Ordering::Relaxed))
    }

    fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.plugin_name;
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl self::fulcrum::plugin::request::Host for StoreState {
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

/// The engine and linker every plugin shares; built once per process.
pub struct Runtime {
    pub engine: Engine,
    pub linker: Linker<StoreState>,
}

impl Runtime {
    /// The process-wide runtime. The epoch ticker thread starts with it.
    pub fn get() -> &'static Runtime {
        static RUNTIME: OnceLock<Runtime> = OnceLock::new();
        RUNTIME.get_or_init(|| Runtime::new().unwrap_or_else(|e| panic!("the Wasm engine cannot start: {e:#}")))
    }

    fn new() -> wasmtime::Result<Runtime> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        Balancer::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)?;
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        shadow_blocking_output(&mut linker)?;

        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("fulcrum-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(wasmtime::Error::msg)?;
        Ok(Runtime { engine, linker })
    }

    /// Compiles a component (seconds for large guests: never on the request path).
    pub fn compile(&self, bytes: &[u8]) -> wasmtime::Result<Component> {
        Component::new(&self.engine, bytes)
    }

    /// Checks a compiled component implements the balancer world and pre-links it.
    pub fn link(&self, component: &Component) -> wasmtime::Result<BalancerPre<StoreState>> {
        BalancerPre::new(self.linker.instantiate_pre(component)?)
    }

    pub fn new_store(&self, state: StoreState) -> Store<StoreState> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store
    }
}

/// Turns a `Duration` deadline into epoch ticks (at least one).
pub fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_micros().div_ceil(EPOCH_TICK.as_micros())).max(1) as u64
}

//! The engine every plugin shares: wasmtime's engine and epoch ticker,
//! compilation, the linker every world starts from (a confined WASI), and the
//! per-store host state: limits, log output and the request lent for a call.

use crate::backend::{Backend, BackendList};
use crate::http::ClientAddr;
use crate::http::h1::ResponseHead;
use crate::http::request::RequestHead;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::{DynOutputStream, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// How often the epoch ticks; a call's deadline is counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Counters shared by every instance of a plugin in one pool (`next-ticket`).
pub const TICKET_SLOTS: usize = 16;
pub type Tickets = Arc<[AtomicU64; TICKET_SLOTS]>;

/// The request a plugin call is about: its head (borrowed from the front
/// end, which keeps it for the access log), who sent it, and what the route
/// and its filters added.
pub struct CurrentRequest<'a> {
    pub head: &'a RequestHead,
    /// The client as resolved (trusted proxies, PROXY protocol).
    pub client: SocketAddr,
    /// The connection it came on: the TCP peer, TLS.
    pub connection: &'a ClientAddr,
    /// The body's first bytes (the route's `body_prefix`), empty without one.
    pub body_prefix: &'a [u8],
    /// Header edits and metadata from the route's filters so far.
    pub changes: &'a super::RequestChanges,
    /// The pool it goes to.
    pub pool: &'a str,
}

impl CurrentRequest<'_> {
    /// The TCP peer: the proxy that sent a PROXY header, else the client.
    pub fn peer(&self) -> SocketAddr {
        self.connection
            .edge
            .as_deref()
            .and_then(|edge| edge.proxied_by)
            .unwrap_or(self.connection.addr)
    }
}

/// The current request as the store sees it: a pointer set for the length of
/// one call and cleared after, so the request is lent to the plugin without
/// being copied or moved.
pub struct LentRequest(*const CurrentRequest<'static>, *const ResponseHead);

// SAFETY: the pointer is only dereferenced by host functions running inside
// the call that lent it, on the lending thread, while the lender's borrow lives.
unsafe impl Send for LentRequest {}
unsafe impl Sync for LentRequest {}

impl LentRequest {
    const NONE: LentRequest = LentRequest(std::ptr::null(), std::ptr::null());
}

impl StoreState {
    /// Runs `f` with `request` as the current request of this store. The
    /// pointer is cleared by a guard, so it never outlives the borrow, even
    /// when `f` unwinds.
    pub fn with_request<R>(
        store: &mut Store<StoreState>,
        request: &CurrentRequest<'_>,
        response: Option<&ResponseHead>,
        f: impl FnOnce(&mut Store<StoreState>) -> R,
    ) -> R {
        /// Clears the lent request when dropped.
        struct Lent<'a>(&'a mut Store<StoreState>);
        impl Drop for Lent<'_> {
            fn drop(&mut self) {
                self.0.data_mut().current = LentRequest::NONE;
            }
        }
        // The lifetime is erased here and the borrow's end is kept by the guard.
        store.data_mut().current = LentRequest(
            std::ptr::from_ref(request).cast::<CurrentRequest<'static>>(),
            response.map_or(std::ptr::null(), std::ptr::from_ref),
        );
        let lent = Lent(store);
        f(lent.0)
    }

    pub(super) fn request(&self) -> Option<&CurrentRequest<'_>> {
        // SAFETY: non-null only inside `with_request`, whose borrow outlives the call.
        unsafe { self.current.0.as_ref() }
    }

    pub(super) fn response(&self) -> Option<&ResponseHead> {
        // SAFETY: as for the request.
        unsafe { self.current.1.as_ref() }
    }

    pub(super) fn head(&self) -> Option<&RequestHead> {
        self.request().map(|r| r.head)
    }

    pub(super) fn client(&self) -> Option<SocketAddr> {
        self.request().map(|r| r.client)
    }

    /// The backend with plugin id `id` in the list last pushed.
    pub(super) fn backend_by_id(&self, id: u32) -> Option<&Backend> {
        let index = *self.index_of.get(id as usize)?;
        self.backends.get(index as usize).map(|b| &**b)
    }

    /// One past the highest plugin id in the list last pushed.
    pub(super) fn id_bound(&self) -> usize {
        self.index_of.len()
    }

    /// Makes `backends` the list plugin ids refer to.
    pub(super) fn push_backends(&mut self, backends: &BackendList) {
        self.backends = backends.clone();
        self.index_of.clear();
        for (index, backend) in backends.iter().enumerate() {
            let id = backend.id as usize;
            if self.index_of.len() <= id {
                self.index_of.resize(id + 1, u32::MAX);
            }
            self.index_of[id] = index as u32;
        }
    }

    /// The index in the pushed list of the backend with plugin id `id`.
    pub(super) fn index_of(&self, id: u32) -> Option<usize> {
        self.index_of
            .get(id as usize)
            .filter(|&&i| i != u32::MAX)
            .map(|&i| i as usize)
    }
}

/// Per-store (per-instance) host state.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: PeakLimits,
    current: LentRequest,
    /// The backend list last pushed with `set-backends`, and for each plugin
    /// id its index there (`u32::MAX`: none).
    pub(super) backends: BackendList,
    index_of: Vec<u32>,
    /// What the pool's decisions see (panic mode, slow start).
    pub view: super::PoolView,
    pub tickets: Tickets,
    /// The plugin's keyed shared state (by plugin name).
    pub shared: Arc<dyn super::shared::SharedStore>,
    /// The `random` interface's generator state.
    pub random: u64,
    pub plugin_name: Arc<str>,
    /// The signal `backends.prefetch` named: its first batch is read for
    /// every decision and passed as the `hint`.
    pub prefetch: Option<u32>,
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
            limits: PeakLimits {
                limits: StoreLimitsBuilder::new()
                    .memory_size(memory_limit)
                    // A Rust component is one core instance; Python's and
                    // JavaScript's (componentize-py, componentize-js) link a
                    // dozen (the interpreter, libc, adapters).
                    .instances(64)
                    .tables(64)
                    .memories(16)
                    .trap_on_grow_failure(true)
                    .build(),
                peak_memory: 0,
            },
            current: LentRequest::NONE,
            backends: Arc::from(Vec::new()),
            index_of: Vec::new(),
            view: super::PoolView::default(),
            tickets,
            shared: super::shared::store_of(&plugin_name),
            random: instance_seed(),
            plugin_name,
            prefetch: None,
        }
    }
}

/// The seed of `random` for plugins started from now on; 0 for a different
/// one per instance (`fulcrum plugin test --seed` sets it).
static RANDOM_SEED: AtomicU64 = AtomicU64::new(0);

/// Makes instances started from now on draw the same numbers for `seed`.
pub fn seed_random(seed: u64) {
    RANDOM_SEED.store(seed, std::sync::atomic::Ordering::Relaxed);
}

fn instance_seed() -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    static INSTANCES: AtomicU64 = AtomicU64::new(0);
    let seed = RANDOM_SEED.load(Relaxed);
    if seed != 0 {
        return seed;
    }
    let n = INSTANCES.fetch_add(1, Relaxed);
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (clock ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// A plugin's stdout or stderr, written to the log a line at a time, on the
/// request path too: the blocking stream calls a guest's `print` makes are
/// answered by Fulcrum's own synchronous host functions (see
/// [`confine_wasi`]), since wasmtime-wasi's run through `Handle::block_on`,
/// which cannot run inside a worker's runtime.
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

/// Makes every WASI call a plugin can make return at once, the same way on a
/// worker's event loop and outside any runtime (`fulcrum check`, start-up).
///
/// wasmtime-wasi's synchronous bindings run the functions that may wait
/// (`wasi:io/poll`, the `blocking-*` stream methods, some socket calls and the
/// stream destructors) through `Handle::block_on`: inside a worker's runtime
/// that panics ("Cannot start a runtime from within a runtime"), and outside
/// one it blocks. Shadowed here:
/// - output (`blocking-write-and-flush`, `blocking-flush`,
///   `blocking-write-zeroes-and-flush`, the destructors): done at once, since
///   plugin output streams never block;
/// - waiting (`poll`, `pollable.block`, `blocking-read`, `blocking-skip`,
///   `blocking-splice`): done when it needs no wait, else a trap saying a
///   plugin may not block (a fault, served by the fallback); `pollable.ready`
///   polls once;
/// - sockets that would bind or listen, and UDP sockets: `access-denied`, as
///   connecting and name lookups already are (the context allows no network).
///
/// The filesystem needs nothing: with no preopened directory a plugin holds
/// no descriptor to call a method on.
fn confine_wasi(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    use wasmtime::component::{Resource, ResourceType, Val};
    use wasmtime_wasi::p2::bindings::sync::io::streams::StreamError as WitStreamError;
    use wasmtime_wasi::p2::{DynInputStream, DynPollable, StreamError};
    use wasmtime_wasi_io::bindings::wasi::io::poll::{Host as _, HostPollable as _};
    type Output = Resource<DynOutputStream>;
    type Input = Resource<DynInputStream>;
    type Poll = Resource<DynPollable>;

    fn write_and_flush(
        table: &mut ResourceTable,
        stream: &Output,
        bytes: Vec<u8>,
    ) -> wasmtime::Result<Result<(), WitStreamError>> {
        let stream = table.get_mut(stream)?;
        let written = stream.write(bytes::Bytes::from(bytes)).and_then(|()| stream.flush());
        Ok(written.map_err(|_| WitStreamError::Closed))
    }

    /// What a read that must not wait gives: data, the end, or a trap.
    fn read_at_once<T: Default + PartialEq>(
        function: &str,
        wanted: u64,
        read: Result<T, StreamError>,
    ) -> wasmtime::Result<Result<T, WitStreamError>> {
        match read {
            Ok(got) if got == T::default() && wanted > 0 => Err(would_block(function)),
            Ok(got) => Ok(Ok(got)),
            Err(StreamError::Trap(error)) => Err(error),
            Err(StreamError::Closed | StreamError::LastOperationFailed(_)) => Ok(Err(WitStreamError::Closed)),
        }
    }

    /// Largest read served at once; a guest asking for more gets less, as WASI allows.
    const READ_MAX: u64 = 64 * 1024;

    linker.allow_shadowing(true);
    let mut streams = linker.instance(WASI_IO_STREAMS)?;
    streams.resource(
        "output-stream",
        ResourceType::host::<DynOutputStream>(),
        |mut store, rep| {
            store.data_mut().table.delete(Output::new_own(rep))?;
            Ok(())
        },
    )?;
    streams.resource(
        "input-stream",
        ResourceType::host::<DynInputStream>(),
        |mut store, rep| {
            store.data_mut().table.delete(Input::new_own(rep))?;
            Ok(())
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-and-flush",
        |mut store, (stream, bytes): (Output, Vec<u8>)| {
            Ok((write_and_flush(&mut store.data_mut().table, &stream, bytes)?,))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-zeroes-and-flush",
        |mut store, (stream, len): (Output, u64)| {
            let zeroes = vec![0; len.min(READ_MAX) as usize];
            Ok((write_and_flush(&mut store.data_mut().table, &stream, zeroes)?,))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-flush",
        |mut store, (stream,): (Output,)| Ok((write_and_flush(&mut store.data_mut().table, &stream, Vec::new())?,)),
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-splice",
        |_store, (_to, _from, _len): (Output, Input, u64)| -> wasmtime::Result<(Result<u64, WitStreamError>,)> {
            Err(would_block("wasi:io/streams output-stream.blocking-splice"))
        },
    )?;
    streams.func_wrap(
        "[method]input-stream.blocking-read",
        |mut store, (stream, len): (Input, u64)| {
            let stream = store.data_mut().table.get_mut(&stream)?;
            let read = stream.read(len.min(READ_MAX) as usize).map(|bytes| bytes.to_vec());
            Ok((read_at_once("wasi:io/streams input-stream.blocking-read", len, read)?,))
        },
    )?;
    streams.func_wrap(
        "[method]input-stream.blocking-skip",
        |mut store, (stream, len): (Input, u64)| {
            let stream = store.data_mut().table.get_mut(&stream)?;
            let skipped = stream.skip(len.min(READ_MAX) as usize).map(|n| n as u64);
            Ok((read_at_once(
                "wasi:io/streams input-stream.blocking-skip",
                len,
                skipped,
            )?,))
        },
    )?;

    let mut poll = linker.instance(WASI_IO_POLL)?;
    poll.func_wrap("poll", |mut store, (list,): (Vec<Poll>,)| {
        let table = &mut store.data_mut().table;
        match poll_once(table.poll(list)) {
            Some(ready) => Ok((ready?,)),
            None => Err(would_block("wasi:io/poll poll")),
        }
    })?;
    poll.func_wrap("[method]pollable.block", |mut store, (pollable,): (Poll,)| {
        let table = &mut store.data_mut().table;
        match poll_once(table.block(pollable)) {
            Some(done) => done,
            None => Err(would_block("wasi:io/poll pollable.block")),
        }
    })?;
    poll.func_wrap("[method]pollable.ready", |mut store, (pollable,): (Poll,)| {
        let table = &mut store.data_mut().table;
        Ok((poll_once(table.ready(pollable)).unwrap_or(Ok(false))?,))
    })?;

    for (interface, function) in [
        (WASI_SOCKETS_TCP, "[method]tcp-socket.start-bind"),
        (WASI_SOCKETS_TCP, "[method]tcp-socket.start-listen"),
        (WASI_SOCKETS_UDP, "[method]udp-socket.start-bind"),
        (WASI_SOCKETS_UDP, "[method]udp-socket.stream"),
        (WASI_SOCKETS_UDP_CREATE, "create-udp-socket"),
    ] {
        linker
            .instance(interface)?
            .func_new(function, |_store, _type, _params, results| {
                let denied = Val::Enum("access-denied".into());
                if let Some(result) = results.first_mut() {
                    *result = Val::Result(Err(Some(Box::new(denied))));
                }
                Ok(())
            })?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// The trap of a WASI call that would have to wait.
fn would_block(function: &str) -> wasmtime::Error {
    wasmtime::Error::msg(format!(
        "plugins may not block: {function} would wait (a sleep, a socket or input), which would stall every request on the worker"
    ))
}

/// Polls `future` once, inside a tokio runtime (a WASI pollable may be a
/// tokio timer): its output if it is ready now.
fn poll_once<F: std::future::Future>(future: F) -> Option<F::Output> {
    let poll = || {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(future).poll(&mut cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        return poll();
    }
    // Outside any runtime (`fulcrum check`, start-up): a small one of our own, never run,
    // so that a timer can be polled the same way as on a worker.
    static OUTSIDE: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    let runtime = OUTSIDE.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().ok());
    match runtime {
        Some(runtime) => {
            let _entered = runtime.enter();
            poll()
        }
        None => None,
    }
}

/// The WASI interface versions wasmtime-wasi 48 defines (guests importing
/// any 0.2.x resolve to them).
const WASI_IO_STREAMS: &str = "wasi:io/streams@0.2.12";
const WASI_IO_POLL: &str = "wasi:io/poll@0.2.12";
const WASI_SOCKETS_TCP: &str = "wasi:sockets/tcp@0.2.12";
const WASI_SOCKETS_UDP: &str = "wasi:sockets/udp@0.2.12";
const WASI_SOCKETS_UDP_CREATE: &str = "wasi:sockets/udp-create-socket@0.2.12";

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

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A store's limits (`memory_limit` and a few counts), remembering the most
/// linear memory an instance reached: what `fulcrum plugin check` reports.
pub struct PeakLimits {
    limits: StoreLimits,
    /// Bytes: the largest memory size allowed so far.
    pub peak_memory: usize,
}

impl wasmtime::ResourceLimiter for PeakLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.peak_memory = self.peak_memory.max(desired);
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// The engine every plugin shares; built once per process.
pub struct Runtime {
    pub engine: Engine,
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
        Ok(Runtime { engine })
    }

    /// Compiles a component, or loads it from the compile cache (compiling
    /// takes seconds for large guests: never on the request path).
    pub fn compile(&self, name: &str, bytes: &[u8]) -> wasmtime::Result<Component> {
        super::cache::compile(&self.engine, name, bytes)
    }

    /// A linker with a confined WASI and the imports `add` puts in: a
    /// world's own (each world builds one, once).
    pub fn linker(
        &self,
        add: impl FnOnce(&mut Linker<StoreState>) -> wasmtime::Result<()>,
    ) -> wasmtime::Result<Linker<StoreState>> {
        let mut linker = Linker::new(&self.engine);
        add(&mut linker)?;
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        confine_wasi(&mut linker)?;
        Ok(linker)
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

/// A wasmtime error on one line, for a log field or a refusal: its causes
/// joined by `: `, without the wasm backtrace, and with what a deadline or a
/// memory cap means in the config's words.
pub fn one_line(e: &wasmtime::Error) -> String {
    let mut line = e
        .chain()
        .map(|cause| cause.to_string())
        // wasmtime puts the guest's backtrace in a context of its own: frame
        // numbers and offsets that mean nothing in a log line.
        .filter(|text| !text.starts_with("error while executing at wasm backtrace"))
        .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(": ");
    if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
        line.push_str(" (the call ran past its call_timeout)");
    }
    if line.contains("forcing trap when growing memory") {
        line.push_str(" (it needs more than its memory_limit)");
    }
    line
}

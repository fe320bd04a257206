//! Quickstart: three demo backends and Fulcrum in front of them, all in one
//! process, configured by `examples/quickstart.toml`.
//!
//! ```text
//! cargo run --release --example quickstart
//! curl -s localhost:8080     # backend-1, backend-2, backend-3, backend-1, ...
//! ```

use anyhow::Context;
use fulcrum::config::Config;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.toml");
    let config = Config::load(&path)?;
    let ports: Vec<u16> = config
        .pools
        .values()
        .flat_map(|p| p.backends.iter().map(|b| b.socket.port()))
        .collect();
    // The demo backends run on a runtime of their own, beside the balancer's.
    let backends_runtime = tokio::runtime::Runtime::new().context("cannot start the demo backends' runtime")?;
    let backends = backends_runtime
        .block_on(fulcrum::demo::start(&ports, &[]))
        .context("cannot start the demo backends")?;
    for backend in &backends {
        tracing::info!(addr = %backend.addr, "demo backend listening");
    }
    if let Some(listener) = config.server.listeners.first() {
        tracing::info!(
            "try: curl -s http://{}/  (edit examples/quickstart.toml to change the policy live; Ctrl-C stops)",
            listener.listen
        );
    }
    // The balancer itself starts exactly as `fulcrum run` starts it.
    fulcrum::root::run(&path, fulcrum::root::stop_signal())
}

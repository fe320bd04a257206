//! Quickstart: three demo backends and Fulcrum in front of them, all in one
//! process, configured by `examples/quickstart.toml`.
//!
//! ```text
//! cargo run --release --example quickstart
//! curl -s localhost:8080     # backend-1, backend-2, backend-3, backend-1, ...
//! ```

use anyhow::Context;
use fulcrum::app::App;
use fulcrum::config::Config;
use std::path::PathBuf;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    let backends = fulcrum::demo::start(&ports, &[])
        .await
        .context("cannot start the demo backends")?;
    for backend in &backends {
        tracing::info!(addr = %backend.addr, "demo backend listening");
    }
    let listen = config.server.listen;
    let app = tokio::task::spawn_blocking(move || App::new(config)).await??;
    app.start_health_checks(tokio::runtime::Handle::current());
    app.watch_plugins()?;
    app.watch_config(&path)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        "try: curl -s http://{listen}/  (edit examples/quickstart.toml to change the policy live; Ctrl-C stops)"
    );
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    fulcrum::server::serve(app, listener, stop).await;
    Ok(())
}

//! The `fulcrum` command line: parse arguments, load the config, run or check.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fulcrum::app::App;
use fulcrum::config::Config;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Fulcrum, an HTTP load balancer whose backend choice is made by WebAssembly
/// components (built-in: round-robin, least-conn; or your own NAME.wasm in the
/// plugin directory, hot-reloaded).
#[derive(Parser)]
#[command(
    name = "fulcrum",
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  fulcrum check --config fulcrum.toml\n  RUST_LOG=fulcrum=debug fulcrum run --config fulcrum.toml\n  fulcrum --log-format json run -c fulcrum.toml\n\nThe config keys, the plugin interface (wit/) and a guide to writing a policy are in README.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format. The filter comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer. The config file and the plugin directory are watched
    /// and reloaded live; SIGINT or SIGTERM stops it gracefully.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config and load every plugin it names, then exit:
    /// 0 when it would run, 1 with the reason when not.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fulcrum: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let app = App::new(config)?;
    let snapshot = app.snapshot();
    for pool in &snapshot.pools {
        println!(
            "pool {}: policy {} over {} backends",
            pool.name,
            pool.policy.plugin_name(),
            pool.backends.len()
        );
    }
    println!("{}: ok", path.display());
    Ok(())
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let listen = config.server.listen;
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // Bound here, before anything starts, so a taken port is reported at once;
    // listening starts once plugins, watchers and checks are ready.
    let sockets = (0..workers)
        .map(|_| fulcrum::server::bind_reuseport(listen))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("{}: server.listen: cannot listen on {listen}", path.display()))?;
    let admin = config
        .server
        .admin
        .map(|admin| {
            std::net::TcpListener::bind(admin)
                .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
                .with_context(|| format!("{}: server.admin: cannot listen on {admin}", path.display()))
        })
        .transpose()?;
    let app = App::new(config)?;

    // The control runtime: signals, admin API, health checks. Requests are
    // served by the workers' runtimes.
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    control.block_on(async move {
        app.start_health_checks(tokio::runtime::Handle::current());
        fulcrum::memory::start_trimmer();
        if let Some(admin) = admin {
            let listener = tokio::net::TcpListener::from_std(admin).context("cannot use the admin listener")?;
            tracing::info!(admin = %listener.local_addr()?, "admin API listening");
            tokio::spawn(fulcrum::admin::serve(Arc::clone(&app), listener));
        }
        app.watch_plugins().context("cannot watch the plugin directory")?;
        app.watch_config(path).context("cannot watch the config file")?;

        let listeners = sockets
            .into_iter()
            .map(fulcrum::server::listen)
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("{}: server.listen: cannot listen on {listen}", path.display()))?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let threads =
            fulcrum::server::spawn_workers(&app, listeners, stopped).context("cannot start worker threads")?;
        tracing::info!(%listen, workers, pools = app.snapshot().pools.len(), "fulcrum is serving");
        stop_signal().await;
        stop.send_replace(true);
        let drained = tokio::task::spawn_blocking(move || threads.into_iter().all(|t| t.join().unwrap_or(false)))
            .await
            .unwrap_or(false);
        if drained {
            tracing::info!("stopped");
        } else {
            tracing::warn!("stopped with requests still in flight after the grace period");
        }
        Ok(())
    })
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot listen for stop signals; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

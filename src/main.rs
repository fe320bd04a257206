//! The `fulcrum` command line: parse arguments, load the config, run or check.

use clap::{Parser, Subcommand, ValueEnum};
use fulcrum::app::App;
use fulcrum::config::Config;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
        Command::Run { config } => fulcrum::root::run(&config, fulcrum::root::stop_signal()),
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
    for listener in &config.server.listeners {
        // TLS files read and checked as `run` would.
        fulcrum::server::Listener::new(listener).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
    }
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

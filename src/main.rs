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
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Make a folder NAME with a working balancer to start from (and its
    /// build script and README) in Rust, Python or JavaScript.
    New {
        /// rust, python or js.
        #[arg(long, default_value = "rust")]
        lang: String,
        /// The plugin's name: the folder, and NAME.wasm.
        name: String,
        /// Where to make the folder.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Compile a component, list its imports and exports, link it (as a
    /// balancer, a filter or both), run its `init`, and make smoke calls
    /// against a sample pool and requests (timed): exit 0 when it would
    /// load, 1 with the reason when not.
    Check {
        /// The component (NAME.wasm).
        file: PathBuf,
        /// The use's config, as JSON (a pool's `policy_config`, a filter's `config`).
        #[arg(long, default_value = "{}")]
        config: String,
        /// Smoke calls to make.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
        calls: u32,
        /// CPU deadline of one call, as `[plugins] call_timeout` (whose default this is).
        #[arg(long, default_value = "5ms")]
        call_timeout: humantime::Duration,
        /// The pools a filter may send requests to, comma-separated (the
        /// config's pool names, for a filter that overrides the pool).
        #[arg(long, value_delimiter = ',', default_value = "sample")]
        pools: Vec<String>,
    },
    /// Exercise a policy over synthetic pools: its split (max/mean), whether
    /// it is deterministic, the share of keys remapped when a backend is
    /// removed, added or goes unhealthy, and its cost per decision.
    Test {
        /// The component (NAME.wasm).
        file: PathBuf,
        /// The pool's `policy_config`, as JSON.
        #[arg(long, default_value = "{}")]
        config: String,
        /// Backends in the pool (default 4, or as many as --weights gives).
        #[arg(long, value_parser = clap::value_parser!(u16).range(2..))]
        backends: Option<u16>,
        /// Their weights, comma-separated (default: all 1).
        #[arg(long)]
        weights: Option<String>,
        /// Distinct requests (keys: own x-user header, path and client address).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
        keys: u32,
        /// CPU deadline of one call: generous by default, as this measures
        /// behaviour, not deadlines (a busy machine can stall a call).
        #[arg(long, default_value = "1s")]
        call_timeout: humantime::Duration,
        /// The seed of the plugin's `random` interface: a run repeats exactly.
        #[arg(long, default_value_t = 1)]
        seed: u64,
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
        Command::Plugin(PluginCommand::New { lang, name, dir }) => plugin_new(&dir, &name, &lang),
        Command::Plugin(PluginCommand::Check {
            file,
            config,
            calls,
            call_timeout,
            pools,
        }) => plugin_check(
            &file,
            &config,
            &fulcrum::plugin::check::Smoke {
                calls: calls as usize,
                limits: fulcrum::plugin::Limits {
                    call_timeout: call_timeout.into(),
                    ..fulcrum::plugin::check::DEFAULT_LIMITS
                },
                pools,
            },
        ),
        Command::Plugin(PluginCommand::Test {
            file,
            config,
            backends,
            weights,
            keys,
            call_timeout,
            seed,
        }) => plugin_test(
            &file,
            config,
            backends.map(usize::from),
            weights.as_deref(),
            keys as usize,
            call_timeout.into(),
            seed,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fulcrum: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn plugin_new(dir: &Path, name: &str, lang: &str) -> anyhow::Result<()> {
    use fulcrum::plugin::scaffold;
    let lang =
        scaffold::Lang::parse(lang).ok_or_else(|| anyhow::anyhow!("--lang {lang}: expected rust, python or js"))?;
    let files = scaffold::new(dir, name, lang)?;
    for file in &files {
        println!("{}", file.display());
    }
    println!("made {}: see its README.md", dir.join(name).display());
    Ok(())
}

fn plugin_check(file: &Path, config: &str, smoke: &fulcrum::plugin::check::Smoke) -> anyhow::Result<()> {
    use fulcrum::plugin::check;
    fulcrum::config::check_call_timeout("--call-timeout", smoke.limits.call_timeout)
        .map_err(|(key, reason)| anyhow::anyhow!("{key}: {reason}, as [plugins] call_timeout"))?;
    match check::check(file, config, smoke) {
        Ok(report) => {
            for line in report.lines {
                println!("{line}");
            }
            println!("{}: ok", file.display());
            Ok(())
        }
        Err(failed) => {
            for line in &failed.report.lines {
                println!("{line}");
            }
            anyhow::bail!("{}: {} failed: {}", file.display(), failed.step, failed.reason)
        }
    }
}

fn plugin_test(
    file: &Path,
    config: String,
    backends: Option<usize>,
    weights: Option<&str>,
    keys: usize,
    call_timeout: std::time::Duration,
    seed: u64,
) -> anyhow::Result<()> {
    use fulcrum::plugin::check;
    let weights: Vec<u32> = match weights {
        None => vec![1; backends.unwrap_or(4)],
        Some(list) => list
            .split(',')
            .map(|w| w.trim().parse::<u32>().ok().filter(|&w| w >= 1))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow::anyhow!("--weights: each at least 1, comma-separated (e.g. 1,1,2)"))?,
    };
    if let Some(backends) = backends
        && weights.len() != backends
    {
        anyhow::bail!(
            "--backends {backends} and --weights with {} weights disagree: give one of them",
            weights.len()
        );
    }
    let plan = check::TestPlan {
        config,
        weights,
        keys: keys.max(1),
        seed,
    };
    let limits = fulcrum::plugin::Limits {
        call_timeout,
        ..check::DEFAULT_LIMITS
    };
    match check::test(file, &plan, limits) {
        Ok(report) => {
            for line in report.lines {
                println!("{line}");
            }
            Ok(())
        }
        Err(failed) => anyhow::bail!("{}: {} failed: {}", file.display(), failed.step, failed.reason),
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
    for (name, filter) in &snapshot.config.filters {
        let routes = snapshot
            .config
            .routes
            .iter()
            .filter(|route| route.filters.contains(name))
            .count();
        println!(
            "filter {name}: plugin {} on {routes} route(s), on_fault {}",
            filter.plugin,
            match filter.on_fault {
                fulcrum::plugin::OnFault::Allow => "allow",
                fulcrum::plugin::OnFault::Deny => "deny",
            }
        );
    }
    println!("{}: ok", path.display());
    Ok(())
}

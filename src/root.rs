//! The composition root: everything `fulcrum run` starts, in order, in one
//! place that the binary and the quickstart example both call.

use crate::app::App;
use crate::config::Config;
use anyhow::Context;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

/// Loads the config at `path`, starts the balancer (workers, health checks,
/// admin API, watchers of the config file and the plugin directory, memory
/// trimmer) and serves until `stop` completes, then stops gracefully.
/// Must be called outside any async runtime: it runs its own.
pub fn run(path: &Path, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // Each use of a plugin starts an instance per worker in the background.
    crate::plugin::prepare_for_workers(workers);
    // TLS files are read before anything binds: a bad one stops the start
    // with its reason.
    let listeners = config
        .server
        .listeners
        .iter()
        .map(|listener| crate::server::Listener::new(listener).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
    // Bound here, before anything starts, so a taken port is reported at once;
    // listening starts once plugins, watchers and checks are ready. Each
    // worker has a socket of its own on every listener.
    let sockets = (0..workers)
        .map(|_| {
            listeners
                .iter()
                .map(|listener| {
                    let listen = listener.config.listen;
                    crate::server::bind_reuseport(listen).with_context(|| {
                        format!("{}: {}: cannot listen on {listen}", path.display(), listener.config.key)
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
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
    // The first requests find the plugins' instances started (a Python or
    // JavaScript one takes milliseconds to start).
    app.snapshot().wait_for_instances(std::time::Duration::from_secs(10));
    // Calibrates the request records' clock now rather than on the first request.
    let _ = quanta::Instant::now();

    // The control runtime: signals, admin API, health checks. Requests are
    // served by the workers' runtimes.
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    control.block_on(async move {
        // Polled once now, so that the stop signals' handlers are in place
        // before anything listens: a SIGINT sent as soon as the port answers
        // must stop Fulcrum gracefully, not kill it (the default action).
        let mut stop = std::pin::pin!(stop);
        let stopped_already =
            std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(stop.as_mut(), cx).is_ready()))
                .await;
        app.start_health_checks(tokio::runtime::Handle::current());
        crate::memory::start_trimmer();
        if let Some(admin) = admin {
            let listener = tokio::net::TcpListener::from_std(admin).context("cannot use the admin listener")?;
            tracing::info!(admin = %listener.local_addr()?, "admin API listening");
            tokio::spawn(crate::admin::serve(Arc::clone(&app), listener));
        }
        app.watch(path)
            .context("cannot watch the config file and the plugin directory")?;
        for terminator in listeners.iter().filter_map(|l| l.tls.as_ref()) {
            app.watch_tls(terminator)
                .with_context(|| format!("cannot watch the TLS files of {}", terminator.listener))?;
        }
        tokio::spawn(reload_on_sighup(Arc::clone(&app)));
        tokio::spawn(reopen_log_on_sigusr1());

        let sockets = sockets
            .into_iter()
            .map(|worker| worker.into_iter().map(crate::server::listen).collect())
            .collect::<std::io::Result<Vec<Vec<_>>>>()
            .context("cannot listen")?;
        let (stop_workers, stopped) = tokio::sync::watch::channel(false);
        let threads =
            crate::server::spawn_workers(&app, &listeners, sockets, stopped).context("cannot start worker threads")?;
        for listener in &listeners {
            let protocol = if listener.tls.is_some() { "https" } else { "http" };
            tracing::info!(listen = %listener.config.listen, listener = %listener.config.key, protocol, "listening");
        }
        tracing::info!(workers, pools = app.snapshot().pools.len(), "fulcrum is serving");
        if !stopped_already {
            stop.await;
        }
        stop_workers.send_replace(true);
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

/// Reloads the config file on every SIGHUP, as the file watcher and
/// `POST /reload` do (refusals are logged there).
async fn reload_on_sighup(app: Arc<App>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload through the file or the admin API");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading the config file");
        let app = app.clone();
        // A reload runs plugins' init: off the control runtime's thread.
        let _ = tokio::task::spawn_blocking(move || app.reload_file()).await;
    }
}

/// Reopens the access log on every SIGUSR1 (after `mv`, for rotation).
async fn reopen_log_on_sigusr1() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        tracing::warn!("cannot listen for SIGUSR1; the access log reopens only when its file is moved away");
        return;
    };
    while usr1.recv().await.is_some() {
        crate::access_log::reopen();
    }
}

/// SIGTERM or SIGINT.
pub async fn stop_signal() {
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

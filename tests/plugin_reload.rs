//! The drop-in plugin directory and the config file, reloaded live under load.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// A pool served by the plugin `swap` (from `plugins.d/swap.wasm`), which
/// starts as the test plugin in its default mode, "first": every request to
/// backend-1. No `policy_config`, so round robin (which takes none) takes it too.
fn swap_config(backends: &[DemoBackend]) -> String {
    format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\n[plugins]\ndir = \"plugins.d\"\n\
         [pools.web]\npolicy = \"swap\"\nbackends = {}\n",
        backends_toml(backends, &[])
    )
}

/// `fulcrum_plugin_reloads_total{result}` from the admin's `/metrics`.
async fn plugin_reloads(fulcrum: &Fulcrum, result: &str) -> f64 {
    let metrics = get(fulcrum.admin, "/metrics").await.expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let wanted = format!("fulcrum_plugin_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&wanted))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {wanted}in {text}"))
}

/// Sends requests until `wanted` holds for `run` answers in a row; returns how
/// long that took, or None after `limit`.
async fn time_until(
    addr: std::net::SocketAddr,
    run: usize,
    limit: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    let mut in_a_row = 0;
    while start.elapsed() < limit {
        let reply = get(addr, "/").await.unwrap_or_else(|e| panic!("request failed: {e}"));
        if wanted(reply.backend.as_deref().unwrap_or_default()) {
            in_a_row += 1;
            if in_a_row == run {
                return Some(start.elapsed());
            }
        } else {
            in_a_row = 0;
        }
    }
    None
}

/// Writes `bytes` straight onto `path` in `pieces` writes, `pause` after each.
async fn slow_copy(path: &std::path::Path, bytes: &[u8], pieces: usize, pause: Duration) {
    let mut file = std::fs::File::create(path).expect("open for writing");
    for piece in bytes.chunks(bytes.len().div_ceil(pieces)) {
        std::io::Write::write_all(&mut file, piece).expect("write piece");
        std::io::Write::flush(&mut file).expect("flush");
        tokio::time::sleep(pause).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_the_policy_20_times_under_load_loses_no_request() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&swap_config(&backends), &[("swap.wasm", &wasm("misbehave.wasm"))]);
    let first = std::fs::read(wasm("misbehave.wasm")).expect("misbehave.wasm");
    let rotate = std::fs::read(wasm("round_robin.wasm")).expect("round_robin.wasm");
    let target = fulcrum.plugin_dir().join("swap.wasm");
    let load = Load::start(fulcrum.addr, 6, "/slow/5");

    let mut slowest = Duration::ZERO;
    for swap in 0..20 {
        let to_rotation = swap % 2 == 0;
        install_file(&target, if to_rotation { &rotate } else { &first });
        let seen = if to_rotation {
            // Round robin shows itself as soon as anything but backend-1 answers.
            time_until(fulcrum.addr, 1, Duration::from_secs(5), |b| b != "backend-1").await
        } else {
            // "first" shows itself as a run of backend-1 that round robin cannot produce.
            time_until(fulcrum.addr, 8, Duration::from_secs(5), |b| b == "backend-1").await
        };
        let took = seen.unwrap_or_else(|| panic!("swap {swap} not visible within 5 s:\n{}", fulcrum.log()));
        slowest = slowest.max(took);
    }
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "failed requests during swaps: {errors:?}");
    assert!(ok > 100, "the load kept flowing ({ok} answers)");
    assert!(
        slowest <= Duration::from_secs(1),
        "a swap took {slowest:?} to be visible"
    );
    assert_eq!(fulcrum.log().matches("plugin loaded").count(), 21, "{}", fulcrum.log());
    assert_eq!(plugin_reloads(&fulcrum, "loaded").await, 21.0);
    assert_eq!(plugin_reloads(&fulcrum, "refused").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_plugins_are_refused_and_the_last_good_one_keeps_serving() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&swap_config(&backends), &[("swap.wasm", &wasm("misbehave.wasm"))]);
    let all_first = |replies: &[Reply]| {
        replies
            .iter()
            .all(|r| r.status == 200 && r.backend.as_deref() == Some("backend-1"))
    };
    let dir = fulcrum.plugin_dir();

    // New files: garbage, and a valid component of another world.
    install_file(&dir.join("garbage.wasm"), b"\0asm this is not a component at all");
    install_file(
        &dir.join("other.wasm"),
        &std::fs::read(wasm("wrong_world.wasm")).expect("wrong_world.wasm"),
    );
    assert!(
        fulcrum.wait_for_log("is not a valid Wasm component", Duration::from_secs(5)),
        "{}",
        fulcrum.log()
    );
    assert!(
        fulcrum.wait_for_log(
            "does not implement the fulcrum:plugin@0.2.0 world",
            Duration::from_secs(5)
        ),
        "{}",
        fulcrum.log()
    );

    // The serving plugin replaced by garbage, then by one of the wrong world.
    for (bytes, reason) in [
        (b"garbage".to_vec(), "swap.wasm"),
        (
            std::fs::read(wasm("wrong_world.wasm")).expect("wrong_world.wasm"),
            "does not implement",
        ),
    ] {
        let refusals = fulcrum.log().matches("plugin refused").count();
        install_file(&dir.join("swap.wasm"), &bytes);
        let deadline = Instant::now() + Duration::from_secs(5);
        while fulcrum.log().matches("plugin refused").count() == refusals && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = fulcrum.log();
        let refusal = log
            .lines()
            .rev()
            .find(|l| l.contains("plugin refused"))
            .unwrap_or_default();
        assert!(refusal.contains(reason), "refusal names the reason ({reason}): {log}");
        let mut replies = Vec::new();
        for _ in 0..10 {
            replies.push(get(fulcrum.addr, "/").await.expect("still serving"));
        }
        assert!(
            all_first(&replies),
            "the last good version keeps serving: {:?}",
            tally(&replies)
        );
    }

    // Removed: a warning, and the last good version keeps serving.
    std::fs::remove_file(dir.join("swap.wasm")).expect("remove");
    assert!(
        fulcrum.wait_for_log("plugin file removed", Duration::from_secs(5)),
        "{}",
        fulcrum.log()
    );
    let mut replies = Vec::new();
    for _ in 0..10 {
        replies.push(get(fulcrum.addr, "/").await.expect("still serving"));
    }
    assert!(all_first(&replies), "{:?}", tally(&replies));
    // Two new files and two replacements refused; only the first version loaded.
    assert_eq!(plugin_reloads(&fulcrum, "refused").await, 4.0);
    assert_eq!(plugin_reloads(&fulcrum, "loaded").await, 1.0);

    // A reload accepts only what a restart would: not a config naming the
    // removed plugin, though its last version keeps serving.
    let text = std::fs::read_to_string(fulcrum.config_path()).expect("config");
    install_file(
        &fulcrum.config_path(),
        format!("{text}\n# edited\nretries = 2\n").as_bytes(),
    );
    let text = std::fs::read_to_string(fulcrum.config_path()).expect("config");
    assert!(text.contains("retries = 2"));
    assert!(
        fulcrum.wait_for_log("config reload refused", Duration::from_secs(5)),
        "{}",
        fulcrum.log()
    );
    let log = fulcrum.log();
    assert!(
        log.contains("pools.web.policy") && log.contains("no swap.wasm in"),
        "{log}"
    );
    let mut replies = Vec::new();
    for _ in 0..10 {
        replies.push(get(fulcrum.addr, "/").await.expect("still serving"));
    }
    assert!(all_first(&replies), "{:?}", tally(&replies));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_plugin_is_not_loaded_as_broken() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&swap_config(&backends), &[("swap.wasm", &wasm("misbehave.wasm"))]);
    let bytes = std::fs::read(wasm("round_robin.wasm")).expect("round_robin.wasm");
    // A slow copy straight onto the file: 8 pieces, 30 ms apart.
    slow_copy(
        &fulcrum.plugin_dir().join("swap.wasm"),
        &bytes,
        8,
        Duration::from_millis(30),
    )
    .await;
    let seen = time_until(fulcrum.addr, 1, Duration::from_secs(5), |b| b != "backend-1").await;
    assert!(seen.is_some(), "the complete file was loaded: {}", fulcrum.log());
    assert!(
        !fulcrum.log().contains("plugin refused"),
        "no half-written load attempt: {}",
        fulcrum.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_copy_is_loaded_once_complete_with_no_false_refusal_and_a_rename_still_acts_at_once() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&swap_config(&backends), &[("swap.wasm", &wasm("misbehave.wasm"))]);
    let rotate = std::fs::read(wasm("round_robin.wasm")).expect("round_robin.wasm");
    // As a copy over a network share does: three writes 0.4 s apart, straight onto the name.
    let path = fulcrum.plugin_dir().join("swap.wasm");
    slow_copy(&path, &rotate, 3, Duration::from_millis(400)).await;
    let seen = time_until(fulcrum.addr, 1, Duration::from_secs(10), |b| b != "backend-1").await;
    assert!(seen.is_some(), "the complete file was loaded: {}", fulcrum.log());
    let log = fulcrum.log();
    assert!(
        !log.contains("plugin refused"),
        "no refusal of a copy in progress: {log}"
    );
    assert_eq!(log.matches("plugin loaded").count(), 2, "loaded once, complete: {log}");

    // An atomic rename takes effect at once, as before.
    let first = std::fs::read(wasm("misbehave.wasm")).expect("misbehave.wasm");
    install_file(&path, &first);
    let seen = time_until(fulcrum.addr, 8, Duration::from_secs(5), |b| b == "backend-1").await;
    let took = seen.unwrap_or_else(|| panic!("the renamed file was not loaded: {}", fulcrum.log()));
    assert!(took <= Duration::from_secs(1), "a rename took {took:?} to act");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_reloads_live_and_a_bad_one_changes_nothing() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let config = |policy: &str, list: &[DemoBackend]| {
        format!(
            "[server]\nlisten = \"{{listen}}\"\n[pools.web]\npolicy = \"{policy}\"\nbackends = {}\n",
            backends_toml(list, &[])
        )
    };
    let fulcrum = Fulcrum::start(&config("round-robin", &backends[..1]), &[]);
    let listen = format!("\"{}\"", fulcrum.addr);
    let write = |text: String| install_file(&fulcrum.config_path(), text.replace("\"{listen}\"", &listen).as_bytes());

    // Add two backends: traffic spreads to them.
    write(config("round-robin", &backends));
    let seen = time_until(fulcrum.addr, 1, Duration::from_secs(5), |b| b == "backend-3").await;
    assert!(seen.is_some(), "new backends took traffic: {}", fulcrum.log());

    // A broken config: refused with its key, the running one stays.
    write(config("round-robin", &backends).replace("policy =", "polcy ="));
    assert!(
        fulcrum.wait_for_log("config reload refused", Duration::from_secs(5)),
        "{}",
        fulcrum.log()
    );
    assert!(fulcrum.log().contains("pools.web.polcy"), "{}", fulcrum.log());
    let mut replies = Vec::new();
    for _ in 0..30 {
        replies.push(get(fulcrum.addr, "/").await.expect("still serving"));
    }
    assert_eq!(
        tally(&replies).values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{:?}",
        tally(&replies)
    );
}

/// A new plugin and the config that names it, written together: the config
/// loads the plugin itself if the watcher has not yet, so neither order of
/// the two events refuses the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_plugin_and_the_config_naming_it_dropped_together_load() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&swap_config(&backends), &[("swap.wasm", &wasm("misbehave.wasm"))]);
    let text = std::fs::read_to_string(fulcrum.config_path()).expect("config");
    for round in 0..3 {
        let name = format!("fresh{round}");
        install_file(
            &fulcrum.plugin_dir().join(format!("{name}.wasm")),
            &std::fs::read(wasm("round_robin.wasm")).expect("round_robin.wasm"),
        );
        install_file(
            &fulcrum.config_path(),
            text.replace("policy = \"swap\"", &format!("policy = \"{name}\""))
                .as_bytes(),
        );
        let seen = time_until(fulcrum.addr, 1, Duration::from_secs(5), |b| b != "backend-1").await;
        assert!(
            seen.is_some(),
            "round {round}: the new policy serves: {}",
            fulcrum.log()
        );
        // Back to the first policy for the next round.
        install_file(&fulcrum.config_path(), text.as_bytes());
        let back = time_until(fulcrum.addr, 8, Duration::from_secs(5), |b| b == "backend-1").await;
        assert!(back.is_some(), "{}", fulcrum.log());
    }
    assert!(!fulcrum.log().contains("config reload refused"), "{}", fulcrum.log());
}

/// The plugin directory replaced whole (renamed away, a new one made in its
/// place): file events follow the old directory, and the new one's files
/// are still found, by the watcher's poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_plugin_directory_is_still_watched() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&swap_config(&backends), &[("swap.wasm", &wasm("misbehave.wasm"))]);
    let dir = fulcrum.plugin_dir();
    let old = dir.with_extension("old");
    std::fs::rename(&dir, &old).expect("move the directory away");
    std::fs::create_dir(&dir).expect("a new directory");
    std::fs::copy(old.join("swap.wasm"), dir.join("swap.wasm")).expect("copy the plugin back");
    // A new version in the new directory: found within the poll's period.
    install_file(
        &dir.join("swap.wasm"),
        &std::fs::read(wasm("round_robin.wasm")).expect("round_robin.wasm"),
    );
    let seen = time_until(fulcrum.addr, 1, Duration::from_secs(8), |b| b != "backend-1").await;
    assert!(
        seen.is_some(),
        "the new directory's plugin was loaded: {}",
        fulcrum.log()
    );
}

/// A config mounted as Kubernetes mounts a ConfigMap: the file a symlink to
/// `..data/fulcrum.toml`, `..data` a symlink to a versioned folder, and an
/// update a new folder with `..data` swapped to it by a rename. No event
/// names the config file; the watcher's poll sees its new target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_behind_a_swapped_symlink_is_reloaded() {
    use std::os::unix::fs::symlink;
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let config = |list: &[DemoBackend]| {
        format!(
            "[server]\nlisten = \"{{listen}}\"\n[pools.web]\nbackends = {}\n",
            backends_toml(list, &[])
        )
    };
    let fulcrum = Fulcrum::start(&config(&backends[..1]), &[]);
    let path = fulcrum.config_path();
    let dir = path.parent().expect("config folder").to_path_buf();
    let text = |list: &[DemoBackend]| config(list).replace("{listen}", &fulcrum.addr.to_string());
    let version = |name: &str, list: &[DemoBackend]| {
        std::fs::create_dir(dir.join(name)).expect("version folder");
        std::fs::write(dir.join(name).join("fulcrum.toml"), text(list)).expect("write version");
    };
    // The same config, moved behind the two symlinks.
    version("..v1", &backends[..1]);
    symlink("..v1", dir.join("..data")).expect("..data");
    symlink("..data/fulcrum.toml", dir.join("fulcrum.toml.link")).expect("link");
    std::fs::rename(dir.join("fulcrum.toml.link"), &path).expect("the file becomes a symlink");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The update: a new folder, and ..data swapped to it in one rename.
    version("..v2", &backends);
    symlink("..v2", dir.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    let seen = time_until(fulcrum.addr, 1, Duration::from_secs(8), |b| b == "backend-3").await;
    assert!(seen.is_some(), "the new config took effect: {}", fulcrum.log());
    assert!(!fulcrum.log().contains("config reload refused"), "{}", fulcrum.log());
}

//! Builds the plugin crates (the samples in `plugins/` and the test-only ones
//! in `tests/plugins/`) for `wasm32-wasip2`, so `cargo build`, `cargo run`
//! and `cargo test` need no manual step. The built-ins are embedded with
//! `include_bytes!` from `FULCRUM_PLUGIN_WASM_DIR`.
//!
//! One cargo run per world: the SDK's features choose the world a component
//! carries, and cargo unifies features across the crates of one run, so
//! balancers, filters and plugins that are both are built apart (into the
//! same target dir, so the dependencies are built once).

use std::path::PathBuf;
use std::process::Command;

/// The plugin crates, by the world their SDK features select (the last
/// group's crates do not use the SDK).
const PLUGIN_CRATES: [&[&str]; 4] = [
    &[
        "round-robin",
        "least-conn",
        "header-hash",
        "maglev",
        "peak-ewma",
        "misbehave",
    ],
    &["rate-limit", "canary"],
    &["probe"],
    &["wrong-world", "counter"],
];

fn main() {
    for watched in ["plugins", "wit", "tests/plugins", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // A target dir of its own, so this build never waits on the outer build's lock.
    let target_dir = out.join("wasm");

    for group in PLUGIN_CRATES {
        build_group(&cargo, &root, &target_dir, group);
    }
    let wasm_dir = target_dir.join("wasm32-wasip2").join("plugin");
    println!("cargo:rustc-env=FULCRUM_PLUGIN_WASM_DIR={}", wasm_dir.display());
}

/// Builds `crates` in one cargo run.
fn build_group(cargo: &str, root: &std::path::Path, target_dir: &std::path::Path, crates: &[&str]) {
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--profile",
            "plugin",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    for name in crates {
        command.args(["-p", name]);
    }
    // The outer build's settings are for the host target; they must not leak in.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        command.env_remove(var);
    }
    let output = command.output().expect("cannot run cargo to build the plugins");
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("wasm32-wasip2")
            && (stderr.contains("target may not be installed")
                || stderr.contains("can't find crate for `core`")
                || stderr.contains("can't find crate for `std`"))
        {
            "\nThe wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`."
        } else {
            ""
        };
        panic!("building the plugins for wasm32-wasip2 failed:\n{stderr}{hint}");
    }
}

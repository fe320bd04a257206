//! `fulcrum plugin new --lang rust|python|js NAME`: a folder with a working
//! balancer to start from, its build script and a README, which builds and
//! passes `fulcrum plugin check` as it is. Everything it needs travels in the
//! binary: the WIT package, the Rust SDK, and the Python and JavaScript
//! examples (the same files the repository builds and tests).

use std::path::{Path, PathBuf};

/// The WIT package, file by file (a unit test keeps this list equal to `wit/`).
pub const WIT: [(&str, &str); 11] = [
    ("backends.wit", include_str!("../../wit/backends.wit")),
    ("clock.wit", include_str!("../../wit/clock.wit")),
    ("lifecycle.wit", include_str!("../../wit/lifecycle.wit")),
    ("log.wit", include_str!("../../wit/log.wit")),
    ("policy.wit", include_str!("../../wit/policy.wit")),
    ("random.wit", include_str!("../../wit/random.wit")),
    ("request-filter.wit", include_str!("../../wit/request-filter.wit")),
    ("request.wit", include_str!("../../wit/request.wit")),
    ("shared.wit", include_str!("../../wit/shared.wit")),
    ("types.wit", include_str!("../../wit/types.wit")),
    ("worlds.wit", include_str!("../../wit/worlds.wit")),
];

/// The Rust SDK's files, by path within the crate.
const SDK: [(&str, &str); 5] = [
    ("Cargo.toml", include_str!("../../plugins/sdk/Cargo.toml")),
    ("build.rs", include_str!("../../plugins/sdk/build.rs")),
    ("src/lib.rs", include_str!("../../plugins/sdk/src/lib.rs")),
    ("src/balancer.rs", include_str!("../../plugins/sdk/src/balancer.rs")),
    ("src/filter.rs", include_str!("../../plugins/sdk/src/filter.rs")),
];

/// A plugin's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl Lang {
    pub fn parse(text: &str) -> Option<Lang> {
        match text {
            "rust" => Some(Lang::Rust),
            "python" | "py" => Some(Lang::Python),
            "js" | "javascript" => Some(Lang::Js),
            _ => None,
        }
    }
}

/// Why a scaffold was not made.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "`{0}` is not a plugin name: start with a letter, then letters, digits, `-` and `_` (it becomes NAME.wasm)"
    )]
    BadName(String),
    #[error("`{0}` is the name of a built-in policy; a plugin file of that name would be refused")]
    Builtin(String),
    #[error("{0} already exists: choose another name or remove it")]
    Exists(PathBuf),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Makes the folder `parent/NAME` with a balancer in `lang`; returns the
/// files written.
pub fn new(parent: &Path, name: &str, lang: Lang) -> Result<Vec<PathBuf>, ScaffoldError> {
    let valid = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(ScaffoldError::BadName(name.into()));
    }
    if super::registry::is_builtin(name) {
        return Err(ScaffoldError::Builtin(name.into()));
    }
    let root = parent.join(name);
    if root.exists() {
        return Err(ScaffoldError::Exists(root));
    }
    let mut files: Vec<(String, String)> = WIT
        .iter()
        .map(|(f, text)| (format!("wit/{f}"), text.to_string()))
        .collect();
    match lang {
        Lang::Rust => {
            files.extend(
                SDK.iter()
                    .map(|(f, text)| (format!("vendor/fulcrum-plugin-sdk/{f}"), text.to_string())),
            );
            files.push(("Cargo.toml".into(), RUST_CARGO.replace("NAME", name)));
            files.push(("src/lib.rs".into(), RUST_LIB.into()));
            files.push(("README.md".into(), readme(name, lang)));
        }
        Lang::Python => {
            files.push((
                "app.py".into(),
                include_str!("../../examples/python-policy/app.py").into(),
            ));
            files.push((
                "build.sh".into(),
                PYTHON_BUILD
                    .replace("NAME", name)
                    .replace("PY_VERSION", tool_version("COMPONENTIZE_PY")),
            ));
            files.push(("README.md".into(), readme(name, lang)));
        }
        Lang::Js => {
            files.push((
                "policy.js".into(),
                include_str!("../../examples/js-policy/policy.js").into(),
            ));
            files.push((
                "componentize.mjs".into(),
                include_str!("../../examples/js-policy/componentize.mjs").into(),
            ));
            files.push((
                "package.json".into(),
                JS_PACKAGE
                    .replace("NAME", name)
                    .replace("JS_VERSION", tool_version("COMPONENTIZE_JS")),
            ));
            files.push(("build.sh".into(), JS_BUILD.replace("NAME", name)));
            files.push(("README.md".into(), readme(name, lang)));
        }
    }
    let mut written = Vec::new();
    for (file, text) in files {
        let path = root.join(&file);
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, text)?;
            if file.ends_with(".sh") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            }
            Ok(())
        };
        write().map_err(|e| ScaffoldError::Write {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        written.push(path);
    }
    Ok(written)
}

const RUST_CARGO: &str = r#"[package]
name = "NAME"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
# The SDK, vendored with the WIT it is built from (wit/).
fulcrum-plugin-sdk = { path = "vendor/fulcrum-plugin-sdk", features = ["balancer"] }
serde = { version = "1", features = ["derive"] }

[profile.release]
codegen-units = 1
panic = "abort"
strip = true

# A workspace of its own: builds wherever the folder is.
[workspace]
"#;

const RUST_LIB: &str = r#"//! Weighted round robin over the healthy backends, exact across the
//! balancer's worker threads (the host's shared ticket picks the turn).
//! Change `select` to make it yours; `fulcrum plugin check` tells you how it
//! behaves and what it costs.

use fulcrum_plugin_sdk::{Backend, BackendId, Balancer, Plugin, shared};

/// The config (a pool's `policy_config`): `{"skip_unhealthy": true}`.
#[derive(Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub skip_unhealthy: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config { skip_unhealthy: true }
    }
}

/// One period of turns: each backend as many times as its weight's share.
pub fn turns(backends: &[(BackendId, u32)]) -> Vec<BackendId> {
    let gcd = |mut a: u32, mut b: u32| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let divisor = backends.iter().fold(0, |g, &(_, w)| gcd(g, w.max(1))).max(1);
    let mut turns = Vec::new();
    for &(id, weight) in backends {
        turns.extend(std::iter::repeat_n(id, (weight.max(1) / divisor) as usize));
    }
    turns
}

pub struct Policy {
    config: Config,
    turns: Vec<BackendId>,
}

impl Plugin for Policy {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(Policy { config, turns: Vec::new() })
    }
}

impl Balancer for Policy {
    fn set_backends(&mut self, backends: Vec<Backend>) {
        let usable: Vec<(BackendId, u32)> = backends
            .iter()
            .filter(|b| b.healthy || !self.config.skip_unhealthy)
            .map(|b| (b.id, b.weight))
            .collect();
        self.turns = turns(&usable);
    }

    fn select(&mut self) -> Option<BackendId> {
        if self.turns.is_empty() {
            return None;
        }
        let ticket = shared::next_ticket(0);
        Some(self.turns[(ticket % self.turns.len() as u64) as usize])
    }
}

fulcrum_plugin_sdk::export_balancer!(Policy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_follow_weights() {
        assert_eq!(turns(&[(0, 100), (1, 200)]), vec![0, 1, 1]);
    }
}
"#;

/// The Python and JavaScript tools' versions (examples/tool-versions).
const TOOL_VERSIONS: &str = include_str!("../../examples/tool-versions");

/// The version `KEY=VERSION` in examples/tool-versions gives, e.g.
/// `tool_version("COMPONENTIZE_PY")`; empty for an unknown key.
pub fn tool_version(key: &str) -> &'static str {
    TOOL_VERSIONS
        .lines()
        .filter_map(|line| line.split_once('='))
        .find(|(name, _)| name.trim() == key)
        .map_or("", |(_, version)| version.trim())
}

const PYTHON_BUILD: &str = r#"#!/usr/bin/env bash
# Builds NAME.wasm from app.py with componentize-py (installed in .venv on
# first use, unless COMPONENTIZE_PY names one).
set -euo pipefail
cd "$(dirname "$0")"
tool=${COMPONENTIZE_PY:-}
if [[ -z $tool ]]; then
  [[ -x .venv/bin/componentize-py ]] || { python3 -m venv .venv && .venv/bin/pip install --quiet componentize-py==PY_VERSION; }
  tool=.venv/bin/componentize-py
fi
"$tool" -d wit -w balancer componentize app -o NAME.wasm
echo "built NAME.wasm: fulcrum plugin check NAME.wasm"
"#;

const JS_PACKAGE: &str = r#"{
  "name": "NAME",
  "private": true,
  "type": "module",
  "devDependencies": {
    "@bytecodealliance/componentize-js": "JS_VERSION"
  }
}
"#;

const JS_BUILD: &str = r#"#!/usr/bin/env bash
# Builds NAME.wasm from policy.js with componentize-js (npm install on first
# use, unless COMPONENTIZE_JS_DIR names a folder where it is installed).
set -euo pipefail
cd "$(dirname "$0")"
dir=${COMPONENTIZE_JS_DIR:-$PWD}
[[ -d "$dir/node_modules/@bytecodealliance/componentize-js" ]] || (cd "$dir" && npm install --silent --no-audit --no-fund)
# Beside node_modules: an ES module resolves packages from where it lies.
[[ "$dir" == "$PWD" ]] || cp componentize.mjs "$dir/componentize.mjs"
node "$dir/componentize.mjs" policy.js wit balancer NAME.wasm
echo "built NAME.wasm: fulcrum plugin check NAME.wasm"
"#;

fn readme(name: &str, lang: Lang) -> String {
    let (source, build) = match lang {
        Lang::Rust => (
            "src/lib.rs",
            format!(
                "rustup target add wasm32-wasip2\ncargo build --release --target wasm32-wasip2\ncp target/wasm32-wasip2/release/{}.wasm {name}.wasm",
                name.replace('-', "_")
            ),
        ),
        Lang::Python => ("app.py", "./build.sh".to_string()),
        Lang::Js => ("policy.js", "./build.sh".to_string()),
    };
    format!(
        "# {name}\n\nA Fulcrum balancer (`fulcrum:plugin@0.2.0`, the WIT in `wit/`). The policy is in\n`{source}`.\n\n```sh\n{build}\nfulcrum plugin check {name}.wasm\nfulcrum plugin test {name}.wasm --backends 4\ncp {name}.wasm /path/to/plugins.d/    # then policy = \"{name}\" in a pool\n```\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_wit_is_the_whole_package() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/wit");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .expect("wit/")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|f| f.ends_with(".wit"))
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = WIT.iter().map(|(f, _)| f.to_string()).collect();
        assert_eq!(
            on_disk, embedded,
            "WIT in plugin/scaffold.rs must list every file of wit/"
        );
    }

    #[test]
    fn the_tools_versions_come_from_one_file() {
        for key in ["COMPONENTIZE_PY", "COMPONENTIZE_JS"] {
            let version = tool_version(key);
            assert!(
                version.split('.').count() == 3 && version.split('.').all(|n| n.parse::<u32>().is_ok()),
                "{key}={version}"
            );
        }
        assert_eq!(tool_version("NOPE"), "");
        let dir = tempfile::tempdir().expect("temp dir");
        new(dir.path(), "snake", Lang::Python).expect("scaffold");
        let script = std::fs::read_to_string(dir.path().join("snake/build.sh")).expect("build.sh");
        assert!(
            script.contains(&format!("componentize-py=={}", tool_version("COMPONENTIZE_PY"))),
            "{script}"
        );
        new(dir.path(), "script", Lang::Js).expect("scaffold");
        let package = std::fs::read_to_string(dir.path().join("script/package.json")).expect("package.json");
        assert!(package.contains(tool_version("COMPONENTIZE_JS")), "{package}");
    }

    #[test]
    fn names_are_checked_and_folders_never_overwritten() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            new(dir.path(), "least-conn", Lang::Rust),
            Err(ScaffoldError::Builtin(_))
        ));
        assert!(matches!(
            new(dir.path(), "../x", Lang::Rust),
            Err(ScaffoldError::BadName(_))
        ));
        assert!(matches!(
            new(dir.path(), "", Lang::Rust),
            Err(ScaffoldError::BadName(_))
        ));
        let files = new(dir.path(), "mine", Lang::Python).expect("made");
        assert!(files.iter().any(|f| f.ends_with("app.py")));
        assert!(matches!(
            new(dir.path(), "mine", Lang::Js),
            Err(ScaffoldError::Exists(_))
        ));
    }
}

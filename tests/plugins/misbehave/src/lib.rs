//! A test-only policy. Its `policy_config` picks what it does on `select`:
//! `{"mode": "first"}` always the first healthy backend, `"last"` the last one,
//! `"loop"` spins forever, `"trap"` traps, `"grow"` allocates without bound,
//! `"bad-id"` names a backend that does not exist, `"zero"` always names
//! backend 0 whatever its health, `"none"` declines.
//! `"modulo"` hashes the `x-user` header modulo the healthy backends (the
//! naive hash that `fulcrum plugin test` shows remapping most keys).
//! `"refuse"` fails `init`. `"chatty"` prints from `init` and from `select`
//! (then picks the first healthy backend).
//! Escape attempts, in `select` (or in `init` with `"at": "init"`), each
//! logged through the host as `escape MODE: denied: ...` or `escape MODE:
//! SUCCEEDED` before picking the first healthy backend: `"sleep"` (a WASI
//! poll), `"tcp"` (connect), `"udp"` (bind), `"dns"` (name lookup), `"file"`
//! (read /etc/hostname), `"env"` (read PATH), `"stdin"` (a blocking read).
// Only a Wasm component: there is nothing to build or test on the host.
#![cfg(target_arch = "wasm32")]

use fulcrum_plugin_sdk::{Backend, BackendId, Balancer, Plugin, log, request};

/// `{"mode": "...", "at": "init"}`.
#[derive(serde::Deserialize)]
#[serde(default)]
struct Config {
    mode: String,
    at: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: "first".into(),
            at: None,
        }
    }
}

struct Misbehave {
    mode: String,
    healthy: Vec<BackendId>,
}

impl Plugin for Misbehave {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let mode = config.mode;
        if mode == "refuse" {
            return Err("this plugin was told to refuse its config".into());
        }
        if mode == "chatty" {
            println!("hello from init");
            eprintln!("complaint from init");
        }
        if config.at.as_deref() == Some("init") {
            escape(&mode);
        }
        Ok(Misbehave {
            mode,
            healthy: Vec::new(),
        })
    }
}

impl Balancer for Misbehave {
    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.healthy = backends.iter().filter(|b| b.healthy).map(|b| b.id).collect();
    }

    fn select(&mut self) -> Option<BackendId> {
        match self.mode.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "trap" => core::arch::wasm32::unreachable(),
            "grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "bad-id" => Some(9_999),
            "zero" => Some(0),
            "chatty" => {
                println!("hello from select");
                self.healthy.first().copied()
            }
            "none" => None,
            "sleep" | "tcp" | "udp" | "dns" | "file" | "env" | "stdin" => {
                escape(&self.mode);
                self.healthy.first().copied()
            }
            "last" => self.healthy.last().copied(),
            "modulo" => {
                let key = request::header("x-user").unwrap_or_default();
                let hash = fulcrum_plugin_sdk::fnv1a(key.as_bytes());
                (!self.healthy.is_empty()).then(|| self.healthy[(hash % self.healthy.len() as u64) as usize])
            }
            _ => self.healthy.first().copied(),
        }
    }

    fn reselect(&mut self, tried: &[BackendId]) -> Option<BackendId> {
        self.healthy.iter().copied().find(|id| !tried.contains(id))
    }
}

/// Tries to reach outside the sandbox (or to block) and logs what happened.
fn escape(mode: &str) {
    use log::Level;
    use std::io::Read;
    let outcome: Result<String, String> = match mode {
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_millis(1));
            Ok("slept".into())
        }
        "tcp" => std::net::TcpStream::connect("127.0.0.1:9")
            .map(|_| "connected".into())
            .map_err(|e| e.to_string()),
        "udp" => std::net::UdpSocket::bind("127.0.0.1:0")
            .map(|_| "bound".into())
            .map_err(|e| e.to_string()),
        "dns" => std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 80))
            .map(|_| "resolved".into())
            .map_err(|e| e.to_string()),
        "file" => std::fs::read_to_string("/etc/hostname").map_err(|e| e.to_string()),
        "env" => std::env::var("PATH").map_err(|e| e.to_string()),
        "stdin" => {
            let mut byte = [0u8; 1];
            std::io::stdin()
                .read(&mut byte)
                .map_err(|e| e.to_string())
                .and_then(|n| {
                    if n == 0 {
                        Err("end of input".into())
                    } else {
                        Ok("read".into())
                    }
                })
        }
        _ => Err("not an escape mode".into()),
    };
    match outcome {
        Ok(what) => fulcrum_plugin_sdk::log(Level::Warn, &format!("escape {mode}: SUCCEEDED ({what})")),
        Err(reason) => fulcrum_plugin_sdk::log(Level::Info, &format!("escape {mode}: denied: {reason}")),
    }
}

fulcrum_plugin_sdk::export_balancer!(Misbehave);

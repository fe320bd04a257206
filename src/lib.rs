//! Fulcrum: an HTTP load balancer whose backend choice is made by WebAssembly
//! components, hot-reloaded from a plugin directory.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; tests and
//! benchmarks use the same modules.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod backend;
pub mod buffers;
pub mod changes;
pub mod config;
pub mod demo;
pub mod frontend;
pub mod grpc;
pub mod health;
pub mod http;
pub mod live;
pub mod memory;
pub mod metrics;
pub mod plugin;
pub mod proxy;
pub mod proxy_protocol;
pub mod record;
pub mod root;
pub mod router;
pub mod server;
pub mod shutdown;
pub mod snapshot;
pub mod tls;
pub mod traffic;
pub mod upstream;
pub mod watch;

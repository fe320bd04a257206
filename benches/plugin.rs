//! The hot path without the network: one plugin decision per sample plugin at
//! 3, 100 and 1,000 backends; a decision that reads a header, with few and many
//! headers; and the host's own per-request work (route match, request-head parse and
//! upstream encoding, response-head parse and rewrite).
//!
//! `cargo bench --bench plugin`; figures go to docs/BENCHMARKS.md.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum::backend::{Backend, BackendList, BackendState, InFlight};
use fulcrum::config::RouteConfig;
use fulcrum::http::{Framing, RequestHead};
use fulcrum::plugin::registry::Registry;
use fulcrum::plugin::{CurrentRequest, Limits, Plugin, PluginSlot, PluginSource, Policy, PolicyCounters};
use fulcrum::router::Router;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

// A deadline far above any decision: the cost measured does not depend on it,
// and a busy machine (CI) can stall a call past the 5 ms default, which would
// fail the smoke checks below on a fallback.
const LIMITS: Limits = Limits {
    call_timeout: Duration::from_secs(1),
    memory_limit: 16 << 20,
};

fn backends(n: usize) -> (BackendList, Vec<InFlight>) {
    let list: Vec<Arc<Backend>> = (0..n)
        .map(|i| {
            Arc::new(Backend {
                id: i as u32,
                labels: Arc::from(Vec::new()),
                address: format!("10.0.{}.{}:80", i / 250, i % 250 + 1),
                socket: format!("10.0.{}.{}:80", i / 250, i % 250 + 1).parse().expect("address"),
                weight: 1 + (i % 3) as u32,
                state: Arc::new(BackendState::default()),
            })
        })
        .collect();
    // Some load, so least-conn compares real counts instead of breaking ties.
    let in_flight = list
        .iter()
        .enumerate()
        .flat_map(|(i, b)| (0..(i * 7 % 5)).map(|_| b.state.start_request()))
        .collect();
    (list.into(), in_flight)
}

/// A request head with `headers` header fields.
fn request(headers: usize) -> RequestHead {
    let mut text = String::from("GET /api/users/42?page=2 HTTP/1.1\r\nhost: shop.example\r\nx-user: alice\r\n");
    for i in 0..headers.saturating_sub(2) {
        text.push_str(&format!("x-extra-{i}: some value of typical length\r\n"));
    }
    text.push_str("\r\n");
    fulcrum::http::h1::parse_request(&mut bytes::BytesMut::from(text.as_str()))
        .expect("valid")
        .expect("complete")
}

/// The client every benchmark request comes from.
fn client() -> fulcrum::http::ClientAddr {
    fulcrum::http::ClientAddr::new("192.0.2.7:51000".parse().expect("client"))
}

/// `head` from `client` as the policy sees it.
fn current<'a>(head: &'a RequestHead, client: &'a fulcrum::http::ClientAddr) -> CurrentRequest<'a> {
    CurrentRequest {
        head,
        client: client.addr,
        connection: client,
        body_prefix: &[],
        changes: fulcrum::plugin::RequestChanges::none(),
        pool: "bench",
    }
}

/// A plugin built beside the built-ins (or a committed fixture), by file.
fn slot_of(name: &str, path: &str) -> Arc<PluginSlot> {
    let wasm = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    PluginSlot::new(Plugin::load(name, &wasm, PluginSource::Builtin).unwrap_or_else(|e| panic!("{name}: {e}")))
}

fn policy(slot: Arc<PluginSlot>, config: &str) -> Policy {
    Policy::new(slot, config, LIMITS, PolicyCounters::default())
}

fn decisions(c: &mut Criterion) {
    let registry = Registry::with_builtins().expect("built-ins load");
    let mut group = c.benchmark_group("decision");
    let client = client();
    let wasm_dir = env!("FULCRUM_PLUGIN_WASM_DIR");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/plugin-0.1.0/least_conn.wasm"
    );
    let slots = [
        (
            "round-robin",
            registry.slot("round-robin").expect("built-in"),
            &[3, 100, 1000][..],
        ),
        (
            "least-conn",
            registry.slot("least-conn").expect("built-in"),
            &[3, 100, 1000][..],
        ),
        ("least-conn-0.1.0", slot_of("least-conn-0.1.0", fixture), &[3][..]),
        (
            "maglev",
            slot_of("maglev", &format!("{wasm_dir}/maglev.wasm")),
            &[3, 100][..],
        ),
        (
            "peak-ewma",
            slot_of("peak-ewma", &format!("{wasm_dir}/peak_ewma.wasm")),
            &[3, 100][..],
        ),
    ];
    for (name, slot, sizes) in slots {
        for &n in sizes {
            let policy = policy(slot.clone(), "{}");
            let (list, _load) = backends(n);
            let head = request(3);
            let current = current(&head, &client);
            assert!(
                policy
                    .choose(&current, &list, &[], fulcrum::plugin::PoolView::default())
                    .fault
                    .is_none(),
                "{name} decides without fault"
            );
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| black_box(policy.choose(&current, &list, &[], fulcrum::plugin::PoolView::default())))
            });
        }
    }

    let wasm = std::fs::read(concat!(env!("FULCRUM_PLUGIN_WASM_DIR"), "/header_hash.wasm")).expect("header_hash.wasm");
    let slot = PluginSlot::new(Plugin::load("header-hash", &wasm, PluginSource::Builtin).expect("header-hash loads"));
    for headers in [3, 50] {
        let policy = policy(slot.clone(), r#"{"header":"x-user"}"#);
        let (list, _load) = backends(3);
        let head = request(headers);
        let current = current(&head, &client);
        assert!(
            policy
                .choose(&current, &list, &[], fulcrum::plugin::PoolView::default())
                .fault
                .is_none()
        );
        group.bench_function(BenchmarkId::new("header-hash/3-backends/headers", headers), |b| {
            b.iter(|| black_box(policy.choose(&current, &list, &[], fulcrum::plugin::PoolView::default())))
        });
    }
    group.finish();
}

fn host_work(c: &mut Criterion) {
    let routes: Vec<RouteConfig> = [
        (None, "/"),
        (Some("shop.example"), "/"),
        (Some("shop.example"), "/api"),
        (None, "/static"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (host, prefix))| RouteConfig {
        host: host.map(str::to_string),
        path_prefix: prefix.to_string(),
        pool: format!("p{i}"),
        max_body_size: None,
        filters: Vec::new(),
        body_prefix: 0,
    })
    .collect();
    let router = Router::new(&routes, |name| name.strip_prefix('p').and_then(|n| n.parse().ok()));
    let mut group = c.benchmark_group("host");
    group.bench_function("route-match", |b| {
        b.iter(|| black_box(router.pool_for(Some("shop.example:8080"), "/api/users/42")))
    });
    let client = fulcrum::http::ClientAddr::new("192.0.2.7:51000".parse().expect("client"));
    let request = request(10);
    let mut head = Vec::with_capacity(1024);
    group.bench_function("encode-upstream-head/10-headers", |b| {
        b.iter(|| {
            head.clear();
            let forwarding = fulcrum::http::h1::Forwarding {
                client: &client,
                peer_trusted: false,
                via: false,
                forwarded: false,
                request_id: None,
                edits: &[],
            };
            fulcrum::http::h1::encode_request_head(
                &request,
                &forwarding,
                Framing::Empty,
                "10.0.0.1:80",
                false,
                &mut head,
            )
            .expect("encodes");
            black_box(head.len())
        })
    });
    let raw = "GET /api/users/42?page=2 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: bench/1.0\r\n\
               Accept: */*\r\nAccept-Encoding: gzip\r\nAccept-Language: en\r\nCookie: session=abc123\r\n\
               X-Request-Id: 42\r\nX-Tenant: blue\r\nReferer: http://shop.example/\r\nCache-Control: no-cache\r\n\r\n";
    group.bench_function("parse-request-head/10-headers", |b| {
        b.iter(|| {
            let mut buf = bytes::BytesMut::from(raw);
            black_box(
                fulcrum::http::h1::parse_request(&mut buf)
                    .expect("valid")
                    .expect("complete"),
            )
        })
    });
    let response = "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 04:00:00 GMT\r\n\
                    Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\n";
    let mut out = Vec::with_capacity(1024);
    group.bench_function("response-head/parse-and-write", |b| {
        b.iter(|| {
            let mut buf = bytes::BytesMut::from(response);
            let head = fulcrum::http::h1::parse_response(&mut buf, false)
                .expect("valid")
                .expect("complete");
            out.clear();
            head.write_for_client(&mut out, false, false, false, b"", &[]);
            black_box(out.len())
        })
    });
    // What the metrics cost a request: one record into this thread's shard.
    let (list, _load) = backends(1);
    let head = crate::request(3);
    let record = fulcrum::record::RequestRecord {
        status: http::StatusCode::OK,
        termination: fulcrum::record::Termination::Completed,
        pool: None,
        backend: Some(&list[0]),
        policy: Some("round-robin"),
        decision: Duration::from_nanos(180),
        retries: 0,
        retry_reasons: [0; fulcrum::proxy::Retry::NAMES.len()],
        bytes_in: 0,
        bytes_out: 6,
        to_response_head: Some(Duration::from_micros(90)),
        duration: Duration::from_micros(120),
        head: Some(&head),
        client: "192.0.2.7:51000".parse().expect("client"),
        request_id: None,
        connect: None,
    };
    group.bench_function("metrics-record", |b| {
        b.iter(|| fulcrum::metrics::record(black_box(&record)))
    });
    group.finish();
}

criterion_group!(benches, decisions, host_work);
criterion_main!(benches);

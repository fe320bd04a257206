//! HTTP/2 and gRPC to backends through the real binary: tonic clients and
//! tonic services (messages declared with prost's derive, no code
//! generation), served by hyper over h2c or TLS. Unary and bidirectional
//! calls, trailers and error statuses, `grpc-timeout`, the stream idle
//! timeout, Fulcrum's own errors as trailers-only gRPC statuses, an h2 backend
//! over TLS, the grpc.health.v1 check, a REFUSED_STREAM retried elsewhere, and
//! HTTP/1 clients reaching an h2c backend.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::codegen::Service;
use tonic::server::{StreamingService, UnaryService};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// The one message of the test service.
#[derive(Clone, PartialEq, prost::Message)]
struct Note {
    #[prost(string, tag = "1")]
    text: String,
    /// The server waits this long before answering.
    #[prost(uint32, tag = "2")]
    delay_ms: u32,
    /// The server fails the call with this code (0: it does not).
    #[prost(int32, tag = "3")]
    fail_code: i32,
}

fn note(text: &str) -> Note {
    Note {
        text: text.into(),
        ..Note::default()
    }
}

/// A gRPC backend: `test.Echo/Unary`, `test.Echo/Chat` (bidirectional) and
/// grpc.health.v1, served by hyper's HTTP/2 server (so no server-side
/// deadline handling of its own: only the balancer enforces `grpc-timeout`).
struct GrpcBackend {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    health: tonic_health::server::HealthReporter,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcBackend {
    async fn start(name: &'static str, tls: Option<Arc<rustls::ServerConfig>>) -> GrpcBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls = Arc::new(AtomicUsize::new(0));
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let echo = Echo {
            name,
            calls: calls.clone(),
        };
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (echo, health_service, tls) = (echo.clone(), health_service.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                        let (echo, mut health_service) = (echo.clone(), health_service.clone());
                        async move {
                            if request.uri().path().starts_with("/grpc.health.v1.Health/") {
                                let response = health_service
                                    .call(request)
                                    .await
                                    .unwrap_or_else(|never| match never {});
                                return Ok::<_, Infallible>(response);
                            }
                            Ok(echo.route(request).await)
                        }
                    });
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        }
                        Some(config) => {
                            let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        GrpcBackend {
            addr,
            calls,
            health,
            task,
        }
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Echo {
    name: &'static str,
    calls: Arc<AtomicUsize>,
}

impl Echo {
    async fn route(&self, request: http::Request<Incoming>) -> http::Response<tonic::body::Body> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Note, Note>::default());
        match request.uri().path() {
            "/test.Echo/Unary" => grpc.unary(self.clone(), request).await,
            "/test.Echo/Chat" => grpc.streaming(self.clone(), request).await,
            _ => Status::unimplemented("no such method").into_http(),
        }
    }
}

impl UnaryService<Note> for Echo {
    type Response = Note;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<tonic::Response<Note>, Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<Note>) -> Self::Future {
        let name = self.name;
        Box::pin(async move {
            let note = request.into_inner();
            tokio::time::sleep(Duration::from_millis(u64::from(note.delay_ms))).await;
            if note.fail_code != 0 {
                let mut status = Status::new(Code::from_i32(note.fail_code), format!("{name} was asked to fail"));
                status
                    .metadata_mut()
                    .insert("x-detail", "from-the-backend".parse().expect("value"));
                return Err(status);
            }
            let mut response = tonic::Response::new(Note {
                text: format!("{name}: {}", note.text),
                ..Note::default()
            });
            response
                .metadata_mut()
                .insert("x-backend", name.parse().expect("value"));
            Ok(response)
        })
    }
}

impl StreamingService<Note> for Echo {
    type Response = Note;
    type ResponseStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Note, Status>> + Send>>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<tonic::Response<Self::ResponseStream>, Status>> + Send>,
    >;

    /// Answers each note as it comes, upper-cased.
    fn call(&mut self, request: tonic::Request<tonic::Streaming<Note>>) -> Self::Future {
        Box::pin(async move {
            let mut incoming = request.into_inner();
            let stream = async_stream(move |tx| async move {
                while let Ok(Some(note)) = incoming.message().await {
                    if tx.send(Ok(note_upper(&note))).await.is_err() {
                        return;
                    }
                }
            });
            Ok(tonic::Response::new(stream))
        })
    }
}

fn note_upper(note: &Note) -> Note {
    Note {
        text: note.text.to_uppercase(),
        ..Note::default()
    }
}

/// A stream fed by a task (no extra crate for generators).
fn async_stream<F, Fut>(feed: F) -> std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Note, Status>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Note, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(feed(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What a gRPC call sent by a plain HTTP/2 client got back.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    grpc_status: Option<String>,
    message: String,
    /// No body and no trailers: the status came in the headers.
    trailers_only: bool,
}

/// A unary call made by hand over h2c (hyper's client): `grpc-timeout` sent
/// as given, and no deadline of the client's own.
async fn raw_grpc_call(addr: SocketAddr, path: &str, message: &Note, timeout: Option<&str>) -> RawAnswer {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(connection);
    let encoded = prost::Message::encode_to_vec(message);
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        request = request.header("grpc-timeout", timeout);
    }
    let request = request.body(Full::new(Bytes::from(framed))).expect("request");
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("answered within 10 s")
        .expect("response");
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    let field = |name: &str| {
        trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .or_else(|| parts.headers.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    RawAnswer {
        status: parts.status.as_u16(),
        grpc_status: field("grpc-status"),
        message: field("grpc-message").unwrap_or_default(),
        trailers_only: body.is_empty() && trailers.is_none(),
    }
}

/// A tonic client through the balancer (h2c, prior knowledge).
async fn client(addr: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    client_for(addr, None).await
}

/// A tonic client through the balancer, its calls naming `host` as their
/// authority (for host routes) when given.
async fn client_for(addr: SocketAddr, host: Option<&str>) -> tonic::client::Grpc<tonic::transport::Channel> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
    if let Some(host) = host {
        endpoint = endpoint.origin(format!("http://{host}").parse().expect("origin"));
    }
    tonic::client::Grpc::new(endpoint.connect().await.expect("connect to the balancer"))
}

async fn unary(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    request: tonic::Request<Note>,
) -> Result<tonic::Response<Note>, Status> {
    client.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Unary");
    client.unary(request, path, ProstCodec::<Note, Note>::default()).await
}

fn pool_toml(protocol: &str, backends: &[SocketAddr], extra: &str) -> String {
    let list = backends
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\n\n[pools.grpc]\nprotocol = \"{protocol}\"\nbackends = [{list}]\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_bidirectional_calls_pass_through_with_their_trailers() {
    let backend = GrpcBackend::start("alpha", None).await;
    let fulcrum = Fulcrum::start(&pool_toml("h2c", &[backend.addr], ""), &[]);
    let mut client = client(fulcrum.addr).await;

    let answer = unary(&mut client, tonic::Request::new(note("hello")))
        .await
        .expect("unary call");
    assert_eq!(answer.get_ref().text, "alpha: hello");
    assert_eq!(
        answer.metadata().get("x-backend").and_then(|v| v.to_str().ok()),
        Some("alpha"),
        "the backend's headers pass"
    );

    // An error status, its message and metadata travel in the trailers.
    let failed = unary(
        &mut client,
        tonic::Request::new(Note {
            text: "x".into(),
            fail_code: Code::PermissionDenied as i32,
            ..Note::default()
        }),
    )
    .await
    .expect_err("the backend fails the call");
    assert_eq!(failed.code(), Code::PermissionDenied);
    assert_eq!(failed.message(), "alpha was asked to fail");
    assert_eq!(
        failed.metadata().get("x-detail").and_then(|v| v.to_str().ok()),
        Some("from-the-backend"),
        "trailers kept"
    );

    // Bidirectional: each answer arrives before the next note is sent, so
    // neither direction is buffered whole.
    client.ready().await.expect("ready");
    let (tx, rx) = tokio::sync::mpsc::channel::<Note>(1);
    tx.send(note("one")).await.expect("first note");
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Chat");
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            ProstCodec::<Note, Note>::default(),
        ),
    )
    .await
    .expect("the call opens in time")
    .expect("streaming call");
    let mut answers = response.into_inner();
    for (i, word) in ["one", "two", "three", "four", "five"].iter().enumerate() {
        if i > 0 {
            tx.send(note(word)).await.expect("next note");
        }
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .expect("an answer per note, while the call stays open")
            .expect("stream ok")
            .expect("a message");
        assert_eq!(answer.text, word.to_uppercase());
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(5), answers.message())
        .await
        .expect("the call ends");
    assert!(matches!(end, Ok(None)), "clean end with grpc-status 0: {end:?}");
    assert!(backend.calls.load(Ordering::Relaxed) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_caps_the_wait_and_quiet_streams_get_the_stream_idle_timeout() {
    let backend = GrpcBackend::start("slow", None).await;
    let fulcrum = Fulcrum::start(
        &pool_toml(
            "h2c",
            &[backend.addr],
            "retries = 0\nread_timeout = \"300ms\"\nstream_idle_timeout = \"1500ms\"\n",
        ),
        &[],
    );
    let mut client = client(fulcrum.addr).await;

    // The call's deadline (400 ms) is far below the pool's response_timeout
    // (30 s); the backend would answer after 5 s. Sent by a plain HTTP/2
    // client: tonic's own would give up at the deadline by itself.
    let started = Instant::now();
    let answer = raw_grpc_call(
        fulcrum.addr,
        "/test.Echo/Unary",
        &Note {
            text: "late".into(),
            delay_ms: 5000,
            ..Note::default()
        },
        Some("400m"),
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 200, "gRPC errors travel over HTTP 200");
    assert_eq!(
        answer.grpc_status.as_deref(),
        Some("4"),
        "DEADLINE_EXCEEDED: {answer:?}"
    );
    assert!(
        answer.message.contains("did not answer in time"),
        "Fulcrum's own answer: {answer:?}"
    );
    assert!(
        answer.trailers_only,
        "one HEADERS frame that ends the stream: {answer:?}"
    );
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(3),
        "answered at the deadline, not the backend's pace: {waited:?}"
    );

    // A bidirectional call quiet for longer than read_timeout (300 ms) but
    // less than stream_idle_timeout goes on.
    client.ready().await.expect("ready");
    let (tx, rx) = tokio::sync::mpsc::channel::<Note>(1);
    tx.send(note("first")).await.expect("note");
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Chat");
    let mut answers = client
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            ProstCodec::<Note, Note>::default(),
        )
        .await
        .expect("call")
        .into_inner();
    let first = answers.message().await.expect("ok").expect("answer");
    assert_eq!(first.text, "FIRST");
    tokio::time::sleep(Duration::from_millis(800)).await;
    tx.send(note("after a pause")).await.expect("note");
    let second = tokio::time::timeout(Duration::from_secs(5), answers.message())
        .await
        .expect("in time")
        .expect("the stream outlived read_timeout")
        .expect("answer");
    assert_eq!(second.text, "AFTER A PAUSE");

    // Quiet past stream_idle_timeout: the balancer ends the call.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("the call is ended by the balancer, not the test's bound");
    assert!(ended.is_err(), "a call quiet past stream_idle_timeout fails: {ended:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "not before the stream idle timeout: {:?}",
        started.elapsed()
    );
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancers_own_errors_reach_grpc_clients_as_grpc_statuses() {
    let backend = GrpcBackend::start("any", None).await;
    let dead = free_port();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n\n\
         [pools.plain]\nbackends = [\"{}\"]\n\n\
         [pools.down]\nprotocol = \"h2c\"\nretries = 0\nbackends = [\"127.0.0.1:{dead}\"]\n\n\
         [[routes]]\npath_prefix = \"/test.Echo/\"\nhost = \"plain.test\"\npool = \"plain\"\n\n\
         [[routes]]\npath_prefix = \"/test.Echo/\"\nhost = \"down.test\"\npool = \"down\"\n",
        backend.addr
    );
    let fulcrum = Fulcrum::start(&config, &[]);

    // Routed to a pool that speaks HTTP/1.1: trailers-only UNIMPLEMENTED.
    let mut to_plain = client_for(fulcrum.addr, Some("plain.test")).await;
    let status = unary(&mut to_plain, tonic::Request::new(note("x")))
        .await
        .expect_err("an HTTP/1.1 pool cannot carry gRPC");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("protocol = \"h2\""), "{status:?}");
    assert_eq!(backend.calls.load(Ordering::Relaxed), 0, "nothing reached the backend");

    // The backend is unreachable: UNAVAILABLE, which gRPC clients may retry.
    let mut to_down = client_for(fulcrum.addr, Some("down.test")).await;
    let status = unary(&mut to_down, tonic::Request::new(note("x")))
        .await
        .expect_err("no backend answers");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // No route: UNIMPLEMENTED (gRPC's mapping of 404).
    let mut nowhere = client_for(fulcrum.addr, Some("nowhere.test")).await;
    let status = unary(&mut nowhere, tonic::Request::new(note("x")))
        .await
        .expect_err("no route");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("no route"), "{status:?}");
}

/// A test CA (its PEM file in `dir`), a server certificate for `grpc.test`
/// and 127.0.0.1, and a client certificate the CA signed (`client.pem`,
/// `client.key` in `dir`).
struct BackendPki {
    ca_file: std::path::PathBuf,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
    server_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    server_key: Vec<u8>,
    roots: Arc<rustls::RootCertStore>,
}

impl BackendPki {
    fn new(dir: &Path) -> BackendPki {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().expect("key");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let ca_file = dir.join("backend-ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write CA");
        let mut params = CertificateParams::new(vec!["grpc.test".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
        let mut client_params = CertificateParams::new(vec!["fulcrum.test".to_string()]).expect("params");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().expect("key");
        let client = client_params.signed_by(&client_key, &ca, &ca_key).expect("sign");
        let (client_cert_file, client_key_file) = (dir.join("client.pem"), dir.join("client.key"));
        std::fs::write(&client_cert_file, client.pem()).expect("write");
        std::fs::write(&client_key_file, client_key.serialize_pem()).expect("write");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        BackendPki {
            ca_file,
            client_cert: client_cert_file,
            client_key: client_key_file,
            server_chain: vec![cert.der().clone()],
            server_key: key.serialize_der(),
            roots: Arc::new(roots),
        }
    }

    /// The backend's TLS config (ALPN h2), requiring a client certificate
    /// from the same CA when `mutual`.
    fn server_config(&self, mutual: bool) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if mutual {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider)
                .build()
                .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(
                self.server_chain.clone(),
                rustls::pki_types::PrivateKeyDer::Pkcs8(self.server_key.clone().into()),
            )
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_backend_over_tls_is_verified_and_reached() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = BackendPki::new(dir.path());
    let backend = GrpcBackend::start("secure", Some(pki.server_config(false))).await;
    let mutual = GrpcBackend::start("mutual", Some(pki.server_config(true))).await;
    let ca = pki.ca_file.display().to_string();
    let (cert, key) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let fulcrum = Fulcrum::start(
        &format!(
            "[server]\nlisten = \"{{listen}}\"\n\n\
             [pools.by_name]\nprotocol = \"h2\"\ntls = {{ ca = \"{ca}\", sni = \"grpc.test\" }}\nbackends = [\"{addr}\"]\n\n\
             [pools.by_ip]\nprotocol = \"h2\"\ntls = {{ ca = \"{ca}\" }}\nbackends = [\"{addr}\"]\n\n\
             [pools.wrong_ca]\nprotocol = \"h2\"\nretries = 0\ntls = true\nbackends = [\"{addr}\"]\n\n\
             [pools.with_cert]\nprotocol = \"h2\"\ntls = {{ ca = \"{ca}\", cert = \"{cert}\", key = \"{key}\" }}\nbackends = [\"{mutual}\"]\n\n\
             [pools.without_cert]\nprotocol = \"h2\"\nretries = 0\ntls = {{ ca = \"{ca}\" }}\nbackends = [\"{mutual}\"]\n\n\
             [[routes]]\nhost = \"name.test\"\npool = \"by_name\"\n\n\
             [[routes]]\nhost = \"ip.test\"\npool = \"by_ip\"\n\n\
             [[routes]]\nhost = \"cert.test\"\npool = \"with_cert\"\n\n\
             [[routes]]\nhost = \"nocert.test\"\npool = \"without_cert\"\n\n\
             [[routes]]\nhost = \"wrong.test\"\npool = \"wrong_ca\"\n",
            addr = backend.addr,
            mutual = mutual.addr
        ),
        &[],
    );
    // A backend that requires a client certificate: the pool's is presented.
    let answer = unary(
        &mut client_for(fulcrum.addr, Some("cert.test")).await,
        tonic::Request::new(note("with a cert")),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", fulcrum.log()));
    assert_eq!(answer.get_ref().text, "mutual: with a cert");
    let status = unary(
        &mut client_for(fulcrum.addr, Some("nocert.test")).await,
        tonic::Request::new(note("x")),
    )
    .await
    .expect_err("no client certificate, no connection");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        mutual.calls.load(Ordering::Relaxed),
        1,
        "only the call with a certificate got through"
    );
    for host in ["name.test", "ip.test"] {
        let mut client = client_for(fulcrum.addr, Some(host)).await;
        let answer = unary(&mut client, tonic::Request::new(note("over tls")))
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:?}\n{}", fulcrum.log()));
        assert_eq!(answer.get_ref().text, "secure: over tls");
    }
    // The system's roots do not know the test CA: the handshake fails, and
    // nothing is sent in clear.
    let calls = backend.calls.load(Ordering::Relaxed);
    let mut client = client_for(fulcrum.addr, Some("wrong.test")).await;
    let status = unary(&mut client, tonic::Request::new(note("x")))
        .await
        .expect_err("an unverified backend is not used");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(backend.calls.load(Ordering::Relaxed), calls);
    assert!(fulcrum.log().contains("TLS handshake"), "the log says why");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_health_check_takes_a_not_serving_backend_down_and_back() {
    let alpha = GrpcBackend::start("alpha", None).await;
    let beta = GrpcBackend::start("beta", None).await;
    let fulcrum = Fulcrum::start(
        &pool_toml(
            "h2c",
            &[alpha.addr, beta.addr],
            "\n[pools.grpc.health]\ntype = \"grpc\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n",
        ),
        &[],
    );
    let wait_for = |addr: SocketAddr, want_up: bool| {
        let fulcrum = &fulcrum;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let status = fulcrum.backend_status("grpc", &addr.to_string()).await;
                if status["up"] == want_up {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{addr}: {status}, want up = {want_up}:\n{}",
                    fulcrum.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(alpha.addr, true).await;
    alpha
        .health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    wait_for(alpha.addr, false).await;
    assert!(fulcrum.log().contains("NOT_SERVING"), "the reason is logged");
    let mut client = client(fulcrum.addr).await;
    for _ in 0..6 {
        let answer = unary(&mut client, tonic::Request::new(note("x")))
            .await
            .expect("served");
        assert_eq!(answer.get_ref().text, "beta: x", "only the serving backend is used");
    }
    alpha
        .health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    wait_for(alpha.addr, true).await;
    drop(beta);
}

/// An HTTP/2 backend that refuses every stream with REFUSED_STREAM, counting them.
async fn refusing_backend(refused: Arc<AtomicUsize>) -> RawBackend {
    RawBackend::start(move |tcp| {
        let refused = refused.clone();
        async move {
            let Ok(mut connection) = h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((_request, mut respond))) = connection.accept().await {
                refused.fetch_add(1, Ordering::Relaxed);
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            }
        }
    })
    .await
}

/// An h2c backend that answers with its name and the length of the body it read.
async fn counting_backend(name: &'static str) -> RawBackend {
    RawBackend::start(move |tcp| async move {
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| async move {
            let length = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("x-backend", name)
                    .body(Full::new(Bytes::from(format!("{length}"))))
                    .expect("response"),
            )
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tcp), service)
            .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_elsewhere_even_for_a_post() {
    let refused = Arc::new(AtomicUsize::new(0));
    let refusing = refusing_backend(refused.clone()).await;
    let good = counting_backend("good").await;
    let fulcrum = Fulcrum::start(
        &pool_toml("h2c", &[refusing.addr, good.addr], "")
            .replace("[pools.grpc]", "[pools.grpc]\npolicy = \"round-robin\""),
        &[],
    );
    for i in 0..6 {
        let request = http::Request::post("/orders")
            .header("host", "shop.test")
            .body(Full::new(Bytes::from(vec![b'x'; 1000 + i])))
            .expect("request");
        let reply = send(fulcrum.addr, request).await.expect("answered");
        assert_eq!(reply.status, 200, "{:?}\n{}", reply.body, fulcrum.log());
        assert_eq!(reply.backend.as_deref(), Some("good"));
        assert_eq!(reply.body, format!("{}", 1000 + i), "the whole body, sent again");
    }
    assert!(refused.load(Ordering::Relaxed) >= 2, "the refusing backend was tried");
    let metrics = get(fulcrum.admin, "/metrics").await.expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("fulcrum_retries_total{") && l.contains("reason=\"refused\"") && !l.ends_with(" 0")),
        "retries counted by reason:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_reach_an_h2c_backend_with_streamed_bodies() {
    let backend = counting_backend("h2c").await;
    let fulcrum = Fulcrum::start(&pool_toml("h2c", &[backend.addr], ""), &[]);
    // Larger than retry_buffer (64 KiB): streamed to the backend as it comes.
    let body = vec![b'y'; 1 << 20];
    for _ in 0..3 {
        let request = http::Request::post("/upload")
            .header("host", "shop.test")
            .body(Full::new(Bytes::from(body.clone())))
            .expect("request");
        let reply = send(fulcrum.addr, request).await.expect("answered");
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.body, format!("{}", 1 << 20));
    }
    // Chunked from the client, framed by HTTP/2 to the backend.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(fulcrum.addr).await.expect("connect");
    stream
        .write_all(
            b"POST /chunked HTTP/1.1\r\nhost: shop.test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
              5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n11") || answer.contains("\r\n\r\n2\r\n11\r\n"),
        "{answer}"
    );
}

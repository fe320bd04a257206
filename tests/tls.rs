//! TLS termination through the real binary, with curl as the client:
//! ALPN (HTTP/2 and HTTP/1.1), certificates chosen by SNI, strict SNI, live
//! certificate reload under a running download, client certificates, HSTS,
//! the HTTP→HTTPS redirect, and the certificate expiry metric. Certificates
//! are made for each run (rcgen); no key is committed.

mod common;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A certificate authority of the test's own, writing PEM files into `dir`.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    file: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&file, cert.pem()).expect("write CA");
        Ca { cert, key, file }
    }

    /// A server certificate for `names`, valid until `year`, written as
    /// `{stem}.pem` and `{stem}.key`.
    fn server(&self, dir: &Path, stem: &str, names: &[&str], year: i32) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(dir, stem, params)
    }

    /// A client certificate for `name`, with a SPIFFE-like URI.
    fn client(&self, dir: &Path, stem: &str, name: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://test/{name}").try_into().expect("URI"))];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(dir, stem, params)
    }

    fn issue(&self, dir: &Path, stem: &str, params: CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        let (cert_file, key_file) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        // Written whole, then renamed in: a watcher never sees half a file.
        install_file(&cert_file, cert.pem().as_bytes());
        install_file(&key_file, key.serialize_pem().as_bytes());
        (cert_file, key_file)
    }
}

/// What curl said: its exit code, and its `-w` output.
struct Curl {
    code: i32,
    written: String,
    stderr: String,
}

/// Runs curl against `https://{name}:{port}{path}` resolved to 127.0.0.1,
/// trusting `ca`, with `extra` arguments; the body goes to `body`.
fn curl(name: &str, port: u16, path: &str, ca: &Path, extra: &[&str], body: &Path) -> Curl {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(["-o"])
        .arg(body)
        .args(extra)
        .arg(format!("https://{name}:{port}{path}"))
        .output()
        .expect("curl runs (apt install curl; .ci/run installs it)");
    Curl {
        code: output.status.code().unwrap_or(-1),
        written: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn toml_path(path: &Path) -> String {
    path.display().to_string().replace('\\', "\\\\")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_sni_strict_sni_hsts_and_the_expiry_metric() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let pki = tempfile::tempdir().expect("pki dir");
    let ca = Ca::new(pki.path(), "main");
    let a = ca.server(pki.path(), "a", &["a.example"], 2031);
    let b = ca.server(pki.path(), "b", &["b.example", "*.b.example"], 2032);
    let c = ca.server(pki.path(), "c", &["c.example"], 2033);
    let strict_port = free_port();
    let certificates: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|(cert, key)| format!("{{ cert = \"{}\", key = \"{}\" }}", toml_path(cert), toml_path(key)))
        .collect();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\n\
         tls = {{ certificates = [{list}], hsts = \"max-age=31536000; includeSubDomains\" }}\n\
         [[server.listeners]]\nlisten = \"127.0.0.1:{strict_port}\"\n\
         tls = {{ certificates = [{list}], strict_sni = true }}\n\
         [pools.web]\nbackends = [\"{backend}\"]\n",
        list = certificates.join(", "),
        backend = backends[0].addr,
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    let port = fulcrum.addr.port();
    let body = pki.path().join("body");

    // ALPN: HTTP/2 when the client offers it, HTTP/1.1 when it asks for that.
    let h2 = curl(
        "a.example",
        port,
        "/headers",
        &ca.file,
        &["--http2", "-w", "%{http_version}"],
        &body,
    );
    assert_eq!((h2.code, h2.written.as_str()), (0, "2"), "{}", h2.stderr);
    let seen = std::fs::read_to_string(&body).expect("body");
    assert!(seen.contains("x-forwarded-proto: https"), "{seen}");
    let h1 = curl(
        "a.example",
        port,
        "/",
        &ca.file,
        &["--http1.1", "-w", "%{http_version}"],
        &body,
    );
    assert_eq!((h1.code, h1.written.as_str()), (0, "1.1"), "{}", h1.stderr);

    // SNI: each name gets the certificate that covers it (curl checks the
    // name against the certificate, so success is the proof).
    for name in ["a.example", "b.example", "x.b.example", "c.example"] {
        let got = curl(name, port, "/", &ca.file, &["-w", "%{http_code}"], &body);
        assert_eq!((got.code, got.written.as_str()), (0, "200"), "{name}: {}", got.stderr);
    }
    // A name no certificate covers gets the first one, which curl rejects
    // for the name (exit 60); a strict listener refuses the handshake.
    let unknown = curl("other.example", port, "/", &ca.file, &[], &body);
    assert_eq!(unknown.code, 60, "served the default certificate: {}", unknown.stderr);
    let strict = curl("other.example", strict_port, "/", &ca.file, &[], &body);
    assert_eq!(strict.code, 35, "strict SNI refuses the handshake: {}", strict.stderr);
    let strict_known = curl("c.example", strict_port, "/", &ca.file, &["-w", "%{http_code}"], &body);
    assert_eq!(strict_known.written, "200", "{}", strict_known.stderr);

    // HSTS on every answer of that listener, over both protocols; the
    // listener's replaces a backend's own.
    for (version, path) in [
        ("--http1.1", "/"),
        ("--http2", "/"),
        ("--http1.1", "/with-header/strict-transport-security=max-age=60"),
        ("--http2", "/with-header/strict-transport-security=max-age=60"),
    ] {
        let headers = pki.path().join("headers");
        let got = curl(
            "a.example",
            port,
            path,
            &ca.file,
            &[version, "-D", &headers.display().to_string()],
            &body,
        );
        assert_eq!(got.code, 0, "{}", got.stderr);
        let head = std::fs::read_to_string(&headers).expect("headers").to_ascii_lowercase();
        let sts: Vec<&str> = head
            .lines()
            .filter(|line| line.starts_with("strict-transport-security:"))
            .collect();
        assert_eq!(
            sts,
            ["strict-transport-security: max-age=31536000; includesubdomains"],
            "{version} {path}: {head}"
        );
    }

    // Each certificate's expiry, by listener and file.
    let metrics = get(fulcrum.admin, "/metrics").await.expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let expiry = |file: &Path, listener: &str| {
        let wanted = format!(
            "fulcrum_tls_certificate_expiry_timestamp_seconds{{listener=\"{listener}\",certificate=\"{}\"}}",
            file.display()
        );
        text.lines()
            .find(|line| line.starts_with(&wanted))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
    };
    // 2031-01-01 and 2033-01-01, 00:00 UTC.
    assert_eq!(expiry(&a.0, "server.listen"), Some(1_924_992_000.0), "{text}");
    assert_eq!(expiry(&c.0, "server.listeners[0]"), Some(1_988_150_400.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_files_serve_new_handshakes_while_a_download_finishes() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let pki = tempfile::tempdir().expect("pki dir");
    let old_ca = Ca::new(pki.path(), "old");
    let new_ca = Ca::new(pki.path(), "new");
    let (cert, key) = old_ca.server(pki.path(), "site", &["site.example"], 2031);
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\
         [pools.web]\nbackends = [\"{}\"]\n",
        toml_path(&cert),
        toml_path(&key),
        backends[0].addr
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    let port = fulcrum.addr.port();
    let body = pki.path().join("body");
    let first = curl("site.example", port, "/", &old_ca.file, &["-w", "%{http_code}"], &body);
    assert_eq!(first.written, "200", "{}", first.stderr);

    // A 4 MB download at 2 MB/s on a connection made with the old certificate.
    let download_body = pki.path().join("download");
    let (ca_file, download_path) = (old_ca.file.clone(), download_body.clone());
    let download = std::thread::spawn(move || {
        curl(
            "site.example",
            port,
            "/bytes/4000000",
            &ca_file,
            &["--limit-rate", "2M", "-w", "%{http_code} %{size_download}"],
            &download_path,
        )
    });
    std::thread::sleep(Duration::from_millis(500));

    // A broken certificate file is refused and the old one keeps serving.
    install_file(
        &cert,
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    );
    assert!(
        fulcrum.wait_for_log("TLS files refused", Duration::from_secs(5)),
        "{}",
        fulcrum.log()
    );
    let still = curl("site.example", port, "/", &old_ca.file, &["-w", "%{http_code}"], &body);
    assert_eq!(still.written, "200", "the old certificate serves: {}", still.stderr);

    // The new certificate (another CA's) is served from the next handshake.
    new_ca.server(pki.path(), "site", &["site.example"], 2032);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let new = curl("site.example", port, "/", &new_ca.file, &["-w", "%{http_code}"], &body);
        if new.code == 0 {
            assert_eq!(new.written, "200");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new certificate served within 5 s: {}",
            new.stderr
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let old = curl("site.example", port, "/", &old_ca.file, &[], &body);
    assert_eq!(old.code, 60, "the old CA no longer verifies new handshakes");

    let finished = download.join().expect("download thread");
    assert_eq!(
        (finished.code, finished.written.as_str()),
        (0, "200 4000000"),
        "the download on the old connection completes: {}",
        finished.stderr
    );
    assert_eq!(
        std::fs::metadata(&download_body).map(|m| m.len()).unwrap_or(0),
        4_000_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_checked_and_their_identity_reaches_the_backend() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let pki = tempfile::tempdir().expect("pki dir");
    let ca = Ca::new(pki.path(), "main");
    let clients_ca = Ca::new(pki.path(), "clients");
    let stranger_ca = Ca::new(pki.path(), "stranger");
    let (cert, key) = ca.server(pki.path(), "site", &["site.example"], 2031);
    let (client_cert, client_key) = clients_ca.client(pki.path(), "client", "client-1");
    let (bad_cert, bad_key) = stranger_ca.client(pki.path(), "bad", "intruder");
    let optional_port = free_port();
    let tls = |extra: &str| {
        format!(
            "{{ cert = \"{}\", key = \"{}\", client_ca = \"{}\"{extra} }}",
            toml_path(&cert),
            toml_path(&key),
            toml_path(&clients_ca.file)
        )
    };
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\ntls = {}\n\
         [[server.listeners]]\nlisten = \"127.0.0.1:{optional_port}\"\ntls = {}\n\
         [pools.web]\nbackends = [\"{}\"]\n",
        tls(""),
        tls(", client_auth = \"optional\""),
        backends[0].addr
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    let port = fulcrum.addr.port();
    let body = pki.path().join("body");
    let with = |cert: &Path, key: &Path| {
        vec![
            "--cert".to_string(),
            cert.display().to_string(),
            "--key".to_string(),
            key.display().to_string(),
            "-w".to_string(),
            "%{http_code}".to_string(),
            // A client's own claim is dropped: only Fulcrum's reaches the backend.
            "-H".to_string(),
            "X-Forwarded-Client-Cert: Subject=\"CN=forged\"".to_string(),
        ]
    };
    let args = with(&client_cert, &client_key);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for version in ["--http1.1", "--http2"] {
        let mut args = args.clone();
        args.push(version);
        let got = curl("site.example", port, "/headers", &ca.file, &args, &body);
        assert_eq!((got.code, got.written.as_str()), (0, "200"), "{}", got.stderr);
        let seen = std::fs::read_to_string(&body).expect("body");
        let xfcc: Vec<&str> = seen
            .lines()
            .filter(|l| l.starts_with("x-forwarded-client-cert:"))
            .collect();
        assert_eq!(xfcc.len(), 1, "{seen}");
        assert!(
            xfcc[0].contains("Subject=\"CN=client-1\"") && xfcc[0].contains("URI=spiffe://test/client-1"),
            "{seen}"
        );
        assert!(xfcc[0].contains("Hash="), "{seen}");
    }
    // No certificate, or one from a CA not trusted: refused in the handshake.
    let none = curl("site.example", port, "/", &ca.file, &[], &body);
    assert_ne!(none.code, 0, "no client certificate is refused");
    let bad = with(&bad_cert, &bad_key);
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    let refused = curl("site.example", port, "/", &ca.file, &bad, &body);
    assert_ne!(refused.code, 0, "a certificate from another CA is refused");
    // Optional: no certificate passes, with no identity and the forged header dropped.
    let anonymous = curl(
        "site.example",
        optional_port,
        "/headers",
        &ca.file,
        &[
            "-w",
            "%{http_code}",
            "-H",
            "X-Forwarded-Client-Cert: Subject=\"CN=forged\"",
        ],
        &body,
    );
    assert_eq!(anonymous.written, "200", "{}", anonymous.stderr);
    let seen = std::fs::read_to_string(&body).expect("body");
    assert!(!seen.contains("x-forwarded-client-cert"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_listener_redirects_to_https() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nredirect_https = 8443\n[pools.web]\nbackends = [\"{}\"]\n",
        backends[0].addr
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    let url = format!("http://{}/a/b?c=1", fulcrum.addr);
    for (method, status) in [("GET", "301"), ("POST", "308")] {
        let output = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-X", method, "-H", "Host: shop.example:8080"])
            .args(["-w", "%{http_code} %{redirect_url}", &url])
            .output()
            .expect("curl");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("{status} https://shop.example:8443/a/b?c=1"),
            "{method}"
        );
    }
    assert_eq!(backends[0].stats.requests.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn check_refuses_unusable_tls_files_naming_the_key_and_file() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new(dir.path(), "main");
    let (cert, _key) = ca.server(dir.path(), "site", &["site.example"], 2031);
    let (_, other_key) = ca.server(dir.path(), "other", &["other.example"], 2031);
    let missing = dir.path().join("missing.pem");
    let cases = [
        (
            format!(
                "cert = \"{}\", key = \"{}\"",
                toml_path(&missing),
                toml_path(&other_key)
            ),
            "server.tls.cert",
            "missing.pem",
        ),
        (
            format!("cert = \"{}\", key = \"{}\"", toml_path(&cert), toml_path(&other_key)),
            "server.tls.key",
            "does not match",
        ),
        (format!("cert = \"{}\"", toml_path(&cert)), "server.tls.key", "required"),
    ];
    for (tls, key, reason) in cases {
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:1\"\ntls = {{ {tls} }}\n[pools.web]\nbackends = [\"127.0.0.1:2\"]\n"
        );
        let path = dir.path().join("fulcrum.toml");
        std::fs::write(&path, config).expect("write config");
        let (ok, said) = check_file(&path);
        assert!(!ok, "{tls}: refused");
        assert!(said.contains(key) && said.contains(reason), "{tls}: {said}");
    }
}

/// `openssl s_client -reconnect` (TLS 1.2: five reconnections offering the
/// first session): how many handshakes were resumptions.
fn resumed_handshakes(port: u16, name: &str) -> usize {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            name,
        ])
        .args(["-tls1_2", "-reconnect"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl runs (.ci/run installs it)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "openssl s_client within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("output");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("Reused,"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_unless_turned_off() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let pki = tempfile::tempdir().expect("pki dir");
    let ca = Ca::new(pki.path(), "main");
    let (cert, key) = ca.server(pki.path(), "site", &["site.example"], 2031);
    let off_port = free_port();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\ntls = {{ cert = \"{cert}\", key = \"{key}\" }}\n\
         [[server.listeners]]\nlisten = \"127.0.0.1:{off_port}\"\n\
         tls = {{ cert = \"{cert}\", key = \"{key}\", session_resumption = false }}\n\
         [pools.web]\nbackends = [\"{}\"]\n",
        backends[0].addr,
        cert = toml_path(&cert),
        key = toml_path(&key),
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    assert!(
        resumed_handshakes(fulcrum.addr.port(), "site.example") >= 4,
        "sessions resume"
    );
    assert_eq!(
        resumed_handshakes(off_port, "site.example"),
        0,
        "every handshake a full one"
    );
}

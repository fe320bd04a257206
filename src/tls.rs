//! TLS termination for a listener: its certificates (chosen by the name the
//! client asks for), client certificates, ALPN, session resumption, and the
//! live reload of its files.
//!
//! A [`Terminator`] holds the listener's rustls `ServerConfig` behind an
//! `ArcSwap`: every handshake takes the current one, so replacing the files
//! changes what new connections are served while connections already made
//! keep theirs. A file that cannot be used is refused with its reason and the
//! serving config stays. Session tickets (keys rotated every 6 hours) and the
//! session cache are kept across reloads, so resumption survives them.
//!
//! rustls runs on `ring`; TLS 1.2 and 1.3 with its default suites (AEAD
//! only, forward secret); 0-RTT is off.

use crate::config::{CertificateFiles, ClientAuth, TlsConfig};
use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// Why a listener's TLS files could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {file}: {reason}")]
pub struct TlsError {
    /// The config key naming the file (`server.listeners[0].tls.cert`).
    pub key: String,
    pub file: PathBuf,
    pub reason: String,
}

/// One certificate as served: its chain and key, the names it covers, and
/// when it expires.
#[derive(Debug)]
struct Served {
    key: Arc<CertifiedKey>,
    /// DNS names from its subjectAltName, lowercase (`*.example.com` allowed).
    names: Vec<String>,
    cert_file: PathBuf,
    /// Unix seconds.
    not_after: i64,
}

/// Picks the certificate for a client by the name it sent (SNI).
#[derive(Debug)]
struct ByName {
    served: Vec<Served>,
    strict: bool,
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = match hello.server_name() {
            Some(name) => self
                .served
                .iter()
                .find(|s| s.names.iter().any(|n| name_matches(n, name))),
            None => None,
        };
        match chosen {
            Some(served) => Some(served.key.clone()),
            // No name, or one no certificate covers: the first, unless strict.
            None if self.strict => None,
            None => self.served.first().map(|s| s.key.clone()),
        }
    }
}

/// Whether certificate name `pattern` (lowercase; `*.` covers one label)
/// covers `name`.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

/// A TLS listener's live TLS state.
pub struct Terminator {
    /// The listener's name (`server.listen`, `server.listeners[1]`).
    pub listener: String,
    /// The config table of its `tls` key (`server`, `server.listeners[1]`).
    table: String,
    settings: TlsConfig,
    config: ArcSwap<ServerConfig>,
    /// The certificates served now: names and expiry, for status and metrics.
    served: ArcSwap<Vec<CertificateSummary>>,
    tickets: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions + Send + Sync>,
}

/// What a served certificate is, for metrics and logs.
#[derive(Debug, Clone)]
pub struct CertificateSummary {
    pub file: PathBuf,
    pub names: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("listener", &self.listener)
            .field("served", &self.served.load())
            .finish()
    }
}

/// Sessions remembered for resumption by id (TLS 1.2), per listener.
const SESSION_CACHE: usize = 20_000;

impl Terminator {
    /// Reads the listener's files and makes its TLS config. `listener` names
    /// it (`server.listen`, `server.listeners[1]`); `table` is the config table
    /// its `tls` key is in (`server`, `server.listeners[1]`), for messages.
    pub fn new(listener: &str, table: &str, settings: &TlsConfig) -> Result<Arc<Terminator>, TlsError> {
        let tickets = rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError {
            key: format!("{table}.tls"),
            file: PathBuf::new(),
            reason: format!("cannot make session ticket keys: {e}"),
        })?;
        let sessions: Arc<dyn StoresServerSessions + Send + Sync> =
            rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
        let (config, served) = build(table, settings, &tickets, &sessions)?;
        let terminator = Arc::new(Terminator {
            listener: listener.to_string(),
            table: table.to_string(),
            settings: settings.clone(),
            config: ArcSwap::from_pointee(config),
            served: ArcSwap::from_pointee(served),
            tickets,
            sessions,
        });
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&terminator));
        Ok(terminator)
    }

    /// Reads the files again and serves them from the next handshake on; on
    /// error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (config, served) = build(&self.table, &self.settings, &self.tickets, &self.sessions)?;
        self.config.store(Arc::new(config));
        self.served.store(Arc::new(served));
        Ok(())
    }

    /// The config for the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// Every file the listener reads (certificates, keys, the client CAs).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self
            .settings
            .certificates
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .collect();
        files.extend(self.settings.client_ca.clone());
        files
    }

    /// The certificates served now.
    pub fn certificates(&self) -> Arc<Vec<CertificateSummary>> {
        self.served.load_full()
    }
}

/// Every live terminator, for the metrics.
fn registry() -> &'static Mutex<Vec<Weak<Terminator>>> {
    static TERMINATORS: Mutex<Vec<Weak<Terminator>>> = Mutex::new(Vec::new());
    &TERMINATORS
}

/// The live terminators.
pub fn terminators() -> Vec<Arc<Terminator>> {
    let mut all = registry().lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|t| t.strong_count() > 0);
    all.iter().filter_map(Weak::upgrade).collect()
}

/// The TLS config from `settings` (of the `tls` key in `table`).
fn build(
    table: &str,
    settings: &TlsConfig,
    tickets: &Arc<dyn ProducesTickets>,
    sessions: &Arc<dyn StoresServerSessions + Send + Sync>,
) -> Result<(ServerConfig, Vec<CertificateSummary>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let single = settings.certificates.len() == 1;
    let mut served = Vec::new();
    for (index, files) in settings.certificates.iter().enumerate() {
        let key = if single {
            format!("{table}.tls")
        } else {
            format!("{table}.tls.certificates[{index}]")
        };
        served.push(load_certificate(&key, files, &provider)?);
    }
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError {
            key: format!("{table}.tls"),
            file: PathBuf::new(),
            reason: e.to_string(),
        })?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let key = format!("{table}.tls.client_ca");
            let fail = |reason: String| TlsError {
                key: key.clone(),
                file: ca.clone(),
                reason,
            };
            let roots = read_roots(ca).map_err(fail)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match settings.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| fail(e.to_string()))?)
        }
    };
    let summaries = served
        .iter()
        .map(|s| CertificateSummary {
            file: s.cert_file.clone(),
            names: s.names.clone(),
            not_after: s.not_after,
        })
        .collect();
    let mut config = builder.with_cert_resolver(Arc::new(ByName {
        served,
        strict: settings.strict_sni,
    }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if settings.session_resumption {
        config.ticketer = tickets.clone();
        config.session_storage = sessions.clone();
    } else {
        // Every handshake a full one (the default ticketer sends none).
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    // No 0-RTT: early data can be replayed.
    config.max_early_data_size = 0;
    Ok((config, summaries))
}

/// The CA certificates of a PEM file, as trust roots.
pub(crate) fn read_roots(file: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(file).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("not a PEM certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(roots)
}

/// A certificate chain from a PEM file, leaf first.
pub(crate) fn read_chain(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(file).map_err(|e| e.to_string())?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(chain)
}

/// A private key from a PEM file.
pub(crate) fn read_key(file: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(file).map_err(|e| e.to_string())?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"))
}

/// A certificate chain and key from their PEM files (`key` names the table).
fn load_certificate(
    key: &str,
    files: &CertificateFiles,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Served, TlsError> {
    let cert_error = |reason: String| TlsError {
        key: format!("{key}.cert"),
        file: files.cert.clone(),
        reason,
    };
    let key_error = |reason: String| TlsError {
        key: format!("{key}.key"),
        file: files.key.clone(),
        reason,
    };
    let chain = read_chain(&files.cert).map_err(cert_error)?;
    let Some(leaf) = chain.first() else {
        return Err(cert_error("no certificate in the file".into()));
    };
    let (names, not_after) = describe(leaf).map_err(cert_error)?;
    let private = read_key(&files.key).map_err(key_error)?;
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        key_error(match e {
            rustls::Error::InconsistentKeys(_) => format!("does not match the certificate {}", files.cert.display()),
            other => format!("not a usable key: {other}"),
        })
    })?;
    Ok(Served {
        key: Arc::new(certified),
        names,
        cert_file: files.cert.clone(),
        not_after,
    })
}

/// A leaf certificate's DNS names (lowercase) and expiry (Unix seconds).
fn describe(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("the certificate cannot be read: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        // An old certificate without subjectAltName: its common name.
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// The verified client certificate of a connection, as Envoy's
/// `x-forwarded-client-cert` carries it: `Hash=<SHA-256 of the DER, hex>;
/// Subject="<subject DN>"` then `URI=` and `DNS=` for each such name.
pub fn client_identity(leaf: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    let mut out = String::from("Hash=");
    for byte in sha2::Sha256::digest(leaf.as_ref()) {
        out.push_str(&format!("{byte:02x}"));
    }
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) {
        // Quotes and backslashes escaped, as the header's grammar asks.
        let subject = cert.subject().to_string().replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str(&format!(";Subject=\"{subject}\""));
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(uri) => out.push_str(&format!(";URI={uri}")),
                    x509_parser::extensions::GeneralName::DNSName(dns) => out.push_str(&format!(";DNS={dns}")),
                    _ => {}
                }
            }
        }
    }
    // Only visible ASCII reaches a header.
    out.retain(|c| c.is_ascii_graphic() || c == ' ');
    out
}

/// Reloads a terminator when one of its files changed (the one file watcher
/// calls it).
pub struct TlsFiles {
    terminator: Weak<Terminator>,
    /// Each file as the watcher reports it: its folder canonical, its name.
    files: Vec<PathBuf>,
    /// Each file as configured, and its stamp at the last look: a poll sees
    /// a certificate renewed by a symlink swap (cert-manager, ConfigMaps).
    given: Vec<(PathBuf, Option<crate::watch::FileStamp>)>,
}

impl TlsFiles {
    pub fn new(terminator: &Arc<Terminator>) -> TlsFiles {
        let files = terminator.files().iter().map(|f| watched_path(f)).collect();
        let given = terminator
            .files()
            .iter()
            .map(|f| (f.to_path_buf(), crate::watch::FileStamp::of(f)))
            .collect();
        TlsFiles {
            terminator: Arc::downgrade(terminator),
            files,
            given,
        }
    }

    /// The folders to watch.
    pub fn folders(&self) -> Vec<PathBuf> {
        let mut folders: Vec<PathBuf> = self
            .files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        folders.sort();
        folders.dedup();
        folders
    }
}

/// `file` with its folder canonical (the file itself may be replaced by a
/// rename, so it is not resolved).
fn watched_path(file: &Path) -> PathBuf {
    match (file.parent(), file.file_name()) {
        (Some(folder), Some(name)) => folder
            .canonicalize()
            .unwrap_or_else(|_| folder.to_path_buf())
            .join(name),
        _ => file.to_path_buf(),
    }
}

impl crate::watch::Handler for TlsFiles {
    fn claims(&self, path: &Path) -> bool {
        self.files.iter().any(|f| f == path)
    }

    fn poll(&mut self) -> Vec<PathBuf> {
        let mut changed = Vec::new();
        for ((given, stamp), watched) in self.given.iter_mut().zip(&self.files) {
            let now = crate::watch::FileStamp::of(given);
            if now != *stamp {
                *stamp = now;
                changed.push(watched.clone());
            }
        }
        changed
    }

    fn settled(&mut self, path: &Path, _quiet: std::time::Duration) -> crate::watch::Settled {
        for (given, stamp) in &mut self.given {
            *stamp = crate::watch::FileStamp::of(given);
        }
        if let Some(terminator) = self.terminator.upgrade() {
            match terminator.reload() {
                Ok(()) => {
                    let served = terminator.certificates();
                    let names: Vec<&str> = served.iter().flat_map(|c| c.names.iter().map(String::as_str)).collect();
                    tracing::info!(listener = %terminator.listener, file = %path.display(), ?names, "TLS files reloaded");
                }
                Err(error) => {
                    tracing::warn!(listener = %terminator.listener, %error, "TLS files refused; the previous ones keep serving");
                }
            }
        }
        crate::watch::Settled::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_exactly_or_by_one_wildcard_label() {
        assert!(name_matches("a.example", "a.example"));
        assert!(name_matches("a.example", "A.Example"));
        assert!(!name_matches("a.example", "b.example"));
        assert!(name_matches("*.example", "x.example"));
        assert!(!name_matches("*.example", "example"));
        assert!(!name_matches("*.example", "y.x.example"));
        assert!(!name_matches("*.example", ".example"));
    }
}

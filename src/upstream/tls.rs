//! TLS to backends: a [`Connector`] that makes a TCP connection and then a
//! rustls client handshake over it, checking the backend's certificate
//! against the pool's CA file (or the system's roots), sending the pool's SNI
//! name (or each backend's host), presenting a client certificate when one is
//! configured, and offering one ALPN protocol: the one the pool speaks.

use super::connect::{ConnectError, Connecting, Connector, TcpConnector, Transport};
use crate::config::{UpstreamProtocol, UpstreamTls};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Makes TLS connections to a pool's backends.
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    /// The pool's `sni`: the same name for every backend.
    sni: Option<ServerName<'static>>,
}

/// Why a pool's TLS settings cannot be used: the key under `pools.NAME.tls`
/// and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct UpstreamTlsError {
    /// `ca`, `cert` or `key`.
    pub key: &'static str,
    pub reason: String,
}

impl TlsConnector {
    /// The connector for `settings`, offering `protocol` by ALPN.
    pub fn new(settings: &UpstreamTls, protocol: UpstreamProtocol) -> Result<TlsConnector, UpstreamTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &settings.ca {
            Some(ca) => crate::tls::read_roots(ca).map_err(|reason| UpstreamTlsError {
                key: "ca",
                reason: format!("{}: {reason}", ca.display()),
            })?,
            None => system_roots(),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| UpstreamTlsError {
                key: "ca",
                reason: e.to_string(),
            })?
            .with_root_certificates(roots);
        let mut config = match &settings.client_cert {
            None => builder.with_no_client_auth(),
            Some(files) => {
                let chain = crate::tls::read_chain(&files.cert).map_err(|reason| UpstreamTlsError {
                    key: "cert",
                    reason: format!("{}: {reason}", files.cert.display()),
                })?;
                let key = crate::tls::read_key(&files.key).map_err(|reason| UpstreamTlsError {
                    key: "key",
                    reason: format!("{}: {reason}", files.key.display()),
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| UpstreamTlsError {
                        key: "key",
                        reason: format!("{}: {e}", files.key.display()),
                    })?
            }
        };
        config.alpn_protocols = match protocol {
            UpstreamProtocol::H2 | UpstreamProtocol::H2c => vec![b"h2".to_vec()],
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        };
        // Sessions are resumed across the pool's connections (rustls keeps a
        // small cache per name by default).
        let sni = settings
            .sni
            .as_deref()
            .and_then(|name| ServerName::try_from(name.to_string()).ok());
        Ok(TlsConnector {
            config: Arc::new(config),
            sni,
        })
    }

    /// The name a backend at `address` (`host:port` as configured) is reached by.
    fn server_name(&self, address: &str, socket: SocketAddr) -> ServerName<'static> {
        if let Some(name) = &self.sni {
            return name.clone();
        }
        let host = match address.rfind(':') {
            Some(colon) => &address[..colon],
            None => address,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string()).unwrap_or_else(|_| ServerName::IpAddress(socket.ip().into()))
    }
}

/// The system's trusted roots (Debian's /etc/ssl/certs and the like). A root
/// that cannot be parsed is skipped: one bad file must not stop every pool.
fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::debug!(%error, "a system root certificate could not be read");
    }
    let (added, skipped) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(
            skipped,
            "no system root certificates found: backends' certificates can only be checked with a `ca` file"
        );
    }
    roots
}

impl Connector for TlsConnector {
    fn connect(&self, addr: SocketAddr, address: &str, timeout: Duration) -> Connecting<'_> {
        let name = self.server_name(address, addr);
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let tcp = TcpConnector::tcp(addr, timeout).await?;
            let handshake = tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp);
            let stream = match tokio::time::timeout_at(deadline, handshake).await {
                Err(_) => return Err(ConnectError::Timeout(addr)),
                Ok(Err(e)) => return Err(ConnectError::Tls(addr, e.to_string())),
                Ok(Ok(stream)) => stream,
            };
            Ok(Box::new(stream) as Box<dyn Transport>)
        })
    }
}

impl Transport for TlsStream<TcpStream> {
    /// Quiet when the TCP connection under it is (a TLS alert or close_notify
    /// is bytes on it too).
    fn is_quiet(&self) -> bool {
        self.get_ref().0.is_quiet()
    }

    fn alpn_h2(&self) -> bool {
        self.get_ref().1.alpn_protocol() == Some(b"h2")
    }
}

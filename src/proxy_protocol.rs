//! The PROXY protocol (HAProxy's; v1 text and v2 binary): read on a listener
//! with `proxy_protocol = true`, where an L4 balancer in front says who the
//! client is, and written to backends of a pool with `send_proxy_protocol`.
//!
//! Parsing is the `ppp` crate's. The header is peeked before it is taken off
//! the socket, so not one byte after it (a TLS ClientHello, a request) is
//! consumed here.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature, the first 12 bytes of a v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest header accepted: v2 with room for TLVs (AWS and GCP add a few
/// dozen bytes); v1 is at most 107.
const MAX_HEADER: usize = 4096;
const V1_MAX: usize = 107;

/// Why a connection's PROXY header was refused (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection closed before its PROXY header")]
    Closed,
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("not a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("reading the PROXY header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the PROXY header at the start of `stream` within `within`; the
/// client's address it gives, or `None` when it gives none (v2 LOCAL, v1
/// UNKNOWN, a Unix socket): then the socket's own peer is the client.
pub async fn read_header(stream: &mut TcpStream, within: Duration) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(within, read(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(within))?
}

async fn read(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut peeked = vec![0u8; MAX_HEADER];
    let length = loop {
        stream.readable().await?;
        let n = stream.peek(&mut peeked).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        match header_length(&peeked[..n])? {
            Some(length) => break length,
            // A header split across segments: rare, so waiting a little
            // beats a read per byte.
            None => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    };
    peeked.truncate(length);
    stream.read_exact(&mut peeked).await?;
    parse(&peeked)
}

/// How long the header at the start of `bytes` is; `None` while more bytes
/// are needed to tell.
fn header_length(bytes: &[u8]) -> Result<Option<usize>, ProxyHeaderError> {
    let prefix = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..prefix] == V2_SIGNATURE[..prefix] {
        if bytes.len() < 16 {
            return Ok(None);
        }
        let length = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        if length > MAX_HEADER {
            return Err(ProxyHeaderError::Malformed(format!("a v2 header of {length} bytes")));
        }
        return Ok((bytes.len() >= length).then_some(length));
    }
    let prefix = bytes.len().min(6);
    if bytes[..prefix] != b"PROXY "[..prefix] {
        return Err(ProxyHeaderError::Missing);
    }
    match memchr::memmem::find(&bytes[..bytes.len().min(V1_MAX)], b"\r\n") {
        Some(end) => Ok(Some(end + 2)),
        None if bytes.len() >= V1_MAX => Err(ProxyHeaderError::Malformed("a v1 line longer than 107 bytes".into())),
        None => Ok(None),
    }
}

/// The client address of a whole header.
fn parse(header: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    match ppp::HeaderResult::parse(header) {
        ppp::HeaderResult::V1(Ok(header)) => Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            ppp::v1::Addresses::Unknown => None,
        }),
        ppp::HeaderResult::V2(Ok(header)) => Ok(match (header.command, header.addresses) {
            // LOCAL: the balancer's own connection (a health check): the socket's peer.
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            (_, ppp::v2::Addresses::IPv6(a)) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            (_, ppp::v2::Addresses::Unix(_) | ppp::v2::Addresses::Unspecified) => None,
        }),
        ppp::HeaderResult::V1(Err(error)) => Err(ProxyHeaderError::Malformed(format!("{error:?}"))),
        ppp::HeaderResult::V2(Err(error)) => Err(ProxyHeaderError::Malformed(format!("{error:?}"))),
    }
}

/// Which header a pool sends its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The header that tells a backend `client` connected to `local` (the
/// address the client reached).
pub fn encode(version: Version, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    // Both ends in one family: an IPv4 client of an IPv6 listener is mapped.
    let (client, local) = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (client, local),
        (SocketAddr::V4(c), SocketAddr::V6(_)) => {
            (SocketAddr::new(IpAddr::V6(c.ip().to_ipv6_mapped()), c.port()), local)
        }
        (SocketAddr::V6(_), SocketAddr::V4(l)) => {
            (client, SocketAddr::new(IpAddr::V6(l.ip().to_ipv6_mapped()), l.port()))
        }
    };
    match version {
        Version::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                local.ip(),
                client.port(),
                local.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut header = V2_SIGNATURE.to_vec();
            header.push(0x21); // version 2, PROXY
            let mut addresses = Vec::with_capacity(36);
            match (client, local) {
                (SocketAddr::V4(c), SocketAddr::V4(l)) => {
                    header.push(0x11); // TCP over IPv4
                    addresses.extend_from_slice(&c.ip().octets());
                    addresses.extend_from_slice(&l.ip().octets());
                }
                (SocketAddr::V6(c), SocketAddr::V6(l)) => {
                    header.push(0x21); // TCP over IPv6
                    addresses.extend_from_slice(&c.ip().octets());
                    addresses.extend_from_slice(&l.ip().octets());
                }
                // Made one family above.
                _ => header.push(0x00),
            }
            if !addresses.is_empty() {
                addresses.extend_from_slice(&client.port().to_be_bytes());
                addresses.extend_from_slice(&local.port().to_be_bytes());
            }
            header.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
            header.extend_from_slice(&addresses);
            header
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_written_read_back_the_same_client() {
        let client: SocketAddr = "203.0.113.7:51000".parse().expect("addr");
        let local: SocketAddr = "192.0.2.1:443".parse().expect("addr");
        for version in [Version::V1, Version::V2] {
            let header = encode(version, client, local);
            assert_eq!(header_length(&header).expect("length"), Some(header.len()));
            assert_eq!(parse(&header).expect("parse"), Some(client), "{version:?}");
        }
        let client6: SocketAddr = "[2001:db8::7]:51000".parse().expect("addr");
        let header = encode(Version::V2, client6, local);
        assert_eq!(parse(&header).expect("parse"), Some(client6));
    }

    #[test]
    fn partial_and_foreign_starts_are_told_apart() {
        assert_eq!(header_length(b"PROX").expect("partial"), None);
        assert_eq!(header_length(b"PROXY TCP4 1.2.3.4").expect("partial"), None);
        assert_eq!(header_length(&V2_SIGNATURE[..5]).expect("partial"), None);
        assert!(matches!(
            header_length(b"GET / HTTP/1.1\r\n"),
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(header_length(&[0x16, 3, 1]), Err(ProxyHeaderError::Missing)));
        assert!(parse(b"PROXY TCP4 not-an-ip 1.2.3.4 1 2\r\n").is_err());
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").expect("unknown"), None);
    }
}

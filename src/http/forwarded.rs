//! Who the client is, behind proxies: `server.trusted_proxies` (CIDRs; none
//! by default) decides whose `X-Forwarded-For` and `Forwarded` headers are
//! believed.
//!
//! From a trusted peer the client is the rightmost `X-Forwarded-For` entry
//! (else `Forwarded` `for=`) that is not itself trusted, as nginx's
//! `real_ip_recursive` finds it, and the headers are passed on with the peer
//! appended. From anyone else they are replaced: a client cannot choose the
//! address logs, metrics and plugins see.

use super::RequestHead;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// The networks whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`) or single addresses (`192.0.2.1`).
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        entries
            .iter()
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{entry}` is not an address or a CIDR such as 10.0.0.0/8"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client of a request that came from `peer`, and whether `peer` is
/// trusted (then its forwarding headers are passed on, appended to).
pub fn resolve(head: &RequestHead, peer: SocketAddr, trusted: &TrustedProxies) -> (SocketAddr, bool) {
    if trusted.is_empty() || !trusted.contains(peer.ip()) {
        return (peer, false);
    }
    let mut chain: Vec<IpAddr> = Vec::new();
    for value in head.header_all("x-forwarded-for") {
        for entry in value.split(|&b| b == b',') {
            match std::str::from_utf8(entry).ok().and_then(|e| parse_node(e.trim())) {
                Some(ip) => chain.push(ip),
                // Garbage in the chain: nothing left of it can be believed.
                None => chain.clear(),
            }
        }
    }
    if chain.is_empty() {
        for value in head.header_all("forwarded") {
            for element in value.split(|&b| b == b',') {
                let Ok(element) = std::str::from_utf8(element) else {
                    continue;
                };
                for pair in element.split(';') {
                    if let Some((name, node)) = pair.trim().split_once('=')
                        && name.trim().eq_ignore_ascii_case("for")
                        && let Some(ip) = parse_node(node.trim().trim_matches('"'))
                    {
                        chain.push(ip);
                    }
                }
            }
        }
    }
    // From the right: the first hop that is not a trusted proxy is the client.
    let mut client = peer.ip();
    for ip in chain.iter().rev() {
        client = *ip;
        if !trusted.contains(*ip) {
            break;
        }
    }
    let port = if client == peer.ip() { peer.port() } else { 0 };
    (SocketAddr::new(client, port), true)
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:80`,
/// `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    text.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|ip| ip.parse().ok())
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &str) -> RequestHead {
        let mut buf = bytes::BytesMut::from(format!("GET / HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_str());
        crate::http::h1::parse_request(&mut buf)
            .expect("parses")
            .expect("whole")
    }

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("CIDRs")
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let proxies = trusted(&["10.0.0.0/8", "192.0.2.1"]);
        let peer: SocketAddr = "10.1.1.1:4000".parse().expect("addr");
        let request = head("X-Forwarded-For: 198.51.100.9, 203.0.113.5\r\nX-Forwarded-For: 10.2.2.2\r\n");
        assert_eq!(
            resolve(&request, peer, &proxies),
            ("203.0.113.5:0".parse().expect("addr"), true)
        );
        // Spoofed entries left of the real client are not believed.
        let request = head("X-Forwarded-For: 1.1.1.1, 198.51.100.9\r\n");
        assert_eq!(resolve(&request, peer, &proxies).0.ip().to_string(), "198.51.100.9");
        // From an untrusted peer, the headers count for nothing.
        let stranger: SocketAddr = "198.51.100.200:5000".parse().expect("addr");
        assert_eq!(resolve(&request, stranger, &proxies), (stranger, false));
        // RFC 7239 when there is no X-Forwarded-For.
        let request = head("Forwarded: for=\"[2001:db8::7]:80\";proto=https, for=10.3.3.3\r\n");
        assert_eq!(resolve(&request, peer, &proxies).0.ip().to_string(), "2001:db8::7");
        // No header: the peer itself.
        assert_eq!(resolve(&head(""), peer, &proxies), (peer, true));
        assert!(TrustedProxies::parse(&["nonsense".to_string()]).is_err());
        assert!(proxies.contains("::ffff:10.9.9.9".parse().expect("mapped")));
    }
}

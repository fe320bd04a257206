//! HTTP as the proxy sees it, whatever the client or backend speaks: the types
//! both protocols share (framing, spans of a head, head and body errors, the
//! request body's source, the client's address),
//! the request head ([`request`]), the HTTP/1.1 codec ([`h1`]) and filters'
//! header edits ([`edit`]).

pub mod edit;
pub mod forwarded;
pub mod h1;
pub mod request;

pub use request::RequestHead;

use bytes::Bytes;
use http::StatusCode;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// The largest head accepted from a client or a backend.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one head.
pub const MAX_HEADERS: usize = 100;

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed message head: {0}")]
    Malformed(&'static str),
    #[error("message head larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("request target longer than {0} bytes")]
    UriTooLong(usize),
    #[error("unsupported transfer coding (only `chunked` is accepted)")]
    UnsupportedCoding,
}

impl HeadError {
    /// The status a client gets for a request head refused this way.
    pub fn status(self) -> StatusCode {
        match self {
            HeadError::Malformed(_) => StatusCode::BAD_REQUEST,
            HeadError::TooLarge(_) | HeadError::TooManyHeaders(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            HeadError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

/// What a listener accepts in a request head (`max_head_size`,
/// `max_uri_length`, `max_headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// The whole head, request line and fields, in bytes (431 above).
    pub max_head: usize,
    /// The request target, in bytes (414 above).
    pub max_uri: usize,
    /// Header fields, at most [`MAX_HEADERS`] (431 above).
    pub max_headers: usize,
}

impl HeadLimits {
    pub const DEFAULT: HeadLimits = HeadLimits {
        max_head: MAX_HEAD,
        max_uri: 8 * 1024,
        max_headers: MAX_HEADERS,
    };
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits::DEFAULT
    }
}

/// Why a body could not be read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    #[error("the connection closed before the body ended")]
    Truncated,
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked transfer coding.
    Chunked,
    /// Everything until the connection closes (responses only).
    UntilClose,
}

/// Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection and are
/// never forwarded.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` (any case) is one of [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| h.as_bytes().eq_ignore_ascii_case(name))
}

/// A stretch of a message head, by offsets (heads are small, so 32 bits do,
/// and a head's field table stays a few hundred bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// `start..end` of a head of at most [`MAX_HEAD`] bytes.
    pub fn new(start: usize, end: usize) -> Span {
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    pub fn start(self) -> usize {
        self.start as usize
    }

    /// The bytes of `head` this span covers (empty if it lies outside).
    pub fn of(self, head: &[u8]) -> &[u8] {
        head.get(self.range()).unwrap_or_default()
    }

    fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// Where a request's body comes from: the client's connection (HTTP/1 or
/// HTTP/2), read a piece at a time.
pub trait BodySource: Send {
    /// The body's framing as the client declared it.
    fn framing(&self) -> Framing;
    /// The next piece of the body; `None` at its end.
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, ClientBodyError>> + Send;
    /// Body bytes read so far.
    fn received(&self) -> u64;
    /// Refuses a body longer than `max` bytes (the route's `max_body_size`):
    /// the chunk that goes past it fails with [`ClientBodyError::TooLarge`].
    fn limit(&mut self, max: u64);
    /// The rest of the body as a body of its own, for an HTTP/2 backend's
    /// stream to read as it comes while the response streams back (gRPC's
    /// bidirectional calls); `None` from a source read only a piece at a
    /// time, in the request's own task (HTTP/1).
    fn detach(&mut self) -> Option<DetachedBody> {
        None
    }
}

/// A client's body handed to a backend stream, read by it at its own pace.
pub type DetachedBody = http_body_util::combinators::UnsyncBoxBody<Bytes, ClientBodyError>;

/// The client's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("the client's body was malformed: {0}")]
    Malformed(#[from] BodyError),
    #[error("the client sent nothing for {0:?} in the middle of its body")]
    Timeout(Duration),
    #[error("reading the client's body failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("reading the client's body failed: {0}")]
    Other(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
}

/// Where a request came from, with the client's IP already written out for
/// `X-Forwarded-For` (once per connection rather than once per request), and
/// how it reached Fulcrum.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    pub addr: SocketAddr,
    ip_text: [u8; ClientAddr::IP_TEXT_MAX],
    ip_len: u8,
    /// `None` for a plain listener with nothing to add: the common case costs
    /// one null pointer.
    pub edge: Option<Arc<Edge>>,
}

/// How a client reached Fulcrum, when there is more to it than plain HTTP:
/// over TLS, with which verified certificate, and what its listener adds to
/// the answers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edge {
    /// Over TLS: `X-Forwarded-Proto: https`.
    pub secure: bool,
    /// The verified client certificate, as `X-Forwarded-Client-Cert` gives it.
    pub client_cert: Option<String>,
    /// The `Strict-Transport-Security` value every answer carries.
    pub hsts: Option<String>,
    /// A plain listener that redirects every request to HTTPS on this port.
    pub redirect_https: Option<u16>,
    /// The TCP peer, when a PROXY protocol header named the client (then
    /// [`ClientAddr::addr`] is the client it named).
    pub proxied_by: Option<SocketAddr>,
    /// The listener's head limits.
    pub limits: HeadLimits,
}

impl ClientAddr {
    /// The longest IP address text (an IPv4-mapped IPv6 address).
    const IP_TEXT_MAX: usize = 45;

    pub fn new(addr: SocketAddr) -> ClientAddr {
        let mut ip_text = [0; ClientAddr::IP_TEXT_MAX];
        let mut rest = &mut ip_text[..];
        // Fits: no IP address is written longer than IP_TEXT_MAX.
        let _ = std::io::Write::write_fmt(&mut rest, format_args!("{}", addr.ip()));
        let ip_len = (ClientAddr::IP_TEXT_MAX - rest.len()) as u8;
        ClientAddr {
            addr,
            ip_text,
            ip_len,
            edge: None,
        }
    }

    /// A client that reached Fulcrum as `edge` says.
    pub fn with_edge(addr: SocketAddr, edge: Option<Arc<Edge>>) -> ClientAddr {
        ClientAddr {
            edge,
            ..ClientAddr::new(addr)
        }
    }

    /// Whether the client came over TLS.
    pub fn secure(&self) -> bool {
        self.edge.as_ref().is_some_and(|e| e.secure)
    }

    /// The client's IP address as text (`203.0.113.7`, `2001:db8::1`).
    pub fn ip_text(&self) -> &[u8] {
        &self.ip_text[..usize::from(self.ip_len)]
    }
}

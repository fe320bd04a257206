//! A client's request head as the proxy keeps it: the head's bytes and the
//! offsets of its parts, read in place by the router, the plugins and the
//! upstream encoder. Nothing is copied or hashed per header field: a request
//! with fifty headers costs its parse and little more.
//!
//! Built from an HTTP/1.1 head by [`super::h1::parse_request`] (which owns
//! the framing rules) or from an HTTP/2 request by [`RequestHead::from_parts`].

use super::{Framing, HeadError, Span};
use crate::buffers::{self, HeadBytes};
use http::{Method, Version};
use smallvec::SmallVec;

/// Header fields kept inline before the table spills to the heap.
const INLINE_FIELDS: usize = 16;

/// A request head, checked: its method, target, header fields and framing.
#[derive(Debug)]
pub struct RequestHead {
    /// The head's bytes; every span below is an offset into it.
    pub(crate) raw: HeadBytes,
    pub method: Method,
    pub version: Version,
    pub(crate) target: Target,
    /// (name, value) of each header field in the order received.
    pub(crate) fields: SmallVec<[(Span, Span); INLINE_FIELDS]>,
    /// Headers the `Connection` header names: hop-by-hop for this request.
    pub(crate) connection_named: SmallVec<[Span; 2]>,
    pub body: Framing,
    /// Whether the client lets the connection carry another request.
    pub keep_alive: bool,
    /// `Expect: 100-continue` with a body to come.
    pub expect_continue: bool,
    /// Asks to switch protocols (`Connection: upgrade` and `Upgrade`, e.g.
    /// WebSocket): HTTP/1.1 and no body.
    pub upgrade: bool,
}

/// Where the parts of the request target are.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// `None`: an absolute-form target without a path, which means `/`.
    pub path: Option<Span>,
    /// Without the `?`; a fragment is never kept.
    pub query: Option<Span>,
    /// The authority of an absolute-form or CONNECT target.
    pub authority: Option<Span>,
}

impl RequestHead {
    /// An HTTP/2 request's head (hyper has checked it), to be sent on as HTTP/1.1.
    pub fn from_parts(parts: &http::request::Parts, body: Framing) -> Result<RequestHead, HeadError> {
        RequestHead::from_parts_within(parts, body, &super::HeadLimits::DEFAULT)
    }

    /// [`RequestHead::from_parts`] within a listener's `limits`.
    pub fn from_parts_within(
        parts: &http::request::Parts,
        body: Framing,
        limits: &super::HeadLimits,
    ) -> Result<RequestHead, HeadError> {
        if parts.headers.len() > limits.max_headers {
            return Err(HeadError::TooManyHeaders(limits.max_headers));
        }
        if parts
            .uri
            .path_and_query()
            .is_some_and(|pq| pq.as_str().len() > limits.max_uri)
        {
            return Err(HeadError::UriTooLong(limits.max_uri));
        }
        let mut raw = buffers::take_write();
        let put = |raw: &mut Vec<u8>, bytes: &[u8]| {
            let start = raw.len();
            raw.extend_from_slice(bytes);
            Span::new(start, raw.len())
        };
        let (path, query) = match parts.uri.path_and_query() {
            Some(pq) => (
                Some(put(&mut raw, pq.path().as_bytes())),
                pq.query().map(|q| put(&mut raw, q.as_bytes())),
            ),
            None => (None, None),
        };
        let authority = parts.uri.authority().map(|a| put(&mut raw, a.as_str().as_bytes()));
        let mut fields = SmallVec::new();
        for (name, value) in &parts.headers {
            fields.push((put(&mut raw, name.as_str().as_bytes()), put(&mut raw, value.as_bytes())));
        }
        if raw.len() > limits.max_head {
            buffers::give_write(raw);
            return Err(HeadError::TooLarge(limits.max_head));
        }
        Ok(RequestHead {
            raw: HeadBytes::new(raw),
            method: parts.method.clone(),
            version: parts.version,
            target: Target { path, query, authority },
            fields,
            connection_named: SmallVec::new(),
            body,
            keep_alive: true,
            expect_continue: false,
            upgrade: false,
        })
    }

    fn text(&self, span: Span) -> &str {
        // Targets and authorities are checked to be UTF-8 when parsed.
        std::str::from_utf8(span.of(&self.raw)).unwrap_or_default()
    }

    /// The path of the target (`/api/users`); `*` for `OPTIONS *`.
    pub fn path(&self) -> &str {
        self.target.path.map_or("/", |span| self.text(span))
    }

    /// The query without its `?`.
    pub fn query(&self) -> Option<&str> {
        self.target.query.map(|span| self.text(span))
    }

    /// The authority the client asked for: the target's own (absolute form,
    /// HTTP/2 `:authority`) or else the `Host` header, if it is valid text.
    pub fn host(&self) -> Option<&str> {
        if let Some(span) = self.target.authority {
            return Some(self.text(span));
        }
        self.header("host").and_then(visible_text)
    }

    /// Whether this is a gRPC call: over HTTP/2 (gRPC needs its trailers),
    /// with a `content-type` of `application/grpc` or `application/grpc+…`.
    /// The version is looked at first, so an HTTP/1 request costs no header scan.
    pub fn is_grpc(&self) -> bool {
        self.version == http::Version::HTTP_2
            && self.header("content-type").is_some_and(|value| {
                value.len() >= 16
                    && value[..16].eq_ignore_ascii_case(b"application/grpc")
                    && matches!(value.get(16), None | Some(b'+' | b';'))
            })
    }

    /// The value of the first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n.of(&self.raw).eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.of(&self.raw))
    }

    /// The values of every header called `name` (any case), in order.
    pub fn header_all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.fields
            .iter()
            .filter(move |(n, _)| n.of(&self.raw).eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.of(&self.raw))
    }

    /// Every header field as (name as received, value), in order.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|(n, v)| (n.of(&self.raw), v.of(&self.raw)))
    }

    /// Whether the `Connection` header names `name` (any case).
    pub fn named_by_connection(&self, name: &[u8]) -> bool {
        self.connection_named
            .iter()
            .any(|span| span.of(&self.raw).eq_ignore_ascii_case(name))
    }

    /// Writes the target in origin form (path and query), as sent upstream.
    pub fn write_origin_form(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.path().as_bytes());
        if let Some(query) = self.target.query {
            out.push(b'?');
            out.extend_from_slice(query.of(&self.raw));
        }
    }
}

/// `value` as text if it is visible ASCII (what `HeaderValue::to_str` accepts).
pub fn visible_text(value: &[u8]) -> Option<&str> {
    if value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Finds the parts of a request target at `target` in `head` (RFC 9112 3.2),
/// refusing characters a URI cannot hold. Origin form, the common case, is
/// scanned in place; the absolute and authority forms go through `http::Uri`.
pub fn parse_target(head: &[u8], target: Span, method: &Method) -> Result<Target, HeadError> {
    let bytes = target.of(head);
    let invalid = HeadError::Malformed("invalid request target");
    match bytes.first() {
        None => Err(invalid),
        Some(b'/') => origin_form(bytes, target.start()).ok_or(invalid),
        Some(b'*') if bytes.len() == 1 => Ok(Target {
            path: Some(target),
            query: None,
            authority: None,
        }),
        _ if *method == Method::CONNECT => {
            http::uri::Authority::try_from(bytes).map_err(|_| invalid)?;
            Ok(Target {
                path: None,
                query: None,
                authority: Some(target),
            })
        }
        _ => {
            let uri = http::Uri::try_from(bytes).map_err(|_| invalid)?;
            let (Some(_), Some(authority)) = (uri.scheme(), uri.authority()) else {
                return Err(invalid);
            };
            // The authority sits right after `scheme://`, as written.
            let scheme_end = memchr::memmem::find(bytes, b"://").ok_or(invalid)? + 3;
            let authority_end = scheme_end + authority.as_str().len();
            let rest = &bytes[authority_end..];
            let at = target.start() + authority_end;
            let mut parts = match rest.first() {
                None => Target {
                    path: None,
                    query: None,
                    authority: None,
                },
                Some(b'/') => origin_form(rest, at).ok_or(invalid)?,
                Some(b'?') => {
                    let mut parts = origin_form(rest, at).ok_or(invalid)?;
                    parts.path = None;
                    parts
                }
                Some(_) => return Err(invalid),
            };
            parts.authority = Some(Span::new(target.start() + scheme_end, target.start() + authority_end));
            Ok(parts)
        }
    }
}

/// Splits an origin-form target (`bytes`, at offset `at` of the head) into
/// path and query, dropping a fragment; `None` if a character is not allowed
/// (the classes `http::uri` uses: WHATWG's, plus `"`, `{` and `}` in paths,
/// which clients send unencoded) or the text is not UTF-8.
fn origin_form(bytes: &[u8], at: usize) -> Option<Target> {
    let mut high = false;
    let mut path_end = bytes.len();
    let mut query: Option<(usize, usize)> = None;
    for (i, &b) in bytes.iter().enumerate() {
        match (query.is_some(), b) {
            (_, b'#') => {
                if let Some((start, _)) = query {
                    query = Some((start, i));
                } else {
                    path_end = i;
                }
                break;
            }
            (false, b'?') => {
                path_end = i;
                query = Some((i + 1, bytes.len()));
            }
            (_, 0x80..=0xff) => high = true,
            (false, b) if path_byte(b) => {}
            (true, b) if query_byte(b) => {}
            _ => return None,
        }
    }
    if high && std::str::from_utf8(bytes).is_err() {
        return None;
    }
    // A path of just a fragment or query (`?a`, `#x`) still needs its slash upstream.
    let path = (path_end > 0).then(|| Span::new(at, at + path_end));
    Some(Target {
        path,
        query: query.map(|(start, end)| Span::new(at + start, at + end)),
        authority: None,
    })
}

fn path_byte(b: u8) -> bool {
    matches!(b, 0x21 | 0x22 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7E)
}

fn query_byte(b: u8) -> bool {
    matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Path, query and authority as text.
    type Parts = (Option<String>, Option<String>, Option<String>);

    fn target(text: &str, method: Method) -> Result<Parts, HeadError> {
        let head = text.as_bytes();
        let parts = parse_target(head, Span::new(0, head.len()), &method)?;
        let show = |s: Option<Span>| s.map(|s| String::from_utf8_lossy(s.of(head)).into_owned());
        Ok((show(parts.path), show(parts.query), show(parts.authority)))
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn targets_split_into_path_query_and_authority() {
        assert_eq!(
            target("/a/b?c=1&d", Method::GET),
            Ok((some("/a/b"), some("c=1&d"), None))
        );
        assert_eq!(target("/a#frag", Method::GET), Ok((some("/a"), None, None)));
        assert_eq!(target("/a?q#frag", Method::GET), Ok((some("/a"), some("q"), None)));
        assert_eq!(
            target("/{\"json\"}", Method::GET),
            Ok((some("/{\"json\"}"), None, None))
        );
        assert_eq!(target("/caf\u{e9}", Method::GET), Ok((some("/caf\u{e9}"), None, None)));
        assert_eq!(target("*", Method::OPTIONS), Ok((some("*"), None, None)));
        assert_eq!(
            target("http://example.com:8080/x?y", Method::GET),
            Ok((some("/x"), some("y"), some("example.com:8080")))
        );
        assert_eq!(
            target("http://example.com", Method::GET),
            Ok((None, None, some("example.com")))
        );
        assert_eq!(
            target("example.com:443", Method::CONNECT),
            Ok((None, None, some("example.com:443")))
        );
    }

    #[test]
    fn targets_a_uri_cannot_hold_are_refused() {
        for bad in ["/a<b", "/a`b", "/a?x\"y", "/a\x7f", "example.com", "/a?b<c", "//\u{0}"] {
            assert!(target(bad, Method::GET).is_err(), "{bad:?} must be refused");
        }
        let not_utf8 = [b'/', 0xff, 0xfe];
        assert!(parse_target(&not_utf8, Span::new(0, 3), &Method::GET).is_err());
    }

    #[test]
    fn an_http2_request_reads_like_an_http1_one() {
        let request = http::Request::builder()
            .method("PUT")
            .uri("https://shop.example/cart?id=7")
            .header("x-trace", "abc")
            .header("X-Trace", "def")
            .body(())
            .expect("valid");
        let (parts, ()) = request.into_parts();
        let head = RequestHead::from_parts(&parts, Framing::Length(3)).expect("fits");
        assert_eq!(head.method, Method::PUT);
        assert_eq!(head.path(), "/cart");
        assert_eq!(head.query(), Some("id=7"));
        assert_eq!(head.host(), Some("shop.example"));
        assert_eq!(head.header("X-TRACE"), Some(&b"abc"[..]));
        assert_eq!(
            head.header_all("x-trace").collect::<Vec<_>>(),
            [&b"abc"[..], &b"def"[..]]
        );
        let mut out = Vec::new();
        head.write_origin_form(&mut out);
        assert_eq!(out, b"/cart?id=7");
    }
}

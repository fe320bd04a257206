//! HTTP/1.1 framing (RFC 9112) for both sides of the proxy, without I/O:
//! request and response heads parsed with httparse, bodies delimited by
//! `Content-Length`, the chunked transfer coding or the connection's end, and
//! the heads and chunk markers Fulcrum writes.
//!
//! Framing is where request smuggling lives, so the rules are strict: a
//! request with both `Transfer-Encoding` and `Content-Length`, conflicting
//! lengths, a transfer coding other than a lone `chunked`, or `chunked` in an
//! HTTP/1.0 request is refused, never guessed at.

use super::request;
pub use super::{
    BodyError, ClientAddr, Framing, HeadError, HeadLimits, MAX_HEAD, MAX_HEADERS, RequestHead, Span, is_hop_by_hop,
};
use crate::buffers::HeadBytes;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use smallvec::SmallVec;
use std::mem::MaybeUninit;

/// The longest chunk-size or trailer line.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Parses a request head at the start of `buf`. On success the head is taken
/// out of `buf`, leaving whatever follows it (body or pipelined requests).
/// `Ok(None)`: the head is not complete yet. The default limits
/// ([`HeadLimits::DEFAULT`]); a listener's own: [`parse_request_within`].
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
    parse_request_within(buf, &HeadLimits::DEFAULT)
}

/// [`parse_request`] within a listener's `limits`: a head too large or with
/// too many fields is refused (431), a target too long too (414).
pub fn parse_request_within(buf: &mut BytesMut, limits: &HeadLimits) -> Result<Option<RequestHead>, HeadError> {
    // Uninitialised: httparse writes only the fields it finds, so a short head
    // does not pay for clearing room for a hundred.
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let parsed = request.parse_with_uninit_headers(buf, &mut fields);
    let Some(head_len) = head_length(parsed, buf.len(), "not an HTTP/1 request", limits.max_head)? else {
        return Ok(None);
    };
    if request.headers.len() > limits.max_headers {
        return Err(HeadError::TooManyHeaders(limits.max_headers));
    }
    if request.path.is_some_and(|path| path.len() > limits.max_uri) {
        return Err(HeadError::UriTooLong(limits.max_uri));
    }
    let version = if request.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let method = Method::from_bytes(request.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let whole: &[u8] = &buf[..head_len];
    let target = request::parse_target(
        whole,
        range_in(whole, request.path.unwrap_or_default().as_bytes()),
        &method,
    )?;
    let mut spans = SmallVec::new();
    let mut lengths = LengthCheck::default();
    let mut chunked = None;
    let mut connection = ConnectionTokens::default();
    let mut hosts = 0;
    let mut expect_continue = false;
    let mut upgrade_offered = false;
    for field in request.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths.add(field.value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = Some(transfer_coding(chunked, field.value)?);
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection.add_in(whole, field.value);
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = field.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade_offered = true;
        }
        spans.push((range_in(whole, name), range_in(whole, field.value)));
    }
    if version == Version::HTTP_11 && hosts != 1 {
        return Err(HeadError::Malformed(
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    let body = match (chunked, lengths.value) {
        (Some(_), Some(_)) => return Err(HeadError::Malformed("both Transfer-Encoding and Content-Length")),
        (Some(_), None) if version == Version::HTTP_10 => {
            return Err(HeadError::Malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        (Some(true), None) => Framing::Chunked,
        (Some(false), None) => return Err(HeadError::UnsupportedCoding),
        (None, Some(0)) | (None, None) => Framing::Empty,
        (None, Some(length)) => Framing::Length(length),
    };
    let keep_alive = if version == Version::HTTP_11 {
        !connection.close
    } else {
        connection.keep_alive && !connection.close
    };
    let head = RequestHead {
        raw: HeadBytes::copy_of(whole),
        method,
        version,
        target,
        fields: spans,
        connection_named: connection.named,
        body,
        keep_alive,
        expect_continue: expect_continue && body != Framing::Empty && version == Version::HTTP_11,
        upgrade: upgrade_offered && connection.upgrade && body == Framing::Empty && version == Version::HTTP_11,
    };
    buf.advance(head_len);
    Ok(Some(head))
}

/// The length of a complete head from httparse's verdict on `buffered` bytes;
/// `None` while it is incomplete and still within [`MAX_HEAD`].
fn head_length(
    parsed: httparse::Result<usize>,
    buffered: usize,
    not_http: &'static str,
    max_head: usize,
) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len > max_head => Err(HeadError::TooLarge(max_head)),
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered > max_head => Err(HeadError::TooLarge(max_head)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders(MAX_HEADERS)),
        Err(httparse::Error::Version) => Err(HeadError::Malformed("unsupported HTTP version")),
        Err(_) => Err(HeadError::Malformed(not_http)),
    }
}

/// `Content-Length` values seen so far: they must all agree (RFC 9112 6.3).
#[derive(Default)]
struct LengthCheck {
    value: Option<u64>,
}

impl LengthCheck {
    fn add(&mut self, field: &[u8]) -> Result<(), HeadError> {
        for item in field.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::Malformed("invalid Content-Length"));
            }
            let length = item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match self.value {
                Some(seen) if seen != length => return Err(HeadError::Malformed("conflicting Content-Length values")),
                _ => self.value = Some(length),
            }
        }
        Ok(())
    }
}

/// Folds one `Transfer-Encoding` field into what was seen before: `true` when
/// the codings so far are exactly `chunked`.
fn transfer_coding(before: Option<bool>, field: &[u8]) -> Result<bool, HeadError> {
    let mut chunked = before.unwrap_or(false);
    let mut codings = before.is_some() as usize;
    for item in field.split(|&b| b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() {
            continue;
        }
        if chunked {
            // Anything after `chunked`, even a second `chunked`, cannot be framed.
            return Err(HeadError::Malformed("a transfer coding after chunked"));
        }
        codings += 1;
        chunked = item.eq_ignore_ascii_case(b"chunked");
    }
    Ok(chunked && codings == 1)
}

/// What a `Connection` header says, and which other headers it names.
#[derive(Default)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// Headers named by `Connection`: hop-by-hop for this message only.
    named: SmallVec<[Span; 2]>,
}

impl ConnectionTokens {
    fn add(&mut self, field: &[u8]) {
        for item in field.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if item.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if item.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            }
        }
    }

    /// Like `add`, and remembers the named headers as ranges of `head`.
    fn add_in(&mut self, head: &[u8], field: &[u8]) {
        self.add(field);
        for item in field.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if !item.is_empty() {
                self.named.push(range_in(head, item));
            }
        }
    }
}

/// Where `part` sits in `whole` (at most [`MAX_HEAD`] long); an empty span
/// when `part` is not inside it, as the static `""` httparse gives for a
/// missing reason phrase is not.
fn range_in(whole: &[u8], part: &[u8]) -> Span {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= whole.len() => Span::new(start, end),
        _ => Span::new(0, 0),
    }
}

/// A backend's response head, kept as the bytes it arrived in (copied out of
/// the read buffer into a recycled one, so that buffer stays whole for reuse).
#[derive(Debug)]
pub struct ResponseHead {
    raw: HeadBytes,
    pub status: StatusCode,
    reason: Span,
    /// (name, value) of each header field, as ranges of `raw`.
    fields: SmallVec<[(Span, Span); 16]>,
    connection_named: SmallVec<[Span; 2]>,
    pub body: Framing,
    /// Whether the backend connection may carry another request afterwards.
    pub reusable: bool,
}

/// Parses a response head at the start of `buf`, taking it out of `buf` when
/// complete. `head_request`: the request was HEAD, so no body follows.
pub fn parse_response(buf: &mut BytesMut, head_request: bool) -> Result<Option<ResponseHead>, HeadError> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut fields);
    let Some(head_len) = head_length(parsed, buf.len(), "not an HTTP/1 response", MAX_HEAD)? else {
        return Ok(None);
    };
    let status = StatusCode::from_u16(response.code.unwrap_or_default())
        .map_err(|_| HeadError::Malformed("invalid status code"))?;
    let http10 = response.version == Some(0);
    let whole: &[u8] = buf;
    let reason = range_in(whole, response.reason.unwrap_or_default().as_bytes());
    let mut lengths = LengthCheck::default();
    let mut chunked = None;
    let mut connection = ConnectionTokens::default();
    let mut ranges = SmallVec::new();
    for field in response.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths.add(field.value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // A backend's other codings are passed on by reading to the end.
            chunked = Some(transfer_coding(chunked, field.value).unwrap_or(false));
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection.add_in(whole, field.value);
        }
        ranges.push((range_in(whole, name), range_in(whole, field.value)));
    }
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let (body, framed) = match (chunked, lengths.value) {
        _ if no_body => (Framing::Empty, true),
        // Both present: chunked wins, and the connection cannot be trusted after (RFC 9112 6.3).
        (Some(true), Some(_)) => (Framing::Chunked, false),
        (Some(true), None) => (Framing::Chunked, true),
        (Some(false), _) => (Framing::UntilClose, false),
        (None, Some(0)) => (Framing::Empty, true),
        (None, Some(length)) => (Framing::Length(length), true),
        (None, None) => (Framing::UntilClose, false),
    };
    // After 101 the connection carries another protocol.
    let switched = status == StatusCode::SWITCHING_PROTOCOLS;
    let reusable = framed && !switched && !connection.close && (!http10 || connection.keep_alive);
    let raw = HeadBytes::copy_of(&buf[..head_len]);
    buf.advance(head_len);
    Ok(Some(ResponseHead {
        raw,
        status,
        reason,
        fields: ranges,
        connection_named: connection.named,
        body,
        reusable,
    }))
}

impl ResponseHead {
    /// The head of a response that came as HTTP/2 (`status`, `headers`),
    /// kept as the same bytes an HTTP/1 head is, so both front ends write it
    /// one way whatever the backend spoke. `body`: how its body is framed.
    pub fn from_parts(status: StatusCode, headers: &HeaderMap, body: Framing) -> ResponseHead {
        let mut raw = crate::buffers::take_write();
        let mut fields = SmallVec::new();
        for (name, value) in headers {
            let name_start = raw.len();
            raw.extend_from_slice(name.as_str().as_bytes());
            let name_span = Span::new(name_start, raw.len());
            raw.extend_from_slice(b": ");
            let value_start = raw.len();
            raw.extend_from_slice(value.as_bytes());
            fields.push((name_span, Span::new(value_start, raw.len())));
            raw.extend_from_slice(b"\r\n");
            if raw.len() > MAX_HEAD {
                break;
            }
        }
        ResponseHead {
            raw: HeadBytes::new(raw),
            status,
            reason: Span::new(0, 0),
            fields,
            connection_named: SmallVec::new(),
            body,
            reusable: false,
        }
    }

    fn forwarded_fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let named_by_connection = |name: &[u8]| {
            self.connection_named
                .iter()
                .any(|r| r.of(&self.raw).eq_ignore_ascii_case(name))
        };
        let switched = self.status == StatusCode::SWITCHING_PROTOCOLS;
        self.fields.iter().filter_map(move |(name, value)| {
            let name_bytes = name.of(&self.raw);
            // A 101 names the protocol switched to: that `Upgrade` goes to the client.
            let kept_upgrade = switched && name_bytes.eq_ignore_ascii_case(b"upgrade");
            let skip = !kept_upgrade && (is_hop_by_hop(name_bytes) || named_by_connection(name_bytes));
            (!skip).then(|| (name_bytes, value.of(&self.raw)))
        })
    }

    /// Writes the head a HTTP/1.1 client gets: the backend's status and
    /// end-to-end headers, then `framing` (a `Content-Length` from the backend
    /// is kept as it is) and, if `close`, `Connection: close`.
    /// `extra`: whole header lines Fulcrum adds (each ending in CRLF); they
    /// replace the backend's fields and the edits of the same names.
    pub fn write_for_client(
        &self,
        out: &mut Vec<u8>,
        chunked: bool,
        close: bool,
        keep_alive_10: bool,
        extra: &[u8],
        edits: &[super::edit::HeaderEdit],
    ) {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa::Buffer::new().format(self.status.as_u16()).as_bytes());
        out.push(b' ');
        let reason = self.reason.of(&self.raw);
        if reason.is_empty() {
            out.extend_from_slice(self.status.canonical_reason().unwrap_or("").as_bytes());
        } else {
            out.extend_from_slice(reason);
        }
        out.extend_from_slice(b"\r\n");
        // Fields Fulcrum writes itself (HSTS): named once, not per field.
        let replaced: smallvec::SmallVec<[&[u8]; 2]> = field_names(extra).collect();
        let is_replaced = |name: &[u8]| replaced.iter().any(|r| r.eq_ignore_ascii_case(name));
        for (name, value) in self.forwarded_fields() {
            if (chunked && name.eq_ignore_ascii_case(b"content-length"))
                || (!edits.is_empty() && super::edit::touches(edits, name))
                || is_replaced(name)
            {
                continue;
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if !edits.is_empty() {
            // The fields forwarded, of that name (never a hop-by-hop one).
            let values = |name: &str| {
                self.forwarded_fields()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                    .map(|(_, v)| v)
                    .collect()
            };
            super::edit::write_edited(edits, values, |name| is_replaced(name.as_bytes()), out);
        }
        if chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if self.status == StatusCode::SWITCHING_PROTOCOLS {
            out.extend_from_slice(b"connection: upgrade\r\n");
        } else if close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if keep_alive_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(extra);
        out.extend_from_slice(b"\r\n");
    }

    /// The value of the first header field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n.of(&self.raw).eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.of(&self.raw))
    }

    /// The backend's end-to-end headers (for an HTTP/2 client).
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.fields.len());
        for (name, value) in self.forwarded_fields() {
            if name.eq_ignore_ascii_case(b"content-length") && self.body != Framing::Empty {
                // HTTP/2 frames the body itself; a stale length would only confuse.
                if !matches!(self.body, Framing::Length(_)) {
                    continue;
                }
            }
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                map.append(name, value);
            }
        }
        map
    }
}

/// Reads a body out of a buffer, a piece at a time, whatever its framing.
#[derive(Debug)]
pub enum BodyDecoder {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// One step of [`BodyDecoder::decode`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// More input is needed.
    NeedMore,
    /// The body has ended; what is left in the buffer belongs to the next message.
    End,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty | Framing::Length(0) => BodyDecoder::Done,
            Framing::Length(n) => BodyDecoder::Length(n),
            Framing::Chunked => BodyDecoder::Chunked(ChunkedDecoder::default()),
            Framing::UntilClose => BodyDecoder::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, BodyDecoder::Done)
    }

    /// Takes the next piece of body out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        match self {
            BodyDecoder::Done => Ok(Decoded::End),
            BodyDecoder::Length(remaining) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*remaining).min(buf.len() as u64) as usize;
                *remaining -= n as u64;
                if *remaining == 0 {
                    *self = BodyDecoder::Done;
                }
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            BodyDecoder::UntilClose => {
                if buf.is_empty() {
                    Ok(Decoded::NeedMore)
                } else {
                    Ok(Decoded::Data(buf.split().freeze()))
                }
            }
            BodyDecoder::Chunked(chunked) => {
                let decoded = chunked.decode(buf)?;
                if decoded == Decoded::End {
                    *self = BodyDecoder::Done;
                }
                Ok(decoded)
            }
        }
    }

    /// The connection ended: fine only for a body that runs until it does.
    pub fn at_eof(&mut self) -> Result<(), BodyError> {
        match self {
            BodyDecoder::UntilClose | BodyDecoder::Done => {
                *self = BodyDecoder::Done;
                Ok(())
            }
            _ => Err(BodyError::Truncated),
        }
    }
}

/// The chunked transfer coding (RFC 9112 7.1), decoded incrementally.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl ChunkedDecoder {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                    if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
                        return Err(BodyError::Chunked("invalid chunk size"));
                    }
                    let size = size.iter().fold(0u64, |n, &d| n * 16 + u64::from(hex_value(d)));
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = remaining.min(buf.len() as u64) as usize;
                    self.state = if remaining == n as u64 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(remaining - n as u64)
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::Chunked("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    // Trailer fields are dropped: they are rare and mostly hop-by-hop in practice.
                    if line.is_empty() {
                        return Ok(Decoded::End);
                    }
                }
            }
        }
    }
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

/// Takes one CRLF-terminated line out of `buf` (without its CRLF).
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
    match memchr::memchr(b'\n', buf) {
        Some(end) => {
            if end == 0 || buf[end - 1] != b'\r' {
                return Err(BodyError::Chunked("line not ended by CRLF"));
            }
            let line = buf.split_to(end + 1).freeze();
            Ok(Some(line.slice(..end - 1)))
        }
        None if buf.len() > MAX_CHUNK_LINE => Err(BodyError::Chunked("line too long")),
        None => Ok(None),
    }
}

/// Appends the line that opens a chunk of `len` bytes.
pub fn chunk_header(len: usize, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// What ends a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A complete response the balancer writes itself, with a plain-text body.
/// `connection`: the `Connection` header to send, if any (`close`, `keep-alive`).
pub fn local_response(status: StatusCode, message: &str, connection: Option<&str>, extra: &[u8], out: &mut Vec<u8>) {
    status_line(status, out);
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(message.len() + 1).as_bytes());
    head_end(connection, extra, out);
    out.extend_from_slice(message.as_bytes());
    out.push(b'\n');
}

/// Now as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 5.6.7),
/// formatted once a second per thread: every answer Fulcrum writes itself
/// carries one, as a server with a clock must (RFC 9110 6.6.1).
fn write_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    std::thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let second = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            *cached = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

/// `HTTP/1.1 NNN Reason` of a local answer (no line end).
fn status_line(status: StatusCode, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status.as_u16()).as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
}

/// The end of a local answer's head: its `Date`, `Connection`, the `extra`
/// lines and the blank line.
fn head_end(connection: Option<&str>, extra: &[u8], out: &mut Vec<u8>) {
    // A filter's answer may carry its own (as on HTTP/2, where hyper adds
    // one only when there is none).
    if !replaced_by(extra, b"date") {
        out.extend_from_slice(b"\r\ndate: ");
        write_date(out);
    }
    if let Some(connection) = connection {
        out.extend_from_slice(b"\r\nconnection: ");
        out.extend_from_slice(connection.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
}

/// Writes a response with `body` as it is: a filter's answer. Its own headers
/// (`extra`, as `name: value\r\n` lines) carry its content type, if any. A
/// 204 or 304 has no body and no length; the answer to a HEAD has the length
/// and no body.
pub fn direct_response(
    status: StatusCode,
    body: &[u8],
    connection: Option<&str>,
    extra: &[u8],
    head_request: bool,
    out: &mut Vec<u8>,
) {
    let bodiless = matches!(status.as_u16(), 204 | 304);
    status_line(status, out);
    if !bodiless {
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    }
    head_end(connection, extra, out);
    if !bodiless && !head_request {
        out.extend_from_slice(body);
    }
}

/// Headers of the client's request that are not copied upstream as they are:
/// hop-by-hop ones ([`super::HOP_BY_HOP`]), framing (rewritten), `Host` and
/// the `X-Forwarded-*` family (rewritten), `Expect` (answered by the balancer).
fn rewritten_upstream(name: &[u8]) -> bool {
    // x-forwarded-client-cert: only Fulcrum may say which certificate a
    // client proved it holds; a client's own is dropped.
    const REWRITTEN: [&str; 8] = [
        "content-length",
        "host",
        "expect",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-client-cert",
        "forwarded",
    ];
    REWRITTEN.iter().any(|r| r.as_bytes().eq_ignore_ascii_case(name)) || is_hop_by_hop(name)
}

/// What the head sent upstream says about the client and the hops before.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The connection's client (as the PROXY protocol named it, if it did).
    pub client: &'a ClientAddr,
    /// The connection's client is a trusted proxy: its `X-Forwarded-*` and
    /// `Forwarded` are passed on, the chain appended to; otherwise replaced.
    pub peer_trusted: bool,
    /// Add `Via: 1.1 fulcrum`.
    pub via: bool,
    /// Add this hop's RFC 7239 `Forwarded` element (after a trusted peer's
    /// chain, which is kept; alone otherwise).
    pub forwarded: bool,
    /// An `X-Request-Id` Fulcrum made, added (a client's own is passed on as
    /// it came).
    pub request_id: Option<&'a str>,
    /// The route's filters' header edits.
    pub edits: &'a [super::edit::HeaderEdit],
}

/// This hop's `Forwarded` line (RFC 7239): `for` the connection's client (an
/// IPv6 address quoted and bracketed), the `host` asked for (quoted; left out
/// if it would need escaping) and the `proto` it came over.
fn write_forwarded_element(out: &mut Vec<u8>, client: &ClientAddr, host: &[u8]) {
    out.extend_from_slice(b"forwarded: for=");
    if client.addr.is_ipv6() {
        out.extend_from_slice(b"\"[");
        out.extend_from_slice(client.ip_text());
        out.extend_from_slice(b"]\"");
    } else {
        out.extend_from_slice(client.ip_text());
    }
    if !host.iter().any(|&b| b == b'"' || b == b'\\') {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(host);
        out.push(b'"');
    }
    out.extend_from_slice(if client.secure() {
        b";proto=https\r\n"
    } else {
        b";proto=http\r\n"
    });
}

/// Encodes the head sent upstream: HTTP/1.1 in origin form, hop-by-hop
/// headers (and those `Connection` names) removed, `X-Forwarded-*` added as
/// `forwarding` says, the client's host kept (an HTTP/2 `:authority` or
/// absolute-form target becomes `Host`; with none, `fallback_host`), framed by
/// `framing`. `upgrade`: the client asks to switch protocols, and its
/// `Upgrade` is passed on.
pub fn encode_request_head(
    request: &RequestHead,
    forwarding: &Forwarding<'_>,
    framing: Framing,
    fallback_host: &str,
    upgrade: bool,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let client = forwarding.client;
    if request.method == Method::CONNECT {
        return Err("the request target cannot be forwarded");
    }
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.push(b' ');
    request.write_origin_form(out);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    // The request target's authority wins over a Host header (RFC 9112 3.2.2).
    let host = request.host().map_or(fallback_host.as_bytes(), str::as_bytes);
    if host.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err("the host is not valid");
    }
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");

    let edits = forwarding.edits;
    for (name, value) in request.headers() {
        if rewritten_upstream(name)
            || request.named_by_connection(name)
            || (!edits.is_empty() && super::edit::touches(edits, name))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !edits.is_empty() {
        // The fields sent on as they are, of that name (never a hop-by-hop one).
        let values = |name: &str| {
            request
                .headers()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .filter(|(n, _)| !rewritten_upstream(n) && !request.named_by_connection(n))
                .map(|(_, v)| v)
                .collect()
        };
        super::edit::write_edited(edits, values, |_| false, out);
    }

    // From a trusted proxy the chain goes on; from anyone else it starts here.
    out.extend_from_slice(b"x-forwarded-for: ");
    if forwarding.peer_trusted {
        for earlier in request.header_all("x-forwarded-for") {
            out.extend_from_slice(earlier);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(client.ip_text());
    out.extend_from_slice(b"\r\nx-forwarded-host: ");
    // Looked up only for a trusted peer: a header scan per request otherwise.
    match forwarding
        .peer_trusted
        .then(|| request.header("x-forwarded-host"))
        .flatten()
    {
        Some(theirs) => out.extend_from_slice(theirs),
        None => out.extend_from_slice(host),
    }
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    match forwarding
        .peer_trusted
        .then(|| request.header("x-forwarded-proto"))
        .flatten()
    {
        Some(theirs) => out.extend_from_slice(theirs),
        None if client.secure() => out.extend_from_slice(b"https"),
        None => out.extend_from_slice(b"http"),
    }
    out.extend_from_slice(b"\r\n");
    if forwarding.peer_trusted {
        for forwarded in request.header_all("forwarded") {
            out.extend_from_slice(b"forwarded: ");
            out.extend_from_slice(forwarded);
            out.extend_from_slice(b"\r\n");
        }
    }
    if let Some(cert) = client.edge.as_deref().and_then(|e| e.client_cert.as_deref()) {
        out.extend_from_slice(b"x-forwarded-client-cert: ");
        out.extend_from_slice(cert.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if forwarding.forwarded {
        write_forwarded_element(out, client, host);
    }
    if forwarding.via {
        out.extend_from_slice(b"via: 1.1 fulcrum\r\n");
    }
    let request_id = forwarding.request_id;
    if let Some(id) = request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if upgrade && let Some(protocol) = request.header("upgrade") {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: ");
        out.extend_from_slice(protocol);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked | Framing::UntilClose => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty if matches!(request.method, Method::POST | Method::PUT | Method::PATCH) => {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Empty => {}
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Whether `extra` (whole header lines, each ending in CRLF) has a field
/// called `name`: the listener's own fields (HSTS) replace those of the
/// backend and of the filters, as they do on HTTP/2.
pub fn replaced_by(extra: &[u8], name: &[u8]) -> bool {
    field_names(extra).any(|field| field.eq_ignore_ascii_case(name))
}

/// The field names of `extra`'s lines (none when it is empty).
fn field_names(extra: &[u8]) -> impl Iterator<Item = &[u8]> {
    extra
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .filter_map(|line| line.split(|&b| b == b':').next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_answers_carry_a_date() {
        let mut out = Vec::new();
        local_response(StatusCode::NOT_FOUND, "no route", Some("close"), b"", &mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let date = text
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .unwrap_or_else(|| panic!("no date: {text}"));
        let when = httpdate::parse_http_date(date).expect("an HTTP date");
        let off = std::time::SystemTime::now().duration_since(when).unwrap_or_default();
        assert!(off < std::time::Duration::from_secs(5), "{date}");
        let mut out = Vec::new();
        direct_response(StatusCode::FORBIDDEN, b"no", None, b"x-a: 1\r\n", false, &mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(
            text.contains("\r\ndate: ") && text.ends_with("x-a: 1\r\n\r\nno"),
            "{text}"
        );
    }
    use http::Request;

    #[test]
    fn the_forwarded_element_names_this_hop_after_a_trusted_chain() {
        let mut buf = bytes::BytesMut::from(
            "GET / HTTP/1.1\r\nHost: shop.example:8080\r\nForwarded: for=198.51.100.1;proto=https\r\n\r\n",
        );
        let request = parse_request(&mut buf).expect("valid").expect("complete");
        let encode = |client: &ClientAddr, trusted: bool| {
            let forwarding = Forwarding {
                client,
                peer_trusted: trusted,
                via: false,
                forwarded: true,
                request_id: None,
                edits: &[],
            };
            let mut out = Vec::new();
            encode_request_head(&request, &forwarding, request.body, "backend:1", false, &mut out).expect("encodes");
            String::from_utf8_lossy(&out)
                .lines()
                .filter(|l| l.starts_with("forwarded: "))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let v4 = ClientAddr::new("192.0.2.7:5555".parse().expect("addr"));
        assert_eq!(
            encode(&v4, true),
            [
                "forwarded: for=198.51.100.1;proto=https",
                "forwarded: for=192.0.2.7;host=\"shop.example:8080\";proto=http"
            ],
            "a trusted peer's chain goes on"
        );
        assert_eq!(
            encode(&v4, false),
            ["forwarded: for=192.0.2.7;host=\"shop.example:8080\";proto=http"],
            "anyone else's is replaced"
        );
        let v6 = ClientAddr::new("[2001:db8::7]:5555".parse().expect("addr"));
        assert_eq!(
            encode(&v6, false),
            ["forwarded: for=\"[2001:db8::7]\";host=\"shop.example:8080\";proto=http"]
        );
    }

    #[test]
    fn the_upstream_head_is_rewritten_for_the_backend() {
        let mut buf = bytes::BytesMut::from(
            "POST http://example.com/a?b=1 HTTP/1.1\r\nHost: ignored.example\r\n\
             Connection: x-secret, keep-alive\r\nX-Secret: 1\r\nTE: trailers\r\n\
             X-Forwarded-For: 10.0.0.1\r\nContent-Length: 3\r\nAccept: */*\r\n\r\nabc",
        );
        let request = parse_request(&mut buf).expect("valid").expect("complete");
        let client = ClientAddr::new("127.0.0.9:5555".parse().expect("addr"));
        let mut forwarding = Forwarding {
            client: &client,
            peer_trusted: false,
            via: false,
            forwarded: false,
            request_id: None,
            edits: &[],
        };
        let mut out = Vec::new();
        encode_request_head(&request, &forwarding, request.body, "backend:1", false, &mut out).expect("encodes");
        // From a client no one trusts, its X-Forwarded-For is replaced.
        assert_eq!(
            String::from_utf8_lossy(&out),
            "POST /a?b=1 HTTP/1.1\r\nhost: example.com\r\nAccept: */*\r\n\
             x-forwarded-for: 127.0.0.9\r\nx-forwarded-host: example.com\r\n\
             x-forwarded-proto: http\r\ncontent-length: 3\r\n\r\n"
        );
        // From a trusted proxy the chain is appended to, and Via added when asked.
        forwarding.peer_trusted = true;
        forwarding.via = true;
        out.clear();
        encode_request_head(&request, &forwarding, request.body, "backend:1", false, &mut out).expect("encodes");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "POST /a?b=1 HTTP/1.1\r\nhost: example.com\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 127.0.0.9\r\nx-forwarded-host: example.com\r\n\
             x-forwarded-proto: http\r\nvia: 1.1 fulcrum\r\ncontent-length: 3\r\n\r\n"
        );
    }

    #[test]
    fn a_request_without_host_gets_the_fallback_and_chunked_framing() {
        let (parts, ()) = Request::get("/x").body(()).expect("valid").into_parts();
        let request = RequestHead::from_parts(&parts, Framing::Chunked).expect("fits");
        let client = ClientAddr::new("[::1]:5555".parse().expect("addr"));
        let mut out = Vec::new();
        let forwarding = Forwarding {
            client: &client,
            peer_trusted: false,
            via: false,
            forwarded: false,
            request_id: Some("abc"),
            edits: &[],
        };
        encode_request_head(&request, &forwarding, Framing::Chunked, "10.0.0.2:80", false, &mut out).expect("encodes");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("GET /x HTTP/1.1\r\nhost: 10.0.0.2:80\r\n"), "{text}");
        assert!(text.contains("x-forwarded-for: ::1\r\n"), "{text}");
        assert!(text.contains("x-request-id: abc\r\n"), "{text}");
        assert!(text.ends_with("transfer-encoding: chunked\r\n\r\n"), "{text}");
    }

    fn request(text: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(text))
    }

    #[test]
    fn a_plain_request_is_parsed_and_leaves_what_follows() {
        let mut buf = BytesMut::from("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nGET /next");
        let head = parse_request(&mut buf).expect("valid").expect("complete");
        assert_eq!(head.method, Method::GET);
        assert_eq!((head.path(), head.query()), ("/a", Some("b=1")));
        assert_eq!(head.host(), Some("x"));
        assert_eq!(head.header("x-a"), Some(&b"1"[..]));
        assert_eq!(head.body, Framing::Empty);
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"GET /next");
    }

    #[test]
    fn partial_heads_wait_and_huge_ones_are_refused() {
        assert!(request("GET / HTTP/1.1\r\nHost: x\r\n").expect("fine so far").is_none());
        let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(request(&huge).err(), Some(HeadError::TooLarge(MAX_HEAD)));
    }

    #[test]
    fn framing_that_could_smuggle_is_refused() {
        let refused = [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ];
        for text in refused {
            assert!(
                matches!(request(text), Err(HeadError::Malformed(_))),
                "{text:?} must be refused"
            );
        }
        assert_eq!(
            request("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n").err(),
            Some(HeadError::UnsupportedCoding)
        );
        let same_twice = request("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(same_twice.expect("valid").expect("complete").body, Framing::Length(5));
        let chunked = request("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(chunked.expect("valid").expect("complete").body, Framing::Chunked);
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let close = request("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(!close.expect("valid").expect("complete").keep_alive);
        let old = request("GET / HTTP/1.0\r\n\r\n");
        assert!(!old.expect("valid").expect("complete").keep_alive);
        let old_kept = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(old_kept.expect("valid").expect("complete").keep_alive);
    }

    #[test]
    fn only_an_explicit_bodiless_http11_upgrade_is_one() {
        let asks = |text: &str| request(text).expect("valid").expect("complete").upgrade;
        assert!(asks(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(!asks("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"));
        assert!(!asks("GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n\r\n"));
        assert!(!asks(
            "GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(!asks(
            "POST / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 1\r\n\r\n"
        ));
    }

    fn response(text: &str, head_request: bool) -> ResponseHead {
        parse_response(&mut BytesMut::from(text), head_request)
            .expect("valid")
            .expect("complete")
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        assert_eq!(
            response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false).body,
            Framing::Length(3)
        );
        assert_eq!(
            response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).body,
            Framing::Empty
        );
        assert_eq!(response("HTTP/1.1 204 No Content\r\n\r\n", false).body, Framing::Empty);
        let chunked = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false);
        assert_eq!((chunked.body, chunked.reusable), (Framing::Chunked, true));
        let unframed = response("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((unframed.body, unframed.reusable), (Framing::UntilClose, false));
        let closing = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
            false,
        );
        assert!(!closing.reusable);
        let old = response("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!old.reusable);
    }

    #[test]
    fn a_status_line_without_a_reason_phrase_is_accepted() {
        // httparse answers a missing reason with a static "", outside the buffer.
        let head = response("HTTP/1.1 200\r\nContent-Length: 2\r\n\r\n", false);
        assert_eq!((head.status, head.body), (StatusCode::OK, Framing::Length(2)));
        assert_eq!((head.reason.start, head.reason.end), (0, 0));
        let mut out = Vec::new();
        head.write_for_client(&mut out, false, false, false, b"", &[]);
        assert!(
            out.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn a_slice_outside_the_buffer_has_an_empty_span() {
        let whole = b"HTTP/1.1 200\r\n\r\n";
        let inside = range_in(whole, &whole[9..12]);
        assert_eq!((inside.start, inside.end), (9, 12));
        let elsewhere = range_in(whole, b"");
        assert_eq!((elsewhere.start, elsewhere.end), (0, 0));
        let other = [0u8; 4];
        let outside = range_in(whole, &other);
        assert_eq!((outside.start, outside.end), (0, 0));
    }

    #[test]
    fn the_client_head_drops_hop_by_hop_headers() {
        let head = response(
            "HTTP/1.1 200 Fine\r\nConnection: x-private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n",
            false,
        );
        let mut out = Vec::new();
        head.write_for_client(&mut out, true, false, false, b"", &[]);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 Fine\r\nX-Kept: yes\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let map = head.header_map();
        assert_eq!(map.len(), 1);
        assert_eq!(map["x-kept"], "yes");
    }

    fn decode_all(decoder: &mut BodyDecoder, input: &[u8], step: usize) -> Result<Vec<u8>, BodyError> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match decoder.decode(&mut buf)? {
                    Decoded::Data(data) => body.extend_from_slice(&data),
                    Decoded::NeedMore => break,
                    Decoded::End => return Ok(body),
                }
            }
        }
        Err(BodyError::Truncated)
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for step in 1..input.len() {
            let mut decoder = BodyDecoder::new(Framing::Chunked);
            assert_eq!(decode_all(&mut decoder, input, step).expect("valid"), b"hello world");
            assert!(decoder.is_done());
        }
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"10000000000000000\r\n",
        ] {
            let mut decoder = BodyDecoder::new(Framing::Chunked);
            assert!(decode_all(&mut decoder, bad, bad.len()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let mut decoder = BodyDecoder::new(Framing::Length(5));
        let mut buf = BytesMut::from("helloGET /");
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"hello")))
        );
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::End));
        assert_eq!(&buf[..], b"GET /");
        let mut short = BodyDecoder::new(Framing::Length(5));
        assert_eq!(short.at_eof(), Err(BodyError::Truncated));
    }

    #[test]
    fn chunk_headers_are_hex() {
        let mut out = Vec::new();
        chunk_header(0x1f40, &mut out);
        chunk_header(0, &mut out);
        assert_eq!(out, b"1f40\r\n0\r\n");
    }
}

//! gRPC's conventions as a proxy needs them (the wire protocol is HTTP/2 and
//! passes through untouched): the `grpc-timeout` a call carries, the gRPC
//! status a balancer's own error is given to a gRPC client (trailers-only),
//! `grpc-message` encoding, and the `grpc.health.v1` check's two messages.

use crate::record::Termination;
use http::StatusCode;
use std::time::Duration;

/// gRPC status codes Fulcrum answers with.
pub mod code {
    pub const UNKNOWN: u32 = 2;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// The deadline a call's `grpc-timeout` gives: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`). `None` when absent or malformed.
pub fn timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status a gRPC client gets for a balancer's own answer: by its
/// cause where that says more, else by its HTTP status as gRPC's
/// "HTTP to gRPC status code mapping" does.
pub fn status_of(status: StatusCode, cause: Termination) -> u32 {
    match cause {
        Termination::ResponseTimeout => return code::DEADLINE_EXCEEDED,
        Termination::GrpcNeedsHttp2 => return code::UNIMPLEMENTED,
        Termination::BodyTooLarge => return code::RESOURCE_EXHAUSTED,
        _ => {}
    }
    match status {
        StatusCode::BAD_REQUEST => code::INTERNAL,
        StatusCode::UNAUTHORIZED => code::UNAUTHENTICATED,
        StatusCode::FORBIDDEN => code::PERMISSION_DENIED,
        StatusCode::NOT_FOUND => code::UNIMPLEMENTED,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// `grpc-message` as the spec writes it: percent-encoded outside printable
/// ASCII, and `%` itself.
pub fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &byte in message.as_bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The path of the health check call.
pub const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// A `HealthCheckRequest { service }` as one length-prefixed gRPC message.
pub fn health_check_request(service: &str) -> Vec<u8> {
    // Field 1 (service), wire type 2 (length-delimited): tag 0x0a.
    let mut message = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        message.push(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0); // not compressed
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    framed
}

/// The `status` of a `HealthCheckResponse` in one length-prefixed message:
/// 1 is `SERVING`. `None` when the bytes are not such a message.
pub fn health_check_status(framed: &[u8]) -> Option<u64> {
    let (&compressed, rest) = framed.split_first()?;
    if compressed != 0 || rest.len() < 4 {
        return None;
    }
    let length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let mut message = rest.get(4..4 + length)?;
    // Absent field: the enum's default, UNKNOWN (0).
    let mut status = 0;
    while let Some((&tag, rest)) = message.split_first() {
        message = rest;
        match tag {
            // Field 1 (status), varint.
            0x08 => status = take_varint(&mut message)?,
            // Any other varint field is skipped; other wire types are not expected here.
            tag if tag & 0x07 == 0 => {
                take_varint(&mut message)?;
            }
            _ => return None,
        }
    }
    Some(status)
}

/// The health check's answer that means the backend serves.
pub const SERVING: u64 = 1;

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_read_in_every_unit_and_malformed_ones_ignored() {
        assert_eq!(timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout(b"10S"), Some(Duration::from_secs(10)));
        assert_eq!(timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout(b"99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [&b""[..], b"S", b"123456789S", b"1x", b"-1S", b"1.5S"] {
            assert_eq!(timeout(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn local_answers_map_to_grpc_statuses() {
        assert_eq!(
            status_of(StatusCode::GATEWAY_TIMEOUT, Termination::ResponseTimeout),
            code::DEADLINE_EXCEEDED
        );
        assert_eq!(
            status_of(StatusCode::SERVICE_UNAVAILABLE, Termination::NoBackend),
            code::UNAVAILABLE
        );
        assert_eq!(
            status_of(StatusCode::NOT_FOUND, Termination::NoRoute),
            code::UNIMPLEMENTED
        );
        assert_eq!(
            status_of(StatusCode::BAD_GATEWAY, Termination::GrpcNeedsHttp2),
            code::UNIMPLEMENTED
        );
        assert_eq!(
            status_of(StatusCode::PAYLOAD_TOO_LARGE, Termination::BodyTooLarge),
            code::RESOURCE_EXHAUSTED
        );
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("no backend: 100% down\n"), "no backend: 100%25 down%0A");
        assert_eq!(encode_message("héllo"), "h%C3%A9llo");
    }

    #[test]
    fn health_messages_round_trip() {
        assert_eq!(health_check_request(""), vec![0, 0, 0, 0, 0]);
        assert_eq!(
            health_check_request("api"),
            vec![0, 0, 0, 0, 5, 0x0a, 3, b'a', b'p', b'i']
        );
        assert_eq!(health_check_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(SERVING));
        assert_eq!(health_check_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        assert_eq!(health_check_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(health_check_status(&[0, 0, 0, 0, 3, 0x08]), None);
        assert_eq!(health_check_status(&[1, 0, 0, 0, 0]), None);
    }
}

//! Buffers recycled per worker thread, so the request path does not allocate
//! one per request: read buffers (a connection takes one when it has bytes to
//! read and gives it back when it has none left to parse) and write buffers
//! (the upstream request head, then the client's response).

use bytes::BytesMut;
use std::cell::RefCell;

/// The size of every recycled buffer.
pub const SIZE: usize = 4 * 1024;
/// Buffers of each kind a thread keeps spare; beyond that they are freed, so
/// idle memory stays bounded (at most a few MiB per worker). Enough for a few
/// hundred requests in flight per worker to recycle rather than allocate.
const SPARE: usize = 256;
/// Read buffers grown past this (a large body read) are freed rather than kept.
const READ_KEEP_MAX: usize = 32 * 1024;

/// The capacity a write buffer starts with.
pub const WRITE_SIZE: usize = 1024;
/// Write buffers grown past this are freed rather than kept (large bodies are
/// rare, and their allocation is spread over many bytes).
const WRITE_KEEP_MAX: usize = 16 * 1024;

thread_local! {
    static SPARES: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static WRITE_SPARES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least [`SIZE`] bytes.
pub fn take() -> BytesMut {
    let spare = SPARES.with(|spares| spares.borrow_mut().pop());
    match spare {
        Some(mut buf) => {
            // Reclaims the whole allocation when nothing else still points into it.
            buf.reserve(SIZE);
            buf
        }
        None => BytesMut::with_capacity(SIZE),
    }
}

/// Gives a buffer back for reuse; what it holds is discarded.
pub fn give(mut buf: BytesMut) {
    if buf.capacity() == 0 || buf.capacity() > READ_KEEP_MAX {
        return;
    }
    buf.clear();
    keep(&SPARES, buf);
}

/// An empty write buffer with room for at least [`WRITE_SIZE`] bytes.
pub fn take_write() -> Vec<u8> {
    WRITE_SPARES
        .with(|spares| spares.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(WRITE_SIZE))
}

/// Gives a write buffer back for reuse; what it holds is discarded.
pub fn give_write(mut buf: Vec<u8>) {
    if buf.capacity() < WRITE_SIZE || buf.capacity() > WRITE_KEEP_MAX {
        return;
    }
    buf.clear();
    keep(&WRITE_SPARES, buf);
}

/// A message head's bytes in a recycled write buffer, given back when dropped.
#[derive(Debug, Default)]
pub struct HeadBytes(Vec<u8>);

impl HeadBytes {
    /// A copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> HeadBytes {
        let mut buf = take_write();
        buf.extend_from_slice(bytes);
        HeadBytes(buf)
    }

    /// Bytes written into a buffer from [`take_write`].
    pub fn new(buf: Vec<u8>) -> HeadBytes {
        HeadBytes(buf)
    }
}

impl std::ops::Deref for HeadBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for HeadBytes {
    fn drop(&mut self) {
        give_write(std::mem::take(&mut self.0));
    }
}

/// Adds `buf` to this thread's `spares` unless [`SPARE`] are kept already.
fn keep<T: 'static>(spares: &'static std::thread::LocalKey<RefCell<Vec<T>>>, buf: T) {
    spares.with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < SPARE {
            spares.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_reused_whole() {
        let mut buf = take();
        let address = buf.as_ptr();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\nrest");
        let head = buf.split_to(18).freeze();
        drop(head);
        give(buf);
        let again = take();
        assert!(again.is_empty());
        assert!(again.capacity() >= SIZE);
        assert_eq!(again.as_ptr(), address, "the allocation is reclaimed, not replaced");
    }

    #[test]
    fn write_buffers_are_reused_unless_grown_large() {
        let mut buf = take_write();
        buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
        let address = buf.as_ptr();
        give_write(buf);
        let again = take_write();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), address);

        let mut large = again;
        large.reserve(WRITE_KEEP_MAX * 2);
        give_write(large);
        let after = take_write();
        assert!(after.capacity() < WRITE_KEEP_MAX, "a large buffer is freed, not kept");
    }
}

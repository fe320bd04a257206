//! Read buffers recycled per worker thread, so the request path does not
//! allocate one per read: a connection takes a buffer when it has bytes to
//! read and gives it back when it has none left to parse.

use bytes::BytesMut;
use std::cell::RefCell;

/// The size of every recycled buffer.
pub const SIZE: usize = 4 * 1024;
/// Buffers a thread keeps spare; beyond that they are freed, so idle memory stays bounded.
const SPARE: usize = 64;

thread_local! {
    static SPARES: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
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
    if buf.capacity() == 0 {
        return;
    }
    buf.clear();
    SPARES.with(|spares| {
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
}

//! Per-worker pool of relay buffers.
//!
//! Owned by one worker thread (thread-local, no locks). A relay direction borrows a large buffer
//! only while data is flowing and gives it back as soon as a read comes back short, so idle
//! connections pin no buffer memory and a bulk stream keeps one buffer for its whole life.

use std::cell::RefCell;

/// Size of a relay buffer. Measured on a bulk stream through the proxy: 256 KiB moves about
/// 1.3x the bytes of 64 KiB for 0.7x the CPU per byte (fewer reads, writes and wakeups); only
/// connections with data in flight hold one.
pub const BUF_SIZE: usize = 256 * 1024;

/// Free buffers kept per worker; beyond this they go back to the allocator.
const MAX_POOLED: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Takes an empty buffer with `BUF_SIZE` capacity.
pub fn take() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
}

/// Returns a buffer to the pool (or frees it when the pool is full or the buffer is foreign).
pub fn give(mut buf: Vec<u8>) {
    if buf.capacity() != BUF_SIZE {
        return;
    }
    buf.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < MAX_POOLED {
            p.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_cleared() {
        let mut a = take();
        a.extend_from_slice(b"hello");
        let ptr = a.as_ptr();
        give(a);
        let b = take();
        assert_eq!(b.as_ptr(), ptr, "the pooled buffer is handed out again");
        assert!(b.is_empty());
        assert_eq!(b.capacity(), BUF_SIZE);
        // A buffer of another size is not pooled.
        give(Vec::with_capacity(10));
        assert_eq!(take().capacity(), BUF_SIZE);
    }
}

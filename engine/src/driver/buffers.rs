//! The provided-buffer ring of one io_uring (`IORING_REGISTER_PBUF_RING`):
//! a worker's receive buffers, shared by all its connections. A receive
//! takes a buffer only when bytes arrive, and the buffer goes back once its
//! bytes are sent, so memory follows the bytes in flight, not the number of
//! connections. With `ring.rs` and `sys.rs`, one of the engine's unsafe
//! fences.
//!
//! Ownership, as compio's buffer pools do it: a buffer is the kernel's while
//! it sits in the ring; a receive completion hands it out as a
//! [`ProvidedBuffer`], a token that is neither `Copy` nor `Clone`, so one owner
//! holds it at a time: the ring pump that received into it, then the driver
//! while a send reads it (the send takes the token by value and its
//! completion hands it back). Dropping the token is the one way a buffer
//! returns: it goes on the ring's [`Returns`] list, and the ring publishes
//! the list to the kernel before its next wait ([`BufferRing::publish`]).

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// The ring entries must start on a page boundary.
const PAGE_BYTES: usize = 4096;

/// Buffers whose tokens were dropped since the ring last published them.
#[derive(Debug, Default)]
pub struct Returns(RefCell<Vec<u16>>);

impl Returns {
    /// A token for buffer `id`, which a completion just handed out. Only
    /// the ring lends (and tests, with a list of their own).
    pub(in crate::driver) fn lend(self: &Rc<Self>, id: u16) -> ProvidedBuffer {
        ProvidedBuffer { id, returns: Rc::clone(self) }
    }

    #[cfg(test)]
    pub(crate) fn lend_for_test(self: &Rc<Self>, id: u16) -> ProvidedBuffer {
        self.lend(id)
    }

    /// The buffers returned since the last call, in the order they came.
    pub fn take(&self) -> Vec<u16> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

/// One buffer of the ring, owned (see the module's doc). Dropping it gives
/// the buffer back.
pub(crate) struct ProvidedBuffer {
    id: u16,
    returns: Rc<Returns>,
}

impl ProvidedBuffer {
    #[cfg(test)]
    pub fn id(&self) -> u16 {
        self.id
    }
}

impl fmt::Debug for ProvidedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProvidedBuffer({})", self.id)
    }
}

impl Drop for ProvidedBuffer {
    fn drop(&mut self) {
        self.returns.0.borrow_mut().push(self.id);
    }
}

pub struct BufferRing {
    /// One anonymous mapping: the ring's entries on the first page(s), then
    /// the buffers. Pages of a buffer the kernel never filled are never
    /// touched, so they cost no memory.
    mapping: NonNull<u8>,
    mapping_bytes: usize,
    entries: NonNull<BufRingEntry>,
    memory: NonNull<u8>,
    count: u16,
    buffer_bytes: u32,
    /// The next tail to publish (the kernel reads it, we write it).
    tail: u16,
    returns: Rc<Returns>,
}

impl BufferRing {
    /// `count` buffers (a power of two, at most 32768) of `buffer_bytes`
    /// each (a multiple of the page size), all in the ring.
    pub fn new(count: u16, buffer_bytes: u32) -> io::Result<BufferRing> {
        let bytes = usize::try_from(buffer_bytes).unwrap_or(usize::MAX);
        if !count.is_power_of_two() || count > 1 << 15 || bytes == 0 || bytes % PAGE_BYTES != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad buffer ring size"));
        }
        let entries_bytes = (usize::from(count) * size_of::<BufRingEntry>()).next_multiple_of(PAGE_BYTES);
        let mapping_bytes = entries_bytes + usize::from(count) * bytes;
        // SAFETY: a new private anonymous mapping touches no existing memory.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapping_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mapping =
            NonNull::new(mapping.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: `entries_bytes` < `mapping_bytes`: the buffers start inside the mapping.
        let memory = unsafe { mapping.add(entries_bytes) };
        let mut ring = BufferRing {
            mapping,
            mapping_bytes,
            entries: mapping.cast::<BufRingEntry>(),
            memory,
            count,
            buffer_bytes,
            tail: 0,
            returns: Rc::default(),
        };
        for id in 0..count {
            ring.put(id);
        }
        Ok(ring)
    }

    /// The address to register with the kernel.
    pub fn ring_address(&self) -> u64 {
        self.entries.as_ptr() as u64
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    pub fn buffer_bytes(&self) -> u32 {
        self.buffer_bytes
    }

    /// A token for buffer `id`, named by a receive's completion: the
    /// kernel took it from the ring, so nobody else holds it.
    pub fn lend(&self, id: u16) -> ProvidedBuffer {
        self.returns.lend(id)
    }

    /// Puts every buffer whose token was dropped back in the ring, for the
    /// kernel to fill again. The ring calls it before each wait: with
    /// DEFER_TASKRUN the kernel fills buffers only inside that wait.
    pub fn publish(&mut self) {
        for id in self.returns.take() {
            self.put(id);
        }
    }

    /// Where buffer `buffer`'s bytes start, plus `offset`.
    pub fn address_of(&self, buffer: &ProvidedBuffer, offset: u32) -> *const u8 {
        self.address(buffer.id, offset)
    }

    fn address(&self, id: u16, offset: u32) -> *const u8 {
        let at = usize::from(id % self.count) * self.buffer_bytes as usize
            + offset.min(self.buffer_bytes) as usize;
        // SAFETY: `at` is within the allocation (id is reduced modulo count,
        // offset clamped to one buffer's length).
        unsafe { self.memory.as_ptr().add(at) }
    }

    /// Puts buffer `id` in the ring: at the start, or once its token was
    /// dropped (no owner, no operation in flight uses it).
    fn put(&mut self, id: u16) {
        let mask = self.count - 1;
        let slot = usize::from(self.tail & mask);
        let address = self.address(id, 0) as u64;
        // SAFETY: `slot` < count, so the entry is within the allocation; the
        // kernel reads entries only up to the published tail, and this one
        // is past it until the store below.
        let entry = unsafe { &mut *self.entries.as_ptr().add(slot) };
        entry.set_addr(address);
        entry.set_len(self.buffer_bytes);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in the first entry, which is
        // initialised; the kernel reads it concurrently, hence the atomic
        // store, with Release so the entry written above is seen first.
        let tail = unsafe { &*BufRingEntry::tail(self.entries.as_ptr()).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length. The ring that
        // used it is gone (`Ring` closes its `IoUring` first); with
        // DEFER_TASKRUN, which the ring path requires, the kernel copies into
        // a buffer only inside this thread's io_uring_enter, which cannot
        // happen after the ring is closed.
        unsafe { libc::munmap(self.mapping.as_ptr().cast(), self.mapping_bytes) };
    }
}

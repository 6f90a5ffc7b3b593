//! Pools of pipes (for splice) and buffers (for copying), per worker.
//!
//! An idle connection holds neither: a pump takes one when data arrives and
//! gives it back once drained. That keeps memory per connection bounded and
//! keeps the process under the kernel's per-user pipe budget
//! (`pipe-user-pages-soft`, 64 MiB), past which new pipes shrink to one page.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// One pipe used as an in-kernel buffer between two sockets.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Self> {
        let (read, write) = sys::pipe()?;
        // The kernel may refuse a large pipe (over pipe-max-size, or over the
        // user's pipe budget); the default 64 KiB pipe still works, only slower.
        if size > 0 && sys::set_pipe_size(write.as_fd(), size).is_err() {
            tracing::debug!(size, "pipe size refused; using the kernel default");
        }
        Ok(Pipe { read, write })
    }

    /// Moves up to `len` bytes from `src` into the pipe (`splice(2)`,
    /// non-blocking).
    pub fn fill_from(&self, src: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        sys::splice(src, self.write.as_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe to `dst` (`splice(2)`,
    /// non-blocking).
    pub fn drain_to(&self, dst: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        sys::splice(self.read.as_fd(), dst, len)
    }
}

/// A buffer for the copy path, where splice is refused.
pub type Buffer = Box<[u8]>;

/// Size of one copy buffer.
pub const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Idle pipes and buffers kept for reuse by one worker.
#[derive(Debug)]
pub struct Pools {
    pipes: Vec<Pipe>,
    buffers: Vec<Buffer>,
    pipe_size: usize,
    max_idle: usize,
    /// Test seam: making a pipe fails as out of descriptors (EMFILE).
    #[cfg(test)]
    pub refuse_pipes: bool,
}

impl Pools {
    /// `pipe_size` is the capacity asked for each pipe; at most `max_idle`
    /// pipes and buffers each are kept when not in use.
    pub fn new(pipe_size: usize, max_idle: usize) -> Self {
        Pools {
            pipes: Vec::new(),
            buffers: Vec::new(),
            pipe_size,
            max_idle,
            #[cfg(test)]
            refuse_pipes: false,
        }
    }

    pub fn take_pipe(&mut self) -> io::Result<Pipe> {
        #[cfg(test)]
        if self.refuse_pipes {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        match self.pipes.pop() {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(self.pipe_size),
        }
    }

    /// Returns an empty pipe to the pool (a pipe holding data must be dropped).
    pub fn give_pipe(&mut self, pipe: Pipe) {
        if self.pipes.len() < self.max_idle {
            self.pipes.push(pipe);
        }
    }

    pub fn take_buffer(&mut self) -> Buffer {
        self.buffers.pop().unwrap_or_else(|| vec![0; COPY_BUFFER_BYTES].into_boxed_slice())
    }

    pub fn give_buffer(&mut self, buffer: Buffer) {
        if self.buffers.len() < self.max_idle {
            self.buffers.push(buffer);
        }
    }

    /// Pipes and buffers currently idle in the pool.
    #[cfg(test)]
    pub fn idle(&self) -> (usize, usize) {
        (self.pipes.len(), self.buffers.len())
    }
}

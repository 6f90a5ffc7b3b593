//! DNS over a stream socket (RFC 7766 section 8, RFC 1035 section 4.2.2):
//! each message is sent after its length as two big-endian bytes. The
//! enclave's forwarder and the parent's server both speak it, on the vsock
//! hop (Nitro has no vsock datagrams) and to TCP clients, so the framing
//! lives here once, with its limits.
//!
//! A frame of length zero is no DNS message (a header alone is 12 bytes):
//! it is an error, and so is a stream that ends inside a frame. Both leave
//! the stream out of step, so the caller closes it. [`read_frame`] is not
//! cancel-safe: a frame half read when its future is dropped is lost, so a
//! reader owns its stream's read half and is not raced in a `select!`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest message a frame can carry: its length is 16 bits.
pub const MAX_FRAME_BYTES: usize = u16::MAX as usize;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame of length zero: no DNS message.
    #[error("a frame of length zero")]
    Empty,
    /// A frame longer than the reader accepts, or a message too long for
    /// a frame.
    #[error("a message of {len} bytes, above the limit of {limit}")]
    TooLong { len: usize, limit: usize },
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
}

/// Reads one frame's message. `Ok(None)`: the stream ended cleanly, between
/// frames. A frame longer than `limit` (at most [`MAX_FRAME_BYTES`] are
/// possible) is an error, and its bytes are not read. Not cancel-safe (see
/// the module docs).
pub async fn read_frame<R>(reader: &mut R, limit: usize) -> Result<Option<Vec<u8>>, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut prefix = [0u8; 2];
    let first = reader.read(&mut prefix).await?;
    match first {
        0 => return Ok(None),
        1 => read_exact_or_truncated(reader, &mut prefix[1..]).await?,
        _ => {}
    }
    let len = usize::from(u16::from_be_bytes(prefix));
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > limit {
        return Err(FrameError::TooLong { len, limit });
    }
    let mut message = vec![0u8; len];
    read_exact_or_truncated(reader, &mut message).await?;
    Ok(Some(message))
}

async fn read_exact_or_truncated<R>(reader: &mut R, buf: &mut [u8]) -> Result<(), FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// The frame of `message`: its length, then itself. An empty message or
/// one above [`MAX_FRAME_BYTES`] is an error.
pub fn encode_frame(message: &[u8]) -> Result<Vec<u8>, FrameError> {
    if message.is_empty() {
        return Err(FrameError::Empty);
    }
    let len = u16::try_from(message.len())
        .map_err(|_| FrameError::TooLong { len: message.len(), limit: MAX_FRAME_BYTES })?;
    let mut frame = Vec::with_capacity(2 + message.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    Ok(frame)
}

/// Writes `message` as one frame, in one write where the stream takes it
/// (length and message together: two small writes would cost a second
/// segment or vsock packet per message). Errors as [`encode_frame`]'s.
pub async fn write_frame<W>(writer: &mut W, message: &[u8]) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let frame = encode_frame(message)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use proptest::prelude::*;
    use tokio::io::ReadBuf;

    use super::*;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
    }

    /// A reader that hands out one byte per read, and says "not yet"
    /// before each, as a stream of one-byte segments would.
    struct OneByteAtATime<'a> {
        bytes: &'a [u8],
        ready: bool,
    }

    impl AsyncRead for OneByteAtATime<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if !self.ready {
                self.ready = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.ready = false;
            if let Some((first, rest)) = self.bytes.split_first() {
                buf.put_slice(&[*first]);
                self.bytes = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn frames_read_back_what_was_written_even_one_byte_per_read() {
        let (a, b) = (vec![7u8; 12], vec![9u8; 300]);
        let mut stream = Vec::new();
        block_on(write_frame(&mut stream, &a)).unwrap();
        block_on(write_frame(&mut stream, &b)).unwrap();
        assert_eq!(&stream[..2], &[0, 12]);
        assert_eq!(&stream[14..16], &[1, 44]);
        let mut whole: &[u8] = &stream;
        let mut slow = OneByteAtATime { bytes: &stream, ready: false };
        for reader in [&mut whole as &mut (dyn AsyncRead + Unpin), &mut slow] {
            assert_eq!(block_on(read_frame(reader, MAX_FRAME_BYTES)).unwrap(), Some(a.clone()));
            assert_eq!(block_on(read_frame(reader, MAX_FRAME_BYTES)).unwrap(), Some(b.clone()));
            assert_eq!(block_on(read_frame(reader, MAX_FRAME_BYTES)).unwrap(), None, "a clean end");
        }
    }

    #[test]
    fn zero_length_oversized_and_cut_frames_are_errors() {
        let mut empty: &[u8] = &[0, 0, 1];
        assert!(matches!(block_on(read_frame(&mut empty, MAX_FRAME_BYTES)), Err(FrameError::Empty)));
        let mut long: &[u8] = &[2, 1, 0, 0];
        assert!(matches!(
            block_on(read_frame(&mut long, 512)),
            Err(FrameError::TooLong { len: 513, limit: 512 })
        ));
        assert_eq!(long, &[0, 0], "an oversized frame's bytes are not read");
        for cut in [&[0u8][..], &[0, 5, 1, 2]] {
            let mut cut = cut;
            assert!(matches!(block_on(read_frame(&mut cut, MAX_FRAME_BYTES)), Err(FrameError::Truncated)));
        }
        let mut sink = Vec::new();
        assert!(matches!(block_on(write_frame(&mut sink, &[])), Err(FrameError::Empty)));
        let huge = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            block_on(write_frame(&mut sink, &huge)),
            Err(FrameError::TooLong { len: 65_536, limit: 65_535 })
        ));
        assert!(sink.is_empty(), "nothing written for a message that has no frame");
        let largest = vec![1u8; MAX_FRAME_BYTES];
        assert_eq!(&encode_frame(&largest).unwrap()[..2], &[255, 255]);
    }

    proptest! {
        #[test]
        fn any_bytes_read_as_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), limit in 0usize..700) {
            let mut reader: &[u8] = &bytes;
            let mut consumed = 0;
            while let Ok(Some(message)) = block_on(read_frame(&mut reader, limit)) {
                prop_assert!(!message.is_empty() && message.len() <= limit);
                consumed += 2 + message.len();
            }
            prop_assert!(consumed <= bytes.len());
        }
    }
}

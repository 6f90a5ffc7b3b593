//! DNS over a stream (RFC 7766, 8): each message preceded by its length,
//! two bytes, big-endian. (Placeholder until the forwarder's slice lands.)

use std::io::{self, Read, Write};

/// Largest message a frame carries.
pub const MAX_MESSAGE_BYTES: usize = u16::MAX as usize;

/// The next message (blocking); `None` at a clean end of stream.
pub fn read_message(stream: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut length = [0u8; 2];
    match stream.read_exact(&mut length) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut message)?;
    Ok(Some(message))
}

/// Writes one message with its length, in one write.
pub fn write_message(stream: &mut impl Write, message: &[u8]) -> io::Result<()> {
    let length =
        u16::try_from(message.len()).map_err(|_| io::Error::other("a DNS message over 65,535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed)
}

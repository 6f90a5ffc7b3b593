//! Reproducible byte streams: a seeded generator, writes of random sizes,
//! and SHA-256 of what was sent and received.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// A small, fast PRNG (SplitMix64): plenty for test data and sizes.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }
}

/// The seeded byte stream: byte `i` depends only on `seed` and `i`, so any
/// chunking of the stream gives the same bytes.
#[derive(Clone, Debug)]
pub struct Data {
    seed: u64,
    offset: u64,
}

impl Data {
    pub fn new(seed: u64) -> Self {
        Data { seed, offset: 0 }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let at = self.offset + i as u64;
            let word =
                mix(self.seed.wrapping_add((at / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15))).to_le_bytes();
            let start = (at % 8) as usize;
            let n = (8 - start).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&word[start..start + n]);
            i += n;
        }
        self.offset += buf.len() as u64;
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The SHA-256 of the `len` bytes [`send`] writes for `seed`.
pub fn expected_hash(len: u64, seed: u64) -> [u8; 32] {
    let mut data = Data::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        data.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    hasher.finalize().into()
}

/// Writes `len` seeded bytes in writes of random sizes (1 B to 256 KiB);
/// returns their SHA-256.
pub fn send(stream: &mut impl Write, len: u64, seed: u64) -> io::Result<[u8; 32]> {
    let mut data = Data::new(seed);
    let mut sizes = Rng::new(seed.rotate_left(17) ^ 0x5555);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = sizes.between(1, buf.len() as u64).min(left) as usize;
        data.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hasher.finalize().into())
}

/// Reads to EOF; returns the byte count and SHA-256.
pub fn receive(stream: &mut impl Read) -> io::Result<(u64, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((total, hasher.finalize().into())),
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Hex of a hash, for messages.
pub fn hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

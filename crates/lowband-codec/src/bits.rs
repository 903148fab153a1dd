//! Bit streams (least significant bit first) and Elias-Fano coding of sorted index sets.
//!
//! Readers never panic and never read past their slice: callers check a payload's exact length
//! before decoding, and a reader past its end yields zero bits, which later checks reject.

/// Appends bits to a byte vector, least significant bit first.
pub(crate) struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    buffer: u64,
    filled: u32,
}

impl<'a> BitWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter {
            out,
            buffer: 0,
            filled: 0,
        }
    }

    /// Bits in the vector so far, the pending ones included.
    pub fn bit_len(&self) -> usize {
        self.out.len() * 8 + self.filled as usize
    }

    /// Append the first `bits` bits of `bytes` (as another writer laid them out), as if each had
    /// been written here one by one.
    pub fn append(&mut self, bytes: &[u8], bits: usize) {
        debug_assert!(bits <= bytes.len() * 8);
        let whole = bits / 8;
        if self.filled == 0 {
            self.out.extend_from_slice(&bytes[..whole]);
        } else {
            self.out.reserve(whole);
            for &byte in &bytes[..whole] {
                self.buffer |= (byte as u64) << self.filled;
                self.out.push(self.buffer as u8);
                self.buffer >>= 8;
            }
        }
        let rest = (bits % 8) as u32;
        if rest > 0 {
            self.write(bytes[whole] as u32, rest);
        }
    }

    /// Write the low `width` bits of `value` (`width` ≤ 32).
    #[inline]
    pub fn write(&mut self, value: u32, width: u32) {
        debug_assert!(width <= 32);
        if width == 0 {
            return;
        }
        let masked = (value as u64) & ((1u64 << width) - 1);
        // Fewer than 32 bits are pending, so they and the new ones fit the buffer; whole words
        // go out 4 bytes at a time (least significant first, as byte by byte would).
        self.buffer |= masked << self.filled;
        self.filled += width;
        if self.filled >= 32 {
            self.out
                .extend_from_slice(&(self.buffer as u32).to_le_bytes());
            self.buffer >>= 32;
            self.filled -= 32;
        }
    }

    /// Flush the pending bits, the last partial byte zero padded.
    pub fn finish(mut self) {
        while self.filled > 0 {
            self.out.push(self.buffer as u8);
            self.buffer >>= 8;
            self.filled = self.filled.saturating_sub(8);
        }
    }
}

/// Reads bits written by [`BitWriter`].
pub(crate) struct BitReader<'a> {
    bytes: &'a [u8],
    next_byte: usize,
    buffer: u64,
    filled: u32,
}

impl<'a> BitReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        BitReader {
            bytes,
            next_byte: 0,
            buffer: 0,
            filled: 0,
        }
    }

    /// A reader whose first bit is bit `bit` of `bytes` (least significant first).
    pub fn at(bytes: &'a [u8], bit: usize) -> Self {
        let mut reader = BitReader {
            bytes,
            next_byte: bit / 8,
            buffer: 0,
            filled: 0,
        };
        reader.read((bit % 8) as u32);
        reader
    }

    #[inline]
    pub fn read(&mut self, width: u32) -> u32 {
        debug_assert!(width <= 32);
        if width == 0 {
            return 0;
        }
        while self.filled < width {
            let byte = self.bytes.get(self.next_byte).copied().unwrap_or(0);
            self.next_byte += 1;
            self.buffer |= (byte as u64) << self.filled;
            self.filled += 8;
        }
        let value = (self.buffer & ((1u64 << width) - 1)) as u32;
        self.buffer >>= width;
        self.filled -= width;
        value
    }
}

/// Low-bit width of an Elias-Fano code of `k` sorted positions in `[0, len)`.
pub(crate) fn elias_fano_low_bits(len: usize, k: usize) -> u32 {
    if k == 0 || len <= k {
        0
    } else {
        (len / k).ilog2()
    }
}

/// Exact size in bits of the Elias-Fano code of `k` sorted positions in `[0, len)`.
pub(crate) fn elias_fano_bits(len: usize, k: usize) -> usize {
    if k == 0 {
        return 0;
    }
    let low = elias_fano_low_bits(len, k);
    k * low as usize + k + ((len - 1) >> low)
}

/// Write strictly increasing `positions` (all `< len`).
pub(crate) fn elias_fano_write(writer: &mut BitWriter, positions: &[u32], len: usize) {
    let k = positions.len();
    if k == 0 {
        return;
    }
    let low = elias_fano_low_bits(len, k);
    for &p in positions {
        writer.write(p, low);
    }
    // Upper parts in unary: position i's high part h sets bit h + i of a (k + max_high)-bit
    // vector, written 32 bits at a time (positions ascend, so the bits do).
    let upper_len = k + ((len - 1) >> low);
    let (mut word, mut word_start) = (0u32, 0usize);
    for (i, &p) in positions.iter().enumerate() {
        let bit = (p >> low) as usize + i;
        while bit >= word_start + 32 {
            writer.write(word, 32);
            (word, word_start) = (0, word_start + 32);
        }
        word |= 1 << (bit - word_start);
    }
    while word_start + 32 <= upper_len {
        writer.write(word, 32);
        (word, word_start) = (0, word_start + 32);
    }
    writer.write(word, (upper_len - word_start) as u32);
}

/// Read `out.len()` positions in `[0, len)`; `None` if the code is not a strictly increasing set.
pub(crate) fn elias_fano_read(reader: &mut BitReader, out: &mut [u32], len: usize) -> Option<()> {
    let k = out.len();
    if k == 0 {
        return Some(());
    }
    let low = elias_fano_low_bits(len, k);
    for o in out.iter_mut() {
        *o = reader.read(low);
    }
    let upper_len = k + ((len - 1) >> low);
    let mut found = 0usize;
    let mut bit = 0usize;
    while bit < upper_len {
        let width = (upper_len - bit).min(32) as u32;
        let mut word = reader.read(width);
        while word != 0 {
            let offset = word.trailing_zeros() as usize;
            word &= word - 1;
            if found == k {
                return None; // more ones than positions
            }
            let high = bit + offset - found;
            out[found] |= (high as u32) << low;
            found += 1;
        }
        bit += width as usize;
    }
    if found != k {
        return None;
    }
    let increasing = out.windows(2).all(|w| w[0] < w[1]);
    let in_range = (out[k - 1] as usize) < len;
    (increasing && in_range).then_some(())
}

/// SplitMix64: the pseudo-random stream of the wire format (random-k indices, stochastic
/// rounding). Specified here rather than borrowed from a crate so that the index set of a
/// `randomk` packet can never change with a dependency's version.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SplitMix64(pub u64);

impl SplitMix64 {
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 bits of resolution.
    #[inline]
    pub fn next_unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// The stream `draws` values further on, without drawing them (the state is a counter: the
    /// i-th draw depends on i alone, so the draws can be made in parallel).
    #[inline]
    pub fn skipped(&self, draws: u64) -> SplitMix64 {
        SplitMix64(
            self.0
                .wrapping_add(draws.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        )
    }

    /// Uniform in [0, bound) (Lemire's multiply-shift; the bias is below 2^-32 for our bounds).
    #[inline]
    pub fn below(&mut self, bound: u32) -> u32 {
        (((self.next_u64() >> 32) * bound as u64) >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elias_fano_round_trips_and_matches_its_size() {
        let cases: &[(&[u32], usize)] = &[
            (&[0], 1),
            (&[3], 4),
            (&[0, 1, 2, 3], 4),
            (&[5, 77, 4095], 4096),
            (&[1, 2, 900, 1000, 1023], 1024),
        ];
        for &(positions, len) in cases {
            let mut bytes = Vec::new();
            let mut writer = BitWriter::new(&mut bytes);
            elias_fano_write(&mut writer, positions, len);
            writer.finish();
            assert_eq!(
                bytes.len(),
                elias_fano_bits(len, positions.len()).div_ceil(8)
            );
            let mut out = vec![0u32; positions.len()];
            elias_fano_read(&mut BitReader::new(&bytes), &mut out, len).unwrap();
            assert_eq!(out, positions);
        }
        assert_eq!(elias_fano_bits(4096, 64), 64 * 6 + 64 + 63);
    }

    #[test]
    fn appended_streams_equal_one_stream() {
        // Pieces of 0..40 bits at every alignment, written once straight and once as streams.
        let pieces: Vec<(u32, u32)> = (0..60u32)
            .map(|i| (i.wrapping_mul(2_654_435_761), (i * 7) % 33))
            .collect();
        let mut straight = Vec::new();
        let mut writer = BitWriter::new(&mut straight);
        for &(value, width) in &pieces {
            writer.write(value, width);
        }
        writer.finish();
        let mut joined = Vec::new();
        let mut writer = BitWriter::new(&mut joined);
        for group in pieces.chunks(5) {
            let mut bytes = Vec::new();
            let mut part = BitWriter::new(&mut bytes);
            for &(value, width) in group {
                part.write(value, width);
            }
            let bits = part.bit_len();
            part.finish();
            writer.append(&bytes, bits);
        }
        writer.finish();
        assert_eq!(joined, straight);
    }

    #[test]
    fn elias_fano_rejects_codes_that_are_not_sets() {
        // k = 2 in [0, 2): low bits 0, upper vector of 3 bits. {0, 1} sets bits 0 and 2.
        let read = |code: u32, len: usize| {
            let mut bytes = Vec::new();
            let mut writer = BitWriter::new(&mut bytes);
            writer.write(code, 8);
            writer.finish();
            let mut out = [0u32; 2];
            elias_fano_read(&mut BitReader::new(&bytes), &mut out, len).map(|_| out)
        };
        assert_eq!(read(0b101, 2), Some([0, 1]));
        assert_eq!(read(0b011, 2), None, "a repeated position");
        assert_eq!(read(0b001, 2), None, "too few ones");
        assert_eq!(read(0b111, 2), None, "too many ones");
        assert_eq!(read(0b110, 2), None, "position 2 is out of range");
    }
}

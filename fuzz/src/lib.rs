//! The harness every decoder's fuzz target shares.

/// Largest count a fuzz input may claim (the decoder itself never sizes anything from it).
const COUNT_MAX: usize = 1 << 14;

/// Decode `data` with the codec `spec` names: a typed error or a finite decode, never a panic.
pub fn decode_with(spec: &str, data: &[u8]) {
    let spec: lowband_codec::CodecSpec = spec.parse().expect("valid spec");
    let mut codec = lowband_codec::build(&spec).expect("valid spec");
    // Decode with the count the header claims (so that well-formed inputs get through), bounded.
    let claimed = data
        .get(2..6)
        .map_or(1, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let mut out = vec![0.0f32; claimed.clamp(1, COUNT_MAX)];
    if codec.decode(data, &mut out).is_ok() {
        assert!(
            out.iter().all(|v| v.is_finite()),
            "a decoder returned a non-finite value"
        );
    }
    let _ = lowband_codec::describe(data);
}

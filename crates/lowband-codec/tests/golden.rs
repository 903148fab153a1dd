//! Golden packets: every codec's bytes for one fixed input, as FNV-1a hashes. An optimization
//! must not change the wire format; a deliberate change bumps `PAYLOAD_VERSION` and these.
//! (The `dct` hash moved once without a format change, when its encoder's transform became a
//! batched one of its own: every chunk's scale, positions and signs stayed, only each chunk's mean
//! magnitude moved, by at most 6.6e-7 relative, from the transform's rounding.)

use lowband_codec::{build, CodecSpec};

fn input() -> Vec<f32> {
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut x: Vec<f32> = (0..1_000_003)
        .map(|_| (next() as f32 / u32::MAX as f32 * 2.0 - 1.0).powi(3))
        .collect();
    // Ties and zeros, which the selection must break the documented way (lower index first).
    for i in (0..x.len()).step_by(97) {
        x[i] = 0.25;
    }
    for i in (0..x.len()).step_by(13) {
        x[i] = 0.0;
    }
    x
}

#[test]
fn every_codec_encodes_the_fixed_input_to_the_same_bytes() {
    let x = input();
    let mut report = Vec::new();
    for spec in [
        "fp32",
        "fp16",
        "bf16",
        "int8",
        "int4:range=std:3",
        "int2:round=stochastic,seed=7",
        "topk:k=64,chunk=4096,values=q2",
        "topk:k=1,chunk=64,values=f32",
        "topk:k=4096,chunk=4096,values=f32",
        "topk:k=300,chunk=1000,values=sign",
        "randomk:k=64,chunk=4096,values=q4,seed=3",
        "dct:k=8,chunk=256,values=sign",
    ] {
        let spec: CodecSpec = spec.parse().unwrap();
        let mut out = Vec::new();
        build(&spec).unwrap().encode(&x, &mut out);
        let hash = out.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        report.push(format!("{spec} {} {hash:016x}", out.len()));
    }
    let expected = include_str!("golden.txt");
    assert_eq!(
        report.join("\n"),
        expected.trim_end(),
        "the wire format changed"
    );
}

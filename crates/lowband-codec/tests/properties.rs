//! Property tests: every codec round-trips within its stated bound for arbitrary finite input
//! (zeros, denormals, huge values, lengths that are not a multiple of the chunk), its payload size
//! equals the documented formula exactly, and no byte string makes a decoder panic.

use lowband_codec::{build, describe, CodecSpec, ErrorFeedback};
use proptest::prelude::*;

/// Finite f32s weighted towards the hard cases.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => -1.0f32..1.0,
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => prop::num::f32::SUBNORMAL,
        1 => prop::num::f32::NORMAL,
        1 => prop_oneof![Just(f32::MAX), Just(f32::MIN), Just(f32::MIN_POSITIVE), Just(1e30f32), Just(-3e38f32)],
    ]
}

fn values() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(value(), 1..700)
}

/// Specs with small chunks, so inputs span several chunks and end in a partial one.
const SPECS: &[&str] = &[
    "fp32",
    "fp16:chunk=37",
    "bf16:chunk=64",
    "int8:chunk=50",
    "int4:chunk=64,round=stochastic,seed=3",
    "int2:chunk=33",
    "int8:chunk=64,range=std:3",
    "topk:k=5,chunk=64,values=f32",
    "topk:k=9,chunk=100,values=q2",
    "topk:k=3,chunk=31,values=sign",
    "topk:k=8,chunk=64,values=q8",
    "topk:k=8,chunk=64,values=q4",
    "topk:k=8,chunk=64,values=f16",
    "randomk:k=4,chunk=50,values=f32,seed=11",
    "randomk:k=6,chunk=64,values=q2",
    "dct:k=4,chunk=16,values=f32",
    "dct:k=16,chunk=16,values=f32",
    "dct:k=3,chunk=32,values=sign",
    // Batched encode at its smallest lengths, and with k above the one-pass selection's 32.
    "dct:k=2,chunk=2,values=f32",
    "dct:k=3,chunk=8,values=f32",
    "dct:k=40,chunk=64,values=q8",
    // A length that is not a power of two: rustdct's transform.
    "dct:k=5,chunk=24,values=f32",
    "dct:k=24,chunk=24,values=f32",
];

fn specs() -> impl Strategy<Value = CodecSpec> {
    prop::sample::select(SPECS).prop_map(|s| s.parse::<CodecSpec>().unwrap())
}

fn chunk_of(spec: &CodecSpec, count: usize) -> usize {
    match *spec {
        CodecSpec::Fp32 => count,
        CodecSpec::Fp16 { chunk } | CodecSpec::Bf16 { chunk } | CodecSpec::Int { chunk, .. } => {
            chunk as usize
        }
        CodecSpec::TopK { chunk, .. }
        | CodecSpec::RandomK { chunk, .. }
        | CodecSpec::DctTopK { chunk, .. } => chunk as usize,
    }
}

/// Entries a sparse chunk of `len` values keeps, as docs/wire-format.md states it: k for a full
/// chunk (and for every `dct` chunk, which is padded), ⌈k · len / chunk⌉ in [1, len] for the last.
fn spec_kept(spec: &CodecSpec, len: usize) -> usize {
    match *spec {
        CodecSpec::TopK { k, chunk, .. } | CodecSpec::RandomK { k, chunk, .. }
            if len < chunk as usize =>
        {
            (k as usize * len).div_ceil(chunk as usize).clamp(1, len)
        }
        CodecSpec::TopK { k, .. } | CodecSpec::RandomK { k, .. } | CodecSpec::DctTopK { k, .. } => {
            k as usize
        }
        _ => len,
    }
}

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Check one chunk against the bound its codec documents.
fn check_chunk(spec: &CodecSpec, x: &[f32], y: &[f32]) -> Result<(), TestCaseError> {
    let m = max_abs(x) as f64;
    let err = |i: usize| (x[i] as f64 - y[i] as f64).abs();
    match *spec {
        CodecSpec::Fp32 => prop_assert!(x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits())),
        CodecSpec::Fp16 { .. } | CodecSpec::Bf16 { .. } => {
            let relative = if matches!(spec, CodecSpec::Fp16 { .. }) {
                2f64.powi(-11)
            } else {
                2f64.powi(-8)
            };
            for i in 0..x.len() {
                prop_assert!(
                    err(i) <= m * (relative + 2f64.powi(-20)),
                    "{spec}: x {} y {} m {m}",
                    x[i],
                    y[i]
                );
            }
        }
        CodecSpec::Int {
            bits,
            range,
            rounding,
            ..
        } => {
            let levels = ((1u32 << bits) - 1) as f64;
            let (lo, hi) = x
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v as f64), h.max(v as f64))
                });
            let step = (hi - lo) / levels;
            let per_rounding = if rounding == lowband_codec::Rounding::Nearest {
                0.5
            } else {
                1.0
            };
            for i in 0..x.len() {
                let bound = step * per_rounding * (1.0 + 1e-6) + m * 2f64.powi(-23);
                match range {
                    lowband_codec::Range::MinMax => {
                        prop_assert!(err(i) <= bound, "{spec}: x {} y {}", x[i], y[i])
                    }
                    // Values outside mean ± k·std are clamped: the bound holds for the rest, and no
                    // value leaves [min, max].
                    lowband_codec::Range::Std(_) => {
                        prop_assert!((y[i] as f64) >= lo && (y[i] as f64) <= hi)
                    }
                }
            }
        }
        CodecSpec::TopK { values, .. } | CodecSpec::RandomK { values, .. } => {
            let k = spec_kept(spec, x.len());
            let nonzero = y.iter().filter(|v| **v != 0.0).count();
            prop_assert!(nonzero <= k, "{spec}: {nonzero} values kept, at most {k}");
            for i in 0..x.len() {
                if y[i] != 0.0 {
                    // A kept zero may decode to a bin's magnitude (q2, sign); a kept non-zero keeps its sign.
                    prop_assert!(
                        x[i] == 0.0 || (x[i] < 0.0) == (y[i] < 0.0),
                        "{spec}: sign of {} decoded as {}",
                        x[i],
                        y[i]
                    );
                    prop_assert!((y[i].abs() as f64) <= m * (1.0 + 1e-6));
                }
                if values == lowband_codec::ValueCoding::F32 {
                    prop_assert!(y[i] == 0.0 || y[i].to_bits() == x[i].to_bits());
                }
                if values == lowband_codec::ValueCoding::Q8 && y[i] != 0.0 {
                    prop_assert!(err(i) <= m / 127.0 * 0.5 * (1.0 + 1e-5));
                }
            }
            if matches!(
                spec,
                CodecSpec::TopK {
                    values: lowband_codec::ValueCoding::F32,
                    ..
                }
            ) {
                // Every dropped magnitude is at most every kept one.
                let kept_min = (0..x.len())
                    .filter(|&i| y[i] != 0.0)
                    .map(|i| x[i].abs())
                    .fold(f32::INFINITY, f32::min);
                let dropped_max = (0..x.len())
                    .filter(|&i| y[i] == 0.0)
                    .map(|i| x[i].abs())
                    .fold(0.0f32, f32::max);
                prop_assert!(
                    nonzero == 0 || dropped_max <= kept_min,
                    "{spec}: dropped {dropped_max} > kept {kept_min}"
                );
            }
        }
        CodecSpec::DctTopK { k, chunk, values } => {
            // An orthonormal projection never adds energy; keeping every coefficient reconstructs.
            let norm = |v: &[f32]| {
                v.iter()
                    .map(|a| (*a as f64 / m.max(1e-300)).powi(2))
                    .sum::<f64>()
                    .sqrt()
            };
            let diff: Vec<f32> = x
                .iter()
                .zip(y)
                .map(|(a, b)| ((*a as f64 - *b as f64) / m.max(1e-300)) as f32)
                .collect();
            let diff_norm = diff.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            if values == lowband_codec::ValueCoding::F32 {
                prop_assert!(diff_norm <= norm(x) * (1.0 + 1e-4) + 1e-4, "{spec}");
                if k == chunk {
                    prop_assert!(
                        diff_norm <= 1e-4 * chunk as f64,
                        "{spec}: full DCT error {diff_norm}"
                    );
                }
            }
            prop_assert!(y.iter().all(|v| v.is_finite()));
        }
    }
    Ok(())
}

const PROPTEST_SEED: u64 = 20_261_125;

/// PROPTEST_RNG_SEED=N or =random overrides the fixed seed.
fn seed_from_env() -> proptest::test_runner::RngSeed {
    match std::env::var("PROPTEST_RNG_SEED").as_deref() {
        Ok("random") => proptest::test_runner::RngSeed::Random,
        Ok(n) => n
            .parse()
            .unwrap_or(proptest::test_runner::RngSeed::Fixed(PROPTEST_SEED)),
        Err(_) => proptest::test_runner::RngSeed::Fixed(PROPTEST_SEED),
    }
}

proptest! {
    // A fixed seed: the suite is deterministic (CI must not fail at random); the random
    // exploration is the fuzzers' job, and cases found there or by a run with
    // PROPTEST_RNG_SEED=random go into properties.proptest-regressions. (A random-seed run found
    // the int codec's overflow on denormal ranges, now a saved regression.)
    #![proptest_config(ProptestConfig { cases: 400, rng_seed: seed_from_env(), ..ProptestConfig::default() })]

    #[test]
    fn round_trip_within_bound_and_size_is_the_formula(spec in specs(), x in values()) {
        let mut codec = build(&spec).unwrap();
        let mut payload = Vec::new();
        codec.encode(&x, &mut payload);
        prop_assert_eq!(payload.len(), spec.payload_bytes(x.len()), "{}", spec);
        let info = describe(&payload).unwrap();
        prop_assert_eq!(info.count, x.len());
        prop_assert!(info.spec.same_wire_parameters(&spec));
        if let Some(bits) = spec.sparse_bits(x.len()) {
            // The breakdown inspect prints adds up to the payload, and pads less than a byte.
            let parts = bits.header_bits + bits.scale_bits + bits.position_bits + bits.value_bits + bits.padding_bits;
            prop_assert_eq!(parts, 8 * payload.len());
            prop_assert!(bits.padding_bits < 8);
            let kept: usize = x.chunks(chunk_of(&spec, x.len())).map(|c| spec_kept(&spec, c.len())).sum();
            prop_assert_eq!(bits.kept, kept);
        }
        let mut y = vec![f32::NAN; x.len()];
        codec.decode(&payload, &mut y).unwrap();
        let chunk = chunk_of(&spec, x.len());
        for (xs, ys) in x.chunks(chunk).zip(y.chunks(chunk)) {
            check_chunk(&spec, xs, ys)?;
        }
    }

    #[test]
    fn any_bytes_are_an_error_or_a_finite_decode(spec in specs(), bytes in prop::collection::vec(any::<u8>(), 0..400), count in 1usize..300) {
        let mut codec = build(&spec).unwrap();
        let mut out = vec![0.0f32; count];
        if codec.decode(&bytes, &mut out).is_ok() {
            prop_assert!(out.iter().all(|v| v.is_finite()));
        }
        let _ = describe(&bytes);
    }

    #[test]
    fn flipping_bits_of_a_real_packet_never_panics(spec in specs(), x in values(), flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6)) {
        let mut codec = build(&spec).unwrap();
        let mut payload = Vec::new();
        codec.encode(&x, &mut payload);
        for (at, bit) in flips {
            let i = at.index(payload.len());
            payload[i] ^= 1 << bit;
        }
        let mut y = vec![0.0f32; x.len()];
        if codec.decode(&payload, &mut y).is_ok() {
            prop_assert!(y.iter().all(|v| v.is_finite()));
        }
    }
}

/// Inputs of 2,000 to 6,000 values: with the specs' small chunks, many groups of 32 chunks, so
/// the sparse decoders' parallel groups (each starting at its computed bit) are all exercised.
fn long_values() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(value(), 2000..6000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, rng_seed: seed_from_env(), ..ProptestConfig::default() })]

    #[test]
    fn long_inputs_round_trip_across_decode_groups(spec in specs(), x in long_values()) {
        let mut codec = build(&spec).unwrap();
        let mut payload = Vec::new();
        codec.encode(&x, &mut payload);
        prop_assert_eq!(payload.len(), spec.payload_bytes(x.len()), "{}", spec);
        let mut y = vec![f32::NAN; x.len()];
        codec.decode(&payload, &mut y).unwrap();
        let chunk = chunk_of(&spec, x.len());
        for (xs, ys) in x.chunks(chunk).zip(y.chunks(chunk)) {
            check_chunk(&spec, xs, ys)?;
        }
    }

    /// `decode_add` is `out + scale · decode` (exactly, for scale ±1) where the codec has the
    /// path, leaves `out` alone where it has not, and leaves it alone on any bad payload.
    #[test]
    fn decode_add_is_out_plus_the_decode_and_touches_nothing_on_error(
        spec in specs(),
        x in long_values(),
        negate in any::<bool>(),
        flip in (any::<prop::sample::Index>(), 0u8..8),
    ) {
        let mut codec = build(&spec).unwrap();
        let mut payload = Vec::new();
        codec.encode(&x, &mut payload);
        let mut decoded = vec![0.0f32; x.len()];
        codec.decode(&payload, &mut decoded).unwrap();
        let base: Vec<f32> = (0..x.len()).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
        let scale = if negate { -1.0 } else { 1.0 };
        let mut out = base.clone();
        let sparse = codec.decode_add(&payload, &mut out, scale).unwrap();
        let adds = matches!(spec, CodecSpec::TopK { .. } | CodecSpec::RandomK { .. });
        prop_assert_eq!(sparse, adds, "{}", spec);
        for i in 0..x.len() {
            let expected = if sparse { base[i] + scale * decoded[i] } else { base[i] };
            prop_assert!(out[i] == expected, "{} at {}: {} != {}", spec, i, out[i], expected);
        }
        // A bad payload: an error and `out` bitwise unchanged (or, rarely, a flip the codec
        // cannot tell from a real packet: then the add of what it decodes to).
        let mut bad = payload.clone();
        let i = flip.0.index(bad.len());
        bad[i] ^= 1 << flip.1;
        let mut out = base.clone();
        if codec.decode_add(&bad, &mut out, scale).is_err() {
            prop_assert!(out.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let truncated = &payload[..payload.len() - 1];
        let mut out = base.clone();
        let result = codec.decode_add(truncated, &mut out, scale);
        prop_assert!(result.is_err() || !adds);
        prop_assert!(out.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn encoders_are_deterministic_for_a_seed() {
    let x: Vec<f32> = (0..1000)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
        .collect();
    for text in SPECS {
        let spec: CodecSpec = text.parse().unwrap();
        let (mut a, mut b) = (build(&spec).unwrap(), build(&spec).unwrap());
        let (mut pa, mut pb) = (Vec::new(), Vec::new());
        a.encode(&x, &mut pa);
        b.encode(&x, &mut pb);
        assert_eq!(pa, pb, "{text}");
    }
}

/// With error feedback the running sum of what was sent tracks the running sum of the deltas
/// (they differ by exactly the residual, which stays bounded); without it the coordinates a
/// top-k never picks are lost for good and the gap grows linearly.
#[test]
fn error_feedback_tracks_the_true_sum_and_its_absence_drifts() {
    let spec: CodecSpec = "topk:k=2,chunk=64,values=f32".parse().unwrap();
    let params = 256;
    // A steady drift on every coordinate, larger on a few: top-k alone sends only the large ones.
    let delta: Vec<f32> = (0..params)
        .map(|i| {
            if i % 32 == 0 {
                1.0
            } else {
                0.05 + 0.001 * (i % 7) as f32
            }
        })
        .collect();
    let gap_after = |rounds: usize, feedback: bool| {
        let mut codec = build(&spec).unwrap();
        let mut state = ErrorFeedback::new(params, if feedback { 1.0 } else { 0.0 });
        let mut sent = vec![0.0f64; params];
        let mut decoded = vec![0.0f32; params];
        let mut payload = Vec::new();
        for _ in 0..rounds {
            payload.clear();
            state.encode(codec.as_mut(), &delta, &mut payload).unwrap();
            codec.decode(&payload, &mut decoded).unwrap();
            for (s, d) in sent.iter_mut().zip(&decoded) {
                *s += *d as f64;
            }
        }
        let gap: f64 = sent
            .iter()
            .zip(&delta)
            .map(|(s, d)| (s - rounds as f64 * *d as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let truth: f64 = delta
            .iter()
            .map(|d| (rounds as f64 * *d as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        gap / truth
    };
    let (with_short, with_long) = (gap_after(50, true), gap_after(500, true));
    let (without_short, without_long) = (gap_after(50, false), gap_after(500, false));
    // Relative gap with feedback shrinks like 1/rounds (the residual is bounded).
    assert!(
        with_long < with_short / 5.0,
        "with feedback: {with_short} -> {with_long}"
    );
    assert!(
        with_long < 0.02,
        "with feedback the sent sum is within 2% of the truth: {with_long}"
    );
    // Without it, the relative gap does not shrink: the small coordinates are never sent.
    assert!(
        without_long > 0.2 && without_long >= without_short * 0.99,
        "without feedback: {without_short} -> {without_long}"
    );
}

/// The error feedback's one-buffer passes (the input formed in the residual, a sparse codec's
/// kept values subtracted in place, the delta formed from two parameter vectors) give bitwise
/// the textbook arithmetic: input = decay · residual + delta, payload = encode(input), residual =
/// input − decode(payload), round after round, for sparse and dense codecs; a non-finite delta is
/// refused naming its index and leaves a cleared residual.
#[test]
fn error_feedback_passes_are_the_textbook_arithmetic_bitwise() {
    let params = 150_000; // several parallel tasks of 65,536 values, and a partial one
    for text in [
        "topk:k=16,chunk=4096,values=q2",
        "randomk:k=6,chunk=64,values=q2",
        "int8:chunk=64",
        "dct:k=4,chunk=16,values=f32",
    ] {
        let spec: CodecSpec = text.parse().unwrap();
        let (mut codec, mut reference_codec, mut difference_codec) = (
            build(&spec).unwrap(),
            build(&spec).unwrap(),
            build(&spec).unwrap(),
        );
        let mut state = ErrorFeedback::new(params, 0.9);
        let mut difference_state = ErrorFeedback::new(params, 0.9);
        let mut residual = vec![0.0f32; params];
        let mut input = vec![0.0f32; params];
        let mut decoded = vec![0.0f32; params];
        for round in 0..4 {
            let from: Vec<f32> = (0..params)
                .map(|i| ((i * 31 + round * 7) % 997) as f32 * 1e-3)
                .collect();
            let to: Vec<f32> = (0..params)
                .map(|i| ((i * 17 + round) % 991) as f32 * 1e-3 - 0.25)
                .collect();
            let delta: Vec<f32> = from.iter().zip(&to).map(|(f, t)| f - t).collect();
            let (mut payload, mut difference_payload, mut reference_payload) =
                (Vec::new(), Vec::new(), Vec::new());
            state.encode(codec.as_mut(), &delta, &mut payload).unwrap();
            difference_state
                .encode_difference(
                    difference_codec.as_mut(),
                    &from,
                    &to,
                    &mut difference_payload,
                )
                .unwrap();
            for ((i, r), d) in input.iter_mut().zip(&residual).zip(&delta) {
                *i = 0.9 * r + d;
            }
            reference_codec.encode(&input, &mut reference_payload);
            reference_codec
                .decode(&reference_payload, &mut decoded)
                .unwrap();
            for ((r, i), d) in residual.iter_mut().zip(&input).zip(&decoded) {
                *r = i - d;
            }
            assert_eq!(payload, reference_payload, "{text} round {round}");
            assert_eq!(
                difference_payload, reference_payload,
                "{text} round {round}"
            );
            for (a, b) in [
                (state.residual(), &residual),
                (difference_state.residual(), &residual),
            ] {
                assert!(
                    a.iter()
                        .zip(b.iter())
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{text} round {round}"
                );
            }
        }
        let mut to = vec![0.0f32; params];
        to[100_000] = f32::NAN;
        let error = difference_state
            .encode_difference(
                difference_codec.as_mut(),
                &vec![0.0; params],
                &to,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert_eq!(
            error,
            lowband_codec::CodecError::NonFinite { index: 100_000 },
            "{text}"
        );
        assert!(
            difference_state.residual().iter().all(|r| *r == 0.0),
            "{text}"
        );
    }
}

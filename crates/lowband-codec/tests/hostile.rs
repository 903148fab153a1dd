//! Hostile payloads get typed errors from every decoder: truncated, oversized, wrong version,
//! wrong codec, wrong length, wrong parameters, and NaN-carrying.

use lowband_codec::{build, describe, CodecError, CodecSpec, PAYLOAD_VERSION};

const SPECS: &[&str] = &[
    "fp32",
    "fp16:chunk=16",
    "bf16:chunk=16",
    "int8:chunk=16",
    "int4:chunk=16",
    "int2:chunk=16",
    "topk:k=4,chunk=16,values=f32",
    "topk:k=4,chunk=16,values=q2",
    "randomk:k=4,chunk=16,values=f32",
    "dct:k=4,chunk=16,values=f32",
];

fn packet(text: &str) -> (CodecSpec, Vec<u8>, Vec<f32>) {
    let spec: CodecSpec = text.parse().unwrap();
    let x: Vec<f32> = (0..40).map(|i| (i as f32 - 17.0) * 0.125).collect();
    let mut payload = Vec::new();
    build(&spec).unwrap().encode(&x, &mut payload);
    (spec, payload, x)
}

#[test]
fn every_prefix_is_truncated_and_every_extension_is_trailing() {
    for text in SPECS {
        let (spec, payload, x) = packet(text);
        let mut codec = build(&spec).unwrap();
        let mut out = vec![0.0; x.len()];
        for len in 0..payload.len() {
            match codec.decode(&payload[..len], &mut out) {
                Err(CodecError::Truncated { .. }) => {}
                other => panic!("{text}: prefix of {len} bytes gave {other:?}"),
            }
        }
        let longer = [payload.clone(), vec![0, 0]].concat();
        assert_eq!(
            codec.decode(&longer, &mut out),
            Err(CodecError::TrailingBytes { extra: 2 }),
            "{text}"
        );
        codec.decode(&payload, &mut out).unwrap();
    }
}

#[test]
fn header_fields_are_checked() {
    for text in SPECS {
        let (spec, payload, x) = packet(text);
        let mut codec = build(&spec).unwrap();
        let mut out = vec![0.0; x.len()];
        let mut version = payload.clone();
        version[1] = PAYLOAD_VERSION + 1;
        assert_eq!(
            codec.decode(&version, &mut out),
            Err(CodecError::WrongVersion {
                expected: PAYLOAD_VERSION,
                found: PAYLOAD_VERSION + 1
            }),
            "{text}"
        );
        let mut unknown = payload.clone();
        unknown[0] = 200;
        assert_eq!(
            codec.decode(&unknown, &mut out),
            Err(CodecError::UnknownCodec(200))
        );
        assert!(
            matches!(
                codec.decode(&payload, &mut vec![0.0; x.len() - 1]),
                Err(CodecError::WrongLength { .. })
            ),
            "{text}"
        );
        let mut huge_count = payload.clone();
        huge_count[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            matches!(
                codec.decode(&huge_count, &mut out),
                Err(CodecError::WrongLength { .. })
            ),
            "{text}"
        );
        assert!(describe(&payload).is_ok());
    }
    // Another codec's packet, and the same codec with other parameters.
    let (_, fp32, x) = packet("fp32");
    let mut int8 = build(&"int8:chunk=16".parse().unwrap()).unwrap();
    assert!(matches!(
        int8.decode(&fp32, &mut vec![0.0; x.len()]),
        Err(CodecError::WrongCodec { .. })
    ));
    let (_, topk, _) = packet("topk:k=4,chunk=16,values=f32");
    let mut other_k = build(&"topk:k=5,chunk=16,values=f32".parse().unwrap()).unwrap();
    assert!(matches!(
        other_k.decode(&topk, &mut vec![0.0; x.len()]),
        Err(CodecError::WrongParameters { .. })
    ));
    // Parameters out of range are malformed before anything is sized from them.
    let mut zero_chunk = topk.clone();
    zero_chunk[10..14].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        describe(&zero_chunk),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn nan_and_infinity_are_refused_wherever_a_value_or_scale_sits() {
    let nan = f32::NAN.to_le_bytes();
    // fp32: a value.
    let (spec, mut payload, x) = packet("fp32");
    payload[6 + 4 * 3..6 + 4 * 4].copy_from_slice(&nan);
    assert_eq!(
        build(&spec)
            .unwrap()
            .decode(&payload, &mut vec![0.0; x.len()]),
        Err(CodecError::NonFinite { index: 3 })
    );
    // fp16: a chunk scale, and a half that is infinite.
    let (spec, payload, x) = packet("fp16:chunk=16");
    let mut scale = payload.clone();
    scale[10..14].copy_from_slice(&f32::INFINITY.to_le_bytes());
    assert!(matches!(
        build(&spec)
            .unwrap()
            .decode(&scale, &mut vec![0.0; x.len()]),
        Err(CodecError::NonFinite { .. })
    ));
    let mut half = payload.clone();
    let at = 10 + 4 * 3;
    half[at..at + 2].copy_from_slice(&0x7C00u16.to_le_bytes());
    assert!(matches!(
        build(&spec).unwrap().decode(&half, &mut vec![0.0; x.len()]),
        Err(CodecError::NonFinite { .. })
    ));
    // int8: a range bound.
    let (spec, mut payload, x) = packet("int8:chunk=16");
    payload[17..21].copy_from_slice(&nan);
    assert!(matches!(
        build(&spec)
            .unwrap()
            .decode(&payload, &mut vec![0.0; x.len()]),
        Err(CodecError::NonFinite { .. })
    ));
    // topk q2: the first chunk's first scale (the bit stream starts byte aligned after the
    // 15-byte header). Values inside the stream are not byte aligned; the property tests flip
    // bits anywhere and require an error or a finite decode.
    let (spec, payload, x) = packet("topk:k=4,chunk=16,values=q2");
    let mut scale = payload.clone();
    scale[15..19].copy_from_slice(&nan);
    assert!(matches!(
        build(&spec)
            .unwrap()
            .decode(&scale, &mut vec![0.0; x.len()]),
        Err(CodecError::NonFinite { .. })
    ));
}

//! Fuzz the `topk` decoder (topk:k=8,chunk=256,values=q2).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lowband_fuzz::decode_with(
    "topk:k=8,chunk=256,values=q2",
    data
));

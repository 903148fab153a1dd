//! Fuzz the `randomk` decoder (randomk:k=8,chunk=256,values=f32).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lowband_fuzz::decode_with(
    "randomk:k=8,chunk=256,values=f32",
    data
));

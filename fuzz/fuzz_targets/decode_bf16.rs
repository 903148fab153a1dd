//! Fuzz the `bf16` decoder (bf16:chunk=64).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lowband_fuzz::decode_with("bf16:chunk=64", data));

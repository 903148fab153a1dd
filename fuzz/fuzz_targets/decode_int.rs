//! Fuzz the `int` decoder (int4:chunk=64).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lowband_fuzz::decode_with("int4:chunk=64", data));

//! Fuzz the `fp16` decoder (fp16:chunk=64).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lowband_fuzz::decode_with("fp16:chunk=64", data));

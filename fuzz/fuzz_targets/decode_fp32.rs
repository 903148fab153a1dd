//! Fuzz the `fp32` decoder (fp32).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lowband_fuzz::decode_with("fp32", data));

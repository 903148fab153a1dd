//! Fuzz the `dct` decoder (dct:k=4,chunk=64,values=sign).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lowband_fuzz::decode_with(
    "dct:k=4,chunk=64,values=sign",
    data
));

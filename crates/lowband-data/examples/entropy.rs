//! Print the default synthetic language's entropy rate:
//! `cargo run --release -p lowband-data --example entropy`.
fn main() {
    let lang = lowband_data::SyntheticLanguage::new(Default::default());
    let start = std::time::Instant::now();
    let bits = lang.entropy_rate_bits_per_byte();
    println!(
        "{bits:.4} bits/byte = {:.4} nats/byte ({:?})",
        bits * std::f64::consts::LN_2,
        start.elapsed()
    );
    let t = std::time::Instant::now();
    let text = lang.generate(8 << 20, 1);
    println!(
        "generated {} bytes in {:?}: {}",
        text.len(),
        t.elapsed(),
        String::from_utf8_lossy(&text[..200])
    );
}

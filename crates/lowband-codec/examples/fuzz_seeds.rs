//! Write valid payloads of every codec as seeds for the fuzz corpus:
//! `cargo run -p lowband-codec --example fuzz_seeds -- fuzz/corpus`.

use lowband_codec::{build, CodecSpec};

fn main() -> std::io::Result<()> {
    let root = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let targets = [
        ("decode_fp32", "fp32"),
        ("decode_fp16", "fp16:chunk=64"),
        ("decode_bf16", "bf16:chunk=64"),
        ("decode_int", "int4:chunk=64"),
        ("decode_topk", "topk:k=8,chunk=256,values=q2"),
        ("decode_randomk", "randomk:k=8,chunk=256,values=f32"),
        ("decode_dct", "dct:k=4,chunk=64,values=sign"),
    ];
    for (target, spec) in targets {
        let spec: CodecSpec = spec.parse().expect("valid spec");
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (i, len) in [1usize, 7, 64, 65, 300].into_iter().enumerate() {
            let values: Vec<f32> = (0..len)
                .map(|j| ((j * 7919 + i) % 97) as f32 * 0.01 - 0.4)
                .collect();
            let mut payload = Vec::new();
            build(&spec).expect("valid").encode(&values, &mut payload);
            std::fs::write(dir.join(format!("seed-{len}")), payload)?;
        }
    }
    Ok(())
}

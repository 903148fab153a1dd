//! Time each kernel at the `ref` preset's shapes (B 16, T 128, C 256, NH 4, V 256):
//! `cargo run --release -p lowband-engine --example kernel_profile`.
use std::time::Instant;

use lowband_engine::kernels::*;

fn time(name: &str, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!("{name:<28} {ms:8.3} ms");
    ms
}

fn main() {
    let (b, t, c, nh, v) = (16usize, 128usize, 256usize, 4usize, 256usize);
    let n = b * t;
    let fill = |len: usize| {
        (0..len)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect::<Vec<f32>>()
    };
    let x = fill(n * c);
    let w_qkv = fill(3 * c * c);
    let w_fc = fill(4 * c * c);
    let bias = fill(4 * c);
    let ones = vec![1.0; n];
    let mut qkv = fill(n * 3 * c);
    let mut fch = fill(n * 4 * c);
    let mut out_c = fill(n * c);
    let mut att = fill(b * nh * t * t);
    let mut datt = fill(b * nh * t * t);
    let mut dw = fill(4 * c * c);
    let mut db = fill(4 * c);
    let mut dqkv = fill(n * 3 * c);
    let mut dx = fill(n * c);
    let mut mean = vec![0.0; n];
    let mut rstd = vec![1.0; n];
    let mut partials = vec![0.0; row_groups(n) * 2 * c];
    let mut probs = fill(n * v);
    let mut losses = vec![0.0; n];
    let targets: Vec<u32> = (0..n as u32).map(|i| i % v as u32).collect();
    let mut total = 0.0;
    total += time("linear_fwd qkv (x4 layers)", 20, || {
        linear_forward(&mut qkv, &x, &w_qkv, Some(&bias[..3 * c]), c, 3 * c)
    }) * 4.0;
    total += time("linear_fwd fc (x4)", 20, || {
        linear_forward(&mut fch, &x, &w_fc, Some(&bias), c, 4 * c)
    }) * 4.0;
    total += time("linear_fwd proj 4C->C (x4)", 20, || {
        linear_forward(&mut out_c, &fch, &w_fc, Some(&bias[..c]), 4 * c, c)
    }) * 4.0;
    total += time("linear_fwd head (x1)", 20, || {
        linear_forward(&mut probs, &x, &w_qkv[..v * c], None, c, v)
    });
    total += time("linear_bwd qkv (x4)", 20, || {
        linear_backward(
            Some(&mut dx),
            &mut dw[..3 * c * c],
            Some(&mut db[..3 * c]),
            &qkv,
            &x,
            &w_qkv,
            &ones,
            c,
            3 * c,
        )
    }) * 4.0;
    total += time("linear_bwd fc (x4)", 20, || {
        linear_backward(
            Some(&mut dx),
            &mut dw,
            Some(&mut db),
            &fch,
            &x,
            &w_fc,
            &ones,
            c,
            4 * c,
        )
    }) * 4.0;
    let fch_in = fch.clone();
    total += time("linear_bwd proj (x4)", 20, || {
        linear_backward(
            Some(&mut fch),
            &mut dw,
            Some(&mut db[..c]),
            &out_c,
            &fch_in,
            &w_fc,
            &ones,
            4 * c,
            c,
        )
    }) * 4.0;
    total += time("attention_fwd (x4)", 20, || {
        attention_forward(&mut out_c, &mut att, &qkv, t, c, nh)
    }) * 4.0;
    total += time("attention_bwd (x4)", 20, || {
        attention_backward(&mut dqkv, &mut datt, &x, &qkv, &att, t, c, nh)
    }) * 4.0;
    let xx = fch.clone();
    total += time("gelu_fwd (x4)", 20, || gelu_forward(&mut fch, &xx)) * 4.0;
    let g = xx.clone();
    total += time("gelu_bwd (x4)", 20, || gelu_backward(&mut fch, &xx, &g)) * 4.0;
    total += time("layernorm_fwd (x9)", 20, || {
        layernorm_forward(
            &mut out_c,
            &mut mean,
            &mut rstd,
            &x,
            &bias[..c],
            &bias[..c],
            c,
        )
    }) * 9.0;
    total += time("layernorm_bwd (x9)", 20, || {
        layernorm_backward(
            &mut dx,
            &mut dw[..c],
            &mut db[..c],
            &mut partials,
            &x,
            &x,
            &bias[..c],
            &mean,
            &rstd,
            c,
        )
    }) * 9.0;
    total += time("residual_add (x8)", 20, || residual_add(&mut out_c, &x)) * 8.0;
    let logits = fill(n * v);
    total += time("crossentropy_fwd", 20, || {
        crossentropy_forward(&mut probs, &mut losses, &logits, &targets, v)
    });
    println!("{:<28} {total:8.3} ms", "sum (one ref step, approx)");
    let mut dbias = vec![0.0f32; 4 * c];
    time("bias grad only, OC=4C (x8)", 20, || {
        matmul(
            &mut dbias,
            4 * c,
            (1, 4 * c, n),
            Mat::rows(&ones, n),
            Mat::rows(&fch, 4 * c),
            1.0,
            false,
            gemm::Parallelism::Rayon(0),
        )
    });
}

#[allow(dead_code)]
fn bias_only() {}

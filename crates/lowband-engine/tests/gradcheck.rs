//! Finite-difference check of the hand-written backward pass, for every parameter tensor.

mod common;

use lowband_engine::Gpt;

/// Loss at the current parameters, in f64 (the engine accumulates the mean loss in f64).
fn loss(model: &mut Gpt, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> f64 {
    model.forward(inputs, Some(targets), b, t).unwrap().unwrap() as f64
}

/// Richardson extrapolation of central differences at steps 2h and h: cancels the O(h²) term.
fn richardson(at_2h: f64, at_h: f64) -> f64 {
    (4.0 * at_h - at_2h) / 3.0
}

/// For each tensor, the directional derivative along three random directions (central
/// differences at steps 2e-2 and 1e-2 in parameter norm, Richardson-extrapolated) against gᵀu from the backward pass.
///
/// Tolerance, and why: with f32 activations the loss (about 5.5) carries rounding noise of about
/// 1e-6, so a central difference with step h = 1e-2 has noise about 1e-4 in absolute terms; the
/// extrapolation leaves a truncation error of O(h⁴). Directional derivatives here are 1e-2 to 1, so we require
/// |fd − analytic| <= 2e-3 · max(|analytic|, 0.05): a wrong term in any backward kernel (a missing
/// factor, a transposed weight, a dropped bias) is off by tens of percent and fails by far.
#[test]
fn every_tensor_gradient_matches_central_differences() {
    let mut model = common::tiny_model(7);
    // Move off the init so that LayerNorm weights and biases are not all 1 and 0.
    let mut state = 12345u64;
    for p in model.params_mut() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
        *p += ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
    }
    let (b, t) = (2, 8);
    let (inputs, targets) = common::batch(model.config(), b, t, 3);
    loss(&mut model, &inputs, &targets, b, t);
    model.backward().unwrap();
    let grads = model.grads().to_vec();
    let tensors = model.layout().tensors.clone();
    let h = 1e-2f32;
    let mut worst = (0.0f64, String::new());
    for tensor in &tensors {
        for direction in 0..3u64 {
            let mut u: Vec<f32> = (0..tensor.len)
                .map(|i| {
                    let x = (i as u64 + 1).wrapping_mul(
                        0x9E3779B97F4A7C15 ^ (direction + 1).wrapping_mul(0xBF58476D1CE4E5B9),
                    );
                    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect();
            let norm = u.iter().map(|v| v * v).sum::<f32>().sqrt();
            u.iter_mut().for_each(|v| *v /= norm);
            let analytic: f64 = grads[tensor.range()]
                .iter()
                .zip(&u)
                .map(|(g, u)| (*g as f64) * (*u as f64))
                .sum();
            let original = model.params()[tensor.range()].to_vec();
            let central = |step: f32, model: &mut Gpt| {
                let mut at = |sign: f32| {
                    for (p, (o, u)) in model.params_mut()[tensor.range()]
                        .iter_mut()
                        .zip(original.iter().zip(&u))
                    {
                        *p = o + sign * step * u;
                    }
                    loss(model, &inputs, &targets, b, t)
                };
                (at(1.0) - at(-1.0)) / (2.0 * step as f64)
            };
            let numeric = richardson(central(2.0 * h, &mut model), central(h, &mut model));
            model.params_mut()[tensor.range()].copy_from_slice(&original);
            let error = (numeric - analytic).abs() / analytic.abs().max(0.05);
            if error > worst.0 {
                worst = (error, tensor.name.clone());
            }
            assert!(
                error <= 2e-3,
                "{} direction {direction}: finite difference {numeric:.6e}, backward {analytic:.6e}",
                tensor.name
            );
        }
    }
    println!("worst relative error {:.2e} in {}", worst.0, worst.1);
}

/// Element-wise check on the largest gradient entries of each tensor (catches errors that cancel
/// along random directions).
#[test]
fn largest_gradient_entries_match_central_differences() {
    let mut model = common::tiny_model(11);
    let (b, t) = (3, 5);
    let (inputs, targets) = common::batch(model.config(), b, t, 5);
    loss(&mut model, &inputs, &targets, b, t);
    model.backward().unwrap();
    let grads = model.grads().to_vec();
    let tensors = model.layout().tensors.clone();
    let h = 1e-2f32;
    for tensor in &tensors {
        let mut order: Vec<usize> = tensor.range().collect();
        order.sort_by(|&a, &b| grads[b].abs().total_cmp(&grads[a].abs()));
        for &i in order.iter().take(3) {
            let original = model.params()[i];
            let central = |step: f32, model: &mut Gpt| {
                model.params_mut()[i] = original + step;
                let plus = loss(model, &inputs, &targets, b, t);
                model.params_mut()[i] = original - step;
                let minus = loss(model, &inputs, &targets, b, t);
                (plus - minus) / (2.0 * step as f64)
            };
            let numeric = richardson(central(2.0 * h, &mut model), central(h, &mut model));
            model.params_mut()[i] = original;
            let analytic = grads[i] as f64;
            assert!(
                (numeric - analytic).abs() <= 2e-3 * analytic.abs().max(0.02),
                "{}[{}]: finite difference {numeric:.6e}, backward {analytic:.6e}",
                tensor.name,
                i - tensor.offset
            );
        }
    }
}

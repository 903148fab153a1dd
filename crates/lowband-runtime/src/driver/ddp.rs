//! DDP: every step, the gradients of K site batches averaged (a ring all-reduce in the ledger).

use super::*;

pub(super) fn run_ddp(
    mut common: Common,
    initial: Vec<f32>,
    persistence: &Persistence,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunResult, RunError> {
    let (config, strategy) = (common.config, common.strategy.clone());
    // One trainer stands for all sites: in DDP every site holds the same parameters and optimizer
    // state; each site has its own data stream.
    let mut trainer = new_trainer(config, strategy.inner_optimizer(config.optimizer), &initial)?;
    let mut samplers: Vec<Sampler> = (0..config.sites).map(|k| site_sampler(config, k)).collect();
    let n = initial.len();
    let k_sites = config.sites as u64;
    let mut first_step = 0;
    if let Some(saved) = state::load(persistence, &strategy)? {
        first_step = saved.step;
        saved.restore_ddp(&mut common, &mut trainer, &mut samplers)?;
    }
    common.evaluate_initial(&initial)?;
    // Ring all-reduce of fp32 gradients: each site sends 2(K − 1)/K x 4 bytes x params per step.
    let bytes_per_site = (2 * (k_sites - 1) * 4 * n as u64) / k_sites;
    let mut sum = vec![0.0f32; n];
    let tokens_total = config.steps * common.tokens_per_site_step() * k_sites;
    for step in first_step..config.steps {
        let (mut computed, loss_sum) =
            average_gradients(&mut common, &mut trainer, &mut samplers, &mut sum)?;
        let lr = common.schedule.lr_at(step);
        // Every site applies the same AdamW step to its own copy: part of each site's compute.
        let start = Instant::now();
        trainer.apply_gradients(lr)?;
        let applied = start.elapsed().as_secs_f64();
        for (k, seconds) in computed.iter_mut().enumerate() {
            *seconds += common.emulated_compute(k, 0, applied);
            common.credit(step, k as u32, *seconds);
        }
        common.compute_seconds += computed.iter().copied().fold(0.0, f64::max);
        common.add_all_reduce(step, bytes_per_site, 4 * n as u64);
        common.record_metric(Metric::Step {
            step,
            loss: loss_sum / k_sites as f32,
            lr,
        });
        common.maybe_evaluate(step + 1, trainer.params())?;
        progress(Progress {
            tokens: (step + 1) * common.tokens_per_site_step() * k_sites,
            tokens_total,
            loss: loss_sum / k_sites as f32,
        });
        // (DDP's "rounds" for checkpoints and stops: every `inner_steps` steps.)
        let finished = step + 1 == config.steps;
        if (step + 1).is_multiple_of(config.inner_steps) || finished {
            let rounds = (step + 1) / config.inner_steps;
            after_round(
                persistence,
                rounds,
                step + 1,
                || {
                    RunState::of_ddp(&common, step + 1, &trainer, &samplers)
                        .save(persistence, &strategy)
                },
                checkpoint_due(config.checkpoint_every_rounds, rounds, finished),
            )?;
        }
    }
    let params = trainer.params().to_vec();
    let mut result = common.finish(config.steps, params)?;
    result.peak_sync_bytes_per_site = 2 * bytes_per_site;
    Ok(result)
}

/// Every site's gradients on its own batch, averaged into the trainer's gradients (the
/// all-reduce); returns each site's seconds on the emulated clock and the summed loss.
fn average_gradients(
    common: &mut Common,
    trainer: &mut CpuTrainer,
    samplers: &mut [Sampler],
    sum: &mut [f32],
) -> Result<(Vec<f64>, f32), RunError> {
    let (config, split) = (common.config, common.split()?);
    let k_sites = config.sites as u64;
    let (mut computed, mut loss_sum) = (Vec::with_capacity(samplers.len()), 0.0f32);
    for (k, sampler) in samplers.iter_mut().enumerate() {
        let start = Instant::now();
        sampler.fill(
            &split.shards[k],
            config.site_batch,
            common.context,
            &mut common.inputs,
            &mut common.targets,
        );
        let batch = Batch {
            inputs: &common.inputs,
            targets: &common.targets,
            batch_size: config.site_batch,
            seq_len: common.context,
        };
        loss_sum += trainer.compute_gradients(&batch)?;
        let grads = trainer.grads();
        if k == 0 {
            sum.copy_from_slice(grads);
        } else {
            sum.iter_mut().zip(grads).for_each(|(s, g)| *s += g);
        }
        computed.push(common.emulated_compute(k, 1, start.elapsed().as_secs_f64()));
    }
    let scale = 1.0 / k_sites as f32;
    trainer
        .grads_mut()
        .iter_mut()
        .zip(sum.iter())
        .for_each(|(g, s)| *g = s * scale);
    Ok((computed, loss_sum))
}

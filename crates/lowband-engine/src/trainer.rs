//! The `Trainer` boundary: what the rest of lowband may know about a model being trained.
//!
//! Parameters are one flat f32 buffer described by an ordered list of named views; a trainer
//! computes gradients for a batch and applies an optimizer step. Rounds, codecs and aggregation
//! work on these flat buffers only, so a GPU trainer can be added behind this trait later.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::layout::TensorInfo;
use crate::model::Gpt;
use crate::optim::{AdamW, OptimizerConfig, StepReport};

/// A batch of B sequences of T token ids; `targets` are the next tokens of `inputs`.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [u32],
    pub batch_size: usize,
    pub seq_len: usize,
}

/// What a site's compute engine offers. Implemented by [`CpuTrainer`].
pub trait Trainer: Send {
    fn model_config(&self) -> &ModelConfig;
    /// The named views, in buffer order.
    fn tensors(&self) -> &[TensorInfo];
    fn params(&self) -> &[f32];
    fn params_mut(&mut self) -> &mut [f32];
    /// Gradients of the last `compute_gradients`, in the parameter layout.
    fn grads(&self) -> &[f32];
    /// Writable so that a caller can average gradients across sites before `apply_gradients`.
    fn grads_mut(&mut self) -> &mut [f32];
    /// Forward + backward on `batch`; returns the mean loss (nats per token).
    fn compute_gradients(&mut self, batch: &Batch) -> Result<f32>;
    /// Clip and apply the current gradients with learning rate `lr`.
    fn apply_gradients(&mut self, lr: f32) -> Result<StepReport>;
    /// Mean loss on `batch`, without touching gradients or optimizer state.
    fn evaluate(&mut self, batch: &Batch) -> Result<f32>;
    /// The optimizer's state (first and second moments in the parameter layout, and steps taken).
    fn optimizer(&self) -> &AdamW;
    fn optimizer_mut(&mut self) -> &mut AdamW;

    /// One inner step: gradients, then the update.
    fn step(&mut self, batch: &Batch, lr: f32) -> Result<(f32, StepReport)> {
        let loss = self.compute_gradients(batch)?;
        Ok((loss, self.apply_gradients(lr)?))
    }
}

/// The hand-written CPU engine behind the `Trainer` boundary.
pub struct CpuTrainer {
    pub model: Gpt,
    pub optimizer: AdamW,
}

impl CpuTrainer {
    pub fn new(model: Gpt, config: OptimizerConfig) -> Result<Self> {
        config.validate()?;
        let optimizer = AdamW::new(config, model.params().len());
        Ok(CpuTrainer { model, optimizer })
    }
}

impl Trainer for CpuTrainer {
    fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }
    fn tensors(&self) -> &[TensorInfo] {
        &self.model.layout().tensors
    }
    fn params(&self) -> &[f32] {
        self.model.params()
    }
    fn params_mut(&mut self) -> &mut [f32] {
        self.model.params_mut()
    }
    fn grads(&self) -> &[f32] {
        self.model.grads()
    }
    fn grads_mut(&mut self) -> &mut [f32] {
        self.model.grads_mut()
    }
    fn compute_gradients(&mut self, batch: &Batch) -> Result<f32> {
        let loss = self.model.forward(
            batch.inputs,
            Some(batch.targets),
            batch.batch_size,
            batch.seq_len,
        )?;
        self.model.backward()?;
        Ok(loss.unwrap_or(f32::NAN))
    }
    fn apply_gradients(&mut self, lr: f32) -> Result<StepReport> {
        let (tensors, params, grads) = self.model.tensors_params_grads_mut();
        self.optimizer.update(tensors, params, grads, lr)
    }
    fn evaluate(&mut self, batch: &Batch) -> Result<f32> {
        let loss = self.model.forward(
            batch.inputs,
            Some(batch.targets),
            batch.batch_size,
            batch.seq_len,
        )?;
        Ok(loss.unwrap_or(f32::NAN))
    }
    fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }
    fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }
}

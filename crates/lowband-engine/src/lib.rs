//! lowband's training engine (the model + train layer of `shared/design.md`).
//!
//! One GPT-2 family model written by hand on flat f32 buffers, llm.c style: `kernels` holds every
//! forward kernel beside its backward, `model` chains them, `optim` is AdamW over the flat buffer.
//! The rest of lowband sees only the [`Trainer`] boundary and named flat views ([`TensorInfo`]).

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod hf;
pub mod kernels;
pub mod layout;
pub mod model;
pub mod muon;
pub mod optim;
pub mod sample;
pub mod trainer;

pub use config::{preset, ModelConfig, Preset, PRESETS};
pub use error::{EngineError, Result};
pub use layout::{ParamLayout, TensorInfo};
pub use model::Gpt;
pub use muon::MuonConfig;
pub use optim::{AdamW, LrSchedule, OptimizerConfig, StepReport};
pub use trainer::{Batch, CpuTrainer, Trainer};

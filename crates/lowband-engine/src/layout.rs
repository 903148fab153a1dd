//! The order, names and shapes of the parameters inside the one flat buffer.
//!
//! Order: `wte`, `wpe`, then per block `h.{l}.*` (so a block is one contiguous fragment, which
//! streaming synchronisation can send on its own), then `ln_f.*`. Linear weights are stored
//! `[out, in]` as in `torch.nn.Linear`; the Hugging Face export transposes them to Conv1D's `[in, out]`.

use crate::config::ModelConfig;

/// One named view into the flat parameter buffer (and, at the same offsets, into the gradient
/// and optimizer-state buffers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
    /// Number of elements (product of `shape`).
    pub len: usize,
    /// Whether AdamW's decoupled weight decay applies (2-D weights only, as in the reference).
    pub weight_decay: bool,
}

impl TensorInfo {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// Offsets of one block's parameters in the flat buffer.
#[derive(Clone, Copy, Debug)]
pub struct BlockOffsets {
    pub ln_1_weight: usize,
    pub ln_1_bias: usize,
    pub qkv_weight: usize,
    pub qkv_bias: usize,
    pub attn_proj_weight: usize,
    pub attn_proj_bias: usize,
    pub ln_2_weight: usize,
    pub ln_2_bias: usize,
    pub fc_weight: usize,
    pub fc_bias: usize,
    pub mlp_proj_weight: usize,
    pub mlp_proj_bias: usize,
}

/// Where every tensor lives.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<TensorInfo>,
    pub wte: usize,
    pub wpe: usize,
    pub blocks: Vec<BlockOffsets>,
    pub ln_f_weight: usize,
    pub ln_f_bias: usize,
    pub total: usize,
}

impl ParamLayout {
    /// The layout of a validated config.
    pub fn new(config: &ModelConfig) -> Self {
        let (v, t, c) = (config.vocab_size, config.context_length, config.width);
        let mut tensors = Vec::new();
        let mut offset = 0;
        let mut push = |name: String, shape: Vec<usize>| {
            let len = shape.iter().product();
            let weight_decay = shape.len() >= 2;
            tensors.push(TensorInfo {
                name,
                shape,
                offset,
                len,
                weight_decay,
            });
            offset += len;
            offset - len
        };
        let wte = push("wte".into(), vec![v, c]);
        let wpe = push("wpe".into(), vec![t, c]);
        let mut blocks = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            let p = |s: &str| format!("h.{l}.{s}");
            blocks.push(BlockOffsets {
                ln_1_weight: push(p("ln_1.weight"), vec![c]),
                ln_1_bias: push(p("ln_1.bias"), vec![c]),
                qkv_weight: push(p("attn.qkv.weight"), vec![3 * c, c]),
                qkv_bias: push(p("attn.qkv.bias"), vec![3 * c]),
                attn_proj_weight: push(p("attn.proj.weight"), vec![c, c]),
                attn_proj_bias: push(p("attn.proj.bias"), vec![c]),
                ln_2_weight: push(p("ln_2.weight"), vec![c]),
                ln_2_bias: push(p("ln_2.bias"), vec![c]),
                fc_weight: push(p("mlp.fc.weight"), vec![4 * c, c]),
                fc_bias: push(p("mlp.fc.bias"), vec![4 * c]),
                mlp_proj_weight: push(p("mlp.proj.weight"), vec![c, 4 * c]),
                mlp_proj_bias: push(p("mlp.proj.bias"), vec![c]),
            });
        }
        let ln_f_weight = push("ln_f.weight".into(), vec![c]);
        let ln_f_bias = push("ln_f.bias".into(), vec![c]);
        let total = tensors.iter().map(|t| t.len).sum();
        debug_assert_eq!(total, config.parameter_count());
        ParamLayout {
            tensors,
            wte,
            wpe,
            blocks,
            ln_f_weight,
            ln_f_bias,
            total,
        }
    }

    /// The tensor with this name, if any.
    pub fn find(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

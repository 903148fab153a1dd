//! Hugging Face GPT-2 layout: export a lowband model so `transformers` loads it
//! (`GPT2LMHeadModel.from_pretrained(dir)`), and import that layout back.
//!
//! Differences from our layout: names carry the `transformer.` prefix and GPT-2's module names
//! (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`); those four are Conv1D weights stored
//! `[in, out]`, the transpose of ours; the head is tied, so there is no `lm_head.weight`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_limited, tensors_to_safetensors, write_atomic};
use crate::config::{ModelConfig, LAYER_NORM_EPSILON};
use crate::error::{EngineError, Result};
use crate::layout::{ParamLayout, TensorInfo};
use crate::model::check_finite;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
const CONFIG_BYTES_MAX: u64 = 1 << 20;

/// The fields of a Hugging Face GPT-2 `config.json` that decide the model's computation.
#[derive(Debug, Serialize, Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    n_positions: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    #[serde(default)]
    n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    activation_function: String,
    #[serde(default = "default_epsilon")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    #[serde(default)]
    scale_attn_weights: Option<bool>,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: Option<bool>,
    #[serde(default)]
    reorder_and_upcast_attn: Option<bool>,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// Our tensor name → (Hugging Face name, whether the stored weight is transposed).
pub fn hf_name(ours: &str) -> (String, bool) {
    let name = match ours {
        "wte" => "wte.weight".to_string(),
        "wpe" => "wpe.weight".to_string(),
        other => other
            .replace("attn.qkv.", "attn.c_attn.")
            .replace("attn.proj.", "attn.c_proj.")
            .replace("mlp.fc.", "mlp.c_fc.")
            .replace("mlp.proj.", "mlp.c_proj."),
    };
    let transposed = ours.starts_with("h.") && ours.ends_with(".weight") && !ours.contains(".ln_");
    (format!("transformer.{name}"), transposed)
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Write `DIR/model.safetensors` and `DIR/config.json` in the Hugging Face GPT-2 layout.
pub fn export(dir: &Path, config: &ModelConfig, params: &[f32]) -> Result<()> {
    config.validate()?;
    let layout = ParamLayout::new(config);
    assert_eq!(
        params.len(),
        layout.total,
        "parameter buffer does not match its config"
    );
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let converted: Vec<(String, Vec<usize>, Vec<f32>)> = layout
        .tensors
        .iter()
        .map(|t: &TensorInfo| {
            let (name, transposed) = hf_name(&t.name);
            let data = &params[t.range()];
            if transposed {
                (
                    name,
                    vec![t.shape[1], t.shape[0]],
                    transpose(data, t.shape[0], t.shape[1]),
                )
            } else {
                (name, t.shape.clone(), data.to_vec())
            }
        })
        .collect();
    let named: Vec<_> = converted
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    let metadata = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    write_atomic(
        &dir.join(WEIGHTS_FILE),
        &tensors_to_safetensors(&named, Some(metadata))?,
    )?;
    let hf_config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.width,
        "n_layer": config.layers,
        "n_head": config.heads,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": true,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    });
    let json = serde_json::to_vec_pretty(&hf_config)
        .map_err(|e| EngineError::config("config", e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), &json)
}

/// Read a Hugging Face GPT-2 directory (config.json + model.safetensors, f32) into our layout.
/// Refuses configurations our engine computes differently (another activation, epsilon, inner
/// width, an untied head, or attention variants).
pub fn import(dir: &Path) -> Result<(ModelConfig, Vec<f32>)> {
    let config_path = dir.join(CONFIG_FILE);
    let bytes = read_limited(&config_path, CONFIG_BYTES_MAX)?;
    let hf: HfConfig = serde_json::from_slice(&bytes)
        .map_err(|e| EngineError::checkpoint(&config_path, format!("not a GPT-2 config: {e}")))?;
    let config = check_hf_config(&config_path, &hf)?;
    let layout = ParamLayout::new(&config);
    let weights_path = dir.join(WEIGHTS_FILE);
    let limit = config.parameter_count() as u64 * 4 * 2 + (1 << 24);
    let bytes = read_limited(&weights_path, limit)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        EngineError::checkpoint(&weights_path, format!("not a valid safetensors file: {e}"))
    })?;
    let mut params = vec![0.0f32; layout.total];
    for t in &layout.tensors {
        let (name, transposed) = hf_name(&t.name);
        let bare = name.trim_start_matches("transformer.").to_string();
        let view = st
            .tensor(&name)
            .or_else(|_| st.tensor(&bare))
            .map_err(|_| {
                EngineError::checkpoint(&weights_path, format!("missing tensor {name:?}"))
            })?;
        let shape: Vec<usize> = if transposed {
            vec![t.shape[1], t.shape[0]]
        } else {
            t.shape.clone()
        };
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(EngineError::checkpoint(
                &weights_path,
                format!(
                    "tensor {name:?} has dtype {:?}; only F32 is read",
                    view.dtype()
                ),
            ));
        }
        if view.shape() != shape.as_slice() {
            return Err(EngineError::checkpoint(
                &weights_path,
                format!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    view.shape()
                ),
            ));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let dst = &mut params[t.range()];
        if transposed {
            dst.copy_from_slice(&transpose(&values, shape[0], shape[1]));
        } else {
            dst.copy_from_slice(&values);
        }
    }
    check_untied_head(
        &st,
        &weights_path,
        &params[layout.wte..][..config.vocab_size * config.width],
    )?;
    check_finite(&layout, &params)?;
    Ok((config, params))
}

fn check_hf_config(path: &Path, hf: &HfConfig) -> Result<ModelConfig> {
    let refuse = |what: String| Err(EngineError::checkpoint(path, what));
    if hf.model_type != "gpt2" {
        return refuse(format!(
            "model_type {:?}; only gpt2 is supported",
            hf.model_type
        ));
    }
    if !matches!(
        hf.activation_function.as_str(),
        "gelu_new" | "gelu_pytorch_tanh"
    ) {
        return refuse(format!(
            "activation_function {:?}; lowband computes tanh-GELU (gelu_new)",
            hf.activation_function
        ));
    }
    if (hf.layer_norm_epsilon - LAYER_NORM_EPSILON as f64).abs() > 1e-12 {
        return refuse(format!(
            "layer_norm_epsilon {}; lowband uses {LAYER_NORM_EPSILON}",
            hf.layer_norm_epsilon
        ));
    }
    if hf.n_inner.is_some_and(|n| n != 4 * hf.n_embd) {
        return refuse(format!(
            "n_inner {:?}; lowband's MLP is 4 x n_embd",
            hf.n_inner
        ));
    }
    if !hf.tie_word_embeddings {
        return refuse(
            "tie_word_embeddings is false; lowband's head is tied to the token embedding".into(),
        );
    }
    if hf.scale_attn_weights == Some(false)
        || hf.scale_attn_by_inverse_layer_idx == Some(true)
        || hf.reorder_and_upcast_attn == Some(true)
    {
        return refuse("an attention variant lowband does not compute (scale_attn_* / reorder_and_upcast_attn)".into());
    }
    let config = ModelConfig {
        vocab_size: hf.vocab_size,
        context_length: hf.n_positions,
        layers: hf.n_layer,
        width: hf.n_embd,
        heads: hf.n_head,
    };
    config.validate()?;
    Ok(config)
}

/// An `lm_head.weight`, if present, must equal the token embedding (the head is tied).
fn check_untied_head(st: &safetensors::SafeTensors, path: &Path, wte: &[f32]) -> Result<()> {
    let Ok(head) = st.tensor("lm_head.weight") else {
        return Ok(());
    };
    let same = head.dtype() == safetensors::Dtype::F32
        && head.data().len() == wte.len() * 4
        && head
            .data()
            .chunks_exact(4)
            .zip(wte)
            .all(|(b, w)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) == *w);
    if same {
        Ok(())
    } else {
        Err(EngineError::checkpoint(
            path,
            "lm_head.weight differs from wte: an untied head is not supported",
        ))
    }
}

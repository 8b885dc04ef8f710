//! Model hyper-parameters, read from an HF `config.json` or from GGUF metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use super::error::{EngineError, Result};

/// How RoPE positions are stretched beyond the trained context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (Vicuna v1.5-16k uses 4).
    Linear { factor: f64 },
    /// NTK-aware base growth once a sequence passes `original_max`.
    Dynamic { factor: f64, original_max: usize },
}

/// The shape of a LLaMA-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Tokens one sequence may hold (prompt + completion), scaling included.
    pub context_length: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `eos_token_id` is an int or a list in HF files.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub(crate) fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "rope_type")]
    r#type: Option<String>,
    factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    /// transformers 5.x moves `rope_theta` and the scaling here.
    rope_parameters: Option<HfRopeScaling>,
    rope_scaling: Option<HfRopeScaling>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_max_pos() -> usize {
    2048
}

impl ModelConfig {
    /// Reads `config.json` of a `LlamaForCausalLM` checkpoint.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::checkpoint(path, e))?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| EngineError::checkpoint(path, format!("not a valid LLaMA config: {e}")))?;
        let arch = hf.architectures.as_ref().and_then(|a| a.first()).cloned();
        let is_llama = match (&arch, &hf.model_type) {
            (Some(a), _) => a == "LlamaForCausalLM",
            (None, Some(t)) => t == "llama",
            (None, None) => false,
        };
        if !is_llama {
            let what = arch.or(hf.model_type).unwrap_or_else(|| "none given".into());
            return Err(EngineError::checkpoint(
                path,
                format!("unsupported architecture {what}: herd serves LlamaForCausalLM models"),
            ));
        }
        if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(EngineError::checkpoint(path, format!("unsupported hidden_act {act}: LLaMA uses silu")));
        }
        let scaling = hf.rope_scaling.as_ref().or(hf.rope_parameters.as_ref());
        let rope_theta =
            hf.rope_theta.or_else(|| hf.rope_parameters.as_ref().and_then(|p| p.rope_theta)).unwrap_or(10_000.0);
        let max_pos = hf.max_position_embeddings;
        let (rope_scaling, context_length) = match scaling.and_then(|s| s.r#type.as_deref().map(|t| (t, s))) {
            None | Some(("default", _)) => (RopeScaling::None, max_pos),
            Some((kind, s)) => {
                let factor = s
                    .factor
                    .filter(|f| *f >= 1.0)
                    .ok_or_else(|| EngineError::checkpoint(path, format!("rope_scaling {kind} needs a factor >= 1")))?;
                let scaled = (max_pos as f64 * factor) as usize;
                match kind {
                    "linear" => (RopeScaling::Linear { factor }, scaled),
                    "dynamic" => {
                        let original_max = s.original_max_position_embeddings.unwrap_or(max_pos);
                        (RopeScaling::Dynamic { factor, original_max }, scaled)
                    }
                    other => {
                        return Err(EngineError::checkpoint(
                            path,
                            format!("unsupported rope_scaling type {other} (herd supports linear and dynamic)"),
                        ));
                    }
                }
            }
        };
        // Zero heads is caught by validate(); a zero head_dim here just defers to it.
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size.checked_div(hf.num_attention_heads).unwrap_or(0));
        let cfg = Self {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim,
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            context_length,
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids: hf.eos_token_id.map(|e| e.ids()).unwrap_or_default(),
        };
        cfg.validate().map_err(|msg| EngineError::checkpoint(path, msg))?;
        Ok(cfg)
    }

    /// Reads the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(md: &HashMap<String, gguf_file::Value>, path: &Path) -> Result<Self> {
        let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        if arch.as_deref() != Some("llama") {
            let what = arch.unwrap_or_else(|| "none given".into());
            return Err(EngineError::checkpoint(
                path,
                format!("unsupported GGUF architecture {what}: herd serves llama models"),
            ));
        }
        let need = |key: &str| -> Result<usize> {
            md.get(key)
                .and_then(gguf_uint)
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::checkpoint(path, format!("GGUF metadata lacks {key}")))
        };
        let hidden_size = need("llama.embedding_length")?;
        let num_heads = need("llama.attention.head_count")?;
        let num_kv_heads =
            md.get("llama.attention.head_count_kv").and_then(gguf_uint).map_or(num_heads, |v| v as usize);
        let head_dim = md
            .get("llama.rope.dimension_count")
            .and_then(gguf_uint)
            .map_or(hidden_size.checked_div(num_heads).unwrap_or(0), |v| v as usize);
        let float = |key: &str| md.get(key).and_then(gguf_float);
        let max_pos = need("llama.context_length")?;
        let scaling_type = md.get("llama.rope.scaling.type").and_then(|v| v.to_string().ok()).cloned();
        let factor = float("llama.rope.scaling.factor").unwrap_or(1.0);
        let (rope_scaling, context_length) = match scaling_type.as_deref() {
            Some("linear") if factor > 1.0 => (RopeScaling::Linear { factor }, (max_pos as f64 * factor) as usize),
            Some("none") | None | Some("linear") => (RopeScaling::None, max_pos),
            Some(other) => {
                return Err(EngineError::checkpoint(path, format!("unsupported llama.rope.scaling.type {other}")));
            }
        };
        let eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| md.get(*k).and_then(gguf_uint).map(|v| v as u32))
            .collect();
        let vocab_size = match md.get("llama.vocab_size").and_then(gguf_uint) {
            Some(v) => v as usize,
            None => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| EngineError::checkpoint(path, "GGUF metadata gives no vocabulary size"))?,
        };
        let cfg = Self {
            hidden_size,
            intermediate_size: need("llama.feed_forward_length")?,
            num_layers: need("llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            context_length,
            tie_word_embeddings: false,
            bos_token_id: md.get("tokenizer.ggml.bos_token_id").and_then(gguf_uint).map(|v| v as u32),
            eos_token_ids: eos,
        };
        cfg.validate().map_err(|msg| EngineError::checkpoint(path, msg))?;
        Ok(cfg)
    }

    /// Checks that the numbers make a consistent model (heads divide, nothing is zero).
    /// The number of weights the config implies (embedding, layers, norms and head).
    pub fn parameter_count(&self) -> u64 {
        let (h, q, kv) = (self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        (heads * self.vocab_size * h + self.num_layers * layer + h) as u64
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let fields = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("context length", self.context_length),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is 0"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} is odd; RoPE needs it even", self.head_dim));
        }
        Ok(())
    }
}

/// Any unsigned or non-negative integer GGUF value.
pub(crate) fn gguf_uint(v: &gguf_file::Value) -> Option<u64> {
    use gguf_file::Value as V;
    match *v {
        V::U8(x) => Some(x.into()),
        V::U16(x) => Some(x.into()),
        V::U32(x) => Some(x.into()),
        V::U64(x) => Some(x),
        V::I8(x) => u64::try_from(x).ok(),
        V::I16(x) => u64::try_from(x).ok(),
        V::I32(x) => u64::try_from(x).ok(),
        V::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn gguf_float(v: &gguf_file::Value) -> Option<f64> {
    match *v {
        gguf_file::Value::F32(x) => Some(x.into()),
        gguf_file::Value::F64(x) => Some(x),
        _ => gguf_uint(v).map(|x| x as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(json: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, json).unwrap();
        (dir, p)
    }

    const BASE: &str = r#""architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100,"max_position_embeddings":4096"#;

    #[test]
    fn parameter_count_is_vicuna_7bs() {
        let (_d, p) = write(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":11008,
            "num_hidden_layers":32,"num_attention_heads":32,"vocab_size":32000,"max_position_embeddings":4096}"#,
        );
        // LLaMA-7B's published count, embedding, norms and head included.
        assert_eq!(ModelConfig::from_hf_file(&p).unwrap().parameter_count(), 6_738_415_616);
    }

    #[test]
    fn vicuna_16k_linear_scaling_quadruples_context() {
        let (_d, p) = write(&format!(r#"{{{BASE},"rope_scaling":{{"type":"linear","factor":4.0}}}}"#));
        let c = ModelConfig::from_hf_file(&p).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        assert_eq!(c.context_length, 16384);
        assert_eq!(c.num_kv_heads, 4);
        assert_eq!(c.rope_theta, 10_000.0);
    }

    #[test]
    fn transformers5_rope_parameters_give_theta() {
        let (_d, p) =
            write(&format!(r#"{{{BASE},"rope_parameters":{{"rope_type":"default","rope_theta":500000.0}}}}"#));
        let c = ModelConfig::from_hf_file(&p).unwrap();
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn dynamic_scaling_and_eos_list() {
        let (_d, p) =
            write(&format!(r#"{{{BASE},"rope_scaling":{{"rope_type":"dynamic","factor":2.0}},"eos_token_id":[2,7]}}"#));
        let c = ModelConfig::from_hf_file(&p).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Dynamic { factor: 2.0, original_max: 4096 });
        assert_eq!(c.eos_token_ids, vec![2, 7]);
    }

    #[test]
    fn bad_configs_name_the_file_and_problem() {
        let (_d, p) = write(
            r#"{"architectures":["MistralForCausalLM"],"hidden_size":64,"intermediate_size":1,"num_hidden_layers":1,"num_attention_heads":4,"vocab_size":9}"#,
        );
        let e = ModelConfig::from_hf_file(&p).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("unsupported architecture MistralForCausalLM"), "{e}");
        let (_d, p) = write(&format!(r#"{{{BASE},"num_key_value_heads":3}}"#));
        let e = ModelConfig::from_hf_file(&p).unwrap_err().to_string();
        assert!(e.contains("not a multiple of num_key_value_heads 3"), "{e}");
        let (_d, p) = write("{ not json");
        let e = ModelConfig::from_hf_file(&p).unwrap_err().to_string();
        assert!(e.contains("not a valid LLaMA config"), "{e}");
    }
}

//! The runtime shape of a decoder: dimensions, attention layout, RoPE, read once from a model file.
//!
//! Owns the mapping from GGUF metadata keys (`{arch}.embedding_length`, ...) and from a Hugging Face
//! `config.json` to [`ModelConfig`]; does not own weights.

use candle_core::quantized::gguf_file;

use crate::error::EngineError;

/// Decoder family. Both are pre-norm RMSNorm decoders with SwiGLU MLPs and grouped-query attention; Qwen2
/// adds biases to the q/k/v projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Qwen2,
    Llama,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Qwen2 => "qwen2",
            Family::Llama => "llama",
        }
    }
}

/// How rotary embeddings pair up dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (i, i + d/2): Hugging Face checkpoints and GGUF Qwen2.
    Halves,
    /// Pairs (2i, 2i + 1): GGUF Llama, whose converter permuted q/k rows for this layout.
    Interleaved,
}

/// Everything a forward pass needs to know about the model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden: usize,
    pub layers: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope: RopeStyle,
}

impl ModelConfig {
    /// Reads the config from GGUF metadata; `vocab` comes from the embedding tensor.
    pub fn from_gguf(content: &gguf_file::Content, vocab: usize) -> Result<Self, EngineError> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| EngineError::BadModel("missing general.architecture".into()))?
            .clone();
        let family = match arch.as_str() {
            "qwen2" => Family::Qwen2,
            "llama" => Family::Llama,
            other => {
                return Err(EngineError::BadModel(format!(
                    "architecture {other:?} is not supported (qwen2, llama)"
                )))
            }
        };
        let get_u = |key: &str| -> Result<usize, EngineError> {
            let full = format!("{arch}.{key}");
            md.get(&full)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::BadModel(format!("missing or non-integer {full}")))
        };
        let get_f = |key: &str| -> Option<f32> {
            md.get(&format!("{arch}.{key}"))
                .and_then(|v| v.to_f32().ok())
        };
        let hidden = get_u("embedding_length")?;
        let heads = get_u("attention.head_count")?;
        let kv_heads = get_u("attention.head_count_kv").unwrap_or(heads);
        let cfg = Self {
            family,
            hidden,
            layers: get_u("block_count")?,
            ffn: get_u("feed_forward_length")?,
            heads,
            kv_heads,
            head_dim: get_u("attention.key_length").unwrap_or(hidden / heads.max(1)),
            vocab,
            context: get_u("context_length").unwrap_or(4096),
            rms_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_theta: get_f("rope.freq_base").unwrap_or(10_000.0),
            rope: match family {
                Family::Qwen2 => RopeStyle::Halves,
                Family::Llama => RopeStyle::Interleaved,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json` (Qwen2ForCausalLM or LlamaForCausalLM).
    pub fn from_hf_json(json: &serde_json::Value) -> Result<Self, EngineError> {
        let get_u = |key: &str| -> Result<usize, EngineError> {
            json.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::BadModel(format!("config.json: missing integer {key}")))
        };
        let model_type = json
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let family = match model_type {
            "qwen2" => Family::Qwen2,
            "llama" => Family::Llama,
            other => {
                return Err(EngineError::BadModel(format!(
                    "config.json: model_type {other:?} is not supported (qwen2, llama)"
                )))
            }
        };
        let hidden = get_u("hidden_size")?;
        let heads = get_u("num_attention_heads")?;
        let cfg = Self {
            family,
            hidden,
            layers: get_u("num_hidden_layers")?,
            ffn: get_u("intermediate_size")?,
            heads,
            kv_heads: get_u("num_key_value_heads").unwrap_or(heads),
            head_dim: get_u("head_dim").unwrap_or(hidden / heads.max(1)),
            vocab: get_u("vocab_size")?,
            context: get_u("max_position_embeddings").unwrap_or(4096),
            rms_eps: json
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6) as f32,
            rope_theta: json
                .get("rope_theta")
                .and_then(|v| v.as_f64())
                .unwrap_or(10_000.0) as f32,
            rope: RopeStyle::Halves,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: &str| Err(EngineError::BadModel(what.to_string()));
        if self.hidden == 0 || self.layers == 0 || self.heads == 0 || self.kv_heads == 0 {
            return bad("zero-sized dimension");
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad("head count is not a multiple of the kv head count");
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return bad("head dimension must be even");
        }
        if self.vocab == 0 {
            return bad("empty vocabulary");
        }
        Ok(())
    }

    /// Width of the q projection.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of each of the k and v projections.
    /// Bytes one position takes in a [`crate::KvCache`]: a key and a value per layer, f32.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * self.kv_dim() * 2 * std::mem::size_of::<f32>()
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
